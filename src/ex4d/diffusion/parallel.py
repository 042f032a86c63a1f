"""Generation on several GPUs: context parallel (Ulysses), CFG parallel, or both.

Two independent ways to spread one generation over N processes (one per GPU), on existing engines:

* ``ulysses`` -- diffusers' context parallelism on ``WanTransformer3DModel`` (its ``_cp_plan``):
  the 13,312 video tokens are split over the ranks; inside every self-attention an all-to-all swaps
  the split from tokens to heads (40 heads: 2, 4, 5, 8 or 10 ranks divide them), each rank attends
  over all tokens for its heads, and a second all-to-all swaps back. Every rank holds the whole
  model. Works with and without CFG.
* ``cfg`` -- the two classifier-free-guidance branches (positive and negative prompt) run at the
  same time on two ranks; their velocities are all-gathered and combined identically on both, so
  both ranks keep bit-identical latents. One gather per step instead of two all-to-alls per layer.
* ``cfg-ulysses`` -- both: 2 CFG groups x N/2 Ulysses ranks (4 or 8 GPUs).

Launch with ``ex4d generate --nproc-per-node N``, ``torchrun --nproc-per-node N -m ex4d.commands.torchrun
<ex4d generate args>`` or ``torchrun ... -m ex4d.cli generate --parallel ulysses ...`` (the command-line
entry lives in :mod:`ex4d.commands.torchrun`: this module imports no command code).
Rank 0 writes the outputs. Same seed -> same video as one GPU, within bf16 tolerance: the initial
noise is drawn on the CPU generator on every rank, and collectives only move data.

NVLink multicast must stay off on shared machines (it can take a host's GPUs out of service), so
:func:`apply_safe_env` forces NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 before any process group exists.

Shapes: latents (B, C, F, H, W) as in diffusers; tokens L = F * H/2 * W/2.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ex4d.errors import InputError, UserError

log = logging.getLogger(__name__)

MODES = ("none", "ulysses", "cfg", "cfg-ulysses", "auto")
#: Attention heads of Wan2.1-I2V-14B (checked before its weights are read).
WAN_14B_HEADS = 40

#: Environment every launcher must carry: NVLink multicast (NVLS) off in NCCL, PyTorch and NVSHMEM.
SAFE_COLLECTIVE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply_safe_env(env: dict | None = None) -> None:
    """Force the multicast-off settings into ``env`` (default: this process's environment).

    Forced, not defaulted: a value inherited from a shell that turns multicast on must not win.
    """
    env = os.environ if env is None else env
    for key, value in SAFE_COLLECTIVE_ENV.items():
        if env.get(key) not in (None, value):
            log.warning("overriding %s=%s with %s (NVLink multicast stays off)", key, env.get(key), value)
        env[key] = value


def launched_distributed(env: dict | None = None) -> bool:
    """True when started by torchrun/accelerate with more than one process (RANK and WORLD_SIZE set)."""
    env = os.environ if env is None else env
    try:
        return "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def resolve_mode(mode: str, world_size: int, guidance_scale: float) -> str:
    """Pick the layout for ``mode`` on ``world_size`` processes; "auto" follows docs/scale.md.

    auto: 1 process -> none; with CFG (guidance > 1): 2 -> cfg, an even count > 2 -> cfg-ulysses;
    otherwise ulysses. Raises UserError for a layout the process count cannot make.
    """
    if mode not in MODES:
        raise InputError(f"unknown --parallel {mode!r}; use one of {', '.join(MODES)}")
    use_cfg = guidance_scale != 1.0
    if mode == "auto":
        if world_size == 1:
            return "none"
        if use_cfg and world_size == 2:
            return "cfg"
        if use_cfg and world_size % 2 == 0:
            return "cfg-ulysses"
        return "ulysses"
    if mode == "none" and world_size > 1:
        raise UserError(f"--parallel none with {world_size} processes would run the same job {world_size} times; "
                        f"start one process or choose ulysses/cfg")
    if mode in ("cfg", "cfg-ulysses") and not use_cfg:
        raise UserError(f"--parallel {mode} needs classifier-free guidance (guidance scale != 1); use ulysses")
    if mode == "cfg" and world_size != 2:
        raise UserError(f"--parallel cfg runs the two guidance branches on exactly 2 processes, not {world_size}; "
                        f"use cfg-ulysses for 4 or 8")
    if mode == "cfg-ulysses" and (world_size < 4 or world_size % 2):
        raise UserError(f"--parallel cfg-ulysses needs an even number of processes >= 4, not {world_size}")
    if mode == "ulysses" and world_size < 2:
        raise UserError("--parallel ulysses needs at least 2 processes; start with torchrun --nproc-per-node N")
    return mode


@dataclass
class ParallelContext:
    """Where this process sits in a multi-process generation.

    cfg_degree: 1 or 2 (2: this rank computes one guidance branch, ``cfg_rank`` 0 = positive,
    1 = negative). ulysses_degree: ranks sharing one forward pass. mesh: the device mesh
    (dims "cfg", "ring", "ulysses"), None for a single process.
    """

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cfg_degree: int = 1
    ulysses_degree: int = 1
    mesh: object | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs progress and writes files."""
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        return self.mesh.get_local_rank("cfg") if self.cfg_degree > 1 else 0

    @property
    def cfg_group(self):
        return self.mesh.get_group("cfg") if self.cfg_degree > 1 else None

    def cp_mesh(self):
        """The ("ring", "ulysses") sub-mesh for diffusers' ContextParallelConfig."""
        return self.mesh["ring", "ulysses"]


def init_parallel(mode: str = "auto", *, guidance_scale: float = 5.0, backend: str | None = None,
                  timeout_s: float = 1800.0) -> ParallelContext:
    """Join the process group started by torchrun and build the device mesh for ``mode``.

    backend: None -> nccl on CUDA, gloo on CPU. Each rank uses cuda:LOCAL_RANK. A single process
    (no torchrun) gets a context with mode "none" and no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    mode = resolve_mode(mode, world_size, guidance_scale)
    if mode == "none":
        return ParallelContext()
    apply_safe_env()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    cfg_degree = 2 if mode in ("cfg", "cfg-ulysses") else 1
    ulysses_degree = world_size // cfg_degree
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (cfg_degree, 1, ulysses_degree), mesh_dim_names=("cfg", "ring", "ulysses"))
    ctx = ParallelContext(mode=mode, rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                          cfg_degree=cfg_degree, ulysses_degree=ulysses_degree, mesh=mesh)
    log.info("rank %d/%d: %s (cfg x%d, ulysses x%d) on %s", rank, world_size, mode, cfg_degree, ulysses_degree,
             device)
    return ctx


def shutdown(ctx: ParallelContext | None) -> None:
    """Leave the process group (safe to call for a single-process context)."""
    if ctx is not None and ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Ulysses (diffusers context parallelism)
# --------------------------------------------------------------------------------------------

def check_ulysses(num_heads: int, num_tokens: int | None, degree: int) -> None:
    """Raise a clear error unless ``degree`` ranks divide the heads (and the tokens, if given)."""
    if degree <= 1:
        return
    if num_heads % degree:
        good = [d for d in range(2, num_heads + 1) if num_heads % d == 0 and d <= 16]
        raise UserError(f"Ulysses over {degree} ranks needs the {num_heads} attention heads to divide evenly; "
                        f"use {', '.join(map(str, good))} ranks")
    if num_tokens is not None and num_tokens % degree:
        raise UserError(f"the video has {num_tokens} tokens, which {degree} ranks cannot split evenly; change "
                        f"--size or the rank count (tokens = latent frames x H/16 x W/16)")


def num_video_tokens(num_frames: int, height: int, width: int, patch=(1, 2, 2), vae_scale=(4, 8, 8)) -> int:
    """Transformer tokens of a (num_frames, height, width) video: F_lat * H_lat/2 * W_lat/2."""
    f = (num_frames - 1) // vae_scale[0] + 1
    return (f // patch[0]) * (height // vae_scale[1] // patch[1]) * (width // vae_scale[2] // patch[2])


@contextlib.contextmanager
def _cpu_device_count_fix() -> Iterator[None]:
    """diffusers picks the rank's device as ``rank % torch.accelerator.device_count()``, which is a
    division by zero on a CPU-only (gloo) run. Report one "device" while it does so; on CUDA this
    changes nothing."""
    if torch._C._get_accelerator().type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


#: Why --attention fp8 and Ulysses exclude each other (refused before the weights load and here).
FP8_ATTENTION_WITH_ULYSSES = ("--attention fp8 cannot split the sequence over GPUs (Ulysses); use --parallel cfg "
                              "(two GPUs, one guidance branch each) or --attention native")


def enable_ulysses(transformer: torch.nn.Module, ctx: ParallelContext, *, num_tokens: int | None = None):
    """Turn on diffusers' Ulysses context parallelism over ``ctx``'s ulysses ranks (in place).

    Must be called once, after weights and adapters are loaded and before the first forward; the
    ray-latent hook on ``patch_embedding`` keeps working because tokens are split after it (at
    ``blocks.0``) and gathered at ``proj_out``. Returns the transformer.
    """
    if ctx.ulysses_degree <= 1:
        return transformer
    from diffusers import ContextParallelConfig

    from ex4d.diffusion.attention_fp8 import FP8SelfAttentionProcessor

    if any(isinstance(block.attn1.processor, FP8SelfAttentionProcessor) for block in transformer.blocks):
        # Its processor attends over the tokens it is given: split over ranks, that would be a different model.
        raise InputError(FP8_ATTENTION_WITH_ULYSSES)
    check_ulysses(transformer.config.num_attention_heads, num_tokens, ctx.ulysses_degree)
    config = ContextParallelConfig(ulysses_degree=ctx.ulysses_degree, mesh=ctx.cp_mesh())
    with _cpu_device_count_fix(), _quiet("diffusers.models.modeling_utils"):
        transformer.enable_parallelism(config=config)
    return transformer


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Silence one library logger below ``level`` (e.g. an 'experimental feature' warning on every rank)."""
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old_level)


# --------------------------------------------------------------------------------------------
# CFG parallel
# --------------------------------------------------------------------------------------------

def combine_guidance(v_pos: torch.Tensor, v_neg: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """v = v_neg + s * (v_pos - v_neg): the reference's (and diffusers') CFG formula, in this order."""
    return v_neg + guidance_scale * (v_pos - v_neg)


def guided_velocity(predict: Callable[[str], torch.Tensor], guidance_scale: float,
                    ctx: ParallelContext | None = None) -> torch.Tensor:
    """One guided velocity. ``predict("positive")`` / ``predict("negative")`` run one branch each.

    Single process or no CFG-parallel: both branches here, positive first. CFG-parallel: this rank
    runs only its branch (``ctx.cfg_rank`` 0 = positive, 1 = negative), the two results are
    all-gathered over the CFG group and combined in the same order on both ranks, so both get the
    same tensor as one process would. Returns the (B, C, F, H, W) velocity.
    """
    if guidance_scale == 1.0:
        return predict("positive")
    if ctx is None or ctx.cfg_degree == 1:
        v_pos = predict("positive")
        v_neg = predict("negative")
        return combine_guidance(v_pos, v_neg, guidance_scale)
    local = predict("positive" if ctx.cfg_rank == 0 else "negative").contiguous()
    gathered = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(gathered, local, group=ctx.cfg_group)
    return combine_guidance(gathered[0], gathered[1], guidance_scale)


def broadcast_object(obj, ctx: ParallelContext | None, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (e.g. a decision made once, like an output path)."""
    if ctx is None or ctx.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


# --------------------------------------------------------------------------------------------
# EX4DPipeline integration
# --------------------------------------------------------------------------------------------

def parallelize_pipeline(pipe, ctx: ParallelContext, *, num_tokens: int | None = None):
    """Make an :class:`ex4d.diffusion.pipeline.EX4DPipeline` run its DiT over ``ctx``'s ranks (in place).

    Ulysses: context parallelism on ``pipe.transformer`` (after the adapter, merge and QKV fusion;
    before compile, which then traces the parallel attention). CFG: this rank's velocity is its own
    guidance branch, gathered with the other's (replaces the pipeline's per-step ``_predict``; the
    batched-CFG flag is ignored since each rank runs a batch of 1). Non-main ranks hide their
    progress bar. Returns ``pipe``.
    """
    if ctx.world_size == 1:
        return pipe
    enable_ulysses(pipe.transformer, ctx, num_tokens=num_tokens)
    if ctx.cfg_degree > 1:
        original = pipe._predict

        def predict(latent_input, timestep, positive, negative, image_embeds, guidance_scale, batch_cfg):
            if negative is None:  # no guidance in this call: nothing to split
                return original(latent_input, timestep, positive, negative, image_embeds, guidance_scale, False)

            def branch(name: str) -> torch.Tensor:
                text = positive if name == "positive" else negative
                return pipe.transformer(hidden_states=latent_input, timestep=timestep, encoder_hidden_states=text,
                                        encoder_hidden_states_image=image_embeds, return_dict=False)[0].float()

            return guided_velocity(branch, guidance_scale, ctx)

        pipe._predict = predict
    if not ctx.is_main:
        pipe.set_progress_bar_config(disable=True)
    return pipe
