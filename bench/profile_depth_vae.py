"""Where DepthCrafter's temporal VAE decode spends its GPU time (random full-size fp16 weights, one GPU).

Decodes 49 frames of latents in 8-frame chunks through the SVD-xt ``AutoencoderKLTemporalDecoder``
decoder exactly as :meth:`ex4d.depth.depthcrafter.DepthCrafterPipeline.decode` calls it, eager and
torch.compiled, with channels_last 2-D convs as the ``fast`` settings use, and profiles one whole
decode. Kernel self-time is grouped into convolution, normalisation, layout copies and other.

Prints ONE JSON object: commit, device, per-variant decode median and the grouped/top kernels.

  python bench/profile_depth_vae.py --size 576x1024
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_depth import VAE_CONFIG  # noqa: E402
from bench_generate import git_commit, note  # noqa: E402


def category(name: str) -> str:
    low = name.lower()
    if "_stats_kernel" in low or "_apply_kernel" in low:
        return "fused_group_norm"  # ex4d.depth.fused_groupnorm
    if low.startswith("triton_"):
        return "triton_fused"  # inductor's fused norm/activation/residual kernels (memory-bound)
    if "nchwtonhwc" in low or "nhwctonchw" in low or "direct_copy" in low:
        return "layout_copy"
    if "fmha" in low or "attention" in low or "flash" in low:
        return "attention"
    if "implicit_gemm" in low or "xmma" in low or "conv" in low or "gemm" in low or "nvjet" in low or "sm90_" in low:
        return "conv_or_gemm"
    return "other"


class TemporalConvAsMatmul(torch.nn.Module):
    """A (3,1,1) Conv3d over (B, C, T, H, W) as one channels-last matmul and two shifted adds (same math)."""

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        assert conv.kernel_size == (3, 1, 1) and conv.padding == (1, 0, 0) and conv.stride == (1, 1, 1)
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x):
        c_out = self.weight.shape[0]
        taps = self.weight[:, :, :, 0, 0].permute(2, 0, 1).reshape(3 * c_out, -1)  # (3*Co, Ci): t-1, t, t+1
        y = torch.nn.functional.linear(x.permute(0, 2, 3, 4, 1), taps)  # (B, T, H, W, 3*Co)
        before, now, after = y.split(c_out, dim=-1)
        out = now + self.bias
        out = out + torch.nn.functional.pad(before[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0))
        out = out + torch.nn.functional.pad(after[:, 1:], (0, 0, 0, 0, 0, 0, 0, 1))
        return out.permute(0, 4, 1, 2, 3)


def replace_temporal_convs(module: torch.nn.Module) -> int:
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv3d) and child.kernel_size == (3, 1, 1) and child.padding == (1, 0, 0):
                setattr(parent, name, TemporalConvAsMatmul(child))
                count += 1
    return count


def profile_decode(decode) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        ms = getattr(event, "self_device_time_total", 0) / 1000.0
        if ms > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + ms
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        groups[category(name)] = groups.get(category(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"gpu_ms": {k: round(v, 1) for k, v in sorted(groups.items())},
            "top_kernels_ms": [[n[:110], round(ms, 1), category(n)] for n, ms in top]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="576x1024")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--variants", default="compiled_cl3d,compiled_cl3d_fgn,eager_cl3d_fgn",
                        help="eager|compiled + _cl (channels-last 2-D convs), _nchw (plain layout), _cl3d (also "
                             "the 3-D convs), _tmm (temporal convs as matmuls), _fgn (fused GroupNorm+SiLU op)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commit", default=os.environ.get("EX4D_COMMIT") or os.environ.get("EX4D_GIT_COMMIT", ""),
                        help="commit id to record (default: $EX4D_COMMIT, else git HEAD)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_depth_vae.py needs a CUDA GPU")
    from diffusers import AutoencoderKLTemporalDecoder

    from ex4d.depth.depthcrafter import set_channels_last

    torch.backends.cudnn.benchmark = True
    H, W = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLTemporalDecoder.from_config(VAE_CONFIG).half().eval().requires_grad_(False)
    vae.to("cuda")  # buffers built with torch.Tensor([...]) ignore the device context
    z = torch.randn(args.frames, 4, H // 8, W // 8, device="cuda", dtype=torch.float16)
    out = {"bench": "profile_depth_vae", "commit": args.commit or git_commit(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "size": args.size, "frames": args.frames, "variants": {}}
    reference = None
    from ex4d.depth.fused_groupnorm import CALLS, fuse_group_norms

    for variant in args.variants.split(","):
        mode, *flags = variant.split("_")
        torch._dynamo.reset()  # graphs are specialised on the weights' strides, which variants change
        channels_last = bool({"cl", "cl3d", "tmm"} & set(flags))
        set_channels_last(vae, channels_last)
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv3d):
                fmt = torch.channels_last_3d if "cl3d" in flags else torch.contiguous_format
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        model = vae
        if "tmm" in flags or "fgn" in flags:
            import copy

            model = copy.deepcopy(vae)
        if "tmm" in flags:
            note(f"{replace_temporal_convs(model.decoder)} temporal convs as matmuls")
        if "fgn" in flags:
            fused = fuse_group_norms(model.decoder)
            note(f"fused group norms: {fused.with_silu} with SiLU, {fused.plain} plain")
        CALLS.clear()
        decoder = torch.compile(model.decoder, dynamic=False) if mode == "compiled" else model.decoder

        @torch.no_grad()
        def decode():
            frames = []
            for a in range(0, args.frames, 8):
                chunk = z[a:a + 8]
                if channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                n = len(chunk)
                indicator = torch.zeros(1, n, dtype=chunk.dtype, device=chunk.device)
                frames.append(decoder(chunk, num_frames=n, image_only_indicator=indicator).float().mean(dim=1))
            return torch.cat(frames)

        start = time.perf_counter()
        first = decode()
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            decode()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        row = {"decode_s_median": round(statistics.median(times), 4), "first_call_s": round(warm, 1),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if reference is None:
            reference = first
        row["max_abs_vs_first_variant"] = float((first - reference).abs().max())
        row["group_norm_calls"] = dict(CALLS)
        row.update(profile_decode(decode))
        out["variants"][variant] = row
        note(f"{variant}: {row['decode_s_median']}s {row['gpu_ms']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
