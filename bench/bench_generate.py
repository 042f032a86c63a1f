"""Speed and memory of one EX-4D generation (Wan2.1-I2V-14B + adapter), random full-size weights.

Prints ONE JSON object (and appends it to --out if given): git commit, device, versions, shapes,
median seconds per CFG step (steady state, after a warm-up generation), median whole generation
(text + image encoders, 3 VAE encodes, 25 steps, decode; model loading excluded), peak GPU memory
(``max_memory_allocated`` over the timed runs, weights included) and ratios to the reference's
anchors (bench/../shared/reference/performance-anchors.md).

Modes (one process each; ``set_attention_backend`` is process-global):
  default  bf16, merged LoRA, two CFG forwards (--fuse, --batch-cfg opt in), compile_repeated_blocks(fullgraph)
  eager    the same without torch.compile
  lowvram  resident DiT blocks within --vram-budget, the rest and the T5 streamed per block, batched CFG
  fp8      fp8 compute for the DiT's linear layers (row-wise scaled float8 GEMMs, ex4d.diffusion.fp8), batched CFG, compile
  unmerged the reference's setup: peft LoRA unmerged, two CFG forwards, eager
  cpuoffload  whole-model CPU offload (each model on the GPU only while it runs), batched CFG, compile

Weights: the exact full-size architectures built on the meta device, materialised on the GPU and
filled with N(0, 0.02) (norm weights 1, biases 0), bf16 with diffusers' _keep_in_fp32_modules in
fp32; the Wan VAE with its default init in bf16. Text tokens are random ids of the reference's
prompt lengths (32 positive, 128 negative, padded to 512); weight values do not change speed.

  python bench/bench_generate.py --mode default            # on a GPU
  python bench/bench_generate.py --tiny --mode eager       # tiny CPU check of the script itself

Several GPUs (ex4d.diffusion.parallel; every rank builds the whole random model on cuda:LOCAL_RANK
with the same seed, so the ranks hold identical weights):
  torchrun --nproc-per-node 2 bench/bench_generate.py --parallel cfg --baseline-step-s 1.52
  torchrun --nproc-per-node 2 bench/bench_generate.py --parallel ulysses --save-output /tmp/uly.npy
Rank 0 prints the one JSON object, with these fields added to the single-GPU ones: world_size,
parallel_mode, cfg_degree, ulysses_degree, peak_mem_gib_per_rank, step_s_median_per_rank,
devices_per_rank and (given --baseline-step-s, the one-GPU step median) speedup_vs_baseline_step.
``--tiny`` runs the ranks on the CPU over gloo. NVLink multicast stays off (apply_safe_env).

Same-seed agreement: ``--save-output PATH.npy`` writes rank 0's frames of the last timed run
(uint8 (T,H,W,3)) and its final latents beside it (PATH.latents.npy, float32 (16,T',h,w));
  python bench/bench_generate.py --compare one_gpu.npy two_gpu.npy
prints max/mean absolute difference and PSNR of the frames (and of the latents where both exist);
two .latents.npy files can be compared on their own (reported as "values"). Full-size frames are
38 MB (49x512x512x3), over what a lent machine sends back per file: compare there, or compare the
3.4 MB latents files here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

REFERENCE_STEP_S = 2.637        # reference DiT + unmerged LoRA, one CFG step (2 forwards), H100
REFERENCE_RUN_S = 65.9 + 2.7    # its 25 steps + 3 VAE encodes and 1 decode (T5/CLIP not measured)
DIFFUSERS_COMPILED_STEP_S = 1.542
FLOOR_STEP_S = 1.19

DIT_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
                  rope_max_seq_len=1024, pos_embed_seq_len=None)
T5_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                 num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6,
                 tie_word_embeddings=False, scalable_attention=True, pad_token_id=0, eos_token_id=1)
CLIP_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   image_size=224, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)


class RandomTokenizer:
    """Stands in for the umT5 tokenizer (no files on the bench machine): random ids, the reference's lengths."""

    def __init__(self, vocab: int, positive_len: int = 32, negative_len: int = 128):
        self.vocab, self.positive_len, self.negative_len = vocab, positive_len, negative_len

    def __call__(self, texts, max_length=512, **kwargs):
        length = self.positive_len if len(texts[0]) < 200 else self.negative_len
        g = torch.Generator().manual_seed(length)
        ids = torch.zeros(1, max_length, dtype=torch.long)
        ids[0, :length] = torch.randint(3, self.vocab, (length,), generator=g)
        mask = torch.zeros(1, max_length, dtype=torch.long)
        mask[0, :length] = 1
        return argparse.Namespace(input_ids=ids, attention_mask=mask)


def materialise(model: torch.nn.Module, device: str, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()):
    """Meta-built model -> random weights on ``device``; buffers (RoPE tables) kept exactly as built."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    for name, module in model.named_modules():
        fp32 = any(part in keep_fp32 for part in name.split("."))
        for pname, p in list(module.named_parameters(recurse=False)):
            module._parameters[pname] = torch.nn.Parameter(
                torch.empty(p.shape, device=device, dtype=torch.float32 if fp32 else dtype), requires_grad=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif "norm" in name or leaf in ("weight",) and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = b.to(device)
    return model.eval()


def build_full(device: str, dtype: torch.dtype) -> dict:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with init_empty_weights(include_buffers=False):
        transformer = WanTransformer3DModel.from_config(DIT_CONFIG)
        text_encoder = UMT5EncoderModel(UMT5Config(**T5_CONFIG))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_CONFIG))
    materialise(transformer, device, dtype, tuple(WanTransformer3DModel._keep_in_fp32_modules))
    materialise(text_encoder, device, dtype)
    materialise(image_encoder, device, dtype)
    vae = AutoencoderKLWan().to(device=device, dtype=dtype).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder,
                tokenizer=RandomTokenizer(T5_CONFIG["vocab_size"]), image_encoder=image_encoder)


def build_tiny() -> dict:
    from tiny_wan import make_tiny_components

    comps = make_tiny_components(0)
    comps["tokenizer"] = RandomTokenizer(90, 8, 16)
    return comps


_T0 = time.perf_counter()
_RANK_TAG = ""  # "r1 " etc. under torchrun


def note(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON line)."""
    print(f"[{_RANK_TAG}{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def emit(result: dict, out: str | os.PathLike | None = None) -> None:
    """The result as one JSON line on stdout, and appended to ``out`` (a JSON-lines file) when given."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as handle:
            handle.write(line + "\n")


def git_commit() -> str:
    if os.environ.get("EX4D_COMMIT"):  # the GPU machine gets a copy of the tree without .git
        return os.environ["EX4D_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="default", choices=["default", "eager", "lowvram", "fp8", "unmerged",
                                                                     "cpuoffload"])
    parser.add_argument("--tiny", action="store_true", help="tiny CPU models (checks the script, not the speed)")
    parser.add_argument("--runs", type=int, default=3, help="timed whole generations (median reported)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--attention", default=None, help="attention backend (see performance.py)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="force torch.compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="force eager")
    parser.add_argument("--fuse", action="store_true", help="fuse the self-attention Q/K/V linears")
    parser.add_argument("--batch-cfg", dest="batch_cfg", action="store_true", default=None,
                        help="force one batch-2 forward per step (default: only when offloading)")
    parser.add_argument("--no-batch-cfg", dest="batch_cfg", action="store_false", help="two CFG forwards per step")
    parser.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                        help="lowvram: GPU budget the resident DiT blocks are planned for (default: the GPU's)")
    parser.add_argument("--resident-blocks", type=int, default=None, help="lowvram: force the resident block count")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    parser.add_argument("--parallel", default="none", choices=["none", "ulysses", "cfg", "cfg-ulysses"],
                        help="multi-GPU layout; launch with torchrun --nproc-per-node N (docs/scale.md)")
    parser.add_argument("--baseline-step-s", type=float, default=None,
                        help="one-GPU median CFG step (s) of the same mode: adds speedup_vs_baseline_step")
    parser.add_argument("--save-output", default=None, metavar="PATH.npy",
                        help="write rank 0's frames of the last timed run (and PATH.latents.npy)")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("A.npy", "B.npy"),
                        help="only compare two --save-output files (max/mean abs diff, PSNR) and exit")
    args = parser.parse_args(argv)
    if args.compare:
        emit(compare_outputs(*args.compare), args.out)
        return 0
    if args.save_output and not args.save_output.endswith(".npy"):
        parser.error(f"--save-output {args.save_output} must end in .npy")
    if args.parallel != "none" and args.mode in ("lowvram",):
        parser.error("--mode lowvram streams each rank's own copy of the weights; not with --parallel")

    from ex4d.diffusion.parallel import apply_safe_env, launched_distributed

    ctx = None
    if args.parallel != "none" or launched_distributed():
        apply_safe_env()  # before any process group: NVLink multicast stays off
        ctx = _init_parallel(args, parser)
    try:
        return _bench(args, ctx)
    finally:
        if ctx is not None:
            from ex4d.diffusion.parallel import shutdown

            shutdown(ctx)


def _init_parallel(args, parser):
    """Join torchrun's process group for ``args.parallel`` (gloo on the CPU with --tiny)."""
    global _RANK_TAG
    from ex4d.diffusion.parallel import WAN_14B_HEADS, check_ulysses, init_parallel, num_video_tokens
    from ex4d.diffusion.pipeline import DEFAULT_GUIDANCE
    from ex4d.errors import UserError

    try:
        ctx = init_parallel(args.parallel, guidance_scale=DEFAULT_GUIDANCE, backend="gloo" if args.tiny else None)
        frames = args.frames or (9 if args.tiny else 49)
        size = args.size or (32 if args.tiny else 512)
        # Fail before 60 GB of random weights are built: the heads and tokens must split evenly.
        heads = _tiny_heads() if args.tiny else WAN_14B_HEADS
        check_ulysses(heads, num_video_tokens(frames, size, size), ctx.ulysses_degree)
    except UserError as exc:
        parser.error(str(exc))
    _RANK_TAG = f"r{ctx.rank} "
    return ctx


def _tiny_heads() -> int:
    from tiny_wan import tiny_transformer_config

    return int(tiny_transformer_config()["num_attention_heads"])


def _bench(args, ctx) -> int:
    """The measurement itself; ``ctx`` is a ParallelContext under torchrun, else None."""

    from diffusers.utils import logging as dlogging

    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline

    dlogging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    world = ctx.world_size if ctx is not None else 1
    if world > 1 and cuda:
        device = str(ctx.device)  # cuda:LOCAL_RANK, already the current device
    frames = args.frames or (9 if args.tiny else 49)
    size = args.size or (32 if args.tiny else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    mode = args.mode
    compile_ = mode in ("default", "fp8", "cpuoffload") if args.compile is None else args.compile
    options = PerformanceOptions(
        merge_lora=mode != "unmerged", fuse_qkv=mode != "unmerged" and args.fuse, compile=compile_ and cuda,
        batch_cfg=False if mode == "unmerged" else args.batch_cfg, low_vram=mode == "lowvram", fp8=mode == "fp8",
        attention=args.attention, cpu_offload=mode == "cpuoffload",
        dtype=dtype, vram_budget_gib=args.vram_budget, resident_blocks=args.resident_blocks)
    from ex4d.diffusion.parallel import num_video_tokens

    options.low_vram_tokens = num_video_tokens(frames, size, size)

    t0 = time.perf_counter()
    # Seeded so that every rank (and a one-GPU run) builds the same random weights: needed for the
    # same-seed comparison; the values do not change the speed.
    torch.manual_seed(0)
    comps = build_tiny() if args.tiny else build_full(device, dtype)
    build_s = time.perf_counter() - t0
    note(f"built models in {build_s:.1f}s")
    t0 = time.perf_counter()
    pipe = build_pipeline(comps, None, options, device)
    if world > 1:
        from ex4d.diffusion.parallel import num_video_tokens, parallelize_pipeline

        # After merge/fusion/compile setup, as ex4d.pipeline.run_generate does (compile is lazy).
        parallelize_pipeline(pipe, ctx, num_tokens=num_video_tokens(frames, size, size))
    setup_s = time.perf_counter() - t0
    note(f"pipeline set up ({mode}) in {setup_s:.1f}s")
    pipe.set_progress_bar_config(disable=True)
    if mode == "unmerged":
        # Non-zero LoRA B: the timing does not depend on it, but the output then does depend on the LoRA path.
        with torch.no_grad():
            torch.manual_seed(1)  # identical on every rank
            for name, p in pipe.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)

    g = torch.Generator().manual_seed(0)
    cond = torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1
    mask = torch.where(torch.rand(1, 1, frames, size, size, generator=g) > 0.3, 1.0, -1.0).expand(1, 3, -1, -1, -1)
    mask = mask.clone()
    mask[:, :, 0] = 1.0

    step_times: list[float] = []
    final_latents: list[torch.Tensor] = []
    current_steps = [0]

    def on_step(pipe_, i, t, kwargs):
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter())
        if args.save_output and i == current_steps[0] - 1:  # after the timestamp: not in any step time
            final_latents[:] = [kwargs["latents"].float().cpu()]
        return None

    def run(steps: int) -> tuple[float, list[float], torch.Tensor]:
        step_times.clear()
        current_steps[0] = steps
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe(cond, mask, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   output_type="np", callback_on_step_end=on_step).frames
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        per_step = [b - a for a, b in zip(step_times[:-1], step_times[1:])]
        return total, per_step, out

    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            phases.setdefault(name, []).append(time.perf_counter() - start)
            return out
        return wrapper

    for name in ("encode_prompt", "encode_image", "prepare_condition", "decode_latents"):
        setattr(pipe, name, timed(name, getattr(pipe, name)))

    t0 = time.perf_counter()
    warm_total, _, _ = run(args.warmup_steps)
    phases.clear()
    note(f"warm-up ({args.warmup_steps} steps) {warm_total:.1f}s")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    summary = _summary_factory(args, options, pipe, mode, frames, size, cuda, warm_total, build_s, setup_s, phases)
    main_rank = ctx is None or ctx.is_main
    totals, steps_all, finite = [], [], True
    for _ in range(args.runs):
        total, per_step, out = run(args.steps)
        totals.append(total)
        note(f"run {len(totals)}: {total:.2f}s, median step {statistics.median(per_step) if per_step else 0:.3f}s"
             + (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""))
        steps_all.extend(per_step)
        finite = finite and out.dtype.name == "uint8" and out.shape[1] == frames
        if len(totals) < args.runs and main_rank:
            print("partial: " + json.dumps(summary(totals, steps_all, finite)), file=sys.stderr, flush=True)
    result = summary(totals, steps_all, finite)
    if world > 1:
        result.update(_parallel_fields(ctx, cuda, steps_all))
    if args.baseline_step_s and result["step_s_median"]:
        result["baseline_step_s"] = args.baseline_step_s
        result["speedup_vs_baseline_step"] = round(args.baseline_step_s / result["step_s_median"], 3)
    if args.save_output and main_rank:
        result["saved_output"] = _save_output(args.save_output, out[0], final_latents[0] if final_latents else None)
    if main_rank:
        emit(result, args.out)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank tears the group down while rank 0 is still writing
    return 0


def _parallel_fields(ctx, cuda: bool, steps_all: list[float]) -> dict:
    """Per-rank peaks and step medians gathered to every rank (all_gather_object; a collective)."""
    import torch.distributed as dist

    mine = {"rank": ctx.rank, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "step_s_median": round(statistics.median(steps_all), 4) if steps_all else None,
            "device": f"{ctx.device} {torch.cuda.get_device_name()}" if cuda else str(ctx.device)}
    gathered: list[dict | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    gathered.sort(key=lambda r: r["rank"])
    return {"world_size": ctx.world_size, "parallel_mode": ctx.mode, "cfg_degree": ctx.cfg_degree,
            "ulysses_degree": ctx.ulysses_degree,
            "peak_mem_gib_per_rank": [r["peak_mem_gib"] for r in gathered],
            "step_s_median_per_rank": [r["step_s_median"] for r in gathered],
            "devices_per_rank": [r["device"] for r in gathered],
            # CFG-parallel: each rank runs its own branch at batch 1, whatever pipe.batch_cfg says.
            **({"batch_cfg_effective": False} if ctx.cfg_degree > 1 else {})}


def _latents_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name[:-len(".npy")] + ".latents.npy")


def _save_output(path: str, frames: np.ndarray, latents: torch.Tensor | None) -> dict:
    """frames (T,H,W,3) uint8 -> ``path``; latents (1,16,T',h,w) -> PATH.latents.npy (atomic writes)."""
    from ex4d.io.files import atomic_path

    written = {"frames": str(path)}
    with atomic_path(path) as tmp:
        np.save(tmp, np.ascontiguousarray(frames))
    if latents is not None:
        with atomic_path(_latents_path(path)) as tmp:
            np.save(tmp, latents[0].numpy().astype(np.float32))
        written["latents"] = str(_latents_path(path))
    return written


def _diff_stats(a: np.ndarray, b: np.ndarray, peak: float | None) -> dict:
    """max/mean |a - b| and PSNR (peak: 255 for uint8 frames; else the range of ``a``)."""
    if a.shape != b.shape:
        raise SystemExit(f"error: shapes differ: {a.shape} vs {b.shape}; compare outputs of the same --frames/--size")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    peak = peak if peak is not None else float(a64.max() - a64.min()) or 1.0
    mse = float(np.mean(diff ** 2))
    return {"shape": list(a.shape), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "psnr_db": round(10 * np.log10(peak ** 2 / mse), 2) if mse > 0 else None, "identical": mse == 0,
            "psnr_peak": peak}


def compare_outputs(path_a: str, path_b: str) -> dict:
    """Agreement of two ``--save-output`` files (and their .latents.npy siblings where both exist)."""
    for path in (path_a, path_b):
        if not Path(path).is_file():
            raise SystemExit(f"error: {path} does not exist; write it with --save-output")
    a, b = np.load(path_a), np.load(path_b)
    result = {"bench": "generate-compare", "a": str(path_a), "b": str(path_b),
              # uint8 -> frames (peak 255); anything else (e.g. two .latents.npy files) -> values.
              ("frames" if a.dtype == np.uint8 else "values"): _diff_stats(a, b, 255.0 if a.dtype == np.uint8
                                                                           else None)}
    la, lb = _latents_path(path_a), _latents_path(path_b)
    if la.is_file() and lb.is_file():
        result["latents"] = _diff_stats(np.load(la), np.load(lb), None)
    return result


def _summary_factory(args, options, pipe, mode, frames, size, cuda, warm_total, build_s, setup_s, phases):
    import diffusers

    def summary(totals, steps_all, finite):
        return _summary(args, options, pipe, mode, frames, size, cuda, warm_total, build_s, setup_s, phases,
                        totals, steps_all, finite, diffusers.__version__)
    return summary


def _summary(args, options, pipe, mode, frames, size, cuda, warm_total, build_s, setup_s, phases, totals,
             steps_all, finite, diffusers_version):
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    step_median = statistics.median(steps_all) if steps_all else None
    run_median = statistics.median(totals)
    result = {
        "bench": "generate", "mode": mode, "commit": git_commit(),
        "device": torch.cuda.get_device_name() if cuda else "cpu (tiny models)",
        "torch": torch.__version__, "diffusers": diffusers_version,
        "shape": {"frames": frames, "height": size, "width": size, "latent": [1, 16, (frames - 1) // 4 + 1,
                                                                             size // 8, size // 8]},
        "steps": args.steps, "runs": args.runs, "options": {k: (str(v) if isinstance(v, torch.dtype) else v)
                                                            for k, v in vars(options).items()},
        "step_s_median": round(step_median, 4) if step_median else None,
        "step_s_n": len(steps_all),
        "generate_s_median": round(run_median, 3), "generate_s_runs": [round(x, 3) for x in totals],
        "non_dit_s": round(run_median - (step_median or 0) * args.steps, 3),
        "warmup_s": round(warm_total, 2), "build_s": round(build_s, 1), "setup_s": round(setup_s, 1),
        "peak_mem_gib": round(peak, 2) if peak is not None else None,
        "output_ok": finite,
    }
    result["batch_cfg_effective"] = bool(pipe.batch_cfg)
    streamer = getattr(pipe.transformer, "_ex4d_streamer", None)
    if streamer is not None:
        result["resident_blocks"] = streamer.resident
    result["phases_s_median"] = {k: round(statistics.median(v), 3) for k, v in phases.items()}
    if cuda and step_median:
        result.update({
            "speedup_vs_reference_step": round(REFERENCE_STEP_S / step_median, 3),
            "ratio_vs_diffusers_compiled_step": round(step_median / DIFFUSERS_COMPILED_STEP_S, 3),
            "ratio_vs_floor_step": round(step_median / FLOOR_STEP_S, 3),
            "speedup_vs_reference_run": round(REFERENCE_RUN_S / run_median, 3),
        })
    return result


if __name__ == "__main__":
    sys.exit(main())
