"""The EX-4D adapter on a diffusers ``WanTransformer3DModel``: CamVidEncoder, LoRA and the token hook.

Three pieces, none of which forks the transformer (spec 7.4-7.7, 11.6-11.7):

* :class:`CamVidEncoder` maps the VAE latents of the rendered colour video and of the (doubly
  scaled) mask to one 5120-d token per DiT patch: three per-voxel 1x1x1 convolutions
  32 -> 1024 -> 1024 -> 1024 with SiLU between, then a (1, 2, 2)/(1, 2, 2) convolution that
  patchifies like the DiT's own ``patch_embedding``. The last layer starts at zero, so a fresh
  adapter is an exact no-op.
* LoRA (rank 16, alpha 16 by default) through peft on the diffusers names of the ten linears the
  reference adapts per block (``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0``, ``ffn.net.0.proj``,
  ``ffn.net.2``), loaded strictly with counts asserted, and merged into the base weights for
  inference unless asked otherwise.
* :class:`PatchEmbeddingInjector`, a forward hook on ``transformer.patch_embedding`` that adds the
  encoder output to the patch tokens, for every batch row (both CFG branches, batched or not).

Shapes: latents (B, 16, T', h, w); encoder output (B, 5120, T', h/2, w/2).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ex4d.errors import CheckpointError, key_mismatch_error

logger = logging.getLogger(__name__)

#: Default adapter name inside peft.
ADAPTER_NAME = "ex4d"
#: The ten adapted linears per block, in diffusers naming (reference: q, k, v, o of both attentions, ffn.0, ffn.2).
LORA_TARGET_SUFFIXES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)
#: peft full-match regex for those linears (image k/v ``add_k_proj``/``add_v_proj`` are NOT adapted).
LORA_TARGET_REGEX = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"
#: Keys of the camera encoder in ``ex4d.ckpt`` (unprefixed).
ENCODER_KEYS = tuple(f"{layer}.{kind}" for layer in ("latent_encoder.0", "latent_encoder.2", "latent_encoder.4",
                                                      "latent_patch_embedding") for kind in ("weight", "bias"))


class CamVidEncoder(ModelMixin, ConfigMixin):
    """Geometry-condition encoder: (video latent, mask latent) -> DiT-sized tokens.

    A diffusers ``ModelMixin`` (config, dtype/device, save_pretrained) so that it registers in the
    pipeline like the other models. Args: in_channels per latent (16; the input is their concatenation, 32), hidden width (1024),
    out_channels = DiT width (5120), patch_size = the DiT's (1, 2, 2).
    Forward: video_latent, mask_latent (B, 16, T', h, w) -> (B, out, T', h/2, w/2).
    """

    @register_to_config
    def __init__(self, in_channels: int = 16, hidden_channels: int = 1024, out_channels: int = 5120,
                 patch_size: tuple[int, int, int] = (1, 2, 2)):
        super().__init__()
        patch_size = tuple(patch_size)
        self.latent_encoder = nn.Sequential(
            nn.Conv3d(2 * in_channels, hidden_channels, kernel_size=1),
            nn.SiLU(),
            nn.Conv3d(hidden_channels, hidden_channels, kernel_size=1),
            nn.SiLU(),
            nn.Conv3d(hidden_channels, hidden_channels, kernel_size=1),
        )
        self.latent_patch_embedding = nn.Conv3d(hidden_channels, out_channels, kernel_size=patch_size,
                                                stride=patch_size)
        # Zero init: an untrained adapter adds exactly nothing to the DiT tokens.
        nn.init.zeros_(self.latent_patch_embedding.weight)
        nn.init.zeros_(self.latent_patch_embedding.bias)

    def forward(self, video_latent: torch.Tensor, mask_latent: torch.Tensor) -> torch.Tensor:
        if video_latent.shape != mask_latent.shape:
            raise ValueError(f"video and mask latents differ: {tuple(video_latent.shape)} vs {tuple(mask_latent.shape)}")
        dtype = self.latent_patch_embedding.weight.dtype
        x = torch.cat([video_latent, mask_latent], dim=1).to(dtype)
        return self.latent_patch_embedding(self.latent_encoder(x))

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict load of the 8 encoder tensors (``latent_encoder.{0,2,4}``, ``latent_patch_embedding``)."""
        keys = set(state)
        missing, extra = sorted(set(ENCODER_KEYS) - keys), sorted(keys - set(ENCODER_KEYS))
        if missing or extra:
            raise key_mismatch_error("camera-encoder weights", missing, extra,
                                     hint=f"expected exactly the {len(ENCODER_KEYS)} tensors {', '.join(ENCODER_KEYS)}")
        own = self.state_dict()
        for key in ENCODER_KEYS:
            if tuple(state[key].shape) != tuple(own[key].shape):
                raise CheckpointError(f"camera-encoder tensor {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {tuple(own[key].shape)}")
        self.load_state_dict({k: state[k] for k in ENCODER_KEYS}, strict=True)


# ---------------------------------------------------------------------------------------------
# Token injection


class PatchEmbeddingInjector:
    """Adds condition tokens to ``transformer.patch_embedding``'s output through a forward hook.

    ``tokens`` (B_c, C, T', h, w) must match the patch embedding output (B, C, T', h, w) except for
    the batch: B must be a multiple of B_c and the tokens are tiled (a batch of 2 for batched CFG
    gets the same geometry in both halves, as the reference feeds both branches). With no tokens
    set the hook leaves the output unchanged.
    """

    def __init__(self, transformer: nn.Module):
        if not hasattr(transformer, "patch_embedding"):
            raise TypeError(f"{type(transformer).__name__} has no patch_embedding to hook")
        self.tokens: torch.Tensor | None = None
        self._handle = transformer.patch_embedding.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens
        if tokens is None:
            return output
        if tokens.shape[1:] != output.shape[1:] or output.shape[0] % tokens.shape[0]:
            raise ValueError(f"condition tokens {tuple(tokens.shape)} do not fit the patch embedding output "
                             f"{tuple(output.shape)}; the condition video and the latents disagree in size")
        tokens = tokens.to(device=output.device, dtype=output.dtype)
        if output.shape[0] != tokens.shape[0]:
            tokens = tokens.repeat(output.shape[0] // tokens.shape[0], 1, 1, 1, 1)
        return output + tokens

    def set(self, tokens: torch.Tensor | None) -> None:
        self.tokens = tokens

    def clear(self) -> None:
        self.tokens = None

    @contextmanager
    def active(self, tokens: torch.Tensor) -> Iterator[None]:
        """Context in which every transformer forward gets ``tokens`` added; cleared afterwards."""
        self.tokens = tokens
        try:
            yield
        finally:
            self.tokens = None

    def remove(self) -> None:
        self.tokens = None
        self._handle.remove()


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_target_names(transformer: nn.Module) -> list[str]:
    """Names of the linears that get LoRA, in module order (10 per block)."""
    pattern = re.compile(LORA_TARGET_REGEX)
    return [name for name, module in transformer.named_modules()
            if isinstance(module, nn.Linear) and pattern.fullmatch(name)]


def inject_lora(transformer: nn.Module, rank: int = 16, alpha: float = 16.0,
                adapter_name: str = ADAPTER_NAME) -> list[str]:
    """Wrap the 10 target linears of every block with peft LoRA layers (A Kaiming, B zero: a no-op).

    Returns the wrapped module names. The LoRA weights take the base weights' dtype and device.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_target_names(transformer)
    expected = len(LORA_TARGET_SUFFIXES) * len(getattr(transformer, "blocks", []))
    if len(targets) != expected:
        raise ValueError(f"found {len(targets)} LoRA targets in {type(transformer).__name__}, expected {expected}")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=LORA_TARGET_REGEX)
    inject_adapter_in_model(config, transformer, adapter_name=adapter_name, low_cpu_mem_usage=False)
    # peft may upcast adapters to fp32; keep them beside their base weights' dtype/device.
    for name in targets:
        layer = transformer.get_submodule(name)
        base = layer.get_base_layer()
        for holder in (layer.lora_A, layer.lora_B):
            holder[adapter_name].to(device=base.weight.device, dtype=_compute_dtype(base.weight.dtype))
    return targets


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dtype


def load_lora_weights(transformer: nn.Module, lora: Mapping[str, torch.Tensor],
                      adapter_name: str = ADAPTER_NAME) -> int:
    """Copy LoRA tensors named like ``blocks.0.attn1.to_q.lora_A.weight`` into the injected layers.

    Strict: every injected A/B must be given and nothing else; shapes must match. Returns the count
    (800 for the 14B model at rank 16). Raises :class:`CheckpointError` on any mismatch.
    """
    expected: dict[str, torch.nn.Parameter] = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {}):
            expected[f"{name}.lora_A.weight"] = module.lora_A[adapter_name].weight
            expected[f"{name}.lora_B.weight"] = module.lora_B[adapter_name].weight
    if not expected:
        raise ValueError("no LoRA layers injected; call inject_lora first")
    missing, extra = sorted(set(expected) - set(lora)), sorted(set(lora) - set(expected))
    if missing or extra:
        raise key_mismatch_error("LoRA weights", missing, extra, hint=f"expected exactly {len(expected)} tensors")
    with torch.no_grad():
        for key, param in expected.items():
            value = lora[key]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"LoRA tensor {key} has shape {tuple(value.shape)}, expected "
                                      f"{tuple(param.shape)} (is the rank right?)")
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return len(expected)


@torch.no_grad()
def merge_lora(transformer: nn.Module, adapter_name: str = ADAPTER_NAME) -> int:
    """Fold every LoRA delta into its base linear and put the plain ``nn.Linear`` back.

    The delta B @ A * scale is computed in float32 and added to the base weight in its own dtype,
    so a merged model runs at base speed and compiles like the stock transformer. Returns the count.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(transformer.named_modules()):
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        a = module.lora_A[adapter_name].weight.float()
        b = module.lora_B[adapter_name].weight.float()
        scale = module.scaling[adapter_name]
        delta = (b @ a) * scale
        base.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, base)
        merged += 1
    # peft leaves a marker on the model; clear it so later code sees a plain transformer.
    if hasattr(transformer, "peft_config"):
        transformer.peft_config.pop(adapter_name, None)
        if not transformer.peft_config:
            del transformer.peft_config
    return merged


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def apply_adapter(transformer: nn.Module, weights: Any | None = None, *, rank: int | None = None,
                  alpha: float | None = None, merge: bool = True, encoder_dtype: torch.dtype | None = None,
                  ) -> tuple[CamVidEncoder, PatchEmbeddingInjector]:
    """Install the EX-4D adapter on a Wan transformer.

    weights: an ``AdapterWeights``-like object (``lora``, ``encoder``, ``rank``, ``alpha``) from
    ``ex4d.diffusion.weights.load_ex4d_adapter``, or None for a fresh (no-op) adapter, as training
    starts. merge: fold the LoRA into the base weights (inference default); False keeps peft layers.
    Returns (camera encoder on the transformer's device, hook injector).
    """
    config = transformer.config
    rank = rank or getattr(weights, "rank", None) or 16
    alpha = alpha or getattr(weights, "alpha", None) or float(rank)
    param = transformer.patch_embedding.weight
    inner_dim = config.num_attention_heads * config.attention_head_dim
    hidden = 1024  # the released encoder's width; a checkpoint's own width wins (tiny test models)
    if weights is not None and "latent_encoder.0.weight" in weights.encoder:
        hidden = int(weights.encoder["latent_encoder.0.weight"].shape[0])
    encoder = CamVidEncoder(in_channels=config.out_channels, hidden_channels=hidden, out_channels=inner_dim,
                            patch_size=tuple(config.patch_size))
    inject_lora(transformer, rank=rank, alpha=alpha)
    if weights is not None:
        count = load_lora_weights(transformer, weights.lora)
        encoder.load_weights(weights.encoder)
        logger.info("loaded %d LoRA tensors (rank %d, alpha %g) and %d encoder tensors", count, rank, alpha,
                    len(ENCODER_KEYS))
    if merge:
        merge_lora(transformer)
    # nn.Module.to: ModelMixin.to warns about fp32 modules even when there are none.
    nn.Module.to(encoder, device=param.device, dtype=encoder_dtype or _compute_dtype(param.dtype))
    return encoder, PatchEmbeddingInjector(transformer)
