"""Training pairs from monocular videos: one clip -> (video, cond = video * mask, mask) + camera.

A *pair* is built from a source clip and its depth: a target trajectory is drawn from a
:class:`TrajectoryDistribution` (seeded per clip), simulated masks are computed for it
(:mod:`ex4d.train.masks`), and the result is written into one folder per clip (layout in
``docs/training.md``)::

    <out>/manifest.json                 status of every clip (rewritten atomically after each clip)
    <out>/clips/<id>/video.mp4          source frames, H.264 (the training target)
    <out>/clips/<id>/cond.mp4           video * mask, H.264 (for viewing; the loader recomputes it)
    <out>/clips/<id>/mask.mkv           mask, FFV1 lossless, 255 = visible
    <out>/clips/<id>/camera.npz         the sampled trajectory (ex4d.types.Trajectory.save)
    <out>/clips/<id>/pair.json          settings, seed, trajectory spec, mask statistics (written last)

A clip folder is written under a temporary name and renamed when complete, so a folder with a
``pair.json`` is always complete; a rerun skips clips whose ``pair.json`` was made from the same
source file and settings (resume), and redoes the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ex4d.errors import InputError, UserError
from ex4d.io.files import atomic_dir, atomic_path, check_output, is_disk_full, prepare_output_dir
from ex4d.train.masks import MaskSettings, simulate_masks

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
FAMILIES = ("orbit", "orbit_pitch", "loop", "zoom", "dolly_zoom")
PAIR_FORMAT = 1


@dataclass
class TrajectoryDistribution:
    """Where the simulated novel cameras come from (all draws from the clip's seeded RNG).

    families: relative weights of the trajectory families:
      ``orbit`` -- the reference's integer-angle orbit (``ex4d recon --cam <deg>``), yaw drawn
      uniformly in ``yaw_range`` with a random sign; ``orbit_pitch`` -- ``orbit:yaw=..,pitch=..``
      with yaw as above and pitch uniform in ``pitch_range`` with a random sign; ``loop`` -- the
      reference's closed ``180`` loop; ``zoom`` -- ``zoom_in`` or ``zoom_out`` (equal odds);
      ``dolly_zoom``.
    The default mix covers the inference presets (30/60/90 degree orbits dominate EX-4D's use)
    with some vertical and radial motion so the masks are not all vertical bands.
    """

    families: dict = field(default_factory=lambda: {"orbit": 0.6, "orbit_pitch": 0.25, "zoom": 0.1, "loop": 0.05})
    yaw_range: tuple[float, float] = (10.0, 90.0)
    pitch_range: tuple[float, float] = (5.0, 30.0)

    def validate(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise InputError(f"unknown trajectory family {unknown}; use some of {', '.join(FAMILIES)}")
        weights = np.array([float(w) for w in self.families.values()])
        if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise InputError(f"trajectory family weights must be >= 0 with a positive sum, got {self.families}")
        for name in ("yaw_range", "pitch_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 180:
                raise InputError(f"{name} must satisfy 0 <= min <= max <= 180, got {lo}, {hi}")

    def sample(self, rng: np.random.Generator) -> str:
        """One trajectory spec string for ``ex4d.camera.trajectory.make_trajectory``."""
        names = list(self.families)
        weights = np.array([float(self.families[n]) for n in names])
        family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        sign = 1.0 if rng.random() < 0.5 else -1.0
        yaw = sign * rng.uniform(*self.yaw_range)
        if family == "orbit":
            return str(int(round(yaw)))
        if family == "orbit_pitch":
            pitch = (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(*self.pitch_range)
            return f"orbit:yaw={yaw:.1f},pitch={pitch:.1f}"
        if family == "loop":
            return "180"
        if family == "zoom":
            return "zoom_in" if rng.random() < 0.5 else "zoom_out"
        return "dolly_zoom"


@dataclass
class PairSettings:
    """Everything that decides a pair's content (a changed value makes a rerun redo the clip)."""

    num_frames: int = 49
    resize: str = "reference"            # "reference" (multiples of 64, long side <= max_res) or "keep"
    max_res: int = 1024
    size: tuple[int, int] | None = None  # force (H, W), e.g. (512, 512) as the released model was trained
    seed: int = 0
    trajectories: TrajectoryDistribution = field(default_factory=TrajectoryDistribution)
    masks: MaskSettings = field(default_factory=MaskSettings)

    def validate(self) -> None:
        if self.num_frames < 2:
            raise InputError(f"pairs need at least 2 frames, got --num-frames {self.num_frames}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 8 or any(s % 2 for s in self.size)):
            raise InputError(f"--size must be HxW with even sides >= 8, e.g. 512x512, got {self.size}")
        self.trajectories.validate()
        self.masks.validate()

    def to_dict(self) -> dict:
        values = asdict(self)
        values["size"] = list(self.size) if self.size else None
        return values


@dataclass
class Pair:
    """One training pair in memory. video (T, H, W, 3) float [0, 1]; mask (T, H, W) bool."""

    video: np.ndarray
    mask: np.ndarray
    trajectory: object
    spec: str
    seed: int
    fps: float
    raw_mask: np.ndarray | None = None

    @property
    def cond(self) -> np.ndarray:
        return self.video * self.mask[..., None]

    def stats(self) -> dict:
        visible = self.mask.reshape(len(self.mask), -1).mean(axis=1)
        return {"visible_fraction_per_frame": [round(float(v), 4) for v in visible],
                "visible_fraction": round(float(visible.mean()), 4),
                "last_frame_visible_fraction": round(float(visible[-1]), 4)}


def clip_seed(seed: int, clip_id: str) -> int:
    """The per-clip seed: independent of the order and number of clips in a batch."""
    digest = hashlib.sha256(f"{int(seed)}:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_pair(frames: np.ndarray, depth: np.ndarray, K: np.ndarray | None, settings: PairSettings, seed: int, *,
              fps: float = 30.0, device: str = "cpu", renderer=None,
              progress: Callable[[Iterable], Iterable] | None = None) -> Pair:
    """Sample a trajectory and simulate masks for one clip.

    frames: (T, H, W, 3) float [0, 1]; depth: (T, H, W) z-depth; K: (3, 3) source intrinsics or None
    (reference f = 500). ``seed`` decides the trajectory (and nothing else is random).
    """
    from ex4d.camera.trajectory import make_trajectory
    from ex4d.conventions import reference_intrinsics

    num, height, width = depth.shape
    if frames.shape[:3] != depth.shape:
        raise InputError(f"frames {frames.shape[:3]} and depth {depth.shape} differ in shape")
    K = reference_intrinsics(height, width) if K is None else np.asarray(K, dtype=np.float64)
    rng = np.random.default_rng(seed)
    spec = settings.trajectories.sample(rng)
    trajectory = make_trajectory(spec, num_frames=num, size=(height, width), K=K, depth0=depth[0])
    mask, raw = simulate_masks(depth, K, trajectory, settings.masks, device=device, renderer=renderer,
                               progress=progress)
    return Pair(video=np.asarray(frames, dtype=np.float32), mask=mask, trajectory=trajectory, spec=spec,
                seed=seed, fps=fps, raw_mask=raw)


def write_pair(pair: Pair, clip_dir: Path, record: dict) -> Path:
    """Write a pair's files into ``clip_dir`` atomically (temporary folder, then rename)."""
    from ex4d.io.video import to_uint8, write_video

    with atomic_dir(clip_dir) as tmp:
        write_video(tmp / "video.mp4", to_uint8(pair.video), pair.fps)
        write_video(tmp / "cond.mp4", to_uint8(pair.cond), pair.fps)
        write_video(tmp / "mask.mkv", pair.mask.astype(np.uint8) * 255, pair.fps, codec="ffv1")
        pair.trajectory.save(tmp / "camera.npz")
        (tmp / "pair.json").write_text(json.dumps({**record, **pair.stats()}, indent=2, default=str))
    return clip_dir


# ---------------------------------------------------------------------------------------------
# Batch mode


@dataclass
class ClipInput:
    """One entry of a batch: an id (folder name), a video, and optionally its own depth file."""

    clip_id: str
    video: Path
    depth: Path | None = None


def _safe_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "clip"


def list_inputs(source: str | os.PathLike) -> list[ClipInput]:
    """The clips of a batch: a folder (its video files, sorted) or a list file.

    A list file has one clip per line: ``<video> [<depth .npz/.npy>]``, paths relative to the list
    file's folder, ``#`` starts a comment. Ids are the file stems; repeated stems get ``-2``, ``-3``.
    """
    source = Path(source)
    entries: list[tuple[Path, Path | None]] = []
    if source.is_dir():
        entries = [(p, None) for p in sorted(source.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
    elif source.is_file():
        for number, line in enumerate(source.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2:
                raise InputError(f"{source}:{number}: expected '<video> [<depth>]', got {line!r} "
                                 f"(paths with spaces are not supported in list files)")
            video = (source.parent / parts[0])
            depth = (source.parent / parts[1]) if len(parts) == 2 else None
            entries.append((video, depth))
    else:
        raise InputError(f"input not found: {source} (give a folder of videos or a list file)")
    if not entries:
        raise InputError(f"no videos in {source} (looked for {', '.join(VIDEO_SUFFIXES)} files)")
    seen: dict[str, int] = {}
    clips = []
    for video, depth in entries:
        base = _safe_id(video.stem)
        seen[base] = seen.get(base, 0) + 1
        clip_id = base if seen[base] == 1 else f"{base}-{seen[base]}"
        clips.append(ClipInput(clip_id, video, depth))
    return clips


def _fingerprint(path: Path | None) -> dict | None:
    if path is None:
        return None
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Manifest:
    """``manifest.json``: {"format", "settings", "clips": {id: record}}, rewritten atomically."""

    def __init__(self, out_dir: Path, settings: dict) -> None:
        self.path = Path(out_dir) / "manifest.json"
        self.clips: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.clips = json.loads(self.path.read_text()).get("clips", {})
            except (json.JSONDecodeError, OSError):
                log.warning("unreadable %s; starting a new manifest (clip folders are still reused)", self.path)
        self.settings = settings

    def update(self, clip_id: str, record: dict) -> None:
        self.clips[clip_id] = record
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"format": PAIR_FORMAT, "settings": self.settings, "clips": self.clips},
                                      indent=2, default=str))

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.clips.values():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts


def _existing_request(clip_dir: Path) -> dict | None:
    try:
        return json.loads((clip_dir / "pair.json").read_text()).get("request")
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class BatchSummary:
    """What one ``build_pairs`` call did. ``errors``: clip id -> one-line error, for the clips that
    failed in this call; ``skipped_failed``: ids of clips that failed in an earlier run with the same
    inputs and were not retried (``retry_failed=False``)."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    manifest: Path | None = None
    errors: dict = field(default_factory=dict)
    skipped_failed: list = field(default_factory=list)


def _one_line(exc: BaseException) -> str:
    """A clip's error for the manifest and the report: the first non-empty line (never an IndexError on
    an empty message); non-user errors are named as internal errors (a bug in ex4d)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, UserError):
        return text or type(exc).__name__
    return f"internal error: {type(exc).__name__}" + (f": {text}" if text else "")


def _is_network_error(exc: BaseException) -> bool:
    """True for the errors of an unreachable Hugging Face Hub (they concern every clip, not one)."""
    import socket

    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("huggingface_hub", "requests", "urllib3", "httpx", "httpcore")


def _load_estimator(depth: str, models_dir: str | None, device: str):
    """The depth estimator of the batch. Any failure here stops the batch (it would fail every clip):
    missing weights and an unreachable Hub are a MissingWeightsError (exit 2), not one error per clip."""
    from ex4d.depth import get_estimator
    from ex4d.errors import MissingWeightsError

    try:
        return get_estimator(depth, models_dir=models_dir, device=device)
    except UserError:
        raise
    except Exception as exc:
        if _is_network_error(exc):
            raise MissingWeightsError(f"cannot load the {depth} depth model: the Hugging Face Hub is unreachable "
                                      f"({_one_line(exc)}); download the weights first (docs/models.md) and pass "
                                      f"--models-dir, or give per-clip depth files with --depth FOLDER") from None
        raise


def build_pairs(inputs: list[ClipInput], out_dir: str | os.PathLike, settings: PairSettings, *,
                depth: str = "depthcrafter", models_dir: str | None = None, device: str = "auto",
                progress: Callable[..., Iterable] | None = None, overwrite: bool = False,
                retry_failed: bool = True) -> BatchSummary:
    """Make pairs for every clip; resumable; a clip's failure is recorded and the batch goes on.

    depth: an estimator name (``depthcrafter``, ``depth-anything``, ``vda``, ...: one estimator, loaded
    once, for the batch), or a folder holding ``<video stem>.npz`` / ``.npy`` per clip. A list file's per-line depth wins.
    overwrite: remake finished clips too (``--redo``). retry_failed: False leaves alone the clips
    whose manifest record says they failed with the same inputs and settings (``--skip-failed``);
    by default a rerun retries them. Errors that concern every clip (missing depth weights, an
    unreachable Hub: exit code 2) stop the batch at once instead of being recorded per clip.
    """
    from ex4d.devices import resolve_device

    settings.validate()
    out_dir = prepare_output_dir(out_dir)
    torch_device = resolve_device(device)
    check_output(out_dir / "manifest.json", "manifest")  # before any work, not after the first clip
    manifest = Manifest(out_dir, settings.to_dict())
    summary = BatchSummary(manifest=manifest.path)
    depth_dir = Path(depth) if Path(depth).is_dir() else None
    estimator = None
    renderer = None
    items = inputs if progress is None else progress(inputs, desc="pairs", unit="clip")
    try:
        for clip in items:
            clip_dir = out_dir / "clips" / clip.clip_id
            started = time.perf_counter()
            record = {"video": str(clip.video), "status": "error"}
            depth_file = clip.depth
            if depth_file is None and depth_dir is not None:
                candidates = [depth_dir / f"{clip.video.stem}{s}" for s in (".npz", ".npy")]
                depth_file = next((c for c in candidates if c.is_file()), None)
            if depth_file is not None:
                depth_source = _fingerprint(depth_file) if depth_file.is_file() else {"missing": str(depth_file)}
            else:
                depth_source = {"missing": str(depth_dir)} if depth_dir is not None else depth
            request = {"format": PAIR_FORMAT, "video": _fingerprint(clip.video) if clip.video.is_file() else None,
                       "depth": depth_source, "settings": settings.to_dict()}
            request = json.loads(json.dumps(request, default=str))  # as it reads back from pair.json
            if not overwrite and _existing_request(clip_dir) == request:
                summary.skipped += 1  # resume: this clip's folder is complete and up to date
                manifest.update(clip.clip_id, {**manifest.clips.get(clip.clip_id, {}), "video": str(clip.video),
                                               "status": "done"})
                continue
            earlier = manifest.clips.get(clip.clip_id) or {}
            if not retry_failed and earlier.get("status") == "error" and earlier.get("request") == request:
                summary.skipped_failed.append(clip.clip_id)  # --skip-failed: same inputs, failed before
                log.info("clip %s failed earlier, not retried: %s", clip.clip_id, earlier.get("error"))
                continue
            if depth_file is None and depth_dir is None and estimator is None:
                estimator = _load_estimator(depth, models_dir, str(torch_device))  # outside the per-clip catch
            try:
                if depth_file is None and depth_dir is not None:
                    raise InputError(f"no depth file for {clip.video.name} in {depth_dir} "
                                     f"(expected {clip.video.stem}.npz or .npy)")
                pair, source, renderer = _pair_for_clip(clip, depth_file, estimator, settings, str(torch_device),
                                                        renderer)
                record.update(status="done", spec=pair.spec, seed=pair.seed, request=request, source=source,
                              num_frames=int(pair.video.shape[0]), size=list(pair.video.shape[1:3]))
                write_pair(pair, clip_dir, {**record, "settings": settings.to_dict(), "clip_id": clip.clip_id})
                record["visible_fraction"] = pair.stats()["visible_fraction"]
                record.pop("request")
                summary.done += 1
            except UserError as exc:
                if exc.exit_code != 1:  # missing or corrupt weights: every clip would fail the same way
                    raise
                record.update(status="error", error=_one_line(exc), request=request)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # one bad clip must not stop a long batch
                if is_disk_full(exc):
                    raise  # the disk, not this clip: stop (the CLI says what to do)
                log.debug("clip %s failed", clip.clip_id, exc_info=True)
                record.update(status="error", error=_one_line(exc), request=request,
                              traceback=traceback.format_exc(limit=4))
            if record["status"] == "error":
                summary.failed += 1
                summary.errors[clip.clip_id] = record["error"]
                log.info("clip %s failed: %s", clip.clip_id, record["error"])
            record["seconds"] = round(time.perf_counter() - started, 2)
            manifest.update(clip.clip_id, record)
    finally:
        if renderer is not None:
            renderer.release()
    return summary


def _pair_for_clip(clip: ClipInput, depth_file: Path | None, estimator, settings: PairSettings, device: str,
                   renderer) -> tuple[Pair, dict, object]:
    """Load one clip and its depth, then make its pair (reusing the renderer when the size matches)."""
    from ex4d.io.video import resize_frames
    from ex4d.pipeline import load_clip

    source = load_clip(clip.video, num_frames=settings.num_frames, resize=settings.resize, max_res=settings.max_res)
    frames = source.frames
    if settings.size is not None and tuple(frames.shape[1:3]) != tuple(settings.size):
        frames = resize_frames(frames, tuple(settings.size))
    size = tuple(frames.shape[1:3])
    if depth_file is not None:
        from ex4d.depth import load_depth_file

        depth_video = load_depth_file(depth_file, num_frames=settings.num_frames, size=size)
    else:
        depth_video = estimator.estimate(frames)
    depth_values = np.asarray(depth_video.depth, dtype=np.float32)
    if depth_values.shape != frames.shape[:3]:
        raise InputError(f"depth for {clip.video.name} is {depth_values.shape}, expected {frames.shape[:3]}")
    if renderer is None or (renderer.height, renderer.width) != size:
        from ex4d.render.rasterizer import MeshRenderer

        if renderer is not None:
            renderer.release()
        renderer = MeshRenderer(*size, antialias=False)
    pair = make_pair(frames, depth_values, depth_video.K, settings, clip_seed(settings.seed, clip.clip_id),
                     fps=source.fps, device=device, renderer=renderer)
    return pair, {"fps": source.fps, "depth": depth_video.estimator}, renderer
