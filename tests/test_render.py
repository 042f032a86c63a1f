"""moderngl/EGL rasteriser and condition rendering: identity re-render, analytic shifts, depth test,
buffer reuse, projection convention, condition frame-0 and mask rules, errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ex4d.conventions import project_points, reference_intrinsics
from ex4d.errors import InputError, UserError
from ex4d.mesh.dwmesh import build_dw_mesh
from ex4d.types import Trajectory

moderngl = pytest.importorskip("moderngl")
from ex4d.render.condition import render_condition  # noqa: E402
from ex4d.render.rasterizer import MeshRenderer, clip_from_camera  # noqa: E402

H, W = 32, 48
K = reference_intrinsics(H, W)


def _egl_available() -> bool:
    try:
        moderngl.create_standalone_context(backend="egl").release()
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _egl_available(), reason="no EGL (install libegl1 + Mesa)")


def _rgb(seed=0):
    return torch.rand(H, W, 3, generator=torch.Generator().manual_seed(seed))


def _inner(width=2):
    inner = np.zeros((H, W), bool)
    inner[width:H - width, width:W - width] = True
    return inner


def _translation(tx=0.0, ty=0.0, tz=0.0):
    cam_from_world = np.eye(4)
    cam_from_world[:3, 3] = [tx, ty, tz]
    return cam_from_world


@pytest.fixture(scope="module", params=[True, "msaa", False], ids=["analytic", "msaa", "noaa"])
def renderer(request):
    with MeshRenderer(H, W, antialias=request.param) as r:
        yield r


def test_identity_camera_rerenders_the_source(renderer):
    rgb = _rgb()
    mesh = build_dw_mesh(torch.full((H, W), 3.0), rgb)
    out = renderer.render(mesh, np.eye(4), K)
    assert out.shape == (H, W, 4) and out.dtype == np.float32
    inner = _inner()
    np.testing.assert_allclose(out[inner, :3], rgb.numpy()[inner], atol=1e-5)
    mask = out[..., 3] > 125 / 255
    assert mask[inner].all()
    frame = ~inner
    frame[0, 0] = frame[-1, -1] = False  # the two unflagged corners (reference behaviour)
    assert not mask[frame].any()


@pytest.mark.parametrize("shift", [(4, 0), (0, -3), (-5, 2)])
def test_translated_camera_moves_a_plane_by_the_expected_pixels(renderer, shift):
    z0, (du, dv) = 3.0, shift
    rgb = _rgb(1)
    mesh = build_dw_mesh(torch.full((H, W), z0), rgb)
    # A camera moved by +t (cam_from_world translation -t) sees the plane shifted by -f t / z pixels.
    out = renderer.render(mesh, _translation(-du * z0 / 500, -dv * z0 / 500), K)
    m = 3 + max(abs(du), abs(dv))
    got = out[m:H - m, m:W - m, :3]
    expected = rgb.numpy()[m + dv:H - m + dv, m + du:W - m + du]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_principal_point_and_focal_length_of_the_target_camera(renderer):
    rgb = _rgb(2)
    mesh = build_dw_mesh(torch.full((H, W), 3.0), rgb)
    K2 = K.copy()
    K2[0, 2] += 3  # image content moves right by 3 px
    out = renderer.render(mesh, np.eye(4), K2)
    np.testing.assert_allclose(out[4:-4, 6:-4, :3], rgb.numpy()[4:-4, 3:-7], atol=1e-4)
    K3 = K.copy()
    K3[:2, :2] *= 2  # zoom x2 about the principal point: pixel (cx + 2d) shows source (cx + d)
    out = renderer.render(mesh, np.eye(4), K3)
    cy, cx = H // 2, W // 2
    np.testing.assert_allclose(out[cy + 4, cx + 6, :3], rgb.numpy()[cy + 2, cx + 3], atol=1e-4)


def test_projection_puts_integer_pixels_at_gl_pixel_centres():
    points = np.array([[0.3, -0.2, 2.0], [-1.0, 0.5, 7.0]])
    K2 = np.array([[410.0, 0.0, 20.5], [0.0, 380.0, 13.0], [0.0, 0.0, 1.0]])
    clip = np.c_[points, np.ones(2)] @ clip_from_camera(K2, H, W).T
    ndc = clip[:, :3] / clip[:, 3:]
    window = (ndc[:, :2] + 1) / 2 * np.array([W, H])
    np.testing.assert_allclose(window, project_points(points, K2) + 0.5, atol=1e-9)
    near = np.array([0, 0, 1e-3, 1.0]) @ clip_from_camera(K2, H, W).T
    far = np.array([0, 0, 1e3, 1.0]) @ clip_from_camera(K2, H, W).T
    assert near[2] / near[3] == pytest.approx(-1) and far[2] / far[3] == pytest.approx(1)


def test_depth_test_keeps_the_nearest_surface_whatever_the_draw_order(renderer):
    def quad(z, color):
        s = z * 0.2
        v = [[-s, -s, z], [s, -s, z], [s, s, z], [-s, s, z]]
        return v, [color] * 4

    v_far, c_far = quad(5.0, [1, 0, 0, 1])
    v_near, c_near = quad(2.0, [0, 0, 1, 1])
    for order in ([0, 1], [1, 0]):
        parts = [(v_far, c_far), (v_near, c_near)]
        verts = sum((parts[i][0] for i in order), [])
        cols = sum((parts[i][1] for i in order), [])
        faces = [[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]]
        mesh = SimpleNamespace(vertices=torch.tensor(verts, dtype=torch.float32),
                               colors=torch.tensor(cols, dtype=torch.float32),
                               faces=torch.tensor(faces, dtype=torch.int32))
        out = renderer.render(mesh, np.eye(4), K)
        np.testing.assert_allclose(out[H // 2, W // 2], [0, 0, 1, 1], atol=1e-6)


def test_empty_view_is_zero_and_buffers_are_reused_across_mesh_sizes(renderer):
    rgb = _rgb(3)
    depth = torch.full((H, W), 3.0)
    depth[:, W // 2:] = 9.0
    behind = np.diag([-1.0, 1.0, -1.0, 1.0])  # looking backwards: nothing in view
    full = build_dw_mesh(depth, rgb)
    assert not renderer.render(full, behind, K).any()
    torn = build_dw_mesh(depth, rgb, watertight=False)
    small = build_dw_mesh(torch.full((8, 8), 3.0), torch.rand(8, 8, 3))
    pose = _translation(0.05)
    first = renderer.render(full, pose, K)
    renderer.render(torn, pose, K)
    renderer.render(small, pose, K)
    again = renderer.render(full, pose, K)
    np.testing.assert_array_equal(first, again)
    with MeshRenderer(H, W, antialias=renderer.antialias) as fresh:
        np.testing.assert_array_equal(fresh.render(torn, pose, K), renderer.render(torn, pose, K))
    no_faces = SimpleNamespace(vertices=full.vertices, colors=full.colors, faces=torch.zeros(0, 3, dtype=torch.int32))
    assert not renderer.render(no_faces, pose, K).any()
    np.testing.assert_array_equal(renderer.render(full, pose, K), first)


def test_renderer_errors(monkeypatch):
    with MeshRenderer(H, W) as r:
        mesh = build_dw_mesh(torch.full((H, W), 3.0), _rgb())
        with pytest.raises(InputError, match="cam_from_world"):
            r.render(mesh, np.eye(3), K)
    with pytest.raises(RuntimeError, match="released"):
        r.render(mesh, np.eye(4), K)

    def no_egl(**kwargs):
        raise RuntimeError("eglGetDisplay failed")

    monkeypatch.setattr(moderngl, "create_standalone_context", no_egl)
    with pytest.raises(UserError, match="libegl1"):
        MeshRenderer(H, W)


def _identity_trajectory(n, name="ident"):
    return Trajectory(cam_from_world=np.repeat(np.eye(4)[None], n, 0), K=K, name=name)


def test_render_condition_frame_zero_and_mask_rules():
    n = 3
    g = np.random.default_rng(0)
    frames = g.random((n, H, W, 3), dtype=np.float32)
    depth = np.full((n, H, W), 4.0, np.float32)
    traj = _identity_trajectory(n)
    traj.cam_from_world[2] = _translation(-2 * 4.0 / 500)  # camera 2 px right: content moves left
    seen = []
    cond = render_condition(frames, depth, None, traj, cap="masked", mesh_callback=lambda k, m: seen.append(k))
    assert seen == [0, 1, 2]
    assert cond.color.shape == (n, H, W, 3) and cond.mask.shape == (n, H, W) and cond.mask.dtype == bool
    np.testing.assert_array_equal(cond.color[0], frames[0])
    assert cond.mask[0].all()
    inner = _inner()
    assert cond.mask[1][inner].all() and not cond.mask[1][~inner].any()
    np.testing.assert_allclose(cond.color[1][inner], frames[1][inner], atol=1e-5)
    assert not cond.color[1][~cond.mask[1]].any()  # colour multiplied by the mask
    np.testing.assert_allclose(cond.color[2][4:-4, 4:-6], frames[2][4:-4, 6:-4], atol=1e-4)
    assert cond.settings["cap"] == "masked" and cond.name == "ident" and cond.fps == 30.0


def test_render_condition_only_first_frame_and_bad_inputs():
    frames = np.random.default_rng(1).random((2, H, W, 3), dtype=np.float32)
    depth = np.full((2, H, W), 4.0, np.float32)
    depth[1] = 8.0
    seen = []
    cond = render_condition(frames, depth, K, _identity_trajectory(4), only_first_frame=True,
                            mesh_callback=lambda k, m: seen.append(k), progress=list)
    assert seen == [0] and cond.color.shape[0] == 4
    inner = _inner()
    for k in (1, 2, 3):  # frame 0's colours everywhere, not frame 1's
        np.testing.assert_allclose(cond.color[k][inner], frames[0][inner], atol=1e-5)
    with pytest.raises(InputError, match="trajectory has 4 frames"):
        render_condition(frames, depth, K, _identity_trajectory(4))
    with pytest.raises(InputError, match="does not match"):
        render_condition(frames, depth[:, :-1], K, _identity_trajectory(2))
    with pytest.raises(InputError, match="float"):
        render_condition((frames * 255).astype(np.uint8), depth, K, _identity_trajectory(2))


def _quad_mesh(x0, x1, y0, y1, z=2.0, color=(1.0, 1.0, 1.0, 1.0)):
    """A fronto-parallel rectangle covering pixel coordinates [x0, x1] x [y0, y1] at depth z."""
    def world(u, v):
        return [(u - K[0, 2]) * z / K[0, 0], (v - K[1, 2]) * z / K[1, 1], z]

    verts = [world(x0, y0), world(x1, y0), world(x1, y1), world(x0, y1)]
    return SimpleNamespace(vertices=torch.tensor(verts, dtype=torch.float32),
                           colors=torch.tensor([color] * 4, dtype=torch.float32),
                           faces=torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32))


@pytest.mark.parametrize("edge,pixel,alpha", [(20.3, 20, 0.8), (20.7, 21, 0.2), (20.5, 20, 1.0)])
def test_analytic_antialias_blends_silhouette_pixels_by_edge_position(edge, pixel, alpha):
    with MeshRenderer(H, W, antialias=True) as r, MeshRenderer(H, W, antialias=False) as plain:
        mesh = _quad_mesh(8.0, edge, 8.0, 24.0)
        out = r.render(mesh, np.eye(4), K)
        base = plain.render(mesh, np.eye(4), K)
    row = 16
    assert out[row, pixel, 3] == pytest.approx(alpha, abs=1e-4)
    # Pixels away from the silhouette and the internal diagonal are untouched.
    np.testing.assert_array_equal(out[row, 10:19], base[row, 10:19])
    np.testing.assert_array_equal(out[12:20, 10:19], base[12:20, 10:19])
    # The alpha > 125/255 rule keeps covered pixels and drops uncovered ones, as before blending.
    np.testing.assert_array_equal(out[..., 3] > 125 / 255, base[..., 3] > 125 / 255)


def test_analytic_antialias_grid_fast_path_equals_generic_adjacency():
    g = torch.Generator().manual_seed(4)
    depth = torch.full((H, W), 3.0)
    depth[8:24, 14:30] = 1.5  # a box in front: folds (silhouettes) in an oblique view
    rgb = torch.rand(H, W, 3, generator=g)
    pose = np.eye(4)
    a = np.radians(12)
    pose[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    pose[:3, 3] = [-0.4, 0.0, 0.1]
    with MeshRenderer(H, W, antialias=True) as r, MeshRenderer(H, W, antialias=False) as plain:
        for cap in ("none", "reference"):
            mesh = build_dw_mesh(depth, rgb, cap=cap)
            assert mesh.settings["grid_size"] == [H, W]
            fast = r.render(mesh, pose, K)
            generic_mesh = SimpleNamespace(vertices=mesh.vertices, colors=mesh.colors, faces=mesh.faces.clone())
            generic = r.render(generic_mesh, pose, K)
            np.testing.assert_allclose(fast, generic, atol=1e-6)
            base = plain.render(mesh, pose, K)
            changed = np.abs(fast - base).max(-1) > 1e-6
            assert 0 < changed.mean() < 0.2  # only silhouette pixels move


def test_condition_matches_a_ray_cast_oracle_on_a_synthetic_scene():
    """Mask = visible-and-observed pixels of an exact ray-cast novel view of a box scene."""
    scenes = pytest.importorskip("ex4d.synthetic.scenes")
    h, w = 48, 64
    clip, depth = scenes.make_example("boxes", num_frames=2, size=(h, w))
    radius = float(depth.depth[0].min()) + 0.15
    a = np.radians(20)
    eye = np.array([radius * np.sin(a), 0.0, radius * (1 - np.cos(a))])
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, -rot @ eye
    traj = Trajectory(cam_from_world=np.stack([np.eye(4), pose]), K=depth.K, name="orbit20")
    cond = render_condition(clip.frames, depth.depth, depth.K, traj)
    observable = scenes.observability("boxes", 1, pose, depth.K, (h, w), depth.K, (h, w))
    truth = scenes.render_view("boxes", 1, pose, depth.K, (h, w))
    mask = cond.mask[1]
    inner = np.zeros((h, w), bool)
    inner[2:-2, 2:-2] = True
    assert observable[mask].mean() > 0.99            # nothing unobserved is marked visible
    assert mask[observable & inner].mean() > 0.9     # ~1 px erosion at discontinuities only
    assert np.abs(cond.color[1] - truth["rgb"])[mask].mean() < 0.03


def test_cap_modes_in_a_render_of_content_behind_the_back_wall():
    """Spec 4.3b: content deeper than z = 100 is hidden by the cap; "masked" marks it for
    generation, "reference" shows a smeared corner blend as visible, "none" shows the content."""
    depth = torch.full((H, W), 3.0)
    depth[10:22, 16:32] = 150.0  # e.g. sky
    rgb = _rgb(5)
    sky = np.zeros((H, W), bool)
    sky[12:20, 18:30] = True  # away from the flagged rim of the region
    with MeshRenderer(H, W) as r:
        out = {cap: r.render(build_dw_mesh(depth, rgb, cap=cap), np.eye(4), K)
               for cap in ("none", "masked", "reference")}
    visible = {cap: o[..., 3] > 125 / 255 for cap, o in out.items()}
    assert visible["none"][sky].all()
    np.testing.assert_allclose(out["none"][sky][:, :3], rgb.numpy()[sky], atol=1e-5)
    assert not visible["masked"][sky].any()
    assert visible["reference"][sky].mean() > 0.5
    assert np.abs(out["reference"][sky][:, :3] - rgb.numpy()[sky]).mean() > 0.05  # not the sky's colours
    outside = ~sky & _inner(4)
    outside[8:24, 14:34] = False
    for cap in ("masked", "reference"):
        np.testing.assert_array_equal(out[cap][outside], out["none"][outside])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_built_mesh_renders_like_a_cpu_built_one():
    depth = torch.full((H, W), 3.0)
    depth[8:24, 14:30] = 1.5
    rgb = _rgb(6)
    pose = _translation(-0.2, 0.05)
    with MeshRenderer(H, W) as r:
        cpu = r.render(build_dw_mesh(depth, rgb), pose, K)
        gpu_mesh = build_dw_mesh(depth.cuda(), rgb.cuda())
        assert gpu_mesh.faces.is_cuda and gpu_mesh.settings["grid_size"] == [H, W]
        gpu = r.render(gpu_mesh, pose, K)
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)
    assert "nvidia" in r.gl_renderer.lower()
    # Device-side silhouette classification + sparse blending == the plain host algorithm.
    with MeshRenderer(H, W) as fast, MeshRenderer(H, W, antialias=False) as plain:
        got = fast.render(gpu_mesh, pose, K)
        want = _plain_analytic(gpu_mesh, pose, K, H, W, fast.face_buffer(), plain.render(gpu_mesh, pose, K))
    np.testing.assert_array_equal(got, want)


def test_limited_torch_threads_restores_the_thread_count():
    from ex4d.render.condition import limited_torch_threads

    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        with limited_torch_threads(1):
            assert torch.get_num_threads() == 1
            raise KeyError("boom")
    assert torch.get_num_threads() == before
    with limited_torch_threads(None):
        assert torch.get_num_threads() == before
    with limited_torch_threads(before + 4):  # never raises the count
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_render_loop_caps_torch_threads_and_restores_them(device):
    """One torch thread in the loop with CPU meshes (llvmpipe needs the cores), CUDA_LOOP_TORCH_THREADS with
    GPU meshes (the encoders' threads need them); the caller's count afterwards."""
    import ex4d.render.condition as condition

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n = 3
    frames = np.random.default_rng(0).random((n, H, W, 3), dtype=np.float32)
    depth = np.full((n, H, W), 4.0, np.float32)
    before = torch.get_num_threads()
    seen = []
    condition.render_condition(frames, depth, None, _identity_trajectory(n), device=device,
                               mesh_callback=lambda k, m: seen.append(torch.get_num_threads()))
    want = 1 if device == "cpu" else min(before, condition.CUDA_LOOP_TORCH_THREADS or before)
    assert seen == [want] * n and torch.get_num_threads() == before


# -- fast paths vs the plain statements they replace ----------------------------------------------

def _orbit(deg, radius):
    a = np.radians(deg)
    eye = np.array([radius * np.sin(a), 0.05 * radius, radius * (1 - np.cos(a))])
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, -rot @ eye
    return pose


def _plain_analytic(mesh, pose, K_, h, w, face_info, base):
    """The previous renderer path: dense host antialiasing from the full (F, 3) silhouette flags."""
    from ex4d.render.antialias import (antialias_silhouettes, face_adjacency, grid_silhouette_faces,
                                       silhouette_faces)

    clip = clip_from_camera(K_, h, w) @ pose
    if getattr(mesh, "settings", {}).get("grid_size"):
        sil, xy = grid_silhouette_faces(mesh.vertices, (h, w), mesh.cap != "none", clip, h, w)
    else:
        sil, xy = silhouette_faces(mesh.vertices, mesh.faces, face_adjacency(mesh.faces), clip, h, w)
    return antialias_silhouettes(base, face_info[..., 0].astype(np.int64) - 1, face_info[..., 1], xy.cpu().numpy(),
                                 mesh.faces.cpu().numpy(), sil.cpu().numpy())


def test_fast_analytic_path_equals_the_previous_path_on_synthetic_scenes():
    """Sparse antialiasing + interleaved upload + torch post-processing give the previous path's
    masks exactly and its colours bit for bit, for grid meshes (with and without cap faces) and a
    generic mesh, on a ray-cast box scene and a depth-step scene, from several orbit views."""
    from ex4d.render.condition import finish_frame

    scenes = pytest.importorskip("ex4d.synthetic.scenes")
    h, w = 48, 64
    clip_, depth_ = scenes.make_example("boxes", num_frames=1, size=(h, w))
    box = np.full((h, w), 4.0, np.float32)
    box[12:36, 20:44] = 2.0
    cases = [(clip_.frames[0], depth_.depth[0]), (np.random.default_rng(3).random((h, w, 3), dtype=np.float32), box)]
    Kc = reference_intrinsics(h, w)
    blended = 0
    with MeshRenderer(h, w, antialias="analytic") as fast, MeshRenderer(h, w, antialias="none") as plain:
        for rgb, depth in cases:
            radius = float(depth.min()) + 0.15
            for cap in ("none", "reference"):
                mesh = build_dw_mesh(torch.from_numpy(np.ascontiguousarray(depth)), torch.from_numpy(rgb), Kc,
                                     cap=cap)
                generic = SimpleNamespace(vertices=mesh.vertices, colors=mesh.colors, faces=mesh.faces.clone())
                for m in (mesh, generic):
                    for deg in (-25, 10, 40):
                        pose = _orbit(deg, radius)
                        got = fast.render(m, pose, Kc)
                        base = plain.render(m, pose, Kc)
                        want = _plain_analytic(m, pose, Kc, h, w, fast.face_buffer(), base)
                        np.testing.assert_array_equal(got, want)
                        blended += int((np.abs(want - base).max(-1) > 0).sum())
                        mg, mw = np.zeros((h, w), bool), np.zeros((h, w), bool)
                        cg, cw = np.zeros((h, w, 3), np.float32), np.zeros((h, w, 3), np.float32)
                        finish_frame(got, mg, cg)
                        # The previous post-processing, in numpy.
                        np.greater(want[..., 3], np.float32(125 / 255), out=mw)
                        np.multiply(want[..., :3], mw[..., None], out=cw)
                        np.clip(cw, 0.0, 1.0, out=cw)
                        np.testing.assert_array_equal(mg, mw)
                        assert np.abs(cg - cw).max() <= 1 / 255
    assert blended > 100  # the scenes do exercise the silhouette blending


def test_finish_frame_equals_the_numpy_threshold_at_the_edge_values():
    from ex4d.render.condition import finish_frame

    thr = np.float32(125 / 255)
    rng = np.random.default_rng(0)
    rgba = (rng.random((16, 20, 4), dtype=np.float32) * 1.2 - 0.1).astype(np.float32)
    edge = [thr, np.nextafter(thr, np.float32(0)), np.nextafter(thr, np.float32(1)), 0.0, 1.0, -0.0]
    rgba[0, :len(edge), 3] = edge
    mask = np.zeros((16, 20), bool)
    color = np.full((16, 20, 3), 7.0, np.float32)
    finish_frame(rgba, mask, color)
    np.testing.assert_array_equal(mask, rgba[..., 3] > thr)
    np.testing.assert_array_equal(mask[0, :3], [False, False, True])
    np.testing.assert_array_equal(color, np.clip(rgba[..., :3] * mask[..., None], 0, 1))
    assert color.min() >= 0 and color.max() <= 1


def test_renderer_stage_timings_and_face_buffer():
    mesh = build_dw_mesh(torch.full((H, W), 3.0), _rgb())
    with MeshRenderer(H, W) as r, MeshRenderer(H, W, antialias=False) as plain:
        assert r.face_buffer() is None
        r.timings = {}
        r.render(mesh, _translation(0.02), K)
        assert set(r.timings) == {"stage_ms", "gl_ms", "antialias_ms", "upload_ms", "draw_read_ms"}
        assert all(v >= 0 for v in r.timings.values())
        info = r.face_buffer()
        assert info.shape == (H, W, 2)
        ids = info[..., 0]
        assert ids.max() <= mesh.num_faces and ids.min() >= 0 and (ids[4:-4, 4:-4] > 0).all()
        plain.render(mesh, _translation(0.02), K)
        assert plain.face_buffer() is None and plain.timings is None


@pytest.mark.parametrize("antialias", ["none", "analytic"])
def test_reference_pixel_convention_shifts_by_half_a_pixel(antialias):
    """Identity camera, fronto-parallel plane with colours linear in (u, v): with "centers" pixel (j, i)
    shows the vertex of pixel (j, i); with "reference" (integer coordinates on pixel corners) it shows
    the surface at (j + 0.5, i + 0.5), i.e. the image moves by exactly half a pixel up and left."""
    from ex4d.mesh.dwmesh import build_dw_mesh
    from ex4d.render.rasterizer import MeshRenderer, clip_from_camera

    h, w = 24, 32
    K = np.array([[40.0, 0, w / 2], [0, 40.0, h / 2], [0, 0, 1]])
    u, v = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    rgb = np.stack([u / 64, v / 64, np.full_like(u, 0.5)], -1)
    mesh = build_dw_mesh(torch.full((h, w), 5.0), torch.from_numpy(rgb), K, border_depth=5.0)
    renders = {}
    for convention in ("centers", "reference"):
        with MeshRenderer(h, w, antialias=antialias, pixel_convention=convention) as renderer:
            renders[convention] = renderer.render(mesh, np.eye(4), K)
    inner = (slice(3, h - 3), slice(3, w - 3))  # away from the flagged border ring
    centers, ref = renders["centers"][inner], renders["reference"][inner]
    np.testing.assert_allclose(centers[..., 0], u[inner] / 64, atol=1e-5)  # re-renders the source exactly
    np.testing.assert_allclose(ref[..., 0], (u[inner] + 0.5) / 64, atol=1e-5)
    np.testing.assert_allclose(ref[..., 1], (v[inner] + 0.5) / 64, atol=1e-5)
    a, b = clip_from_camera(K, h, w), clip_from_camera(K, h, w, pixel_convention="reference")
    np.testing.assert_allclose(a[0, 2] - b[0, 2], 1 / w) and np.testing.assert_allclose(a[1, 2] - b[1, 2], 1 / h)
    with pytest.raises(InputError, match="pixel convention"):
        MeshRenderer(h, w, pixel_convention="corners")


def _orbit_scene(n=5, h=48, w=64):
    """A depth-step scene seen along a short orbit: many silhouette pixels to antialias per frame."""
    rng = np.random.default_rng(5)
    frames = rng.random((n, h, w, 3), dtype=np.float32)
    depth = np.full((n, h, w), 4.0, np.float32)
    for k in range(n):
        depth[k, 10 + k:34 + k, 18:44] = 2.0
    poses = np.stack([_orbit(6.0 * k, 2.15) for k in range(n)])
    Ks = np.repeat(reference_intrinsics(h, w)[None], n, axis=0)
    return frames, depth, Trajectory(cam_from_world=poses, K=Ks, name="orbit")


def test_deferred_render_finishes_each_frame_as_render_does():
    """render_deferred's finishers give render's frames even when the next frame is drawn before a
    frame is finished (each frame reads back into its own buffer)."""
    frames, depth, trajectory = _orbit_scene()
    h, w = frames.shape[1:3]
    Kc = reference_intrinsics(h, w)
    meshes = [build_dw_mesh(torch.from_numpy(depth[k]), torch.from_numpy(frames[k]), Kc) for k in range(3)]
    with MeshRenderer(h, w, antialias="analytic") as r:
        want = [r.render(m, trajectory.cam_from_world[k], Kc) for k, m in enumerate(meshes)]
        finishers = [r.render_deferred(m, trajectory.cam_from_world[k], Kc) for k, m in enumerate(meshes)]
        got = [finish() for finish in finishers]  # all three drawn before any is finished
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(g, w_)
    assert any(((0 < g[..., 3]) & (g[..., 3] < 1)).any() for g in got)  # silhouettes were blended


def test_deferred_renders_finished_on_several_threads_at_once_equal_render():
    """Finishers of different frames blending at the same moment on three threads (a barrier lines
    them up) give render's frames: each thread blends with its own antialiaser, whose lookup table
    would otherwise be rewritten by another frame mid-blend."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    frames, depth, trajectory = _orbit_scene(n=4)
    h, w = frames.shape[1:3]
    Kc = reference_intrinsics(h, w)
    meshes = [build_dw_mesh(torch.from_numpy(depth[k]), torch.from_numpy(frames[k]), Kc) for k in range(1, 4)]
    poses = trajectory.cam_from_world[1:4]
    with MeshRenderer(h, w, antialias="analytic") as r:
        want = [r.render(m, pose, Kc) for m, pose in zip(meshes, poses)]
        for _ in range(3):
            finishers = [r.render_deferred(m, pose, Kc) for m, pose in zip(meshes, poses)]
            together = threading.Barrier(len(finishers))

            def finish_together(finish):
                together.wait(timeout=30)
                return finish(), threading.current_thread().name

            with ThreadPoolExecutor(len(finishers)) as pool:
                results = list(pool.map(finish_together, finishers))
            assert len({name for _, name in results}) == len(finishers)
            for (got, _), w_ in zip(results, want):
                np.testing.assert_array_equal(got, w_)
    assert all(((0 < g[..., 3]) & (g[..., 3] < 1)).any() for g in want)  # every frame has blended pixels


def test_deferred_render_with_too_many_faces_to_antialias(monkeypatch):
    """Past the analytic limit a frame is left unblended (with a warning), deferred or not."""
    import ex4d.render.rasterizer as rasterizer

    frames, depth, trajectory = _orbit_scene(n=2)
    h, w = frames.shape[1:3]
    Kc = reference_intrinsics(h, w)
    mesh = build_dw_mesh(torch.from_numpy(depth[1]), torch.from_numpy(frames[1]), Kc)
    monkeypatch.setattr(rasterizer, "_MAX_ANALYTIC_FACES", 1)
    with MeshRenderer(h, w, antialias="analytic") as r, MeshRenderer(h, w, antialias="none") as plain:
        got = r.render_deferred(mesh, trajectory.cam_from_world[1], Kc)()
        np.testing.assert_array_equal(got, plain.render(mesh, trajectory.cam_from_world[1], Kc))
        np.testing.assert_array_equal(r.render(mesh, trajectory.cam_from_world[1], Kc), got)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_overlapped_render_loop_gives_the_in_line_frames_and_finishes_on_a_helper_thread(monkeypatch, device,
                                                                                          threads):
    """With the loop's overlap on (CUDA meshes; forced for CPU meshes), every frame is finished on a
    helper thread (one or several) while the next is drawn, and the frames equal the in-line loop's bit
    for bit, in order. A loop abandoned midway leaves no helper thread behind."""
    import threading

    import ex4d.render.condition as condition

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    frames, depth, trajectory = _orbit_scene()
    monkeypatch.setattr(condition, "CUDA_LOOP_OVERLAP", False)
    want = condition.render_condition(frames, depth, None, trajectory, device=device)
    monkeypatch.setattr(condition, "CUDA_LOOP_OVERLAP", True)
    monkeypatch.setattr(condition, "CUDA_LOOP_FINISH_THREADS", threads)
    if device == "cpu":
        monkeypatch.setattr(condition, "_overlap_finishing", lambda device: True)
    finishing_threads = []
    finish_frame = condition.finish_frame

    def recording_finish_frame(*args):
        finishing_threads.append(threading.current_thread().name)
        finish_frame(*args)

    monkeypatch.setattr(condition, "finish_frame", recording_finish_frame)
    got = condition.render_condition(frames, depth, None, trajectory, device=device)
    np.testing.assert_array_equal(got.color, want.color)
    np.testing.assert_array_equal(got.mask, want.mask)
    assert len(finishing_threads) == len(frames) - 1  # frame 0 is the source frame itself
    assert all(name.startswith("finish frame") for name in finishing_threads)
    assert (~want.mask[1:]).any() and want.mask[1:].any()  # the views do uncover and keep pixels

    stream = condition.iter_condition(iter(frames), iter(depth), None, trajectory, size=frames.shape[1:3],
                                      num_frames=len(frames), device=device)
    next(stream), next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("finish frame")]


@pytest.mark.parametrize("antialias,only_first_frame", [("msaa", False), ("none", False), ("analytic", True)])
def test_overlapped_render_loop_in_other_modes(monkeypatch, antialias, only_first_frame):
    """The overlapped loop gives the in-line frames with other antialiasing modes (nothing to blend
    later) and with one shared mesh (only_first_frame), and calls the mesh callback alike."""
    import ex4d.render.condition as condition

    frames, depth, trajectory = _orbit_scene()
    runs = []
    for overlap in (False, True):
        monkeypatch.setattr(condition, "_overlap_finishing", lambda device, overlap=overlap: overlap)
        meshes = []
        runs.append((condition.render_condition(frames, depth, None, trajectory, antialias=antialias,
                                                only_first_frame=only_first_frame,
                                                mesh_callback=lambda k, mesh: meshes.append(k)), meshes))
    (want, want_meshes), (got, got_meshes) = runs
    np.testing.assert_array_equal(got.color, want.color)
    np.testing.assert_array_equal(got.mask, want.mask)
    assert got_meshes == want_meshes == ([0] if only_first_frame else list(range(len(frames))))
    assert (~want.mask[1:]).any()
