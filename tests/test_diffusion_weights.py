"""Generation-stage weights: key maps (full size, meta device), loaders (tiny models in every
on-disk layout), the EX-4D adapter, ``ex4d convert``, and every corrupt/missing-file error."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from ex4d.cli import main
from ex4d.diffusion.weights import models_dir as md
from ex4d.diffusion.weights import keymaps as km
from ex4d.diffusion.weights import wan as ww
from ex4d.diffusion.weights import (
    ENCODER_KEYS,
    LORA_TARGET_MODULES,
    convert_lora_to_original,
    load_ex4d_adapter,
    load_wan_components,
    lora_key_to_diffusers,
    resolve_adapter,
    resolve_wan,
    save_ex4d_adapter,
    validate_adapter,
)
from ex4d.errors import CheckpointError, MissingWeightsError
from tiny_wan import (
    LORA_RANK,
    make_tiny_adapter_state,
    make_tiny_components,
    tiny_transformer_config,
    write_tiny_diffusers_layout,
    write_tiny_ex4d_ckpt,
    write_tiny_original_layout,
)

MANIFESTS = Path(os.environ.get("EX4D_CHECKPOINT_MANIFESTS",
                                Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints"))
needs_manifests = pytest.mark.skipif(not (MANIFESTS / "wan2.1-i2v-14b-480p_dit.json").is_file(),
                                     reason=f"checkpoint manifests not found in {MANIFESTS} "
                                            "(set EX4D_CHECKPOINT_MANIFESTS to the shared/checkpoints folder)")
MODELS = ("transformer", "vae", "text_encoder", "image_encoder")


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


def meta_tensors(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def shapes_of(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """Never download, and look into an empty Hugging Face cache unless a test fills one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


# ------------------------------------------------------------------------------------------
# Full size, meta device, against the manifests of the real files
# ------------------------------------------------------------------------------------------

@needs_manifests
def test_full_dit_every_key_lands_on_a_parameter_of_the_same_shape():
    from diffusers import WanTransformer3DModel

    dit = manifest("wan2.1-i2v-14b-480p_dit.json")
    shapes = {k: tuple(s) for k, s in dit["tensors"].items()}
    assert len(shapes) == 1303
    config = ww.dit_config_from_original(shapes, dit["config_json_on_hub"])
    for key, value in km.TRANSFORMER_CONFIG_I2V_14B.items():
        assert tuple(config[key]) == tuple(value) if isinstance(value, (list, tuple)) else config[key] == value, key
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    mapped = {km.dit_key_to_diffusers(k): s for k, s in shapes.items()}
    assert len(mapped) == 1303  # no two original keys collapse onto one name
    ww.check_keys(shapes_of(model), mapped, "manifest")  # none missing, none left over, shapes equal
    reference = manifest("wan2.1_dit_original_to_diffusers.json")["mapping"]
    assert {k: km.dit_key_to_diffusers(k) for k in shapes} == reference
    assert all(km.dit_key_to_original(v) == k for k, v in reference.items())
    assert sum(math.prod(s) for s in shapes.values()) == dit["num_params"]


@needs_manifests
def test_full_lora_targets_are_400_layers_800_tensors_and_8_encoder_tensors():
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model

    adapter = manifest("ex4d_adapter.json")
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(km.TRANSFORMER_CONFIG_I2V_14B)
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=list(LORA_TARGET_MODULES)), model)
    lora_state = {k.replace(".default", ""): tuple(v.shape) for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora_state) == 800
    assert len({k.rsplit(".lora_", 1)[0] for k in lora_state}) == 400
    assert not any("add_k_proj" in k or "add_v_proj" in k for k in lora_state)  # Wan's k_img/v_img: not adapted
    for naming in ("tensors_lora_injected", "tensors_peft_naming"):
        names = {lora_key_to_diffusers(k): tuple(s) for k, s in adapter[naming].items() if ".lora_" in k}
        assert names == lora_state, naming
    injected = adapter["tensors_lora_injected"]
    assert convert_lora_to_original({lora_key_to_diffusers(k): None for k in injected}) == {k: None for k in injected}
    encoder = meta_tensors(adapter["tensors_camera_encoder"])
    assert sorted(encoder) == sorted(ENCODER_KEYS)
    lora = {lora_key_to_diffusers(k): v for k, v in meta_tensors(adapter["tensors_lora_injected"]).items()}
    assert validate_adapter(lora, encoder, None, "manifest") == (16, 40)


@needs_manifests
def test_full_t5_clip_vae_maps_land_on_the_full_size_models():
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    t5 = {k: tuple(s) for k, s in manifest("wan2.1_t5_umt5-xxl-enc.json")["tensors"].items()}
    config = ww.t5_config_from_original(t5)
    assert {k: config[k] for k in km.T5_CONFIG} == km.T5_CONFIG
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config))
    mapped = {name: s for k, s in t5.items() for name in km.t5_key_to_hf(k)}
    ww.check_keys(shapes_of(model), mapped, "T5 manifest")
    assert len(t5) == 242 and len(mapped) == 243  # + the tied encoder.embed_tokens
    assert {km.t5_key_to_original(k) for k in mapped} - {None} == set(t5)

    clip = manifest("wan2.1_clip_xlm-roberta-large-vit-huge-14.json")["tensors"]
    config = ww.clip_config_from_original({k: tuple(s) for k, s in clip.items()})
    assert {k: config[k] for k in km.CLIP_VISION_CONFIG} == km.CLIP_VISION_CONFIG
    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(**config))
    mapped, ignored = km.clip_state_dict_to_hf(meta_tensors(clip))
    ww.check_keys(shapes_of(model), {k: tuple(v.shape) for k, v in mapped.items()}, "CLIP manifest")
    assert len(ignored) == 391 + 1 + 1  # textual.*, log_scale, visual.head
    assert {km.clip_key_to_original(k) for k in mapped} == {k for k in clip if not km.clip_is_ignored(k)}
    assert len(clip) - len(ignored) == 391  # visual tower minus its projection head

    vae = {k: tuple(s) for k, s in manifest("wan2.1_vae.json")["tensors"].items()}
    config = ww.vae_config_from_original(vae)
    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(config)
    mapped = {km.vae_key_to_diffusers(k): s for k, s in vae.items()}
    assert len(mapped) == 194
    ww.check_keys(shapes_of(model), mapped, "VAE manifest")
    assert all(km.vae_key_to_original(km.vae_key_to_diffusers(k)) == k for k in vae)


# ------------------------------------------------------------------------------------------
# Tiny models in both layouts
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny components + a models dir holding them in the original layout and an ex4d.ckpt."""
    root = tmp_path_factory.mktemp("models")
    comps = make_tiny_components(seed=0)
    write_tiny_original_layout(root / md.WAN_REPO, components=comps)
    write_tiny_ex4d_ckpt(root / md.EX4D_REPO / md.ADAPTER_CKPT)
    diffusers_root = tmp_path_factory.mktemp("diffusers-models")
    write_tiny_diffusers_layout(diffusers_root / md.WAN_DIFFUSERS_REPO, components=comps)
    return dict(components=comps, original=root, diffusers=diffusers_root)


def assert_same_weights(expected: dict, loaded: dict):
    for name in MODELS:
        a, b = expected[name].state_dict(), loaded[name].state_dict()
        assert set(a) == set(b), name
        for key in a:
            assert torch.equal(a[key], b[key].to(a[key].dtype)), f"{name}.{key}"


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_tiny_layouts_round_trip_through_the_real_loaders(tiny, layout):
    found, folder = resolve_wan(tiny[layout], layout)
    assert found == layout
    loaded = load_wan_components(tiny[layout], layout=layout, torch_dtype=torch.float32)
    assert set(loaded) == {"transformer", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"}
    assert_same_weights(tiny["components"], loaded)
    text = "4K ultra HD, surround motion"
    assert loaded["tokenizer"](text)["input_ids"] == tiny["components"]["tokenizer"](text)["input_ids"]
    assert loaded["image_processor"].size["height"] == 224
    assert not loaded["image_processor"].do_center_crop  # Wan resizes straight to 224x224
    t5 = loaded["text_encoder"]
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()


def test_bf16_loads_give_the_same_dtypes_in_both_layouts(tiny):
    a = load_wan_components(tiny["original"], layout="original", components=["transformer", "text_encoder"])
    b = load_wan_components(tiny["diffusers"], layout="diffusers", components=["transformer", "text_encoder"])
    assert set(a) == {"transformer", "text_encoder"}
    for name in a:
        da = {k: v.dtype for k, v in a[name].state_dict().items()}
        db = {k: v.dtype for k, v in b[name].state_dict().items()}
        assert da == db, name
    # diffusers keeps Wan's time embedder / modulation in float32 even when asked for bf16
    assert da_f32(a["transformer"], "condition_embedder.time_embedder.linear_1.weight")
    assert a["transformer"].state_dict()["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16


def da_f32(model, key):
    return model.state_dict()[key].dtype == torch.float32


def test_auto_order_converted_then_original_then_diffusers_and_layout_folders(tiny, tmp_path):
    assert resolve_wan(tiny["original"])[0] == "original"
    assert resolve_wan(tiny["diffusers"])[0] == "diffusers"
    both = tmp_path / "both"
    (both / "Wan-AI").mkdir(parents=True)
    (both / md.WAN_REPO).symlink_to(tiny["original"] / md.WAN_REPO)
    (both / md.WAN_DIFFUSERS_REPO).symlink_to(tiny["diffusers"] / md.WAN_DIFFUSERS_REPO)
    assert resolve_wan(both) == ("original", both / md.WAN_REPO)  # what EX-4D ran with
    assert resolve_wan(both, "diffusers") == ("diffusers", both / md.WAN_DIFFUSERS_REPO)
    (both / md.CONVERTED_DIR).mkdir()
    (both / md.CONVERTED_DIR / md.CONVERTED_WAN).symlink_to(tiny["diffusers"] / md.WAN_DIFFUSERS_REPO)
    assert resolve_wan(both) == ("diffusers", both / md.CONVERTED_DIR / md.CONVERTED_WAN)
    assert resolve_wan(tiny["original"] / md.WAN_REPO) == ("original", tiny["original"] / md.WAN_REPO)


def test_hf_cache_is_used_when_the_models_dir_lacks_the_files(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + md.WAN_DIFFUSERS_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / ("0" * 40)).symlink_to(tiny["diffusers"] / md.WAN_DIFFUSERS_REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    layout, folder = resolve_wan(tmp_path / "empty-models-dir")
    assert layout == "diffusers" and md.missing_diffusers(folder) is None


# ------------------------------------------------------------------------------------------
# Independent oracles for the two hand-written maps (T5, CLIP): Wan's own forward, re-derived
# ------------------------------------------------------------------------------------------

def _wan_t5_forward(sd: dict, ids: torch.Tensor, heads: int, buckets: int = 32, max_dist: int = 128):
    """Wan's T5Encoder forward (RMS norms, per-block relative bias, fc2(fc1(x) * gelu_tanh(gate(x))))."""
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    length = ids.shape[1]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact) * (half - exact)).long()
    bucket = bucket + torch.where(rel < exact, rel, large.clamp(max=half - 1))
    x = sd["token_embedding.weight"][ids]
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_blocks):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = norm(x, p("norm1.weight"))
        b, s, c = h.shape
        q, k, v = (torch.nn.functional.linear(h, p(f"attn.{n}.weight")).view(b, s, heads, -1) for n in "qkv")
        bias = p("pos_embedding.embedding.weight")[bucket].permute(2, 0, 1)[None]
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + bias).softmax(-1)
        x = x + torch.nn.functional.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, s, c),
                                           p("attn.o.weight"))
        h = norm(x, p("norm2.weight"))
        gate = torch.nn.functional.gelu(torch.nn.functional.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + torch.nn.functional.linear(torch.nn.functional.linear(h, p("ffn.fc1.weight")) * gate,
                                           p("ffn.fc2.weight"))
    return norm(x, sd["norm.weight"])


def _wan_clip_31_blocks(sd: dict, image: torch.Tensor, heads: int):
    """Wan's ViT (pre-norm, fused qkv viewed as (3, heads, d)), output of all blocks but the last."""
    def ln(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    x = torch.nn.functional.conv2d(image, sd["visual.patch_embedding.weight"], stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], 1) + sd["visual.pos_embedding"]
    x = ln(x, "visual.pre_norm")
    n_blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer."))
    for i in range(n_blocks - 1):
        pre = f"visual.transformer.{i}"
        h = ln(x, pre + ".norm1")
        b, s, c = h.shape
        qkv = torch.nn.functional.linear(h, sd[pre + ".attn.to_qkv.weight"], sd[pre + ".attn.to_qkv.bias"])
        q, k, v = qkv.view(b, s, 3, heads, c // heads).unbind(2)
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + torch.nn.functional.linear(o.transpose(1, 2).reshape(b, s, c), sd[pre + ".attn.proj.weight"],
                                           sd[pre + ".attn.proj.bias"])
        h = torch.nn.functional.gelu(torch.nn.functional.linear(ln(x, pre + ".norm2"), sd[pre + ".mlp.0.weight"],
                                                                sd[pre + ".mlp.0.bias"]))
        x = x + torch.nn.functional.linear(h, sd[pre + ".mlp.2.weight"], sd[pre + ".mlp.2.bias"])
    return x


def test_loaded_t5_and_clip_compute_what_wans_modules_compute(tiny):
    folder = tiny["original"] / md.WAN_REPO
    t5 = ww.load_t5_original(folder / md.T5_FILE, torch_dtype=torch.float32)
    raw = torch.load(folder / md.T5_FILE, weights_only=True)
    ids = torch.randint(0, 90, (2, 150), generator=torch.Generator().manual_seed(1))  # > 128 exercises far buckets
    with torch.no_grad():
        ours = t5(input_ids=ids).last_hidden_state
        theirs = _wan_t5_forward(raw, ids, heads=t5.config.num_heads)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    clip = ww.load_clip_original(folder / md.CLIP_FILE, torch_dtype=torch.float32)
    raw = torch.load(folder / md.CLIP_FILE, weights_only=True)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = clip(pixel_values=image, output_hidden_states=True).hidden_states[-2]
        theirs = _wan_clip_31_blocks(raw, image, heads=clip.config.num_attention_heads)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# EX-4D adapter
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("naming,prefix", [("default", ""), ("peft", ""), ("default", "diffusion_model."),
                                           ("peft", "model."), ("default", "dit.")])
def test_adapter_both_namings_and_prefixes_load_to_diffusers_names(tmp_path, naming, prefix):
    path = write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt", naming=naming, prefix=prefix)
    w = load_ex4d_adapter(path, transformer_config=tiny_transformer_config())
    ref = make_tiny_adapter_state(0, naming="default")
    assert (w.rank, w.alpha, w.num_layers, w.scale) == (LORA_RANK, float(LORA_RANK), 2, 1.0)
    assert len(w.lora) == 2 * 10 * 2 and sorted(w.encoder) == sorted(ENCODER_KEYS)
    assert torch.equal(w.lora["blocks.1.attn2.to_out.0.lora_B.weight"], ref["blocks.1.cross_attn.o.lora_B.default.weight"])
    assert torch.equal(w.lora["blocks.0.ffn.net.0.proj.lora_A.weight"], ref["blocks.0.ffn.0.lora_A.default.weight"])
    assert torch.equal(w.encoder["latent_patch_embedding.weight"], ref["latent_patch_embedding.weight"])
    assert w.encoder_config() == dict(in_channels=16, hidden_channels=16, out_channels=24, patch_size=(1, 2, 2))


def test_adapter_save_round_trips_and_writes_a_reference_compatible_ckpt(tmp_path):
    w = load_ex4d_adapter(write_tiny_ex4d_ckpt(tmp_path / "in.ckpt"), transformer_config=tiny_transformer_config())
    written = save_ex4d_adapter(tmp_path / "out", w, alpha=8.0, transformer_config=tiny_transformer_config())
    assert set(written) == {"safetensors", "config", "ckpt"}
    again = load_ex4d_adapter(written["safetensors"], transformer_config=tiny_transformer_config())
    assert again.alpha == 8.0 and again.scale == 2.0
    assert all(torch.equal(again.lora[k], w.lora[k]) for k in w.lora) and set(again.lora) == set(w.lora)
    ckpt = torch.load(written["ckpt"], weights_only=True)
    assert set(ckpt) == set(make_tiny_adapter_state(0, naming="default"))  # EX-4D's own key names
    config = json.loads(written["config"].read_text())
    assert config["r"] == LORA_RANK and config["target_modules"] == list(LORA_TARGET_MODULES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["adapter.safetensors", "adapter_config.json",
                                                                     "ex4d.ckpt"]  # no temporaries left


def test_adapter_lora_loads_into_the_diffusers_transformer_with_peft(tiny, tmp_path):
    from diffusers import WanTransformer3DModel
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    w = load_ex4d_adapter(write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt"), transformer_config=tiny_transformer_config())
    model = WanTransformer3DModel.from_config(tiny_transformer_config())
    inject_adapter_in_model(w.lora_config(), model)
    injected = {k for k in model.state_dict() if ".lora_" in k}
    assert len(injected) == len(w.lora) == 40
    result = set_peft_model_state_dict(model, w.lora)
    assert not result.unexpected_keys
    assert torch.equal(model.blocks[1].attn2.to_out[0].lora_B["default"].weight,
                       w.lora["blocks.1.attn2.to_out.0.lora_B.weight"])


@pytest.mark.parametrize("damage,expect", [
    ("extra", "blocks.0.self_attn.q.weight"),
    ("missing_lora", "missing"),
    ("missing_encoder", "latent_encoder.2.bias"),
    ("prefixed_encoder", "camera_encoder.latent_encoder.0.weight"),
    ("rank", "inconsistent"),
    ("shape", "latent_patch_embedding.weight"),
    ("twice", "appears twice"),
])
def test_adapter_damage_is_a_checkpoint_error_naming_it(tmp_path, damage, expect):
    state = make_tiny_adapter_state(0)
    if damage == "extra":
        state["blocks.0.self_attn.q.weight"] = torch.zeros(24, 24)
    elif damage == "missing_lora":
        del state["blocks.1.ffn.2.lora_A.default.weight"]
    elif damage == "missing_encoder":
        del state["latent_encoder.2.bias"]
    elif damage == "prefixed_encoder":
        state["camera_encoder.latent_encoder.0.weight"] = state.pop("latent_encoder.0.weight")
    elif damage == "rank":
        state["blocks.0.self_attn.k.lora_A.default.weight"] = torch.zeros(LORA_RANK + 1, 24)
    elif damage == "shape":
        state["latent_patch_embedding.weight"] = torch.zeros(24, 16, 1, 1, 1)
    elif damage == "twice":
        state["blocks.0.self_attn.q.lora_A.weight"] = state["blocks.0.self_attn.q.lora_A.default.weight"]
    torch.save(state, tmp_path / "ex4d.ckpt")
    with pytest.raises(CheckpointError, match=expect.replace(".", r"\.")):
        load_ex4d_adapter(tmp_path / "ex4d.ckpt", transformer_config=tiny_transformer_config())


def test_adapter_for_another_model_size_is_rejected(tmp_path):
    path = write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt")
    with pytest.raises(CheckpointError, match="missing key"):
        load_ex4d_adapter(path)  # default: the 14B model's 40 blocks


def test_truncated_adapter_is_a_checkpoint_error(tmp_path):
    path = write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_ex4d_adapter(path, transformer_config=tiny_transformer_config())


# ------------------------------------------------------------------------------------------
# Corrupt Wan files, missing files, ex4d convert
# ------------------------------------------------------------------------------------------

@pytest.fixture()
def original_copy(tiny, tmp_path):
    """A private copy of the tiny original layout that a test may damage."""
    import shutil

    dst = tmp_path / "models"
    shutil.copytree(tiny["original"], dst)
    return dst


def _edit_pth(path: Path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize("damage,expect", [
    ("truncated_shard", "diffusion_pytorch_model-00002-of-00002.safetensors"),
    ("truncated_pth", md.VAE_FILE),
    ("wrong_shape", "decoder.head.2.weight (= decoder.conv_out.weight)"),
    ("missing_key", "blocks.1.ffn.fc2.weight (= encoder.block.1.layer.1.DenseReluDense.wo.weight)"),
    ("extra_key", "visual.transformer.0.extra"),
])
def test_corrupt_wan_files_are_checkpoint_errors_naming_the_problem(original_copy, damage, expect):
    folder = original_copy / md.WAN_REPO
    if damage == "truncated_shard":
        shard = folder / "diffusion_pytorch_model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "truncated_pth":
        f = folder / md.VAE_FILE
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif damage == "wrong_shape":
        _edit_pth(folder / md.VAE_FILE, lambda s: s.__setitem__("decoder.head.2.weight", torch.zeros(3, 8, 1, 3, 3)))
    elif damage == "missing_key":
        _edit_pth(folder / md.T5_FILE, lambda s: s.pop("blocks.1.ffn.fc2.weight"))
    elif damage == "extra_key":
        _edit_pth(folder / md.CLIP_FILE, lambda s: s.__setitem__("visual.transformer.0.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError) as info:
        load_wan_components(original_copy, layout="original", torch_dtype=torch.float32)
    assert expect in str(info.value)


def test_corrupt_diffusers_component_is_a_checkpoint_error(tiny, tmp_path):
    import shutil

    dst = tmp_path / "d"
    shutil.copytree(tiny["diffusers"], dst)
    f = dst / md.WAN_DIFFUSERS_REPO / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="vae"):
        load_wan_components(dst, layout="diffusers", components=["vae"])


@pytest.mark.parametrize("component,file", [("transformer", "diffusion_pytorch_model.safetensors"),
                                            ("text_encoder", "model.safetensors")])
@pytest.mark.parametrize("damage", ["drop", "extra", "shape"])
def test_diffusers_layout_key_problems_are_checkpoint_errors(tiny, tmp_path, component, file, damage):
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "d"
    shutil.copytree(tiny["diffusers"], dst)
    path = dst / md.WAN_DIFFUSERS_REPO / component / file
    state = load_file(str(path))
    key = sorted(state)[3]
    if damage == "drop":
        del state[key]
    elif damage == "extra":
        key = "blocks.9.extra.weight"
        state[key] = torch.zeros(2)
    else:
        state[key] = torch.zeros(*(n + 1 for n in state[key].shape))
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_wan_components(dst, layout="diffusers", components=[component], torch_dtype=torch.float32)
    assert key in str(info.value) and component in str(info.value)


@pytest.mark.parametrize("remove,expect", [
    (None, "diffusion_pytorch_model*.safetensors"),
    (md.T5_FILE, md.T5_FILE),
    ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00001-of-00002.safetensors"),
    (md.TOKENIZER_DIR, "google/umt5-xxl/tokenizer.json"),
])
def test_missing_files_exit_2_with_the_download_command(original_copy, tmp_path, capsys, remove, expect):
    import shutil

    models = original_copy if remove else tmp_path / "empty"
    if remove:
        target = original_copy / md.WAN_REPO / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MissingWeightsError) as info:
        resolve_wan(models, download=True)  # offline: must not try the network
    assert expect in str(info.value)
    assert main(["convert", "--models-dir", str(models)]) == 2
    err = capsys.readouterr().err
    assert expect in err
    assert f"hf download {md.WAN_REPO} --local-dir {models / md.WAN_REPO}" in err
    assert not (models / "converted" / md.CONVERTED_WAN).exists()


def test_missing_adapter_names_the_file_and_command(tmp_path):
    with pytest.raises(MissingWeightsError, match=f"hf download {md.EX4D_REPO} {md.ADAPTER_CKPT} --local-dir"):
        resolve_adapter(tmp_path)
    with pytest.raises(MissingWeightsError, match="nope.ckpt"):
        resolve_adapter(path=tmp_path / "nope.ckpt")


def test_convert_writes_a_diffusers_layout_that_later_loads_find(tiny, original_copy, capsys):
    assert main(["convert", "--models-dir", str(original_copy), "--dtype", "keep"]) == 0
    out = original_copy / md.CONVERTED_DIR
    assert sorted(p.name for p in out.iterdir()) == [md.CONVERTED_ADAPTER, md.CONVERTED_WAN]  # no temp folder left
    layout, folder = resolve_wan(original_copy)
    assert (layout, folder) == ("diffusers", out / md.CONVERTED_WAN)
    assert_same_weights(tiny["components"], load_wan_components(original_copy, torch_dtype=torch.float32))
    adapter_path = resolve_adapter(original_copy)
    assert adapter_path == out / md.CONVERTED_ADAPTER / "adapter.safetensors"
    w = load_ex4d_adapter(adapter_path, transformer_config=tiny_transformer_config())
    ref = load_ex4d_adapter(original_copy / md.EX4D_REPO / md.ADAPTER_CKPT, transformer_config=tiny_transformer_config())
    assert all(torch.equal(w.lora[k], ref.lora[k]) for k in ref.lora)
    # never overwrites: a second run refuses with exit 1 and leaves the outputs alone
    assert main(["convert", "--models-dir", str(original_copy)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_convert_bf16_casts_the_dit_but_keeps_the_vae_fp32(original_copy):
    from safetensors import safe_open

    assert main(["convert", "--models-dir", str(original_copy), "--only", "wan"]) == 0
    root = original_copy / md.CONVERTED_DIR / md.CONVERTED_WAN
    with safe_open(str(root / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with safe_open(str(root / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert not (original_copy / md.CONVERTED_DIR / md.CONVERTED_ADAPTER).exists()


def test_no_models_dir_and_empty_cache_says_how_to_download_and_where_to_point():
    with pytest.raises(MissingWeightsError) as info:
        resolve_wan(None)
    message = str(info.value)
    assert f"hf download {md.WAN_REPO} --local-dir models/{md.WAN_REPO}" in message
    assert "--models-dir models" in message


def test_trained_peft_state_saves_and_reloads(tmp_path):
    """What training does: inject, train, get_peft_model_state_dict, save; the files reload exactly."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(tiny_transformer_config())
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES)), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora = get_peft_model_state_dict(model)
    encoder = {k: v for k, v in make_tiny_adapter_state(0).items() if k in ENCODER_KEYS}
    written = save_ex4d_adapter(tmp_path, lora, encoder, alpha=4.0, transformer_config=tiny_transformer_config())
    for key in ("safetensors", "ckpt"):
        w = load_ex4d_adapter(written[key], transformer_config=tiny_transformer_config(), alpha=4.0)
        assert (w.rank, w.scale, w.num_layers) == (2, 2.0, 2)
        assert set(w.lora) == set(lora) and all(torch.equal(w.lora[k], lora[k]) for k in lora)


# ------------------------------------------------------------------------------------------
# Bad values, empty files, empty messages; adapter_config.json;
# The text length
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,bad", [
    ("blocks.0.self_attn.q.lora_A.default.weight", lambda t: t.to(torch.int64)),
    ("latent_encoder.2.bias", lambda t: t > 0),
    ("blocks.1.ffn.2.lora_B.default.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
    ("latent_patch_embedding.weight", lambda t: t.flatten().index_fill(0, torch.tensor([0]), float("inf")).view_as(t)),
])
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_adapter_integer_bool_nan_inf_tensors_are_errors_naming_them(tmp_path, key, bad, fmt):
    from safetensors.torch import save_file

    state = make_tiny_adapter_state(0)
    state[key] = bad(state[key])
    if fmt == "ckpt":
        path = tmp_path / "ex4d.ckpt"
        torch.save(state, path)
    else:
        path = tmp_path / "adapter.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_ex4d_adapter(path, transformer_config=tiny_transformer_config())
    assert key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -4.0, True, "4"])
def test_adapter_alpha_must_be_a_finite_positive_number(tmp_path, alpha):
    path = write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt")
    with pytest.raises(CheckpointError, match="lora_alpha"):
        load_ex4d_adapter(path, transformer_config=tiny_transformer_config(), alpha=alpha)


@pytest.fixture()
def saved_adapter(tmp_path):
    w = load_ex4d_adapter(write_tiny_ex4d_ckpt(tmp_path / "in.ckpt"), transformer_config=tiny_transformer_config())
    return save_ex4d_adapter(tmp_path / "adapter", w, alpha=8.0, transformer_config=tiny_transformer_config())


@pytest.mark.parametrize("config,expect", [
    ("{", "cannot read"),
    ("[1, 2]", "JSON object"),
    ('{"r": 4}', "lacks lora_alpha"),
    ('{"lora_alpha": 4}', "lacks r"),
    ('{"r": "4", "lora_alpha": 4}', "r must be a positive integer"),
    ('{"r": 4, "lora_alpha": "four"}', "must be a number"),
    ('{"r": 4, "lora_alpha": NaN}', "finite positive"),
    ('{"r": 4, "lora_alpha": -1}', "finite positive"),
    ('{"r": 8, "lora_alpha": 8}', "do not belong together"),
    ("[" * 100000, "cannot read"),
])
def test_bad_adapter_config_json_is_a_one_line_checkpoint_error(saved_adapter, config, expect):
    saved_adapter["config"].write_text(config)
    with pytest.raises(CheckpointError) as info:
        load_ex4d_adapter(saved_adapter["safetensors"], transformer_config=tiny_transformer_config())
    assert expect in str(info.value) and "adapter_config.json" in str(info.value) and "\n" not in str(info.value)


def test_empty_and_messageless_weight_files_are_checkpoint_errors(tmp_path):
    from ex4d.weights_common import first_line

    assert first_line(EOFError()) == "EOFError" and first_line(ValueError("\n\n  second\n")) == "second"
    for name in ("ex4d.ckpt", "adapter.safetensors"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CheckpointError, match="0 bytes"):
            load_ex4d_adapter(tmp_path / name, transformer_config=tiny_transformer_config())
    (tmp_path / "t5.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="0 bytes"):
        ww.read_pth(tmp_path / "t5.pth")
    (tmp_path / "short.pth").write_bytes(b"\x80\x02")  # torch.load raises EOFError('') for this one
    with pytest.raises(CheckpointError, match="EOFError"):
        ww.read_pth(tmp_path / "short.pth")
    torch.save({0: torch.zeros(2)}, tmp_path / "intkey.ckpt")  # not a {name: tensor} dict
    with pytest.raises(CheckpointError, match="flat"):
        load_ex4d_adapter(tmp_path / "intkey.ckpt", transformer_config=tiny_transformer_config())


def test_no_unguarded_first_line_pattern_left_in_the_package():
    """``str(exc).splitlines()[0]`` raises IndexError on an empty message (exit 3): use first_line()."""
    root = Path(__file__).resolve().parents[1] / "src" / "ex4d"
    offenders = [f"{p}:{n}" for p in root.rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
                 if "str(exc).splitlines()[0]" in line and " if " not in line]  # guarded on the line: fine
    assert offenders == []


def _write_condition(folder: Path, frames: int = 5, size: int = 32):
    from ex4d.io.video import write_video
    import numpy as np

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    mask = np.full((frames, size, size), 255, np.uint8)
    mask[1:, :, :10] = 0
    return (write_video(folder / "color_90.mp4", colour, fps=24.0),
            write_video(folder / "mask_90.mkv", mask, fps=24.0, codec="ffv1"))


@pytest.mark.parametrize("damage,expect", [("empty", "0 bytes"), ("config", "adapter_config.json"),
                                           ("nan", "NaN/inf")])
def test_cli_generate_bad_adapter_is_exit_2_one_line(tiny, tmp_path, capsys, damage, expect):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny["original"], models)
    ckpt = models / md.EX4D_REPO / md.ADAPTER_CKPT
    adapter_arg = []
    if damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "nan":
        state = torch.load(ckpt, weights_only=True)
        state["latent_encoder.0.bias"][0] = float("nan")
        torch.save(state, ckpt)
    else:
        w = load_ex4d_adapter(ckpt, transformer_config=tiny_transformer_config())
        written = save_ex4d_adapter(tmp_path / "adapter", w, transformer_config=tiny_transformer_config(),
                                    write_ckpt=False)
        written["config"].write_text('{"r": 4, "lora_alpha": NaN}')
        adapter_arg = ["--adapter", str(tmp_path / "adapter")]
    colour, _ = _write_condition(tmp_path)
    code = main(["generate", "--color", str(colour), "-o", str(tmp_path / "out.mp4"), "--models-dir", str(models),
                 "--size", "16x16", "--steps", "1", "--device", "cpu", *adapter_arg])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err and len(err.strip().splitlines()) == 1 and "internal error" not in err


def test_corrupt_adapter_is_found_before_the_wan_model_loads(tiny, tmp_path, monkeypatch):
    import shutil

    import ex4d.diffusion.weights as weights
    from ex4d.pipeline import GenerateOptions, load_generator

    models = tmp_path / "models"
    shutil.copytree(tiny["original"], models)
    state = torch.load(models / md.EX4D_REPO / md.ADAPTER_CKPT, weights_only=True)
    state["blocks.1.cross_attn.v.lora_A.default.weight"] = state["blocks.1.cross_attn.v.lora_A.default.weight"].long()
    torch.save(state, models / md.EX4D_REPO / md.ADAPTER_CKPT)
    loads = []
    monkeypatch.setattr(weights, "load_wan_components", lambda *a, **k: loads.append(1))
    with pytest.raises(CheckpointError, match="blocks.1.cross_attn.v.lora_A.default.weight"):
        load_generator(GenerateOptions(models_dir=str(models), device="cpu", size="16x16"))
    assert loads == []  # the Wan weights were never read


@pytest.mark.parametrize("damage", ["nan", "int"])
def test_dit_shard_with_nan_or_integer_tensor_is_an_error_naming_it(original_copy, damage):
    from safetensors.torch import load_file, save_file

    shard = original_copy / md.WAN_REPO / "diffusion_pytorch_model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    key = next(k for k in sorted(state) if k.endswith(".weight") and state[k].ndim == 2)
    state[key] = (state[key].index_fill(0, torch.tensor([0]), float("nan")) if damage == "nan"
                  else state[key].to(torch.int32))
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_wan_components(original_copy, layout="original", components=["transformer"], torch_dtype=torch.float32)
    assert key in str(info.value) and ("NaN" in str(info.value) if damage == "nan" else "int32" in str(info.value))


def test_other_original_files_with_inf_are_errors_naming_the_tensor(original_copy):
    folder = original_copy / md.WAN_REPO
    _edit_pth(folder / md.VAE_FILE, lambda s: s["decoder.head.2.weight"].view(-1).__setitem__(0, float("inf")))
    with pytest.raises(CheckpointError, match=r"decoder\.head\.2\.weight.*NaN/inf"):
        load_wan_components(original_copy, layout="original", components=["vae"], torch_dtype=torch.float32)


@pytest.mark.parametrize("damage", ["nan", "int"])
def test_diffusers_transformer_with_nan_or_integer_tensor_is_an_error(tiny, tmp_path, damage):
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "d"
    shutil.copytree(tiny["diffusers"], dst)
    path = dst / md.WAN_DIFFUSERS_REPO / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = "blocks.0.attn1.to_q.weight"
    state[key] = state[key].fill_(float("nan")) if damage == "nan" else state[key].to(torch.int64)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_wan_components(dst, layout="diffusers", components=["transformer"], torch_dtype=torch.float32)
    assert key in str(info.value)


def test_text_length_other_than_512_is_refused_not_padded(tiny, original_copy, tmp_path):
    import shutil

    config_path = original_copy / md.WAN_REPO / "config.json"
    config = json.loads(config_path.read_text())
    config["text_len"] = 256
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text_len is 256.*512"):
        load_wan_components(original_copy, layout="original", components=["transformer"], torch_dtype=torch.float32)
    with pytest.raises(CheckpointError, match="text_len"):
        ww.wan_transformer_config(original_copy)  # what the adapter is checked against before loading
    dst = tmp_path / "d"
    shutil.copytree(tiny["diffusers"], dst)
    t_config = dst / md.WAN_DIFFUSERS_REPO / "transformer" / "config.json"
    t_config.write_text(json.dumps({**json.loads(t_config.read_text()), "text_len": 1024}))
    with pytest.raises(CheckpointError, match="text_len is 1024"):
        load_wan_components(dst, layout="diffusers", components=["transformer"], torch_dtype=torch.float32)


def test_pipeline_refuses_text_embeddings_of_another_length(tiny):
    import numpy as np

    from ex4d.diffusion.pipeline import build_pipeline
    from ex4d.errors import InputError

    pipe = build_pipeline(make_tiny_components(seed=1), None)  # its own models: build_pipeline changes them
    cond = torch.zeros(1, 3, 5, 16, 16)
    mask = torch.ones(1, 3, 5, 16, 16)
    short = torch.zeros(1, 300, 32)
    with pytest.raises(InputError, match=r"prompt_embeds must be \(B, 512, text_dim\), got \(1, 300, 32\)"):
        pipe(cond, mask, prompt_embeds=short, negative_prompt_embeds=short, num_inference_steps=1)
    with pytest.raises(InputError, match="negative_prompt_embeds"):
        pipe(cond, mask, prompt_embeds=torch.zeros(1, 512, 32), negative_prompt_embeds=short, num_inference_steps=1)
    assert np.asarray(pipe(cond, mask, prompt_embeds=torch.zeros(1, 512, 32), guidance_scale=1.0,
                           num_inference_steps=1, output_type="latent").frames).shape[1] == 16


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_transformer_config_without_loading_matches_the_loaded_model(tiny, layout, tmp_path):
    """What the adapter is validated against before the Wan weights load (both layouts)."""
    config = ww.wan_transformer_config(tiny[layout], layout)
    loaded = dict(load_wan_components(tiny[layout], layout=layout, components=["transformer"],
                                      torch_dtype=torch.float32)["transformer"].config)
    for key in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "out_channels", "in_channels"):
        assert config[key] == loaded[key], key
    assert tuple(config["patch_size"]) == tuple(loaded["patch_size"])
    w = load_ex4d_adapter(write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt"), transformer_config=config)
    assert w.num_layers == loaded["num_layers"]
