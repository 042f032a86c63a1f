"""Learned consistency metrics, opt-in: VBench's subject consistency and background consistency.

Both follow VBench's definitions. Each frame is embedded by a pretrained image encoder, and a
frame's score is the mean of its cosine similarity to the previous frame and to the first frame,
each clamped at 0. The video's score is the mean over frames 1..T-1, so 1.0 means every frame
looks like its neighbour and like the first frame.

* subject consistency: DINO ViT-B/16 (``facebook/dino-vitb16``), the CLS token of the last layer,
  on frames resized to 224 on the short side with ImageNet normalisation;
* background consistency: CLIP ViT-B/32 (``openai/clip-vit-base-patch32``), the projected image
  embedding, on frames resized to 224 on the short side (bicubic), centre-cropped to 224x224, with
  CLIP's normalisation.

The encoders are transformers models loaded from local folders the user downloaded
(``local_files_only``: nothing is ever downloaded here; transformers reads ``.bin`` files with
``weights_only=True`` and never runs code from the folder). VBench loads DINO through torch.hub and
CLIP through OpenAI's ``clip`` package with PIL resizing, so its figures can differ from these in
the third decimal; compare numbers computed by the same tool.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ex4d.errors import InputError, MissingWeightsError

#: Download commands for the two encoders (printed when a folder is missing).
DINO_REPO, CLIP_REPO = "facebook/dino-vitb16", "openai/clip-vit-base-patch32"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
INPUT_SIDE = 224
#: Frames embedded per forward (bounds the memory of a long video).
CHUNK = 16


def download_command(repo: str, folder: str | os.PathLike) -> str:
    return f"hf download {repo} --local-dir {folder}"


def consistency_score(features: np.ndarray) -> tuple[float, np.ndarray]:
    """VBench's consistency of a feature sequence.

    features: (T, D), one embedding per frame (any scale; normalised here).
    Returns (score, per_frame) with per_frame (T,): frame 0 is NaN (it has no predecessor), frame t
    is ``(max(0, cos(f_t, f_{t-1})) + max(0, cos(f_t, f_0))) / 2``; score is their mean.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"consistency needs at least 2 frames of features, got shape {f.shape}")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    f = f / np.maximum(norms, 1e-12)
    to_previous = np.sum(f[1:] * f[:-1], axis=1)
    to_first = f[1:] @ f[0]
    per_frame = np.full(len(f), math.nan)
    per_frame[1:] = (np.maximum(to_previous, 0.0) + np.maximum(to_first, 0.0)) / 2.0
    return float(per_frame[1:].mean()), per_frame


#: The two encoders: (name, Hub repository, option, transformers model types accepted).
ENCODERS = {"dino": ("DINO ViT-B/16", DINO_REPO, "--dino", ("vit", "dinov2")),
            "clip": ("CLIP ViT-B/32", CLIP_REPO, "--clip", ("clip", "clip_vision_model"))}


def check_folder(kind: str, path: str | os.PathLike) -> Path:
    """The encoder folder ``path`` of ``kind`` ("dino" / "clip"), or exit 2 with its download command."""
    what, repo, option, _ = ENCODERS[kind]
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"{what} weights not found: {folder / 'config.json'} is missing ({option}); download them with: "
            f"{download_command(repo, folder)}")
    return folder


def _resize_short_side(x, side: int, mode: str):
    """x (B, 3, H, W) float -> short side = ``side``, aspect kept (torchvision's Resize(int) sizing)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if h <= w:
        size = (side, int(side * w / h))
    else:
        size = (int(side * h / w), side)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _normalise(x, mean, std):
    import torch

    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class FrameEncoder:
    """A pretrained image encoder that embeds video frames: ``encoder(frames) -> (T, D)``.

    kind: ``"dino"`` (subject consistency) or ``"clip"`` (background consistency).
    frames: (T, H, W, 3) uint8.
    """

    def __init__(self, kind: str, folder: str | os.PathLike, device: str | None = None):
        import torch

        self.kind = kind
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if kind not in ENCODERS:
            raise ValueError(f"unknown encoder kind {kind!r}")
        from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

        folder = check_folder(kind, folder)
        what, repo, option, model_types = ENCODERS[kind]
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type not in model_types:
            raise InputError(f"{option} {folder} holds a {config.model_type!r} model; give a {what} folder "
                             f"({download_command(repo, folder)})")
        if kind == "dino":
            kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
            self.model = AutoModel.from_pretrained(folder, local_files_only=True, **kwargs)
        else:
            self.model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
        self.model.eval().to(self.device)

    def _prepare(self, frames: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if self.kind == "dino":
            return _normalise(_resize_short_side(x, INPUT_SIDE, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)
        x = _resize_short_side(x, INPUT_SIDE, "bicubic").clamp(0.0, 1.0)
        h, w = x.shape[-2:]
        top, left = (h - INPUT_SIDE) // 2, (w - INPUT_SIDE) // 2
        x = x[..., top:top + INPUT_SIDE, left:left + INPUT_SIDE]
        return _normalise(x, CLIP_MEAN, CLIP_STD)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(frames), CHUNK):
                x = self._prepare(frames[start:start + CHUNK])
                if self.kind == "dino":
                    kwargs = {"interpolate_pos_encoding": True} if self.model.config.model_type == "vit" else {}
                    feats = self.model(pixel_values=x, **kwargs).last_hidden_state[:, 0]
                else:
                    feats = self.model(pixel_values=x).image_embeds
                out.append(feats.float().cpu().numpy())
        return np.concatenate(out, axis=0)


def learned_consistency(frames: np.ndarray, *, dino: str | os.PathLike | None = None,
                        clip: str | os.PathLike | None = None, device: str | None = None) -> tuple[dict, dict]:
    """Subject (DINO) and/or background (CLIP) consistency of ``frames`` (T, H, W, 3) uint8.

    Returns (summary, per_frame): summary has ``subject_consistency`` / ``background_consistency``
    (None when that encoder was not given) and the encoder folders; per_frame the (T,) curves.
    """
    summary: dict = {"subject_consistency": None, "background_consistency": None,
                     "dino": None if dino is None else str(dino), "clip": None if clip is None else str(clip)}
    per_frame: dict = {}
    for kind, folder, key in (("dino", dino, "subject_consistency"), ("clip", clip, "background_consistency")):
        if folder is None:
            continue
        encoder = FrameEncoder(kind, folder, device=device)
        score, curve = consistency_score(encoder(frames))
        summary[key] = score
        per_frame[key] = [None if math.isnan(v) else float(v) for v in curve]
    return summary, per_frame
