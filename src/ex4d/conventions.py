"""Every convention ex4d uses, stated once, with the converters used at stage boundaries.

Read ``docs/conventions.md`` for the prose version. In short:

* Camera frame: OpenCV -- x right, y down, z forward. The world frame is the source camera of
  frame 0 (``cam_from_world[0]`` is the identity for the source video).
* Extrinsics are 4x4 ``cam_from_world`` matrices (world -> camera). Intrinsics ``K`` are 3x3 in
  pixels.
* Depth is z-depth along the optical axis (not ray length), in scene units.
* Images in geometry/render code are float RGB in [0, 1], channel-last ``(T, H, W, 3)``; masks are
  ``(T, H, W)`` bool. Sizes are ``(H, W)``; 2-D points are ``(x, y)``.
* Pixel coordinates: the pixel in column ``u`` and row ``v`` has its *centre at integer*
  ``(u, v)``, and the default principal point is ``(W / 2, H / 2)``. This reproduces the
  reference, which casts rays through integer coordinates.
* OpenGL clip space and flipped rows live only inside ``ex4d.render``. ``(B, C, T, H, W)`` tensors
  in [-1, 1] and latent normalisation live only inside ``ex4d.diffusion``.

Shape letters in docstrings: T frames, H height, W width, V vertices, F faces, B batch.
"""

from __future__ import annotations

import numpy as np

#: Focal length in pixels that the reference uses for every resolution.
REFERENCE_FOCAL_PX = 500.0

#: The reference pushes the one-pixel border ring of every depth map to this z.
REFERENCE_BORDER_DEPTH = 100.0

#: Near and far planes of the reference's OpenGL projection.
REFERENCE_NEAR = 1e-3
REFERENCE_FAR = 1e3

#: Diagonal that turns an OpenCV camera frame into an OpenGL one (y up, looking down -z).
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def reference_intrinsics(height: int, width: int, focal_px: float = REFERENCE_FOCAL_PX) -> np.ndarray:
    """K (3, 3) float64 with f = ``focal_px`` and the principal point at (W/2, H/2)."""
    return np.array(
        [[focal_px, 0.0, width / 2.0], [0.0, focal_px, height / 2.0], [0.0, 0.0, 1.0]], dtype=np.float64
    )


def as_intrinsics_per_frame(K: np.ndarray, num_frames: int) -> np.ndarray:
    """Broadcast K (3, 3) or (T, 3, 3) to (T, 3, 3) float64, checking T."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape == (3, 3):
        return np.broadcast_to(K, (num_frames, 3, 3)).copy()
    if K.ndim == 3 and K.shape[1:] == (3, 3) and K.shape[0] == num_frames:
        return K.copy()
    raise ValueError(f"intrinsics must be (3,3) or ({num_frames},3,3), got {K.shape}")


def invert_rigid(transform: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 transform(s) (..., 4, 4): ``world_from_cam`` <-> ``cam_from_world``."""
    transform = np.asarray(transform, dtype=np.float64)
    rotation = transform[..., :3, :3]
    translation = transform[..., :3, 3:]
    out = np.zeros_like(transform)
    rt = np.swapaxes(rotation, -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3:] = -rt @ translation
    out[..., 3, 3] = 1.0
    return out


def opencv_to_opengl_extrinsics(cam_from_world: np.ndarray) -> np.ndarray:
    """OpenCV ``cam_from_world`` (..., 4, 4) -> the reference's OpenGL-flipped ``extrinsics``.

    The reference stores diag(1, -1, -1, 1) @ cam_from_world (rows 1 and 2 negated). The map is
    its own inverse, so :func:`opengl_to_opencv_extrinsics` is the same operation.
    """
    return OPENCV_TO_OPENGL @ np.asarray(cam_from_world, dtype=np.float64)


def opengl_to_opencv_extrinsics(extrinsics_gl: np.ndarray) -> np.ndarray:
    """The reference's ``extrinsics`` (..., 4, 4) -> OpenCV ``cam_from_world``."""
    return OPENCV_TO_OPENGL @ np.asarray(extrinsics_gl, dtype=np.float64)


def pixel_rays(height: int, width: int, K: np.ndarray) -> np.ndarray:
    """Unnormalised camera-frame ray directions (H, W, 3) with z = 1, at integer pixel centres.

    ``ray[v, u] = ((u - cx) / fx, (v - cy) / fy, 1)``; a point at z-depth ``z`` is ``z * ray``.
    """
    K = np.asarray(K, dtype=np.float64)
    u = np.arange(width, dtype=np.float64)
    v = np.arange(height, dtype=np.float64)
    x = (u[None, :] - K[0, 2]) / K[0, 0]
    y = (v[:, None] - K[1, 2]) / K[1, 1]
    return np.stack(np.broadcast_arrays(x, y, np.ones((height, width))), axis=-1)


def project_points(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points (..., 3) -> pixel coordinates (..., 2) as (x, y), integer-centre pixels."""
    points_cam = np.asarray(points_cam, dtype=np.float64)
    z = points_cam[..., 2:3]
    return (points_cam[..., :2] / z) * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to points (..., 3)."""
    transform = np.asarray(transform, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ transform[:3, :3].T + transform[:3, 3]
