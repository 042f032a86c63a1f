"""fp8 compute of the 14B DiT (ex4d.diffusion.fp8) against bf16: speed of one CFG step and velocity deviation.

Builds the full-size Wan2.1-I2V-14B ``WanTransformer3DModel`` with random weights on the GPU
(bench_generate.materialise: N(0, 0.02), norms 1, biases 0, fp32 where diffusers keeps fp32),
then at 512x512x49 (13312 video tokens, 512 text and 257 image tokens):

1. bf16 eager: one forward -> the reference velocity (kept on the GPU);
2. with ``--baseline``: bf16 ``compile_repeated_blocks(fullgraph=True)``, CFG step timed (2 forwards);
3. ``convert_to_fp8`` in place (the bf16 weights are freed as their fp8 copies appear);
4. fp8 eager: one forward -> deviation from (1): relative L2 and max abs;
5. fp8 compiled (fullgraph), for each ``--variants`` entry (fast accumulation and/or the bias in
   the GEMM epilogue; a ``+fp8-attention`` suffix also puts the self-attention on cuDNN's fp8
   attention, ex4d.diffusion.attention_fp8): deviation again (this also compiles), then the CFG
   step timed.

Each timing: warm-up, then the median of ``--repeats`` CFG steps (2 forwards each, synchronised
host clock). Peak memory is ``max_memory_allocated`` over the timed fp8 steps (DiT alone; the whole
pipeline's peak with every model resident is bench_generate.py --mode fp8 and bench_e2e.py).

Prints ONE JSON object.

  python bench/bench_fp8.py --baseline --variants exact,fast,exact-bias-epilogue,fast-bias-epilogue --profile
                                               # on an H100 (~4 min incl. the compiles)
  python bench/bench_fp8.py --variants exact,exact+fp8-attention,fast+fp8-attention
  python bench/bench_fp8.py --variants fast+fp8-attention --inductor coordinate_descent_tuning=True
                                               # an inductor setting, A/B against the run without it
  python bench/bench_fp8.py --tiny             # CPU check of the script (tiny model, emulated fp8)
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
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_generate import DIT_CONFIG, git_commit, materialise, note  # noqa: E402

GOAL_STEP_S = 1.10
#: fp8 GEMM variants: name -> (cuBLASLt fast accumulation, bias in the GEMM epilogue)
VARIANTS = {"exact": (False, False), "fast": (True, False), "exact-bias-epilogue": (False, True),
            "fast-bias-epilogue": (True, True)}


def build_dit(tiny: bool, device: str, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    if tiny:
        from tiny_wan import tiny_transformer_config

        torch.manual_seed(0)
        cfg = dict(tiny_transformer_config(), attention_head_dim=16, ffn_dim=64, added_kv_proj_dim=32)
        return WanTransformer3DModel.from_config(cfg).to(device=device, dtype=dtype).eval()
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        transformer = WanTransformer3DModel.from_config(DIT_CONFIG)
    torch.manual_seed(0)
    return materialise(transformer, device, dtype, tuple(WanTransformer3DModel._keep_in_fp32_modules))


def make_inputs(cfg, frames: int, size: int, device: str, dtype: torch.dtype) -> list[dict]:
    """The two CFG branches' inputs (positive / negative text context), random but fixed."""
    g = torch.Generator(device="cpu").manual_seed(1)
    lat = (frames - 1) // 4 + 1
    x = torch.randn(1, cfg.in_channels, lat, size // 8, size // 8, generator=g).to(device, dtype)
    image = torch.randn(1, 257, cfg.image_dim, generator=g).to(device, dtype)
    branches = []
    for _ in range(2):
        text = torch.randn(1, 512, cfg.text_dim, generator=g).to(device, dtype)
        branches.append(dict(hidden_states=x, timestep=torch.tensor([700.0], device=device),
                             encoder_hidden_states=text, encoder_hidden_states_image=image, return_dict=False))
    return branches


def step(transformer, branches, conditional: list | None = None) -> torch.Tensor:
    """One CFG step: the guided velocity (CFG 5); ``conditional`` receives the positive branch's."""
    with torch.no_grad():
        outs = [transformer(**b)[0] for b in branches]
    if conditional is not None:
        conditional[:] = [outs[0]]
    return outs[1] + 5.0 * (outs[0] - outs[1])


def deviations(reference: tuple, transformer, branches) -> dict:
    """Deviation of the guided velocity and of the positive branch's (unguided) velocity."""
    from ex4d.diffusion.fp8 import velocity_deviation

    cond: list = []
    guided = step(transformer, branches, cond)
    return {"guided": velocity_deviation(reference[0], guided), "conditional": velocity_deviation(reference[1], cond[0])}


def profile_step(transformer, branches) -> dict:
    """Kernel self-time (s) of one CFG step by kind: GEMM, attention, Triton (fused elementwise/quantise), other."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(transformer, branches)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        t = ev.self_device_time_total / 1e6
        if t <= 0:
            continue
        name = ev.key.lower()
        kind = ("attention" if any(k in name for k in ("fmha", "flash", "sdpa", "attention", "cudnn")) else
                "gemm" if any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "scaled_mm")) else
                "triton" if "triton" in name else "other")
        kinds[kind] = kinds.get(kind, 0.0) + t
        top[ev.key[:90]] = top.get(ev.key[:90], 0.0) + t  # kernels whose names differ after 90 characters add up
    out = {k: round(v, 4) for k, v in sorted(kinds.items())}
    out["top"] = {k: round(v, 4) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}
    out.update(gpu_idle(prof))
    return out


def gpu_idle(prof, shown: int = 8) -> dict:
    """How much of the profiled span the GPU sat idle between kernels, and the longest such gaps.

    The kernels' [start, end) intervals (one stream) are merged; ``span_s`` runs from the first
    kernel's start to the last one's end, ``idle_s`` is the span less the merged busy time. Each gap
    names the kernels on either side, to tell a host-side stall (a sync, a slow launch) from noise.
    """
    from torch.autograd import DeviceType

    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                     if ev.device_type == DeviceType.CUDA and ev.time_range.end > ev.time_range.start)
    if not kernels:
        return {}
    busy, gaps, cur_start, cur_end, cur_name = 0.0, [], *kernels[0]
    for start, end, name in kernels[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_name[:60], name[:60]))
            cur_start = start
        if end >= cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    span = kernels[-1][1] - kernels[0][0]
    gaps.sort(reverse=True)
    return {"span_s": round(span / 1e6, 4), "busy_s": round(busy / 1e6, 4), "idle_s": round((span - busy) / 1e6, 4),
            "gaps": len(gaps), "gaps_over_50us": sum(g[0] > 50 for g in gaps),
            "longest_gaps_us": [[round(g[0], 1), g[1], g[2]] for g in gaps[:shown]]}


def set_inductor_config(settings: list[str], parser) -> dict:
    """Apply ``KEY=VALUE`` settings to ``torch._inductor.config`` (VALUE a Python literal); returns them."""
    import ast
    import functools

    import torch._inductor.config as inductor_config

    applied = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        try:
            parsed = ast.literal_eval(value)
            *parents, name = key.split(".")
            owner = functools.reduce(getattr, parents, inductor_config)
            getattr(owner, name)  # an unknown key is an error, not a new attribute
        except (ValueError, SyntaxError, AttributeError) as exc:
            parser.error(f"--inductor {setting!r}: {exc if sep else 'expected KEY=VALUE'}")
        setattr(owner, name, parsed)
        applied[key] = parsed
    return applied


def time_steps(transformer, branches, repeats: int, cuda: bool) -> list[float]:
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(transformer, branches)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, emulated fp8 (default off)")
    parser.add_argument("--baseline", action="store_true", help="also time compiled bf16 (default off)")
    parser.add_argument("--no-compile", action="store_true", help="time eager only (default: compiled)")
    parser.add_argument("--frames", type=int, default=None, help="default 49 (tiny: 5)")
    parser.add_argument("--size", type=int, default=None, help="default 512 (tiny: 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed CFG steps (default 5)")
    parser.add_argument("--variants", default="exact", help="comma list of fp8 variants to time, each "
                        f"one of {', '.join(VARIANTS)}; the first is the one profiled (default exact)")
    parser.add_argument("--profile", action="store_true",
                        help="kernel time by kind in one fp8 step, and the GPU's idle time between kernels (default off)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config KEY (dotted) to the Python literal VALUE before compiling, "
                             "e.g. coordinate_descent_tuning=True; repeatable (default: none)")
    args = parser.parse_args(argv)
    inductor_settings = set_inductor_config(args.inductor, parser)

    from ex4d.diffusion.fp8 import Float8Linear, convert_to_fp8

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    frames = args.frames or (49 if cuda else 5)
    size = args.size or (512 if cuda else 32)
    compile_ = cuda and not args.no_compile
    t0 = time.perf_counter()
    transformer = build_dit(args.tiny, device, dtype)
    note(f"built DiT in {time.perf_counter() - t0:.1f}s")
    branches = make_inputs(transformer.config, frames, size, device, dtype)
    result = dict(bench="bench_fp8", commit=git_commit(), device=torch.cuda.get_device_name() if cuda else "cpu",
                  torch=torch.__version__, frames=frames, size=size, dtype=str(dtype), compiled=compile_,
                  repeats=args.repeats, inductor_config=inductor_settings)

    cond: list = []
    reference = (step(transformer, branches, cond), cond[0])
    if args.baseline:
        if compile_:
            transformer.compile_repeated_blocks(fullgraph=True)
        step(transformer, branches)  # warm-up (compiles)
        bf16 = time_steps(transformer, branches, args.repeats, cuda)
        result["bf16_step_s"] = round(statistics.median(bf16), 4)
        result["bf16_step_s_all"] = [round(t, 4) for t in bf16]
        note(f"bf16 step {result['bf16_step_s']}s")
        if compile_:
            result["bf16_compiled_vs_eager"] = deviations(reference, transformer, branches)
        torch._dynamo.reset()
        for block in transformer.blocks:  # undo compile_repeated_blocks before converting
            block._compiled_call_impl = None

    t0 = time.perf_counter()
    converted = convert_to_fp8(transformer, compute_device=device, emulate=True if not cuda else None)
    if cuda:
        torch.cuda.synchronize()
    result["fp8_layers"] = converted
    result["convert_s"] = round(time.perf_counter() - t0, 2)
    result["fp8_eager_vs_bf16"] = deviations(reference, transformer, branches)
    note(f"fp8 eager deviation {result['fp8_eager_vs_bf16']}")
    if compile_:
        transformer.compile_repeated_blocks(fullgraph=True)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants
               if v.partition("+")[0] not in VARIANTS or v.partition("+")[2] not in ("", "fp8-attention")]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}, each optionally +fp8-attention")

    def set_variant(name):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        from ex4d.diffusion.attention_fp8 import use_fp8_self_attention

        linear, _, attention = name.partition("+")
        for m in transformer.modules():
            if isinstance(m, Float8Linear):
                m.fast_accum, m.bias_in_gemm = VARIANTS[linear]
        if attention:
            use_fp8_self_attention(transformer, emulate=not cuda)
        else:
            for block in transformer.blocks:
                block.attn1.set_processor(WanAttnProcessor())

    for i, name in enumerate(variants):
        tag = f"fp8_{name}"
        set_variant(name)
        torch._dynamo.reset()  # the flags are baked into the compiled graphs: recompile, untimed
        result[f"{tag}_vs_bf16"] = deviations(reference, transformer, branches)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(transformer, branches, args.repeats, cuda)
        result[f"{tag}_step_s"] = round(statistics.median(times), 4)
        result[f"{tag}_step_s_all"] = [round(t, 4) for t in times]
        note(f"{tag} step {result[f'{tag}_step_s']}s")
        if cuda and not i:
            result["fp8_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.profile and cuda:
        set_variant(variants[0])
        torch._dynamo.reset()
        step(transformer, branches)
        result["fp8_profile_s"] = profile_step(transformer, branches)
    if cuda:
        result["fp8_weights_gib"] = round(sum(t.numel() * t.element_size() for t in
                                              list(transformer.parameters()) + list(transformer.buffers())) / 2**30, 2)
    best = min(result[f"fp8_{name}_step_s"] for name in variants)
    result["goal_step_s"] = GOAL_STEP_S
    result["goal_met"] = bool(cuda and best <= GOAL_STEP_S)
    if "bf16_step_s" in result:
        result["speedup_vs_bf16"] = round(result["bf16_step_s"] / best, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
