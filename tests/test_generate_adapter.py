"""The EX-4D adapter on a tiny real WanTransformer3DModel: encoder, LoRA load/merge, token hook."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_wan import make_tiny_components, tiny_transformer_config, write_tiny_ex4d_ckpt  # noqa: E402

from ex4d.diffusion.adapter import (  # noqa: E402
    CamVidEncoder,
    PatchEmbeddingInjector,
    apply_adapter,
    count_parameters,
    inject_lora,
    load_lora_weights,
    lora_target_names,
)
from ex4d.errors import CheckpointError  # noqa: E402

FULL_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120)


def _transformer(seed=0):
    return make_tiny_components(seed)["transformer"]


def _inputs(batch=1, seed=0, frames=2, size=4):
    """Tiny DiT inputs: latents (B, 36, T', h, w), text (B, 512, 32), CLIP tokens (B, 257, 32)."""
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_transformer_config()
    return dict(hidden_states=torch.randn(batch, cfg["in_channels"], frames, size, size, generator=g),
                timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=torch.randn(batch, 512, cfg["text_dim"], generator=g),
                encoder_hidden_states_image=torch.randn(batch, 257, cfg["image_dim"], generator=g),
                return_dict=False)


def _random_adapter(transformer, rank=4, seed=0, hidden=16):
    """AdapterWeights-like object with diffusers-named LoRA tensors and a random encoder."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name in lora_target_names(transformer):
        layer = transformer.get_submodule(name)
        lora[f"{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        lora[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    encoder = CamVidEncoder(cfg.out_channels, hidden, dim).state_dict()
    encoder = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in encoder.items()}
    return SimpleNamespace(lora=lora, encoder=encoder, rank=rank, alpha=float(rank))


def test_encoder_size_matches_spec_and_starts_at_zero():
    with torch.device("meta"):
        full = CamVidEncoder(16, 1024, 5120)
    assert count_parameters(full) == 23_109_632
    enc = CamVidEncoder(16, 8, 24)
    out = enc(torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 3, 4, 4))
    assert out.shape == (1, 24, 3, 2, 2) and torch.all(out == 0)


def test_full_size_lora_count_on_meta():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(FULL_DIT)
    names = inject_lora(model, rank=16, alpha=16)
    assert len(names) == 400
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params == 76_677_120
    assert not any("add_k_proj" in n or "add_v_proj" in n for n in names)


def test_lora_load_is_strict():
    transformer = _transformer()
    adapter = _random_adapter(transformer)
    inject_lora(transformer, rank=4, alpha=4)
    assert load_lora_weights(transformer, adapter.lora) == 2 * 10 * 2  # 2 blocks x 10 linears x A/B
    missing = dict(adapter.lora)
    missing.pop(next(iter(missing)))
    with pytest.raises(CheckpointError, match="1 missing"):
        load_lora_weights(transformer, missing)
    extra = dict(adapter.lora, **{"blocks.0.attn2.add_k_proj.lora_A.weight": torch.zeros(4, 24)})
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_lora_weights(transformer, extra)
    wrong = dict(adapter.lora)
    key = "blocks.0.attn1.to_q.lora_A.weight"
    wrong[key] = torch.zeros(3, 24)
    with pytest.raises(CheckpointError, match="shape"):
        load_lora_weights(transformer, wrong)


def test_encoder_load_is_strict():
    enc = CamVidEncoder(16, 16, 24)
    state = {k: v + 1 for k, v in enc.state_dict().items()}
    enc.load_weights(state)
    assert torch.all(enc.latent_patch_embedding.bias == 1)
    with pytest.raises(CheckpointError, match="missing"):
        enc.load_weights({k: v for k, v in state.items() if not k.startswith("latent_patch")})


@torch.no_grad()
def test_merged_lora_equals_unmerged_and_changes_the_model():
    base = _transformer()
    plain = base(**_inputs())[0]
    adapter = _random_adapter(base)
    unmerged_model = _transformer()
    apply_adapter(unmerged_model, adapter, merge=False)
    unmerged = unmerged_model(**_inputs())[0]
    merged_model = _transformer()
    apply_adapter(merged_model, adapter, merge=True)
    assert not any("lora" in n for n, _ in merged_model.named_parameters()), "merge removes the peft layers"
    merged = merged_model(**_inputs())[0]
    assert (unmerged - plain).abs().max() > 1e-2, "the LoRA must change the prediction"
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_hook_random_tokens_change_prediction_zero_tokens_do_not():
    transformer = _transformer()
    injector = PatchEmbeddingInjector(transformer)
    plain = transformer(**_inputs())[0]
    shape = (1, 24, 2, 2, 2)  # (B, C, T', h/2, w/2)
    with injector.active(torch.zeros(shape)):
        zero = transformer(**_inputs())[0]
    assert torch.equal(zero, plain)
    # A random (not constant) tensor: a constant per channel would be cancelled by the LayerNorms.
    with injector.active(torch.randn(shape, generator=torch.Generator().manual_seed(1))):
        changed = transformer(**_inputs())[0]
    assert (changed - plain).abs().max() > 1e-3
    after = transformer(**_inputs())[0]
    assert torch.equal(after, plain), "tokens are cleared after the context"
    with injector.active(torch.randn(1, 24, 3, 2, 2)), pytest.raises(ValueError, match="do not fit"):
        transformer(**_inputs())


@torch.no_grad()
def test_hook_reaches_both_rows_of_a_batch():
    transformer = _transformer()
    injector = PatchEmbeddingInjector(transformer)
    tokens = torch.randn(1, 24, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    single = _inputs(batch=1, seed=5)
    with injector.active(tokens):
        one = transformer(**single)[0]
        batched = dict(single)
        for key in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image"):
            batched[key] = single[key].repeat(2, *([1] * (single[key].ndim - 1)))
        batched["timestep"] = single["timestep"].repeat(2)
        two = transformer(**batched)[0]
    assert torch.allclose(two[0], one[0], atol=1e-5) and torch.allclose(two[1], one[0], atol=1e-5)


def test_loads_the_tiny_ex4d_ckpt_through_the_weights_loader(tmp_path):
    from ex4d.diffusion.weights import load_ex4d_adapter

    path = write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt")
    transformer = _transformer()
    adapter = load_ex4d_adapter(path, transformer_config=dict(transformer.config))
    encoder, injector = apply_adapter(transformer, adapter, merge=False)
    assert len([n for n, _ in transformer.named_parameters() if "lora_" in n]) == len(adapter.lora)
    assert torch.equal(encoder.latent_patch_embedding.weight, adapter.encoder["latent_patch_embedding.weight"])
    injector.remove()
