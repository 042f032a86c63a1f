"""``ex4d synth``: write a synthetic example clip and its exact depth (the offline demo input)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  ex4d synth -o example && ex4d recon example/video.mp4 --depth example/depth.npz --cam 90 -o example/out
  ex4d synth -o spheres --scene spheres_moving --num-frames 49 --size 512x512
"""


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or a single ``"N"`` for N x N) -> (H, W); both even, 16 to MAX_SYNTH_SIDE (H.264 needs even)."""
    from ex4d.commands.common import MAX_SYNTH_SIDE
    from ex4d.errors import InputError

    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            height = width = int(parts[0])
        elif len(parts) == 2:
            height, width = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise InputError(f"--size must look like 512x512 (HxW), got {text!r}") from None
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise InputError(f"--size {text}: H and W must be even and at least 16 (H.264 needs even sizes)")
    if height > MAX_SYNTH_SIDE or width > MAX_SYNTH_SIDE:
        raise InputError(f"--size {text}: at most {MAX_SYNTH_SIDE} a side (memory grows with the square of the "
                         f"size); give e.g. --size 512x512")
    return height, width


def register(subparsers) -> None:
    from ex4d.commands.common import MAX_FPS, MAX_SYNTH_FRAMES, MAX_SYNTH_SIDE, MIN_FPS
    from ex4d.synthetic.scenes import SCENES

    parser = subparsers.add_parser(
        "synth", help="write a synthetic example video and its exact depth (offline demo and tests)",
        description="Ray-cast a procedural scene from a static camera (f = 500 px, principal point at the "
                    "image centre, as the reference assumes) and write video.mp4 (H.264) and depth.npz "
                    "(exact z-depth, K included) into the output folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    parser.add_argument("--scene", default="boxes", choices=sorted(SCENES),
                        help="scene to render (default boxes; spheres_moving has moving objects)")
    parser.add_argument("--num-frames", type=int, default=49,
                        help=f"number of frames, 1 to {MAX_SYNTH_FRAMES} (default 49)")
    parser.add_argument("--size", default="512x512",
                        help=f"frame size HxW, even, 16 to {MAX_SYNTH_SIDE} a side (default 512x512)")
    parser.add_argument("--fps", type=float, default=15.0,
                        help=f"frame rate written to video.mp4, {MIN_FPS:g} to {MAX_FPS:g} (default 15)")
    parser.set_defaults(func=main)


def main(args) -> int:
    from ex4d.commands.common import MAX_SYNTH_FRAMES, check_fps, check_int, progress
    from ex4d.io.files import check_outputs, prepare_output_dir
    from ex4d.io.video import to_uint8, write_video
    from ex4d.synthetic.scenes import make_example

    size = parse_size(args.size)
    check_int(args.num_frames, "--num-frames", 1, MAX_SYNTH_FRAMES, example=49)
    check_fps(args.fps, default="the default is 15")
    out_dir = prepare_output_dir(args.output)
    check_outputs([out_dir / "video.mp4", out_dir / "depth.npz"])  # before rendering, not after
    clip, depth = make_example(args.scene, num_frames=args.num_frames, size=size, fps=args.fps,
                               progress=lambda it: progress(it, desc=f"synth {args.scene}", unit="frame"))
    video = write_video(out_dir / "video.mp4", to_uint8(clip.frames), clip.fps)
    depth_path = depth.save(out_dir / "depth.npz")
    print(f"{'video':>6}: {video}", file=sys.stdout)
    print(f"{'depth':>6}: {depth_path}", file=sys.stdout)
    return 0
