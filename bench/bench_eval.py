"""Benchmark ``ex4d eval`` on 49 frames at 512x512 (CPU): one JSON object on stdout.

Inputs: the synthetic ``boxes`` scene ray-cast along a 30-degree orbit (the exact novel view) as the
video, recon's condition render and mask (made once, not timed). Timed: evaluate_video + write_report
(camera following with PnP against depth.npz, PSNR/SSIM, DIS warping error, report files).
Median of 3 runs after a warm-up; peak RSS of this process. Goal: <= 20 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    import numpy as np

    from ex4d.cli import main as cli
    from ex4d.eval.evaluate import evaluate_video, write_report

    frames, size = 49, 512
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        assert cli(["synth", "-o", str(tmp / "ex"), "--num-frames", str(frames), "--size", f"{size}x{size}"]) == 0
        assert cli(["recon", str(tmp / "ex" / "video.mp4"), "--depth", str(tmp / "ex" / "depth.npz"), "--cam", "30",
                    "--num-frames", str(frames), "-o", str(tmp / "out")]) == 0
        out = tmp / "out"
        args = (out / "color_30.mp4", out / "camera_30.npz", out / "color_30.mp4", out / "mask_30.mkv")
        times, summary = [], None
        for run in range(4):  # first = warm-up
            start = time.perf_counter()
            summary, arrays = evaluate_video(*args)
            write_report(tmp / f"report{run}", summary, arrays)
            times.append(time.perf_counter() - start)
    import os

    import cv2

    commit = os.environ.get("EX4D_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                             capture_output=True, text=True).stdout.strip()

    cam = summary["camera_following"]
    print(json.dumps({
        "bench": "eval", "commit": commit, "device": f"cpu: {platform.processor() or platform.machine()}, "
                                                    f"{len(os.sched_getaffinity(0))} cores",
        "opencv": cv2.__version__, "numpy": np.__version__, "frames": frames, "size": [size, size],
        "median_s": round(statistics.median(times[1:]), 3), "runs_s": [round(t, 3) for t in times[1:]],
        "warmup_s": round(times[0], 3), "goal_s": 20.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "unregistered_fraction": cam["unregistered_fraction"], "rot_err_mean_deg": cam["rot_err_mean_deg"],
    }))


if __name__ == "__main__":
    sys.exit(main())
