"""``ex4d run``: depth -> reconstruction -> generation in one command, skipping finished stages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ex4d.commands.generate import add_generation_args, options_from_args
from ex4d.commands.recon import add_recon_args, recon_from_args

EPILOG = """examples:
  ex4d run my_video.mp4 --cam 90 -o out/ --models-dir models            # DepthCrafter depth, 90-degree orbit
  ex4d run my_video.mp4 --cam zoom_in --depth depth-anything -o out/ --models-dir models --low-vram
  ex4d run my_video.mp4 --cam 60 --num-frames 145 -o out/ --models-dir models   # 145 frames in windows
Stages whose outputs already exist and match their inputs and settings are skipped: depth.npz is
reused, and ex4d_<cam>.mp4 is regenerated only if the renders or the generation settings changed.
--fps sets the frame rate of every video run writes (default: the source video's).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="depth + reconstruction + generation end to end",
        description="Re-film VIDEO along --cam: estimate depth, render the DW-Mesh along the path, then fill "
                    "in what no camera saw with Wan2.1-I2V-14B + the EX-4D adapter. Writes everything "
                    "`ex4d recon` writes plus ex4d_<cam>.mp4 (and its .json record) to -o.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recon_args(parser, generation_follows=True)
    add_generation_args(parser, with_recon=True)
    parser.set_defaults(func=main)


def main(args) -> int:
    from ex4d.pipeline import generation_is_current, run_generate

    old_out_fps = args.gen_fps is not None  # the old --out-fps: the generated video's rate only
    if not old_out_fps:
        args.gen_fps = args.fps  # None: the renders' rate, which is the source's unless --fps
    options = options_from_args(args)  # checks the generation flags before any work starts
    if old_out_fps:
        print("warning: --out-fps is deprecated; --fps now sets the frame rate of every video run writes "
              "(default: the source's)", file=sys.stderr)
    if args.num_frames > options.window:
        from ex4d.diffusion.long_video import plan_windows

        plan_windows(args.num_frames, options.window, options.overlap)
    from ex4d.camera.trajectory import check_spec, trajectory_name
    from ex4d.io.files import check_outputs, require_file

    require_file(args.video, "input video")  # protected as an input from here on
    check_spec(args.cam, num_frames=args.num_frames, resample=args.resample)
    name = trajectory_name(args.cam)
    check_outputs([Path(args.output) / f"ex4d_{name}.mp4", Path(args.output) / f"ex4d_{name}.json"])
    written = recon_from_args(args, generation_follows=True)
    color = Path(written["color"])
    mask = Path(written["mask_lossless"])
    output = color.with_name(color.name.replace("color_", "ex4d_", 1))
    if generation_is_current(output, color, mask, options):
        print(f"{'video':>14}: {output} (up to date)", file=sys.stdout)
        return 0
    from ex4d.commands.common import progress

    output = run_generate(color, mask, output, options, progress=progress)
    for role, path in {**written, "video": output}.items():
        print(f"{role:>14}: {Path(path)}", file=sys.stdout)
    return 0
