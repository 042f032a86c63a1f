"""Where one CFG step of the 14B DiT spends its GPU time (random full-size weights, one GPU).

Builds only the Wan2.1-I2V-14B transformer (bench_generate's config and random weights, bf16,
merged-LoRA shape: plain Linears), compiles its repeated blocks as ``ex4d generate --compile``
does, times a CFG step (two batch-1 forwards, the default on a GPU that holds the model), and
profiles one step with torch.profiler. Kernel self-time is summed into GEMM, attention and
"other" (norms, RoPE, modulation, casts, copies), against the analytic FLOPs of
reference/performance-anchors.md (475.1 TFLOP per forward, 145.2 of it self-attention).

Prints ONE JSON object: commit, device, step median, per-category GPU ms and TFLOP/s, top kernels.

  python bench/profile_dit.py                          # compiled, torch picks the SDPA kernel
  python bench/profile_dit.py --attention cudnn        # force cuDNN attention
  python bench/profile_dit.py --compile-mode max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_generate import DIT_CONFIG, git_commit, materialise, note  # noqa: E402

FORWARD_TFLOP = 475.1
ATTENTION_TFLOP = 145.2
GEMM_KEYS = ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "triton_tem")
ATTENTION_KEYS = ("fmha", "flash", "sdpa", "attention", "cudnn_generated")


def category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ATTENTION_KEYS):
        return "attention"
    if any(k in low for k in GEMM_KEYS):
        return "gemm"
    return "other"


def attention_micro(tokens: int = 13312, heads: int = 40, dim: int = 128) -> dict:
    """One self-attention call, [1, S, H, D] inputs as diffusers passes them: eager, compiled, contiguous."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def eager(q, k, v):
        return F.scaled_dot_product_attention(*(x.permute(0, 2, 1, 3) for x in (q, k, v))).permute(0, 2, 1, 3)

    def timed(fn, n=20):
        for _ in range(3):
            fn(q, k, v)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn(q, k, v)
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) / n, 3)

    out = {"eager": timed(eager), "compiled": timed(torch.compile(eager, fullgraph=True))}
    out["bhsd_contiguous"] = timed(lambda q, k, v: F.scaled_dot_product_attention(
        *(x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v))))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default=None, help="attention backend (see ex4d.diffusion.performance)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor default)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--micro", action="store_true", help="also time the self-attention call alone")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_dit.py needs a CUDA GPU")

    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from ex4d.diffusion.performance import set_attention_backend

    torch.manual_seed(0)
    with init_empty_weights(include_buffers=False):
        dit = WanTransformer3DModel.from_config(DIT_CONFIG)
    materialise(dit, "cuda", torch.bfloat16, tuple(WanTransformer3DModel._keep_in_fp32_modules))
    if args.attention:
        set_attention_backend(dit, args.attention)
    micro = attention_micro() if args.micro else None
    if not args.no_compile:
        kwargs = {"fullgraph": True}
        if args.compile_mode:
            kwargs["mode"] = args.compile_mode
        dit.compile_repeated_blocks(**kwargs)

    f, h = (args.frames - 1) // 4 + 1, args.size // 8
    x = torch.randn(1, 36, f, h, h, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    pos = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    neg = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    img = torch.randn(1, 257, 1280, device="cuda", dtype=torch.bfloat16)

    @torch.no_grad()
    def step():
        a = dit(hidden_states=x, timestep=t, encoder_hidden_states=pos, encoder_hidden_states_image=img,
                return_dict=False)[0]
        b = dit(hidden_states=x, timestep=t, encoder_hidden_states=neg, encoder_hidden_states_image=img,
                return_dict=False)[0]
        return b.float() + 5.0 * (a.float() - b.float())

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    note(f"first step (compile) {time.perf_counter() - start:.1f}s")
    step()
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    finite = bool(torch.isfinite(out).all())

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" or getattr(event, "self_device_time_total", 0):
            ms = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0)) / 1000.0
            if ms > 0:
                kernels[event.key] = kernels.get(event.key, 0.0) + ms
    totals = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in kernels.items():
        totals[category(name)] += ms
    gpu_ms = sum(totals.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
    step_s = statistics.median(times)
    result = {
        "bench": "profile_dit", "commit": git_commit(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "compile": not args.no_compile, "compile_mode": args.compile_mode,
        "attention": args.attention or "native", "shape": [args.frames, args.size, args.size],
        "step_s_median": round(step_s, 4), "step_s_runs": [round(v, 4) for v in times], "finite": finite,
        "mfu_vs_800": round(2 * FORWARD_TFLOP / step_s / 800.0, 3),
        "gpu_ms_per_step": {k: round(v, 1) for k, v in totals.items()} | {"total": round(gpu_ms, 1)},
        "share": {k: round(v / gpu_ms, 3) for k, v in totals.items()},
        "attention_tflops": round(2 * ATTENTION_TFLOP / (totals["attention"] / 1000.0), 1) if totals["attention"] else None,
        "gemm_tflops": round(2 * (FORWARD_TFLOP - ATTENTION_TFLOP) / (totals["gemm"] / 1000.0), 1) if totals["gemm"] else None,
        "top_kernels_ms": [[name[:120], round(ms, 2), category(name)] for name, ms in top],
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "self_attention_micro_ms": micro,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
