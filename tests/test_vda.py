"""Video Depth Anything: full-size key mapping, strict loading of tiny models saved in the
official layout (a flat ``.pth`` state dict), preprocessing sizes, windows and stitching, the CLI
end to end, metric flags, licence notices and missing-weights errors.

The network runs here only as tiny random-weight models at a small input size (the full-size model
is checked on the meta device against the manifests in ``shared/checkpoints``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ex4d.cli import main
from ex4d.depth import get_estimator, vda, vda_model
from ex4d.depth import weights as dw
from ex4d.depth.vda import (WindowStitcher, fit_scale_shift, input_size, load_vda, num_windows,
                            run_windows, window_inputs)
from ex4d.depth.vda_model import CONFIGS, VDAConfig, VideoDepthAnythingNet, interpolate_pos_embed, sinusoid_table
from ex4d.errors import CheckpointError, InputError, MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

MANIFESTS = Path(os.environ.get("EX4D_CHECKPOINT_MANIFESTS",
                                Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints"))
needs_manifests = pytest.mark.skipif(not (MANIFESTS / "video_depth_anything_vits.json").is_file(),
                                     reason=f"checkpoint manifests not found in {MANIFESTS} "
                                            "(set EX4D_CHECKPOINT_MANIFESTS to the shared/checkpoints folder)")
TOTALS = {"vits": 29_035_137, "vitb": 114_441_409, "vitl": 384_390_337}
#: A tiny model of the same structure (GroupNorm needs 32 | channels; 8 temporal heads).
TINY = VDAConfig(32, 4, 2, (0, 1, 2, 3), 32, (32, 32, 32, 32), head_features_2=8)
SMALL_INPUT = 42  # network short side for the tiny models (3 patches): fast on a CPU


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the tiny model, with a positive output bias so the depth is not all zero."""
    torch.manual_seed(seed)
    model = VideoDepthAnythingNet(TINY)
    with torch.no_grad():
        model.head.scratch.output_conv2[2].bias.fill_(1.0)
        for name, p in model.named_parameters():
            if name.endswith("proj_out.weight"):  # zero-initialised in training; make the modules act
                p.normal_(0, 0.02)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Every VDA repository with a tiny model saved as the official files are: torch.save of a flat dict."""
    root = tmp_path_factory.mktemp("models")
    for i, (variant, metric) in enumerate(dw.VDA_FILES):
        spec = dw.vda_file(variant, metric)
        path = root / spec.repo / spec.weights[0]
        path.parent.mkdir(parents=True)
        torch.save(tiny_state(i), path)
    return root


@pytest.fixture
def tiny(monkeypatch):
    """Every size's config is the tiny one, and the input short side is small."""
    for name in CONFIGS:
        monkeypatch.setitem(vda_model.CONFIGS, name, TINY)
    monkeypatch.setattr(vda, "DEFAULT_INPUT_SIZE", SMALL_INPUT)


# ---- the full-size mapping against the manifests --------------------------------------------

@needs_manifests
@pytest.mark.parametrize("encoder", ["vits", "vitb", "vitl"])
def test_full_size_model_has_exactly_the_manifest_keys_shapes_and_counts(encoder):
    manifest = json.loads((MANIFESTS / f"video_depth_anything_{encoder}.json").read_text())
    with torch.device("meta"):
        model = VideoDepthAnythingNet(CONFIGS[encoder])
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert state == manifest["tensors"]  # every key and shape, nothing more
    assert len(state) == manifest["num_tensors"] == CONFIGS[encoder].num_tensors
    params = sum(p.numel() for p in model.parameters())
    assert params == manifest["num_params"] == TOTALS[encoder] == CONFIGS[encoder].num_params
    buffers = {k: list(v.shape) for k, v in model.named_buffers()}
    assert buffers == manifest["buffers_in_state_dict"] and len(buffers) == 8
    assert params + sum(int(np.prod(s)) for s in buffers.values()) == manifest["num_state_dict_elements"]
    fingerprint = ",".join(sorted(f"{k}:{'_'.join(map(str, s))}" for k, s in state.items()))
    assert hashlib.md5(fingerprint.encode()).hexdigest() == manifest["keys_shapes_md5"]


@pytest.mark.parametrize("encoder", ["vits", "vitb", "vitl"])
def test_full_size_parameter_totals_without_the_manifests(encoder):
    with torch.device("meta"):
        model = VideoDepthAnythingNet(CONFIGS[encoder])
    assert sum(p.numel() for p in model.parameters()) == TOTALS[encoder]
    assert len(model.state_dict()) == CONFIGS[encoder].num_tensors
    assert sum(k.endswith("pos_encoder.pe") for k in model.state_dict()) == 8


@needs_manifests
def test_a_full_size_state_dict_passes_the_strict_check_and_a_missing_pe_table_fails():
    manifest = json.loads((MANIFESTS / "video_depth_anything_vits.json").read_text())
    with torch.device("meta"):
        model = VideoDepthAnythingNet(CONFIGS["vits"])
        state = {k: torch.empty(s) for k, s in manifest["tensors"].items()}
    dw.check_state_dict(model, state, Path("video_depth_anything_vits.pth"))
    pe = "head.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    del state[pe]
    with pytest.raises(CheckpointError, match="pos_encoder.pe"):
        dw.check_state_dict(model, state, Path("video_depth_anything_vits.pth"))


def test_sinusoid_table_is_the_specs_formula():
    pe = sinusoid_table(32, 64)[0].double()
    t, i = 7, 5
    assert float(pe[t, 2 * i]) == pytest.approx(np.sin(t * 10000 ** (-2 * i / 64)), abs=1e-6)
    assert float(pe[t, 2 * i + 1]) == pytest.approx(np.cos(t * 10000 ** (-2 * i / 64)), abs=1e-6)


# ---- the position table: DINOv2's resampling, not transformers' -----------------------------

def test_pos_embed_resampling_is_dinov2s_scale_factor_and_differs_from_transformers():
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 16)
    h, w = 19, 33
    ours = interpolate_pos_embed(table, h, w)
    grid = table[:, 1:].reshape(1, 37, 37, 16).permute(0, 3, 1, 2)
    spec = torch.nn.functional.interpolate(grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic",
                                           antialias=False).permute(0, 2, 3, 1).reshape(1, h * w, 16)
    assert torch.equal(ours, torch.cat([table[:, :1], spec], 1))
    assert torch.equal(interpolate_pos_embed(table, 37, 37), table)  # 518 x 518: the table as is

    emb = Dinov2Embeddings(Dinov2Config(hidden_size=16, patch_size=14, image_size=518))
    emb.position_embeddings.data.copy_(table)
    theirs = emb.interpolate_pos_encoding(torch.zeros(1, 1 + h * w, 16), h * 14, w * 14)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() > 1e-3  # resampled to a size, not by the offset scale: not equivalent


def test_backbone_equals_transformers_dinov2_where_no_resampling_is_needed():
    """At 518 x 518 (the table used as is) our DINOv2 gives transformers' Dinov2Model's hidden states
    (fused qkv split into q, k, v), each tapped block through the final LayerNorm: the blocks agree, only
    the position-table resampling differs (test above)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    ours = vda_model.DinoV2(TINY).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    hf = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=518,
                                  patch_size=14, layer_norm_eps=1e-6)).eval()
    mapped = {"embeddings.cls_token": ours.cls_token, "embeddings.mask_token": ours.mask_token,
              "embeddings.position_embeddings": ours.pos_embed,
              "embeddings.patch_embeddings.projection.weight": ours.patch_embed.proj.weight,
              "embeddings.patch_embeddings.projection.bias": ours.patch_embed.proj.bias,
              "layernorm.weight": ours.norm.weight, "layernorm.bias": ours.norm.bias}
    for i, block in enumerate(ours.blocks):
        pre = f"encoder.layer.{i}."
        for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                mapped[pre + f"{name}.{kind}"] = block.get_submodule(name).get_parameter(kind)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            mapped[pre + f"attention.{name}.weight"] = block.attn.qkv.weight.chunk(3)[j]
            mapped[pre + f"attention.{name}.bias"] = block.attn.qkv.bias.chunk(3)[j]
        mapped[pre + "attention.o_proj.weight"] = block.attn.proj.weight
        mapped[pre + "attention.o_proj.bias"] = block.attn.proj.bias
        mapped[pre + "layer_scale1.lambda1"] = block.ls1.gamma
        mapped[pre + "layer_scale2.lambda1"] = block.ls2.gamma
    assert mapped.keys() == hf.state_dict().keys()
    hf.load_state_dict({k: v.detach() for k, v in mapped.items()}, strict=True)
    x = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        taps = ours(x)
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states
    for tap, i in zip(taps, TINY.layer_idx):
        torch.testing.assert_close(tap, hf.layernorm(hidden[i + 1])[:, 1:], atol=1e-4, rtol=1e-4)


# ---- preprocessing sizes --------------------------------------------------------------------

@pytest.mark.parametrize("hw, expected", [
    ((720, 1280), (518, 924)), ((480, 854), (518, 924)), ((480, 832), (518, 896)), ((480, 640), (518, 686)),
    ((512, 512), (518, 518)), ((544, 1280), (392, 924)),  # the spec's examples (2.35:1 hits the aspect guard)
    ((1280, 720), (924, 518)),  # portrait
    ((576, 1024), (518, 924)), ((100, 1000), (98, 980)),
    ((333, 517), (518, 798)),  # 517 * 518/333 = 804.2 -> 57 patches
])
def test_input_size_follows_the_reference(hw, expected):
    assert input_size(*hw) == expected
    h, w = input_size(*hw)
    assert h % 14 == 0 and w % 14 == 0


def test_input_size_odd_aspects_keep_the_short_side_at_the_target():
    rng = np.random.default_rng(0)
    for _ in range(200):
        H, W = (int(v) for v in rng.integers(16, 3000, size=2))
        h, w = input_size(H, W)
        r = max(H, W) / min(H, W)
        target = 518 if r <= 1.78 else int(round(int(518 * 1.777 / r) / 14) * 14)
        assert min(h, w) == target and h % 14 == 0 and w % 14 == 0
        assert abs(max(h, w) - max(H, W) * target / min(H, W)) <= 14  # aspect kept to one patch


@pytest.mark.parametrize("hw", [(576, 1024), (480, 640), (48, 64), (1080, 1920)])
def test_preprocessing_matches_opencv_bicubic(hw):
    """The reference resizes with cv2.INTER_CUBIC on float [0, 1]; PyTorch's bicubic (run on the device)
    is the same kernel: within 1.2e-4 per pixel (measured up to 1.2e-4 at 1080x1920, 5e-5 at the others),
    then the same ImageNet normalisation."""
    import cv2

    frame = np.random.default_rng(0).random((*hw, 3), dtype=np.float32)
    size = input_size(*hw)
    got = vda.preprocess(frame, size).numpy()
    resized = cv2.resize(frame, size[::-1], interpolation=cv2.INTER_CUBIC)
    expected = ((resized - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])).transpose(2, 0, 1)
    assert got.shape == (3, *size)
    assert np.abs(got - expected).max() < 1.5e-4 / 0.224


# ---- windows and stitching -------------------------------------------------------------------

def test_window_slots_follow_the_spec():
    windows = list(window_inputs(range(70), 70))
    assert len(windows) == num_windows(70) == 4
    assert windows[0] == list(range(32))
    assert windows[1] == [0, 12, *range(24, 32), *range(32, 54)]  # the spec's simulation
    assert windows[2] == [0, 34, *range(46, 54), *range(54, 70), *[69] * 6]  # padded with the last frame
    assert all(w[0] == 0 and len(w) == 32 for w in windows)
    for k in range(1, len(windows)):  # slot 1 = previous slot 12; slots 2..9 = previous slots 24..31
        assert windows[k][1] == windows[k - 1][12] and windows[k][2:10] == windows[k - 1][24:32]
    assert list(window_inputs(range(1), 1)) == [[0] * 32]
    assert len(list(window_inputs(range(22), 22))) == 1 and len(list(window_inputs(range(23), 23))) == 2


def test_windows_read_the_clip_lazily():
    read = []

    def frames():
        for k in range(100):
            read.append(k)
            yield k

    it = window_inputs(frames(), 100)
    next(it)
    assert len(read) == 32
    next(it)
    assert len(read) == 54


def test_fit_scale_shift_is_exact_on_an_affine_pair():
    p = np.random.default_rng(0).random((2, 9, 7), dtype=np.float32)
    a, b = fit_scale_shift(p, 2.5 * p + 0.75)
    assert a == pytest.approx(2.5, rel=1e-4) and b == pytest.approx(0.75, rel=1e-4)
    assert fit_scale_shift(np.ones((2, 3, 3)), np.ones((2, 3, 3))) == (1.0, 0.0)  # singular


def _known_disparity(T: int) -> np.ndarray:
    """Disparity (T, H, W) of a synthetic scene with moving spheres (exact z-depth from ex4d.synthetic)."""
    from ex4d.synthetic import make_example

    _, depth = make_example("spheres_moving", num_frames=T, size=(24, 32))
    return (1.0 / np.asarray(depth.depth)).astype(np.float32)


@pytest.mark.parametrize("T", [1, 22, 49, 200])
def test_stitching_recovers_known_depth_up_to_one_affine_map(T):
    """A model stand-in returns the true disparity of its 32 slots under a random scale and shift per
    window; the stitched video must be the true one under a single affine map. With exact per-window
    affinity the keyframe fit is exact, so the tolerance is float32 rounding: 2e-5 of the range (measured
    up to 2.2e-6 at 200 frames; with the reference's float32 normal equations 1.2e-3 at 49 frames)."""
    truth = _known_disparity(T)
    rng = np.random.default_rng(T)

    def stand_in(slots):
        return truth[slots] * np.float32(rng.uniform(0.2, 5.0)) + np.float32(rng.uniform(0.0, 3.0))

    stitcher = WindowStitcher(T)
    out = np.concatenate(list(run_windows(stand_in, range(T), T, stitcher=stitcher)))
    assert out.shape == truth.shape and len(stitcher.params) == num_windows(T)
    (a, b), *_ = np.linalg.lstsq(np.stack([out.ravel(), np.ones(out.size)], 1), truth.ravel().astype(np.float64),
                                 rcond=None)
    err = np.abs(a * out + b - truth).max() / np.ptp(truth)
    assert err < 2e-5, err
    if T > 22:  # a real per-window map was undone: the fits differ from identity
        assert any(abs(s - 1) > 1e-2 for s, _ in stitcher.params[1:])


def test_stitching_with_noise_stays_within_one_percent():
    """Per-window scale/shift plus 0.2 % pixel noise: the global affine fit of the stitched video stays
    within 1 % of the range at every pixel (drift is anchored to frame 0 by slot 0)."""
    T = 120
    truth = _known_disparity(T)
    rng = np.random.default_rng(1)
    span = float(np.ptp(truth))

    def stand_in(slots):
        noise = rng.normal(0, 0.002 * span, size=(len(slots), *truth.shape[1:])).astype(np.float32)
        return (truth[slots] + noise) * np.float32(rng.uniform(0.5, 2.0)) + np.float32(rng.uniform(0, 1))

    out = np.concatenate(list(run_windows(stand_in, range(T), T)))
    (a, b), *_ = np.linalg.lstsq(np.stack([out.ravel(), np.ones(out.size)], 1), truth.ravel().astype(np.float64),
                                 rcond=None)
    assert np.abs(a * out + b - truth).max() / span < 0.01


def test_metric_stitching_does_not_rescale_but_blends():
    T = 40
    truth = _known_disparity(T)
    calls = []

    def stand_in(slots):
        calls.append(len(calls))
        return truth[slots] * (1.0 + len(calls))  # window k: scale k + 2 (a metric model would not drift)

    out = np.concatenate(list(run_windows(stand_in, range(T), T, metric=True)))
    np.testing.assert_allclose(out[:24], truth[:24] * 2, rtol=1e-6)  # window 0 as predicted
    w = np.linspace(1, 0, 8, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(out[24:32], truth[24:32] * 2 * w + truth[24:32] * 3 * (1 - w), rtol=1e-5)
    np.testing.assert_allclose(out[32:], truth[32:] * 3, rtol=1e-6)  # not aligned back to window 0


# ---- loading --------------------------------------------------------------------------------

@pytest.mark.parametrize("zip_format", [True, False])  # the old (non-zip) torch format cannot be memory-mapped
def test_strict_load_of_a_tiny_official_layout_file(tmp_path, zip_format):
    path = tmp_path / "video_depth_anything_vits.pth"
    state = tiny_state()
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    model = load_vda(path, TINY, device="cpu")
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)  # every tensor, the 8 pe tables included
    assert sum(k.endswith("pos_encoder.pe") for k in loaded) == 8


@pytest.mark.parametrize("damage", ["wrapped", "missing_pe", "extra", "shape", "pe_values", "nan", "truncated",
                                    "pickle_code"])
def test_bad_files_are_checkpoint_errors(tmp_path, damage):
    path = tmp_path / "video_depth_anything_vits.pth"
    state = tiny_state()
    pe = "head.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    if damage == "wrapped":
        state = {"model": state}
    elif damage == "missing_pe":
        del state[pe]
    elif damage == "extra":
        state["head.extra.weight"] = torch.zeros(3)
    elif damage == "shape":
        state["pretrained.norm.weight"] = torch.zeros(7)
    elif damage == "pe_values":
        state[pe] = torch.rand_like(state[pe])
    elif damage == "nan":
        state["pretrained.norm.weight"][0] = float("nan")
    if damage == "pickle_code":
        import pickle

        path.write_bytes(pickle.dumps(print, protocol=2))  # a pickle that names a callable: refused, never run
    else:
        torch.save(state, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_vda(path, TINY, device="cpu")


def test_a_full_size_config_asserts_the_counts(tmp_path):
    """The tiny file loaded against a config that states counts: keys differ, so it is refused."""
    path = tmp_path / "video_depth_anything_vits.pth"
    torch.save(tiny_state(), path)
    with pytest.raises(CheckpointError):
        load_vda(path, CONFIGS["vits"], device="cpu")


# ---- the estimator --------------------------------------------------------------------------

@pytest.fixture
def small_vda(tiny, models_dir, offline):
    return get_estimator("vda", models_dir=models_dir, device="cpu")


def test_estimator_window_by_window_equals_in_memory(small_vda, tmp_path):
    from ex4d.types import Clip

    frames = np.random.default_rng(0).random((30, 20, 28, 3), dtype=np.float32)
    whole = small_vda.estimate(frames)
    assert whole.depth.shape == (30, 20, 28) and whole.valid.all()
    assert whole.depth.min() == pytest.approx(10000 / 3900) and whole.depth.max() <= 10000
    assert whole.estimator == "vda" and whole.settings["metric"] is False and whole.settings["licence"] == "Apache-2.0"
    assert whole.settings["input_size"] == [SMALL_INPUT, 56] and len(whole.settings["scale_shift"]) == 2
    streamed = small_vda.estimate(Clip(frames=frames, fps=10.0), spill_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(streamed.depth), whole.depth)
    streamed.depth.release()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".depth_raw")]


def test_metric_estimator_gives_metres_and_is_flagged_metric(tiny, models_dir, offline, tmp_path):
    from ex4d.pipeline import _depth_is_metric
    from ex4d.types import Clip

    est = get_estimator("vda-metric", models_dir=models_dir, device="cpu")
    frames = np.random.default_rng(1).random((5, 20, 28, 3), dtype=np.float32)
    out = est.estimate(frames)
    raw = np.concatenate([est.infer_window(s, (20, 28)).numpy() for s in window_inputs(
        [vda.preprocess(f, input_size(20, 28, SMALL_INPUT)) for f in frames], 5)])[:5]
    np.testing.assert_allclose(out.depth, raw, rtol=1e-6)  # metres as predicted, no normalisation
    assert out.estimator == "vda-metric" and out.settings["units"] == "metres" and _depth_is_metric(out)
    streamed = est.estimate(Clip(frames=frames, fps=10.0), spill_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(streamed.depth), out.depth)
    np.testing.assert_array_equal(np.asarray(streamed.valid), out.valid)
    assert not _depth_is_metric(get_estimator("vda", models_dir=models_dir, device="cpu").estimate(frames))


def test_metric_invalid_pixels_take_the_farthest_depth():
    z, valid = vda.metric_frame(np.array([[0.0, 2.0], [5.0, 1e6]], np.float32))
    assert valid.tolist() == [[False, True], [True, False]] and z.tolist() == [[5.0, 2.0], [5.0, 5.0]]


@pytest.mark.parametrize("name, notice", [("vda", False), ("vda-metric", False), ("vda-base", True),
                                          ("vda-large", True), ("vda-metric-base", True),
                                          ("vda-metric-large", True)])
def test_licence_notice_for_the_non_commercial_sizes(tiny, models_dir, offline, caplog, name, notice):
    with caplog.at_level(logging.WARNING, logger="ex4d.depth.vda"):
        est = get_estimator(name, models_dir=models_dir, device="cpu")
    lines = [r.getMessage() for r in caplog.records if "CC-BY-NC-4.0" in r.getMessage()]
    assert len(lines) == (1 if notice else 0)
    assert est.name == name and est.licence == ("CC-BY-NC-4.0" if notice else "Apache-2.0")


@pytest.mark.parametrize("name, repo, file", [
    ("vda", "depth-anything/Video-Depth-Anything-Small", "video_depth_anything_vits.pth"),
    ("vda-metric", "depth-anything/Metric-Video-Depth-Anything-Small", "metric_video_depth_anything_vits.pth"),
    ("vda-large", "depth-anything/Video-Depth-Anything-Large", "video_depth_anything_vitl.pth"),
])
def test_missing_weights_name_the_download_command(tmp_path, offline, name, repo, file):
    with pytest.raises(MissingWeightsError, match=f"hf download {repo} {file} --local-dir {tmp_path}/{repo}"):
        get_estimator(name, models_dir=tmp_path, device="cpu")


def test_unknown_options_are_refused(tiny, models_dir, offline):
    with pytest.raises(InputError, match="num_inference_steps"):
        get_estimator("vda", models_dir=models_dir, device="cpu", num_inference_steps=5)


# ---- the command line -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_video(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    assert main(["synth", "-o", str(folder), "--num-frames", "25", "--size", "48x64"]) == 0
    return folder / "video.mp4"


def test_ex4d_depth_vda_end_to_end(tiny, models_dir, offline, clip_video, tmp_path):
    from ex4d.types import DepthVideo

    out = tmp_path / "out"
    args = ["depth", str(clip_video), "-o", str(out), "--depth", "vda", "--models-dir", str(models_dir),
            "--num-frames", "25", "--device", "cpu"]
    assert main(args) == 0
    depth = DepthVideo.load(out / "depth.npz")
    z = np.asarray(depth.depth)
    assert z.shape[0] == 25 and np.isfinite(z).all() and z.min() == pytest.approx(10000 / 3900)
    assert depth.estimator == "vda" and depth.settings["metric"] is False
    assert depth.settings["weights"].endswith("video_depth_anything_vits.pth")
    assert (out / "depth_preview.mp4").stat().st_size > 0


def test_ex4d_depth_vda_without_weights_exits_2_with_the_command(offline, clip_video, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["depth", str(clip_video), "-o", str(out), "--depth", "vda-metric", "--models-dir",
                 str(tmp_path / "m"), "--num-frames", "5", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert ("hf download depth-anything/Metric-Video-Depth-Anything-Small metric_video_depth_anything_vits.pth "
            f"--local-dir {tmp_path / 'm'}/depth-anything/Metric-Video-Depth-Anything-Small") in err
    assert not out.exists() or not any(out.iterdir())


def test_recon_with_metric_vda_takes_a_stereo_baseline_in_metres(tiny, models_dir, offline, clip_video, tmp_path):
    from ex4d.depth import load_depth_file
    from ex4d.pipeline import _depth_is_metric

    common = ["--models-dir", str(models_dir), "--num-frames", "5", "--device", "cpu",
              "--cam", "stereo:baseline=0.065m"]
    out = tmp_path / "metric"
    assert main(["recon", str(clip_video), "-o", str(out), "--depth", "vda-metric", *common]) == 0
    record = json.loads((out / "recon_stereo_baseline0.065m.json").read_text())
    assert record["trajectory"]["settings"]["baseline"] == pytest.approx(0.065)
    reread = load_depth_file(out / "depth.npz", num_frames=5, size=record["size"])
    assert _depth_is_metric(reread)  # the flag survives depth.npz (reuse, or --depth out/depth.npz)
    assert main(["recon", str(clip_video), "-o", str(tmp_path / "relative"), "--depth", "vda", *common]) == 1


def test_every_estimator_name_is_accepted_by_batch_checks():
    from ex4d import batch
    from ex4d.depth import ESTIMATORS

    assert set(ESTIMATORS) <= set(batch._ESTIMATOR_NAMES)
    assert set(dw.VDA_NAMES) <= set(ESTIMATORS)


# ---- the network's structure ----------------------------------------------------------------

def test_with_zero_proj_out_the_temporal_modules_are_identity_and_frames_independent():
    """Proj_out is zero-initialised in training: the temporal modules then add nothing (their residual is
    the input before the GroupNorm) and every other part works per frame, so a 4-frame call equals four
    1-frame calls."""
    torch.manual_seed(0)
    model = VideoDepthAnythingNet(TINY).eval()
    with torch.no_grad():
        model.head.scratch.output_conv2[2].bias.fill_(1.0)
        for mm in model.head.motion_modules:
            mm.temporal_transformer.proj_out.weight.zero_()
            mm.temporal_transformer.proj_out.bias.zero_()
        x = torch.randn(1, 4, 3, 42, 56)
        together = model(x)
        alone = torch.cat([model(x[:, t:t + 1]) for t in range(4)], dim=1)
    assert together.shape == (1, 4, 42, 56)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_temporal_module_matches_an_explicit_computation():
    """The temporal module against the spec written out with einsum: GroupNorm, proj_in, two attention
    sub-blocks over time (PE added to the normed input before q, k and v; no q/k/v bias), GEGLU with
    the value half first, proj_out, plus the pre-GroupNorm residual."""
    from ex4d.depth.vda_model import TemporalModule

    torch.manual_seed(1)
    C, heads, T, h, w = 32, 8, 5, 3, 2
    module = TemporalModule(C, heads, 32).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(T, C, h, w)  # B = 1: (B*T, C, h, w)
        got = module(x, T)
        tt = module.temporal_transformer
        y = torch.nn.functional.group_norm(x, 32, tt.norm.weight, tt.norm.bias, eps=1e-6)
        y = y.permute(2, 3, 0, 1).reshape(h * w, T, C) @ tt.proj_in.weight.T + tt.proj_in.bias  # (hw, T, C)
        block = tt.transformer_blocks[0]
        for attn, norm in zip(block.attention_blocks, block.norms):
            z = torch.nn.functional.layer_norm(y, (C,), norm.weight, norm.bias, eps=1e-5) + attn.pos_encoder.pe[0, :T]
            q, k, v = (z @ m.weight.T for m in (attn.to_q, attn.to_k, attn.to_v))
            q, k, v = (t.reshape(h * w, T, heads, C // heads) for t in (q, k, v))
            weights = torch.softmax(torch.einsum("ntjd,nsjd->njts", q, k) / (C // heads) ** 0.5, dim=-1)
            out = torch.einsum("njts,nsjd->ntjd", weights, v).reshape(h * w, T, C)
            y = y + out @ attn.to_out[0].weight.T + attn.to_out[0].bias
        z = torch.nn.functional.layer_norm(y, (C,), block.ff_norm.weight, block.ff_norm.bias, eps=1e-5)
        proj = z @ block.ff.net[0].proj.weight.T + block.ff.net[0].proj.bias
        value, gate = proj[..., :4 * C], proj[..., 4 * C:]
        y = y + (value * torch.nn.functional.gelu(gate)) @ block.ff.net[2].weight.T + block.ff.net[2].bias
        y = y @ tt.proj_out.weight.T + tt.proj_out.bias
        expected = y.reshape(h, w, T, C).permute(2, 3, 0, 1) + x
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_more_than_32_frames_per_call_is_refused():
    with pytest.raises(ValueError, match="32"):
        VideoDepthAnythingNet(TINY)(torch.zeros(1, 33, 3, 14, 14))


def test_memory_does_not_grow_with_frames(small_vda, tmp_path):
    """Peak numpy memory (tracemalloc) of estimate_depth at 64x64 over 176 frames (8 windows) vs 66 (3
    windows; fewer would skip the alignment's temporaries). The clip as float32 RGB would cost
    110 x 48 KiB = 5.3 MB more, a whole-clip float32 depth 1.8 MB more; streaming must stay within
    0.5 MB of the 66-frame peak (measured: 2.58 MB at 66 frames, 2.79 MB at 176 and at 352). tracemalloc
    sees numpy, not torch: the stitcher's own tensors (8 frames to blend, 2 keyframes) are checked below."""
    import tracemalloc

    from ex4d.pipeline import estimate_depth
    from ex4d.types import Clip

    pool = np.random.default_rng(0).random((8, 64, 64, 3), dtype=np.float32)

    def run(T, name):
        def reader():
            for k in range(T):
                yield pool[k % 8].copy()

        clip = Clip(fps=10.0, source="synthetic", reader=reader, num_frames=T, size=(64, 64))
        tracemalloc.start()
        try:
            estimate_depth(clip, "vda", out_dir=tmp_path / name, estimator=small_vda)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    run(22, "warm-up")
    short, long = run(66, "short"), run(176, "long")
    assert long - short < 0.5e6, (short, long)
    stitcher = WindowStitcher(176)
    for chunk in run_windows(lambda slots: np.ones((32, 64, 64), np.float32) * slots[5], range(176), 176,
                             stitcher=stitcher):
        assert stitcher.pending.shape == (8, 64, 64) and len(stitcher.ref) == 2


@pytest.mark.slow  # about 35 s on a 2-core CPU, most of it the tiny Wan generation
def test_ex4d_run_with_vda_end_to_end(tiny, offline, tmp_path):
    """Done means: ``ex4d run my_video.mp4 --cam 90 --depth vda`` works with the VDA-Small file (tiny
    random models here, Wan and the adapter too)."""
    tiny_wan = pytest.importorskip("tiny_wan")
    from ex4d.io.video import read_video

    models = tiny_wan.write_tiny_models_dir(tmp_path / "models")
    spec = dw.vda_file("small", False)
    (models / spec.repo).mkdir(parents=True)
    torch.save(tiny_state(), models / spec.repo / spec.weights[0])
    example = tmp_path / "example"
    assert main(["synth", "-o", str(example), "--num-frames", "5", "--size", "64x64"]) == 0
    out = tmp_path / "out"
    assert main(["run", str(example / "video.mp4"), "--depth", "vda", "--cam", "90", "--num-frames", "5",
                 "--resize", "keep", "-o", str(out), "--models-dir", str(models), "--size", "16x16", "--steps", "2",
                 "--device", "cpu"]) == 0
    frames, _ = read_video(out / "ex4d_90.mp4")
    assert frames.shape == (5, 16, 16, 3)
    assert json.loads((out / "recon_90.json").read_text())["depth"]["estimator"] == "vda"
