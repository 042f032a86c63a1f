"""Batch throughput of ``ex4d batch`` (recon + generation per clip) in clips per hour, one GPU.

Prints ONE JSON object (and appends it to --out if given): git commit, device, versions, shapes,
per-clip seconds of the timed jobs (median and all), clips per hour (steady state: 3600 / median
per-clip seconds; and over the whole timed batch's wall clock), the per-stage medians recorded by
the batch manifest, the one-off model set-up, peak GPU memory and the ratio to the reference.

What one job does here: the batch runner (ex4d.batch.run_batch, default runner) reads a synthetic
49-frame clip, takes its exact depth from a file (no depth model: its cost is bench_depth's),
renders the DW-Mesh condition along the job's camera path, loads + erodes + scales the condition
and runs the 25-step, CFG-5 generation, then writes the mp4 -- exactly what ``ex4d batch`` runs
for a ``stage: run`` job with ``depth: <file>``. The generator is the full-size Wan2.1-I2V-14B +
adapter architecture with random weights (bench_generate.build_full); it is put into the batch's
per-process cache before the first job, as a real batch loads it once.

Modes:
  full     everything on the GPU, bf16, merged LoRA (+ --compile)
  lowvram  DiT blocks that fit --vram-budget resident, the rest and the T5 streamed from pinned CPU memory

Reference anchor (a sum of measured components, performance-anchors.md, not an end-to-end run):
DiT 25 steps with its unmerged LoRA 65.9 s + VAE 2.7 s + DiT onload 6.5 s = 75.1 s per clip, i.e.
47.9 clips/hour, *excluding* its T5/CLIP encoders, depth, rendering and the DiT offload it also
pays (26-30 s). The ratio is therefore generous to the reference.

  python bench/bench_batch.py --mode full --jobs 4            # on a GPU
  python bench/bench_batch.py --mode lowvram --jobs 3
  python bench/bench_batch.py --tiny                          # tiny CPU models: checks the script
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_generate import build_full, build_tiny, emit, git_commit, note  # noqa: E402

REFERENCE_CLIP_S = 65.9 + 2.7 + 6.5
REFERENCE_CLIPS_PER_HOUR = 3600.0 / REFERENCE_CLIP_S
CAMS = ["30", "60", "90", "-30", "zoom_in", "zoom_out", "-60", "orbit:yaw=45,pitch=10"]


def make_inputs(folder: Path, frames: int, size: int) -> tuple[Path, Path]:
    """A synthetic clip (boxes scene, static camera) and its exact z-depth as a .npz file."""
    from ex4d.io.video import to_uint8, write_video
    from ex4d.synthetic.scenes import make_example

    clip, depth = make_example("boxes", num_frames=frames, size=(size, size))
    video = write_video(folder / "clip.mp4", to_uint8(clip.frames), clip.fps)
    depth_path = folder / "depth.npz"
    np.savez(depth_path, depth=depth.depth)
    return video, depth_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="full", choices=["full", "lowvram"])
    parser.add_argument("--tiny", action="store_true", help="tiny CPU models (checks the script, not the speed)")
    parser.add_argument("--jobs", type=int, default=3, help="timed jobs (after one warm-up job); >= 3")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 25; 2 with --tiny)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default 49; 5 with --tiny)")
    parser.add_argument("--size", type=int, default=None, help="clip and generation size (default 512; 32 tiny)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (full mode)")
    parser.add_argument("--attention", default=None, help="attention backend (see performance.py)")
    parser.add_argument("--workdir", default=None, help="folder for inputs and outputs (default: a temp folder)")
    parser.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                        help="lowvram: the GPU budget to plan for (e.g. 24 to stand for a 24 GB card)")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    if args.jobs < 3:
        parser.error("--jobs must be >= 3 (a median of at least 3 runs)")

    import diffusers
    from diffusers.utils import logging as dlogging

    from ex4d.batch import generation_key, load_jobs, read_record, run_batch
    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline

    dlogging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.tiny
    if args.mode == "lowvram" and not cuda:
        note("lowvram needs CUDA; the tiny CPU run uses the full layout instead")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    frames = args.frames or (5 if args.tiny else 49)
    size = args.size or (32 if args.tiny else 512)
    steps = args.steps or (2 if args.tiny else 25)
    memory = "low-vram" if (args.mode == "lowvram" and cuda) else "full"

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_batch_"))
    work.mkdir(parents=True, exist_ok=True)
    video, depth = make_inputs(work, frames, size)
    defaults = {"stage": "run", "depth": str(depth), "num_frames": frames, "resize": "keep", "save_mesh": "none",
                "device": device, "size": f"{size}x{size}", "steps": steps, "memory": memory,
                "compile": bool(args.compile and cuda), "attention": args.attention,
                "vram_budget": args.vram_budget if memory == "low-vram" else None}
    defaults = {k: v for k, v in defaults.items() if v is not None}
    cams = [CAMS[i % len(CAMS)] for i in range(args.jobs + 1)]
    lines = [f"defaults: {json.dumps(defaults)}", "jobs:"]
    lines += [f"  - {{video: {json.dumps(str(video))}, cam: {json.dumps(cam)}, output: out/job{i}}}"
              for i, cam in enumerate(cams)]
    jobs_file = work / "jobs.yaml"
    jobs_file.write_text("\n".join(lines) + "\n")
    jobs = load_jobs(jobs_file)

    # The generator, built once (random full-size weights) and handed to the batch's cache.
    t0 = time.perf_counter()
    comps = build_tiny() if args.tiny else build_full(device, dtype)
    options = PerformanceOptions(compile=bool(args.compile and cuda), low_vram=memory == "low-vram",
                                 attention=args.attention, dtype=dtype, vram_budget_gib=args.vram_budget)
    pipe = build_pipeline(comps, None, options, device)
    pipe.set_progress_bar_config(disable=True)
    setup_s = time.perf_counter() - t0
    note(f"generator ready ({args.mode}) in {setup_s:.1f}s")
    cache = {"generate_pipe": pipe, "generate_key": generation_key(jobs[0])}

    t0 = time.perf_counter()
    warm = run_batch(jobs[:1], cache=cache)
    warm_s = time.perf_counter() - t0
    if not warm.ok:
        raise SystemExit(f"warm-up job failed: {read_record(jobs[0]).get('error')}")
    note(f"warm-up job {warm_s:.1f}s")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_batch(jobs[1:], cache=cache, manifest=work / "manifest.json", jobs_file=str(jobs_file))
    if cuda:
        torch.cuda.synchronize()
    batch_s = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"timed jobs failed: {[read_record(jobs[i]).get('error') for i in result.failed]}")
    records = [read_record(job) for job in jobs[1:]]
    per_clip = [r["seconds"] for r in records]
    stages = {}
    for key in records[0].get("timings", {}):
        stages[key] = round(statistics.median(r["timings"][key] for r in records), 3)
    median = statistics.median(per_clip)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    clips_per_hour = 3600.0 / median
    out = {
        "bench": "batch", "mode": args.mode, "commit": git_commit(),
        "device": torch.cuda.get_device_name() if cuda else "cpu (tiny models)",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "shape": {"frames": frames, "height": size, "width": size}, "steps": steps, "guidance": 5.0,
        "jobs_timed": len(per_clip), "cams": cams[1:],
        "clip_s_median": round(median, 3), "clip_s_runs": [round(x, 3) for x in per_clip],
        "stage_s_median": stages,
        "clips_per_hour": round(clips_per_hour, 2),
        "clips_per_hour_wall": round(3600.0 * len(per_clip) / batch_s, 2),
        "warmup_job_s": round(warm_s, 2), "setup_s": round(setup_s, 1),
        "peak_mem_gib": round(peak, 2) if peak is not None else None,
        "depth": "from file (excluded)", "memory": memory, "compile": bool(args.compile and cuda),
    }
    if cuda:
        out["reference_clips_per_hour"] = round(REFERENCE_CLIPS_PER_HOUR, 1)
        out["ratio_vs_reference"] = round(clips_per_hour / REFERENCE_CLIPS_PER_HOUR, 3)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
