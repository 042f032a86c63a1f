"""Peak memory of ``ex4d recon`` with a depth file as input, as the frame count grows.

One subprocess per case (a 512x512 synthetic clip, lossless, and a float32 ``.npy`` depth of the same
length), run to completion; its peak resident memory is the kernel's high-water mark of the child's
own address space (``VmHWM`` of /proc/self/status, read by the child as it exits). Not ``ru_maxrss``:
Linux folds the *parent's* resident size at exec time into a child's ``ru_maxrss``, which made this
bench report the memory of the inputs it had just written (1.28 GB at 1000 frames for a recon that
peaks at 0.80 GB). Prints one JSON object (DESIGN.md section 7): commit, device, versions,
per case frames / peak RSS / seconds, and the goal (<= 1.5 GB at 512x512 for any frame count).

    python bench/bench_recon_memory.py                  # 49, 300 and 1000 frames
    python bench/bench_recon_memory.py --frames 49 300 --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from peak_memory import git_commit, make_clip, run_ex4d


def make_inputs(folder: Path, frames: int, size: int) -> tuple[Path, Path]:
    """A moving checkerboard clip (FFV1) and a two-plane z-depth .npy, written frame by frame."""
    video = make_clip(folder, frames, size)
    depth = folder / f"depth_{frames}.npy"
    array = np.lib.format.open_memmap(depth, mode="w+", dtype=np.float32, shape=(frames, size, size))
    for k in range(frames):
        frame = np.full((size, size), 8.0, np.float32)
        frame[size // 3: 2 * size // 3, size // 3 + k % 16: 2 * size // 3] = 3.0
        array[k] = frame
    array.flush()
    del array
    return video, depth


def run_case(folder: Path, frames: int, size: int) -> dict:
    video, depth = make_inputs(folder, frames, size)
    out = folder / f"out_{frames}"
    peak_mb, seconds = run_ex4d(["recon", str(video), "--depth", str(depth), "--cam", "30", "--num-frames",
                                 str(frames), "--resize", "keep", "-o", str(out), "--device", "cpu"])
    return {"frames": frames, "size": [size, size], "peak_rss_mb": round(peak_mb, 1),
            "seconds": round(seconds, 1), "seconds_per_frame": round(seconds / frames, 3),
            "depth_file_mb": round(depth.stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 300, 1000])
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    import torch

    commit = git_commit()
    cases = []
    with tempfile.TemporaryDirectory(prefix="ex4d-recon-memory-") as tmp:
        for frames in args.frames:
            case_dir = Path(tmp) / str(frames)
            case_dir.mkdir()
            cases.append(run_case(case_dir, frames, args.size))
            print(json.dumps(cases[-1]), file=sys.stderr)
    peak = max(c["peak_rss_mb"] for c in cases)
    print(json.dumps({
        "bench": "recon_memory", "commit": commit,
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": "ex4d recon clip --depth depth.npy --cam 30 --resize keep --device cpu",
        "cases": cases, "goal_peak_rss_mb": 1536, "max_peak_rss_mb": peak, "meets_goal": peak <= 1536,
        "note": "one run per case (peak memory, not a timing benchmark); seconds include process start",
    }, indent=1))


if __name__ == "__main__":
    main()
