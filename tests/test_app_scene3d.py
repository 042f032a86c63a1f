"""The app's 3D keyframe view (ex4d.app.scene3d): conventions, server lifecycle, edits, real browser."""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("viser", reason="the [app] extra (viser) is not installed")

from browser_util import browser_page, off_host, wait_for  # noqa: E402

from ex4d.app import scene3d  # noqa: E402
from ex4d.app.scene3d import (SceneView, cam_from_world_of_node, frustum_scale, node_pose,  # noqa: E402
                              path_indices, subsample, vertical_fov, viewer_camera)
from ex4d.camera.poses import look_at  # noqa: E402
from ex4d.camera.presets import orbit  # noqa: E402
from ex4d.conventions import reference_intrinsics  # noqa: E402

K = reference_intrinsics(64, 96)
SIZE = (64, 96)


def _pose(rotation_world_from_cam, centre) -> np.ndarray:
    """cam_from_world (4, 4) of a camera with the given world_from_cam rotation and centre."""
    rotation = np.asarray(rotation_world_from_cam, dtype=np.float64)
    pose = np.eye(4)
    pose[:3, :3] = rotation.T
    pose[:3, 3] = -rotation.T @ np.asarray(centre, dtype=np.float64)
    return pose


def _same_rotation(q_a, q_b) -> bool:
    return np.allclose(q_a, q_b, atol=1e-12) or np.allclose(q_a, -np.asarray(q_b), atol=1e-12)


# --- conventions, by hand ----------------------------------------------------------------------------

def test_camera_looking_along_z_is_placed_at_its_centre_unrotated():
    # A camera at (1, 2, 3) looking along world +z: cam_from_world = [I | -c].
    pose = _pose(np.eye(3), (1.0, 2.0, 3.0))
    assert np.allclose(pose[:3, 3], (-1, -2, -3))
    wxyz, position = node_pose(pose)
    assert _same_rotation(wxyz, (1.0, 0.0, 0.0, 0.0))
    assert np.allclose(position, (1.0, 2.0, 3.0))
    assert np.allclose(cam_from_world_of_node(wxyz, position), pose)


def test_ninety_degree_yaw_to_world_plus_x():
    # The camera turns to look along world +x, keeping y down: its axes in world coordinates are
    # x' = (0, 0, -1), y' = (0, 1, 0), z' = (1, 0, 0), a +90 degree turn about y.
    rotation = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # columns x', y', z'
    pose = _pose(rotation, (0.5, 0.0, -2.0))
    # A world point 5 in front of the camera along +x lands on its optical axis at z = 5.
    assert np.allclose(pose @ np.array([5.5, 0.0, -2.0, 1.0]), (0, 0, 5, 1))
    wxyz, position = node_pose(pose)
    half = math.sqrt(0.5)
    assert _same_rotation(wxyz, (half, 0.0, half, 0.0))     # cos 45, sin 45 about +y
    assert np.allclose(position, (0.5, 0.0, -2.0))
    assert np.allclose(cam_from_world_of_node(wxyz, position), pose)
    # The preset code's look_at gives the same camera.
    assert np.allclose(look_at(np.array([0.5, 0.0, -2.0]), np.array([4.0, 0.0, -2.0])), pose)


def test_viewer_camera_keeps_view_direction_roll_and_fov():
    rotation = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    view = viewer_camera(_pose(rotation, (0.5, 0.0, -2.0)), K, SIZE, look_distance=4.0)
    assert np.allclose(view["position"], (0.5, 0.0, -2.0))
    assert np.allclose(view["look_at"], (4.5, 0.0, -2.0))
    assert np.allclose(view["up_direction"], (0.0, -1.0, 0.0))   # image up is -y in OpenCV
    assert view["fov"] == pytest.approx(2 * math.atan(32 / 500))
    # A 90 degree roll about the optical axis: image up becomes world -x.
    rolled = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # x' = +y, y' = -x
    assert np.allclose(viewer_camera(_pose(rolled, (0, 0, 0)), K, SIZE, 1.0)["up_direction"], (1.0, 0.0, 0.0))


def test_random_poses_round_trip():
    rng = np.random.default_rng(3)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        pose = cam_from_world_of_node(q, rng.normal(size=3))
        assert np.allclose(cam_from_world_of_node(*node_pose(pose)), pose, atol=1e-12)


def test_vertical_fov_subsample_and_path_marks():
    assert vertical_fov(reference_intrinsics(512, 512), (512, 512)) == pytest.approx(2 * math.atan(256 / 500))
    points = np.arange(30, dtype=np.float32).reshape(10, 3)
    colors = np.arange(30, dtype=np.uint8).reshape(10, 3)
    kept, kept_colors = subsample(points, colors, cap=4)
    assert kept.shape == (4, 3) and np.array_equal(kept[:, 0] // 3, kept_colors[:, 0] // 3)
    assert np.array_equal(kept, subsample(points, colors, cap=4)[0])     # deterministic
    assert subsample(points, colors, cap=10)[0] is points
    assert list(path_indices(49, 16)) == list(range(0, 49, 4))         # 48 is a multiple of 4
    assert list(path_indices(50, 16)) == list(range(0, 50, 4)) + [49]
    assert list(path_indices(1)) == [0]


def test_frustum_scale_undoes_viewers_unit_volume():
    # viser draws x = tan(fov/2) * aspect, y = tan(fov/2), z = 1, divided by cbrt(x y z / 3), times scale.
    # fov 90 degrees and aspect 3: x y z / 3 = 1, so the scale is the depth itself.
    assert frustum_scale(0.5, math.pi / 2, 3.0) == pytest.approx(0.5)
    # fov 60 degrees, aspect 1: tan(30)^2 / 3 = 1/9, so depth = scale * 9 ** (1/3).
    assert frustum_scale(2.0, math.pi / 3, 1.0) == pytest.approx(2.0 / 9 ** (1 / 3))


# --- the server ----------------------------------------------------------------------------------------

def _wait_threads_back(before: set, timeout: float = 10.0) -> set:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        extra = {t for t in threading.enumerate() if t not in before and t.is_alive()}
        if not extra:
            return extra
        time.sleep(0.05)
    return extra


def test_starts_on_a_free_port_serves_and_stops_without_leaking_threads():
    before = set(threading.enumerate())
    first, second = SceneView(), SceneView()
    try:
        assert first.url.startswith("http://127.0.0.1:") and first.url != second.url
        with urllib.request.urlopen(first.url, timeout=10) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        first.close()
        second.close()
        first.close()       # idempotent
    assert not _wait_threads_back(before), "viser threads still alive after close()"
    with pytest.raises(OSError):
        urllib.request.urlopen(first.url, timeout=2)


@pytest.fixture
def view():
    view = SceneView()
    yield view
    view.close()


def _show_orbit(view: SceneView, keyframes=None) -> np.ndarray:
    path = orbit(30.0, 0.0, 17, 4.0)
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (500, 3)).astype(np.float32) + np.float32([0, 0, 4])
    view.set_scene(points, rng.integers(0, 256, (500, 3), dtype=np.uint8))
    keyframes = [(0, path[0]), (16, path[16])] if keyframes is None else keyframes
    view.set_cameras(K, SIZE, np.eye(4), path, keyframes)
    return path


def _frames(keyframes) -> list[int]:
    return [frame for frame, _ in keyframes]


def test_edits_call_back_with_the_whole_keyframe_list(view):
    path = _show_orbit(view)
    heard = []
    view.on_keyframes_edited(heard.append)

    view.set_frame(8)
    view.add_keyframe(8)                                   # what the panel's "Add keyframe at frame" does
    assert _frames(heard[-1]) == [0, 8, 16]
    assert np.allclose(heard[-1][1][1], path[8])           # at the path's pose of that frame

    moved = path[8].copy()
    moved[:3, 3] += (0.25, 0.0, 0.0)
    view.move_keyframe(8, moved)
    assert _frames(heard[-1]) == [0, 8, 16] and np.allclose(heard[-1][1][1], moved)

    view.select_keyframe(16)
    view.delete_keyframe()                                 # the panel's "Delete keyframe": the selected one
    assert _frames(heard[-1]) == [0, 8]
    assert len(heard) == 3
    assert _frames(view.keyframes()) == [0, 8]

    view.delete_keyframe(5)                                # no keyframe there: nothing to tell
    view.move_keyframe(5, moved)
    assert len(heard) == 3


def test_gizmo_drag_moves_the_selected_keyframe_once_at_release(view):
    path = _show_orbit(view)
    heard = []
    view.on_keyframes_edited(heard.append)
    view.select_keyframe(16)
    wxyz, position = node_pose(path[16])
    assert np.allclose(view._gizmo.position, position)   # the gizmo sits on the selected keyframe

    target = _pose(np.eye(3), (1.0, -0.5, 0.5))
    view._gizmo.wxyz, view._gizmo.position = node_pose(target)
    view._on_gizmo(SimpleNamespace(phase="update"))        # dragging: the frustum follows, no callback
    assert heard == []
    assert np.allclose(view._key_nodes[16].position, (1.0, -0.5, 0.5))
    view._on_gizmo(SimpleNamespace(phase="end"))           # released
    assert len(heard) == 1 and _frames(heard[0]) == [0, 16]
    assert np.allclose(heard[0][1][1], target, atol=1e-12)


def test_callback_may_call_set_cameras_back_and_a_failing_one_does_not_stop_others(view):
    path = _show_orbit(view)
    heard = []

    def app_callback(keyframes):        # what the app does: re-interpolate, then redraw
        heard.append(keyframes)
        view.set_cameras(K, SIZE, np.eye(4), path, keyframes)

    def broken(keyframes):
        raise RuntimeError("app bug")

    view.on_keyframes_edited(broken)
    view.on_keyframes_edited(app_callback)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (view.add_keyframe(4), done.set()))   # as viser's thread
    worker.start()
    assert done.wait(20), "deadlock: a callback calling set_cameras back never returned"
    assert _frames(heard[0]) == [0, 4, 16] and _frames(view.keyframes()) == [0, 4, 16]


def test_bad_calls_are_refused(view):
    with pytest.raises(ValueError, match="differ in length"):
        view.set_scene(np.zeros((4, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(T, 4, 4\)"):
        view.set_cameras(K, SIZE, np.eye(4), np.eye(4), [])
    with pytest.raises(ValueError, match="keyframe 3"):
        view.set_cameras(K, SIZE, np.eye(4), np.eye(4)[None], [(3, np.full((4, 4), np.nan))])


def test_scene_is_capped_and_a_mesh_replaces_the_points(view):
    rng = np.random.default_rng(1)
    points = rng.uniform(-1, 1, (scene3d.POINT_CAP + 10, 3)).astype(np.float32)
    points[0] = np.nan                                     # dropped, not sent
    view.set_scene(points, np.zeros_like(points, dtype=np.uint8))
    assert view._scene_node.points.shape == (scene3d.POINT_CAP, 3)
    assert np.all(np.isfinite(view._scene_node.points))
    vertices = np.array([[0, 0, 2], [1, 0, 2], [0, 1, 2]], np.float32)
    view.set_scene(vertices, np.zeros((3, 3), np.uint8), mesh=(vertices, np.array([[0, 1, 2]]),
                                                               np.full((3, 3), 200, np.uint8)))
    assert type(view._scene_node).__name__ == "GlbHandle"


# --- real browser: loads offline, connects, the panel edits keyframes -----------------------------------

def test_page_loads_offline_connects_and_the_panel_adds_a_keyframe(view, tmp_path):
    path = _show_orbit(view)
    heard = []
    view.on_keyframes_edited(heard.append)
    with browser_page() as (page, requests):
        page.goto(view.url)
        wait_for(lambda: len(view.server.get_clients()) == 1, what="the viser client to connect")
        view.set_frame(4)
        page.get_by_role("button", name="Add keyframe at frame").click(timeout=30_000)
        wait_for(lambda: heard, what="the keyframe callback")
        # Look through frame 16's camera: the browser's camera goes there and reports it back.
        view.look_through(path[16], K, SIZE)
        client = next(iter(view.server.get_clients().values()))
        want = viewer_camera(path[16], K, SIZE, view._scale)
        time.sleep(1.0)
        wait_for(lambda: np.allclose(client.camera.position, want["position"], atol=1e-3)
                 and np.allclose(client.camera.look_at, want["look_at"], atol=1e-3),
                 what="the browser's camera at frame 16's camera")
        assert client.camera.fov == pytest.approx(want["fov"], abs=1e-3)
        page.screenshot(path=str(tmp_path / "scene3d.png"))
        print(f"screenshot: {tmp_path / 'scene3d.png'}")
    assert _frames(heard[-1]) == [0, 4, 16] and np.allclose(heard[-1][1][1], path[4])
    assert not off_host(requests), f"requests left 127.0.0.1: {off_host(requests)}"
    assert any(u.startswith("ws://127.0.0.1") for u in requests)
