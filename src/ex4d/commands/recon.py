"""``ex4d recon``: depth + DW-Mesh + render along a camera path -> color/mask/camera/mesh files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ex4d.commands.common import add_device_arg, progress

EPILOG = """examples:
  ex4d recon clip.mp4 --cam 90 -o out/                      # DepthCrafter depth, 90-degree orbit
  ex4d recon clip.mp4 --depth depth.npz --cam zoom_in -o out/
  ex4d recon clip.mp4 --depth depth-anything --cam orbit:yaw=60,pitch=15 -o out/
  ex4d recon clip.mp4 --depth depth.npz --cam path.json -o out/   # custom pose file (docs/trajectories.md)
"""


def add_recon_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``recon`` and ``run``."""
    parser.add_argument("video", help="input video (mp4/mov/mkv/...)")
    parser.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    from ex4d.camera.trajectory import TRAJECTORY_FORMS  # numpy only: cheap for --help

    parser.add_argument("--cam", default="90", help=f"camera path (default 90): {TRAJECTORY_FORMS}")
    parser.add_argument("--depth", default="depthcrafter",
                        help="depthcrafter (default, as in the paper), depth-anything (lighter), or a "
                             ".npz/.npy depth file (docs/depth.md)")
    parser.add_argument("--models-dir", default=None, help="folder with downloaded weights (docs/models.md)")
    parser.add_argument("--num-frames", type=int, default=49, help="frames to use from the start (default 49)")
    parser.add_argument("--resize", choices=["reference", "keep"], default="reference",
                        help="reference: multiples of 64, long side <= 1024 (default); keep: source size")
    parser.add_argument("--cap", choices=["none", "masked", "reference"], default="none",
                        help="closing cap faces of the DW-Mesh (docs/conventions.md); default none")
    parser.add_argument("--filter", choices=["angle", "boundary"], default="angle",
                        help="occlusion-face test: min angle < 2.5 deg (default) or the depth-gradient test")
    parser.add_argument("--stretch-test", action="store_true",
                        help="also apply the reference's unused 0.013 stretch test")
    parser.add_argument("--torn", action="store_true",
                        help="delete flagged faces instead (the non-watertight baseline, for comparison)")
    parser.add_argument("--only-first-frame", action="store_true", help="reuse frame 0's mesh for all frames")
    parser.add_argument("--save-mesh", choices=["none", "first", "all"], default="first",
                        help="write DW-Mesh.ply for frame 0 (default), every frame, or none")
    parser.add_argument("--antialias", choices=["analytic", "msaa", "none"], default="analytic",
                        help="edge antialiasing: analytic silhouette blend like the reference's (default), "
                             "4x MSAA, or none")
    parser.add_argument("--fps", type=float, default=None, help="output fps (default: the source's)")
    parser.add_argument("--resample", action="store_true",
                        help="resample a pose file whose pose count differs from --num-frames")
    from ex4d.commands.depth import add_depthcrafter_speed_args

    add_depthcrafter_speed_args(parser, short_names=False)
    add_device_arg(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "recon", help="depth + DW-Mesh render along a camera path (color/mask/camera/mesh)",
        description="Estimate depth (or read it), build one DW-Mesh per frame and render it along the "
                    "camera path. Writes color_<cam>.mp4, mask_<cam>.mp4, mask_<cam>.mkv (lossless), "
                    "camera_<cam>.npz, DW-Mesh.ply, depth.npz and recon_<cam>.json.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recon_args(parser)
    parser.set_defaults(func=main)


def recon_from_args(args) -> dict:
    """Run depth + reconstruction for parsed ``recon``/``run`` arguments; return written paths."""
    from ex4d.commands.depth import depthcrafter_options
    from ex4d.io.files import prepare_output_dir
    from ex4d.pipeline import ReconOptions, estimate_depth, load_clip, run_recon

    estimator_options = depthcrafter_options(args)  # checked before any work starts
    out_dir = prepare_output_dir(args.output)
    clip = load_clip(args.video, num_frames=args.num_frames, resize=args.resize)
    depth = estimate_depth(clip, args.depth, out_dir=out_dir, models_dir=args.models_dir, device=args.device,
                           progress=progress, estimator_options=estimator_options)
    options = ReconOptions(cam=args.cam, cap=args.cap, filter=args.filter, stretch_test=args.stretch_test,
                           watertight=not args.torn, only_first_frame=args.only_first_frame,
                           save_mesh=args.save_mesh, fps=args.fps, resample=args.resample,
                           antialias=args.antialias, device=args.device)
    return run_recon(clip, depth, out_dir, options,
                     progress=lambda it, **kw: progress(it, desc="render", unit="frame", **kw))


def main(args) -> int:
    written = recon_from_args(args)
    for role, path in written.items():
        print(f"{role:>14}: {Path(path)}", file=sys.stdout)
    return 0
