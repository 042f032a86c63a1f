"""``ex4d make-pairs``: simulated-mask training pairs from a folder (or list) of monocular videos."""

from __future__ import annotations

import argparse
import sys

from ex4d.commands.common import progress

EPILOG = """examples:
  ex4d make-pairs videos/ -o pairs/                          # DepthCrafter depth, default camera mix
  ex4d make-pairs videos/ --depth depth_npz/ -o pairs/       # <stem>.npz depth per video
  ex4d make-pairs list.txt --size 512x512 --yaw 30 90 -o pairs/
  ex4d make-pairs videos/ -o pairs/ --families orbit=1,zoom=0.2   # only orbits and zooms

A rerun with the same settings skips finished clips and retries failed ones (--skip-failed leaves
them); see manifest.json for each clip's status. Exit status: 0 when no clip failed in this run,
1 when some did (each is reported), 2 when the depth model's weights are missing.
Layout and the mask algorithm: docs/training.md.
"""


def _families(text: str) -> dict:
    families = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            families[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad family weight {part!r}; use name=weight,...") from None
    return families


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-pairs", help="simulated-mask training pairs (video, cond, mask) from monocular videos",
        description="For each video: depth -> per-frame DW-Mesh -> a random target camera path -> render the "
                    "novel view and bring its visibility back to the source view. Writes video.mp4, cond.mp4, "
                    "mask.mkv, camera.npz and pair.json per clip, and manifest.json.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a folder of videos or a list file ('<video> [<depth>]' per line)")
    parser.add_argument("-o", "--output", required=True, help="dataset folder (created if needed; required)")
    parser.add_argument("--depth", default="depthcrafter",
                        help="depthcrafter (default), depth-anything, vda, vda-metric (or vda-base/vda-large, "
                             "non-commercial; docs/depth.md), or a folder with <video stem>.npz/.npy")
    parser.add_argument("--models-dir", default=None,
                        help="folder with downloaded weights (docs/models.md); default: the Hugging Face cache")
    parser.add_argument("--num-frames", type=int, default=49, help="frames per clip (default 49)")
    parser.add_argument("--resize", choices=["reference", "keep"], default="reference",
                        help="reference: multiples of 64, long side <= 1024 (default); keep: source size")
    parser.add_argument("--size", default=None, metavar="HxW",
                        help="resize clips to HxW, even sides, e.g. 512x512 (the released model's training size); "
                             "default: as --resize gives")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed; each clip's seed derives from it and its id (default 0)")
    parser.add_argument("--families", type=_families, default=None,
                        help="trajectory family weights, e.g. orbit=1,zoom=0.2 (families: orbit, orbit_pitch, loop, "
                             "zoom, dolly_zoom; default orbit=0.6,orbit_pitch=0.25,zoom=0.1,loop=0.05)")
    parser.add_argument("--yaw", type=float, nargs=2, metavar=("MIN", "MAX"), default=(10.0, 90.0),
                        help="orbit angle range in degrees, sign random (default 10 90)")
    parser.add_argument("--pitch", type=float, nargs=2, metavar=("MIN", "MAX"), default=(5.0, 30.0),
                        help="pitch range of orbit_pitch paths in degrees, sign random (default 5 30)")
    parser.add_argument("--depth-tol", type=float, default=0.01, help="relative z-test tolerance (default 0.01)")
    parser.add_argument("--temporal-window", type=int, default=3,
                        help="odd window of the temporal majority filter; 1 disables (default 3)")
    parser.add_argument("--close-radius", type=int, default=1,
                        help="spatial closing radius of the visible region in pixels; 0 disables (default 1)")
    parser.add_argument("--cap", choices=["none", "masked", "reference"], default="none",
                        help="DW-Mesh cap mode, as for ex4d recon (default none)")
    parser.add_argument("--redo", action="store_true",
                        help="remake clips that are already finished (default: skip them)")
    parser.add_argument("--skip-failed", action="store_true",
                        help="do not retry clips that failed in an earlier run with the same inputs and settings "
                             "(default: retry them)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (default: cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.set_defaults(func=main)


def main(args) -> int:
    from ex4d.train.masks import MaskSettings
    from ex4d.train.options import parse_size
    from ex4d.train.pairs import PairSettings, TrajectoryDistribution, build_pairs, list_inputs

    distribution = TrajectoryDistribution(yaw_range=tuple(args.yaw), pitch_range=tuple(args.pitch))
    if args.families is not None:
        distribution.families = args.families
    settings = PairSettings(
        num_frames=args.num_frames, resize=args.resize, size=parse_size(args.size) if args.size else None,
        seed=args.seed, trajectories=distribution,
        masks=MaskSettings(rel_depth_tol=args.depth_tol, temporal_window=args.temporal_window,
                           close_radius=args.close_radius, cap=args.cap))
    settings.validate()
    inputs = list_inputs(args.input)
    from ex4d.weights_preflight import check_pairs_weights
    check_pairs_weights(args.depth, inputs, args.models_dir)  # every missing weight file, before the first clip
    summary = build_pairs(inputs, args.output, settings, depth=args.depth, models_dir=args.models_dir,
                          device=args.device, progress=progress, overwrite=args.redo,
                          retry_failed=not args.skip_failed)
    for clip_id, error in summary.errors.items():
        print(f"failed: clip {clip_id}: {error}", file=sys.stderr)
    earlier = (f", {len(summary.skipped_failed)} failed earlier (not retried: --skip-failed)"
               if summary.skipped_failed else "")
    print(f"pairs: {summary.done} made, {summary.skipped} already done{earlier}, {summary.failed} failed "
          f"-> {summary.manifest}", file=sys.stdout)
    if summary.failed:
        total = len(inputs)
        print(f"error: {summary.failed} of {total} clip{'s' if total != 1 else ''} failed (errors in "
              f"{summary.manifest}); fix them and rerun to retry them, or rerun with --skip-failed to leave them",
              file=sys.stderr)
        return 1
    return 0
