"""Public entry points for the generation-stage weights (Wan2.1-I2V-14B-480P + the EX-4D adapter).

::

    from ex4d.diffusion.weights import load_wan_components, load_ex4d_adapter, resolve_adapter

    parts = load_wan_components("models", layout="auto", torch_dtype=torch.bfloat16, device="cuda")
    # -> dict(transformer, vae, text_encoder, tokenizer, image_encoder, image_processor)
    adapter = load_ex4d_adapter(resolve_adapter("models"), transformer_config=parts["transformer"].config)
    # -> AdapterWeights(lora={diffusers PEFT names}, encoder={8 CamVidEncoder tensors}, rank, alpha)

Layouts, resolution order and download commands: :mod:`ex4d.diffusion.weights.models_dir` and docs/models.md.
"""

from ex4d.diffusion.weights.models_dir import (
    EX4D_REPO,
    WAN_DIFFUSERS_REPO,
    WAN_REPO,
    download_command,
    resolve_adapter,
    resolve_wan,
)
from ex4d.diffusion.weights.adapter import (
    ENCODER_KEYS,
    LORA_MODULES,
    LORA_TARGET_MODULES,
    AdapterWeights,
    convert_lora_to_original,
    load_ex4d_adapter,
    lora_key_to_diffusers,
    lora_key_to_original,
    save_ex4d_adapter,
    validate_adapter,
)
from ex4d.diffusion.weights.convert import convert_models_dir, save_diffusers_layout
from ex4d.diffusion.weights.wan import (
    load_clip_original,
    load_diffusers_layout,
    load_dit_original,
    load_original_layout,
    load_t5_original,
    load_tokenizer,
    load_vae_original,
    load_wan_components,
    make_image_processor,
)

__all__ = [
    "EX4D_REPO", "WAN_DIFFUSERS_REPO", "WAN_REPO", "download_command", "resolve_adapter", "resolve_wan",
    "ENCODER_KEYS", "LORA_MODULES", "LORA_TARGET_MODULES", "AdapterWeights", "convert_lora_to_original",
    "load_ex4d_adapter", "lora_key_to_diffusers", "lora_key_to_original", "save_ex4d_adapter", "validate_adapter",
    "convert_models_dir", "save_diffusers_layout",
    "load_clip_original", "load_diffusers_layout", "load_dit_original", "load_original_layout", "load_t5_original",
    "load_tokenizer", "load_vae_original", "load_wan_components", "make_image_processor",
]
