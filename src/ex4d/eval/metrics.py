"""Per-frame metrics of a generated video (pure numpy + OpenCV; see docs/eval.md).

Images are float RGB in [0, 1], (H, W, 3); masks (H, W) bool. Shapes: T frames, H, W.

* :func:`psnr` -- ``10 log10(1 / MSE)`` over the masked pixels and the 3 channels (peak 1). The
  MSE is floored at 1e-10, so identical images give 100 dB rather than +inf.
* :func:`ssim_map` / :func:`ssim` -- Wang, Bovik, Sheikh, Simoncelli (2004), "Image quality
  assessment: from error visibility to structural similarity", eq. 13, with their constants:
  an 11x11 circular-symmetric Gaussian window of sigma 1.5 (normalised to sum 1),
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, L = 1, population (not sample) statistics,
  computed per colour channel and averaged over channels; the map is averaged over the mask.
  Borders are reflected (``BORDER_REFLECT``) so the map covers the whole image.
* :func:`rotation_error_deg` -- geodesic angle ``arccos((tr(R_a^T R_b) - 1) / 2)`` in degrees.
* :func:`align_scale` -- the least-squares scale of estimated translations onto requested ones.
* :func:`warping_error` -- temporal stability under OpenCV DIS optical flow (Lai et al. 2018).
"""

from __future__ import annotations

import math

import numpy as np

#: Wang et al. 2004 constants.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB, peak 1) of (H, W, 3) images over ``mask`` (H, W) (all pixels if None); nan if empty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if not mask.any():
            return math.nan
        a, b = a[mask], b[mask]
    mse = float(np.mean((a - b) ** 2))
    return 10.0 * math.log10(1.0 / max(mse, 1e-10))


def _gaussian_blur(x: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(x, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (H, W) of (H, W, 3) or (H, W) images in [0, 1] (channel mean; Wang et al. 2004)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2
    maps = []
    for ch in range(a.shape[-1]):
        x, y = np.ascontiguousarray(a[..., ch]), np.ascontiguousarray(b[..., ch])
        mu_x, mu_y = _gaussian_blur(x), _gaussian_blur(y)
        var_x = _gaussian_blur(x * x) - mu_x**2
        var_y = _gaussian_blur(y * y) - mu_y**2
        cov = _gaussian_blur(x * y) - mu_x * mu_y
        maps.append(((2 * mu_x * mu_y + c1) * (2 * cov + c2))
                    / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return np.mean(maps, axis=0)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM of (H, W, 3) images over ``mask`` (H, W) (all pixels if None); nan if empty."""
    values = ssim_map(a, b)
    if mask is None:
        return float(values.mean())
    mask = np.asarray(mask, bool)
    return float(values[mask].mean()) if mask.any() else math.nan


def erode(mask: np.ndarray, margin: int) -> np.ndarray:
    """Erode a bool mask (H, W) by ``margin`` pixels (square structuring element; image border = outside kept)."""
    mask = np.asarray(mask, bool)
    if margin <= 0:
        return mask.copy()
    import cv2

    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)


def rotation_error_deg(R_a: np.ndarray, R_b: np.ndarray) -> float:
    """Geodesic angle (degrees) between two rotations (3, 3)."""
    cos = (np.trace(np.asarray(R_a).T @ np.asarray(R_b)) - 1.0) / 2.0
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


def align_scale(t_est: np.ndarray, t_ref: np.ndarray) -> float:
    """Least-squares s >= 0 minimising sum_k ||s t_est[k] - t_ref[k]||^2 over (N, 3) arrays; 1 if undefined."""
    t_est, t_ref = np.asarray(t_est, np.float64).reshape(-1, 3), np.asarray(t_ref, np.float64).reshape(-1, 3)
    denom = float(np.sum(t_est * t_est))
    if denom < 1e-18:
        return 1.0
    return max(float(np.sum(t_est * t_ref)) / denom, 0.0)


# ---------------------------------------------------------------------------------------------
# Temporal stability


def _dis():
    import cv2

    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


def _gray_u8(frame: np.ndarray) -> np.ndarray:
    import cv2

    u8 = np.clip(np.rint(np.asarray(frame, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY)


def _warp(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``image`` (H, W, C) at x + flow (H, W, 2) bilinearly -> (warped, inside (H, W) bool)."""
    import cv2

    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    warped = cv2.remap(np.ascontiguousarray(image, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    return warped, inside


def warping_error(prev: np.ndarray, cur: np.ndarray, region: np.ndarray | None = None,
                  dis=None) -> tuple[float, float]:
    """Warping error between consecutive frames (H, W, 3) in [0, 1] -> (whole frame, ``region``).

    Backward flow cur -> prev and forward flow prev -> cur by OpenCV DIS (preset medium) on the grey
    8-bit frames; ``prev`` is warped onto ``cur``. Pixels are kept where the warp lands inside the image
    and the flows agree (forward-backward check of Sundaram et al. 2010, as Lai et al. 2018:
    ``|f_b + f_f(x + f_b)|^2 <= 0.01 (|f_b|^2 + |f_f(x + f_b)|^2) + 0.5``). The error is the mean over
    kept pixels of the channel-mean squared difference ``mean_c (cur - warp(prev))^2``. ``region``
    (H, W) bool restricts the second figure (nan if ``region`` is None or keeps nothing).
    """
    dis = _dis() if dis is None else dis
    g_prev, g_cur = _gray_u8(prev), _gray_u8(cur)
    back = dis.calc(g_cur, g_prev, None)   # for each pixel of cur, where it is in prev
    fwd = dis.calc(g_prev, g_cur, None)
    warped, inside = _warp(prev, back)
    fwd_at, _ = _warp(fwd, back)
    diff = np.sum((back + fwd_at) ** 2, axis=-1)
    consistent = diff <= 0.01 * (np.sum(back**2, -1) + np.sum(fwd_at**2, -1)) + 0.5
    keep = inside & consistent
    err = np.mean((np.asarray(cur, np.float32) - warped) ** 2, axis=-1)
    whole = float(err[keep].mean()) if keep.any() else math.nan
    if region is None:
        return whole, math.nan
    sel = keep & np.asarray(region, bool)
    return whole, (float(err[sel].mean()) if sel.any() else math.nan)
