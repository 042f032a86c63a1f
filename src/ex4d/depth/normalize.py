"""Relative disparity -> the reference's "metric-like" z-depth, and depth-map resizing.

EX-4D treats every estimator output as relative disparity (larger = nearer) and converts it the
same way (ex4d-spec.md section 3.2, depthcrafter-spec.md section 5.4):

    d_hat = (d - min d) / (max d - min d)      min/max over the WHOLE clip, not per frame
    z     = clip(10000 / max(3900 * d_hat, 1e-5), 1e-4, 1e4)      in [2.5641026, 10000]

so the nearest pixel of a clip always lands at z = 10000/3900 and anything with
d_hat <= 1/3900 saturates at 10000. Keeping this exact matters: the released EX-4D weights were
trained on meshes built from depth in this range.

Because min and max are over the whole clip, an estimator that works frame by frame or window by
window cannot emit final depth before it has seen the last frame. :func:`disparity_stream_to_depth`
does it in two passes with memory independent of T: the raw disparity is spilled to a temporary
``.npy`` while a running min/max is kept, and the returned frames are normalised and converted when
read (the same float32 operations per element as :func:`minmax_normalize` on the whole array, so
the values are identical).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from ex4d.errors import InputError

#: Constants of the reference conversion.
DISPARITY_SCALE = 3900.0
DEPTH_NUMERATOR = 10000.0
DISPARITY_FLOOR = 1e-5
NEAR = 1e-4
FAR = 1e4


def minmax_normalize(disparity: np.ndarray, *, where: str = "disparity") -> np.ndarray:
    """Clip-level min-max normalisation. disparity: (T, H, W) -> float32 (T, H, W) in [0, 1].

    The reference has no guard for a constant input (it divides by zero); here a constant clip is
    an :class:`InputError`, since no depth can be recovered from it.
    """
    d = np.asarray(disparity, dtype=np.float32)
    lo, hi = _check_range(float(d.min()), float(d.max()), where)
    return minmax_apply(d, lo, hi)


def _check_range(lo: float, hi: float, where: str) -> tuple[float, float]:
    if not hi > lo:
        raise InputError(f"{where} is constant ({lo}) over the whole clip, so no depth can be derived from it "
                         f"(check the file or the estimator output)")
    return lo, hi


def minmax_apply(d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(d - lo) / (hi - lo) in float32, for any part of a clip whose min/max are ``lo``/``hi`` (exactly
    what :func:`minmax_normalize` computes for those elements)."""
    d = np.asarray(d, dtype=np.float32)
    return ((d - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)


class RunningMinMax:
    """Min and max over frames seen one at a time (equal to ``float(d.min())``, ``float(d.max())`` of the
    whole float32 clip; a NaN anywhere makes both NaN, as it does there)."""

    def __init__(self):
        self.lo = np.float32(np.inf)
        self.hi = np.float32(-np.inf)

    def update(self, d: np.ndarray) -> None:
        d = np.asarray(d, dtype=np.float32)
        if d.size:
            self.lo = np.minimum(self.lo, d.min())
            self.hi = np.maximum(self.hi, d.max())

    def checked(self, where: str) -> tuple[float, float]:
        """(lo, hi) as Python floats; InputError for a constant (or NaN) clip, as :func:`minmax_normalize`."""
        return _check_range(float(self.lo), float(self.hi), where)


def disparity_stream_to_depth(chunks: Iterable[np.ndarray], num_frames: int, size: tuple[int, int], *,
                              where: str, spill_dir: str | os.PathLike | None = None, in_memory: bool = False):
    """Raw relative disparity arriving in chunks (n, H, W), in frame order -> reference z-depth (T, H, W).

    Returns float32 z identical to ``normalized_disparity_to_depth(minmax_normalize(all chunks))``:

    - ``in_memory=True``: as one (T, H, W) ndarray (the chunks are gathered, then converted);
    - otherwise as a :class:`~ex4d.io.arrays.FrameSequence` whose frames are normalised and converted
      when read, from a temporary ``.npy`` of the raw disparity written into ``spill_dir`` (the
      system's temporary folder if None) under a hidden ``.depth_raw.partial-...`` name; spills left
      by killed processes are removed here first (and by :func:`ex4d.io.files.sweep_folder`). The file
      is deleted by the sequence's ``release()`` or when the sequence is garbage collected; its size
      is T*H*W*4 bytes.

    Raises InputError for a constant clip, or if the chunks hold other than ``num_frames`` frames.
    """
    shape = (int(num_frames), int(size[0]), int(size[1]))
    if in_memory:
        raw = np.empty(shape, dtype=np.float32)
        filled = 0
        for chunk in chunks:
            chunk = np.asarray(chunk)
            _check_chunk(chunk, filled, shape, where)
            raw[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        _check_count(filled, shape, where)
        return normalized_disparity_to_depth(minmax_normalize(raw, where=where))

    from ex4d.io.arrays import MappedFrames, NpyFrameWriter, TemporaryFrames
    from ex4d.io.files import sweep_stale_partials, temporary_tag

    folder = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(folder / "depth_raw")  # spills of killed runs (dead processes on this host only)
    path = folder / f".depth_raw{temporary_tag()}.npy"
    stats = RunningMinMax()
    try:
        with NpyFrameWriter(path, shape, np.float32) as writer:
            for chunk in chunks:
                chunk = np.asarray(chunk)
                _check_chunk(chunk, writer.written, shape, where)
                stats.update(chunk)
                writer.write(chunk)
            _check_count(writer.written, shape, where)
        lo, hi = stats.checked(where)
        raw = TemporaryFrames(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise

    def depth_frame(k: int) -> np.ndarray:
        return normalized_disparity_to_depth(minmax_apply(raw.frame(k), lo, hi))

    return MappedFrames(shape[0], shape[1:], np.float32, depth_frame, release=raw.release)


def _check_chunk(chunk: np.ndarray, filled: int, shape: tuple, where: str) -> None:
    if chunk.ndim != 3 or chunk.shape[1:] != shape[1:] or filled + len(chunk) > shape[0]:
        raise InputError(f"{where}: got a chunk of shape {chunk.shape} after {filled} frames, expected frames of "
                         f"{shape[1]}x{shape[2]} up to {shape[0]} in all")


def _check_count(filled: int, shape: tuple, where: str) -> None:
    if filled != shape[0]:
        raise InputError(f"{where}: got {filled} frames, expected {shape[0]}")


def normalized_disparity_to_depth(d_hat: np.ndarray) -> np.ndarray:
    """Reference conversion of min-max normalised disparity to z. d_hat: (T, H, W) -> float32 (T, H, W).

    Done in float32 in the same order as the reference: scale, floor, divide, clip.
    """
    d = np.asarray(d_hat, dtype=np.float32) * np.float32(DISPARITY_SCALE)
    d = np.maximum(d, np.float32(DISPARITY_FLOOR))
    z = np.float32(DEPTH_NUMERATOR) / d
    return np.clip(z, np.float32(NEAR), np.float32(FAR)).astype(np.float32)


def disparity_to_depth(disparity: np.ndarray, *, where: str = "disparity") -> np.ndarray:
    """Relative disparity (T, H, W), any affine scale -> reference z-depth (T, H, W) float32."""
    return normalized_disparity_to_depth(minmax_normalize(disparity, where=where))


def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of z-depth. depth: (T, H, W) float -> float32 (T, H', W') with size = (H', W').

    Bilinear on z with half-pixel centres (as OpenCV's INTER_LINEAR) and no anti-aliasing, so no
    value outside the input's range is created and depth edges stay local.
    """
    import torch

    depth = np.asarray(depth, dtype=np.float32)
    if depth.shape[1:] == tuple(size):
        return depth
    t = torch.from_numpy(np.ascontiguousarray(depth))[:, None]
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return out[:, 0].numpy().astype(np.float32)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (T, H, W) bool mask -> bool (T, H', W')."""
    import torch

    mask = np.asarray(mask, dtype=bool)
    if mask.shape[1:] == tuple(size):
        return mask
    t = torch.from_numpy(mask.astype(np.uint8))[:, None].float()
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode="nearest-exact")
    return out[:, 0].numpy() > 0.5


def scale_intrinsics(K: np.ndarray, old_size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Scale a (3, 3) pixel K from an image of old_size (H, W) to new_size (H', W')."""
    sy = new_size[0] / old_size[0]
    sx = new_size[1] / old_size[1]
    K = np.array(K, dtype=np.float64)
    K[0, :] *= sx
    K[1, :] *= sy
    K[2, :] = (0.0, 0.0, 1.0)
    return K
