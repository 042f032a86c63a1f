"""Video Depth Anything benchmark: full-size VDA-Small with random weights (no files needed), on CUDA.

Times :class:`ex4d.depth.vda.VideoDepthAnything` in two modes. ``stream`` is what ``ex4d depth --depth
vda`` runs: a lazy clip (frames read one at a time, preprocessed on the GPU, 32-frame windows with
stride 22 under fp16 autocast, keyframe alignment and cross-fade on the GPU, the raw disparity spilled
to a temporary file), then every depth frame read back (the clip-level normalisation to z-depth
happens as frames are read). ``memory``: a (T, H, W, 3) array in, z-depth arrays out, which is how
bench/bench_depth.py times DepthCrafter (so the two compare directly).
Cases (``--cases``, frames@HxW): 49@512x512, 49@576x1024 and 1000@512x512 (flat memory with length).
Each case: one warm-up, then the median of ``--repeats`` runs (the 1000-frame case ``--long-repeats``
times, 1 by default), peak GPU memory (``torch.cuda.max_memory_allocated``) and the process's peak
resident memory so far. Also the network alone on one 1x32x3x518x518 window, fp16 autocast and fp32
(the README's published setting: 7.5 / 9.1 ms per frame on an A100).

Goal: <= 0.8 s for 49 frames at 576x1024 (>= 4x faster than compiled DepthCrafter, 3.8 s;
>= 12x the reference DepthCrafter, 10.12 s), and flat memory with length.

    source bench/gpu_env.sh && python bench/bench_vda.py [--cases 49@512x512,...] [--repeats 3]
    python bench/bench_vda.py --tiny      # CPU smoke run: a toy model of the same classes

Prints one JSON object (the last line).
"""

from __future__ import annotations

import argparse
import os
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ex4d.depth.vda import VideoDepthAnything, input_size, num_windows  # noqa: E402
from ex4d.depth.vda_model import CONFIGS, VDAConfig, VideoDepthAnythingNet  # noqa: E402
from ex4d.types import Clip  # noqa: E402

GOALS = {"49@576x1024": {"total_s": 0.8}}
ANCHORS = {"49@576x1024": {"depthcrafter_reference_s": 10.12, "depthcrafter_compiled_s": 3.8}}
TINY = VDAConfig(32, 4, 2, (0, 1, 2, 3), 32, (32, 32, 32, 32), head_features_2=8)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_model(device, tiny: bool) -> VideoDepthAnythingNet:
    torch.manual_seed(0)
    with torch.device(device):
        model = VideoDepthAnythingNet(TINY if tiny else CONFIGS["vits"])
    with torch.no_grad():  # a positive output offset: random weights must not give a constant (all-zero) clip
        model.head.scratch.output_conv2[2].bias.fill_(1.0)
    return model.eval().requires_grad_(False)


def lazy_clip(num_frames: int, size: tuple[int, int]) -> Clip:
    """A clip read one frame at a time, cycling through 32 random frames (made once, not timed)."""
    pool = np.random.default_rng(0).random((32, *size, 3), dtype=np.float32)

    def reader():
        for k in range(num_frames):
            yield pool[k % len(pool)]

    return Clip(fps=24.0, source="bench", reader=reader, num_frames=num_frames, size=size)


def run_case(est: VideoDepthAnything, frames: int, size: tuple[int, int], repeats: int, device,
             mode: str) -> dict:
    """mode "stream": a lazy clip in, depth frames read back from the spill (what ex4d depth runs);
    "memory": a (T, H, W, 3) array in, (T, H, W) z-depth out (as bench_depth.py times DepthCrafter)."""
    array = np.random.default_rng(0).random((frames, *size, 3), dtype=np.float32) if mode == "memory" else None

    def once():
        with tempfile.TemporaryDirectory() as spill:
            _sync(device)
            t0 = time.perf_counter()
            if mode == "memory":
                depth = est.estimate(array)
                lo = float(depth.depth.min())
            else:
                depth = est.estimate(lazy_clip(frames, size), spill_dir=spill)
                lo = np.inf
                for k in range(frames):  # read every frame, as depth.npz writing does
                    lo = min(lo, float(depth.depth[k].min()))
            _sync(device)
            elapsed = time.perf_counter() - t0
            if mode != "memory":
                depth.depth.release()
        return elapsed, lo

    once()  # warm-up (allocator, kernels)
    _reset_peak(device)
    runs = [once() for _ in range(repeats)]
    times = [t for t, _ in runs]
    net_size = input_size(*size, target=est.input_size)
    return {"mode": mode, "frames": frames, "size": f"{size[0]}x{size[1]}", "input_size": list(net_size),
            "windows": num_windows(frames), "total_s": statistics.median(times), "runs_s": times,
            "per_frame_ms": 1000 * statistics.median(times) / frames, "peak_gib": _peak_gib(device),
            "host_peak_rss_gib_so_far": _rss_gib(), "nearest_z": runs[-1][1]}


def network_only(model, device, side: int, repeats: int) -> dict:
    """One 1x32x3xSxS window through the network (no pre/post-processing), fp16 autocast and fp32."""
    x = torch.randn(1, 32, 3, side, side, device=device)
    out = {}
    for name, dtype in (("fp16_autocast", torch.float16), ("fp32", None)):
        if device.type != "cuda" and dtype is not None:
            continue
        def step():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(x)
        step()
        _reset_peak(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = {"window_s": statistics.median(times), "per_frame_ms": 1000 * statistics.median(times) / 32,
                     "runs_s": times, "peak_gib": _peak_gib(device)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="49@512x512,49@576x1024,1000@512x512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=1, help="repeats of cases over 200 frames (default 1)")
    parser.add_argument("--commit", default=os.environ.get("EX4D_COMMIT") or os.environ.get("EX4D_GIT_COMMIT", ""),
                        help="commit id to record (default: $EX4D_COMMIT, else git HEAD)")
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU: a smoke test of this script")
    parser.add_argument("--budget-s", type=float, default=480, help="skip remaining cases after this long")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)  # a smoke run on a shared CPU: threads only contend
    start = time.perf_counter()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    model = build_model(device, args.tiny)
    # the default numerics: fp16 autocast on CUDA (as the reference), fp32 on the CPU
    est = VideoDepthAnything(model, device=device, input_size=42 if args.tiny else 518)
    report = {"bench": "vda", "commit": commit,
              "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
              "torch": torch.__version__, "model": "tiny" if args.tiny else "VDA-Small (vits), random weights",
              "params": sum(p.numel() for p in model.parameters()),
              "autocast": str(est.autocast).replace("torch.", "") if est.autocast else "float32",
              "results": [], "skipped": []}
    for case in args.cases.split(","):
        frames, size = case.split("@")
        H, W = (int(v) for v in size.split("x"))
        if args.tiny:
            frames, H, W = min(int(frames), 60), H // 8, W // 8
        if time.perf_counter() - start > args.budget_s:
            report["skipped"].append(case)
            continue
        long = int(frames) > 200
        for mode in ("stream",) if long else ("memory", "stream"):  # a long clip is only ever streamed
            row = run_case(est, int(frames), (H, W), args.long_repeats if long else args.repeats, device, mode)
            row["case"] = case
            if case in GOALS and not args.tiny:
                row["goal"] = GOALS[case]
                row["speedup_vs"] = {k: v / row["total_s"] for k, v in ANCHORS[case].items()}
            report["results"].append(row)
            print(json.dumps(row), file=sys.stderr)
    peaks = {r["frames"]: r["peak_gib"] for r in report["results"] if r["size"] == "512x512" and r["mode"] == "stream"}
    if device.type == "cuda" and len(peaks) >= 2:
        report["memory_long_over_short"] = peaks[max(peaks)] / peaks[min(peaks)]
    if time.perf_counter() - start < args.budget_s:
        report["network_only_1x32x518x518"] = network_only(model, device, 42 if args.tiny else 518, args.repeats)
    report["wall_s"] = time.perf_counter() - start
    print(json.dumps(report))


if __name__ == "__main__":
    main()
