"""DepthCrafter: UNet override, sampler details, windows, weight loading and the CLI (tiny models, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ex4d.depth.depthcrafter import (SCHEDULER_CONFIG, DepthCrafter, DepthCrafterPipeline, DepthCrafterSettings,
                                     blend_weights, clip_pixels, stitch, window_plan)
from ex4d.depth.depthcrafter_unet import DepthCrafterUNet, enable_single_token_cross_attention
from ex4d.depth.weights import check_state_dict
from ex4d.errors import CheckpointError, InputError, MissingWeightsError

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "checkpoints"

TINY_UNET = dict(sample_size=8, in_channels=8, out_channels=4,
                 down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
                 up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
                 block_out_channels=[32, 64], addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                 layers_per_block=1, cross_attention_dim=32, transformer_layers_per_block=1,
                 num_attention_heads=[2, 4], num_frames=4)
TINY_VAE = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4,
                layers_per_block=1, in_channels=3, out_channels=3, scaling_factor=0.18215, force_upcast=True,
                sample_size=16)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, patch_size=32,
                 image_size=224, projection_dim=32, num_channels=3)


def save_tiny_weights(root: Path) -> Path:
    """Tiny random models saved in the real on-disk layouts under ``root`` (a --models-dir)."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    DepthCrafterUNet(**TINY_UNET).save_pretrained(root / "tencent/DepthCrafter", safe_serialization=True)
    svd = root / "stabilityai/stable-video-diffusion-img2vid-xt"
    AutoencoderKLTemporalDecoder(**TINY_VAE).half().save_pretrained(svd / "vae", safe_serialization=True,
                                                                     variant="fp16")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).half().save_pretrained(
        svd / "image_encoder", safe_serialization=True, variant="fp16")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def estimator(models_dir):
    return DepthCrafter.from_pretrained(models_dir=models_dir, device="cpu", allow_download=False)


def frames(T=5, H=16, W=16, seed=0):
    return np.random.default_rng(seed).random((T, H, W, 3), dtype=np.float32)


# ---- full-size configs vs the manifests --------------------------------------------------------
@pytest.mark.skipif(not MANIFESTS.is_dir(), reason="checkpoint manifests not available")
@pytest.mark.parametrize("name", ["depthcrafter_unet", "svd_xt_vae", "svd_xt_image_encoder"])
def test_full_size_models_match_manifests(name):
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    with torch.device("meta"):
        if name == "depthcrafter_unet":
            model = DepthCrafterUNet.from_config(manifest["config"])
        elif name == "svd_xt_vae":
            model = AutoencoderKLTemporalDecoder.from_config(manifest["config"])
        else:
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**manifest["config"]))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == manifest["tensors"]
    assert len(got) == manifest["num_tensors"]
    assert sum(math.prod(s) for s in got.values()) == manifest["num_params"]
    # the loader's strict check accepts exactly this key set, and names what is wrong otherwise
    state = {k: torch.empty(s, device="meta") for k, s in manifest["tensors"].items()}
    check_state_dict(model, state, Path(name))
    state.pop(next(iter(state)))
    state["extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointError, match="1 missing.*1 unexpected"):
        check_state_dict(model, state, Path(name))


#: md5 of "key:d0xd1x...," over the sorted keys of each manifest, with tensor and parameter counts, so
#: that the check also runs where the manifests are not checked out.
MANIFEST_FINGERPRINTS = {
    "depthcrafter_unet": ("a7da5e591bca7f16a1937c108735c3df", 1428, 1524623082),
    "svd_xt_vae": ("c55e072611c42d5d796111281cbba2c5", 374, 97742847),
    "svd_xt_image_encoder": ("f4cac74909735c3105eeb571f2eb60ef", 520, 632076800),
}
FULL_CONFIGS = {
    "depthcrafter_unet": dict(
        addition_time_embed_dim=256, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
        down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"], in_channels=8,
        layers_per_block=2, num_attention_heads=[5, 10, 20, 20], num_frames=25, out_channels=4,
        projection_class_embeddings_input_dim=768, sample_size=96, transformer_layers_per_block=1,
        up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3),
    "svd_xt_vae": dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                       force_upcast=True, in_channels=3, latent_channels=4, layers_per_block=2, out_channels=3,
                       sample_size=768, scaling_factor=0.18215),
    "svd_xt_image_encoder": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                                 num_hidden_layers=32, patch_size=14, image_size=224, projection_dim=1024,
                                 layer_norm_eps=1e-5, hidden_act="gelu", num_channels=3),
}


@pytest.mark.parametrize("name", sorted(MANIFEST_FINGERPRINTS))
def test_full_size_models_match_manifest_fingerprints(name):
    import hashlib

    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        if name == "depthcrafter_unet":
            model = DepthCrafterUNet.from_config(FULL_CONFIGS[name])
        elif name == "svd_xt_vae":
            model = AutoencoderKLTemporalDecoder.from_config(FULL_CONFIGS[name])
        else:
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**FULL_CONFIGS[name]))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    text = ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in sorted(shapes.items()))
    digest, count, params = MANIFEST_FINGERPRINTS[name]
    assert (hashlib.md5(text.encode()).hexdigest(), len(shapes), sum(math.prod(s) for s in shapes.values())) == \
        (digest, count, params)


# ---- the UNet override --------------------------------------------------------------------------
def test_unet_per_frame_embeddings():
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    unet = DepthCrafterUNet(**TINY_UNET).eval()
    stock = UNetSpatioTemporalConditionModel(**TINY_UNET).eval()
    stock.load_state_dict(unet.state_dict())
    x, e = torch.randn(1, 5, 8, 8, 8), torch.randn(1, 1, 32)
    ids, t = torch.tensor([[7.0, 127.0, 0.02]]), torch.tensor(1.2)
    with torch.no_grad():
        same = unet(x, t, e.expand(1, 5, 32), ids).sample
        assert torch.equal(same, stock(x, t, e, ids).sample)  # equal embeddings -> stock forward
        E = torch.randn(1, 5, 32)
        distinct = unet(x, t, E, ids).sample
        assert (distinct - same).abs().max() > 1e-3
        # 4 transformers (1 down, 1 mid, 2 up), each with a spatial and a temporal attn2
        assert enable_single_token_cross_attention(unet) == 8
        shortcut = unet(x, t, E, ids).sample
    assert shortcut.shape == (1, 5, 4, 8, 8)
    torch.testing.assert_close(shortcut, distinct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one embedding per frame|\\(B, F, C\\)"):
        unet(x, t, e, ids)


# ---- sampler constants --------------------------------------------------------------------------
def test_scheduler_five_steps_exact():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    assert float(sched.init_noise_sigma) == pytest.approx(14.648819, rel=1e-6)
    sched.set_timesteps(5)
    np.testing.assert_allclose(sched.sigmas.numpy(), [700.0, 134.85445, 15.589968, 0.678146, 0.002, 0.0],
                               rtol=1e-6)
    np.testing.assert_allclose(sched.timesteps.numpy(),
                               [1.6377701, 1.2260489, 0.68665689, -0.097098172, -1.5536520], rtol=1e-6)
    assert float(sched.init_noise_sigma) == pytest.approx(700.00073, rel=1e-7)


def test_settings_defaults_are_ex4d():
    s = DepthCrafterSettings()
    assert (s.num_inference_steps, s.guidance_scale, s.window_size, s.overlap, s.seed) == (5, 1.0, 110, 25, 42)
    assert (s.noise_aug_strength, s.fps_id, s.motion_bucket_id, s.decode_chunk_size) == (0.02, 7, 127, 8)
    assert s.encode_dtype == "float32"


# ---- windows and stitching ----------------------------------------------------------------------
@pytest.mark.parametrize("T, expected", [
    (49, [(0, 49)]), (110, [(0, 110)]), (111, [(0, 110), (85, 111)]), (195, [(0, 110), (85, 195)]),
    (196, [(0, 110), (85, 195), (170, 196)]), (281, [(0, 110), (85, 195), (170, 280), (255, 281)]),
])
def test_window_plan(T, expected):
    windows, overlap = window_plan(T)
    assert windows == expected
    assert overlap == (0 if T <= 110 else 25)


def test_window_plan_rejects_zero_overlap():
    with pytest.raises(InputError, match="overlap"):
        window_plan(200, 110, 0)


def test_blend_weights_are_linspace():
    w = blend_weights(25)
    assert w.dtype == torch.float32 and w[0] == 0 and w[-1] == 1
    np.testing.assert_allclose(w.numpy(), np.arange(25) / 24, atol=6e-8)
    assert blend_weights(1).tolist() == [0.0]


def test_stitching_is_seamless_for_a_consistent_signal():
    T, window, overlap = 40, 16, 6
    signal = torch.sin(torch.arange(T, dtype=torch.float32) / 3)[None, :, None].repeat(1, 1, 2)
    windows, o = window_plan(T, window, overlap)
    acc = None
    for k, (a, b) in enumerate(windows):
        acc = stitch(acc, signal[:, a:b].clone(), o if k else 0)
    torch.testing.assert_close(acc, signal, rtol=0, atol=1e-6)


def test_stitching_weights_between_different_windows():
    # window k holds the constant k: shared frames must ramp from the old to the new value
    windows, o = window_plan(30, 12, 4)
    acc = None
    for k, (a, b) in enumerate(windows):
        acc = stitch(acc, torch.full((1, b - a, 1), float(k)), o if k else 0)
    assert acc.shape == (1, 30, 1)
    a1 = windows[1][0]
    np.testing.assert_allclose(acc[0, a1:a1 + o, 0].numpy(), np.linspace(0, 1, o), atol=1e-7)
    assert acc[0, a1 - 1, 0] == 0 and acc[0, a1 + o, 0] == 1


def test_clip_pixels_squash_and_normalise():
    x = torch.zeros(2, 3, 64, 128)  # mid-grey in [-1, 1]
    y = clip_pixels(x)
    assert y.shape == (2, 3, 224, 224) and y.dtype == torch.float32
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(y[0, :, 100, 100], (0.5 - mean) / std)


# ---- end to end with tiny weights loaded through the real loaders -------------------------------
def test_estimate_shapes_range_determinism(estimator):
    f = frames(T=5)
    out = estimator.estimate(f)
    assert out.depth.shape == (5, 16, 16) and out.depth.dtype == np.float32
    assert np.isfinite(out.depth).all() and out.valid.all() and out.K is None
    assert out.depth.min() == pytest.approx(10000 / 3900) and out.depth.max() <= 10000
    assert out.settings["window_size"] == 110 and out.settings["seed"] == 42
    again = estimator.estimate(f)
    np.testing.assert_array_equal(out.depth, again.depth)
    estimator.pipeline.settings.seed = 43
    try:
        other = estimator.estimate(f)
    finally:
        estimator.pipeline.settings.seed = 42
    assert np.abs(other.depth - out.depth).max() > 0


def test_noise_assignment_and_long_video(estimator, monkeypatch):
    """Several windows: unit noise of frame f is eps_init[f mod W]; overlap frames restart from the
    stitched latents plus noise at sigma_max (depthcrafter-spec.md 4.2)."""
    import ex4d.depth.depthcrafter as dc

    pipe = estimator.pipeline
    settings = pipe.settings
    monkeypatch.setattr(settings, "window_size", 6)
    monkeypatch.setattr(settings, "overlap", 2)
    T = 13
    windows, o = window_plan(T, 6, 2)
    assert len(windows) == 3
    first_inputs, stitched = [], []
    real_call, real_stitch = pipe._unet_call, dc.stitch

    def spy_unet(sample, t, ehs, ids):
        if len(first_inputs) < len(stitched) + 1:
            first_inputs.append(sample[:, :, :4].clone())
        return real_call(sample, t, ehs, ids)

    def spy_stitch(acc, latents, overlap):
        out = real_stitch(acc, latents, overlap)
        stitched.append(out.clone())
        return out

    monkeypatch.setattr(pipe, "_unet_call", spy_unet)
    monkeypatch.setattr(dc, "stitch", spy_stitch)
    f = frames(T=T)
    latents = pipe(f, output="latent")
    assert latents.shape == (1, T, 4, 8, 8) and torch.isfinite(latents).all()
    assert len(first_inputs) == 3

    # redraw the two random tensors in the reference's order
    g = torch.Generator().manual_seed(42)
    torch.randn((T, 3, 16, 16), generator=g)
    sigma0, init_sigma = 700.0, math.sqrt(700.0 ** 2 + 1)
    eps = torch.randn((1, 6, 4, 8, 8), generator=g) * init_sigma
    c_in = 1 / math.sqrt(sigma0 ** 2 + 1)
    for k, (a, b) in enumerate(windows):
        idx = torch.arange(a, b) % 6
        expected = eps[:, idx].clone()
        if k:
            expected[:, :o] = stitched[k - 1][:, a:a + o] + eps[:, idx[:o]] / init_sigma * sigma0
        torch.testing.assert_close(first_inputs[k], expected * c_in, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stitched[-1], latents)


def test_offload_and_options_give_the_same_output(estimator):
    """Offloading, decode batching and the single-token shortcut do not change the result."""
    pipe = estimator.pipeline
    f = frames(T=17)  # decoded as 8+8 (one call with decode_batch=2) + 1
    reference = pipe(f)
    settings = DepthCrafterSettings(decode_batch=2, single_token_attention=True, encode_chunk_size=4)
    other = DepthCrafterPipeline(pipe.unet, pipe.vae, pipe.image_encoder, device="cpu", dtype=torch.float32,
                                 settings=settings, offload=True)
    try:
        np.testing.assert_allclose(other(f), reference, atol=1e-5)
    finally:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_short_video_single_window(estimator):
    out = estimator.estimate(frames(T=2, H=8, W=12))
    assert out.depth.shape == (2, 8, 12) and np.isfinite(out.depth).all()


def test_frames_must_fit_the_model(estimator):
    with pytest.raises(InputError, match="divisible by 4"):
        estimator.estimate(frames(T=2, H=10, W=16))
    with pytest.raises(InputError, match="float in \\[0, 1\\]"):
        estimator.estimate((frames(T=2) * 255).astype(np.uint8))
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        estimator.estimate(frames(T=2) * 255)


# ---- weights: missing, corrupt, mismatched ------------------------------------------------------
def test_missing_weights_message(tmp_path, offline):
    with pytest.raises(MissingWeightsError) as info:
        DepthCrafter.from_pretrained(models_dir=tmp_path / "empty", device="cpu")
    msg = str(info.value)
    assert "diffusion_pytorch_model.safetensors" in msg
    assert f"hf download tencent/DepthCrafter --local-dir {tmp_path / 'empty'}/tencent/DepthCrafter" \
        in msg
    assert info.value.exit_code == 2


def test_missing_svd_names_the_svd_repo(models_dir, tmp_path, offline):
    import shutil

    shutil.copytree(models_dir / "tencent", tmp_path / "tencent")
    with pytest.raises(MissingWeightsError, match="stable-video-diffusion-img2vid-xt") as info:
        DepthCrafter.from_pretrained(models_dir=tmp_path, device="cpu")
    # only the two SVD parts DepthCrafter uses are named, and the licence step is mentioned
    assert "vae/diffusion_pytorch_model.fp16.safetensors image_encoder/config.json" in str(info.value)
    assert "licence" in str(info.value) and "unet" not in str(info.value)


def test_truncated_weight_file(models_dir, tmp_path, offline):
    import shutil

    shutil.copytree(models_dir, tmp_path / "m")
    path = tmp_path / "m/tencent/DepthCrafter/diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*corrupt or incomplete"):
        DepthCrafter.from_pretrained(models_dir=tmp_path / "m", device="cpu")


def test_wrong_keys_are_listed(models_dir, tmp_path, offline):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(models_dir, tmp_path / "m")
    path = tmp_path / "m/tencent/DepthCrafter/diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state.pop("conv_in.weight")
    state["conv_in.bias"] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="1 missing: conv_in.weight.*wrong shape: conv_in.bias"):
        DepthCrafter.from_pretrained(models_dir=tmp_path / "m", device="cpu")


@pytest.mark.parametrize("damage", ["nan", "inf", "int", "empty"])
@pytest.mark.parametrize("file", ["tencent/DepthCrafter/diffusion_pytorch_model.safetensors",
                                  "stabilityai/stable-video-diffusion-img2vid-xt/vae/diffusion_pytorch_model.fp16.safetensors"])
def test_integer_nan_inf_tensors_and_empty_files_are_checkpoint_errors(models_dir, tmp_path, offline, damage, file):
    """A damaged value is named, never loaded (a NaN weight would give a black depth)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(models_dir, tmp_path / "m")
    path = tmp_path / "m" / file
    if damage == "empty":
        path.write_bytes(b"")
        match = "header too small|corrupt or incomplete"
    else:
        state = load_file(str(path))
        key = "conv_in.weight" if "DepthCrafter" in file else "encoder.conv_in.weight"
        value = state[key].float()
        value.view(-1)[0] = float("nan") if damage == "nan" else float("inf")
        state[key] = value.to(state[key].dtype) if damage != "int" else state[key].to(torch.int16)
        save_file(state, str(path))
        match = rf"{key}.*(NaN/inf|int16)"
    with pytest.raises(CheckpointError, match=match):
        DepthCrafter.from_pretrained(models_dir=tmp_path / "m", device="cpu")


# ---- CLI ----------------------------------------------------------------------------------------
def _video(path: Path, T=4, H=64, W=64):
    from ex4d.io.video import write_video

    rng = np.random.default_rng(0)
    write_video(path, (rng.random((T, H, W, 3)) * 255).astype(np.uint8), 24)
    return path


def test_cli_missing_weights_exit_2(tmp_path, offline, capsys):
    from ex4d.cli import main

    video = _video(tmp_path / "in.mp4")
    code = main(["depth", str(video), "-o", str(tmp_path / "out"), "--models-dir", str(tmp_path / "none"),
                 "--num-frames", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "hf download tencent/DepthCrafter" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "depth.npz").exists()


def test_cli_depth_end_to_end(models_dir, tmp_path, offline, capsys):
    from ex4d.cli import main
    from ex4d.depth import load_depth_file

    video = _video(tmp_path / "in.mp4", T=4, H=70, W=90)  # reference resize -> 64x64
    out = tmp_path / "out"
    code = main(["depth", str(video), "-o", str(out), "--models-dir", str(models_dir), "--num-frames", "3",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    depth = load_depth_file(out / "depth.npz", num_frames=3, size=(64, 64))
    assert depth.estimator == "depthcrafter" and depth.depth.shape == (3, 64, 64)
    assert (out / "depth_preview.mp4").stat().st_size > 0


def test_cli_fast_kernels_are_recorded(models_dir, tmp_path, offline, capsys):
    """--fast-kernels reaches the pipeline (fused GroupNorm etc.) and is recorded in depth.npz's settings."""
    from ex4d.cli import main
    from ex4d.depth import load_depth_file
    from ex4d.depth.depthcrafter import FAST_KERNELS

    video = _video(tmp_path / "in.mp4", T=4, H=70, W=90)
    out = tmp_path / "out"
    code = main(["depth", str(video), "-o", str(out), "--models-dir", str(models_dir), "--num-frames", "3",
                 "--device", "cpu", "--fast-kernels", "--no-preview"])
    assert code == 0, capsys.readouterr().err
    settings = load_depth_file(out / "depth.npz", num_frames=3, size=(64, 64)).settings
    assert all(settings[k] == v for k, v in FAST_KERNELS.items()) and settings["compile"] is False
    # recon with the same options (--depth-* spelling) reuses that depth.npz instead of recomputing
    made = (out / "depth.npz").stat().st_mtime_ns
    code = main(["recon", str(video), "-o", str(out), "--models-dir", str(models_dir), "--num-frames", "3",
                 "--device", "cpu", "--depth-fast-kernels", "--cam", "30", "--save-mesh", "none"])
    assert code == 0, capsys.readouterr().err
    assert (out / "depth.npz").stat().st_mtime_ns == made and (out / "color_30.mp4").is_file()
    code = main(["depth", str(video), "-o", str(out), "--models-dir", str(models_dir), "--depth", "depth-anything",
                 "--fast-kernels", "--num-frames", "3", "--device", "cpu"])
    assert code == 1 and "--fast-kernels" in capsys.readouterr().err  # bad input


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_fast_switches_on_cuda(models_dir, tmp_path, offline, capsys):
    """On a GPU, through the real loader and the CLI: --fast-kernels (Triton GroupNorm) and --compile give
    the default run's depth up to fp16 rounding."""
    from ex4d.cli import main
    from ex4d.depth import load_depth_file
    from ex4d.depth import fused_groupnorm

    video = _video(tmp_path / "in.mp4", T=9, H=128, W=192)
    results = {}
    for name, flags in (("default", []), ("fast", ["--fast-kernels"]), ("compiled", ["--compile"])):
        out = tmp_path / name
        before = fused_groupnorm.CALLS["triton"]
        code = main(["depth", str(video), "-o", str(out), "--models-dir", str(models_dir), "--num-frames", "9",
                     "--device", "cuda", "--no-preview", *flags])
        assert code == 0, capsys.readouterr().err
        assert (fused_groupnorm.CALLS["triton"] > before) == bool(flags)  # the Triton path ran when asked
        results[name] = load_depth_file(out / "depth.npz", num_frames=9, size=(128, 192)).depth
    disparity = {k: 1 / v for k, v in results.items()}
    scale = disparity["default"].max()
    for name in ("fast", "compiled"):
        assert np.abs(disparity[name] - disparity["default"]).max() / scale < 0.02, name
