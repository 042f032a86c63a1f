"""The generator's CPU work around the models: loading the condition and writing the final video.

``ex4d generate`` (and ``run``, ``batch``, the app) reads the rendered colour video and lossless
mask into the generator's inputs (``ex4d.diffusion.conditioning.load_condition``: decode, binarise,
erode, scale) and, after sampling, encodes the frames into the final mp4
(``ex4d.io.video.write_video``). In ``bench/bench_e2e.py`` both sit in ``generate_io``. This times
them alone on a render-like 49-frame 512x512 pair written as ``ex4d recon`` writes it
(``ConditionWriter``), and the final encode of random noise frames too (what random-weight models
generate): median of ``--repeats`` after one warm-up. Prints ONE JSON object with the commit, the
CPU count, torch's thread count and the peak resident memory.

  python bench/bench_condition_io.py                  # ~30 s on 2 cores
  EX4D_COMMIT=abc1234 python bench/bench_condition_io.py --src /other/checkout/src   # another version
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_generate import git_commit, note  # noqa: E402
from bench_x264 import render_like_clip  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: imports, first allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=49, help="default 49 (4k+1)")
    parser.add_argument("--size", type=int, default=512, help="square frames of this side (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (default 5)")
    parser.add_argument("--src", default=None, help="import ex4d from this src/ folder (another checkout) instead")
    args = parser.parse_args(argv)
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import torch

    import ex4d
    from ex4d.diffusion.conditioning import load_condition
    from ex4d.io.video import write_video
    from ex4d.types import ConditionWriter

    clip = render_like_clip(args.frames, args.size)
    visible = clip.any(axis=-1)
    visible[0] = True  # frame 0 is the source view, fully visible
    result = dict(bench="condition_io", commit=git_commit(), ex4d=str(Path(ex4d.__file__).parent), device="cpu",
                  cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), frames=args.frames,
                  size=[args.size, args.size], repeats=args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        with ConditionWriter(tmp, "bench", 30.0) as writer:
            for colour, mask in zip(clip, visible):
                writer.write(colour.astype(np.float32) / 255.0 * mask[..., None], mask)
        color_path = writer.paths["color"]
        load_s = timed(lambda: load_condition(color_path, None, size=(args.size, args.size),
                                              num_frames=args.frames, seed=0), args.repeats)
        note(f"load_condition {load_s:.3f}s")
        count = iter(range(10**6))
        write_s = timed(lambda: write_video(Path(tmp) / f"out{next(count)}.mp4", clip, fps=30.0), args.repeats)
        note(f"write_video {write_s:.3f}s")
        # What random-weight models generate (bench_e2e.py): x264 spends far longer on noise.
        noise = np.random.default_rng(0).integers(0, 256, clip.shape, dtype=np.uint8)
        noise_s = timed(lambda: write_video(Path(tmp) / f"out{next(count)}.mp4", noise, fps=30.0), args.repeats)
        note(f"write_video of noise {noise_s:.3f}s")
    result.update(load_condition_s_median=round(load_s, 3), write_video_s_median=round(write_s, 3),
                  write_video_noise_s_median=round(noise_s, 3),
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
