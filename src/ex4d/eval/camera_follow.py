"""Camera following: recover each frame's camera relative to frame 0 from the video alone.

Two classical routes (OpenCV), both matching SIFT features of frame k against frame 0 (Lowe ratio
0.8, RANSAC):

* ``pnp`` -- where frame 0's z-depth is known (``depth.npz`` of the recon folder): frame-0 keypoints
  are lifted to 3-D with the depth and K, and frame k's camera is solved by PnP (EPnP + RANSAC,
  refined by Levenberg-Marquardt on the inliers). The translations share one scale.
* ``essential`` -- otherwise: the essential matrix with the known K (RANSAC, 1 px), decomposed by
  ``recoverPose``. Each frame's translation is a unit direction, so its scale is unknown per frame.

Scale alignment (stated in the summary as ``scale_alignment``): for ``pnp`` one least-squares scale
for the whole path, ``s = argmin sum_k ||s t_k - t*_k||^2``; for ``essential`` one such scale per
frame (so the translation error measures the direction, and the shortfall of a wrong direction).

Frame k is *unregistered* when fewer than ``MIN_INLIERS`` matches survive RANSAC; its errors are nan
and it is counted in ``unregistered_fraction``. Frame 0 is the reference (identity) and not scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ex4d.conventions import invert_rigid
from ex4d.eval.metrics import align_scale, rotation_error_deg

#: Fewer RANSAC inliers than this and a frame counts as unregistered.
MIN_INLIERS = 15
#: Lowe's ratio test threshold.
RATIO = 0.8


@dataclass
class Registration:
    """Recovered cameras relative to frame 0: ``cam_from_cam0`` (T, 4, 4), nan rows where unregistered."""

    method: str
    cam_from_cam0: np.ndarray
    registered: np.ndarray            # bool (T,)
    inliers: np.ndarray               # int (T,)
    notes: list[str] = field(default_factory=list)


def _features(gray: np.ndarray, detector):
    keypoints, descriptors = detector.detectAndCompute(gray, None)
    points = np.array([kp.pt for kp in keypoints], np.float64).reshape(-1, 2)
    return points, descriptors


def _match(desc_a, desc_b, matcher) -> np.ndarray:
    """(M, 2) index pairs (a, b) passing the ratio test."""
    if desc_a is None or desc_b is None or len(desc_a) < 2 or len(desc_b) < 2:
        return np.zeros((0, 2), int)
    pairs = []
    for m in matcher.knnMatch(desc_a, desc_b, k=2):
        if len(m) == 2 and m[0].distance < RATIO * m[1].distance:
            pairs.append((m[0].queryIdx, m[0].trainIdx))
    return np.array(pairs, int).reshape(-1, 2)


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    u8 = frame if frame.dtype == np.uint8 else np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY)


def register_frames(frames, K: np.ndarray, depth0: np.ndarray | None = None,
                    valid0: np.ndarray | None = None, max_features: int = 4000) -> Registration:
    """Recover cam_from_cam0 (T, 4, 4) for frames (iterable of (H, W, 3) uint8 or float in [0, 1]).

    Visual odometry: frame k is matched against the last registered frame, whose keypoints carry 3-D
    points (in frame 0's camera frame); frame k's camera is solved by PnP on those, and matches
    without a 3-D point are triangulated from the two cameras to extend the map. The map starts from
    frame 0's z-depth (``depth0`` (H, W), ``valid0`` (H, W) bool: the ``pnp`` route) or, without depth,
    from the essential matrix of frame 0 and the first frame that gives one (the ``essential`` route,
    its unit translation fixing the scale). K (3, 3) pixel intrinsics of every frame.
    """
    import cv2

    K = np.asarray(K, np.float64)
    detector = cv2.SIFT_create(nfeatures=max_features, contrastThreshold=0.01)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    method = "pnp" if depth0 is not None else "essential"
    poses, registered, inliers = [], [], []
    last = None  # (points (N, 2), descriptors, xyz (N, 3) with nan, cam_from_cam0 (4, 4))
    for k, frame in enumerate(frames):
        gray = _gray(np.asarray(frame))
        pts, desc = _features(gray, detector)
        if k == 0:
            xyz = np.full((len(pts), 3), np.nan)
            if depth0 is not None:
                depth0 = np.asarray(depth0, np.float64)
                if depth0.shape != gray.shape:
                    raise ValueError(f"depth {depth0.shape} and frames {gray.shape} differ in size")
                xyz = _lift(pts, depth0, valid0, K)
            last = (pts, desc, xyz, np.eye(4))
            poses.append(np.eye(4)); registered.append(True); inliers.append(len(pts))
            continue
        pose, count, xyz = None, 0, None
        try:
            pose, count, xyz = _register_one(last, pts, desc, K, matcher)
        except cv2.error:  # a degenerate configuration (e.g. all matches on one plane): not registered
            pose = None
        ok = pose is not None and count >= MIN_INLIERS
        poses.append(pose if ok else np.full((4, 4), np.nan))
        registered.append(ok)
        inliers.append(count)
        if ok:
            last = (pts, desc, xyz, pose)
    return Registration(method, np.stack(poses), np.array(registered, bool), np.array(inliers, int))


def _lift(pts: np.ndarray, depth: np.ndarray, valid: np.ndarray | None, K: np.ndarray) -> np.ndarray:
    """3-D points (N, 3) of keypoints (N, 2) from a z-depth map (nan where unknown)."""
    height, width = depth.shape
    col = np.clip(np.rint(pts[:, 0]).astype(int), 0, width - 1)
    row = np.clip(np.rint(pts[:, 1]).astype(int), 0, height - 1)
    z = depth[row, col]
    ok = np.isfinite(z) & (z > 0)
    if valid is not None:
        ok &= np.asarray(valid, bool)[row, col]
    rays = np.c_[(pts[:, 0] - K[0, 2]) / K[0, 0], (pts[:, 1] - K[1, 2]) / K[1, 1], np.ones(len(pts))]
    return np.where(ok[:, None], rays * z[:, None], np.nan)


def _register_one(last, pts, desc, K, matcher):
    """(cam_from_cam0 or None, inlier count, xyz (N, 3) for this frame's keypoints)."""
    import cv2

    prev_pts, prev_desc, prev_xyz, prev_pose = last
    pairs = _match(prev_desc, desc, matcher)
    if len(pairs) < 8:
        return None, len(pairs), None
    a, b = prev_pts[pairs[:, 0]], pts[pairs[:, 1]]
    known = np.isfinite(prev_xyz[pairs[:, 0]]).all(axis=1)
    if known.sum() >= MIN_INLIERS:
        obj = prev_xyz[pairs[known, 0]]
        found, rvec, tvec, inl = cv2.solvePnPRansac(obj, b[known], K, None, iterationsCount=500,
                                                   reprojectionError=2.0, confidence=0.999,
                                                   flags=cv2.SOLVEPNP_EPNP)
        if not found or inl is None or len(inl) < MIN_INLIERS:
            return None, 0 if inl is None else len(inl), None
        inl = inl.ravel()
        rvec, tvec = cv2.solvePnPRefineLM(obj[inl], b[known][inl], K, None, rvec, tvec)
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = cv2.Rodrigues(rvec)[0], tvec.ravel()
        count = len(inl)
        good = np.zeros(len(pairs), bool)
        good[np.flatnonzero(known)[inl]] = True
    elif not np.isfinite(prev_xyz).any():  # no map yet (essential route): two-view start
        E, mask = cv2.findEssentialMat(a, b, K, method=cv2.RANSAC, prob=0.999, threshold=1.0)
        if E is None or E.shape != (3, 3):
            return None, 0, None
        count, R, t, mask = cv2.recoverPose(E, a, b, K, mask=mask.copy())
        rel = np.eye(4)
        rel[:3, :3], rel[:3, 3] = R, t.ravel() / max(np.linalg.norm(t), 1e-12)
        pose = rel @ prev_pose
        good = mask.ravel() > 0
        count = int(count)
    else:
        return None, int(known.sum()), None
    xyz = np.full((len(pts), 3), np.nan)
    carried = good & known
    xyz[pairs[carried, 1]] = prev_xyz[pairs[carried, 0]]
    new = ~known & _epipolar_ok(a, b, K, prev_pose, pose)
    if new.any():
        xyz[pairs[new, 1]] = _triangulate(a[new], b[new], K, prev_pose, pose)
    return pose, count, xyz


def _epipolar_ok(a, b, K, pose_a, pose_b, tol: float = 1.5) -> np.ndarray:
    """Matches (M,) within ``tol`` px of their epipolar lines under the two cameras."""
    rel = pose_b @ np.linalg.inv(pose_a)
    t = rel[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    Kinv = np.linalg.inv(K)
    F = Kinv.T @ tx @ rel[:3, :3] @ Kinv
    ha, hb = np.c_[a, np.ones(len(a))], np.c_[b, np.ones(len(b))]
    lines = ha @ F.T
    dist = np.abs(np.sum(lines * hb, axis=1)) / np.maximum(np.hypot(lines[:, 0], lines[:, 1]), 1e-12)
    return dist <= tol


def _triangulate(a, b, K, pose_a, pose_b, max_reproj: float = 2.0, min_angle_deg: float = 1.0) -> np.ndarray:
    """Linear triangulation of matches (M, 2) seen by two cameras -> (M, 3) in frame 0 (nan if poor)."""
    import cv2

    P_a, P_b = K @ pose_a[:3], K @ pose_b[:3]
    X = cv2.triangulatePoints(P_a, P_b, a.T.astype(np.float64), b.T.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        X = (X[:3] / X[3]).T
    out = np.full_like(X, np.nan)
    ok = np.isfinite(X).all(axis=1)
    for P, pose, uv in ((P_a, pose_a, a), (P_b, pose_b, b)):
        cam = X @ pose[:3, :3].T + pose[:3, 3]
        ok &= cam[:, 2] > 1e-6
        with np.errstate(divide="ignore", invalid="ignore"):
            proj = (np.c_[X, np.ones(len(X))] @ P.T)
            proj = proj[:, :2] / proj[:, 2:3]
        ok &= np.linalg.norm(proj - uv, axis=1) <= max_reproj
    centre_a, centre_b = -pose_a[:3, :3].T @ pose_a[:3, 3], -pose_b[:3, :3].T @ pose_b[:3, 3]
    ra, rb = X - centre_a, X - centre_b
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.sum(ra * rb, 1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1))
    ok &= cos <= math.cos(math.radians(min_angle_deg))
    out[ok] = X[ok]
    return out


def requested_relative(cam_from_world: np.ndarray) -> np.ndarray:
    """The requested cameras relative to frame 0: ``cam_from_world[k] @ inv(cam_from_world[0])`` (T, 4, 4)."""
    cam_from_world = np.asarray(cam_from_world, np.float64)
    return cam_from_world @ invert_rigid(cam_from_world[0])[None]


def camera_errors(reg: Registration, cam_from_world: np.ndarray) -> dict:
    """RotErr / TransErr per frame against the requested path, plus sums and the unregistered fraction.

    RotErr_k: geodesic angle (deg) between the recovered and requested rotations relative to frame 0.
    TransErr_k: ``||s t_k - t*_k||`` after scale alignment (module docstring); the sums are CameraCtrl's
    figures, over the registered frames 1..T-1.
    """
    ref = requested_relative(cam_from_world)
    num = len(ref)
    frames = range(1, num)
    rot = np.full(num, np.nan)
    trans = np.full(num, np.nan)
    ok = [k for k in frames if reg.registered[k]]
    scale = align_scale(np.array([reg.cam_from_cam0[k][:3, 3] for k in ok]).reshape(-1, 3),
                        np.array([ref[k][:3, 3] for k in ok]).reshape(-1, 3))
    scales = {k: scale for k in ok}
    alignment = ("one least-squares scale s for the whole path: argmin_s sum_k ||s t_k - t*_k||^2 over the "
                 "registered frames")
    for k in ok:
        rot[k] = rotation_error_deg(reg.cam_from_cam0[k][:3, :3], ref[k][:3, :3])
        trans[k] = float(np.linalg.norm(scales[k] * reg.cam_from_cam0[k][:3, 3] - ref[k][:3, 3]))
    scored = max(num - 1, 1)
    return {
        "method": reg.method,
        "scale_alignment": alignment,
        "scale": scale,
        "rot_err_deg": rot.tolist(),
        "trans_err": trans.tolist(),
        "rot_err_sum_deg": float(np.nansum(rot)),
        "trans_err_sum": float(np.nansum(trans)),
        "rot_err_mean_deg": float(np.nanmean(rot)) if ok else math.nan,
        "trans_err_mean": float(np.nanmean(trans)) if ok else math.nan,
        "path_length": float(sum(np.linalg.norm(ref[k][:3, 3] - ref[k - 1][:3, 3]) for k in frames)),
        "registered": reg.registered.tolist(),
        "inliers": reg.inliers.tolist(),
        "unregistered_fraction": float((num - 1 - len(ok)) / scored) if num > 1 else 0.0,
    }
