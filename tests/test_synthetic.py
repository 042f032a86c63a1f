"""Analytic checks of the synthetic ray-caster, visibility oracle, make_example and ``ex4d synth``."""

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.conventions import reference_intrinsics
from ex4d.errors import InputError
from ex4d.io.video import read_video
from ex4d.synthetic import (
    SCENES,
    Box,
    Plane,
    Scene,
    Sphere,
    Texture,
    get_scene,
    make_example,
    observability,
    render_ground_truth,
    render_view,
)

H = W = 64


def translation(eye):
    """cam_from_world of a camera at ``eye`` with the source orientation."""
    cam_from_world = np.eye(4)
    cam_from_world[:3, 3] = -np.asarray(eye, dtype=np.float64)
    return cam_from_world


def wide_K(focal=50.0):
    """A wide 64x64 camera (f = 50) so that small objects cover a known pixel block."""
    return np.array([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1.0]])


def test_fronto_parallel_plane_depth_is_constant():
    scene = Scene("wall", [Plane(axis=2, position=5.0)])
    view = render_view(scene, 0, np.eye(4), reference_intrinsics(H, W), (H, W))
    assert view["hit"].all()
    np.testing.assert_allclose(view["depth"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(view["points"][..., 2], 5.0, rtol=1e-12)
    # A camera moved 1 towards the wall and sideways sees the same plane at z = 4 everywhere.
    moved = render_view(scene, 0, translation([0.3, -0.2, 1.0]), reference_intrinsics(H, W), (H, W))
    np.testing.assert_allclose(moved["depth"], 4.0, rtol=1e-6)
    assert view["rgb"].dtype == np.float32 and view["rgb"].shape == (H, W, 3)
    assert 0.0 <= view["rgb"].min() and view["rgb"].max() <= 1.0


def test_sphere_nearest_depth_matches_formula():
    center, radius = np.array([0.0, 0.0, 5.0]), 1.0
    scene = Scene("ball", [Sphere(center=tuple(center), radius=radius)])
    view = render_view(scene, 0, np.eye(4), wide_K(), (H, W))
    # The pixel (32, 32) is on the optical axis (integer centres, c = W/2): depth = 5 - 1.
    assert view["depth"][32, 32] == pytest.approx(4.0, rel=1e-6)
    assert view["depth"][view["hit"]].min() == pytest.approx(4.0, rel=1e-6)
    # Hit pixels are exactly those whose ray passes within the radius of the centre.
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    rays = np.stack([(u - 32) / 50.0, (v - 32) / 50.0, np.ones_like(u, dtype=float)], -1)
    unit = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    miss_distance = np.linalg.norm(np.cross(unit, center), axis=-1)
    np.testing.assert_array_equal(view["hit"], miss_distance <= radius)
    # Every hit is on the sphere, on the side facing the camera.
    points = view["points"][view["hit"]]
    np.testing.assert_allclose(np.linalg.norm(points - center, axis=-1), radius, rtol=1e-9)
    assert np.all(np.einsum("ij,ij->i", points - center, points) < 0)


def test_box_covers_its_projected_rectangle():
    scene = Scene("box", [Box(lo=(-0.5, -0.5, 4.0), hi=(0.5, 0.5, 5.0))])
    view = render_view(scene, 0, np.eye(4), wide_K(), (H, W))
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    expected = (np.abs(u - 32) <= 6.25) & (np.abs(v - 32) <= 6.25)  # 0.5 / 4 * 50 px
    np.testing.assert_array_equal(view["hit"], expected)
    np.testing.assert_allclose(view["depth"][expected], 4.0, rtol=1e-6)
    assert np.all(np.isinf(view["depth"][~expected]))
    assert np.all(view["primitive"][~expected] == -1)


@pytest.mark.parametrize("name", sorted(SCENES))
@pytest.mark.parametrize("size", [(H, W), (96, 96), (50, 70)])
def test_source_view_is_fully_observable(name, size):
    K = reference_intrinsics(*size)
    for frame in (0, 9):
        assert observability(name, frame, np.eye(4), K, size).all()


def test_occluded_region_seen_from_moved_camera_is_not_observable():
    # A box in front of a wall; from the source it hides the wall for |x| <= 0.5 * 10 / 4 = 1.25.
    scene = Scene("occluder", [Plane(axis=2, position=10.0), Box(lo=(-0.5, -0.5, 4.0), hi=(0.5, 0.5, 4.2))])
    K = wide_K()
    target = translation([2.0, 0.0, 0.0])
    view = render_view(scene, 0, target, K, (H, W))
    obs = observability(scene, 0, target, K, (H, W), K_src=K, size_src=(H, W))
    # Pixel (27, 32) of the target looks at the wall point (1, 0, 10): hidden behind the box
    # from the source (|1| < 1.25), not hidden from the target (its ray passes x = 1.6 at z = 4).
    assert view["depth"][32, 27] == pytest.approx(10.0)
    np.testing.assert_allclose(view["points"][32, 27], [1.0, 0.0, 10.0], atol=1e-9)
    assert not obs[32, 27]
    # Pixel (37, 32) looks at the wall point (3, 0, 10): seen by both cameras.
    np.testing.assert_allclose(view["points"][32, 37], [3.0, 0.0, 10.0], atol=1e-9)
    assert obs[32, 37]
    # The box's front face is seen by both, its side face (x = 0.5) only by the target.
    front = view["primitive"] == 1
    side = front & np.isclose(view["points"][..., 0], 0.5)
    assert obs[front & ~side].all() and obs[front & ~side].any()
    assert side.any() and not obs[side].any()


def test_points_outside_the_source_frame_are_not_observable():
    scene = Scene("wall", [Plane(axis=2, position=5.0)])
    K = reference_intrinsics(H, W)  # 64 px at f = 500: the source sees |x| <= 0.32 at z = 5
    obs = observability(scene, 0, translation([1.0, 0.0, 0.0]), K, (H, W))
    assert not obs.any()


def test_make_example_shapes_depth_range_and_metadata():
    for name in SCENES:
        clip, depth = make_example(name, num_frames=3, size=(H, W + 16))
        assert clip.frames.shape == (3, H, W + 16, 3) and clip.frames.dtype == np.float32
        assert depth.depth.shape == (3, H, W + 16) and depth.valid.all()
        np.testing.assert_allclose(depth.K, reference_intrinsics(H, W + 16))
        assert depth.estimator == f"synthetic:{name}"
        # Reference-like depths: nearest surface ~2.5-4, nothing beyond the back wall (z = 12).
        assert 2.5 <= depth.depth.min() <= 4.0 and depth.depth.max() <= 12.0 + 1e-4
        assert clip.frames.std() > 0.1  # textured, so that PSNR means something


def test_dynamic_scene_moves_and_static_scene_does_not():
    _, moving = make_example("spheres_moving", num_frames=4, size=(H, W))
    _, still = make_example("boxes", num_frames=4, size=(H, W))
    assert get_scene("spheres_moving").dynamic and not get_scene("boxes").dynamic
    assert np.abs(moving.depth[3] - moving.depth[0]).max() > 0.1
    np.testing.assert_array_equal(still.depth[3], still.depth[0])


def test_make_example_is_deterministic():
    a_clip, a_depth = make_example("spheres_moving", num_frames=2, size=(32, 32))
    b_clip, b_depth = make_example("spheres_moving", num_frames=2, size=(32, 32))
    np.testing.assert_array_equal(a_clip.frames, b_clip.frames)
    np.testing.assert_array_equal(a_depth.depth, b_depth.depth)


def test_ground_truth_of_identity_path_is_the_source():
    clip, _ = make_example("boxes", num_frames=2, size=(H, W))
    gt = render_ground_truth("boxes", np.stack([np.eye(4)] * 2), reference_intrinsics(H, W), (H, W))
    np.testing.assert_array_equal(gt.rgb, clip.frames)
    assert gt.observable.all() and gt.hit.all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(InputError, match="unknown scene 'nope'"):
        get_scene("nope")
    with pytest.raises(InputError, match="cam_from_world must be"):
        render_view("boxes", 0, np.eye(3), reference_intrinsics(H, W), (H, W))
    with pytest.raises(InputError, match="num_frames must be >= 1"):
        make_example("boxes", num_frames=0, size=(H, W))
    with pytest.raises(ValueError, match="unknown texture kind"):
        Texture("dots")(np.zeros((1, 3)))


def test_synth_command_writes_readable_files(tmp_path, capsys):
    out = tmp_path / "example"
    code = main(["synth", "-o", str(out), "--scene", "planes", "--num-frames", "3", "--size", "48x64",
                 "--fps", "12"])
    assert code == 0, capsys.readouterr().err
    frames, fps = read_video(out / "video.mp4")
    assert frames.shape == (3, 48, 64, 3) and fps == pytest.approx(12)
    clip, expected = make_example("planes", num_frames=3, size=(48, 64))
    assert np.abs(frames / 255.0 - clip.frames).mean() < 0.03  # H.264 at crf 16 is close
    with np.load(out / "depth.npz") as data:
        assert set(data.files) == {"depth", "valid", "K", "estimator", "settings"}
        np.testing.assert_array_equal(data["depth"], expected.depth)
        np.testing.assert_allclose(data["K"], reference_intrinsics(48, 64))
        assert str(data["estimator"]) == "synthetic:planes"


def test_synth_command_rejects_bad_size(tmp_path, capsys):
    code = main(["synth", "-o", str(tmp_path / "x"), "--size", "63x64"])
    err = capsys.readouterr().err
    assert code == 1 and "must be even" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "video.mp4").exists()
