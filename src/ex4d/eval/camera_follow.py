"""Camera following: recover each frame's camera relative to frame 0 from the video alone.

Visual odometry with OpenCV. Keypoints (SIFT detections, refreshed every frame) are tracked from
frame to frame by pyramidal Lucas-Kanade with a forward-backward check (descriptor matching between
consecutive frames failed on repeating textures such as a checkered wall, whose per-frame motion is
about one square). Tracked points that carry a 3-D point give frame k's camera by PnP (EPnP +
RANSAC, refined by Levenberg-Marquardt). New 3-D points are triangulated between the frame where a
track was first seen and frame k, only when their rays meet at >= ``MIN_ANGLE_DEG`` and the point
also reprojects onto the track in the previous frame (``MID_TOL`` px): smaller angles let track noise
and texture aliasing become wrong depths that the following poses inherit. The map starts in one
of two ways:

* ``pnp`` -- where frame 0's z-depth is known (``depth.npz`` of the recon folder): frame-0 keypoints
  are lifted to 3-D with the depth and K. The translations share the depth's scale.
* ``essential`` -- otherwise: the essential matrix with the known K between frame 0 and the first
  frame that gives one (RANSAC, 1 px), decomposed by ``recoverPose``; its unit translation fixes the
  scale of the whole path.

Scale alignment (stated in the summary as ``scale_alignment``): for ``pnp`` one least-squares scale
for the whole path, ``s = argmin sum_k ||s t_k - t*_k||^2`` over the registered frames, on either
route. A scale <= 0 means the recovered path moves against the requested one: the summary reports
it as ``registration_failed``.

Frame k is *unregistered* when fewer than ``MIN_INLIERS`` tracked points survive RANSAC; its errors are nan
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
#: Reprojection tolerance (px) of a new 3-D point in the track's previous frame.
MID_TOL = 1.0
#: Minimum angle (deg) between a new 3-D point's rays from its track's first and current frames. Small
#: angles give poorly determined depths; with the tracks' ~0.5 px noise, 1-3 deg let a near-planar
#: scene (boxes, 90 deg orbit) trade rotation for translation and drift (mean RotErr 15-19 deg);
#: 4-8 deg keep it below 2.6 deg (4 chosen: the essential route's TransErr separation is best there).
MIN_ANGLE_DEG = 4.0


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
    method = "pnp" if depth0 is not None else "essential"
    poses, registered, inliers = [], [], []
    # last: (points (N, 2), descriptors, xyz (N, 3) with nan, cam_from_cam0 (4, 4), track origins: the
    # pixel (N, 2) and camera (N, 4, 4) where each keypoint's track was first seen).
    last = None
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
            last = (pts, desc, xyz, np.eye(4), pts.copy(), np.repeat(np.eye(4)[None], len(pts), 0))
            prev_gray = gray
            poses.append(np.eye(4)); registered.append(True); inliers.append(len(pts))
            continue
        pose, count, xyz, origin = None, 0, None, None
        pts, pairs = _track(last[0], prev_gray, gray, pts)
        try:
            pose, count, xyz, origin = _register_one(last, pts, pairs, K)
        except cv2.error:  # a degenerate configuration (e.g. all matches on one plane): not registered
            pose = None
        ok = pose is not None and count >= MIN_INLIERS
        poses.append(pose if ok else np.full((4, 4), np.nan))
        registered.append(ok)
        inliers.append(count)
        if ok:
            last = (pts, desc, xyz, pose) + origin
            prev_gray = gray
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


def _track(prev_pts, prev_gray, gray, detected, fb_tol: float = 1.0, min_dist: float = 3.0):
    """Track prev keypoints into this frame (pyramidal Lucas-Kanade, forward-backward check).

    Returns this frame's points (tracked ones first, then fresh detections at least ``min_dist`` px
    from any of them) and the (M, 2) pairs (prev index, this index). Descriptor matching of
    consecutive frames aliases on periodic textures (a checkered wall moving about one period per
    frame matches itself one square off, as if the camera stood still); tracking from the previous
    position does not.
    """
    import cv2

    if len(prev_pts) == 0:
        return detected, np.zeros((0, 2), int)
    p = prev_pts.astype(np.float32).reshape(-1, 1, 2)
    lk = dict(winSize=(21, 21), maxLevel=4, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    q, st, _ = cv2.calcOpticalFlowPyrLK(prev_gray, gray, p, None, **lk)
    r, st2, _ = cv2.calcOpticalFlowPyrLK(gray, prev_gray, q, None, **lk)
    height, width = gray.shape
    q2 = q.reshape(-1, 2).astype(np.float64)
    ok = ((st.ravel() == 1) & (st2.ravel() == 1) & (np.linalg.norm((r - p).reshape(-1, 2), axis=1) < fb_tol)
          & (q2[:, 0] >= 0) & (q2[:, 0] <= width - 1) & (q2[:, 1] >= 0) & (q2[:, 1] <= height - 1))
    tracked = q2[ok]
    if len(detected) and len(tracked):
        occupied = np.zeros((height, width), np.uint8)
        cv2.circle  # noqa: B018 (kept simple: mark a square around every tracked point)
        for x, y in np.rint(tracked).astype(int):
            occupied[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4] = 1
        col = np.clip(np.rint(detected[:, 0]).astype(int), 0, width - 1)
        row = np.clip(np.rint(detected[:, 1]).astype(int), 0, height - 1)
        detected = detected[occupied[row, col] == 0]
    pts = np.concatenate([tracked, detected.reshape(-1, 2)], 0)
    pairs = np.c_[np.flatnonzero(ok), np.arange(len(tracked))]
    return pts, pairs.astype(int)


def _register_one(last, pts, pairs, K):
    """(cam_from_cam0 or None, inlier count, xyz (N, 3) for this frame's keypoints, (origin uv, origin pose)).

    New 3-D points are triangulated between a keypoint's first observation along its track and this
    frame (not just the previous frame): consecutive frames of a slow orbit are too close to
    triangulate distant points (a wall at 4x the orbit radius stays below the 1 deg angle), and a map
    that only ever gains near points ends up on moving objects and drifts.
    """
    import cv2

    prev_pts, _, prev_xyz, prev_pose, prev_origin_uv, prev_origin_pose = last
    if len(pairs) < 8:
        return None, len(pairs), None, None
    a, b = prev_pts[pairs[:, 0]], pts[pairs[:, 1]]
    known = np.isfinite(prev_xyz[pairs[:, 0]]).all(axis=1)
    if known.sum() >= MIN_INLIERS:
        obj = prev_xyz[pairs[known, 0]]
        found, rvec, tvec, inl = cv2.solvePnPRansac(obj, b[known], K, None, iterationsCount=500,
                                                   reprojectionError=2.0, confidence=0.999,
                                                   flags=cv2.SOLVEPNP_EPNP)
        if not found or inl is None or len(inl) < MIN_INLIERS:
            return None, 0 if inl is None else len(inl), None, None
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
            return None, 0, None, None
        count, R, t, mask = cv2.recoverPose(E, a, b, K, mask=mask.copy())
        rel = np.eye(4)
        rel[:3, :3], rel[:3, 3] = R, t.ravel() / max(np.linalg.norm(t), 1e-12)
        pose = rel @ prev_pose
        good = mask.ravel() > 0
        count = int(count)
    else:
        return None, int(known.sum()), None, None
    xyz = np.full((len(pts), 3), np.nan)
    # Every keypoint starts a track here unless a match continues an older one.
    origin_uv = pts.copy()
    origin_pose = np.repeat(pose[None], len(pts), 0)
    carried = good & known
    xyz[pairs[carried, 1]] = prev_xyz[pairs[carried, 0]]
    cand = ~known & _epipolar_ok(a, b, K, prev_pose[None], pose)
    if cand.any():
        src = pairs[cand, 0]
        uv0, pose0 = prev_origin_uv[src], prev_origin_pose[src]
        agree = _epipolar_ok(uv0, b[cand], K, pose0, pose)  # the whole track agrees with this camera
        idx = np.flatnonzero(cand)[agree]
        uv0, pose0 = uv0[agree], pose0[agree]
        dst = pairs[idx, 1]
        origin_uv[dst], origin_pose[dst] = uv0, pose0
        X = _triangulate(uv0, b[idx], K, pose0, pose, min_angle_deg=MIN_ANGLE_DEG)
        # Three views: the point must also land on the track's previous position. A track that slipped
        # one period on a repeating texture along the epipolar line triangulates (at a wrong depth)
        # from two views but not from three.
        X[~_reprojects(X, a[idx], K, prev_pose, MID_TOL)] = np.nan
        xyz[dst] = X
    return pose, count, xyz, (origin_uv, origin_pose)


def _reprojects(X, uv, K, pose, tol):
    """Points X (M, 3) (nan allowed) that project within ``tol`` px of uv (M, 2) under pose."""
    cam = X @ pose[:3, :3].T + pose[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = cam @ K.T
        proj = proj[:, :2] / proj[:, 2:3]
        return (cam[:, 2] > 1e-6) & (np.linalg.norm(proj - uv, axis=1) <= tol)


def _epipolar_ok(a, b, K, pose_a, pose_b, tol: float = 1.5) -> np.ndarray:
    """Matches (M,) within ``tol`` px of their epipolar lines; pose_a (4, 4) or (M, 4, 4), pose_b (4, 4)."""
    pose_a = np.broadcast_to(np.asarray(pose_a, np.float64), (len(a), 4, 4))
    rel = pose_b[None] @ np.linalg.inv(pose_a)
    t = rel[:, :3, 3]
    zero = np.zeros(len(a))
    tx = np.stack([np.stack([zero, -t[:, 2], t[:, 1]], -1), np.stack([t[:, 2], zero, -t[:, 0]], -1),
                   np.stack([-t[:, 1], t[:, 0], zero], -1)], 1)
    Kinv = np.linalg.inv(K)
    F = Kinv.T[None] @ tx @ rel[:, :3, :3] @ Kinv[None]
    ha, hb = np.c_[a, np.ones(len(a))], np.c_[b, np.ones(len(b))]
    lines = np.einsum("mij,mj->mi", F, ha)
    dist = np.abs(np.sum(lines * hb, axis=1)) / np.maximum(np.hypot(lines[:, 0], lines[:, 1]), 1e-12)
    return dist <= tol


def _triangulate(a, b, K, pose_a, pose_b, max_reproj: float = 2.0, min_angle_deg: float = 1.0) -> np.ndarray:
    """Linear (DLT) triangulation of matches (M, 2) -> (M, 3) in frame 0 (nan if poor).

    pose_a: (4, 4) or (M, 4, 4) per match; pose_b: (4, 4).
    """
    pose_a = np.broadcast_to(np.asarray(pose_a, np.float64), (len(a), 4, 4))
    P_a = K[None] @ pose_a[:, :3]                       # (M, 3, 4)
    P_b = np.broadcast_to(K @ pose_b[:3], P_a.shape)
    rows = np.stack([a[:, 0:1] * P_a[:, 2] - P_a[:, 0], a[:, 1:2] * P_a[:, 2] - P_a[:, 1],
                     b[:, 0:1] * P_b[:, 2] - P_b[:, 0], b[:, 1:2] * P_b[:, 2] - P_b[:, 1]], 1)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=2, keepdims=True), 1e-12)
    Xh = np.linalg.svd(rows)[2][:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        X = Xh[:, :3] / Xh[:, 3:4]
    out = np.full_like(X, np.nan)
    ok = np.isfinite(X).all(axis=1)
    Xs = np.where(ok[:, None], X, 0.0)
    centres = []
    for R, t, P, uv in ((pose_a[:, :3, :3], pose_a[:, :3, 3], P_a, a), (pose_b[None, :3, :3], pose_b[None, :3, 3], P_b, b)):
        cam = np.einsum("mij,mj->mi", np.broadcast_to(R, (len(a), 3, 3)), Xs) + t
        ok &= cam[:, 2] > 1e-6
        proj = np.einsum("mij,mj->mi", P, np.c_[Xs, np.ones(len(Xs))])
        with np.errstate(divide="ignore", invalid="ignore"):
            proj = proj[:, :2] / proj[:, 2:3]
        ok &= np.linalg.norm(proj - uv, axis=1) <= max_reproj
        centres.append(-np.einsum("mji,mj->mi", np.broadcast_to(R, (len(a), 3, 3)), np.broadcast_to(t, (len(a), 3))))
    ra, rb = Xs - centres[0], Xs - centres[1]
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
    failed = bool(ok) and scale <= 0.0
    return {
        "registration_failed": failed,
        "note": ("registration failed: the least-squares scale of the recovered translations onto the "
                 "requested ones is <= 0 (the recovered path moves against, or across, the requested one)"
                 if failed else None),
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
