"""Speed and memory of one EX-4D adapter training step on the full-size Wan2.1-I2V-14B DiT.

Prints ONE JSON object (on the main process; appended to --out if given): git commit, device,
world size, versions, shapes, the median seconds of one optimizer step over >= 3 steps after one
warm-up step, the peak GPU memory of every process (``torch.cuda.max_memory_allocated``, weights
included) and the trainable parameter count (asserted: 99,786,752 for rank 16 at full size).

What runs is the project's own training code, unchanged: ``ex4d.train.trainer.train`` (the loop:
accelerate, AdamW, LR schedule, gradient clipping, ``log.csv``) over an
``ex4d.train.wan_system.EX4DTrainSystem`` (LoRA rank 16 on the 10 reference linears per block via
``ex4d.diffusion.adapter.inject_lora``, CamVidEncoder, seeded mask erosion and scaling,
``EX4DPipeline.prepare_condition`` / ``encode_image``, the flow-matching objective, bf16 autocast,
gradient checkpointing). The step time is the trainer's own per-step ``seconds`` column.

Weights: ``WanTransformer3DModel`` with the I2V-14B config built on the meta device, ``to_empty``
on the device, N(0, 0.02) (norm weights 1, biases 0), bf16 with diffusers' ``_keep_in_fp32_modules``
in fp32; trainables fp32. The frozen encoders are replaced by stand-ins that return random
encodings of the real shapes: the VAE (``encode`` -> latent (B, 16, T', H/8, W/8); the pipeline's
own normalisation still runs), CLIP (penultimate hidden state (1, 257, 1280)) and umT5 (a fixed
(1, 512, 4096) embedding passed as ``text_embeds``, which is how training uses the prompt anyway:
encoded once, then umT5 is dropped). So one measured step is: data to device, erosion + scaling,
CamVidEncoder, DiT forward/backward with checkpointing, clipping and AdamW -- without the 3 VAE
encodes (y latent, cond, mask) and the CLIP encode of a real step.

Input: 512 x 512 x 49 frames -> latent 16 x 13 x 64 x 64 -> 13 x 32 x 32 = 13312 DiT tokens,
batch 1 per process, the mask's right half hidden after frame 0.

  source bench/gpu_env.sh; python bench/bench_train.py --devices 1
  source bench/gpu_env.sh; accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
      --mixed_precision no --dynamo_backend no bench/bench_train.py --fsdp --devices 2
  python bench/bench_train.py --tiny                # tiny CPU check of the script itself (< 1 min)
  torchrun --nproc_per_node 2 bench/bench_train.py --tiny --devices 2   # the same with 2 CPU processes (DDP, gloo)

--fsdp shards the frozen base with FSDP2 (accelerate's FullyShardedDataParallelPlugin, version 2,
one unit per ``WanTransformerBlock`` plus the root); FSDP2 keeps per-parameter dtypes, so the fp32
LoRA inside the bf16 blocks needs no flattening to one dtype (FSDP1 would refuse it).
``--fsdp-bf16-gather`` adds MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) for torch
builds that cannot all-gather mixed dtypes. accelerate shards only multi-GPU runs, so --fsdp needs GPUs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: LoRA (76,677,120) + CamVidEncoder (23,109,632) of the released adapter's architecture.
FULL_TRAINABLE = 99_786_752
CLIP_TOKENS, CLIP_DIM = 257, 1280   # penultimate hidden state of the ViT-H/14 at 224 x 224
TEXT_TOKENS = 512                   # umT5 sequence length of the pipeline


def git_commit() -> str:
    # the GPU machine's copy of the tree may carry a stale .git: pass the commit in (bench_generate's name too)
    for name in ("EX4D_COMMIT", "EX4D_GIT_COMMIT"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Models


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """WanTransformer3DModel on ``device``: meta-built, ``to_empty``, N(0, 0.02) / norms 1 / biases 0.

    ``_keep_in_fp32_modules`` parameters are fp32 (as ``from_pretrained(torch_dtype=bf16)`` keeps
    them), the rest ``dtype``. Buffers (the RoPE tables) are built for real and kept as built.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(config)
    keep = tuple(WanTransformer3DModel._keep_in_fp32_modules)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    for name, module in model.named_modules():
        fp32 = any(part in keep for part in name.split("."))
        for pname, p in list(module.named_parameters(recurse=False)):
            module._parameters[pname] = torch.nn.Parameter(
                p.detach().to(torch.float32 if fp32 else dtype), requires_grad=False)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)  # same weights on every process
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
        for name, b in buffers.items():
            owner, _, leaf = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = b.to(device)
    return model.eval()


class RandomVAE(torch.nn.Module):
    """Stands in for AutoencoderKLWan: ``encode(video (B, 3, T, H, W))`` -> random latent of the real shape.

    Exposes what ``EX4DPipeline`` reads (config scale factors and latent mean/std, ``dtype``); its
    single buffer tells the pipeline the device. The pipeline's own normalisation still runs.
    """

    def __init__(self, device: torch.device, z_dim: int = 16, seed: int = 1) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1, device=device), persistent=False)
        self.config = SimpleNamespace(scale_factor_temporal=4, scale_factor_spatial=8, z_dim=z_dim,
                                      latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    def encode(self, video: torch.Tensor):
        b, _, t, h, w = video.shape
        shape = (b, self.config.z_dim, (t - 1) // 4 + 1, h // 8, w // 8)
        latent = torch.randn(shape, generator=self.generator, device=video.device, dtype=torch.float32)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latent.to(video.dtype)))


class RandomCLIP(torch.nn.Module):
    """Stands in for CLIPVisionModel: ``hidden_states[-2]`` is a random (B, 257, dim) tensor."""

    def __init__(self, device: torch.device, dim: int = CLIP_DIM, seed: int = 2) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1, device=device), persistent=False)
        self.dim = dim
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True):
        out = torch.randn(len(pixel_values), CLIP_TOKENS, self.dim, generator=self.generator,
                          device=pixel_values.device).to(pixel_values.dtype)
        return SimpleNamespace(hidden_states=(out, out))


class RandomPairs(torch.utils.data.Dataset):
    """``PairDataset``-style items: video (T, H, W, 3) float32 [0, 1], mask (T, H, W) bool, index.

    One fixed random clip (content does not change speed); the right half is hidden after frame 0.
    """

    def __init__(self, num_frames: int, height: int, width: int, count: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.video = torch.rand(num_frames, height, width, 3, generator=g)
        self.mask = torch.ones(num_frames, height, width, dtype=torch.bool)
        self.mask[1:, :, width // 2:] = False
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video, "mask": self.mask, "index": torch.tensor(i, dtype=torch.int64)}


def expected_trainable(config: dict, rank: int, hidden: int) -> int:
    """LoRA on attn1/attn2 q,k,v,o and ffn.0/ffn.2 of every block + the CamVidEncoder, counted by hand."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, z = config["ffn_dim"], config["out_channels"]
    per_block = 8 * rank * (dim + dim) + 2 * rank * (dim + ffn)
    kt, kh, kw = config["patch_size"]
    encoder = (2 * z * hidden + hidden) + 2 * (hidden * hidden + hidden) + (hidden * dim * kt * kh * kw + dim)
    return config["num_layers"] * per_block + encoder


# ---------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=None,
                   help="number of processes expected (checked; default: whatever was launched)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 over the frozen base (run under accelerate launch)")
    p.add_argument("--tiny", action="store_true", help="tiny components on the CPU (checks the script)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step (>= 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--frames", type=int, default=None, help="frames (4k+1; default 49, --tiny 5)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="frame size, multiples of 16 (default 512 512, --tiny 32 32)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-erode", action="store_true", help="skip the per-step CPU mask erosion")
    p.add_argument("--fsdp-bf16-gather", action="store_true",
                   help="with --fsdp: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), i.e. all-gather "
                        "every parameter in bf16 (a fallback for torch builds whose FSDP2 cannot all-gather "
                        "the fp32 LoRA together with the bf16 base)")
    p.add_argument("--out", type=Path, help="also append the JSON line to this file")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (the median of at least 3 steps is reported)")
    if args.frames is None:
        args.frames = 5 if args.tiny else 49
    if args.size is None:
        args.size = (32, 32) if args.tiny else (512, 512)
    if (args.frames - 1) % 4 or args.size[0] % 16 or args.size[1] % 16:
        p.error("--frames must be 4k+1 and --size multiples of 16")
    return args


def make_accelerator(fsdp: bool, bf16_gather: bool = False):
    from accelerate import Accelerator

    # cpu=True makes accelerate join the process group that torchrun set up (gloo) when there is no
    # GPU; without it every CPU process would train alone.
    cpu = not torch.cuda.is_available()
    if not fsdp:
        return Accelerator(cpu=cpu)
    from accelerate.utils import FullyShardedDataParallelPlugin

    policy = None
    if bf16_gather:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["WanTransformerBlock"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False, mixed_precision_policy=policy)
    return Accelerator(cpu=cpu, fsdp_plugin=plugin)


def run(args: argparse.Namespace) -> dict | None:
    import accelerate
    import diffusers
    import peft

    from ex4d.diffusion.weights.keymaps import TRANSFORMER_CONFIG_I2V_14B
    from ex4d.train.trainer import TrainConfig, train
    from ex4d.train.wan_system import EX4DTrainSystem, ModelConfig

    if args.fsdp and not torch.cuda.is_available():
        raise SystemExit("--fsdp needs GPUs: accelerate shards with FSDP only in multi-GPU runs")
    if args.fsdp_bf16_gather and not args.fsdp:
        raise SystemExit("--fsdp-bf16-gather needs --fsdp")
    accelerator = make_accelerator(args.fsdp, args.fsdp_bf16_gather)
    world = accelerator.num_processes
    if args.fsdp and accelerator.distributed_type.value != "FSDP":
        raise SystemExit(f"--fsdp but accelerate runs {accelerator.distributed_type.value}; "
                         f"start it with accelerate launch --multi_gpu --num_processes N")
    if args.devices is not None and world != args.devices:
        raise SystemExit(f"--devices {args.devices} but {world} process(es) were started; start "
                         f"{args.devices} with accelerate launch --num_processes {args.devices} (or omit --devices)")
    device = accelerator.device
    cuda = device.type == "cuda"
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_wan import tiny_transformer_config

        dit_config, hidden, clip_dim, rank = tiny_transformer_config(), 16, 32, 4
        text_dim = dit_config["text_dim"]
    else:
        dit_config, hidden, clip_dim, rank = dict(TRANSFORMER_CONFIG_I2V_14B), 1024, CLIP_DIM, args.rank
        text_dim = dit_config["text_dim"]

    torch.manual_seed(0)
    built = time.perf_counter()
    transformer = build_transformer(dit_config, device, torch.bfloat16)
    components = {"transformer": transformer, "vae": RandomVAE(device), "image_encoder": RandomCLIP(device, clip_dim)}
    text = torch.randn(1, TEXT_TOKENS, text_dim, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    model_config = ModelConfig(lora_rank=rank, lora_alpha=float(rank), encoder_hidden=hidden,
                               gradient_checkpointing=not args.no_gradient_checkpointing,
                               # CPU autocast in --tiny, so the check runs the GPU's mixed-precision path
                               autocast="bf16" if args.tiny else "auto", erode=not args.no_erode)
    system = EX4DTrainSystem(components, model_config, text_embeds=text, base_dtype=torch.bfloat16)
    build_seconds = time.perf_counter() - built

    trainable = sum(p.numel() for p in system.parameters() if p.requires_grad)
    expected = expected_trainable(dit_config, rank, hidden)
    assert trainable == expected, f"trainable parameters {trainable:,} != {expected:,}"
    if not args.tiny and rank == 16:
        assert trainable == FULL_TRAINABLE, f"trainable parameters {trainable:,} != {FULL_TRAINABLE:,}"
    frozen = sum(p.numel() for p in system.transformer.parameters() if not p.requires_grad)
    fp32_trainable = all(p.dtype == torch.float32 for p in system.parameters() if p.requires_grad)
    assert fp32_trainable, "trainable parameters must be fp32"

    # Time the input preparation (erosion, scaling, stand-in encoders, CamVidEncoder) inside each step.
    prepare_seconds: list[float] = []
    original_prepare = system.prepare

    setup_peak: list[float] = []

    def timed_prepare(batch):
        if cuda:
            torch.cuda.synchronize(device)
            if len(prepare_seconds) == args.warmup:
                # The timed steps' own peak: under FSDP the unsharded model built before wrapping
                # would otherwise set it. What is allocated now (shards, optimizer state, the batch)
                # still counts.
                setup_peak.append(torch.cuda.max_memory_allocated(device) / 2**30)
                torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = original_prepare(batch)
        if cuda:
            torch.cuda.synchronize(device)
        prepare_seconds.append(time.perf_counter() - start)
        return out

    system.prepare = timed_prepare

    num_frames, (height, width) = args.frames, tuple(args.size)
    dataset = RandomPairs(num_frames, height, width, count=max(8, world))
    total = args.warmup + args.steps
    out_dir = Path(tempfile.mkdtemp(prefix="ex4d-bench-train-")) if accelerator.is_main_process else None
    out_dirs = [str(out_dir)] if out_dir else [None]
    if world > 1:
        torch.distributed.broadcast_object_list(out_dirs, src=0)
    config = TrainConfig(output_dir=out_dirs[0], max_steps=10 * total + 10, batch_size=1, grad_accum=1,
                         learning_rate=1e-4, checkpoint_every=0, tensorboard=False, max_grad_norm=1.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # max_steps beyond stop_after: no final checkpoint/export is written (only log.csv).
    result = train(system, dataset, config, resume="none", accelerator=accelerator, stop_after=total)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    first = max(setup_peak + [peak])
    peaks, firsts = [peak], [first]
    if world > 1:
        gathered = accelerator.gather(torch.tensor([[peak, first]], device=device)).cpu()
        peaks, firsts = [float(v) for v in gathered[:, 0]], [float(v) for v in gathered[:, 1]]
    # no CUDA allocator statistics on the CPU
    peaks = [round(p, 2) for p in peaks] if cuda else None
    firsts = [round(p, 2) for p in firsts] if cuda else None
    # Which parameters the run really sharded (FSDP2 turns them into DTensors).
    sharded = any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
                  for p in system.transformer.parameters())
    if not accelerator.is_main_process:
        return None

    with open(Path(config.output_dir) / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    shutil.rmtree(config.output_dir, ignore_errors=True)
    seconds = [float(r["seconds"]) for r in rows]
    timed = seconds[args.warmup:]
    timed_prepare_s = prepare_seconds[args.warmup:]
    median = statistics.median(timed)
    latent_t, latent_h, latent_w = (num_frames - 1) // 4 + 1, height // 8, width // 8
    kt, kh, kw = dit_config["patch_size"]
    tokens = (latent_t // kt) * (latent_h // kh) * (latent_w // kw)
    return {
        "bench": "train_step",
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "world_size": world,
        "mode": ("fsdp2-bf16-gather" if args.fsdp_bf16_gather else "fsdp2") if args.fsdp
                else ("single" if world == 1 else "ddp"),
        "distributed_type": accelerator.distributed_type.value, "parameters_sharded": sharded,
        "tiny": args.tiny,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "model": "tiny WanTransformer3DModel" if args.tiny else "Wan2.1-I2V-14B DiT (random N(0,0.02) weights)",
        "shapes": {"video": [1, num_frames, height, width, 3], "latent": [16, latent_t, latent_h, latent_w],
                   "dit_tokens": tokens, "dit_input_channels": dit_config["in_channels"],
                   "text": [1, TEXT_TOKENS, text_dim], "clip": [1, CLIP_TOKENS, clip_dim],
                   "batch_per_process": 1},
        "precision": "bf16 frozen base (_keep_in_fp32_modules fp32), fp32 trainables, bf16 autocast",
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "erode": not args.no_erode,
        "optimizer": "AdamW (trainer defaults), grad clip 1.0",
        "encoders": "VAE, CLIP, umT5 replaced by random encodings of the real shapes; the step measured is "
                    "data transfer + erosion/scaling + CamVidEncoder + DiT forward/backward + clip + AdamW "
                    "(a real step adds 3 VAE encodes and 1 CLIP encode)",
        "lora_rank": rank, "encoder_hidden": hidden,
        "trainable_parameters": trainable, "frozen_dit_parameters": frozen,
        "build_seconds": round(build_seconds, 2),
        "warmup_steps": args.warmup,
        "step_seconds": [round(s, 4) for s in timed],
        "step_seconds_median": round(median, 4),
        "warmup_step_seconds": [round(s, 4) for s in seconds[:args.warmup]],
        "prepare_seconds_median": round(statistics.median(timed_prepare_s), 4) if timed_prepare_s else None,
        "samples_per_s": round(world / median, 4),
        "peak_memory_gib_per_process": peaks,
        "peak_memory_gib_per_process_incl_setup": firsts,
        "peak_memory_note": "torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state and "
                            "batch included); _incl_setup also covers model build, wrapping and the warm-up step",
        "losses": [round(v, 5) for v in result.losses],
        "grad_norms": [float(r["grad_norm"]) for r in rows],
        "anchor": "none: the reference publishes no training code or training numbers",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    result = run(args)
    if result is None:
        return 0
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
