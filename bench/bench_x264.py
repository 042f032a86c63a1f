"""H.264 encoding of a 49-frame 512x512 render-like clip with libx264's thread count varied.

ex4d encodes every H.264 video with a fixed thread count (``ex4d.io.video.H264_THREADS``, 4: the
bytes depend on it, so it must not follow the machine). With ``preset medium`` x264 looks 40
frames ahead, so for a 49-frame clip most of the work waits for the end of the video, where frame
threads are what runs in parallel. This measures, for each thread count: one encode alone, and
three at once on threads of their own (what ``ex4d recon`` does with its colour and mask videos),
with the size and the PSNR against the frames.

``--lookahead 40,20`` also varies x264's rate-control look-ahead (``ex4d.io.video.H264_LOOKAHEAD``),
``--content render,noise`` adds uniform noise (what random generator weights decode to), and
``--stream-over S`` times a background writer fed one frame every S / T seconds (as a renderer or
the VAE decoder hands them over): ``tail_s`` is what is left to wait after the last frame.

  python bench/bench_x264.py                # ~20 s on 16 cores
  python bench/bench_x264.py --threads 4,8 --repeats 1
  python bench/bench_x264.py --threads 4 --lookahead 40,20,10 --content render,noise --stream-over 0.55
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from bench_generate import git_commit, note  # noqa: E402


def render_like_clip(frames: int = 49, size: int = 512) -> np.ndarray:
    """(T, H, W, 3) uint8: textured moving discs over a gradient, with a black region that grows (unseen parts)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = rng.random((size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        image = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + t / 8)], -1) * 0.6 + texture * 0.4
        for k in range(4):
            cx, cy = 0.5 + 0.3 * np.cos(t / 10 + k), 0.5 + 0.3 * np.sin(t / 12 + 2 * k)
            disc = (x - cx) ** 2 + (y - cy) ** 2 < 0.01
            image[disc] = texture[disc] * 0.5 + 0.5
        image[:, : int(size * t / (2 * frames))] = 0.0  # the region no camera saw
        out[t] = (image.clip(0, 1) * 255).astype(np.uint8)
    return out


def noise_clip(frames: int = 49, size: int = 512) -> np.ndarray:
    """(T, H, W, 3) uint8 uniform noise."""
    return np.random.default_rng(1).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def streamed_tail(path: Path, clip: np.ndarray, seconds: float) -> float:
    """Feed a background writer one frame every ``seconds / T``; seconds from the last frame handed over
    to the file being complete."""
    from ex4d.io.video import VideoWriter

    interval = seconds / len(clip)
    with VideoWriter(path, 30, background=True) as writer:
        start = time.perf_counter()
        for k, frame in enumerate(clip):
            delay = start + k * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            writer.write(frame)
        last = time.perf_counter()
    return time.perf_counter() - last


def encode(path: Path, clip: np.ndarray) -> float:
    from ex4d.io.video import write_video

    start = time.perf_counter()
    write_video(path, clip, fps=30)
    return time.perf_counter() - start


def psnr(path: Path, clip: np.ndarray) -> float:
    from ex4d.io.video import read_video

    decoded, _ = read_video(path)
    mse = np.mean((decoded.astype(np.float64) - clip.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="4,8,16", help="comma list of x264 thread counts (default 4,8,16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes per case (default 3)")
    parser.add_argument("--lookahead", default="40", help="comma list of rc-lookahead values (default 40, the preset's)")
    parser.add_argument("--content", default="render", help="comma list of render, noise (default render)")
    parser.add_argument("--stream-over", type=float, default=0.0,
                        help="also time a background writer fed over this many seconds (0: not)")
    args = parser.parse_args(argv)
    import ex4d.io.video as video

    clips = {"render": render_like_clip, "noise": noise_clip}
    result = dict(bench="x264", commit=git_commit(), cpus=os.cpu_count(), frames=49, size=[512, 512],
                  preset="medium", crf=16, stream_over_s=args.stream_over, cases={})
    with tempfile.TemporaryDirectory() as tmp:
        for content in args.content.split(","):
            clip = clips[content]()
            for lookahead in [int(v) for v in args.lookahead.split(",")]:
                video.H264_LOOKAHEAD = lookahead
                for threads in [int(t) for t in args.threads.split(",")]:
                    video.H264_THREADS = threads
                    alone, together, tails = [], [], []
                    tag = f"{content}_{lookahead}_{threads}"
                    for r in range(args.repeats):
                        alone.append(encode(Path(tmp) / f"a{tag}_{r}.mp4", clip))
                        workers = [threading.Thread(target=encode, args=(Path(tmp) / f"t{tag}_{r}_{i}.mp4", clip))
                                   for i in range(3)]
                        start = time.perf_counter()
                        for w in workers:
                            w.start()
                        for w in workers:
                            w.join()
                        together.append(time.perf_counter() - start)
                        if args.stream_over > 0:
                            tails.append(streamed_tail(Path(tmp) / f"s{tag}_{r}.mp4", clip, args.stream_over))
                    sample = Path(tmp) / f"a{tag}_0.mp4"
                    case = {"content": content, "lookahead": lookahead, "threads": threads,
                            "one_s": round(statistics.median(alone), 3),
                            "three_at_once_s": round(statistics.median(together), 3),
                            "bytes": sample.stat().st_size, "psnr_db": round(psnr(sample, clip), 2)}
                    if tails:
                        case["tail_s"] = round(statistics.median(tails), 3)
                    result["cases"][tag] = case
                    note(f"{tag}: {case}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
