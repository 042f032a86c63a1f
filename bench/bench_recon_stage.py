"""The recon stage alone, as the pipeline runs it, split into its parts (no models to build).

``ex4d.pipeline.run_recon`` on a synthetic clip (a moving checkerboard, lossless) with an exact depth
file: DW-Mesh per frame, render along ``--cam``, the three condition encodes, frame 0's PLY and the
record, into a fresh folder each run. The parts are bench_e2e.py's ``recon_parts_s_median`` (renderer
set-up, render loop with mesh build / the renderer's stage, gl and antialias / finish_frame / waits on
the read-ahead, handing frames to the encoders, the encoders' finish, the depth's hash), so a GPU
machine can show where recon's time goes without building the 14B model first.

``--torch-threads N`` sets torch's CPU threads for the whole run (0: torch's default), to see
whether torch's CPU ops in the loop compete with the encoders' threads; ``--loop-torch-threads N``
sets only the render loop's (``ex4d.render.condition.CUDA_LOOP_TORCH_THREADS``, meshes on a GPU).
``--no-loop-overlap`` finishes each rendered frame in line instead of on a helper thread
(``CUDA_LOOP_OVERLAP``, meshes on a GPU); ``--loop-finish-threads N`` sets how many helper threads
finish frames (``CUDA_LOOP_FINISH_THREADS``).
``--condition-lookahead N`` sets libx264's rate-control look-ahead of the condition videos
(``ex4d.io.video.CONDITION_H264_LOOKAHEAD``, 0 for preset medium's 40); ``--x264-lookahead N`` that of
other videos (``H264_LOOKAHEAD``).

Prints ONE JSON object: commit, device, CPU count, median recon seconds and its parts.

  python bench/bench_recon_stage.py                      # 49 frames at 512x512, --cam 90, 5 runs
  python bench/bench_recon_stage.py --frames 9 --size 64 --runs 2   # quick CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from bench_e2e import (Stages, add_recon_setting_args, apply_recon_settings, stage_medians,  # noqa: E402
                       time_recon_parts)
from bench_generate import git_commit, note  # noqa: E402
from peak_memory import make_clip  # noqa: E402


def synthetic_depth(frames: int, size: int) -> np.ndarray:
    """(T, H, W) float32: a slanted background with a box in front that moves, so every frame has depth
    edges for the DW-Mesh to flag."""
    u, v = np.meshgrid(np.arange(size), np.arange(size))
    depth = np.empty((frames, size, size), np.float32)
    for k in range(frames):
        depth[k] = 6.0 + 2.0 * v / size
        box = (abs(u - size // 3 - k * size // (4 * frames)) < size // 6) & (abs(v - size // 2) < size // 5)
        depth[k][box] = 3.0
    return depth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", type=int, default=512, help="square side (default 512)")
    parser.add_argument("--cam", default="90")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (default 5)")
    parser.add_argument("--device", default="auto", help="where the meshes are built (default auto: CUDA if any)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_recon_setting_args(parser)
    args = parser.parse_args(argv)
    from ex4d.pipeline import ReconOptions, estimate_depth, load_clip, run_recon

    recon_settings = apply_recon_settings(args)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    work = Path(tempfile.mkdtemp(prefix="ex4d_recon_stage_"))
    video = make_clip(work, args.frames, args.size)
    np.savez(work / "depth.npz", depth=synthetic_depth(args.frames, args.size))
    clip = load_clip(video, num_frames=args.frames, resize="keep")
    depth = estimate_depth(clip, str(work / "depth.npz"))
    stages = Stages(cuda)
    time_recon_parts(stages)
    options = ReconOptions(cam=args.cam, device=args.device)
    start = time.perf_counter()
    run_recon(clip, depth, work / "warmup", options)
    note(f"warm-up run {time.perf_counter() - start:.2f}s")
    record = json.loads(next((work / "warmup").glob("recon_*.json")).read_text())
    renderer = record.get("render", {}).get("renderer", "unknown")
    stages.clear()
    for i in range(args.runs):
        stages.run("recon", run_recon, clip, depth, work / f"run{i}", options)
        note(f"run {i + 1}: {stages.times['recon'][-1]:.3f}s")
    parts = {k: v for k, v in stage_medians(stages.times, args.runs).items() if k.startswith("recon.")}
    result = dict(
        bench="recon_stage", commit=git_commit(),
        device=torch.cuda.get_device_name() if cuda else "cpu", cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(), **recon_settings, renderer=renderer, frames=args.frames, size=args.size, cam=args.cam,
        mesh_device=args.device, runs=args.runs,
        recon_s_median=round(statistics.median(stages.times["recon"]), 3),
        recon_s_runs=[round(t, 3) for t in stages.times["recon"]],
        parts_s_median={k.split(".", 1)[1] + "_s": round(v, 3) for k, v in sorted(parts.items())},
        per_frame_ms={k.split(".", 1)[1]: round(1000 * v / args.frames, 2) for k, v in sorted(parts.items())},
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
