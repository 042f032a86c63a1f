"""Depth Anything V2 per frame, aligned over time (``--depth depth-anything``).

A light alternative to DepthCrafter (25M parameters for the Small model vs 2.2B): each frame is
run through transformers' ``DepthAnythingForDepthEstimation``, which predicts relative disparity
(larger = nearer) with an unknown scale and shift per frame. Frame t is aligned to the aligned
frame t-1 by least squares on disparity (d_t <- s d_t + b), so the scale does not flicker; the
clip is then converted with the same reference normalisation as DepthCrafter
(:mod:`ex4d.depth.normalize`), so the two estimators give depth in the same range.

Streaming: given a lazy :class:`~ex4d.types.Clip`, frames are read, predicted (in batches of
``batch_size`` from frame 0) and aligned one batch at a time; the clip-level min-max takes a second
pass over a temporary spill of the aligned disparity (:meth:`DepthAnythingV2.estimate`).

Preprocessing follows the model's image processor: keep the aspect ratio, scale so that both
sides are at least 518 px, round each side to a multiple of 14 (bicubic), ImageNet mean/std.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ex4d.depth.depthcrafter import _dtype, _wrap, check_unit_frames
from ex4d.devices import resolve_device
from ex4d.depth.normalize import disparity_stream_to_depth
from ex4d.depth.weights import depth_anything_file, read_config, read_safetensors, resolve
from ex4d.errors import InputError
from ex4d.types import DepthVideo

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_size(height: int, width: int, target: int = 518, multiple: int = 14) -> tuple[int, int]:
    """Network input size (H', W'): aspect kept, both sides >= target, each a multiple of ``multiple``."""
    scale = max(target / height, target / width)

    def fit(v: float) -> int:
        out = int(round(v / multiple) * multiple)
        return out if out >= v else int(np.ceil(v / multiple) * multiple)

    return fit(height * scale), fit(width * scale)


def align_scale_shift(disparity: np.ndarray, reference: np.ndarray, stride: int = 4) -> tuple[float, float]:
    """Least-squares (s, b) with s*disparity + b ~= reference, on every ``stride``-th pixel. (H, W) inputs."""
    x = disparity[::stride, ::stride].astype(np.float64).ravel()
    y = reference[::stride, ::stride].astype(np.float64).ravel()
    A = np.stack([x, np.ones_like(x)], axis=1)
    (s, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(s), float(b)


class FrameAligner:
    """Align frames one at a time, each to the previous *aligned* frame (what :func:`align_video` does
    over a whole array): ``aligner(d)`` -> aligned float32 (H, W); ``params`` lists (s, b) per frame.

    Only the previous aligned frame is kept, so memory does not grow with the frame count.
    """

    def __init__(self):
        self.previous = None
        self.params: list[tuple[float, float]] = []
        self.skipped: list[int] = []

    def __call__(self, disparity: np.ndarray) -> np.ndarray:
        t = len(self.params)
        if self.previous is None:
            out = np.array(disparity, dtype=np.float32)
            s, b = 1.0, 0.0
        else:
            s, b = align_scale_shift(disparity, self.previous)
            if not (np.isfinite(s) and s > 0):
                # a flat or inverted fit would flip near and far; keep the frame as predicted instead
                self.skipped.append(t)
                s, b = 1.0, 0.0
            out = np.asarray(s * disparity + b, dtype=np.float32)
        self.previous = out
        self.params.append((s, b))
        return out

    def report(self) -> None:
        if self.skipped:
            log.warning("%d frame(s) could not be aligned to the previous one (first: %d); left as predicted",
                        len(self.skipped), self.skipped[0])


def align_video(disparity: np.ndarray) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Align each frame of (T, H, W) disparity to the previous aligned frame. Returns (aligned, [(s, b)])."""
    out = np.empty_like(disparity, dtype=np.float32)
    aligner = FrameAligner()
    for t in range(len(disparity)):
        out[t] = aligner(disparity[t])
    aligner.report()
    return out, aligner.params


class DepthAnythingV2:
    """Depth Anything V2 estimator. ``variant``: small (default, 25M), base (98M) or large (335M)."""

    name = "depth-anything"
    #: :meth:`estimate` takes a lazy :class:`~ex4d.types.Clip` and works frame by frame
    streams = True

    def __init__(self, model, *, device, dtype, batch_size: int = 8, align: bool = True, progress=None,
                 variant: str = "small", source: str = ""):
        self.model = model.to(device)
        self.device, self.dtype = device, dtype
        self.batch_size, self.align, self.progress = batch_size, align, progress
        self.variant, self.source = variant, source

    @classmethod
    def from_pretrained(cls, *, models_dir: str | os.PathLike | None = None, device: str = "auto",
                        dtype=None, variant: str = "small", progress=None, allow_download: bool = True,
                        **options) -> "DepthAnythingV2":
        from ex4d.depth.weights import DEPTH_ANYTHING_REPOS

        if variant not in DEPTH_ANYTHING_REPOS:
            raise InputError(f"unknown Depth Anything variant {variant!r}; use {', '.join(DEPTH_ANYTHING_REPOS)}")
        device = resolve_device(device)
        dtype = _dtype(dtype, device)
        config_path, weights_path = resolve(depth_anything_file(variant), models_dir, allow_download=allow_download)
        model = load_depth_anything(config_path, weights_path, dtype=dtype, device=device)
        return cls(model, device=device, dtype=dtype, progress=progress, variant=variant, source=str(weights_path),
                   **options)

    @torch.no_grad()
    def predict_batch(self, frames: np.ndarray) -> np.ndarray:
        """frames (n, H, W, 3) float32 [0, 1] -> raw relative disparity (n, H, W) float32 (one model call)."""
        n, H, W, _ = frames.shape
        size = input_size(H, W)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
        x = ((x - mean) / std).to(self.dtype)
        pred = self.model(pixel_values=x).predicted_depth  # (B, H', W')
        pred = torch.nn.functional.interpolate(pred[:, None].float(), size=(H, W), mode="bilinear",
                                               align_corners=False)[:, 0]
        return pred.cpu().numpy().astype(np.float32, copy=False)

    def predict(self, frames: np.ndarray) -> np.ndarray:
        """frames (T, H, W, 3) float [0, 1] -> raw relative disparity (T, H, W) float32, per frame."""
        T = len(frames)
        batches = range(0, T, self.batch_size)
        out = [self.predict_batch(frames[i:i + self.batch_size])
               for i in _wrap(self.progress, batches, "depth frames", len(batches))]
        return np.concatenate(out).astype(np.float32)

    def _disparity_chunks(self, frames: Iterable[np.ndarray], num_frames: int, aligner: FrameAligner | None):
        """Aligned disparity (n, H, W) per batch of ``batch_size`` frames (batches from frame 0, as
        :meth:`predict`), reading ``frames`` one at a time."""
        batches = range(0, num_frames, self.batch_size)
        source = iter(frames)
        for i in _wrap(self.progress, batches, "depth frames", len(batches)):
            batch = []
            for frame in itertools.islice(source, min(self.batch_size, num_frames - i)):
                frame = np.asarray(frame)
                check_unit_frames(frame[None])
                batch.append(frame.astype(np.float32, copy=False))
            if not batch:
                return
            disparity = self.predict_batch(np.stack(batch))
            yield disparity if aligner is None else np.stack([aligner(d) for d in disparity])

    def estimate(self, frames, *, spill_dir: str | os.PathLike | None = None) -> DepthVideo:
        """frames -> DepthVideo, z (T, H, W) in the reference range.

        ``frames``: a (T, H, W, 3) float array in [0, 1] (depth and valid come back as arrays), or a
        :class:`~ex4d.types.Clip`, read one frame at a time: depth and valid then come back as
        :class:`~ex4d.io.arrays.FrameSequence` objects, and memory does not grow with T. The min-max
        normalisation is over the whole clip as before, in two passes: the aligned disparity is spilled
        to a temporary ``.npy`` in ``spill_dir`` (T*H*W*4 bytes; the system's temporary folder if None)
        while its min/max are kept, and each frame is normalised when read
        (:func:`ex4d.depth.normalize.disparity_stream_to_depth`). Call ``release()`` on the returned
        depth to delete that file early. Both forms give identical values.
        """
        from ex4d.io.arrays import MappedFrames
        from ex4d.types import Clip

        if isinstance(frames, Clip):
            num_frames, size, source, in_memory = frames.num_frames, frames.size, frames.iter_frames(), False
        else:
            frames = np.asarray(frames)
            check_unit_frames(frames)
            num_frames, size, source, in_memory = len(frames), frames.shape[1:3], frames, True
        aligner = FrameAligner() if self.align else None
        depth = disparity_stream_to_depth(self._disparity_chunks(source, num_frames, aligner), num_frames, size,
                                          where="Depth Anything output", spill_dir=spill_dir, in_memory=in_memory)
        if aligner is not None:
            aligner.report()
        params = aligner.params if aligner is not None else [(1.0, 0.0)] * num_frames
        settings = {"estimator": self.name, "variant": self.variant, "align": self.align,
                    "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                    "weights": self.source, "scale_shift": [list(p) for p in params]}
        if in_memory:
            valid = np.ones(depth.shape, dtype=bool)
        else:
            valid = MappedFrames(num_frames, size, bool, lambda k: np.ones(size, dtype=bool))
        return DepthVideo(depth=depth, valid=valid, K=None, estimator=self.name, settings=settings)


def load_depth_anything(config_path, weights_path, *, dtype, device):
    """Strict load of a transformers Depth Anything folder (config.json + model.safetensors).

    transformers renames some legacy DINOv2 keys while loading, so its own loader is used and its
    loading report is checked: any missing, unexpected or mis-shaped tensor is a CheckpointError
    (transformers alone would only warn and leave those weights random).
    """
    from transformers import DepthAnythingForDepthEstimation

    from ex4d.errors import CheckpointError, key_mismatch_error
    from ex4d.weights_common import check_tensor_values, first_line

    read_config(config_path)  # a clear error for a broken config
    # a corrupt/truncated weight file, or integer/NaN/inf tensors: an error naming the file (and tensor)
    check_tensor_values(read_safetensors(weights_path), f"weight file {weights_path}")
    folder = Path(weights_path).parent
    try:
        model, info = DepthAnythingForDepthEstimation.from_pretrained(
            folder, dtype=dtype, output_loading_info=True, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load Depth Anything from {folder}: {first_line(exc)} (damaged or wrong "
                              f"files? download them again)") from None
    # the DINOv2 mask token is unused at inference and may be left out of exported files
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("mask_token")]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [str(k) for k in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise key_mismatch_error(f"weight file {weights_path}", missing, unexpected, mismatched)
    return model.to(device).eval().requires_grad_(False)
