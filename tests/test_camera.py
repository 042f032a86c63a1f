"""Tests for ex4d.camera: reference look-at and presets, new paths, pose files, interpolation."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from ex4d.camera import PRESET_NAMES, look_at, make_trajectory, reference_gl_from_world, view_angles
from ex4d.camera.interpolate import matrix_to_quaternion, quaternion_to_matrix, resample_path, slerp
from ex4d.camera.poses import camera_centres, reference_view_matrix
from ex4d.camera.presets import PIVOT_OFFSET, scene_depths
from ex4d.conventions import OPENCV_TO_OPENGL, reference_intrinsics
from ex4d.errors import InputError
from ex4d.types import Trajectory

H, W = 48, 64
K0 = reference_intrinsics(H, W)
NEAREST = 3.0
R = NEAREST + PIVOT_OFFSET


def _depth0() -> np.ndarray:
    rng = np.random.default_rng(0)
    depth = rng.uniform(4.0, 9.0, size=(H, W))
    depth[20, 30] = NEAREST
    return depth


def _make(spec: str, num_frames: int = 49, **kwargs) -> Trajectory:
    return make_trajectory(spec, num_frames=num_frames, size=(H, W), K=K0, depth0=_depth0(), **kwargs)


def _spec_look_at(eye, center):
    """The spec's look-at, written out independently: V = [r; u'; f | -(r.e, u'.e, f.e)]."""
    eye, center, up = (np.asarray(v, float) for v in (eye, center, (0.0, 1.0, 0.0)))
    f = (center - eye) / np.linalg.norm(center - eye)
    r = np.cross(f, up)
    r /= np.linalg.norm(r)
    u = np.cross(r, f)
    u /= np.linalg.norm(u)
    V = np.eye(4)
    V[0, :3], V[1, :3], V[2, :3] = r, u, f
    V[:3, 3] = [-r @ eye, -u @ eye, -f @ eye]
    return V


def _rotation(axis, angle_deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * cross @ cross


def _random_rotations(n, seed=0):
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return quaternion_to_matrix(q)


# ----------------------------------------------------------------------------- look-at


def test_look_at_identity_and_reference_flip():
    center = np.array([0.0, 0.0, 2.7])
    np.testing.assert_allclose(look_at(np.zeros(3), center), np.eye(4), atol=1e-12)
    # The reference's saved matrix for the source pose is the OpenCV -> OpenGL flip.
    np.testing.assert_allclose(reference_gl_from_world(np.zeros(3), center), np.diag([1, -1, -1, 1]), atol=1e-12)
    # Before the row negation the 3x3 block is a reflection.
    assert np.linalg.det(reference_view_matrix(np.zeros(3), center)[:3, :3]) == pytest.approx(-1.0)


def test_look_at_matches_spec_formula_and_conversion():
    eye, center = np.array([1.3, -0.4, 0.9]), np.array([0.0, 0.0, 3.0])
    M = np.diag([-1.0, -1.0, -1.0, 1.0]) @ _spec_look_at(eye, center)
    np.testing.assert_allclose(reference_gl_from_world(eye, center), M, atol=1e-12)
    cam_from_world = look_at(eye, center)
    np.testing.assert_allclose(cam_from_world, np.diag([1.0, -1.0, -1.0, 1.0]) @ M, atol=1e-12)
    # The camera sits at eye and its optical axis points at the centre.
    np.testing.assert_allclose(camera_centres(cam_from_world), eye, atol=1e-12)
    in_camera = cam_from_world[:3, :3] @ center + cam_from_world[:3, 3]
    np.testing.assert_allclose(in_camera[:2], 0.0, atol=1e-12)
    assert in_camera[2] > 0


def test_look_at_degenerate_raises():
    with pytest.raises(ValueError):
        look_at(np.zeros(3), np.array([0.0, 5.0, 0.0]))
    with pytest.raises(ValueError):
        look_at(np.ones(3), np.ones(3))


# ----------------------------------------------------------------------------- reference presets


def _assert_pose_from_eye(pose, eye, center):
    """pose must be the no-roll camera at eye looking at center (image rows run down world +y)."""
    np.testing.assert_allclose(camera_centres(pose), eye, atol=1e-9)
    forward = (center - eye) / np.linalg.norm(center - eye)
    np.testing.assert_allclose(pose[2, :3], forward, atol=1e-9)
    assert abs(pose[0, 1]) < 1e-9  # camera x axis horizontal: no roll
    assert pose[1, 1] > 0  # camera y (down) has a positive world-y (down) component


@pytest.mark.parametrize("angle", [30, 60, 90, -45])
def test_integer_orbit_matches_spec_formula(angle):
    traj = _make(str(angle))
    center = np.array([0.0, 0.0, R])
    a = np.radians(np.linspace(0, angle, 49))
    eyes = np.stack([R * np.sin(a), 0.2 * R * (np.abs(np.cos(a)) - 1), R * (1 - np.abs(np.cos(a)))], axis=-1)
    np.testing.assert_allclose(traj.cam_from_world[0], np.eye(4), atol=1e-12)
    for k in (1, 12, 24, 48):
        _assert_pose_from_eye(traj.cam_from_world[k], eyes[k], center)
    assert traj.name == str(angle)
    assert traj.settings["radius"] == pytest.approx(R)
    np.testing.assert_allclose(traj.K, np.broadcast_to(K0, (49, 3, 3)))


def test_90_last_frame_yaw_and_pitch():
    yaw, pitch = view_angles(_make("90").cam_from_world)
    assert yaw[48] == pytest.approx(90.0)
    assert pitch[48] == pytest.approx(math.degrees(math.atan(0.2)))
    assert pitch[0] == pytest.approx(0.0, abs=1e-9)


def test_180_is_the_reference_loop():
    traj = _make("180")
    center = np.array([0.0, 0.0, R])
    yaw, pitch = view_angles(traj.cam_from_world)
    _assert_pose_from_eye(traj.cam_from_world[12], np.array([R, -0.2 * R, 0.0]), center)
    assert yaw[12] == pytest.approx(45.0)
    assert pitch[12] == pytest.approx(8.0498, abs=1e-3)
    _assert_pose_from_eye(traj.cam_from_world[24], np.array([0.0, -0.4 * R, 0.0]), center)
    assert pitch[24] == pytest.approx(21.801, abs=1e-3)
    assert yaw[36] == pytest.approx(-45.0)
    np.testing.assert_allclose(traj.cam_from_world[48], np.eye(4), atol=1e-9)
    assert np.abs(yaw).max() <= 45.0 + 1e-9
    assert traj.name == "180"


def test_negative_angles_mirror_positive():
    pos, neg = _make("60").cam_from_world, _make("-60").cam_from_world
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])  # x -> -x in both camera and world
    np.testing.assert_allclose(neg, mirror @ pos @ mirror, atol=1e-12)
    np.testing.assert_allclose(view_angles(neg)[0], -view_angles(pos)[0], atol=1e-9)


def test_rounds_is_one_for_any_frame_count():
    for n in (25, 81):
        yaw, _ = view_angles(_make("90", num_frames=n).cam_from_world)
        assert yaw[-1] == pytest.approx(90.0)
        assert yaw.max() == pytest.approx(90.0)
    loop = _make("180", num_frames=81).cam_from_world
    assert view_angles(loop)[0][20] == pytest.approx(45.0)  # a = pi/2 at k = 20 of 81
    np.testing.assert_allclose(loop[-1], np.eye(4), atol=1e-9)


def test_fold_beyond_90_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ex4d.camera"):
        traj = _make("135")
    assert "folds back" in caplog.text
    assert view_angles(traj.cam_from_world)[0][-1] == pytest.approx(45.0)  # |cos| fold, as the reference


@pytest.mark.parametrize("spec", list(PRESET_NAMES) + ["orbit:yaw=-120,pitch=30,ease=smooth", "135",
                                                       "dolly_zoom:direction=in,travel=0.4"])
def test_all_paths_are_proper_rotations(spec):
    traj = _make(spec)
    rotation = traj.cam_from_world[:, :3, :3]
    np.testing.assert_allclose(rotation @ np.swapaxes(rotation, 1, 2), np.broadcast_to(np.eye(3), rotation.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-12)
    np.testing.assert_allclose(traj.cam_from_world[:, 3], np.broadcast_to([0, 0, 0, 1.0], (49, 4)))
    if spec != "stereo":  # the right eye of a stereo pair never sits at the source camera (test_stereo.py)
        np.testing.assert_allclose(traj.cam_from_world[0], np.eye(4), atol=1e-9)
    json.dumps(traj.settings)  # settings must be serialisable


def test_pivot_radius_uses_the_border_push():
    depth = _depth0()
    depth[0, :] = 0.5  # the border ring is pushed to 100, so this does not count
    depth[5, 5] = np.nan  # invalid pixels from a user file are ignored
    nearest, radius = scene_depths(depth, (H, W))
    assert nearest == pytest.approx(NEAREST)
    assert radius == pytest.approx(NEAREST + 0.15)
    assert scene_depths(np.full((H, W), 400.0), (H, W))[0] == pytest.approx(100.0)
    with pytest.raises(InputError, match="shape"):
        scene_depths(depth, (W, H))
    with pytest.raises(InputError, match="no valid"):
        scene_depths(np.zeros((H, W)), (H, W))


# ----------------------------------------------------------------------------- new paths


def test_zoom_in_stops_before_the_nearest_surface():
    depth = _depth0()
    traj = _make("zoom_in")
    z_cam = camera_centres(traj.cam_from_world)[:, 2]
    assert z_cam[-1] == pytest.approx(0.5 * NEAREST)
    assert np.all(np.diff(z_cam) > 0) and np.all(z_cam < NEAREST)
    # Every frame-0 surface point stays in front of every camera of the path.
    v, u = np.mgrid[1:H - 1, 1:W - 1]
    points = np.stack([(u - K0[0, 2]) / K0[0, 0], (v - K0[1, 2]) / K0[1, 1], np.ones_like(u, float)], -1)
    points = points * depth[1:-1, 1:-1, None]
    for pose in traj.cam_from_world:
        assert (points @ pose[:3, :3].T + pose[:3, 3])[..., 2].min() >= 0.5 * NEAREST - 1e-9
    deepest = _make("zoom_in:travel=0.9")
    assert camera_centres(deepest.cam_from_world)[-1, 2] < NEAREST
    with pytest.raises(InputError, match="travel"):
        _make("zoom_in:travel=1.2")


def test_zoom_out_moves_back():
    z_cam = camera_centres(_make("zoom_out").cam_from_world)[:, 2]
    assert z_cam[-1] == pytest.approx(-0.5 * R)
    assert np.all(np.diff(z_cam) < 0)


@pytest.mark.parametrize("spec", ["dolly_zoom", "dolly_zoom:direction=in,travel=0.8"])
def test_dolly_zoom_keeps_the_pivot_size(spec):
    traj = _make(spec)
    pivot_points = np.array([[0.0, 0.0, R], [0.4, -0.3, R]])
    background = np.array([[0.0, 0.0, 3 * R], [0.4, -0.3, 3 * R]])
    sizes, bg_sizes = [], []
    for pose, K in zip(traj.cam_from_world, traj.K):
        for pts, out in ((pivot_points, sizes), (background, bg_sizes)):
            cam = pts @ pose[:3, :3].T + pose[:3, 3]
            pix = (cam[:, :2] / cam[:, 2:]) * [K[0, 0], K[1, 1]] + K[:2, 2]
            out.append(np.linalg.norm(pix[1] - pix[0]))
    np.testing.assert_allclose(sizes, sizes[0], rtol=1e-10)
    assert abs(bg_sizes[-1] - bg_sizes[0]) > 0.1 * bg_sizes[0]  # the background really changes
    assert traj.K[:, 0, 0].std() > 0 and np.allclose(traj.K[:, :2, 2], K0[:2, 2])


def test_general_orbit():
    traj = _make("orbit:yaw=60,pitch=15")
    assert traj.name == "orbit_yaw60_pitch15"
    distance = np.linalg.norm(camera_centres(traj.cam_from_world) - [0, 0, R], axis=-1)
    np.testing.assert_allclose(distance, R, atol=1e-12)
    yaw, pitch = view_angles(traj.cam_from_world)
    assert yaw[-1] == pytest.approx(60.0) and pitch[-1] == pytest.approx(15.0)
    np.testing.assert_allclose(np.diff(yaw), 60.0 / 48)  # linear in angle by default
    wide = _make("orbit:yaw=30,radius=2x,ease=smooth")
    assert wide.settings["radius"] == pytest.approx(2 * R)
    assert wide.name == "orbit_yaw30_radius2x_smooth"
    yaw_s = view_angles(wide.cam_from_world)[0]
    assert yaw_s[-1] == pytest.approx(30.0) and yaw_s[1] < 30.0 / 48  # eased start
    fixed = _make("orbit:pitch=-10,radius=5")
    np.testing.assert_allclose(np.linalg.norm(camera_centres(fixed.cam_from_world) - [0, 0, 5], axis=-1), 5.0)


# ----------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize("spec, fragment", [
    ("sideways", "'sideways'"),
    ("orbit", "yaw="),
    ("orbit:", "nothing after"),
    ("orbit:yaw=abc", "'abc'"),
    ("orbit:yaw=10,roll=5", "'roll'"),
    ("orbit:yaw=10,yaw=5", "twice"),
    ("orbit:yaw=10,pitch=95", "pitch"),
    ("orbit:yaw 10", "key=value"),
    ("zoom_in:ease=fast", "'fast'"),
    ("dolly_zoom:direction=up", "'up'"),
    ("", "empty"),
])
def test_bad_specs_are_input_errors(spec, fragment):
    with pytest.raises(InputError) as info:
        _make(spec)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_bad_spec_lists_valid_forms():
    with pytest.raises(InputError, match="Valid forms: .*zoom_in.*orbit:yaw"):
        _make("zoom")


def test_missing_pose_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        _make(str(tmp_path / "nope.npz"))
    other = tmp_path / "path.txt"
    other.write_text("1 2 3")
    with pytest.raises(InputError, match="unsupported"):
        _make(str(other))


# ----------------------------------------------------------------------------- pose files


def test_npz_with_cam_from_world_and_per_frame_K(tmp_path):
    poses = _make("orbit:yaw=40,pitch=5").cam_from_world
    K = np.repeat(K0[None], 49, axis=0)
    K[:, 0, 0] = np.linspace(500, 600, 49)
    np.savez(tmp_path / "mine.npz", cam_from_world=poses, K=K)
    traj = _make(str(tmp_path / "mine.npz"))
    np.testing.assert_allclose(traj.cam_from_world, poses, atol=1e-12)
    np.testing.assert_allclose(traj.K, K)
    assert traj.name == "mine" and traj.settings["format"] == "ex4d"
    np.savez(tmp_path / "noK.npz", cam_from_world=poses.astype(np.float32))
    np.testing.assert_allclose(_make(str(tmp_path / "noK.npz")).K[7], K0)


def test_reference_npz_is_accepted(tmp_path):
    r = 2.5901 + 0.15
    a = np.linspace(0, 2 * np.pi, 49)
    eyes = np.stack([r * np.sin(a), 0.2 * r * (np.cos(a) - 1), np.zeros(49)], axis=-1)
    M = np.stack([np.diag([-1.0, -1, -1, 1]) @ _spec_look_at(e, (0, 0, r)) for e in eyes]).astype(np.float32)
    np.testing.assert_allclose(M[0], np.diag([1, -1, -1, 1]), atol=1e-6)
    np.savez(tmp_path / "camera_180.npz", extrinsics=M, intrinsics=K0.astype(np.float32))
    traj = _make(str(tmp_path / "camera_180.npz"))
    assert traj.settings["format"] == "reference" and traj.name == "camera_180"
    np.testing.assert_allclose(traj.cam_from_world, OPENCV_TO_OPENGL @ M.astype(np.float64), atol=1e-6)
    yaw, _ = view_angles(traj.cam_from_world)
    assert yaw[12] == pytest.approx(45.0, abs=1e-4)
    np.testing.assert_allclose(traj.cam_from_world[0], np.eye(4), atol=1e-6)


@pytest.mark.parametrize("spec", ["dolly_zoom", "-30"])
def test_save_load_round_trip(tmp_path, spec):
    original = _make(spec)
    path = original.save(tmp_path / f"camera_{original.name}.npz")
    loaded = _make(str(path))
    np.testing.assert_array_equal(loaded.cam_from_world, original.cam_from_world)
    np.testing.assert_array_equal(loaded.K, original.K)
    assert loaded.settings["source_name"] == original.name
    assert loaded.name == f"camera_{original.name}"  # never the name the input file was written under


def test_wrong_pose_count_and_resample(tmp_path):
    poses = _make("orbit:yaw=90").cam_from_world[::4]  # 13 poses
    np.savez(tmp_path / "short.npz", cam_from_world=poses, K=K0)
    with pytest.raises(InputError, match="13 camera poses .* 49 frames.*--resample"):
        _make(str(tmp_path / "short.npz"))
    traj = _make(str(tmp_path / "short.npz"), resample=True)
    assert traj.num_frames == 49 and traj.settings["resampled"]
    np.testing.assert_allclose(traj.cam_from_world[::4], poses, atol=1e-9)  # keys kept where they fall
    yaw = view_angles(traj.cam_from_world)[0]
    assert yaw[2] == pytest.approx(3.75, abs=1e-6)  # SLERP halfway between 0 and 7.5 degrees


def test_bad_npz_files(tmp_path):
    np.savez(tmp_path / "keys.npz", poses=np.tile(np.eye(4), (49, 1, 1)))
    with pytest.raises(InputError, match="expected 'cam_from_world'"):
        _make(str(tmp_path / "keys.npz"))
    skew = np.tile(np.eye(4), (49, 1, 1))
    skew[3, 0, 0] = 2.0
    np.savez(tmp_path / "skew.npz", cam_from_world=skew)
    with pytest.raises(InputError, match="pose 3 is not a rigid transform"):
        _make(str(tmp_path / "skew.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        _make(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "badK.npz", cam_from_world=np.tile(np.eye(4), (49, 1, 1)), K=np.eye(2))
    with pytest.raises(InputError, match="intrinsics"):
        _make(str(tmp_path / "badK.npz"))


def _write_json(tmp_path, doc, name="path.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_json_keyframes_positions_and_focal(tmp_path):
    doc = {"keyframes": [
        {"time": 0.0, "position": [0, 0, 0]},
        {"time": 0.5, "position": [1.0, 0, 0], "look_dir": [0, 0, 1], "focal": 600},
        {"time": 1.0, "position": [1.0, -0.5, 1.0], "look_at": [0, 0, 4]},
    ]}
    traj = _make(_write_json(tmp_path, doc))
    centres = camera_centres(traj.cam_from_world)
    np.testing.assert_allclose(traj.cam_from_world[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(centres[24], [1.0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(centres[12], [0.5, 0, 0], atol=1e-12)  # linear centres
    np.testing.assert_allclose(traj.cam_from_world[24, :3, :3], np.eye(3), atol=1e-12)
    # Frame 12 is SLERP halfway between the identity (looking at the pivot on the axis) and identity.
    np.testing.assert_allclose(traj.cam_from_world[12, :3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(traj.cam_from_world[48], look_at(np.array([1.0, -0.5, 1.0]), np.array([0, 0, 4.0])),
                               atol=1e-12)
    assert traj.K[24, 0, 0] == pytest.approx(600) and traj.K[12, 0, 0] == pytest.approx(550)
    assert traj.K[0, 0, 0] == pytest.approx(500) and traj.K[48, 1, 1] == pytest.approx(500)
    assert traj.name == "path"


def test_json_orbit_keyframes_follow_the_arc(tmp_path):
    doc = [{"yaw": 0, "pitch": 0}, {"yaw": 90, "pitch": 20}]  # no times: evenly spaced
    traj = _make(_write_json(tmp_path, doc))
    distance = np.linalg.norm(camera_centres(traj.cam_from_world) - [0, 0, R], axis=-1)
    np.testing.assert_allclose(distance, R, atol=1e-12)
    np.testing.assert_allclose(traj.cam_from_world, _make("orbit:yaw=90,pitch=20").cam_from_world, atol=1e-12)


def test_json_slerp_between_explicit_rotations(tmp_path):
    end = np.eye(4)
    end[:3, :3] = _rotation([0, 1, 0], 80)
    doc = {"time_unit": "frame", "keyframes": [
        {"time": 0, "cam_from_world": np.eye(4).tolist()}, {"time": 48, "cam_from_world": end.tolist()}]}
    traj = _make(_write_json(tmp_path, doc))
    np.testing.assert_allclose(traj.cam_from_world[24, :3, :3], _rotation([0, 1, 0], 40), atol=1e-12)
    np.testing.assert_allclose(traj.cam_from_world[12, :3, :3], _rotation([0, 1, 0], 20), atol=1e-12)
    doc["keyframes"][1]["time"] = 96
    with pytest.raises(InputError, match="frame 96"):
        _make(_write_json(tmp_path, doc))
    stretched = _make(_write_json(tmp_path, doc), resample=True)
    np.testing.assert_allclose(stretched.cam_from_world, traj.cam_from_world, atol=1e-12)


@pytest.mark.parametrize("doc, fragment", [
    ([], "non-empty"),
    ({"keyframes": [{"time": 0, "position": [0, 0]}]}, "3 finite numbers"),
    ({"keyframes": [{"time": 0.5, "yaw": 1}, {"time": 0.2, "yaw": 2}]}, "strictly increasing"),
    ({"keyframes": [{"time": 0, "yaw": 1}, {"yaw": 2}]}, "every keyframe or on none"),
    ({"keyframes": [{"time": 0, "position": [0, 0, 0], "yaw": 3}]}, "not both"),
    ({"keyframes": [{"time": 0, "posiiton": [0, 0, 0]}]}, "posiiton"),
    ({"keyframes": [{"time": 0, "yaw": 0}], "speed": 2}, "speed"),
    ({"keyframes": [{"time": 0, "yaw": 0}, {"time": 1.5, "yaw": 1}]}, r"\[0, 1\]"),
    ({"keyframes": [{"yaw": 0, "focal": -3}]}, "focal"),
])
def test_bad_json_files(tmp_path, doc, fragment):
    with pytest.raises(InputError, match=fragment):
        _make(_write_json(tmp_path, doc))


def test_invalid_json_text(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{\"keyframes\": [")
    with pytest.raises(InputError, match="not valid JSON"):
        _make(str(path))


# ----------------------------------------------------------------------------- interpolation


def test_quaternion_round_trip_including_half_turns():
    rotations = np.concatenate([_random_rotations(64), np.stack([_rotation(ax, 180) for ax in np.eye(3)]),
                                np.stack([_rotation([1, 1, 0], 179.9999), np.eye(3)])])
    quats = matrix_to_quaternion(rotations)
    np.testing.assert_allclose(np.linalg.norm(quats, axis=-1), 1.0)
    np.testing.assert_allclose(quaternion_to_matrix(quats), rotations, atol=1e-10)


def test_slerp_constant_angular_speed_and_short_arc():
    q0 = matrix_to_quaternion(np.eye(3))
    q1 = matrix_to_quaternion(_rotation([0, 0, 1], 120))
    for t in (0.25, 0.5, 0.9):
        np.testing.assert_allclose(quaternion_to_matrix(slerp(q0, q1, t)), _rotation([0, 0, 1], 120 * t), atol=1e-12)
    # -q1 is the same rotation; SLERP must still take the short way.
    np.testing.assert_allclose(quaternion_to_matrix(slerp(q0, -q1, 0.5)), _rotation([0, 0, 1], 60), atol=1e-12)


def test_slerp_matches_scipy():
    transform = pytest.importorskip("scipy.spatial.transform")
    rotations = _random_rotations(2, seed=3)
    ours = quaternion_to_matrix(slerp(*matrix_to_quaternion(rotations), np.linspace(0, 1, 7)))
    reference = transform.Slerp([0, 1], transform.Rotation.from_matrix(rotations))(np.linspace(0, 1, 7))
    np.testing.assert_allclose(ours, reference.as_matrix(), atol=1e-10)


def test_resample_single_pose_is_repeated():
    pose = look_at(np.array([0.3, 0.0, 0.0]), np.array([0.0, 0.0, 3.0]))[None]
    poses, K = resample_path(pose, K0[None], 5)
    np.testing.assert_allclose(poses, np.repeat(pose, 5, axis=0), atol=1e-12)
    assert K.shape == (5, 3, 3)


# --- hostile pose files: every failure is a one-line InputError naming the file

_HOSTILE_JSON = {
    "deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "huge-int-yaw": ('{"pivot": [0, 0, 2], "keyframes": [{"yaw": 1%s}]}' % ("0" * 400), "finite number"),
    "huge-int-position": ('[{"position": [1%s, 0, 0], "look_at": [0, 0, 1]}]' % ("0" * 400), "finite numbers"),
    "tiny-radius": ('{"pivot": [0, 0, 2], "keyframes": [{"yaw": 0, "radius": 1e-320}]}', "radius"),
    "huge-radius-arc": ('{"pivot": [0, 0, 2], "keyframes": [{"yaw": 10, "radius": 1e300}, {"yaw": 20}]}', "radius"),
}


@pytest.mark.parametrize("name", sorted(_HOSTILE_JSON))
def test_hostile_json_pose_files_are_input_errors(tmp_path, name):
    text, fragment = _HOSTILE_JSON[name]
    path = tmp_path / f"{name}.json"
    path.write_text(text)
    with pytest.raises(InputError, match=fragment) as info:
        _make(str(path), num_frames=5, resample=True)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_maths_errors_in_a_pose_file_become_input_errors(tmp_path, monkeypatch):
    """Whatever a file provokes in the maths (here a degenerate orbit arc) names the file."""
    from ex4d.camera import posefile

    path = tmp_path / "arc.json"
    path.write_text('{"pivot": [0, 0, 2], "keyframes": [{"yaw": 10}, {"yaw": 20}]}')

    original = posefile.orbit_eye

    def broken(yaw, *args, **kwargs):  # fails only along the arc between the keyframes
        if np.ndim(yaw):
            raise ValueError("look-at: eye and center coincide")
        return original(yaw, *args, **kwargs)

    monkeypatch.setattr(posefile, "orbit_eye", broken)
    with pytest.raises(InputError, match="cannot use camera path file .*arc.json"):
        _make(str(path), num_frames=5)


def test_complex_poses_are_refused(tmp_path):
    path = tmp_path / "complex.npz"
    np.savez(path, cam_from_world=np.repeat(np.eye(4, dtype=complex)[None], 5, axis=0))
    with pytest.raises(InputError, match="real numbers"):
        _make(str(path), num_frames=5)


def test_check_spec_fails_early_without_a_clip(tmp_path):
    from ex4d.camera.trajectory import check_spec

    check_spec("90")
    check_spec("orbit:yaw=30,pitch=10")
    with pytest.raises(InputError, match="travel"):
        check_spec("zoom_in:travel=5")
    with pytest.raises(InputError, match="not found"):
        check_spec(str(tmp_path / "missing.json"))
    two = tmp_path / "two.npz"
    np.savez(two, cam_from_world=np.repeat(np.eye(4)[None], 2, axis=0))
    check_spec(str(two))  # no frame count given: only the file itself is checked
    with pytest.raises(InputError, match="--resample"):
        check_spec(str(two), num_frames=5)
    check_spec(str(two), num_frames=5, resample=True)
    # Keyframes that need the scene's pivot are left for the real build (which knows the depth).
    needs_pivot = tmp_path / "yaw.json"
    needs_pivot.write_text('[{"yaw": 0}, {"yaw": 30}]')
    check_spec(str(needs_pivot), num_frames=5)


@pytest.mark.parametrize("spec", ["90", "-30", "22.5", "180", "zoom_in", "orbit:yaw=30,pitch=10,radius=2x",
                                  "dolly_zoom:direction=in,travel=0.3", "zoom_out:ease=smooth", "my/path.json"])
def test_trajectory_name_without_building(spec, tmp_path):
    """run checks ex4d_<name>.mp4 before recon, so the name must match the one the built path gets."""
    from ex4d.camera.trajectory import trajectory_name

    if spec.endswith(".json"):
        path = tmp_path / "my path.json"
        path.write_text('[{"position": [0, 0, 0], "look_dir": [0, 0, 1]}]')
        spec = str(path)
    assert trajectory_name(spec) == _make(spec, num_frames=5).name


@pytest.mark.parametrize("spec, fragment", [
    ("orbit:yaw=" + "9" * 400, "too large"),
    ("orbit:yaw=30,radius=" + "9" * 400 + "x", "too large"),
    ("orbit:yaw=30,radius=0.0000000000000000000000001", "radius"),
    ("orbit:yaw=30,radius=99999999999", "radius"),
    ("zoom_out:travel=1000", "at most 100"),
    ("dolly_zoom:travel=1000", "at most 100"),
])
def test_extreme_path_parameters_are_input_errors(spec, fragment):
    with pytest.raises(InputError, match=fragment):
        _make(spec, num_frames=5)
