"""Camera pose helpers: the reference look-at, checks on user poses, and readable angles.

All poses here are OpenCV ``cam_from_world`` 4x4 matrices (x right, y down, z forward; world = the
source camera of frame 0), see :mod:`ex4d.conventions`. The reference builds its poses with a
look-at whose ``up`` is (0, 1, 0) -- *down* in this y-down world -- which yields a reflection; it
then negates rows 0-2 in place, and the result is a world -> OpenGL-camera transform. We reproduce
that chain exactly (the released adapter was trained on renders made with it) and convert the
result to OpenCV once, here.
"""

from __future__ import annotations

import numpy as np

from ex4d.conventions import OPENCV_TO_OPENGL
from ex4d.errors import InputError

#: The reference's look-at ``up`` vector. In the y-down world it points down; with the reflection
#: that follows it still gives cameras without roll whose image rows run down the world's +y.
REFERENCE_UP = np.array([0.0, 1.0, 0.0])

#: The reference negates rows 0, 1 and 2 of its look-at matrix before rendering (and saving).
REFERENCE_ROW_NEGATION = np.diag([-1.0, -1.0, -1.0, 1.0])


def reference_view_matrix(eye: np.ndarray, center: np.ndarray, up: np.ndarray = REFERENCE_UP) -> np.ndarray:
    """The reference's look-at matrix V (..., 4, 4) float64, *before* its row negation.

    eye, center: (..., 3) world points. With f = normalise(center - eye), r = normalise(f x up),
    u' = normalise(r x f): V = [r; u'; f | -(r.eye, u'.eye, f.eye)]. Its 3x3 block has
    determinant -1 (a reflection). Raises ValueError where eye == center or f is parallel to up.
    """
    eye = np.asarray(eye, dtype=np.float64)
    center = np.asarray(center, dtype=np.float64)
    eye, center = np.broadcast_arrays(eye, center)
    forward = center - eye
    length = np.linalg.norm(forward, axis=-1, keepdims=True)
    if np.any(length < 1e-12):
        raise ValueError("look-at: eye and center coincide")
    forward = forward / length
    right = np.cross(forward, np.broadcast_to(np.asarray(up, dtype=np.float64), forward.shape), axis=-1)
    right_len = np.linalg.norm(right, axis=-1, keepdims=True)
    # A camera looking straight along +-y has no defined roll with this up vector.
    if np.any(right_len < 1e-9):
        raise ValueError("look-at: the view direction is parallel to the up vector (pitch of +-90 degrees)")
    right = right / right_len
    true_up = np.cross(right, forward, axis=-1)
    true_up = true_up / np.linalg.norm(true_up, axis=-1, keepdims=True)

    view = np.zeros(eye.shape[:-1] + (4, 4))
    view[..., 0, :3] = right
    view[..., 1, :3] = true_up
    view[..., 2, :3] = forward
    view[..., :3, 3] = -np.einsum("...ij,...j->...i", view[..., :3, :3], eye)
    view[..., 3, 3] = 1.0
    return view


def reference_gl_from_world(eye: np.ndarray, center: np.ndarray) -> np.ndarray:
    """M = diag(-1,-1,-1,1) @ V (..., 4, 4): the reference's world -> OpenGL-camera matrix.

    This is exactly what the reference saved as ``extrinsics`` in ``camera_<cam>.npz``.
    """
    return REFERENCE_ROW_NEGATION @ reference_view_matrix(eye, center)


def look_at(eye: np.ndarray, center: np.ndarray) -> np.ndarray:
    """OpenCV ``cam_from_world`` (..., 4, 4) of a camera at ``eye`` looking at ``center``.

    Equal to diag(1,-1,-1,1) @ M with M the reference's matrix, so it reproduces the reference's
    poses exactly. eye = 0, center = (0, 0, r > 0) gives the identity.
    """
    return OPENCV_TO_OPENGL @ reference_gl_from_world(eye, center)


def camera_centres(cam_from_world: np.ndarray) -> np.ndarray:
    """Camera centres in world coordinates (..., 3) = -R^T t."""
    cam_from_world = np.asarray(cam_from_world, dtype=np.float64)
    rotation = cam_from_world[..., :3, :3]
    return -np.einsum("...ji,...j->...i", rotation, cam_from_world[..., :3, 3])


def view_angles(cam_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(yaw, pitch) in degrees of each camera's optical axis, arrays of shape (...).

    yaw: rotation of the view toward -x (the reference's sign: a camera moved to +x that looks back
    at the pivot has positive yaw). pitch: how far the camera looks *down* (toward world +y).
    The optical axis in world coordinates is row 2 of the rotation.
    """
    forward = np.asarray(cam_from_world, dtype=np.float64)[..., 2, :3]
    yaw = np.degrees(np.arctan2(-forward[..., 0], forward[..., 2]))
    pitch = np.degrees(np.arctan2(forward[..., 1], np.hypot(forward[..., 0], forward[..., 2])))
    return yaw, pitch


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """Closest proper rotation (..., 3, 3) to ``matrix`` (SVD), to clean float32 round-off."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64))
    det = np.linalg.det(u @ vt)
    fix = np.ones(u.shape[:-1])
    fix[..., -1] = np.sign(det)
    return (u * fix[..., None, :]) @ vt


def check_cam_from_world(poses: np.ndarray, where: str, *, atol: float = 2e-3) -> np.ndarray:
    """Validate user poses (T, 4, 4) and return them as float64 with orthonormal rotations.

    Raises InputError naming ``where`` if the array is not (T,4,4), not finite, has a last row other
    than (0,0,0,1), or a 3x3 block that is not a rotation (within ``atol``, loose enough for
    float32 files).
    """
    poses = np.asarray(poses)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or poses.shape[0] == 0:
        raise InputError(f"{where}: camera poses must be (T,4,4) with T >= 1, got shape {poses.shape}")
    if not np.issubdtype(poses.dtype, np.number) or np.issubdtype(poses.dtype, np.complexfloating):
        raise InputError(f"{where}: camera poses must be real numbers, got dtype {poses.dtype}")
    poses = poses.astype(np.float64)
    if not np.all(np.isfinite(poses)):
        raise InputError(f"{where}: camera poses contain NaN or infinite values")
    if not np.allclose(poses[:, 3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise InputError(f"{where}: the last row of every camera pose must be (0, 0, 0, 1)")
    rotation = poses[:, :3, :3]
    gram_error = np.abs(np.swapaxes(rotation, 1, 2) @ rotation - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(rotation)
    bad = np.flatnonzero((gram_error > atol) | (det < 0))
    if bad.size:
        k = int(bad[0])
        raise InputError(f"{where}: pose {k} is not a rigid transform (its 3x3 block is not a rotation: "
                         f"det {det[k]:.4f}, orthonormality error {gram_error[k]:.2e}); poses must be "
                         "OpenCV cam_from_world matrices")
    # Clean float32 round-off, but leave exact rotations bit-for-bit (files must round-trip).
    rough = gram_error > 1e-9
    if np.any(rough):
        poses[rough, :3, :3] = nearest_rotation(rotation[rough])
    return poses


def check_intrinsics(K: np.ndarray, where: str) -> np.ndarray:
    """Validate K (3, 3) or (T, 3, 3) and return it as float64; InputError naming ``where``."""
    K = np.asarray(K)
    if (K.shape[-2:] != (3, 3) or K.ndim not in (2, 3) or not np.issubdtype(K.dtype, np.number)
            or np.issubdtype(K.dtype, np.complexfloating)):
        raise InputError(f"{where}: intrinsics must be a (3,3) or (T,3,3) matrix, got shape {K.shape}")
    K = K.astype(np.float64)
    flat = K.reshape(-1, 3, 3)
    if not np.all(np.isfinite(flat)):
        raise InputError(f"{where}: intrinsics contain NaN or infinite values")
    if not np.allclose(flat[:, 2], [0.0, 0.0, 1.0], atol=1e-6) or not np.allclose(flat[:, 1, 0], 0.0):
        raise InputError(f"{where}: intrinsics must look like [[fx,s,cx],[0,fy,cy],[0,0,1]]")
    if np.any(flat[:, 0, 0] <= 0) or np.any(flat[:, 1, 1] <= 0):
        raise InputError(f"{where}: focal lengths fx and fy must be positive")
    return K
