"""Relative disparity -> the reference's "metric-like" z-depth, and depth-map resizing.

EX-4D treats every estimator output as relative disparity (larger = nearer) and converts it the
same way (ex4d-spec.md section 3.2, depthcrafter-spec.md section 5.4):

    d_hat = (d - min d) / (max d - min d)      min/max over the WHOLE clip, not per frame
    z     = clip(10000 / max(3900 * d_hat, 1e-5), 1e-4, 1e4)      in [2.5641026, 10000]

so the nearest pixel of a clip always lands at z = 10000/3900 and anything with
d_hat <= 1/3900 saturates at 10000. Keeping this exact matters: the released EX-4D weights were
trained on meshes built from depth in this range.
"""

from __future__ import annotations

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
    lo, hi = float(d.min()), float(d.max())
    if not hi > lo:
        raise InputError(f"{where} is constant ({lo}) over the whole clip, so no depth can be derived from it "
                         f"(check the file or the estimator output)")
    return ((d - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)


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
