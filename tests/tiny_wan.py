"""Tiny random Wan2.1-I2V models of the real classes, and writers for every on-disk layout.

Shared by the weight-loading, pipeline and training tests. Everything is built in code, seeded,
and small enough for CPU CI (about 1 M parameters in all, most of them in the VAE):

* :func:`tiny_transformer_config` - ``WanTransformer3DModel`` with 2 layers, 2 heads of 12 (Wan's
  RoPE splits the head dim into t/h/w parts of ``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)``: 4/4/4
  for 12), I2V cross-attention (image_dim = the tiny CLIP width), 16 latent channels.
* :func:`make_tiny_components` - dict(transformer, vae, text_encoder, tokenizer, image_encoder,
  image_processor), the same keys that ``ex4d.diffusion.weights.load_wan_components`` returns.
* :func:`write_tiny_original_layout` / :func:`write_tiny_diffusers_layout` - the same models saved
  as the Wan-AI/Wan2.1-I2V-14B-480P files (DiT shards + .pth files + google/umt5-xxl tokenizer) or
  as the -Diffusers repository.
* :func:`make_tiny_adapter_state` / :func:`write_tiny_ex4d_ckpt` - an ``ex4d.ckpt`` with LoRA + CamVidEncoder.

Usage::

    from tiny_wan import make_tiny_components, write_tiny_original_layout
    folder = write_tiny_original_layout(tmp_path / "Wan-AI" / "Wan2.1-I2V-14B-480P", seed=0)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

Z_DIM = 16           # VAE latent channels (as in the real model)
TEXT_DIM = 32        # tiny umT5 width
CLIP_DIM = 32        # tiny CLIP width (1 head: the loader infers heads = width // 80, min 1)
CLIP_IMAGE_SIZE = 224  # 257 image tokens, as in the real model; processor resizes to this
LORA_RANK = 4
ENCODER_HIDDEN = 16  # tiny CamVidEncoder hidden width (1024 in the real one)
TOKENIZER_WORDS = ("a the of and in to 4k ultra hd surround motion realistic tone panoramic shot wide angle "
                   "view cinematic quality bright tones overexposed static blurred details").split()


def tiny_transformer_config() -> dict:
    """Config of a tiny I2V ``WanTransformer3DModel`` (inner dim 24 = 2 heads x 12)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=2 * Z_DIM + 4,
                out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=2,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=CLIP_DIM,
                added_kv_proj_dim=24, rope_max_seq_len=1024, pos_embed_seq_len=None)


def tiny_vae_config() -> dict:
    """Wan2.1 VAE structure (mult [1,2,4,4], 2 res blocks, temporal [F,T,T]) with base width 8."""
    return dict(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)


def tiny_t5_config() -> dict:
    return dict(vocab_size=128, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                layer_norm_epsilon=1e-6, tie_word_embeddings=False, scalable_attention=True,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def tiny_clip_config() -> dict:
    return dict(hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                image_size=CLIP_IMAGE_SIZE, patch_size=14, num_channels=3, hidden_act="gelu",
                layer_norm_eps=1e-5, projection_dim=16)


def make_tiny_tokenizer():
    """A small umT5-like tokenizer (Unigram, cased, ``</s>`` appended, pad 0 / eos 1 / unk 2), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,."]
    vocab += [("\u2581" + w, -1.0) for w in TOKENIZER_WORDS]
    assert len(vocab) <= tiny_t5_config()["vocab_size"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    # The same (cased) pre-tokenisation that transformers' T5 tokenizer rebuilds when it loads a
    # folder, so a saved and reloaded tokenizer splits text identically.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def make_tiny_image_processor():
    from ex4d.diffusion.weights.wan import make_image_processor

    return make_image_processor(CLIP_IMAGE_SIZE)


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Overwrite every parameter with seeded N(0, 0.2) values (zero-init layers become non-trivial,
    so a load that silently skips a tensor is detectable)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def tiny_velocity(transformer, seed: int = 0) -> torch.Tensor:
    """One forward of a tiny Wan DiT on seeded random inputs: a 3x8x8 latent video, 512 text tokens and
    257 image tokens (widths from its config), timestep 500; returns the velocity (1, C, 3, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
    text = torch.randn(1, 512, cfg.text_dim, generator=g)
    image = torch.randn(1, 257, cfg.image_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                           encoder_hidden_states_image=image, return_dict=False)[0]


def make_tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Seeded tiny random models of the real classes, in ``load_wan_components``'s dict layout."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    g = torch.Generator().manual_seed(seed)
    transformer = _randomize(WanTransformer3DModel.from_config(tiny_transformer_config()), g)
    vae = _randomize(AutoencoderKLWan.from_config(tiny_vae_config()), g)
    with torch.no_grad():  # RMS-norm gammas near 1 keep the tiny VAE numerically tame
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.add_(1.0)
    text_encoder = _randomize(UMT5EncoderModel(UMT5Config(**tiny_t5_config())), g)
    image_encoder = _randomize(CLIPVisionModel(CLIPVisionConfig(**tiny_clip_config())), g)
    models = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, image_encoder=image_encoder)
    out = {k: (m.to(dtype) if dtype != torch.float32 else m).eval() for k, m in models.items()}
    out["tokenizer"] = make_tiny_tokenizer()
    out["image_processor"] = make_tiny_image_processor()
    return out


def write_tiny_original_layout(folder: str | Path, seed: int = 0, *, components: dict | None = None,
                               num_shards: int = 2) -> Path:
    """Write the tiny models as the original Wan2.1-I2V release files into ``folder``.

    DiT: ``num_shards`` safetensors shards + index json + Wan's ``config.json``; T5/CLIP/VAE as
    ``.pth`` state dicts with Wan's key names (the CLIP file also gets ``visual.head``,
    ``textual.*`` and ``log_scale``, which loaders must ignore); tokenizer in ``google/umt5-xxl``.
    Returns ``folder``. ``components`` defaults to ``make_tiny_components(seed)``.
    """
    from safetensors.torch import save_file

    from ex4d.diffusion.weights import models_dir as md
    from ex4d.diffusion.weights import keymaps as km

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    comps = components if components is not None else make_tiny_components(seed)
    g = torch.Generator().manual_seed(seed + 1)

    dit = {km.dit_key_to_original(k): v.contiguous() for k, v in comps["transformer"].state_dict().items()}
    keys = sorted(dit)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: dit[k] for k in keys[i::num_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / md.DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg = tiny_transformer_config()
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "i2v", "text_len": 512, "in_dim": cfg["in_channels"],
        "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"], "ffn_dim": cfg["ffn_dim"],
        "freq_dim": cfg["freq_dim"], "out_dim": cfg["out_channels"], "num_heads": cfg["num_attention_heads"],
        "num_layers": cfg["num_layers"], "eps": cfg["eps"]}, indent=1))

    t5 = {}
    for k, v in comps["text_encoder"].state_dict().items():
        name = km.t5_key_to_original(k)
        if name is not None:
            t5[name] = v.clone()
    torch.save(t5, folder / md.T5_FILE)

    clip = km.clip_state_dict_to_original(comps["image_encoder"].state_dict(), torch.cat)
    clip = {k: v.clone() for k, v in clip.items()}
    clip["visual.head"] = torch.randn(CLIP_DIM, 16, generator=g)
    clip["textual.token_embedding.weight"] = torch.randn(10, 8, generator=g)
    clip["textual.head.weight"] = torch.randn(16, 8, generator=g)
    clip["log_scale"] = torch.tensor(4.6052)
    torch.save(clip, folder / md.CLIP_FILE)

    vae = {km.vae_key_to_original(k): v.clone() for k, v in comps["vae"].state_dict().items()}
    torch.save(vae, folder / md.VAE_FILE)

    comps["tokenizer"].save_pretrained(str(folder / md.TOKENIZER_DIR))
    return folder


def write_tiny_diffusers_layout(folder: str | Path, seed: int = 0, *, components: dict | None = None) -> Path:
    """Write the tiny models as the Wan2.1-I2V-14B-480P-Diffusers repository layout into ``folder``."""
    from ex4d.diffusion.weights.convert import save_diffusers_layout

    comps = components if components is not None else make_tiny_components(seed)
    return save_diffusers_layout(comps, folder)


def make_tiny_adapter_state(seed: int = 0, *, naming: str = "default", rank: int = LORA_RANK,
                            config: dict | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """A flat ``ex4d.ckpt``-style dict for a transformer config (default: the tiny one).

    naming: "default" = ``blocks.{i}.self_attn.q.lora_A.default.weight`` (what EX-4D saves),
    "peft" = ``...lora_A.weight``. ``prefix`` (e.g. "diffusion_model.") goes before the LoRA keys
    only; the 8 CamVidEncoder tensors ``latent_encoder.{0,2,4}.*`` / ``latent_patch_embedding.*``
    are never prefixed. Values are seeded random (B is non-zero so a skipped load shows).
    """
    cfg = config or tiny_transformer_config()
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn = cfg["ffn_dim"]
    z = cfg["out_channels"]
    g = torch.Generator().manual_seed(seed + 7)
    tag = ".default" if naming == "default" else ""
    if naming not in ("default", "peft"):
        raise ValueError(naming)
    shapes = {f"{a}.{p}": (dim, dim) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    shapes.update({"ffn.0": (dim, ffn), "ffn.2": (ffn, dim)})
    state = {}
    for i in range(cfg["num_layers"]):
        for mod, (fan_in, fan_out) in shapes.items():
            state[f"{prefix}blocks.{i}.{mod}.lora_A{tag}.weight"] = torch.randn(rank, fan_in, generator=g) * 0.1
            state[f"{prefix}blocks.{i}.{mod}.lora_B{tag}.weight"] = torch.randn(fan_out, rank, generator=g) * 0.1
    h = ENCODER_HIDDEN if dim < 1024 else 1024
    p = cfg["patch_size"]
    enc_shapes = {"latent_encoder.0.weight": (h, 2 * z, 1, 1, 1), "latent_encoder.0.bias": (h,),
                  "latent_encoder.2.weight": (h, h, 1, 1, 1), "latent_encoder.2.bias": (h,),
                  "latent_encoder.4.weight": (h, h, 1, 1, 1), "latent_encoder.4.bias": (h,),
                  "latent_patch_embedding.weight": (dim, h, *p), "latent_patch_embedding.bias": (dim,)}
    for k, s in enc_shapes.items():
        state[k] = torch.randn(s, generator=g) * 0.1
    return state


def write_tiny_ex4d_ckpt(path: str | Path, naming: str = "default", seed: int = 0, **kwargs) -> Path:
    """``torch.save`` :func:`make_tiny_adapter_state` to ``path`` (an ``ex4d.ckpt`` look-alike)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_tiny_adapter_state(seed, naming=naming, **kwargs), path)
    return path


def write_tiny_models_dir(root: str | Path, seed: int = 0) -> Path:
    """A ``--models-dir`` as a user downloads it: the original Wan layout and ``ex4d.ckpt``, tiny and random."""
    from ex4d.diffusion.weights import models_dir as md

    root = Path(root)
    write_tiny_original_layout(root / md.WAN_REPO, seed=seed)
    write_tiny_ex4d_ckpt(root / md.EX4D_REPO / md.ADAPTER_CKPT)
    return root
