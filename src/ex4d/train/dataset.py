"""Reading a pair dataset written by ``ex4d make-pairs`` (layout in ``docs/training.md``).

Each item is one clip at the training size: the source video (the target) and its simulated mask.
The condition ``cond = video * mask`` is recomputed from these two (exact) rather than read from
``cond.mp4``, whose H.264 coding would bleed colour across mask edges. Mask erosion and the
reference's scalings are *not* applied here: the training system applies them per sample with the
pipeline's own conditioning code, so that each step draws a fresh erosion like inference does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ex4d.errors import InputError

log = logging.getLogger(__name__)


def find_pairs(root: str | os.PathLike) -> list[Path]:
    """Complete clip folders (those with ``pair.json``) under ``<root>/clips``, sorted by id.

    A folder written by ``ex4d make-pairs`` in which no clip finished (all failed) gives an empty
    list; :func:`describe_empty` says why. A folder that make-pairs never wrote is an InputError.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root} (make one with `ex4d make-pairs`)")
    clips_dir = root / "clips"
    if not clips_dir.is_dir():
        if (root / "manifest.json").is_file():
            return []  # make-pairs ran here but no clip finished
        raise InputError(f"{root} is not a pair dataset (no clips/ folder and no manifest.json); "
                         f"make one with `ex4d make-pairs VIDEOS -o {root}`")
    return sorted(p for p in clips_dir.iterdir() if p.is_dir() and (p / "pair.json").is_file())


def manifest_counts(root: str | os.PathLike) -> dict[str, int] | None:
    """Clip statuses in ``<root>/manifest.json`` (``{"done": n, "error": m}``), None if it is unreadable."""
    try:
        clips = json.loads((Path(root) / "manifest.json").read_text()).get("clips")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(clips, dict):
        return None
    counts: dict[str, int] = {}
    for record in clips.values():
        status = record.get("status", "unknown") if isinstance(record, dict) else "unknown"
        counts[status] = counts.get(status, 0) + 1
    return counts


def describe_empty(root: str | os.PathLike) -> str:
    """Why ``root`` holds no finished pairs, in words (from its manifest when there is one)."""
    root = Path(root)
    manifest = root / "manifest.json"
    counts = manifest_counts(root)
    if not counts:
        return f"{root} holds no finished pairs (make them with `ex4d make-pairs VIDEOS -o {root}`)"
    total, failed = sum(counts.values()), counts.get("error", 0)
    if failed == total:
        what = f"all {total} clip{'s' if total != 1 else ''} failed in make-pairs"
    elif failed:
        what = f"{failed} of {total} clips failed in make-pairs and the others are not finished"
    else:
        what = f"none of its {total} clips is finished"
    return (f"{root} holds no finished pairs: {what} (see {manifest}); fix them and rerun `ex4d make-pairs`, "
            f"which retries failed clips")


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over the clips of one or more pair folders.

    size: (H, W) training size (the released model: 512 x 512; clips are squashed like at
    inference). num_frames: frames per item, picked with the inference rule
    ``linspace(0, n-1, N)`` (the identity when the clip has N frames); must be 4k+1.
    Items: ``video`` float32 (T, H, W, 3) in [0, 1], ``mask`` bool (T, H, W), ``index`` int64.
    """

    def __init__(self, roots: str | os.PathLike | list, *, size: tuple[int, int] = (512, 512),
                 num_frames: int = 49) -> None:
        from ex4d.diffusion.conditioning import check_num_frames

        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        found = {str(root): find_pairs(root) for root in roots}
        self.clips: list[Path] = [clip for clips in found.values() for clip in clips]
        if not self.clips:
            raise InputError("; ".join(describe_empty(root) for root in roots))
        for root, clips in found.items():
            counts = manifest_counts(root) or {}
            if not clips:
                log.warning("%s; training on the other folder(s)", describe_empty(root))
            elif counts.get("error"):
                log.warning("%s: %d clip(s) failed in make-pairs and are left out (see %s)", root, counts["error"],
                            Path(root) / "manifest.json")
        check_num_frames(num_frames, "--num-frames")
        self.size, self.num_frames = (int(size[0]), int(size[1])), int(num_frames)
        short = []
        for clip in self.clips:
            record = json.loads((clip / "pair.json").read_text())
            if int(record.get("num_frames", num_frames)) < num_frames:
                short.append(f"{clip.name} ({record.get('num_frames')})")
        if short:
            raise InputError(f"{len(short)} clip(s) have fewer than {num_frames} frames: {', '.join(short[:5])}; "
                             f"train with --num-frames {self._largest_valid(short)} or remake the pairs")

    def _largest_valid(self, short: list[str]) -> int:
        counts = [int(s.rsplit("(", 1)[1].rstrip(")")) for s in short]
        return max(1, (min(counts) - 1) // 4 * 4 + 1)

    def __len__(self) -> int:
        return len(self.clips)

    def clip_id(self, index: int) -> str:
        return self.clips[index].name

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(video float32 (T, H, W, 3) [0, 1], mask bool (T, H, W)) at the training size."""
        from ex4d.io.video import read_mask_video, read_video, resize_frames, to_float01

        clip = self.clips[index]
        try:
            frames, _ = read_video(clip / "video.mp4")
            mask = read_mask_video(clip / "mask.mkv")
        except InputError as exc:
            raise InputError(f"pair {clip.name} is unreadable: {exc}") from None
        if len(frames) != len(mask) or frames.shape[1:3] != mask.shape[1:3]:
            raise InputError(f"pair {clip.name}: video {frames.shape[:3]} and mask {mask.shape} differ; "
                             f"remake it with `ex4d make-pairs --redo`")
        if len(frames) < self.num_frames:
            raise InputError(f"pair {clip.name} has {len(frames)} frames, fewer than {self.num_frames}")
        pick = np.linspace(0, len(frames) - 1, self.num_frames).astype(int)
        video = to_float01(resize_frames(frames[pick], self.size))
        # Bilinear resize then > 0.5, as the inference loader does with its masks.
        small = resize_frames(mask[pick][..., None].astype(np.float32), self.size)[..., 0] > 0.5
        small[0] = True  # frame 0 is the source view (inference contract)
        return video, small

    def __getitem__(self, index: int) -> dict:
        video, mask = self.load(index)
        return {"video": torch.from_numpy(video), "mask": torch.from_numpy(mask),
                "index": torch.tensor(index, dtype=torch.int64)}
