"""Colour-mapped previews of depth videos (numpy only, no plotting library)."""

from __future__ import annotations

import numpy as np

# Anchor colours of a dark-purple -> red -> yellow ramp (close to "inferno"), evenly spaced on [0, 1].
_ANCHORS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
    [250, 193, 39], [252, 255, 164],
], dtype=np.float32) / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape S) to uint8 RGB (S, 3) by piecewise-linear interpolation."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    pos = v * (len(_ANCHORS) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return np.round(rgb * 255).astype(np.uint8)


def depth_preview(depth: np.ndarray) -> np.ndarray:
    """z-depth (T, H, W) -> uint8 (T, H, W, 3): inverse depth, min-max over the clip, near = bright.

    Inverse depth spreads near detail and keeps saturated far pixels (z = 10000) dark.
    """
    inv = 1.0 / np.maximum(np.asarray(depth, dtype=np.float32), 1e-6)
    lo, hi = float(inv.min()), float(inv.max())
    norm = (inv - lo) / (hi - lo) if hi > lo else np.zeros_like(inv)
    return colormap(norm)


def write_depth_preview(path, depth, fps: float):
    """Write :func:`depth_preview` of ``depth`` (T, H, W) as an H.264 video, one frame at a time.

    ``depth`` may be an array or a :class:`~ex4d.io.arrays.FrameSequence`: one pass finds the clip's
    inverse-depth range, a second writes the frames (the same pixels as ``depth_preview(depth)``).
    """
    from ex4d.io.arrays import iter_frames
    from ex4d.io.video import VideoWriter

    lo, hi = np.inf, -np.inf
    for frame in iter_frames(depth):
        inv = 1.0 / np.maximum(np.asarray(frame, dtype=np.float32), 1e-6)
        lo, hi = min(lo, float(inv.min())), max(hi, float(inv.max()))
    with VideoWriter(path, fps) as writer:
        for frame in iter_frames(depth):
            inv = 1.0 / np.maximum(np.asarray(frame, dtype=np.float32), 1e-6)
            norm = (inv - lo) / (hi - lo) if hi > lo else np.zeros_like(inv)
            writer.write(colormap(norm))
    return writer.path
