"""Key maps between the original Wan2.1 checkpoint files and the diffusers/transformers classes.

Pure functions on key names (no tensors, no IO), so that the full-size maps can be checked on the
meta device against the manifests of the real files. Each component has a forward map
(original file key -> model key) and its inverse (used to write files in the original layout,
e.g. tiny test checkpoints, and to check the forward map is a bijection).

| component | original file | model class | map |
|---|---|---|---|
| DiT | 7 ``diffusion_pytorch_model-*.safetensors`` shards | ``diffusers.WanTransformer3DModel`` | diffusers' own converter (pure renames) |
| VAE | ``Wan2.1_VAE.pth`` | ``diffusers.AutoencoderKLWan`` | diffusers' own converter (pure renames) |
| T5 | ``models_t5_umt5-xxl-enc-bf16.pth`` | ``transformers.UMT5EncoderModel`` | :func:`t5_key_to_hf` |
| CLIP | ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` | ``transformers.CLIPVisionModel`` | :func:`clip_state_dict_to_hf` (splits ``to_qkv``) |
"""

from __future__ import annotations

import re
from typing import Callable

# --------------------------------------------------------------------------------------------
# Full-size configs (checkpoint README items 1-5; the diffusers DiT config is the one diffusers'
# scripts/convert_wan_to_diffusers.py uses for "Wan-I2V-14B-480p").
# --------------------------------------------------------------------------------------------

TRANSFORMER_CONFIG_I2V_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
    rope_max_seq_len=1024, pos_embed_seq_len=None,
)

# AutoencoderKLWan's defaults are the Wan2.1 VAE (dim 96, z 16, mult [1,2,4,4], 2 res blocks,
# temporal downsample [F,T,T]) including the 16 latent mean/std values hard-coded in Wan's wrapper.
VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)

# google/umt5-xxl's config.json (encoder part); Wan's T5 uses the tanh GELU ("gelu_new") gate.
T5_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                 num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                 layer_norm_epsilon=1e-6, tie_word_embeddings=False, scalable_attention=True,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.1)

# open-clip ViT-H/14 visual tower (the XLM-RoBERTa CLIP of Wan I2V): width 1280, 32 blocks, 16 heads.
CLIP_VISION_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                          image_size=224, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
                          projection_dim=1024)

# Wan's CLIP preprocessing: bicubic resize straight to 224x224 (no crop), OpenAI CLIP mean/std.
CLIP_IMAGE_PROCESSOR_CONFIG = dict(
    do_resize=True, size={"height": 224, "width": 224}, resample=3, do_center_crop=False,
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)

#: Keys of the CLIP file that Wan I2V never uses; loaded files must contain them but they are
#: counted and dropped, not mapped (textual tower, contrastive scale, projection head).
CLIP_IGNORED_PREFIXES = ("textual.", "log_scale", "visual.head")


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------

def dit_key_to_diffusers(key: str) -> str:
    """Original ``WanModel`` key -> ``WanTransformer3DModel`` key, via diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    (new_key,) = convert_wan_transformer_to_diffusers({key: None}).keys()
    return new_key


# Inverse rename table, applied to the dotted segments after the block prefix. Ordered so that
# longer, more specific names win.
_DIT_TOP_INVERSE = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_DIT_BLOCK_INVERSE = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    # diffusers swapped the names: its affine pre-cross-attention norm2 is Wan's norm3.
    "norm2": "norm3", "norm3": "norm2",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


def dit_key_to_original(key: str) -> str:
    """``WanTransformer3DModel`` key -> original ``WanModel`` key (inverse of :func:`dit_key_to_diffusers`)."""
    if key == "scale_shift_table":
        return "head.modulation"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        inner = _DIT_BLOCK_INVERSE.get(m.group(2))
        if inner is None:
            raise KeyError(f"no original Wan name for {key}")
        return f"blocks.{m.group(1)}.{inner}.{m.group(3)}"
    m = re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", key)
    if m:
        return f"blocks.{m.group(1)}.modulation"
    module, _, leaf = key.rpartition(".")
    if module in _DIT_TOP_INVERSE:
        return f"{_DIT_TOP_INVERSE[module]}.{leaf}"
    raise KeyError(f"no original Wan name for {key}")


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

def vae_key_to_diffusers(key: str) -> str:
    """Original ``WanVAE_`` key -> ``AutoencoderKLWan`` key, via diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    (new_key,) = convert_wan_vae_to_diffusers({key: None}).keys()
    return new_key


_VAE_RESNET_INVERSE = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                       "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _vae_resnet_part(part: str) -> str:
    for new, old in _VAE_RESNET_INVERSE.items():
        if part == new or part.startswith(new + "."):
            return old + part[len(new):]
    raise KeyError(part)


def vae_key_to_original(key: str, num_res_blocks: int = 2) -> str:
    """``AutoencoderKLWan`` key -> original ``WanVAE_`` key (inverse of :func:`vae_key_to_diffusers`).

    The decoder's flat ``upsamples`` list holds, per level, ``num_res_blocks + 1`` residual blocks
    and then one resample block (none after the last level).
    """
    simple = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
              "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
              "decoder.norm_out": "decoder.head.0", "encoder.conv_out": "encoder.head.2",
              "decoder.conv_out": "decoder.head.2"}
    module, _, leaf = key.rpartition(".")
    if module in simple:
        return f"{simple[module]}.{leaf}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key)
    if m:
        return f"{m.group(1)}.middle.{2 * int(m.group(2))}.{_vae_resnet_part(m.group(3))}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key)
    if m:
        return f"{m.group(1)}.middle.1.{m.group(2)}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
    if m:
        part = m.group(2)
        if not (part.startswith("resample.") or part.startswith("time_conv.")):
            part = _vae_resnet_part(part)
        return f"encoder.downsamples.{m.group(1)}.{part}"
    per_level = num_res_blocks + 2
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"decoder.upsamples.{per_level * int(m.group(1)) + int(m.group(2))}.{_vae_resnet_part(m.group(3))}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key)
    if m:
        return f"decoder.upsamples.{per_level * int(m.group(1)) + num_res_blocks + 1}.{m.group(2)}"
    raise KeyError(f"no original Wan VAE name for {key}")


# --------------------------------------------------------------------------------------------
# T5 (umT5-XXL encoder)
# --------------------------------------------------------------------------------------------

_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    # Wan keeps one relative-position table per block (shared_pos=False); so does UMT5.
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan: fc2(fc1(x) * gelu(gate(x))); HF: wo(gelu(wi_0(x)) * wi_1(x)).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_BLOCK_INVERSE = {v: k for k, v in _T5_BLOCK.items()}


def t5_key_to_hf(key: str) -> list[str]:
    """Original Wan ``T5Encoder`` key -> ``UMT5EncoderModel`` key(s).

    The token embedding feeds both ``shared`` and ``encoder.embed_tokens`` (the same tensor in HF).
    """
    if key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in _T5_BLOCK:
        return [f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"]
    raise KeyError(f"unknown Wan T5 key {key}")


def t5_key_to_original(key: str) -> str | None:
    """``UMT5EncoderModel`` key -> original key; None for the tied duplicate ``encoder.embed_tokens``."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.embed_tokens.weight":
        return None
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if m and m.group(2) in _T5_BLOCK_INVERSE:
        return f"blocks.{m.group(1)}.{_T5_BLOCK_INVERSE[m.group(2)]}"
    raise KeyError(f"no original Wan T5 name for {key}")


# --------------------------------------------------------------------------------------------
# CLIP visual tower
# --------------------------------------------------------------------------------------------

_CLIP_LAYER = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
}
_CLIP_LAYER_INVERSE = {v: k for k, v in _CLIP_LAYER.items()}
_CLIP_TOP = {"visual.pre_norm": "pre_layrnorm", "visual.post_norm": "post_layernorm",
             "visual.patch_embedding": "embeddings.patch_embedding"}
_CLIP_TOP_INVERSE = {v: k for k, v in _CLIP_TOP.items()}


def clip_is_ignored(key: str) -> bool:
    """True for keys of the Wan CLIP file that the I2V image encoder does not use."""
    return any(key == p or key.startswith(p) for p in CLIP_IGNORED_PREFIXES)


def clip_state_dict_to_hf(state: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """Map the ``visual.*`` tensors of Wan's CLIP file to ``CLIPVisionModel`` names.

    Returns ``(mapped, ignored_keys)``; the fused ``to_qkv`` (3*C, C) is split into q, k, v in that
    order (open-clip's ``chunk(3)`` order). ``prefix`` is the model's key prefix ("" in
    transformers 5, "vision_model." in 4.x). Unknown keys raise ``KeyError``.
    Values may be anything with ``shape``/slicing (real tensors or meta tensors).
    """
    out: dict = {}
    ignored: list[str] = []
    for key, value in state.items():
        if clip_is_ignored(key):
            ignored.append(key)
            continue
        if key == "visual.cls_embedding":  # (1, 1, C) -> (C,)
            out[prefix + "embeddings.class_embedding"] = value.reshape(value.shape[-1])
            continue
        if key == "visual.pos_embedding":  # (1, N, C) -> (N, C)
            out[prefix + "embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
            continue
        module, _, leaf = key.rpartition(".")
        if module in _CLIP_TOP:
            out[f"{prefix}{_CLIP_TOP[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)", module)
        if m is None:
            raise KeyError(f"unknown Wan CLIP key {key}")
        layer = f"{prefix}encoder.layers.{m.group(1)}"
        if m.group(2) == "attn.to_qkv":
            q, k, v = value.chunk(3, dim=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{layer}.self_attn.{name}.{leaf}"] = part
            continue
        if m.group(2) not in _CLIP_LAYER:
            raise KeyError(f"unknown Wan CLIP key {key}")
        out[f"{layer}.{_CLIP_LAYER[m.group(2)]}.{leaf}"] = value
    return out, ignored


def clip_key_to_original(key: str) -> str:
    """``CLIPVisionModel`` key -> the Wan CLIP key holding it (q/k/v all live in ``attn.to_qkv``)."""
    key = key.removeprefix("vision_model.")
    if key == "embeddings.class_embedding":
        return "visual.cls_embedding"
    if key == "embeddings.position_embedding.weight":
        return "visual.pos_embedding"
    module, _, leaf = key.rpartition(".")
    if module in _CLIP_TOP_INVERSE:
        return f"{_CLIP_TOP_INVERSE[module]}.{leaf}"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module)
    if m is None:
        raise KeyError(key)
    if m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"visual.transformer.{m.group(1)}.attn.to_qkv.{leaf}"
    return f"visual.transformer.{m.group(1)}.{_CLIP_LAYER_INVERSE[m.group(2)]}.{leaf}"


def clip_state_dict_to_original(state: dict, cat: Callable) -> dict:
    """Inverse of :func:`clip_state_dict_to_hf` for the visual tower (``cat`` = ``torch.cat``).

    Used to write files in Wan's layout; the caller adds ``visual.head``, ``textual.*`` and
    ``log_scale`` if a complete Wan CLIP file is wanted.
    """
    out: dict = {}
    qkv: dict[tuple[str, str], dict[str, object]] = {}
    for key, value in state.items():
        key = key.removeprefix("vision_model.")
        if key == "embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
            continue
        if key == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.reshape(1, *value.shape)
            continue
        module, _, leaf = key.rpartition(".")
        if module in _CLIP_TOP_INVERSE:
            out[f"{_CLIP_TOP_INVERSE[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module)
        if m is None:
            raise KeyError(f"no original Wan CLIP name for {key}")
        i, sub = m.groups()
        if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((i, leaf), {})[sub[-6]] = value
            continue
        out[f"visual.transformer.{i}.{_CLIP_LAYER_INVERSE[sub]}.{leaf}"] = value
    for (i, leaf), parts in qkv.items():
        out[f"visual.transformer.{i}.attn.to_qkv.{leaf}"] = cat([parts["q"], parts["k"], parts["v"]], 0)
    return out
