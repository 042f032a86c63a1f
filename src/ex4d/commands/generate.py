"""``ex4d generate``: rendered colour + mask videos -> the re-filmed video (Wan2.1-I2V + EX-4D adapter)."""

from __future__ import annotations

import argparse
import logging

from ex4d.commands.common import (MAX_CFG, MAX_FPS, MAX_GENERATE_SIDE, MAX_SHIFT, MAX_STEPS, MIN_CFG, MIN_FPS, MIN_SHIFT,
                                  add_device_arg)

logger = logging.getLogger(__name__)

EPILOG = """examples:
  ex4d generate --color out/color_90.mp4 -o out/ex4d_90.mp4 --models-dir ~/models
  ex4d generate --color out/color_90.mp4 --mask out/mask_90.mkv -o gen.mp4 --seed 3 --fps 15
  ex4d generate --color out/color_90.mp4 -o gen.mp4 --low-vram          # GPUs with <= 24 GB
  ex4d generate --color out/color_90.mp4 -o gen.mp4 --compile --fp8     # faster after warm-up / less memory
  ex4d generate --color out/color_90.mp4 -o gen.mp4 --preset fast --lora distill.safetensors   # 4 steps, no CFG
The mask defaults to the lossless mask_<cam>.mkv beside color_<cam>.mp4.
"""

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate the novel-view video from color/mask renders (Wan2.1-I2V-14B + EX-4D)",
        description="Fill in the rendered colour video along the new camera path with Wan2.1-I2V-14B and the "
                    "EX-4D adapter. Needs the Wan2.1-I2V-14B-480P weights and ex4d.ckpt (docs/models.md). "
                    "Writes the video (-o) and its record beside it (same name, .json).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--color", required=True,
                        help="rendered colour video (color_<cam>.mp4 from ex4d recon); required")
    parser.add_argument("--mask", default=None,
                        help="visibility mask video (default: mask_<cam>.mkv beside --color; a .mp4 is "
                             "thresholded, and its .mkv twin is preferred when present)")
    parser.add_argument("-o", "--output", required=True,
                        help="output video (.mp4); its record is written beside it as .json; required")
    add_generation_args(parser)
    add_device_arg(parser)
    parser.set_defaults(func=main)


def add_generation_args(parser: argparse.ArgumentParser, *, with_recon: bool = False) -> None:
    """Options shared by ``generate`` and ``run`` (everything but the input/output paths).

    with_recon: ``run`` already has --models-dir, --num-frames and --fps from the recon options; there
    the rendered clip has exactly --num-frames frames, all of them are generated, and the generated
    video keeps the renders' frame rate (``--fps``).
    """
    if not with_recon:
        parser.add_argument("--models-dir", default=None,
                            help="folder with downloaded weights (default: the Hugging Face cache; docs/models.md)")
    parser.add_argument("--adapter", default=None, help="EX-4D adapter file or folder (default: found in --models-dir)")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise and mask-erosion seed, 0 to 2**63-1 (default 0)")
    sampler = parser.add_argument_group("sampler and extra LoRAs (docs/generation.md)")
    sampler.add_argument("--preset", default="full", choices=("full", "fast"),
                         help="sampler preset: full = 25 steps, guidance 5, shift 5 (the reference's); fast = 4 "
                              "steps, guidance 1 (no CFG: one forward per step), shift 5, the schedule of the "
                              "4-step distillation LoRAs: use it with such a --lora; its quality with the EX-4D "
                              "adapter is unverified (default full)")
    sampler.add_argument("--steps", type=int, default=None,
                         help=f"sampling steps, 1 to {MAX_STEPS} (default: the preset's, 25 full / 4 fast)")
    sampler.add_argument("--guidance", "--cfg", dest="cfg", type=float, default=None, metavar="SCALE",
                         help=f"text guidance scale, {MIN_CFG:g} (none: one forward per step) to {MAX_CFG:g} "
                              f"(default: the preset's, 5 full / 1 fast); --cfg is the same option")
    sampler.add_argument("--shift", type=float, default=None,
                         help=f"flow-matching shift of the sigma schedule, {MIN_SHIFT:g} to {MAX_SHIFT:g} "
                              f"(default: the preset's, 5 as the reference)")
    sampler.add_argument("--lora", dest="loras", action="append", default=None, metavar="FILE[:STRENGTH]",
                         help="merge an extra Wan2.1-I2V-14B LoRA (ComfyUI/LightX2V or diffusers layout; every "
                              "key must apply) at STRENGTH (default 1; 0 = off); repeat for several, merged in "
                              "order (default: none)")
    sampler.add_argument("--prompt-cache", default=None, metavar="DIR",
                         help="folder of cached prompt embeddings; on a hit the 5.7B text encoder is not loaded "
                              "(default: <models-dir>/prompt_cache, or $XDG_CACHE_HOME/ex4d/prompt_embeds (~/.cache/...) without "
                              "--models-dir; 'off' to disable)")
    parser.add_argument("--prompt", default=None, help="prompt (default: the reference's fixed prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (default: Wan's standard one)")
    parser.add_argument("--size", default="512x512",
                        help=f"HxW working size, multiples of 16, at most {MAX_GENERATE_SIDE} a side (default "
                             f"512x512, squashed as the model was trained), or keep-aspect (~512x512 pixels at "
                             f"the source aspect; untested)")
    if with_recon:
        parser.set_defaults(gen_num_frames=None)
    else:
        parser.add_argument("--num-frames", dest="gen_num_frames", type=int, default=None, metavar="N",
                            help="frames to generate, 4k+1 (default: all frames of the colour video, which must "
                                 "be 4k+1); picked evenly over the clip as the reference does")
    parser.add_argument("--window", type=int, default=49,
                        help="clips longer than this many frames (4k+1, at least 5) are generated in overlapping "
                             "windows, each conditioned on the frames already generated (docs/scale.md); "
                             "default 49")
    parser.add_argument("--overlap", type=int, default=17,
                        help="frames shared by consecutive windows, 1 to --window - 1 (default 17)")
    if with_recon:
        # Old spelling of run's generation frame rate; --fps now sets the rate of every video run writes.
        parser.add_argument("--out-fps", dest="gen_fps", default=None, metavar="FPS", help=argparse.SUPPRESS)
    else:
        parser.add_argument("--fps", dest="gen_fps", default="source", metavar="FPS",
                            help=f"frame rate of the generated video, {MIN_FPS:g} to {MAX_FPS:g}, or 'source' "
                                 f"(default: source, the colour video's rate)")
    parser.add_argument("--no-erode", action="store_true",
                        help="skip the random mask erosion (default: erode, as in training)")
    perf = parser.add_argument_group("speed and memory")
    perf.add_argument("--low-vram", action="store_true",
                      help="stream the DiT and T5 from CPU memory with CUDA streams (GPUs of 24 GB or less; "
                           "default off)")
    perf.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                      help="with --low-vram: GPU memory to plan for (default: the GPU's memory less 1.5 GiB); "
                           "DiT blocks that fit stay on the GPU, the rest stream")
    perf.add_argument("--cpu-offload", action="store_true",
                      help="move whole models to the GPU only while they run (default off)")
    perf.add_argument("--fp8", action="store_true",
                      help="fp8 compute for the DiT's linear layers (row-wise scaled float8 GEMMs; attention stays "
                           "bf16 unless --attention fp8): 1.25 s instead of 1.52 s per CFG step compiled (1.09 s "
                           "with --attention fp8), 47.7 -> 32.6 GiB at 512x512x49 on an H100; needs an fp8 GPU (Ada, "
                           "Hopper, Blackwell) (default off)")
    perf.add_argument("--compile", action="store_true",
                      help="torch.compile the transformer blocks (~15 s once; default off)")
    perf.add_argument("--attention", default=None,
                      help="attention kernel: native (default), cudnn, torch-flash, efficient, flash, flash3, fa4, "
                           "sage, xformers, flex; fp8: cuDNN's fp8 attention for the self-attention (Hopper or "
                           "newer; pip install nvidia-cudnn-frontend)")
    perf.add_argument("--no-batch-cfg", action="store_true",
                      help="never batch the two CFG branches (default: batched only with --low-vram/--cpu-offload)")
    perf.add_argument("--no-merge-lora", action="store_true",
                      help="keep the LoRA unmerged (slower; as the reference; default: merged)")
    perf.add_argument("--parallel", default="auto", choices=("none", "ulysses", "cfg", "cfg-ulysses", "auto"),
                      help="multi-GPU layout when launched with torchrun or --nproc-per-node (default auto; "
                           "docs/scale.md); ignored otherwise")
    if not with_recon:
        perf.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                          help="start N processes, one per GPU, as torchrun --nproc-per-node N does, but with "
                               "one-line errors and the workers' exit code (default 1: this process only)")


def _launched_distributed() -> bool:
    """torchrun/accelerate with more than one process (kept here so that --help imports no torch)."""
    import os

    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def parse_fps(text) -> float | None:
    """A frame rate in [1, 240], or None for 'source' (or no value)."""
    from ex4d.commands.common import check_fps

    if text is None or str(text).strip().lower() == "source":
        return None
    return check_fps(text, "--fps", default="or 'source' for the colour video's rate")


def options_from_args(args: argparse.Namespace):
    """GenerateOptions from parsed ``generate``/``run`` arguments."""
    from ex4d.diffusion.performance import check_gpu_features
    from ex4d.pipeline import GenerateOptions

    options = GenerateOptions(
        seed=args.seed, steps=args.steps, cfg=args.cfg, prompt=args.prompt, negative_prompt=args.negative_prompt,
        size=args.size, num_frames=args.gen_num_frames, fps=parse_fps(args.gen_fps), erode=not args.no_erode,
        window=args.window, overlap=args.overlap, models_dir=args.models_dir, adapter=args.adapter,
        device=args.device, merge_lora=not args.no_merge_lora, attention=args.attention, compile=args.compile,
        batch_cfg=False if args.no_batch_cfg else None, low_vram=args.low_vram, cpu_offload=args.cpu_offload,
        fp8=args.fp8, vram_budget=args.vram_budget, shift=args.shift, preset=args.preset,
        loras=tuple(args.loras or ()), prompt_cache=args.prompt_cache).validate()  # every number, before any work
    # --fp8 / --attention fp8 on this machine: now, not after ex4d run's depth and recon
    check_gpu_features(fp8=options.fp8, attention=options.attention)
    return options


def main(args: argparse.Namespace) -> int:
    nproc = getattr(args, "nproc_per_node", 1)
    if nproc != 1 and not _launched_distributed():
        from ex4d.commands.common import check_int

        check_int(nproc, "--nproc-per-node", 1, 64, example=2)
        from ex4d.commands.torchrun import launch
        from ex4d.pipeline import check_generate_paths

        # Numbers and files, checked once here before any process starts.
        check_generate_paths(args.color, args.mask, args.output, options_from_args(args))

        return launch(args, nproc)
    if _launched_distributed() and getattr(args, "parallel", "auto") != "none":
        from ex4d.commands.torchrun import apply_safe_env, generate_main

        apply_safe_env()
        return generate_main(args)

    from ex4d.commands.common import progress
    from ex4d.pipeline import run_generate

    output = run_generate(args.color, args.mask, args.output, options_from_args(args), progress=progress)
    print(f"wrote {output}")
    return 0
