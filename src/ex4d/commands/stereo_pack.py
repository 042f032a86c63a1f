"""``ex4d stereo-pack``: left + right eye videos -> side-by-side, top-bottom and anaglyph files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  ex4d recon clip.mp4 --depth depth.npz --cam stereo -o out/
  ex4d stereo-pack out/left_stereo.mp4 out/color_stereo.mp4 -o out/packed    # offline: the rendered right eye
  ex4d stereo-pack left.mp4 right.mp4 -o packed --layouts sbs-half,anaglyph --container mp4
Writes <prefix>_<layout>.<container> for each layout: sbs (H x 2W), sbs-half (H x W, each eye squeezed
to half width), tb (2H x W, left on top), anaglyph (red-cyan, Dubois). Packed files carry the H.264
frame-packing SEI; .mkv files also the Matroska StereoMode (docs/stereo.md). The two videos must agree
in frame count, size and fps.
"""


def register(subparsers) -> None:
    from ex4d.stereo.pack import CONTAINERS, LAYOUTS

    parser = subparsers.add_parser(
        "stereo-pack", help="pack left/right eye videos into side-by-side, top-bottom and anaglyph files",
        description="Pack a left and a right eye video (e.g. the source and ex4d's --cam stereo output) into "
                    "the frame-packed layouts that VR headsets and 3D displays play.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("left", help="left eye video (for --cam stereo: left_<cam>.mp4 of recon, or the source)")
    parser.add_argument("right", help="right eye video (color_<cam>.mp4 of recon, or ex4d_<cam>.mp4 of run)")
    parser.add_argument("-o", "--output", required=True, help="output folder (created if needed); required")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated layouts to write, from {', '.join(LAYOUTS)} (default: all of them)")
    parser.add_argument("--container", choices=CONTAINERS, default="mkv",
                        help="mkv (default: Matroska StereoMode + H.264 frame-packing SEI) or mp4 (the SEI only)")
    parser.add_argument("--prefix", default=None,
                        help="file name prefix (default: the right video's file name without its suffix)")
    parser.add_argument("--crf", type=int, default=16, help="H.264 quality, 0 (lossless) to 51 (default 16)")
    parser.set_defaults(func=main)


def main(args) -> int:
    from ex4d.commands.common import check_int
    from ex4d.io.files import prepare_output_dir, protect_inputs
    from ex4d.stereo.pack import pack_videos, parse_layouts

    protect_inputs(args.left, args.right)
    parse_layouts(args.layouts)  # before any work
    check_int(args.crf, "--crf", 0, 51, example=16)
    out_dir = prepare_output_dir(args.output)
    written = pack_videos(args.left, args.right, out_dir, layouts=args.layouts, prefix=args.prefix,
                          container=args.container, crf=args.crf)
    for layout, path in written.items():
        print(f"{layout:>14}: {Path(path)}", file=sys.stdout)
    return 0
