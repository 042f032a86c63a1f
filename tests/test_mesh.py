"""DW-Mesh construction: analytic vertices, face order and count, flags at depth steps, cap modes,
torn baseline, the boundary/stretch filters against a slow per-face twin, PLY export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ex4d.conventions import reference_intrinsics
from ex4d.errors import InputError
from ex4d.mesh.dwmesh import _face_validity, build_dw_mesh, export_ply, grid_faces, read_ply_comments

H, W = 32, 48


def _rgb(seed=0, h=H, w=W):
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def _frame_mask(h=H, w=W, width=2):
    inner = np.zeros((h, w), bool)
    inner[width:h - width, width:w - width] = True
    return ~inner


def test_plane_vertices_are_analytic_and_only_the_two_pixel_frame_is_flagged():
    z0 = 3.0
    mesh = build_dw_mesh(torch.full((H, W), z0), _rgb())
    v = mesh.vertices.view(H, W, 3).numpy()
    uu, vv = np.meshgrid(np.arange(W), np.arange(H))
    inner = ~_frame_mask(width=1)
    np.testing.assert_allclose(v[inner, 2], z0)
    np.testing.assert_allclose(v[inner, 0], z0 * (uu[inner] - W / 2) / 500, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v[inner, 1], z0 * (vv[inner] - H / 2) / 500, rtol=1e-6, atol=1e-7)
    # Border ring pushed to z = 100 along the same rays.
    np.testing.assert_allclose(v[0, :, 2], 100.0)
    np.testing.assert_allclose(v[:, -1, 0], 100.0 * (W - 1 - W / 2) / 500, rtol=1e-6)
    flagged = mesh.flagged.view(H, W).numpy()
    expected = _frame_mask(width=2)
    # Top-left and bottom-right corners only touch flat z=100 faces: they keep their colour.
    expected[0, 0] = expected[-1, -1] = False
    np.testing.assert_array_equal(flagged, expected)
    # Unflagged vertices keep the source colour and alpha 1; flagged ones are RGBA 0.
    colors = mesh.colors.view(H, W, 4).numpy()
    np.testing.assert_array_equal(colors[~flagged, :3], _rgb().numpy()[~flagged])
    assert np.all(colors[~flagged, 3] == 1.0) and np.all(colors[flagged] == 0.0)
    assert mesh.vertices.dtype == torch.float32 and mesh.faces.dtype == torch.int32


def test_face_order_and_count():
    faces = build_dw_mesh(torch.full((H, W), 2.0), _rgb()).faces.long()
    n = (H - 1) * (W - 1)
    assert faces.shape == (2 * n, 3)
    i = lambda r, c: r * W + c  # noqa: E731
    r, c = 5, 7
    block = r * (W - 1) + c
    assert faces[block].tolist() == [i(r + 1, c), i(r, c), i(r, c + 1)]          # T1
    assert faces[n + block].tolist() == [i(r + 1, c), i(r, c + 1), i(r + 1, c + 1)]  # T2
    for cap in ("masked", "reference"):
        capped = build_dw_mesh(torch.full((H, W), 2.0), _rgb(), cap=cap).faces.long()
        assert capped.shape == (2 * (H - 1) * (W - 1) + 2, 3)
        assert capped[-2:].tolist() == [[W - 1, 0, H * W - 1], [H * W - 1, 0, (H - 1) * W]]
    # The topology is cached: the same tensor comes back for the same size/cap/device.
    assert grid_faces(H, W, "none") is grid_faces(H, W, "none")
    assert grid_faces(H, W, "none") is not grid_faces(H, W, "masked")


@pytest.mark.parametrize("z", [3.0, 30.0])
@pytest.mark.parametrize("jump,flagged", [(0.045, False), (0.05, True)])
def test_depth_step_flags_one_column_each_side_at_the_4_58_percent_threshold(z, jump, flagged):
    depth = torch.full((H, W), z)
    step = W // 2
    depth[:, step:] *= 1 + jump
    mesh = build_dw_mesh(depth, _rgb())
    flags = mesh.flagged.view(H, W).numpy()
    interior = flags[2:-2]
    expected_cols = {step - 1, step} if flagged else set()
    for row in interior:
        cols = set(np.nonzero(row)[0].tolist()) - {0, 1, W - 2, W - 1}
        assert cols == expected_cols


def test_cap_modes_flag_corners_as_specified():
    depth = torch.full((H, W), 5.0)
    corners = [0, W - 1, H * W - 1, (H - 1) * W]
    none = build_dw_mesh(depth, _rgb(), cap="none")
    ref = build_dw_mesh(depth, _rgb(), cap="reference")
    masked = build_dw_mesh(depth, _rgb(), cap="masked")
    assert none.cap == "none" and ref.cap == "reference" and masked.cap == "masked"
    # Reference: cap faces pass the angle test; only top-right and bottom-left corners are flagged.
    assert ref.face_valid[-2:].tolist() == [True, True]
    assert ref.flagged[corners].tolist() == [False, True, False, True]
    assert torch.equal(ref.colors, none.colors)
    # Masked: cap faces invalid, all four corners RGBA 0 (the back wall renders mask 0).
    assert masked.face_valid[-2:].tolist() == [False, False]
    assert masked.flagged[corners].tolist() == [True, True, True, True]
    assert int(masked.flagged.sum()) == int(none.flagged.sum()) + 2


def test_torn_mesh_deletes_invalid_faces_and_keeps_colours():
    depth = torch.full((H, W), 3.0)
    depth[:, W // 2:] = 6.0
    dw = build_dw_mesh(depth, _rgb(), watertight=True)
    torn = build_dw_mesh(depth, _rgb(), watertight=False)
    n_invalid = int((~dw.face_valid).sum())
    assert n_invalid > 0
    assert torn.num_faces == dw.num_faces - n_invalid
    assert bool(torn.face_valid.all())
    np.testing.assert_array_equal(torn.colors[:, :3].numpy(), _rgb().reshape(-1, 3).numpy())
    assert bool((torn.colors[:, 3] == 1).all())
    kept = dw.faces[dw.face_valid]
    assert torch.equal(torn.faces, kept)


@pytest.mark.parametrize("filter", ["angle", "boundary"])
@pytest.mark.parametrize("stretch_test", [False, True])
def test_grid_validity_equals_a_slow_per_face_twin(filter, stretch_test):
    g = torch.Generator().manual_seed(1)
    depth = torch.rand(H, W, generator=g) * 3 + 2
    depth[:, 20:] += 4.0
    mesh = build_dw_mesh(depth, _rgb(), filter=filter, stretch_test=stretch_test)
    f, v = mesh.faces.long(), mesh.vertices
    z_range = v[:, 2].max() - v[:, 2].min()
    twin = _face_validity(v[f[:, 0]], v[f[:, 1]], v[f[:, 2]], filter=filter,
                          cos_limit=math.cos(math.radians(2.5)), stretch_test=stretch_test, z_range=z_range)
    assert torch.equal(twin, mesh.face_valid)
    assert 0 < int((~twin).sum()) < len(twin)
    # Every vertex of an invalid face is zeroed, and no other vertex.
    expected = torch.zeros(H * W, dtype=torch.bool)
    expected[f[~twin].reshape(-1)] = True
    assert torch.equal(mesh.flagged, expected)


def test_stretch_test_adds_flags_and_custom_K_moves_vertices():
    depth = torch.linspace(2, 8, W).expand(H, W).contiguous()
    plain = build_dw_mesh(depth, _rgb())
    stretched = build_dw_mesh(depth, _rgb(), stretch_test=True)
    assert int(stretched.flagged.sum()) >= int(plain.flagged.sum())
    K = reference_intrinsics(H, W, focal_px=250.0)
    K[0, 2] = 10.0
    mesh = build_dw_mesh(torch.full((H, W), 2.0), _rgb(), K)
    v = mesh.vertices.view(H, W, 3)
    assert float(v[5, 10, 0]) == pytest.approx(0.0, abs=1e-7)
    assert float(v[5, 11, 0]) == pytest.approx(2.0 / 250.0, rel=1e-5)


def test_numpy_inputs_and_bad_inputs():
    mesh = build_dw_mesh(np.full((H, W), 2.0, np.float32), _rgb().numpy())
    assert mesh.vertices.shape == (H * W, 3)
    with pytest.raises(InputError, match="rgb must be"):
        build_dw_mesh(torch.ones(H, W), torch.rand(H, W + 1, 3))
    with pytest.raises(InputError, match=r"depth must be \(H, W\)"):
        build_dw_mesh(torch.ones(1, H, W), _rgb())
    with pytest.raises(InputError, match="non-positive"):
        bad = torch.ones(H, W)
        bad[5, 5] = float("nan")
        build_dw_mesh(bad, _rgb())
    with pytest.raises(InputError, match="cap mode"):
        build_dw_mesh(torch.ones(H, W), _rgb(), cap="closed")
    with pytest.raises(InputError, match="filter"):
        build_dw_mesh(torch.ones(H, W), _rgb(), filter="edges")
    with pytest.raises(InputError, match="floating point"):
        build_dw_mesh(torch.ones(H, W), torch.zeros(H, W, 3, dtype=torch.uint8))


def test_ply_round_trip(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    depth = torch.full((H, W), 3.0)
    depth[:, W // 2:] = 6.0
    mesh = build_dw_mesh(depth, _rgb(), cap="masked")
    path = export_ply(mesh, tmp_path / "DW-Mesh.ply")
    assert path.exists() and not list(tmp_path.glob("*.partial*"))
    loaded = trimesh.load(path, process=False)
    assert len(loaded.vertices) == H * W and len(loaded.faces) == mesh.num_faces
    np.testing.assert_allclose(loaded.vertices, mesh.vertices.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces.numpy())
    expected = np.rint(mesh.colors[:, :3].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(loaded.visual.vertex_colors[:, :3], expected)
    assert np.all(loaded.visual.vertex_colors[mesh.flagged.numpy(), :3] == 0)
    assert any("cap=masked" in c for c in read_ply_comments(path))
    with pytest.raises(InputError, match=".ply"):
        export_ply(mesh, tmp_path / "mesh.obj")
