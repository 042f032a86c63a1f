"""The Wan2.1 VAE's encode and decode at 512x512x49 under cuDNN settings (random full-size weights, bf16).

The generator encodes three 49-frame videos (frame 0 with zeros, the colour video, the mask) and
decodes one; together about 2.5 s of every run on an H100 (bench_e2e.py). This times one encode of
(1, 3, 49, 512, 512), the three encodes as one batch of (3, 3, 49, 512, 512), and one decode of
(1, 16, 13, 64, 64) for each variant:

* ``default``: what ex4d does (cuDNN's heuristic picks each convolution's algorithm);
* ``benchmark``: ``torch.backends.cudnn.benchmark`` (cuDNN times the algorithms once per shape);
* ``channels_last``: the convolution weights in ``channels_last_3d``;
* ``benchmark+channels_last``;
* ``channels_last+compiled_norms``: also every ``WanRMS_norm`` torch.compiled (its float32 normalise,
  cast and two scalings fuse into one pass instead of about seven);
* ``channels_last+compiled_blocks``: every residual and attention block torch.compiled (norm, SiLU,
  causal padding and cache copies fuse around the cuDNN convolutions);
* ``channels_last+compiled_coders``: the whole encoder and decoder torch.compiled (one graph per
  chunk shape).

``--variants`` picks some (default: all); ``--no-batch`` skips the batch of 3.

Each variant's outputs are compared with the first variant's (max |difference|), and the batch's latents
with those of three single encodes. Median of ``--repeats``
after two warm-ups. Prints ONE JSON object.

  python bench/bench_vae.py                 # on a GPU (~1 min)
  python bench/bench_vae.py --tiny          # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from bench_generate import git_commit, note  # noqa: E402

VARIANTS = ("default", "benchmark", "channels_last", "benchmark+channels_last", "channels_last+compiled_norms",
            "channels_last+compiled_blocks", "channels_last+compiled_coders")


def compile_parts(vae, variant: str) -> list:
    """torch.compile the parts ``variant`` names (in place); returns the compiled modules.

    The norms are compiled as ex4d compiles them (``performance.compile_vae_norms``, dynamic shapes);
    the blocks and coders with static shapes (dynamic ones hit an inductor range error on the causal
    padding)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock, WanRMS_norm

    from ex4d.diffusion.performance import compile_vae_norms

    if "compiled_norms" in variant:
        compile_vae_norms(vae)
        return [m for m in vae.modules() if isinstance(m, WanRMS_norm)]
    if "compiled_coders" in variant:
        parts = [vae.encoder, vae.decoder]
    else:
        parts = [m for m in vae.modules() if isinstance(m, (WanResidualBlock, WanAttentionBlock))]
    # Many instances and chunk shapes share each forward's code: allow the recompiles.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    for part in parts:
        part.compile(dynamic=False)
    return parts


def uncompile(parts: list) -> None:
    for part in parts:
        part._compiled_call_impl = None


def timed(fn, repeats: int, cuda: bool, warmups: int = 2) -> tuple[float, torch.Tensor]:
    out = None
    for _ in range(warmups):
        out = fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small VAE and video on the CPU (checks the script)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, among: " + ", ".join(VARIANTS))
    parser.add_argument("--no-batch", action="store_true", help="skip the encode of the three videos as one batch")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {', '.join(VARIANTS)}")
    from diffusers import AutoencoderKLWan

    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    config = {} if not args.tiny else dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                           attn_scales=[], temperal_downsample=[False, True, True])
    vae = AutoencoderKLWan(**config).to(device=device, dtype=dtype).eval()
    frames, side = (49, 512) if not args.tiny else (9, 32)
    video = torch.rand(1, 3, frames, side, side, device=device, dtype=dtype) * 2 - 1
    videos = torch.cat([video, torch.rand_like(video) * 2 - 1, torch.rand_like(video).round() * 4 - 3])
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, side // 8, side // 8, device=device, dtype=dtype)
    result = dict(bench="vae", commit=git_commit(), device=torch.cuda.get_device_name() if cuda else "cpu",
                  torch=torch.__version__, video=list(video.shape), latents=list(latents.shape), repeats=args.repeats,
                  variants={})
    reference = {}
    with torch.no_grad():
        for name in names:
            torch.backends.cudnn.benchmark = "benchmark" in name
            fmt = torch.channels_last_3d if "channels_last" in name else torch.contiguous_format
            for module in vae.modules():
                if isinstance(module, torch.nn.Conv3d):
                    module.weight.data = module.weight.data.contiguous(memory_format=fmt)
            started = time.perf_counter()
            compiled = compile_parts(vae, name) if "compiled" in name else []
            warmups = 3 if compiled else 2
            encode_s, mean = timed(lambda: vae.encode(video).latent_dist.mode(), args.repeats, cuda, warmups)
            if not args.no_batch:
                batch_s, batch_mean = timed(lambda: vae.encode(videos).latent_dist.mode(), args.repeats, cuda, warmups)
                singles = torch.cat([vae.encode(v[None]).latent_dist.mode() for v in videos])
            decode_s, decoded = timed(lambda: vae.decode(latents, return_dict=False)[0], args.repeats, cuda, warmups)
            variant_s = time.perf_counter() - started
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                vae.encode(video).latent_dist.mode()
                encode_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                vae.decode(latents, return_dict=False)
                decode_peak = torch.cuda.max_memory_allocated()
            uncompile(compiled)
            entry = {"encode_s": round(encode_s, 4), "decode_s": round(decode_s, 4),
                     "variant_wall_s": round(variant_s, 1)}
            if not args.no_batch:
                entry.update(encode_batch3_s=round(batch_s, 4),
                             batch3_max_abs_vs_singles=float((batch_mean.float() - singles.float()).abs().max()))
            if cuda:
                entry.update(encode_peak_gib=round(encode_peak / 2**30, 3), decode_peak_gib=round(decode_peak / 2**30, 3))
            if not reference:
                entry["reference_for_differences"] = True
                reference = {"encode": mean.float(), "decode": decoded.float()}
            else:
                entry["encode_max_abs_vs_default"] = float((mean.float() - reference["encode"]).abs().max())
                entry["decode_max_abs_vs_default"] = float((decoded.float() - reference["decode"]).abs().max())
            result["variants"][name] = entry
            note(f"{name}: {entry}")
    torch.backends.cudnn.benchmark = False
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
