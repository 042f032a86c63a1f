"""Depth-stage benchmark: DepthCrafter end to end with random full-size fp16 weights, and Depth Anything V2.

Runs 49 frames at 512x512 and 576x1024 (EX-4D's size for 16:9 input) through
:class:`ex4d.depth.depthcrafter.DepthCrafterPipeline` (CLIP, VAE encode, 5 UNet steps, VAE decode,
normalisation) in several variants:

- ``plain``: reference numerics and no tricks (fp32 VAE encode, decode one 8-frame chunk per call,
  stock attention processors);
- ``fast``: the same numerics with the exact speed-ups (batched 8-frame decode chunks,
  single-token cross-attention, channels_last, cudnn autotune);
- ``fast_fp16enc``: ``fast`` plus fp16 VAE encode (changes numbers slightly);
- ``fast_compile``: ``fast_fp16enc`` plus torch.compile of the UNet and the VAE decoder.

Each variant: a warm-up, then the median of --repeats runs, per-stage medians, peak memory, and the
difference of its normalised disparity to ``plain`` (max and mean |delta d_hat|). Prints one JSON
object (the last line) with every result; anchors: reference 10.12 s / 18.6 GiB at 576x1024 and
4.20 s at 512x512 (reference/performance-anchors.md section 6).

    python bench/bench_depth.py [--sizes 512x512,576x1024] [--variants plain,fast] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ex4d.depth.depthcrafter import COMPILE_PRESET, FAST_KERNELS  # noqa: E402

ANCHORS = {"576x1024": {"total_s": 10.12, "peak_gib": 18.6}, "512x512": {"total_s": 4.20, "peak_gib": 10.8}}
TARGETS = {"576x1024": {"total_s": 4.4, "peak_gib": 12.0}, "512x512": {"total_s": 1.9}}
CHECKPOINTS = Path(__file__).resolve().parents[2] / "shared" / "checkpoints"

UNET_CONFIG = {
    "addition_time_embed_dim": 256, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "in_channels": 8, "layers_per_block": 2, "num_attention_heads": [5, 10, 20, 20], "num_frames": 25,
    "out_channels": 4, "projection_class_embeddings_input_dim": 768, "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
}
VAE_CONFIG = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
              "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
              "out_channels": 3, "sample_size": 768, "scaling_factor": 0.18215}
CLIP_CONFIG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
               "patch_size": 14, "image_size": 224, "projection_dim": 1024, "layer_norm_eps": 1e-5,
               "hidden_act": "gelu", "num_channels": 3}

VARIANTS = {
    "plain": dict(single_token_attention=False, decode_batch=1, encode_dtype="float32"),
    "fast": dict(single_token_attention=True, decode_batch=1, encode_dtype="float32", channels_last=True),
    "fast_fp16enc": dict(single_token_attention=True, decode_batch=1, encode_dtype="model", channels_last=True),
    "fast_compile": dict(single_token_attention=True, decode_batch=1, encode_dtype="model", channels_last=True,
                         compile=True),
    # the same numbers, 2 or 3 eight-frame chunks per decoder call (fewer, larger launches; more memory)
    "fast_compile_b2": dict(single_token_attention=True, decode_batch=2, encode_dtype="model", channels_last=True,
                            compile=True),
    "fast_compile_b3": dict(single_token_attention=True, decode_batch=3, encode_dtype="model", channels_last=True,
                            compile=True),
    # the VAE's GroupNorm(+SiLU) as one channels-last Triton op (ex4d.depth.fused_groupnorm)
    # what `ex4d depth --compile --fp16-encode` runs
    "fast_compile_fgn": dict(COMPILE_PRESET, decode_batch=1, encode_dtype="model"),
    # what `ex4d depth --fast-kernels` runs (fp32 encode, no compile)
    "fast_kernels": dict(FAST_KERNELS, decode_batch=1, encode_dtype="float32"),
    "fast_fgn": dict(single_token_attention=True, decode_batch=1, encode_dtype="model", channels_last=True,
                     fused_group_norm=True),
}


TINY = {  # for a CPU smoke run of this script (--tiny): same classes, toy sizes
    "unet": dict(UNET_CONFIG, block_out_channels=[32, 64], num_attention_heads=[2, 4], layers_per_block=1,
                 cross_attention_dim=32, addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                 down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
                 up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"]),
    "vae": dict(VAE_CONFIG, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                layers_per_block=1),
    "clip": dict(CLIP_CONFIG, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 patch_size=32, projection_dim=32),
}


def build_models(device, dtype, tiny=False):
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ex4d.depth.depthcrafter_unet import DepthCrafterUNet

    torch.manual_seed(0)
    with torch.device(device):
        unet = DepthCrafterUNet.from_config(TINY["unet"] if tiny else UNET_CONFIG).to(dtype).eval()
        vae = AutoencoderKLTemporalDecoder.from_config(TINY["vae"] if tiny else VAE_CONFIG).to(dtype).eval()
        config = CLIPVisionConfig(**(TINY["clip"] if tiny else CLIP_CONFIG))
        config._attn_implementation = "sdpa"
        clip = CLIPVisionModelWithProjection(config).to(dtype).eval()
    for m in (unet, vae, clip):
        m.requires_grad_(False)
    return unet, vae, clip


def reset(unet, vae):
    """Undo what a previous variant's pipeline changed on the shared modules."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ex4d.depth.depthcrafter import set_channels_last

    torch._dynamo.reset()  # compiled graphs are specialised on the weights' layouts, which variants change
    unet.set_attn_processor(AttnProcessor2_0())
    set_channels_last(unet, False)
    set_channels_last(vae, False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_variant(name, models, frames, device, repeats, reference=None, dtype=torch.float16,
                repeats_plain_1=False):
    from ex4d.depth.depthcrafter import DepthCrafterPipeline, DepthCrafterSettings
    from ex4d.depth.normalize import minmax_normalize

    unet, vae, clip = models
    reset(unet, vae)
    options = dict(VARIANTS[name])
    torch.backends.cudnn.benchmark = name != "plain"
    pipe = DepthCrafterPipeline(unet, vae, clip, device=device, dtype=dtype,
                                settings=DepthCrafterSettings(**options))
    t0 = time.perf_counter()
    out = pipe(frames)  # warm-up (and compilation)
    warmup_s = time.perf_counter() - t0
    totals, stages = [], []
    _reset_peak(device)
    for _ in range(1 if name == "plain" and repeats_plain_1 else repeats):
        timings = {}
        _sync(device)
        t0 = time.perf_counter()
        disp = pipe(frames, timings=timings)
        d_hat = minmax_normalize(disp)
        _sync(device)
        totals.append(time.perf_counter() - t0)
        stages.append(timings)
    peak = _peak_gib(device)
    from ex4d.depth.fused_groupnorm import CALLS

    result = {"variant": name, "options": options, "total_s": statistics.median(totals), "runs_s": totals,
              "group_norm_calls": dict(CALLS),
              "warmup_s": warmup_s, "peak_gib": peak, "finite": bool(np.isfinite(d_hat).all()),
              "stages_s": {k: statistics.median(t[k] for t in stages) for k in stages[0]}}
    if reference is not None:
        delta = np.abs(d_hat - reference)
        result["vs_plain"] = {"max_abs_dhat": float(delta.max()), "mean_abs_dhat": float(delta.mean())}
    for fused in pipe.fused_norms:  # the modules are shared with the next variant
        fused.undo()
    CALLS.clear()
    del pipe, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, d_hat


def bench_depth_anything(device, size, repeats):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    from ex4d.depth.depth_anything import DepthAnythingV2

    torch.manual_seed(0)
    config = DepthAnythingConfig()  # the Small (ViT-S) configuration
    with torch.device(device):
        model = DepthAnythingForDepthEstimation(config).half().eval().requires_grad_(False)
    est = DepthAnythingV2(model, device=device, dtype=torch.float16, batch_size=16)
    frames = np.random.default_rng(0).random((49, *size, 3), dtype=np.float32)
    est.estimate(frames)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        est.estimate(frames)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"size": f"{size[0]}x{size[1]}", "frames": 49, "total_s": statistics.median(times), "runs_s": times,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="512x512,576x1024")
    parser.add_argument("--variants", default="plain,fast,fast_fp16enc,fast_compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--depth-anything", action="store_true")
    parser.add_argument("--plain-once", action="store_true",
                        help="time the plain variant once (it is there for the output comparison)")
    parser.add_argument("--commit", default=os.environ.get("EX4D_COMMIT") or os.environ.get("EX4D_GIT_COMMIT", ""),
                        help="commit id to record (default: $EX4D_COMMIT, else git HEAD)")
    parser.add_argument("--tiny", action="store_true", help="toy models on the CPU: a smoke test of this script")
    parser.add_argument("--budget-s", type=float, default=420, help="skip remaining work after this long")
    args = parser.parse_args()
    import diffusers
    import transformers

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.float16
    start = time.perf_counter()
    # --commit first: a lent GPU machine's copy of the tree may carry a stale .git HEAD.
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    report = {"bench": "depth", "commit": commit, "device": "cpu" if args.tiny else torch.cuda.get_device_name(device),
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "frames": args.frames, "results": {}, "skipped": []}
    models = build_models(device, dtype, tiny=args.tiny)
    report["params"] = {n: sum(p.numel() for p in m.parameters()) for n, m in zip(("unet", "vae", "clip"), models)}
    for size_name in args.sizes.split(","):
        H, W = (int(v) for v in size_name.split("x"))
        frames = np.random.default_rng(1).random((args.frames, H, W, 3), dtype=np.float32)
        reference = None
        rows = []
        for name in args.variants.split(","):
            if time.perf_counter() - start > args.budget_s:
                report["skipped"].append(f"{size_name}:{name}")
                continue
            row, d_hat = run_variant(name, models, frames, device, args.repeats, reference, dtype, args.plain_once)
            if name == "plain":
                reference = d_hat
            anchor = ANCHORS.get(size_name)
            if anchor:
                row["speedup_vs_reference"] = anchor["total_s"] / row["total_s"]
            row["target"] = TARGETS.get(size_name)
            rows.append(row)
            print(json.dumps({"size": size_name, **row}), file=sys.stderr)
        report["results"][size_name] = rows
    if args.depth_anything and not args.tiny and time.perf_counter() - start < args.budget_s:
        report["depth_anything"] = [bench_depth_anything(device, (576, 1024), args.repeats)]
    report["wall_s"] = time.perf_counter() - start
    print(json.dumps(report))


if __name__ == "__main__":
    main()
