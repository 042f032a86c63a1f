"""Depth Anything V2 estimator: loading (tiny random model in the transformers layout), alignment, output."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ex4d.depth import get_estimator
from ex4d.depth.depth_anything import DepthAnythingV2, align_scale_shift, align_video, input_size
from ex4d.errors import CheckpointError, MissingWeightsError

REPO = "depth-anything/Depth-Anything-V2-Small-hf"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from transformers import DepthAnythingConfig, Dinov2Config, DepthAnythingForDepthEstimation

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=518,
                            patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8)
    root = tmp_path_factory.mktemp("models")
    DepthAnythingForDepthEstimation(config).save_pretrained(root / REPO)
    return root


def test_input_size_rule():
    assert input_size(576, 1024) == (518, 924)
    h, w = input_size(512, 512)
    assert (h, w) == (518, 518)
    h, w = input_size(100, 300)
    assert h >= 518 and h % 14 == 0 and w % 14 == 0 and abs(w / h - 3) < 0.05


def test_alignment_recovers_scale_and_shift():
    rng = np.random.default_rng(0)
    base = rng.random((16, 16)).astype(np.float32)
    s, b = align_scale_shift(base * 0.5 + 2.0, base, stride=1)
    assert s == pytest.approx(2.0, rel=1e-6) and b == pytest.approx(-4.0, rel=1e-6)
    video = np.stack([base, base * 3 + 1, base * 0.25 - 2])
    aligned, params = align_video(video)
    np.testing.assert_allclose(aligned, np.stack([base] * 3), atol=1e-5)
    assert params[0] == (1.0, 0.0)


def test_alignment_refuses_to_flip():
    base = np.random.default_rng(1).random((8, 8)).astype(np.float32)
    aligned, params = align_video(np.stack([base, -base]))
    assert params[1] == (1.0, 0.0)
    np.testing.assert_array_equal(aligned[1], -base)


def test_estimate_with_tiny_weights(models_dir, offline):
    est = get_estimator("depth-anything", models_dir=models_dir, device="cpu")
    assert isinstance(est, DepthAnythingV2)
    frames = np.random.default_rng(0).random((3, 28, 42, 3), dtype=np.float32)
    out = est.estimate(frames)
    assert out.depth.shape == (3, 28, 42) and out.depth.dtype == np.float32 and np.isfinite(out.depth).all()
    assert out.depth.min() == pytest.approx(10000 / 3900) and out.depth.max() <= 10000
    assert out.estimator == "depth-anything" and len(out.settings["scale_shift"]) == 3
    np.testing.assert_array_equal(est.estimate(frames).depth, out.depth)


def test_missing_weights(tmp_path, offline):
    with pytest.raises(MissingWeightsError, match=f"hf download {REPO} --local-dir"):
        get_estimator("depth-anything", models_dir=tmp_path, device="cpu")


def test_corrupt_weights(models_dir, tmp_path, offline):
    import shutil

    shutil.copytree(models_dir, tmp_path / "m")
    path = tmp_path / "m" / REPO / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        get_estimator("depth-anything", models_dir=tmp_path / "m", device="cpu")


def test_mismatched_weights(models_dir, tmp_path, offline):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(models_dir, tmp_path / "m")
    path = tmp_path / "m" / REPO / "model.safetensors"
    state = load_file(str(path))
    name = next(k for k in state if k.startswith("head."))
    state.pop(name)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing"):
        get_estimator("depth-anything", models_dir=tmp_path / "m", device="cpu")


@pytest.mark.parametrize("damage", ["nan", "int"])
def test_nan_or_integer_weights_are_checkpoint_errors_naming_the_tensor(models_dir, tmp_path, offline, damage):
    """Refused before loading (transformers would load them silently)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ex4d.errors import CheckpointError

    shutil.copytree(models_dir, tmp_path / "m")
    path = tmp_path / "m" / REPO / "model.safetensors"
    state = load_file(str(path))
    key = sorted(k for k in state if k.endswith(".weight"))[0]
    state[key] = state[key].fill_(float("nan")) if damage == "nan" else state[key].to(torch.int64)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        get_estimator("depth-anything", models_dir=tmp_path / "m", device="cpu")


def test_cached_depth_is_not_reused_after_the_weights_change(models_dir, offline, tmp_path):
    """A depth.npz made with other estimator weights is stale, as one made from another video is."""
    import shutil

    from ex4d.pipeline import estimate_depth
    from ex4d.types import Clip

    models = tmp_path / "m"
    shutil.copytree(models_dir, models)
    clip = Clip(frames=np.random.default_rng(0).random((2, 28, 42, 3), dtype=np.float32), fps=15.0, source="clip")
    out = tmp_path / "out"
    calls = []

    def run():
        depth = estimate_depth(clip, "depth-anything", out_dir=out, models_dir=str(models), device="cpu")
        calls.append(depth.settings.get("request", {}).get("weights"))
        return np.asarray(depth.depth[0])

    first = run()
    written = (out / "depth.npz").stat().st_mtime_ns
    np.testing.assert_array_equal(run(), first)  # unchanged weights: reused, not written again
    assert calls[0] == calls[1] and (out / "depth.npz").stat().st_mtime_ns == written
    weights = next((models / REPO).glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    save_file({k: (v * 1.5 if v.is_floating_point() and v.ndim > 1 else v) for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    changed = run()
    assert calls[2] != calls[1]  # the request names the new weights ...
    assert not np.array_equal(changed, first)  # ... and the depth was estimated again with them
    assert (out / "depth.npz").stat().st_mtime_ns != written
