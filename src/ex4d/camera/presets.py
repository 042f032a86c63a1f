"""Camera path presets: the reference's orbits and loop, plus zooms, general orbits and dolly zoom.

Every path starts at the source camera (frame 0 = identity) and looks at a pivot on the optical
axis, ``pivot = (0, 0, r)`` with ``r = min(frame-0 depth after the border push) + 0.15``, as in the
reference. Shapes: cam_from_world (T, 4, 4) float64 OpenCV, K (T, 3, 3).

Reference presets (reproduced, with one fix: ``rounds`` is always 1, so the last frame reaches
exactly the requested angle for any frame count; the reference overshot whenever T != 49):

* ``<angle>``: a_k = linspace(0, angle, T); eye_k = (r sin a, 0.2 r (|cos a| - 1), r (1 - |cos a|)).
  A true orbit of horizontal radius r for |angle| <= 90 that rises by up to 0.2 r. Beyond 90
  degrees the |cos| folds the path back toward the source (kept for compatibility, with a warning).
* ``180``: a_k = linspace(0, 2 pi, T); eye_k = (r sin a, 0.2 r (cos a - 1), 0). Not a 180-degree
  orbit: a closed loop in the source image plane (right, up, left, back) with at most 45 degrees of
  yaw and a rise of up to 0.4 r.
"""

from __future__ import annotations

import logging

import numpy as np

from ex4d.camera.poses import look_at
from ex4d.errors import InputError

logger = logging.getLogger(__name__)

#: The reference places the pivot this far behind the nearest frame-0 surface (scene units).
PIVOT_OFFSET = 0.15
#: The reference's camera rise, as a fraction of the pivot radius.
REFERENCE_RISE = 0.2
#: zoom_in travels this fraction of the nearest frame-0 depth by default ...
ZOOM_IN_TRAVEL = 0.5
#: ... and never more than this fraction, so the camera always stops in front of every surface.
ZOOM_IN_MAX_TRAVEL = 0.9
#: zoom_out travels back this fraction of the pivot radius by default.
ZOOM_OUT_TRAVEL = 0.5
#: Largest backward travel (x the pivot radius) of zoom_out and dolly_zoom out: farther, the scene
#: shrinks to a few pixels.
MAX_OUT_TRAVEL = 100.0
#: Orbit radii accepted (scene units).
MIN_ORBIT_RADIUS, MAX_ORBIT_RADIUS = 1e-6, 1e6
#: dolly_zoom moves this fraction of the pivot radius (out) or of the nearest depth (in) by default.
DOLLY_ZOOM_TRAVEL = 0.5
#: General orbits: the camera must not look straight up or down (the look-at has no roll there).
MAX_ORBIT_PITCH = 89.0

EASES = ("linear", "smooth")


def ease_curve(num_frames: int, ease: str = "linear") -> np.ndarray:
    """Progress s_k in [0, 1] for k = 0..T-1 (T,): linear (the reference) or smooth (cosine in/out)."""
    t = np.linspace(0.0, 1.0, num_frames)
    if ease == "linear":
        return t
    if ease == "smooth":
        return 0.5 - 0.5 * np.cos(np.pi * t)
    raise InputError(f"unknown ease {ease!r}; use one of: {', '.join(EASES)}")


def scene_depths(depth0: np.ndarray, size: tuple[int, int], border_depth: float = 100.0) -> tuple[float, float]:
    """(nearest depth, pivot radius r) of frame 0, as the reference computes them.

    depth0: (H, W) z-depth. The reference first pushes the 1-pixel border ring to ``border_depth``
    and takes the minimum, so the minimum is over the interior and ``border_depth``. Non-finite and
    non-positive values (invalid pixels in user depth files) are ignored, with a warning.
    r = nearest + 0.15.
    """
    depth0 = np.asarray(depth0)
    if depth0.shape != tuple(size):
        raise InputError(f"frame-0 depth has shape {depth0.shape} but the clip is {tuple(size)} (H, W)")
    interior = depth0[1:-1, 1:-1].astype(np.float64).ravel()
    usable = interior[np.isfinite(interior) & (interior > 0)]
    if usable.size < interior.size:
        logger.warning("frame-0 depth has %d invalid (non-finite or <= 0) pixels; they are ignored for the "
                       "pivot radius", interior.size - usable.size)
    if interior.size and not usable.size:
        raise InputError("frame-0 depth has no valid (finite, positive) pixels: cannot place the camera pivot")
    nearest = float(min(usable.min(), border_depth)) if usable.size else float(border_depth)
    return nearest, nearest + PIVOT_OFFSET


def _pivot(radius: float) -> np.ndarray:
    return np.array([0.0, 0.0, radius])


def reference_orbit(angle_deg: float, num_frames: int, radius: float) -> np.ndarray:
    """The reference's ``--cam <angle>`` path with rounds = 1 -> cam_from_world (T, 4, 4)."""
    if abs(angle_deg) > 90:
        logger.warning("orbit angle %g is beyond +-90 degrees: like the reference, the path folds back "
                       "toward the source (|cos|); use orbit:yaw=%g for a true orbit", angle_deg, angle_deg)
    a = np.radians(np.linspace(0.0, angle_deg, num_frames))
    folded = np.abs(np.cos(a))
    eye = np.stack([radius * np.sin(a), REFERENCE_RISE * radius * (folded - 1.0), radius * (1.0 - folded)], axis=-1)
    return look_at(eye, _pivot(radius))


def reference_loop(num_frames: int, radius: float) -> np.ndarray:
    """The reference's ``--cam 180`` closed loop with rounds = 1 -> cam_from_world (T, 4, 4)."""
    a = np.linspace(0.0, 2.0 * np.pi, num_frames)
    eye = np.stack([radius * np.sin(a), REFERENCE_RISE * radius * (np.cos(a) - 1.0), np.zeros_like(a)], axis=-1)
    return look_at(eye, _pivot(radius))


def orbit_eye(yaw_deg, pitch_deg, radius, pivot) -> np.ndarray:
    """Camera centre(s) (..., 3) on the sphere of ``radius`` about ``pivot`` at (yaw, pitch) degrees.

    yaw 0, pitch 0 is the point in front of the pivot on the source optical axis; positive yaw moves
    the camera to +x (as the reference); positive pitch raises it (world -y), so it looks down.
    """
    yaw = np.radians(np.asarray(yaw_deg, dtype=np.float64))
    pitch = np.radians(np.asarray(pitch_deg, dtype=np.float64))
    radius = np.asarray(radius, dtype=np.float64)
    offset = np.stack([np.sin(yaw) * np.cos(pitch), -np.sin(pitch), -np.cos(yaw) * np.cos(pitch)], axis=-1)
    return np.asarray(pivot, dtype=np.float64) + radius[..., None] * offset


def orbit(yaw_deg: float, pitch_deg: float, num_frames: int, radius: float, ease: str = "linear") -> np.ndarray:
    """A true orbit about (0, 0, radius) from the source pose to (yaw, pitch) -> (T, 4, 4).

    Yaw and pitch change together along the ease curve; the camera stays at distance ``radius``
    from the pivot and looks at it. |pitch| must stay below 89 degrees.
    """
    if abs(pitch_deg) > MAX_ORBIT_PITCH:
        raise InputError(f"orbit pitch {pitch_deg:g} is out of range: use -{MAX_ORBIT_PITCH:g} < pitch < "
                         f"{MAX_ORBIT_PITCH:g} degrees")
    if not MIN_ORBIT_RADIUS <= radius <= MAX_ORBIT_RADIUS:
        raise InputError(f"orbit radius must be from {MIN_ORBIT_RADIUS:g} to {MAX_ORBIT_RADIUS:g} scene units, "
                         f"got {radius:g}")
    s = ease_curve(num_frames, ease)
    pivot = _pivot(radius)
    eye = orbit_eye(s * yaw_deg, s * pitch_deg, np.full(num_frames, radius), pivot)
    return look_at(eye, pivot)


def dolly(distance: float, num_frames: int, ease: str = "linear") -> np.ndarray:
    """Move along the optical axis by ``distance`` (positive = forward, into the scene) -> (T, 4, 4).

    The camera keeps the source orientation (it looks at the pivot, which is on the axis).
    """
    s = ease_curve(num_frames, ease)
    poses = np.tile(np.eye(4), (num_frames, 1, 1))
    poses[:, 2, 3] = -s * distance  # centre (0, 0, s d) -> t = -R c
    return poses


def zoom_in(num_frames: int, nearest: float, travel: float = ZOOM_IN_TRAVEL, ease: str = "linear") -> np.ndarray:
    """Dolly forward by ``travel`` x the nearest frame-0 depth (0 < travel <= 0.9) -> (T, 4, 4).

    Every frame-0 surface point has z >= nearest, so after moving travel * nearest forward it is
    still at least (1 - travel) * nearest in front of the camera.
    """
    if not 0 < travel <= ZOOM_IN_MAX_TRAVEL:
        raise InputError(f"zoom_in travel {travel:g} is out of range: use 0 < travel <= {ZOOM_IN_MAX_TRAVEL:g} "
                         "(a fraction of the nearest depth)")
    return dolly(travel * nearest, num_frames, ease)


def zoom_out(num_frames: int, radius: float, travel: float = ZOOM_OUT_TRAVEL, ease: str = "linear") -> np.ndarray:
    """Dolly backward by ``travel`` x the pivot radius (travel > 0) -> (T, 4, 4)."""
    if not 0 < travel <= MAX_OUT_TRAVEL:
        raise InputError(f"zoom_out travel must be > 0 and at most {MAX_OUT_TRAVEL:g} (a multiple of the pivot "
                         f"radius), got {travel:g}")
    return dolly(-travel * radius, num_frames, ease)


def dolly_zoom(num_frames: int, K: np.ndarray, nearest: float, radius: float, direction: str = "out",
               travel: float = DOLLY_ZOOM_TRAVEL, ease: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Dolly zoom: move along the axis while the focal length keeps the pivot's size -> (poses, K).

    The pivot plane (z = radius) projects with scale f / (radius - z_cam); keeping it constant gives
    f_k = f_0 * (radius - z_k) / radius. ``direction`` "out" moves back by travel x radius (focal
    length grows: the background looms); "in" moves forward by travel x nearest depth, at most 0.9
    (focal length shrinks: the background recedes and the view widens). The principal point stays.
    Returns cam_from_world (T, 4, 4) and K (T, 3, 3).
    """
    if direction == "out":
        if not 0 < travel <= MAX_OUT_TRAVEL:
            raise InputError(f"dolly_zoom travel must be > 0 and at most {MAX_OUT_TRAVEL:g} (a multiple of the "
                             f"pivot radius), got {travel:g}")
        distance = -travel * radius
    elif direction == "in":
        if not 0 < travel <= ZOOM_IN_MAX_TRAVEL:
            raise InputError(f"dolly_zoom travel {travel:g} is out of range for direction=in: use 0 < travel <= "
                             f"{ZOOM_IN_MAX_TRAVEL:g} (a fraction of the nearest depth)")
        distance = travel * nearest
    else:
        raise InputError(f"dolly_zoom direction must be 'out' or 'in', got {direction!r}")
    poses = dolly(distance, num_frames, ease)
    z_cam = -poses[:, 2, 3]
    scale = (radius - z_cam) / radius
    K_path = np.repeat(np.asarray(K, dtype=np.float64)[None], num_frames, axis=0)
    K_path[:, 0, 0] *= scale
    K_path[:, 1, 1] *= scale
    K_path[:, 0, 1] *= scale  # skew scales with the focal length too
    return poses, K_path


#: Default stereo baseline as a fraction of the subject (pivot) distance: 1/30, the classic "1/30 rule" of
#: stereography; 6.5 cm (the human interocular distance) for a subject at about 2 m.
STEREO_BASELINE_FRACTION = 1.0 / 30.0
#: Largest stereo baseline, as a multiple of the subject distance (beyond it the pair cannot be fused).
MAX_STEREO_BASELINE_FRACTION = 1.0
CONVERGENCES = ("subject", "infinity")


def stereo(num_frames: int, K: np.ndarray, baseline: float, converge_depth: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The right eye of a parallel (off-axis) stereo pair whose left eye is the source camera.

    Every frame: no rotation, camera centre (baseline, 0, 0) (OpenCV: x right), so cam_from_world =
    [I | (-baseline, 0, 0)]. A point at z-depth z then moves by the disparity f_x * baseline / z pixels
    to the left. With ``converge_depth`` (the subject distance Z_s) the right eye's principal point
    moves right by f_x * baseline / Z_s pixels (a shifted sensor, not a toe-in), so points at z = Z_s have
    zero disparity, nearer points pop out and farther ones recede; None keeps K (converged at infinity).
    Returns cam_from_world (T, 4, 4) and K (T, 3, 3).
    """
    if not baseline > 0 or not np.isfinite(baseline):
        raise InputError(f"stereo baseline must be positive and finite, got {baseline:g}")
    poses = np.tile(np.eye(4), (num_frames, 1, 1))
    poses[:, 0, 3] = -float(baseline)  # centre (B, 0, 0) -> t = -R c
    K_path = np.repeat(np.asarray(K, dtype=np.float64)[None], num_frames, axis=0)
    if converge_depth is not None:
        if not converge_depth > 0:
            raise InputError(f"stereo convergence distance must be positive, got {converge_depth:g}")
        K_path[:, 0, 2] += K_path[:, 0, 0] * float(baseline) / float(converge_depth)
    return poses, K_path
