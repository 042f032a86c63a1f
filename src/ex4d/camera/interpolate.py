"""Pose interpolation: unit quaternions, SLERP, and resampling a path to another frame count.

Pure numpy (no scipy dependency). Quaternions are (w, x, y, z), unit length, with w >= 0 after
conversion from a matrix. Rotations are interpolated by spherical linear interpolation along the
shortest arc; camera *centres* (not the translation column, which mixes in the rotation) are
interpolated linearly, so a camera that only turns stays in place.
"""

from __future__ import annotations

import numpy as np

from ex4d.camera.poses import camera_centres


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) as (w, x, y, z) with w >= 0.

    Uses the largest of the four squared components as the pivot (Shepperd's method), which is
    stable for every rotation including 180-degree turns.
    """
    m = np.asarray(rotation, dtype=np.float64)
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # Each row is 4*q_i times the quaternion, computed from the pivot component i.
    candidates = np.stack([
        np.stack([1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01], axis=-1),
        np.stack([m21 - m12, 1 + m00 - m11 - m22, m10 + m01, m02 + m20], axis=-1),
        np.stack([m02 - m20, m10 + m01, 1 - m00 + m11 - m22, m21 + m12], axis=-1),
        np.stack([m10 - m01, m02 + m20, m21 + m12, 1 - m00 - m11 + m22], axis=-1),
    ], axis=-2)
    diagonal = np.stack([candidates[..., i, i] for i in range(4)], axis=-1)
    best = np.argmax(diagonal, axis=-1)
    quat = np.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    quat = quat / np.linalg.norm(quat, axis=-1, keepdims=True)
    return np.where(quat[..., :1] < 0, -quat, quat)


def quaternion_to_matrix(quat: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) as (w, x, y, z) (normalised here) -> rotation matrices (..., 3, 3)."""
    q = np.asarray(quat, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1),
    ], axis=-2)


def slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical linear interpolation between unit quaternions along the shortest arc.

    q0, q1: (..., 4); t: (...) in [0, 1]. Returns (..., 4) unit quaternions.
    """
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    # q and -q are the same rotation: flip one so that the arc is the short one.
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin_theta = np.sin(theta)
    near = sin_theta < 1e-6  # nearly identical rotations: linear blend is exact enough and stable
    safe_sin = np.where(near, 1.0, sin_theta)
    w0 = np.where(near, 1.0 - t, np.sin((1.0 - t) * theta) / safe_sin)
    w1 = np.where(near, t, np.sin(t * theta) / safe_sin)
    out = w0 * q0 + w1 * q1
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def _segments(times: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query time: the index i of its segment [times[i], times[i+1]] and the local t in [0,1].

    Query times before the first key or after the last one are clamped (the path holds still).
    """
    index = np.clip(np.searchsorted(times, query, side="right") - 1, 0, len(times) - 2)
    span = times[index + 1] - times[index]
    local = np.clip((query - times[index]) / span, 0.0, 1.0)
    return index, local


def interpolate_linear(times: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation of values (K, ...) at strictly increasing times (K,) -> (N, ...)."""
    times = np.asarray(times, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    if len(times) == 1:
        return np.broadcast_to(values[0], (len(query),) + values.shape[1:]).copy()
    index, local = _segments(times, query)
    local = local.reshape((-1,) + (1,) * (values.ndim - 1))
    return (1.0 - local) * values[index] + local * values[index + 1]


def interpolate_rotations(times: np.ndarray, rotations: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Piecewise SLERP of rotations (K, 3, 3) at strictly increasing times (K,) -> (N, 3, 3)."""
    times = np.asarray(times, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    quats = matrix_to_quaternion(rotations)
    if len(times) == 1:
        return np.broadcast_to(quaternion_to_matrix(quats[0]), (len(query), 3, 3)).copy()
    index, local = _segments(times, query)
    return quaternion_to_matrix(slerp(quats[index], quats[index + 1], local))


def interpolate_poses(times: np.ndarray, cam_from_world: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Interpolate OpenCV poses (K, 4, 4) keyed at times (K,) to the query times (N,) -> (N, 4, 4).

    Rotations by SLERP, camera centres linearly; the result is rebuilt as cam_from_world.
    """
    cam_from_world = np.asarray(cam_from_world, dtype=np.float64)
    rotation = interpolate_rotations(times, cam_from_world[:, :3, :3], query)
    centres = interpolate_linear(times, camera_centres(cam_from_world), query)
    return compose_cam_from_world(rotation, centres)


def compose_cam_from_world(rotation: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """cam_from_world (N, 4, 4) from rotations R (N, 3, 3) (world -> camera) and centres (N, 3)."""
    rotation = np.asarray(rotation, dtype=np.float64)
    centres = np.asarray(centres, dtype=np.float64)
    out = np.zeros(rotation.shape[:-2] + (4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rotation, centres)
    out[..., 3, 3] = 1.0
    return out


def resample_path(cam_from_world: np.ndarray, K: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample a path of T poses (T, 4, 4) and intrinsics (T, 3, 3) to ``num_frames`` frames.

    Both paths are taken over normalised time [0, 1] (pose j at j / (T - 1)), so the first and last
    poses are kept exactly. A single pose is repeated.
    """
    count = len(cam_from_world)
    source_times = np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(1)
    query = np.linspace(0.0, 1.0, num_frames)
    return interpolate_poses(source_times, cam_from_world, query), interpolate_linear(source_times, K, query)
