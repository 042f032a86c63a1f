"""Depth files (load_depth_file, FileDepth), the reference normalisation, previews, get_estimator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ex4d.depth import FileDepth, get_estimator, load_depth_file
from ex4d.depth.normalize import (disparity_to_depth, minmax_normalize, normalized_disparity_to_depth,
                                  resize_depth, resize_mask, scale_intrinsics)
from ex4d.depth.preview import colormap, depth_preview
from ex4d.errors import InputError
from ex4d.types import DepthVideo


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- normalisation ----------------------------------------------------------------------------
def test_reference_conversion_hand_values():
    d_hat = np.array([[[1.0, 0.0, 1 / 3900, 0.5]]], dtype=np.float32)
    z = normalized_disparity_to_depth(d_hat)
    assert z.dtype == np.float32 and z.shape == (1, 1, 4)
    np.testing.assert_allclose(z[0, 0], [10000 / 3900, 10000.0, 10000.0, 10000 / 1950], rtol=1e-6)
    assert np.float32(z[0, 0, 0]) == np.float32(2.5641026)


def test_minmax_is_over_the_clip_not_per_frame():
    d = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0)]).astype(np.float32)
    d[0, 0, 0] = 2.0
    out = minmax_normalize(d)
    # per-frame normalisation would put frame 1 at 0 (constant); per clip it is all 1
    assert np.all(out[1] == 1.0)
    assert out[0, 0, 0] == pytest.approx(0.5) and out[0, 1, 1] == 0.0


def test_disparity_to_depth_range_and_order(rng):
    d = rng.random((3, 5, 6)).astype(np.float32) * 7 - 2  # any affine scale, negatives too
    z = disparity_to_depth(d)
    assert z.min() == pytest.approx(10000 / 3900) and z.max() <= 10000
    i, j = np.unravel_index(np.argmax(d), d.shape), np.unravel_index(np.argmin(d), d.shape)
    assert z[i] < z[j]  # nearest (largest disparity) is smallest depth


def test_constant_disparity_is_an_error():
    with pytest.raises(InputError, match="constant"):
        minmax_normalize(np.ones((2, 3, 3)))


def test_resize_helpers():
    z = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6) + 1
    out = resize_depth(z, (8, 12))
    assert out.shape == (2, 8, 12) and out.min() >= z.min() and out.max() <= z.max()
    m = np.zeros((1, 4, 6), bool)
    m[0, :2] = True
    mo = resize_mask(m, (8, 12))
    assert mo.dtype == bool and mo[0, :4].all() and not mo[0, 4:].any()
    K = scale_intrinsics(np.array([[500, 0, 3], [0, 500, 2], [0, 0, 1.0]]), (4, 6), (8, 12))
    np.testing.assert_allclose(K, [[1000, 0, 6], [0, 1000, 4], [0, 0, 1]])


# ---- load_depth_file ----------------------------------------------------------------------------
def test_roundtrip_of_our_own_depth_npz(tmp_path, rng):
    z = (rng.random((5, 8, 10)) + 1).astype(np.float32)
    valid = z > 1.3
    K = np.array([[500, 0, 5], [0, 500, 4], [0, 0, 1.0]])
    DepthVideo(z, valid, K, "depthcrafter", {"steps": 5}).save(tmp_path / "depth.npz")
    out = load_depth_file(tmp_path / "depth.npz", num_frames=5, size=(8, 10))
    np.testing.assert_array_equal(out.depth[out.valid], z[valid])
    np.testing.assert_array_equal(out.valid, valid)
    np.testing.assert_allclose(out.K, K)
    assert out.estimator == "depthcrafter" and out.settings["steps"] == 5
    # invalid pixels are filled with a positive far value
    assert np.all(out.depth > 0)


def test_depth_npz_without_K_and_resize(tmp_path, rng):
    z = (rng.random((4, 8, 10)) + 1).astype(np.float32)
    DepthVideo(z, np.ones_like(z, bool)).save(tmp_path / "d.npz")
    out = load_depth_file(tmp_path / "d.npz", num_frames=3, size=(16, 20))
    assert out.K is None and out.depth.shape == (3, 16, 20) and out.valid.shape == (3, 16, 20)
    assert out.depth.dtype == np.float32 and out.valid.dtype == bool


def test_K_is_scaled_with_the_resize(tmp_path):
    z = np.ones((2, 8, 10), np.float32)
    np.savez(tmp_path / "d.npz", depth=z, K=np.array([[50, 0, 5], [0, 50, 4], [0, 0, 1.0]]))
    out = load_depth_file(tmp_path / "d.npz", num_frames=2, size=(16, 20))
    np.testing.assert_allclose(out.K, [[100, 0, 10], [0, 100, 8], [0, 0, 1]])


def test_npy_depth_and_T1HW(tmp_path, rng):
    z = (rng.random((6, 1, 8, 10)) + 0.5).astype(np.float64)
    np.save(tmp_path / "z.npy", z)
    out = load_depth_file(tmp_path / "z.npy", num_frames=4, size=(8, 10))
    np.testing.assert_allclose(out.depth, z[:4, 0].astype(np.float32))


def test_disparity_file_uses_reference_normalisation(tmp_path, rng):
    d = rng.random((3, 8, 10)).astype(np.float32)
    np.savez(tmp_path / "d.npz", disparity=d)
    out = load_depth_file(tmp_path / "d.npz", num_frames=3, size=(8, 10))
    np.testing.assert_allclose(out.depth, normalized_disparity_to_depth((d - d.min()) / (d.max() - d.min())),
                               rtol=1e-6)
    np.save(tmp_path / "d.npy", d)
    out2 = load_depth_file(tmp_path / "d.npy", num_frames=3, size=(8, 10), kind="disparity")
    np.testing.assert_allclose(out2.depth, out.depth)


def test_masked_nan_is_allowed(tmp_path):
    z = np.ones((2, 4, 4), np.float32)
    z[0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", depth=z, valid=np.isfinite(z))
    out = load_depth_file(tmp_path / "d.npz", num_frames=2, size=(4, 4))
    assert np.isfinite(out.depth).all() and not out.valid[0, 0, 0]


@pytest.mark.parametrize("bad, match", [
    (lambda z: np.where(z > 1.5, np.nan, z), "NaN"),
    (lambda z: np.where(z > 1.5, np.inf, z), "inf"),
    (lambda z: z - 5, "<= 0"),
    (lambda z: z * 0, "<= 0"),
    (lambda z: z[:2], "has 2 frames but 4"),
    (lambda z: z[0], "expected \\(T, H, W\\)"),
    (lambda z: z[:, None, None], "expected \\(T, H, W\\)"),
])
def test_bad_depth_files(tmp_path, rng, bad, match):
    z = (rng.random((4, 6, 6)) + 1).astype(np.float32)
    np.save(tmp_path / "bad.npy", bad(z))
    with pytest.raises(InputError, match=match) as info:
        load_depth_file(tmp_path / "bad.npy", num_frames=4, size=(6, 6))
    assert "bad.npy" in str(info.value) and "\n" not in str(info.value)


def test_missing_unknown_and_wrong_key(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_depth_file(tmp_path / "nope.npz", num_frames=1, size=(4, 4))
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InputError, match=".npz or .npy"):
        load_depth_file(tmp_path / "x.txt", num_frames=1, size=(4, 4))
    np.savez(tmp_path / "k.npz", z=np.ones((1, 4, 4)))
    with pytest.raises(InputError, match="found keys: z"):
        load_depth_file(tmp_path / "k.npz", num_frames=1, size=(4, 4))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="cannot read"):
        load_depth_file(tmp_path / "junk.npy", num_frames=1, size=(4, 4))
    np.savez(tmp_path / "c.npz", disparity=np.ones((2, 4, 4)))
    with pytest.raises(InputError, match="constant"):
        load_depth_file(tmp_path / "c.npz", num_frames=2, size=(4, 4))
    with pytest.raises(InputError, match="kind"):
        load_depth_file(tmp_path / "c.npz", num_frames=2, size=(4, 4), kind="metric")


def test_file_estimator_and_get_estimator(tmp_path, rng):
    z = (rng.random((5, 8, 8)) + 1).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    est = get_estimator(str(tmp_path / "z.npy"))
    assert isinstance(est, FileDepth)
    out = est.estimate(np.zeros((3, 16, 16, 3), np.float32))
    assert out.depth.shape == (3, 16, 16)
    with pytest.raises(InputError, match="unknown depth estimator"):
        get_estimator("midas")


# ---- preview ----------------------------------------------------------------------------------
def test_colormap_and_preview():
    c = colormap(np.array([0.0, 0.5, 1.0]))
    assert c.dtype == np.uint8 and c.shape == (3, 3)
    assert c[0].sum() < c[1].sum() < c[2].sum()  # brighter towards 1
    z = np.array([[[1.0, 10.0]]], np.float32)
    p = depth_preview(z)
    assert p.shape == (1, 1, 2, 3) and p[0, 0, 0].sum() > p[0, 0, 1].sum()  # near is bright


def test_settings_json_roundtrip(tmp_path):
    DepthVideo(np.ones((1, 2, 2), np.float32), np.ones((1, 2, 2), bool), None, "e", {"a": [1, 2]}).save(
        tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz") as data:
        assert json.loads(str(data["settings"])) == {"a": [1, 2]}


@pytest.mark.parametrize("values, match", [
    (np.full((2, 4, 4), 1e30, np.float32), "outside \\[0.0001, 10000\\]"),
    (np.full((2, 4, 4), 1e-30, np.float32), "outside \\[0.0001, 10000\\]"),
    (np.concatenate([np.full((1, 4, 4), 2.0), np.full((1, 4, 4), 1e6)]).astype(np.float32), "frame 1 spans"),
    (np.full((2, 4, 4), 5000.0, np.float32), "no depth within the renderer's range"),
    (np.full((2, 4, 4), 5e-4, np.float32), "no depth within the renderer's range"),
])
def test_depth_that_can_only_render_an_empty_frame_is_refused(tmp_path, values, match):
    """Z-depth must lie in DEPTH_RANGE = [1e-4, 1e4] (the reference's own clip range,
    ten times the renderer's near/far planes) and each frame needs some depth within [1e-3, 1e3]."""
    np.save(tmp_path / "z.npy", values)
    with pytest.raises(InputError, match=match) as info:
        load_depth_file(tmp_path / "z.npy", num_frames=2, size=(4, 4))
    assert "z.npy" in str(info.value) and "\n" not in str(info.value)


def test_depth_range_edges_and_masked_outliers_are_accepted(tmp_path):
    z = np.full((2, 4, 4), 1e4, np.float32)
    z[:, 0, 0] = 1e-4  # the range's ends
    z[:, 1, 1] = 2.0  # something renderable in every frame
    np.save(tmp_path / "z.npy", z)
    assert load_depth_file(tmp_path / "z.npy", num_frames=2, size=(4, 4)).depth.max() == np.float32(1e4)
    z[:, 2, 2] = 1e30  # outside, but marked invalid: ignored (and filled with the largest valid depth)
    np.savez(tmp_path / "v.npz", depth=z, valid=z < 1e5)
    assert load_depth_file(tmp_path / "v.npz", num_frames=2, size=(4, 4)).depth.max() == np.float32(1e4)
