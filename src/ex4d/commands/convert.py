"""``ex4d convert``: original Wan2.1 files + ex4d.ckpt -> diffusers layout + adapter.safetensors."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  ex4d convert --models-dir models                 # writes models/converted/ (found automatically later)
  ex4d convert --models-dir models --dtype fp32    # keep full precision (65 GB DiT instead of 33 GB)
  ex4d convert --models-dir models --only adapter  # just ex4d.ckpt -> adapter.safetensors
  ex4d convert --models-dir models --prompt-embeds # also cache the prompt embeddings (no umT5 at generation)
  ex4d convert --models-dir models --only prompt-embeds --device cuda

Layout of --models-dir and download commands: docs/models.md.
"""

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "keep": None}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert downloaded weights to the fast-loading diffusers/safetensors layout",
        description="Read the original Wan2.1-I2V-14B-480P files and ex4d.ckpt from --models-dir, check every "
                    "tensor name and shape, and write OUT/Wan2.1-I2V-14B-480P-Diffusers (diffusers layout) and "
                    "OUT/EX-4D (adapter.safetensors, adapter_config.json, ex4d.ckpt). Written to a temporary "
                    "folder and renamed at the end; existing outputs are never overwritten.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, help="folder with the downloaded weights (docs/models.md)")
    parser.add_argument("-o", "--output", default=None, help="output folder (default: MODELS_DIR/converted)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16",
                        help="dtype of the converted DiT, T5 and CLIP (the VAE stays fp32); default bf16, "
                             "the dtype inference runs in")
    parser.add_argument("--only", choices=["all", "wan", "adapter", "prompt-embeds"], default="all",
                        help="convert everything (default), only the Wan model, only the EX-4D adapter, or "
                             "only compute the prompt embeddings (--prompt-embeds)")
    embeds = parser.add_argument_group("prompt embeddings (cached, so that generation never loads umT5)")
    embeds.add_argument("--prompt-embeds", action="store_true",
                        help="after converting, compute the umT5 embeddings of the prompt and negative prompt "
                             "into the prompt cache, as ex4d generate would on --device (default off)")
    embeds.add_argument("--prompt", default=None, help="prompt to cache (default: the reference's fixed prompt)")
    embeds.add_argument("--negative-prompt", default=None,
                        help="negative prompt to cache (default: Wan's standard one)")
    embeds.add_argument("--prompt-cache", default=None, metavar="DIR",
                        help="prompt cache folder (default: MODELS_DIR/prompt_cache, where ex4d generate "
                             "--models-dir MODELS_DIR looks)")
    embeds.add_argument("--device", default="auto",
                        help="device the embeddings are computed on; the cache keys them by device type and "
                             "dtype (bf16 on CUDA, float32 on CPU), so use generation's (default auto: cuda if "
                             "available, else cpu)")
    parser.set_defaults(func=main)


def main(args) -> int:
    import torch

    from ex4d.commands.common import progress
    from ex4d.diffusion.weights.convert import convert_models_dir

    dtype = getattr(torch, _DTYPES[args.dtype]) if _DTYPES[args.dtype] else None
    written = {}
    if args.only != "prompt-embeds":
        written = convert_models_dir(args.models_dir, args.output, dtype=dtype, wan=args.only in ("all", "wan"),
                                     adapter=args.only in ("all", "adapter"),
                                     progress=lambda it: progress(it, desc="DiT shards", unit="shard"))
    if args.prompt_embeds or args.only == "prompt-embeds":
        from ex4d.pipeline import GenerateOptions, precompute_prompt_embeds

        # After the conversion: the cache is keyed by the text encoder that generation will load, which
        # is the converted one from now on.
        options = GenerateOptions(models_dir=args.models_dir, prompt=args.prompt,
                                  negative_prompt=args.negative_prompt, prompt_cache=args.prompt_cache,
                                  device=args.device)
        written.update({f"prompt_embeds_{name}": path for name, path in precompute_prompt_embeds(options).items()})
    for role, path in written.items():
        print(f"{role}: {path}", file=sys.stdout)
    return 0
