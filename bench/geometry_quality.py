"""Geometry quality of DW-Mesh vs the torn-mesh baseline on synthetic scenes with exact ground truth.

For each scene x trajectory x variant the exact source depth goes through the real DW-Mesh build
and renderer (ex4d.render.condition.render_condition) and the condition is scored against the
analytic novel view (ex4d.eval.geometry): PSNR on mask = 1, false-visible rate (mask = 1 but the
surface is not observable from the source: background leaking), and mask recall of observable
pixels. Averages over frames 1..T-1. Prints ONE JSON object.

The figures are deterministic (no timing enters them); ``render_seconds`` per case is the
wall-clock of one render_condition call, for information only.

    python bench/geometry_quality.py                          # 256x256, 25 frames (a few minutes on 2 cores)
    python bench/geometry_quality.py --full                   # 512x512, 49 frames (the reference's setting)
    python bench/geometry_quality.py --scenes boxes --trajectories 30 --size 128x128 --num-frames 9
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import os
import subprocess
import sys
import time
from pathlib import Path


def git_commit() -> str:
    if os.environ.get("EX4D_COMMIT"):  # the device machine's copy of the tree may lack .git
        return os.environ["EX4D_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", default="planes,boxes,spheres_moving", help="comma-separated scene names")
    parser.add_argument("--trajectories", default="30,60,90", help="comma-separated --cam specs")
    parser.add_argument("--size", default="256x256", help="HxW (default 256x256)")
    parser.add_argument("--num-frames", type=int, default=25, help="frames (default 25)")
    parser.add_argument("--full", action="store_true", help="the reference's setting: 512x512, 49 frames")
    parser.add_argument("--cap", default="none", choices=["none", "masked", "reference"])
    parser.add_argument("--filter", default="angle", choices=["angle", "boundary"])
    parser.add_argument("--device", default="cpu", help="where meshes are built (cpu, cuda)")
    parser.add_argument("--per-frame", action="store_true", help="include per-frame figures")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)

    import torch

    from ex4d.commands.synth import parse_size
    from ex4d.eval.geometry import evaluate_scene, summarize

    size = (512, 512) if args.full else parse_size(args.size)
    num_frames = 49 if args.full else args.num_frames
    scenes = [s for s in args.scenes.split(",") if s]
    trajectories = [t for t in args.trajectories.split(",") if t]

    start = time.perf_counter()
    results = []
    for scene in scenes:
        results += evaluate_scene(scene, trajectories, num_frames=num_frames, size=size, cap=args.cap,
                                  filter=args.filter, device=args.device)
    elapsed = time.perf_counter() - start
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    report = {
        "bench": "geometry_quality",
        "git_commit": git_commit(),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "size": list(size),
        "num_frames": num_frames,
        "frames_averaged": f"1..{num_frames - 1}",
        "mesh": {"cap": args.cap, "filter": args.filter},
        "scenes": scenes,
        "trajectories": trajectories,
        "cases": [r.as_dict(per_frame=args.per_frame) for r in results],
        "summary": summarize(results),
        "total_seconds": round(elapsed, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "anchor": "none: the reference publishes no geometry figures; compare dwmesh with torn",
    }
    text = json.dumps(report, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
