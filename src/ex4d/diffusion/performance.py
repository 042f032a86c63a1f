"""Speed and memory options for :class:`ex4d.diffusion.pipeline.EX4DPipeline`, applied in the one safe order.

Every option is a diffusers/torch facility; nothing here changes what the model computes beyond
the documented rounding of merged LoRA, fused projections and fp8 compute:

1. LoRA merged into the base weights (:func:`ex4d.diffusion.adapter.apply_adapter`, ``merge=True``):
   the unmerged peft layers cost ~18 % per step (reference: 2.64 s vs 2.23 s per CFG step).
2. Fused self-attention QKV: one 5120 -> 15360 GEMM instead of three (needs the merged LoRA). Off
   by default: measured 1.4 % slower per step compiled on an H100 (the chunked q/k/v views are
   strided for the norms and RoPE that follow).
3. fp8 compute (:mod:`ex4d.diffusion.fp8`): the blocks' linear layers become row-wise scaled
   float8_e4m3fn GEMMs (``torch._scaled_mm``); halves the DiT's weight memory; attention, norms,
   patch and condition embeddings and the head stay in their dtype. After the LoRA merge.
4. Placement: everything on the GPU; or the low-VRAM mode (:func:`enable_low_vram`): as many DiT
   blocks as the VRAM budget allows stay on the GPU and the rest stream from pinned CPU memory,
   one block at a time with the next prefetched on a side stream (:class:`BlockStreamer`); the
   T5 streams the same way and CLIP is copied in only around its forward; or whole-model CPU
   offload.
5. Attention backend (diffusers' dispatcher). NOTE: ``set_attention_backend`` is process-global
   in diffusers (it sets the registry's active backend), and ``reset_attention_backend`` does not
   undo that; so it is applied only when asked. ``fp8`` is ex4d's own: the blocks' self-attention
   processors are replaced (:mod:`ex4d.diffusion.attention_fp8`, cuDNN's fp8 flash attention; with
   fp8 linears 1.092 s per compiled CFG step on an H100).
6. ``torch.compile`` of the 40 repeated blocks (``compile_repeated_blocks``; ~15 s on the first
   call, then ~1.25x faster). fullgraph when no offload/casting hooks sit inside the blocks.
Measured on one H100 80GB (random full-size weights, 512x512x49, 25 steps; bench/bench_generate.py):
compiled bf16 1.52 s per CFG step, 40.7 s per generation excluding loading, 47.7 GiB peak (T5, CLIP
and VAE resident too); eager 2.07 s; fp8 compute + compile 1.245 s at 32.6 GiB (bench/bench_fp8.py,
bench_generate.py); low-VRAM
with a 24 GiB budget + compile 1.59 s per step, 42.8 s per generation, 22.7 GiB peak (21 of 40
blocks resident). Profiled compiled step (bench/profile_dit.py): GEMMs 0.85 s at ~775 TFLOP/s,
cuDNN attention 0.52 s (~560 TFLOP/s), everything else 0.14 s.

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
    "fa4": "_native_flash",        # FA4 kernels (flash-attn-4 package) behind torch's flash SDPA backend
    "sage": "sage",                # needs sageattention
    "xformers": "xformers",
    "flex": "flex",
    "fp8": "fp8",                  # ex4d's own: cuDNN fp8 flash attention in the self-attention (attention_fp8.py)
}


@dataclass
class PerformanceOptions:
    """How to run the generator. Defaults are the fast full-GPU setup (bf16, merged LoRA).

    merge_lora: fold the LoRA into the base weights (default) rather than keeping peft layers.
    fuse_qkv: fuse the self-attention Q/K/V linears (needs merge_lora).
    attention: None keeps diffusers' default (torch SDPA); else a key of ATTENTION_BACKENDS.
    compile: torch.compile the repeated transformer blocks.
    batch_cfg: run both CFG branches as one batch of 2 (None: only when offloading; see the notes).
    low_vram: stream the DiT blocks that do not fit and the T5 from pinned CPU memory (CUDA streams).
    cpu_offload: whole-model CPU offload (each model moves to the GPU only while it runs).
    fp8: fp8 compute for the DiT blocks' linear layers (row-wise scaled float8_e4m3fn GEMMs,
        :mod:`ex4d.diffusion.fp8`); attention, norms, embeddings and the head stay in ``dtype``.
        Needs a CUDA GPU of compute capability >= 8.9.
    fp8_emulate: run the fp8 maths without fp8 kernels, allowed on the CPU only (tests, tiny models);
        with ``attention="fp8"`` the fp8 attention is emulated too.
    dtype: compute dtype of the DiT, T5 and CLIP.
    vram_budget_gib: low-VRAM mode's GPU budget (None: the device's memory less 1.5 GiB); it
        decides how many DiT blocks stay resident instead of streaming.
    low_vram_tokens: video tokens per CFG branch the budget is planned for (512x512x49: 13312).
    resident_blocks: force the number of resident DiT blocks in the low-VRAM mode (None: planned).
    vae_channels_last: on a CUDA device, keep the VAE's 3D convolution weights in ``channels_last_3d``
        (cuDNN then runs the channels-last kernels: 12% faster encodes and decodes at 512x512x49 on
        an H100, bench/bench_vae.py). The results differ from the contiguous layout's by cuDNN's
        choice of kernel: at most one bf16 step in the latents, a few 8-bit levels in the frames.
    compile_vae_norms: with ``compile`` on a CUDA device, also torch.compile the VAE's RMS norms
        (:func:`compile_vae_norms`; not with ``low_vram`` or ``cpu_offload``, whose memory budget
        they would enlarge a little).
    """

    merge_lora: bool = True
    fuse_qkv: bool = False
    attention: str | None = None
    compile: bool = False
    batch_cfg: bool | None = None
    low_vram: bool = False
    cpu_offload: bool = False
    fp8: bool = False
    fp8_emulate: bool = False
    dtype: torch.dtype = torch.bfloat16
    vram_budget_gib: float | None = None
    low_vram_tokens: int = 13312
    resident_blocks: int | None = None
    vae_channels_last: bool = True
    compile_vae_norms: bool = True
    compile_kwargs: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.fuse_qkv and not self.merge_lora:
            self.fuse_qkv = False  # peft layers sit on the separate q/k/v linears
        if not self.fp8_emulate:
            check_gpu_features(fp8=self.fp8, attention=self.attention)  # before 40 GB of weights load, not after
        if self.low_vram and self.cpu_offload:
            raise InputError("choose one of --low-vram (block streaming) and --cpu-offload, not both")
        if self.attention is not None and self.attention not in ATTENTION_BACKENDS \
                and self.attention not in ATTENTION_BACKENDS.values():
            raise InputError(f"unknown attention backend {self.attention!r}; "
                             f"choose one of {', '.join(ATTENTION_BACKENDS)}")


def check_gpu_features(*, fp8: bool, attention: str | None) -> None:
    """One-line InputError unless some visible GPU can run ``--fp8`` and ``--attention fp8`` (as asked).

    Cheap (no weights, no kernel built): the commands call it at their start, so that ``ex4d run``
    does not refuse only after its depth and recon; :func:`apply_performance` checks the device
    actually used again.
    """
    if fp8:
        from ex4d.diffusion.fp8 import check_fp8_available

        check_fp8_available()
    if attention == "fp8":
        from ex4d.diffusion.attention_fp8 import check_fp8_attention_available

        check_fp8_attention_available()


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


def activate_fa4() -> None:
    """Route torch's flash SDPA backend to the FA4 kernels of the ``flash-attn-4`` package (process-global)."""
    try:
        import flash_attn.cute.interface  # noqa: F401  (torch imports it too; this gives the clear error)
        from torch.nn.attention import activate_flash_attention_impl
    except ImportError as exc:
        raise ImportError(f"FA4 needs the flash-attn-4 package and torch >= 2.11 ({exc}); "
                          "pip install flash-attn-4") from None
    activate_flash_attention_impl("FA4")


def set_attention_backend(transformer: nn.Module, name: str, *, emulate: bool = False) -> str:
    """Select the attention kernel (process-global in diffusers; see the module notes).

    ``fp8`` is per model instead: the blocks' self-attention processors (``emulate``: its CPU maths).
    """
    backend = ATTENTION_BACKENDS.get(name, name)
    if name == "fp8":
        from ex4d.diffusion.attention_fp8 import use_fp8_self_attention

        use_fp8_self_attention(transformer, emulate=emulate)
        return backend
    try:
        if name == "fa4":
            activate_fa4()
        transformer.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise InputError(f"attention backend {name!r} is not usable here ({exc}); use --attention native") from None
    logger.info("attention backend: %s (process-global)", backend)
    return backend


#: Estimated GPU bytes the low-VRAM mode needs besides the resident DiT blocks: per video token of
#: one CFG branch (the batch-2 block activations, and the VAE decode at the end) and a fixed part
#: (CUDA workspaces, margins). Estimates, checked on an H100: with a 24 GiB budget at 512x512x49
#: they plan 21 resident blocks and the measured peak is 22.7 GiB (bench/bench_generate.py).
LOW_VRAM_BYTES_PER_TOKEN = 250_000
LOW_VRAM_FIXED_BYTES = int(2.5 * 2**30)


def channels_last_convolutions(module: nn.Module) -> int:
    """Put every Conv3d weight of ``module`` in ``channels_last_3d`` (in place); returns how many.

    A convolution whose weight is channels-last runs cuDNN's channels-last kernels and returns
    channels-last activations, so the layout carries from layer to layer. ``.to(device)`` keeps it.
    """
    count = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
            count += 1
    return count


#: Dynamo compiles one graph per channel count and memory layout of the VAE's norms (more than 8 even
#: for the tiny test VAE); with its default limit of 8 per function the rest would silently stay eager.
VAE_NORM_RECOMPILE_LIMIT = 64


def compile_vae_norms(vae: nn.Module) -> int:
    """torch.compile every RMS norm of a Wan VAE (in place); returns how many.

    Eager, one norm is about seven passes over the activation (cast to float32, the norm, the division,
    the cast back, two scalings, the bias); compiled, it is one read for the reduction and one
    read-write. On an H100 at 512x512x49 (bf16, channels-last), end to end: the three encodes 1.17 s
    and the decode 0.56 s, against 1.47 s and 0.76 s eager on another H100 machine (bench/bench_e2e.py,
    docs/benchmarks.md).
    Dynamic shapes: one graph serves every chunk length and resolution of a channel count. The outputs
    are not bit-identical (the fused kernel keeps float32 between the steps): with static-shape graphs
    (bench/bench_vae.py) at most 0.025 in the latents and 0.047 in the decoded [-1, 1] frames at full
    size.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, VAE_NORM_RECOMPILE_LIMIT)
    count = 0
    for module in vae.modules():
        if isinstance(module, WanRMS_norm):
            module.compile(dynamic=True)
            count += 1
    return count


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (``parameters()`` lists a tied weight once)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def move_to_host(module: nn.Module, pin: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Point a module's parameters and buffers at CPU copies (pinned if ``pin``).

    Returns (tensor, host copy) pairs; ``module.parameters()`` already lists a tied weight once.
    """
    pairs = []
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            host = tensor.data.to("cpu")
            host = host.pin_memory() if pin else host
            tensor.data = host
            pairs.append((tensor, host))
    return pairs


def point_at_host(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Let each tensor use its host copy again (weights are read-only: nothing is copied back)."""
    for tensor, host in pairs:
        tensor.data = host


def plan_resident_blocks(blocks: nn.ModuleList, *, budget_bytes: int, other_bytes: int) -> int:
    """How many leading blocks fit on the GPU beside ``other_bytes``, with two streamed blocks in flight."""
    sizes = [module_bytes(b) for b in blocks]
    if not sizes:
        return 0
    per_block = max(sizes)
    free = budget_bytes - other_bytes - 2 * per_block
    return int(max(0, min(len(blocks), free // per_block)))


def low_vram_budget_bytes(device: torch.device, vram_budget_gib: float | None) -> int:
    """The low-VRAM mode's GPU budget: the given GiB, else the device's total memory less 1.5 GiB."""
    if vram_budget_gib is not None:
        if not vram_budget_gib > 0:
            raise InputError(f"--vram-budget must be positive (GiB), got {vram_budget_gib}")
        return int(vram_budget_gib * 2**30)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 24 * 2**30
    return int(total - 1.5 * 2**30)  # the CUDA context and allocator slack are not in the allocator's count


def enable_low_vram(pipe, device: torch.device, *, vram_budget_gib: float | None = None,
                    num_tokens: int = 13312, resident_blocks: int | None = None) -> int:
    """Stream weights from pinned CPU memory so that a 14B generation fits in ``vram_budget_gib``.

    * DiT: as many leading blocks as the budget allows stay on the GPU; the rest stream one block
      at a time (:class:`BlockStreamer`, next block prefetched on a side stream under the current
      block's compute). The patch/condition embeddings and the output head stay on the GPU.
    * T5 (11 GB, run once per prompt): its 24 blocks stream the same way, the 2 GB token embedding
      is copied in only around its lookup (:class:`PinnedSwap`).
    * CLIP image encoder (1.2 GB, run once): :class:`PinnedSwap`. VAE and camera encoder: on the GPU.

    num_tokens: video tokens per CFG branch (13312 at 512x512x49), for the activation estimate.
    resident_blocks: override the planned number of resident DiT blocks. Returns the number used.
    """
    transformer = pipe.transformer
    blocks = transformer.blocks
    for name, child in transformer.named_children():
        if name != "blocks":
            child.to(device)
    for tensor in list(transformer.parameters(recurse=False)) + list(transformer.buffers(recurse=False)):
        tensor.data = tensor.data.to(device)
    for name in ("vae", "camera_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device)
    if resident_blocks is None:
        other = module_bytes(transformer) - sum(module_bytes(b) for b in blocks)
        other += sum(module_bytes(getattr(pipe, n)) for n in ("vae", "camera_encoder") if getattr(pipe, n, None) is not None)
        other += LOW_VRAM_FIXED_BYTES + LOW_VRAM_BYTES_PER_TOKEN * num_tokens
        resident_blocks = plan_resident_blocks(blocks, budget_bytes=low_vram_budget_bytes(device, vram_budget_gib),
                                               other_bytes=other)
    transformer._ex4d_streamer = BlockStreamer(blocks, device, resident=resident_blocks)
    logger.info("low-VRAM: %d of %d DiT blocks resident, the rest streamed", resident_blocks, len(blocks))
    text_encoder = pipe.text_encoder
    if text_encoder is not None:
        stack = getattr(text_encoder, "encoder", None)
        if isinstance(getattr(stack, "block", None), nn.ModuleList) and hasattr(stack, "embed_tokens"):
            text_encoder._ex4d_streamer = BlockStreamer(stack.block, device, resident=0)
            text_encoder._ex4d_embed_swap = PinnedSwap(stack.embed_tokens, device)
            for name, child in stack.named_children():
                if name not in ("block", "embed_tokens"):
                    child.to(device)
            text_encoder._ex4d_execution_device = torch.device(device)
        else:
            PinnedSwap(text_encoder, device)
    if pipe.image_encoder is not None:
        PinnedSwap(pipe.image_encoder, device)
    return resident_blocks


class BlockStreamer:
    """Run a ModuleList of blocks with the first ``resident`` on ``device`` and the rest streamed.

    A streamed block's weights live in pinned CPU memory. Entering block i waits for its copy (made
    on a side stream) and starts the copy of the next streamed block, so the transfer hides under
    block i's compute; leaving it points the parameters back at the CPU copies (weights are
    read-only: nothing is copied back). After the last block the first streamed block is
    prefetched for the next forward. Blocks must run in order, as they do in the DiT and the T5.
    The hooks are plain module hooks outside the blocks' ``forward``, so ``forward`` can be
    compiled with ``fullgraph=True`` (see :func:`apply_performance`).
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, resident: int = 0):
        self.device = torch.device(device)
        blocks = list(blocks)
        self.resident = max(0, min(int(resident), len(blocks)))
        for block in blocks[:self.resident]:
            block.to(self.device)
        self.streamed = blocks[self.resident:]
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda and self.streamed else None
        self.host = [move_to_host(block, pin=self.cuda) for block in self.streamed]
        self.pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._handles = []
        for i, block in enumerate(self.streamed):
            self._handles.append(block.register_forward_pre_hook(self._make_enter(i)))
            self._handles.append(block.register_forward_hook(self._make_exit(i)))

    def _make_enter(self, i: int):
        def enter(module, args):
            self._enter(i)
        return enter

    def _make_exit(self, i: int):
        def leave(module, args, output):
            self._exit(i)
            return output
        return leave

    def _copy(self, i: int):
        """Start copying streamed block i to the device; returns (device tensors, ready event)."""
        if not self.cuda:
            # A real copy even to the CPU (tests): the block must never compute on the host copies.
            return [host.to(self.device, copy=True) for _, host in self.host[i]], None
        with torch.cuda.stream(self.copy_stream):
            tensors = [host.to(self.device, non_blocking=True) for _, host in self.host[i]]
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return tensors, event

    def _enter(self, i: int) -> None:
        tensors, event = self.pending.pop(i, None) or self._copy(i)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
        for (param, _), tensor in zip(self.host[i], tensors):
            if self.cuda:
                tensor.record_stream(compute)  # allocated on the copy stream, used on this one
            param.data = tensor
        following = (i + 1) % len(self.streamed)
        if following not in self.pending:
            self.pending[following] = self._copy(following)

    def _exit(self, i: int) -> None:
        point_at_host(self.host[i])

    def release(self) -> None:
        """Drop prefetched copies (frees their GPU memory)."""
        self.pending.clear()

    def remove(self) -> None:
        """Detach the hooks; the streamed blocks stay in CPU memory."""
        self.release()
        for handle in self._handles:
            handle.remove()


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
        self.tensors = move_to_host(module, pin)
        module._ex4d_execution_device = self.device
        self._handles = [module.register_forward_pre_hook(self._onload),
                         module.register_forward_hook(self._offload)]

    def _onload(self, module, args):
        for tensor, host in self.tensors:
            tensor.data = host.to(self.device, non_blocking=True)

    def _offload(self, module, args, output):
        point_at_host(self.tensors)
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
        # After the LoRA merge (build_pipeline merges first) and fusion; before placement, so the
        # streamer and .to() move the fp8 weights. The scales are computed on ``device``; each
        # fp8 weight lands where its bf16 weight was (CPU when streaming), so the GPU never holds
        # the whole model during conversion.
        from ex4d.diffusion.fp8 import check_fp8_device, convert_to_fp8

        if device.type != "cpu" or not options.fp8_emulate:
            check_fp8_device(device)
        convert_to_fp8(transformer, compute_device=device, emulate=True if options.fp8_emulate else None)
    if options.low_vram:
        if device.type != "cuda":
            raise InputError("--low-vram streams weights to a CUDA GPU; it needs --device cuda")
        enable_low_vram(pipe, device, vram_budget_gib=options.vram_budget_gib, num_tokens=options.low_vram_tokens,
                        resident_blocks=options.resident_blocks)
    elif options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if options.vae_channels_last and device.type == "cuda" and getattr(pipe, "vae", None) is not None:
        channels_last_convolutions(pipe.vae)
    if options.attention == "fp8" and not options.fp8_emulate:
        from ex4d.diffusion.attention_fp8 import check_fp8_attention_device

        check_fp8_attention_device(device)
    if options.attention is not None:
        set_attention_backend(transformer, options.attention, emulate=options.fp8_emulate)
    if (options.compile and options.compile_vae_norms and device.type == "cuda" and not options.low_vram
            and not options.cpu_offload and getattr(pipe, "vae", None) is not None):
        logger.info("compiled %d VAE norms", compile_vae_norms(pipe.vae))
    if options.compile:
        if options.low_vram:
            # The streaming hooks sit on the blocks, outside their forward: compile the forward
            # alone so the hooks stay eager. One code object for all 40 blocks -> one graph.
            kwargs = {"fullgraph": True, **options.compile_kwargs}
            for block in transformer.blocks:
                block.forward = torch.compile(block.forward, **kwargs)
        else:
            # Offload hooks run inside the blocks; let dynamo break the graph around them. The fp8
            # linears are plain torch (no hooks): fullgraph holds.
            kwargs = {"fullgraph": not options.cpu_offload, **options.compile_kwargs}
            transformer.compile_repeated_blocks(**kwargs)
    pipe.batch_cfg = (options.low_vram or options.cpu_offload) if options.batch_cfg is None else options.batch_cfg
