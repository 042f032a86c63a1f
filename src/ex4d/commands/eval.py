"""``ex4d eval``: camera following, kept-what-was-seen and temporal stability of a generated video."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  ex4d eval out/generated_90.mp4 --camera out/camera_90.npz --condition out/color_90.mp4 --mask out/mask_90.mkv -o out/eval_90
  ex4d eval clip.mp4 --camera camera_90.npz -o report      # camera following and stability only
metrics and their definitions: docs/eval.md
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a generated video: camera following, kept content, temporal stability",
        description="Offline, classical evaluation (OpenCV): recover each frame's camera relative to frame 0 "
                    "(SIFT + PnP against frame 0's depth when a depth.npz is beside the camera file or given, "
                    "else the essential matrix), align the scale to the requested path, and report RotErr and "
                    "TransErr; PSNR and SSIM against the condition render on its visible pixels; the warping "
                    "error between consecutive frames under DIS optical flow. Writes summary.json, "
                    "report.html and contact_sheet.png into the report folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", help="the video to evaluate (e.g. the generated mp4)")
    parser.add_argument("--camera", required=True, help="the requested path: camera_<cam>.npz written by ex4d recon; "
                                                        "required")
    parser.add_argument("--condition", default=None,
                        help="the condition render color_<cam>.mp4 (default none: PSNR/SSIM not computed)")
    parser.add_argument("--mask", default=None,
                        help="the lossless visibility mask mask_<cam>.mkv, with --condition (default none)")
    parser.add_argument("--depth", default=None,
                        help="depth.npz whose frame 0 anchors PnP (default: depth.npz beside the camera file "
                             "if present, else the essential-matrix route)")
    parser.add_argument("--erode", type=int, default=3,
                        help="pixels by which the visible mask is eroded before PSNR/SSIM (default 3)")
    learned = parser.add_argument_group(
        "learned metrics (opt-in; local model folders, nothing is downloaded; docs/eval.md)")
    learned.add_argument("--dino", default=None, metavar="DIR",
                         help="folder of DINO ViT-B/16 (hf download facebook/dino-vitb16 --local-dir DIR): adds "
                              "VBench's subject consistency (default: not computed)")
    learned.add_argument("--clip", default=None, metavar="DIR",
                         help="folder of CLIP ViT-B/32 (hf download openai/clip-vit-base-patch32 --local-dir DIR): "
                              "adds VBench's background consistency (default: not computed)")
    parser.add_argument("-o", "--output", required=True, help="report folder (created if needed); required")
    parser.set_defaults(func=main)


def main(args) -> int:
    from ex4d.eval.evaluate import OUTPUT_NAMES, evaluate_video, write_report
    from ex4d.io.files import check_outputs, prepare_output_dir, protect_inputs, require_file

    for path, what in ((args.video, "video"), (args.camera, "camera file"), (args.condition, "condition video"),
                       (args.mask, "mask video"), (args.depth, "depth file")):
        if path is not None:
            require_file(path, what)
    protect_inputs(*(p for p in (args.video, args.camera, args.condition, args.mask, args.depth) if p))
    out_dir = prepare_output_dir(args.output)
    check_outputs([out_dir / name for name in OUTPUT_NAMES])  # before any work
    summary, arrays = evaluate_video(args.video, args.camera, args.condition, args.mask, args.depth,
                                     erode_margin=args.erode, dino=args.dino, clip=args.clip)
    paths = write_report(out_dir, summary, arrays)
    cam = summary["camera_following"]
    print(f"camera: RotErr sum {cam['rot_err_sum_deg']} deg, TransErr sum {cam['trans_err_sum']}, "
          f"unregistered {cam['unregistered_fraction']} ({cam['method']})", file=sys.stdout)
    kept = summary["kept_what_was_seen"]
    if kept:
        print(f"kept:   PSNR {kept['psnr_mean']} dB, SSIM {kept['ssim_mean']} on visible pixels "
              f"(eroded {kept['erode_margin_px']} px)", file=sys.stdout)
    stab = summary["temporal_stability"]
    print(f"stable: warp error {stab['warp_error_mean']} (generated region {stab['warp_error_generated_mean']})",
          file=sys.stdout)
    learned = summary.get("learned_consistency")
    if learned:
        print(f"learned: subject consistency {learned['subject_consistency']}, background consistency "
              f"{learned['background_consistency']}", file=sys.stdout)
    for name, path in paths.items():
        print(f"{name:>18}: {path}", file=sys.stdout)
    return 0
