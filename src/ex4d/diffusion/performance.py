"""Speed and memory options for :class:`ex4d.diffusion.pipeline.EX4DPipeline`, applied in the one safe order.

Every option is a diffusers/torch facility; nothing here changes what the model computes beyond
the documented rounding of merged LoRA, fused projections and fp8 weight storage:

1. LoRA merged into the base weights (:func:`ex4d.diffusion.adapter.apply_adapter`, ``merge=True``):
   the unmerged peft layers cost ~18 % per step (reference: 2.64 s vs 2.23 s per CFG step).
2. Fused self-attention QKV: one 5120 -> 15360 GEMM instead of three (needs the merged LoRA). Off
   by default: measured 1.4 % slower per step compiled on an H100 (the chunked q/k/v views are
   strided for the norms and RoPE that follow).
3. fp8 weight storage (``enable_layerwise_casting``, float8_e4m3fn storage, bf16 compute): halves
   the DiT's weight memory; the norms, patch and condition embeddings stay in their dtype.
4. Placement: everything on the GPU; or the low-VRAM mode: group offloading with CUDA streams
   (the DiT streams one block at a time from pinned CPU memory, prefetching the next; the T5
   is copied in bulk from pinned memory around its forward), for GPUs of <= 24 GB; or whole-model
   CPU offload.
5. Attention backend (diffusers' dispatcher). NOTE: ``set_attention_backend`` is process-global
   in diffusers (it sets the registry's active backend), and ``reset_attention_backend`` does not
   undo that; so it is applied only when asked.
6. ``torch.compile`` of the 40 repeated blocks (``compile_repeated_blocks``; ~15 s on the first
   call, then ~1.25x faster). fullgraph when no offload/casting hooks sit inside the blocks.
Measured on one H100 80GB (random full-size weights, 512x512x49, 25 steps; bench/bench_generate.py):
compiled bf16 1.52 s per CFG step, 40.7 s per generation excluding loading, 47.7 GiB peak (T5, CLIP
and VAE resident too); eager 2.07 s; fp8 storage + compile 1.60 s (batched) at 32.7 GiB; low-VRAM
+ compile 2.04 s per step at 14.6 GiB, measured with the T5 under block-level group offload, which
took ~12 s per prompt (see :class:`PinnedSwap`, which replaces it and is not yet timed on a GPU).

7. Batched CFG (one forward of batch 2 per step): on by default only when offloading, where it
   halves the weight traffic; on a GPU that holds the model two batch-1 forwards measured 4 %
   faster (1.53 vs 1.60 s per step, compiled, H100). Also a call-time flag ``pipe(..., batch_cfg=)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ex4d.errors import InputError

logger = logging.getLogger(__name__)

#: Friendly names -> diffusers AttentionBackendName values (raw diffusers names are accepted too).
ATTENTION_BACKENDS = {
    "native": "native",            # torch SDPA, torch picks the kernel (cuDNN on H100 for these shapes)
    "cudnn": "_native_cudnn",      # force torch's cuDNN SDPA kernel
    "torch-flash": "_native_flash",
    "efficient": "_native_efficient",
    "math": "_native_math",
    "flash": "flash",              # needs the flash-attn package
    "flash3": "_flash_3",          # needs flash-attn 3 (Hopper)
    "sage": "sage",                # needs sageattention
    "xformers": "xformers",
    "flex": "flex",
}


@dataclass
class PerformanceOptions:
    """How to run the generator. Defaults are the fast full-GPU setup (bf16, merged LoRA).

    merge_lora: fold the LoRA into the base weights (default) rather than keeping peft layers.
    fuse_qkv: fuse the self-attention Q/K/V linears (needs merge_lora).
    attention: None keeps diffusers' default (torch SDPA); else a key of ATTENTION_BACKENDS.
    compile: torch.compile the repeated transformer blocks.
    batch_cfg: run both CFG branches as one batch of 2 (None: only when offloading; see the notes).
    low_vram: group offloading with CUDA streams (DiT and T5 stream from CPU memory).
    cpu_offload: whole-model CPU offload (each model moves to the GPU only while it runs).
    fp8: store DiT linear weights as float8_e4m3fn, compute in bf16.
    dtype: compute dtype of the DiT, T5 and CLIP.
    """

    merge_lora: bool = True
    fuse_qkv: bool = False
    attention: str | None = None
    compile: bool = False
    batch_cfg: bool | None = None
    low_vram: bool = False
    cpu_offload: bool = False
    fp8: bool = False
    dtype: torch.dtype = torch.bfloat16
    compile_kwargs: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.fuse_qkv and not self.merge_lora:
            self.fuse_qkv = False  # peft layers sit on the separate q/k/v linears
        if self.low_vram and self.cpu_offload:
            raise InputError("choose one of --low-vram (group offload) and CPU offload, not both")
        if self.attention is not None and self.attention not in ATTENTION_BACKENDS \
                and self.attention not in ATTENTION_BACKENDS.values():
            raise InputError(f"unknown attention backend {self.attention!r}; "
                             f"choose one of {', '.join(ATTENTION_BACKENDS)}")


# ---------------------------------------------------------------------------------------------
# Individual levers


@torch.no_grad()
def fuse_self_attention_qkv(transformer: nn.Module) -> int:
    """Fuse ``attn1``'s to_q/to_k/to_v into one ``to_qkv`` linear and drop the three originals.

    Only self-attention is fused: diffusers' fused flag on the cross-attention would also require
    fusing the image k/v, whose presence the processor tests through ``add_k_proj``. Dropping the
    originals avoids holding the 40 x 3 x 5120^2 weights twice. Returns the number fused.
    """
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) for m in transformer.modules()):
        raise ValueError("merge the LoRA before fusing projections (peft layers sit on to_q/to_k/to_v)")
    fused = 0
    for block in getattr(transformer, "blocks", []):
        attn = block.attn1
        if getattr(attn, "fused_projections", False):
            continue
        attn.fuse_projections()
        for name in ("to_q", "to_k", "to_v"):
            delattr(attn, name)
        fused += 1
    return fused


def set_attention_backend(transformer: nn.Module, name: str) -> str:
    """Select the attention kernel (process-global in diffusers; see the module notes)."""
    backend = ATTENTION_BACKENDS.get(name, name)
    try:
        transformer.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise InputError(f"attention backend {name!r} is not usable here ({exc}); use --attention native") from None
    logger.info("attention backend: %s (process-global)", backend)
    return backend


def enable_fp8_storage(transformer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """float8_e4m3fn weight storage with per-layer upcast to ``compute_dtype`` (diffusers layerwise casting)."""
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def enable_low_vram(pipe, device: torch.device) -> None:
    """Group offloading with streams for the DiT (one block per group), :class:`PinnedSwap` for the T5.

    Weights live in pinned CPU memory and the next group is prefetched on a side stream while the
    current one runs, so the copy hides under the compute of a 512x512x49 step. The copies must be
    non-blocking: a blocking copy stalls the host thread, and with it the kernel launches it overlaps.
    """
    pipe.transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1,
                                          use_stream=True, record_stream=True, non_blocking=True)
    if pipe.text_encoder is not None:
        # Not diffusers' block-level offload: the T5 layers sit below a T5Stack, so it would make the
        # whole encoder one unstreamed group copied from pageable memory (~12 s per prompt measured).
        PinnedSwap(pipe.text_encoder, device)
    for name in ("image_encoder", "vae", "camera_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device)


class PinnedSwap:
    """Keep a module's weights in pinned CPU memory; copy them to ``device`` only around its forward.

    For a model that runs once or twice per generation (the 11 GB T5): one bulk non-blocking copy
    from pinned memory (~50 GB/s) before the forward, and after it the parameters simply point at
    the CPU copies again (weights are read-only, so nothing is copied back). Tied weights are
    handled once. ``module._ex4d_execution_device`` tells the pipeline where its inputs go.
    """

    def __init__(self, module: nn.Module, device: torch.device | str):
        self.module, self.device = module, torch.device(device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                host = tensor.data.to("cpu")
                host = host.pin_memory() if pin else host
                tensor.data = host
                self.tensors.append((tensor, host))
        module._ex4d_execution_device = self.device
        self._handles = [module.register_forward_pre_hook(self._onload),
                         module.register_forward_hook(self._offload)]

    def _onload(self, module, args):
        for tensor, host in self.tensors:
            tensor.data = host.to(self.device, non_blocking=True)

    def _offload(self, module, args, output):
        for tensor, host in self.tensors:
            tensor.data = host
        return output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.module.__dict__.pop("_ex4d_execution_device", None)


def apply_performance(pipe, options: PerformanceOptions, device: torch.device | str) -> None:
    """Apply ``options`` to a pipeline whose adapter is already installed (merged or not).

    Order matters: fusion before fp8 (the casting hooks attach to the linears that exist), both
    before offloading/placement, and compile last. Sets ``pipe.batch_cfg``.
    """
    options.validate()
    device = torch.device(device)
    transformer = pipe.transformer
    if options.fuse_qkv:
        logger.info("fused QKV in %d self-attention layers", fuse_self_attention_qkv(transformer))
    if options.fp8:
        enable_fp8_storage(transformer, options.dtype)
    if options.low_vram:
        if device.type != "cuda":
            raise InputError("--low-vram streams weights to a CUDA GPU; it needs --device cuda")
        enable_low_vram(pipe, device)
    elif options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if options.attention is not None:
        set_attention_backend(transformer, options.attention)
    if options.compile:
        # Offload and casting hooks run inside the blocks; let dynamo break the graph around them.
        fullgraph = not (options.low_vram or options.fp8 or options.cpu_offload)
        kwargs = {"fullgraph": fullgraph, **options.compile_kwargs}
        transformer.compile_repeated_blocks(**kwargs)
    pipe.batch_cfg = (options.low_vram or options.cpu_offload) if options.batch_cfg is None else options.batch_cfg
