"""Peak memory of ``ex4d depth`` with an estimator, as the frame count grows.

Estimators read the clip frame by frame (Depth Anything) or window by window (DepthCrafter) and spill
their raw output to a temporary ``.npy`` for the clip-level min-max, so the peak should not grow with
the frame count. One subprocess per case: a 512x512 synthetic clip (FFV1, lossless) run through
``ex4d depth --depth depth-anything --resize keep --device cpu`` with *tiny random* Depth Anything
weights in the real on-disk layout (the model's cost is not what is measured; its input is still
518x518 per frame). The peak is the child's own ``VmHWM`` from /proc/self/status, read as it exits
(not ``ru_maxrss``, which Linux contaminates with the parent's resident size at exec time).
Prints one JSON object (DESIGN.md section 7): commit, device, versions, per case frames / peak RSS /
seconds.

    python bench/bench_depth_memory.py                        # 49 and 300 frames, Depth Anything
    python bench/bench_depth_memory.py --frames 49 300 1000 --estimator depthcrafter
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

DA_REPO = "depth-anything/Depth-Anything-V2-Small-hf"


def make_tiny_weights(root: Path, estimator: str) -> Path:
    """Tiny random weights in the real layouts under ``root`` (a --models-dir)."""
    import torch

    torch.manual_seed(0)
    if estimator == "depth-anything":
        from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

        backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
                                image_size=518, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                     neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
        DepthAnythingForDepthEstimation(config).save_pretrained(root / DA_REPO)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_depthcrafter import save_tiny_weights

        save_tiny_weights(root)
    return root


def run_case(folder: Path, models: Path, estimator: str, frames: int, size: int) -> dict:
    video = make_clip(folder, frames, size)
    out = folder / "out"
    peak_mb, seconds = run_ex4d(["depth", str(video), "--depth", estimator, "--models-dir", str(models),
                                 "--num-frames", str(frames), "--resize", "keep", "-o", str(out), "--device", "cpu"],
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    depth_npz = out / "depth.npz"
    with np.load(depth_npz) as archive:
        shape = list(archive["depth"].shape)
    leftovers = sorted(p.name for p in out.iterdir() if ".partial-" in p.name)
    return {"frames": frames, "size": [size, size], "peak_rss_mb": round(peak_mb, 1),
            "seconds": round(seconds, 1), "depth_shape": shape,
            "depth_npz_mb": round(depth_npz.stat().st_size / 2**20, 1),
            "whole_clip_float32_rgb_mb": round(frames * size * size * 3 * 4 / 2**20, 1),
            "temporaries_left": leftovers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 300])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--estimator", choices=["depth-anything", "depthcrafter"], default="depth-anything")
    args = parser.parse_args()
    import torch

    import ex4d

    commit = git_commit()
    cases = []
    with tempfile.TemporaryDirectory(prefix="ex4d-depth-memory-") as tmp:
        models = make_tiny_weights(Path(tmp) / "models", args.estimator)
        for frames in args.frames:
            case_dir = Path(tmp) / str(frames)
            case_dir.mkdir()
            cases.append(run_case(case_dir, models, args.estimator, frames, args.size))
            print(json.dumps(cases[-1]), file=sys.stderr)
    peaks = [c["peak_rss_mb"] for c in cases]
    print(json.dumps({
        "bench": "depth_memory", "commit": commit, "ex4d": str(Path(ex4d.__file__).parent),
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": f"ex4d depth clip --depth {args.estimator} (tiny random weights) --resize keep --device cpu",
        "cases": cases, "max_peak_rss_mb": max(peaks), "growth_mb": round(max(peaks) - min(peaks), 1),
        "goal_peak_rss_mb": 1536, "meets_goal": max(peaks) <= 1536,
        "note": "one run per case (peak memory, not a timing benchmark); seconds include process start",
    }, indent=1))


if __name__ == "__main__":
    main()
