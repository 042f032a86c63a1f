"""``ex4d depth``: estimate (or import) a depth video -> depth.npz + depth_preview.mp4."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ex4d.commands.common import add_device_arg, progress

EPILOG = """examples:
  ex4d depth clip.mp4 -o out/                          # DepthCrafter, as in the paper (GPU advised)
  ex4d depth clip.mp4 -o out/ --depth depth-anything   # lighter and faster, per-frame + temporal alignment
  ex4d depth clip.mp4 -o out/ --depth vda              # Video Depth Anything Small: fast, Apache-2.0
  ex4d depth clip.mp4 -o out/ --depth mine.npz         # import z-depth or disparity from another tool
  ex4d depth clip.mp4 -o out/ --models-dir ~/models    # weights downloaded as in docs/depth.md
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "depth", help="estimate depth for a video (depth.npz + depth_preview.mp4)",
        description="Estimate per-frame z-depth for the first --num-frames frames (DepthCrafter by default, "
                    "Depth Anything V2, Video Depth Anything, or a .npz/.npy file) and write depth.npz (keys depth, valid, K, "
                    "estimator, settings) and depth_preview.mp4. Missing weights exit with code 2 and the "
                    "download command (docs/depth.md).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", help="input video (mp4/mov/mkv/...)")
    parser.add_argument("-o", "--output", required=True, help="output folder (created if needed); required")
    parser.add_argument("--depth", default="depthcrafter",
                        help="depthcrafter (default), depth-anything, vda, vda-metric, vda-base, vda-large, "
                             "vda-metric-base, vda-metric-large (docs/depth.md), or a .npz/.npy depth file")
    parser.add_argument("--models-dir", default=None,
                        help="the folder that holds the downloaded repositories, e.g. MODELS for "
                             "MODELS/tencent/DepthCrafter/ (not that folder itself; docs/depth.md); default: the "
                             "Hugging Face cache")
    parser.add_argument("--num-frames", type=int, default=49,
                        help="frames to use from the start, at least 1; 4k+1 (such as 49) if the depth will feed "
                             "ex4d run/generate (default 49)")
    parser.add_argument("--resize", choices=["reference", "keep"], default="reference",
                        help="reference: multiples of 64, long side <= 1024 (default; DepthCrafter needs "
                             "multiples of 64); keep: source size, at most 8.8 megapixels (4096x2160)")
    add_depthcrafter_speed_args(parser, short_names=True)
    parser.add_argument("--no-reuse", action="store_true",
                        help="recompute even if out/depth.npz matches (default: reuse it, and say so)")
    parser.add_argument("--no-preview", action="store_true",
                        help="do not write depth_preview.mp4 (default: write it)")
    add_device_arg(parser)
    parser.set_defaults(func=main)


def add_depthcrafter_speed_args(parser: argparse.ArgumentParser, short_names: bool) -> None:
    """DepthCrafter's speed/memory flags: ``--depth-compile`` etc., also ``--compile`` etc. in ``ex4d depth``
    (``ex4d run`` has its own ``--compile`` for generation)."""

    def names(flag):
        return ([f"--{flag}"] if short_names else []) + [f"--depth-{flag}"]

    speed = parser.add_argument_group("DepthCrafter speed/memory options (default: the reference's numerics)")
    speed.add_argument(*names("compile"), dest="depth_compile", action="store_true",
                       help="torch.compile the UNet and VAE, with the fast kernels below: with fp16 encode "
                            "2.5x faster per clip on an H100, but the first clip pays 2-3 minutes of "
                            "compilation; for batches of clips (output differs by fp16 rounding)")
    speed.add_argument(*names("fast-kernels"), dest="depth_fast_kernels", action="store_true",
                       help="channels-last layouts, the fused GroupNorm kernels and the single-token attention "
                            "shortcut without compiling: 1.6x faster on an H100 at once, 1.7x with fp16 encode "
                            "(output differs by fp16 rounding)")
    speed.add_argument(*names("fp16-encode"), dest="depth_fp16_encode", action="store_true",
                       help="encode frames with the VAE in fp16 instead of fp32 (faster, less memory, "
                            "slightly different numbers)")
    speed.add_argument(*names("offload"), dest="depth_offload", action="store_true",
                       help="keep the models in CPU memory and move each to the GPU only while it runs "
                            "(less GPU memory, slower)")


def depthcrafter_options(args) -> dict:
    """DepthCrafter options from the flags of :func:`add_depthcrafter_speed_args`; an error if they are
    given for another estimator."""
    from ex4d.depth.depthcrafter import speed_options

    options = speed_options(compile=args.depth_compile, fast_kernels=args.depth_fast_kernels,
                            fp16_encode=args.depth_fp16_encode, offload=args.depth_offload)
    if options and args.depth.lower() != "depthcrafter":
        from ex4d.errors import InputError

        raise InputError(f"the DepthCrafter speed options (--compile, --fast-kernels, --fp16-encode, --offload, "
                         f"or their --depth-* forms) apply to --depth depthcrafter only, not {args.depth!r}")
    return options


def main(args) -> int:
    from ex4d.depth.preview import write_depth_preview
    from ex4d.io.files import prepare_output_dir
    from ex4d.pipeline import estimate_depth, load_clip

    from ex4d.commands.recon import _mtime, check_clip_args

    check_clip_args(args)  # video, --num-frames, --depth and the --resize keep cap, before any work starts
    from ex4d.pipeline import check_depth_outputs

    # depth.npz and depth_preview.mp4 checked now: an input or a foreign file fails before any work.
    check_depth_outputs(args.video, args.output, args.depth, preview=not args.no_preview)
    estimator_options = depthcrafter_options(args)
    from ex4d.weights_preflight import check_command_weights
    check_command_weights(args)  # every missing weight file in one message, before any work
    out_dir = prepare_output_dir(args.output)
    clip = load_clip(args.video, num_frames=args.num_frames, resize=args.resize)
    depth_path = out_dir / "depth.npz"
    before = _mtime(depth_path)
    depth = estimate_depth(clip, args.depth, out_dir=out_dir, models_dir=args.models_dir, device=args.device,
                           progress=progress, reuse=not args.no_reuse, estimator_options=estimator_options)
    depth_is_input = Path(args.depth).suffix.lower() in (".npz", ".npy") and \
        Path(args.depth).resolve() == depth_path.resolve()
    if before is not None and before == _mtime(depth_path) and not depth_is_input:
        print(f"depth: {depth_path} is current (same video, frames, size and --depth); reused "
              f"(--no-reuse recomputes it)", file=sys.stderr)
    if not depth_path.exists():  # the depth file given as input was the output path itself
        depth.save(depth_path)
    print(f"{'depth':>8}: {depth_path}", file=sys.stdout)
    if not args.no_preview:
        preview = write_depth_preview(out_dir / "depth_preview.mp4", depth.depth, clip.fps)  # frame by frame
        print(f"{'preview':>8}: {preview}", file=sys.stdout)
    return 0
