"""``ex4d generate``: rendered colour + mask videos -> the re-filmed video (Wan2.1-I2V + EX-4D adapter)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ex4d.commands.common import add_device_arg
from ex4d.errors import InputError

logger = logging.getLogger(__name__)

EPILOG = """examples:
  ex4d generate --color out/color_90.mp4 -o out/ex4d_90.mp4 --models-dir ~/models
  ex4d generate --color out/color_90.mp4 --mask out/mask_90.mkv -o gen.mp4 --seed 3 --fps source
  ex4d generate --color out/color_90.mp4 -o gen.mp4 --low-vram          # GPUs with <= 24 GB
  ex4d generate --color out/color_90.mp4 -o gen.mp4 --compile --fp8     # faster after warm-up / less memory
The mask defaults to the lossless mask_<cam>.mkv beside color_<cam>.mp4.
"""

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate the novel-view video from color/mask renders (Wan2.1-I2V-14B + EX-4D)",
        description="Fill in the rendered colour video along the new camera path with Wan2.1-I2V-14B and the "
                    "EX-4D adapter. Needs the Wan2.1-I2V-14B-480P weights and ex4d.ckpt (docs/models.md).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--color", required=True, help="rendered colour video (color_<cam>.mp4 from ex4d recon)")
    parser.add_argument("--mask", default=None,
                        help="visibility mask video (default: mask_<cam>.mkv beside --color; a .mp4 is "
                             "thresholded, and its .mkv twin is preferred when present)")
    parser.add_argument("-o", "--output", required=True, help="output video (.mp4)")
    add_generation_args(parser)
    add_device_arg(parser)
    parser.set_defaults(func=main)


def add_generation_args(parser: argparse.ArgumentParser, *, with_recon: bool = False) -> None:
    """Options shared by ``generate`` and ``run`` (everything but the input/output paths).

    with_recon: ``run`` already has --models-dir and --num-frames from the recon options; there the
    rendered clip has exactly --num-frames frames and all of them are generated.
    """
    if not with_recon:
        parser.add_argument("--models-dir", default=None, help="folder with downloaded weights (docs/models.md)")
    parser.add_argument("--adapter", default=None, help="EX-4D adapter file or folder (default: found in --models-dir)")
    parser.add_argument("--seed", type=int, default=0, help="noise and mask-erosion seed (default 0)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25, as the reference)")
    parser.add_argument("--cfg", type=float, default=5.0, help="text guidance scale (default 5)")
    parser.add_argument("--prompt", default=None, help="prompt (default: the reference's fixed prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (default: Wan's standard one)")
    parser.add_argument("--size", default="512x512",
                        help="HxW working size, multiples of 16 (default 512x512, squashed as the model was "
                             "trained), or keep-aspect (~512x512 pixels at the source aspect; untested)")
    if with_recon:
        parser.set_defaults(gen_num_frames=None)
    else:
        parser.add_argument("--num-frames", dest="gen_num_frames", type=int, default=None, metavar="N",
                            help="frames to generate, 4k+1 (default: all frames of the colour video, which must "
                                 "be 4k+1); picked evenly over the clip as the reference does")
    parser.add_argument("--window", type=int, default=49,
                        help="clips longer than this many frames (4k+1) are generated in overlapping windows, "
                             "each conditioned on the frames already generated (docs/scale.md); default 49")
    parser.add_argument("--overlap", type=int, default=17, help="frames shared by consecutive windows (default 17)")
    parser.add_argument("--out-fps" if with_recon else "--fps", dest="gen_fps", default="15", metavar="FPS",
                        help="frame rate of the generated video: a number (default 15, as the reference) or "
                             "'source' (the colour video's)")
    parser.add_argument("--no-erode", action="store_true", help="skip the random mask erosion (not the trained input)")
    perf = parser.add_argument_group("speed and memory")
    perf.add_argument("--low-vram", action="store_true",
                      help="stream the DiT and T5 from CPU memory with CUDA streams (GPUs of 24 GB or less)")
    perf.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                      help="with --low-vram: GPU memory to plan for (default: the GPU's memory less 1.5 GiB); "
                           "DiT blocks that fit stay on the GPU, the rest stream")
    perf.add_argument("--cpu-offload", action="store_true", help="move whole models to the GPU only while they run")
    perf.add_argument("--fp8", action="store_true", help="store DiT weights in float8 (bf16 compute): ~16 GB less")
    perf.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (~15 s once)")
    perf.add_argument("--attention", default=None,
                      help="attention kernel: native (default), cudnn, torch-flash, efficient, flash, flash3, fa4, "
                           "sage, xformers, flex")
    perf.add_argument("--no-batch-cfg", action="store_true",
                      help="never batch the two CFG branches (they are batched only with --low-vram/--cpu-offload)")
    perf.add_argument("--no-merge-lora", action="store_true", help="keep the LoRA unmerged (slower; as the reference)")
    perf.add_argument("--parallel", default="auto", choices=("none", "ulysses", "cfg", "cfg-ulysses", "auto"),
                      help="multi-GPU layout when launched with torchrun (docs/scale.md); ignored otherwise")


def _launched_distributed() -> bool:
    """torchrun/accelerate with more than one process (kept here so that --help imports no torch)."""
    import os

    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def parse_fps(text: str) -> float | None:
    """A positive number, or None for 'source'."""
    if str(text).lower() == "source":
        return None
    try:
        fps = float(text)
    except ValueError:
        raise InputError(f"bad --fps {text!r}; give a number such as 15, or 'source'") from None
    if not fps > 0:
        raise InputError(f"--fps must be positive, got {text}")
    return fps


def check_output(output: str | Path, inputs: list[Path]) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"output {output} must be an .mp4 file")
    for path in inputs:
        if path is not None and output.resolve() == Path(path).resolve():
            raise InputError(f"output {output} would overwrite the input {path}; choose another -o")
    return output


def options_from_args(args: argparse.Namespace):
    """GenerateOptions from parsed ``generate``/``run`` arguments."""
    from ex4d.pipeline import GenerateOptions

    return GenerateOptions(
        seed=args.seed, steps=args.steps, cfg=args.cfg, prompt=args.prompt, negative_prompt=args.negative_prompt,
        size=args.size, num_frames=args.gen_num_frames, fps=parse_fps(args.gen_fps), erode=not args.no_erode,
        window=args.window, overlap=args.overlap, models_dir=args.models_dir, adapter=args.adapter,
        device=args.device, merge_lora=not args.no_merge_lora, attention=args.attention, compile=args.compile,
        batch_cfg=False if args.no_batch_cfg else None, low_vram=args.low_vram, cpu_offload=args.cpu_offload,
        fp8=args.fp8, vram_budget=args.vram_budget)


def main(args: argparse.Namespace) -> int:
    if _launched_distributed() and getattr(args, "parallel", "auto") != "none":
        from ex4d.diffusion.parallel import apply_safe_env, generate_main

        apply_safe_env()
        return generate_main(args)

    from ex4d.pipeline import run_generate

    output = run_generate(args.color, args.mask, args.output, options_from_args(args))
    print(f"wrote {output}")
    return 0
