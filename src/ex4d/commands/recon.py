"""``ex4d recon``: depth + DW-Mesh + render along a camera path -> color/mask/camera/mesh files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ex4d.commands.common import (
    MAX_FPS,
    MAX_RECON_PIXELS,
    MIN_FPS,
    add_device_arg,
    check_4k1,
    check_fps,
    check_int,
    progress,
)

EPILOG = """examples:
  ex4d recon clip.mp4 --cam 90 -o out/                      # DepthCrafter depth, 90-degree orbit
  ex4d recon clip.mp4 --depth depth.npz --cam zoom_in -o out/
  ex4d recon clip.mp4 --depth depth-anything --cam orbit:yaw=60,pitch=15 -o out/
  ex4d recon clip.mp4 --depth depth.npz --cam path.json -o out/   # custom pose file (docs/trajectories.md)
"""


def add_recon_args(parser: argparse.ArgumentParser, *, generation_follows: bool = False) -> None:
    """Arguments shared by ``recon`` and ``run`` (``generation_follows``: ``run``, whose --num-frames must be 4k+1)."""
    parser.add_argument("video", help="input video (mp4/mov/mkv/...)")
    parser.add_argument("-o", "--output", required=True, help="output folder (created if needed); required")
    from ex4d.camera.trajectory import TRAJECTORY_FORMS  # numpy only: cheap for --help

    parser.add_argument("--cam", default="90", help=f"camera path (default 90): {TRAJECTORY_FORMS}")
    parser.add_argument("--depth", default="depthcrafter",
                        help="depthcrafter (default, as in the paper; research licence), depth-anything (lighter), "
                             "vda (Video Depth Anything Small: fast, Apache-2.0), vda-metric (the same in metres), "
                             "vda-base/vda-large/vda-metric-base/vda-metric-large (non-commercial), or a "
                             ".npz/.npy depth file (docs/depth.md)")
    parser.add_argument("--models-dir", default=None,
                        help="folder with downloaded weights (default: the Hugging Face cache; docs/models.md)")
    frames_rule = ", 4k+1 (..., 45, 49, 53, ...) because generation follows" if generation_follows else \
        " (at least 1; 4k+1 such as 49 if you will run ex4d generate on the result)"
    parser.add_argument("--num-frames", type=int, default=49,
                        help=f"frames to use from the start of the video{frames_rule} (default 49)")
    parser.add_argument("--resize", choices=["reference", "keep"], default="reference",
                        help=f"reference: multiples of 64, long side <= 1024 (default); keep: source size, at most "
                             f"{MAX_RECON_PIXELS / 1e6:.1f} megapixels (4096x2160)")
    parser.add_argument("--cap", choices=["none", "masked", "reference"], default="none",
                        help="closing cap faces of the DW-Mesh (docs/conventions.md); default none")
    parser.add_argument("--filter", choices=["angle", "boundary"], default="angle",
                        help="occlusion-face test: min angle < 2.5 deg (default) or the depth-gradient test")
    parser.add_argument("--stretch-test", action="store_true",
                        help="also apply the reference's unused 0.013 stretch test (default off)")
    parser.add_argument("--torn", action="store_true",
                        help="delete flagged faces instead (the non-watertight baseline, for comparison; default off)")
    parser.add_argument("--only-first-frame", action="store_true",
                        help="reuse frame 0's mesh for all frames (default: one mesh per frame)")
    parser.add_argument("--save-mesh", choices=["none", "first", "all"], default="first",
                        help="write DW-Mesh.ply for frame 0 (default first), every frame (all), or none")
    parser.add_argument("--antialias", choices=["analytic", "msaa", "none"], default="analytic",
                        help="edge antialiasing: analytic silhouette blend like the reference's (default), "
                             "4x MSAA, or none")
    parser.add_argument("--pixel-convention", choices=["centers", "reference"], default="centers",
                        help="centers: integer pixel coordinates are pixel centres, an identity camera re-renders "
                             "the source exactly (default); reference: integer coordinates on pixel corners, as the "
                             "reference's renderer (renders shift by half a pixel; docs/conventions.md)")
    what = "every video run writes (renders and the generated video)" if generation_follows else \
        "the videos recon writes"
    parser.add_argument("--fps", type=float, default=None,
                        help=f"frame rate of {what}, {MIN_FPS:g} to {MAX_FPS:g} (default: the source video's)")
    parser.add_argument("--resample", action="store_true",
                        help="resample a pose file whose pose count differs from --num-frames (default: an error)")
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


def check_depth_spec(spec: str) -> None:
    """--depth before any work: an existing .npz/.npy file or a known estimator name (one-line InputError)."""
    from ex4d.depth import ESTIMATORS
    from ex4d.errors import InputError
    from ex4d.io.files import require_file

    if Path(spec).suffix.lower() in (".npz", ".npy"):
        require_file(spec, "depth file (--depth)")
    elif spec.lower().replace("_", "-") not in (*ESTIMATORS, "depth-anything-v2", "depthanything"):
        hint = " (a depth file must end in .npz or .npy)" if Path(spec).exists() else ""
        raise InputError(f"unknown --depth {spec!r}{hint}; use {', '.join(ESTIMATORS)} or a .npz/.npy depth file")


def check_clip_args(args, *, generation_follows: bool = False) -> None:
    """What ``recon``/``run``/``depth`` can check before any work: the video exists, --num-frames
    (4k+1 when generation follows), --fps, --depth, --cam and the --resize keep size cap."""
    from ex4d.io.files import require_file

    require_file(args.video, "input video")
    if generation_follows:
        check_4k1(args.num_frames, "--num-frames", "generation (which follows recon in ex4d run)")
    else:
        check_int(args.num_frames, "--num-frames", 1, example=49)
    check_fps(getattr(args, "fps", None))
    check_depth_spec(args.depth)
    if getattr(args, "cam", None) is not None:
        from ex4d.camera.trajectory import check_spec

        check_spec(args.cam, num_frames=args.num_frames, resample=getattr(args, "resample", False))
    if args.resize == "keep":
        check_frame_size(args.video)


def check_frame_size(video: str) -> None:
    """--resize keep: the video's frames must not exceed MAX_RECON_PIXELS (read from its header)."""
    from ex4d.errors import InputError

    size = probe_video_size(video)
    if size is not None and size[0] * size[1] > MAX_RECON_PIXELS:
        height, width = size
        raise InputError(f"{video} is {width}x{height} ({height * width / 1e6:.1f} megapixels); --resize keep takes "
                         f"at most {MAX_RECON_PIXELS / 1e6:.1f} megapixels (4096x2160) a frame; use --resize reference "
                         f"(long side 1024, the default) or downscale the video")


def probe_video_size(path) -> tuple[int, int] | None:
    """(H, W) of a video's first stream from its header (nothing decoded), or None if unknown."""
    try:
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            context = container.streams.video[0].codec_context
            return (int(context.height), int(context.width)) if context.height and context.width else None
    except Exception:  # unreadable here: reading the video later gives the one-line error
        return None


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def recon_from_args(args, *, generation_follows: bool = False) -> dict:
    """Run depth + reconstruction for parsed ``recon``/``run`` arguments; return written paths.

    Says on stderr when the depth or the whole reconstruction in the output folder was reused.
    """
    from ex4d.commands.depth import depthcrafter_options
    from ex4d.io.files import prepare_output_dir
    from ex4d.pipeline import ReconOptions, estimate_depth, load_clip, run_recon

    check_clip_args(args, generation_follows=generation_follows)  # before any work starts
    from ex4d.pipeline import ReconOptions as _Options, check_recon_outputs

    # Every file recon will write, checked now: an input or a foreign file fails before any work.
    check_recon_outputs(args.video, args.output, _Options(cam=args.cam, save_mesh=args.save_mesh,
                                                          only_first_frame=args.only_first_frame),
                        num_frames=args.num_frames, depth_spec=args.depth)
    estimator_options = depthcrafter_options(args)
    from ex4d.weights_preflight import check_command_weights
    check_command_weights(args, generation=generation_follows)  # every missing weight (run: generation too), at once
    out_dir = prepare_output_dir(args.output)
    clip = load_clip(args.video, num_frames=args.num_frames, resize=args.resize)
    depth_cache = out_dir / "depth.npz"
    depth_before = _mtime(depth_cache)
    depth = estimate_depth(clip, args.depth, out_dir=out_dir, models_dir=args.models_dir, device=args.device,
                           progress=progress, estimator_options=estimator_options)
    depth_is_input = Path(args.depth).suffix.lower() in (".npz", ".npy") and \
        Path(args.depth).resolve() == depth_cache.resolve()
    if depth_before is not None and depth_before == _mtime(depth_cache) and not depth_is_input:
        print(f"recon: depth in {depth_cache} is current (same video, frames, size and --depth); reused",
              file=sys.stderr)
    options = ReconOptions(cam=args.cam, cap=args.cap, filter=args.filter, stretch_test=args.stretch_test,
                           watertight=not args.torn, only_first_frame=args.only_first_frame,
                           save_mesh=args.save_mesh, fps=args.fps, resample=args.resample,
                           antialias=args.antialias, device=args.device,
                           pixel_convention=getattr(args, "pixel_convention", "centers"))
    records_before = {path.name: _mtime(path) for path in out_dir.glob("recon_*.json")}
    written = run_recon(clip, depth, out_dir, options,
                        progress=lambda it, **kw: progress(it, desc="render", unit="frame", **kw))
    record = written.get("record")
    if record is not None and records_before.get(Path(record).name) == _mtime(Path(record)):
        print(f"recon: outputs in {out_dir} are current ({Path(record).name}); reused", file=sys.stderr)
    return written


def main(args) -> int:
    written = recon_from_args(args)
    for role, path in written.items():
        print(f"{role:>14}: {Path(path)}", file=sys.stdout)
    return 0
