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
  ex4d run my_video.mp4 --cam stereo -o out/ --models-dir models   # right eye + packed 3D files (docs/stereo.md)
Stages whose outputs already exist and match their inputs and settings are skipped: depth.npz is
reused, and ex4d_<cam>.mp4 is regenerated only if the renders or the generation settings changed.
--fps sets the frame rate of every video run writes (default: the source video's).
With --cam stereo, run also packs the source (left) and the generated right eye into
ex4d_<cam>_<layout>.<container> files (side by side, half width, top-bottom, anaglyph).
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
    from ex4d.stereo.pack import CONTAINERS, LAYOUTS

    parser.add_argument("--stereo-layouts", default=",".join(LAYOUTS),
                        help=f"with --cam stereo: packed layouts to write, from {', '.join(LAYOUTS)} (default: all)")
    parser.add_argument("--stereo-container", choices=CONTAINERS, default="mkv",
                        help="with --cam stereo: container of the packed files, mkv (default; Matroska StereoMode) "
                             "or mp4")
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
    from ex4d.camera.trajectory import check_spec, is_stereo_spec, trajectory_name
    from ex4d.io.files import check_outputs, require_file

    require_file(args.video, "input video")  # protected as an input from here on
    check_spec(args.cam, num_frames=args.num_frames, resample=args.resample)
    name = trajectory_name(args.cam)
    packed = {}
    if is_stereo_spec(args.cam):
        from ex4d.stereo.pack import output_paths, parse_layouts

        packed = output_paths(args.output, f"ex4d_{name}", parse_layouts(args.stereo_layouts), args.stereo_container)
    check_outputs([Path(args.output) / f"ex4d_{name}.mp4", Path(args.output) / f"ex4d_{name}.json",
                   *packed.values()])
    written = recon_from_args(args, generation_follows=True)
    color = Path(written["color"])
    mask = Path(written["mask_lossless"])
    output = color.with_name(color.name.replace("color_", "ex4d_", 1))
    current = generation_is_current(output, color, mask, options)
    if current:
        print(f"{'video':>14}: {output} (up to date)", file=sys.stdout)
        if not packed:
            return 0
    else:
        from ex4d.commands.common import progress

        output = run_generate(color, mask, output, options, progress=progress)
        for role, path in {**written, "video": output}.items():
            print(f"{role:>14}: {Path(path)}", file=sys.stdout)
    if packed:
        from ex4d.io.files import is_ex4d_file

        if current and all(is_ex4d_file(path) for path in packed.values()):
            print(f"{'stereo':>14}: {', '.join(str(p) for p in packed.values())} (up to date)", file=sys.stdout)
            return 0
        from ex4d.stereo.pack import pack_generated

        for layout, path in pack_generated(written["left"], output, packed).items():
            print(f"{layout:>14}: {Path(path)}", file=sys.stdout)
    return 0
