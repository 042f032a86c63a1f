"""How fast can one CFG step of the 14B DiT be on this GPU? A measured lower bound.

Runs a *skeleton* of the Wan2.1-I2V-14B DiT at 512x512x49 (13312 tokens): per block only its
matrix products and attention calls, with the real shapes and 40 distinct random bf16 weight
sets, and nothing else (no norms, RoPE, modulation, GELU, residuals or casts). Two forwards make
one CFG step, as ``ex4d generate`` runs it. The skeleton's time is what cuBLAS and torch's SDPA
kernel (cuDNN on Hopper) need for the step's arithmetic alone, under the card's sustained clocks.

It then adds the least memory traffic the left-out elementwise work needs, assuming perfect
fusion (GELU in the GEMM epilogue, every residual fused with the following norm):
per block forward, 16 passes over one [tokens, 5120] bf16 tensor (q/k norm + RoPE: read and write
q and k; attention residual + norm2; cross-attention residual + norm3 + modulation; FFN residual
+ the next block's norm1 + modulation: read two, write two each), timed at the bandwidth this card
reaches on a fused add of tensors of that size.

The sum is a floor for any implementation built on these kernels: a faster step needs faster
GEMM or attention kernels than the ones measured here.

Prints ONE JSON object (commit, device, medians in seconds per CFG step, peak memory).

  python bench/floor_dit.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_generate import git_commit, note  # noqa: E402

DIM, FFN_DIM, HEADS, HEAD_DIM, LAYERS = 5120, 13824, 40, 128, 40
TEXT_TOKENS, IMAGE_TOKENS = 512, 257
# Elementwise passes over a [tokens, DIM] bf16 tensor per block forward with ideal fusion (docstring).
IDEAL_ELEMENTWISE_PASSES = 16


def tokens_for(frames: int, size: int) -> int:
    """Video tokens after the (1, 2, 2) patch embedding of the 8x spatial / 4x temporal VAE latent."""
    return ((frames - 1) // 4 + 1) * (size // 16) ** 2


def gemm_tflop_per_forward(tokens: int) -> float:
    per_block = 2 * tokens * DIM * DIM * 6                      # self q,k,v,o + cross q,o
    per_block += 2 * (TEXT_TOKENS + IMAGE_TOKENS) * DIM * DIM * 2  # cross text/image k,v
    per_block += 2 * tokens * DIM * FFN_DIM * 2                 # FFN up + down
    return LAYERS * per_block / 1e12


def attention_tflop_per_forward(tokens: int, keys: int) -> float:
    return LAYERS * 4 * tokens * keys * DIM / 1e12


class SkeletonBlock:
    """One block's weights: self-attention q,k,v,o; cross q,o and text/image k,v; FFN up/down."""

    def __init__(self, device: str):
        def w(out_features, in_features):
            return torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02

        def b(n):
            return torch.zeros(n, device=device, dtype=torch.bfloat16)

        self.self_qkvo = [(w(DIM, DIM), b(DIM)) for _ in range(4)]
        self.cross_qo = [(w(DIM, DIM), b(DIM)) for _ in range(2)]
        self.cross_kv = [(w(DIM, DIM), b(DIM)) for _ in range(4)]  # text k, v; image k, v
        self.ffn_up = (w(FFN_DIM, DIM), b(FFN_DIM))
        self.ffn_down = (w(DIM, FFN_DIM), b(DIM))


def heads(x: torch.Tensor) -> torch.Tensor:
    """[S, DIM] -> [1, HEADS, S, HEAD_DIM] as a strided view, the layout diffusers hands to SDPA."""
    return x.view(1, x.shape[0], HEADS, HEAD_DIM).permute(0, 2, 1, 3)


def skeleton_forward(blocks, x, text, image, with_attention: bool = True) -> torch.Tensor:
    """x [S, DIM], text [T, DIM], image [257, DIM] -> [S, DIM]; GEMMs and attention only."""
    for blk in blocks:
        q, k, v = (F.linear(x, wt, bs) for wt, bs in blk.self_qkvo[:3])
        if with_attention:
            a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
            a = a.permute(0, 2, 1, 3).reshape(x.shape)
        else:
            a = q
        x = F.linear(a, *blk.self_qkvo[3])
        q2 = F.linear(x, *blk.cross_qo[0])
        kt, vt, ki, vi = (F.linear(c, wt, bs) for c, (wt, bs) in zip((text, text, image, image), blk.cross_kv))
        if with_attention:
            c = (F.scaled_dot_product_attention(heads(q2), heads(kt), heads(vt))
                 + F.scaled_dot_product_attention(heads(q2), heads(ki), heads(vi)))
            c = c.permute(0, 2, 1, 3).reshape(x.shape)
        else:
            c = q2
        x = F.linear(c, *blk.cross_qo[1])
        x = F.linear(F.linear(x, *blk.ffn_up), *blk.ffn_down)
    return x


def timed(fn, repeats: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def fused_add_bandwidth(tokens: int, repeats: int = 50) -> float:
    """Bytes per second of out = a + b on [tokens, DIM] bf16 (two reads, one write)."""
    a, b, out = (torch.randn(tokens, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(5):
        torch.add(a, b, out=out)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.add(a, b, out=out)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000.0 / repeats
    return 3 * a.numel() * a.element_size() / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=1.35, help="s per CFG step to compare against")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("floor_dit.py needs a CUDA GPU")
    torch.manual_seed(0)
    tokens = tokens_for(args.frames, args.size)
    blocks = [SkeletonBlock("cuda") for _ in range(LAYERS)]
    note(f"{LAYERS} skeleton blocks built, {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    x = torch.randn(tokens, DIM, device="cuda", dtype=torch.bfloat16)
    image = torch.randn(IMAGE_TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(TEXT_TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    # Real prompt lengths (the reference's fixed prompts: 32 and 128 T5 tokens) plus one merged pad key:
    # the zero-padded T5 tokens are identical, so 512 keys reduce exactly to these plus a log-count bias.
    text_pos, text_neg = text[:33], text[:129]

    results = {}
    with torch.no_grad():
        for name, fn in {
            "gemm_only": lambda: [skeleton_forward(blocks, x, text, image, with_attention=False) for _ in range(2)],
            "gemm_and_attention": lambda: [skeleton_forward(blocks, x, text, image) for _ in range(2)],
            "gemm_and_attention_compact_text": lambda: [skeleton_forward(blocks, x, t, image)
                                                        for t in (text_pos, text_neg)],
        }.items():
            runs = timed(fn, args.repeats)
            results[name] = {"s_per_step_median": round(statistics.median(runs), 4),
                             "runs": [round(r, 4) for r in runs]}
            note(f"{name}: {results[name]['s_per_step_median']} s per CFG step")
        q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        attn_runs = timed(lambda: [F.scaled_dot_product_attention(q, k, v) for _ in range(2 * LAYERS)], args.repeats)
    bandwidth = fused_add_bandwidth(tokens)
    elementwise_s = 2 * LAYERS * IDEAL_ELEMENTWISE_PASSES * tokens * DIM * 2 / bandwidth
    gemm_s = results["gemm_only"]["s_per_step_median"]
    attention_alone_s = statistics.median(attn_runs)
    best_skeleton = min(results["gemm_and_attention"]["s_per_step_median"],
                        results["gemm_and_attention_compact_text"]["s_per_step_median"])
    floor_s = best_skeleton + elementwise_s
    gemm_tflop = 2 * gemm_tflop_per_forward(tokens)
    self_tflop = 2 * attention_tflop_per_forward(tokens, tokens)
    result = {
        "bench": "floor_dit", "commit": git_commit(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "shape": [args.frames, args.size, args.size], "tokens": tokens,
        "skeleton": results,
        "gemm_tflop_per_step": round(gemm_tflop, 1), "gemm_tflops_sustained": round(gemm_tflop / gemm_s, 1),
        "self_attention_s_per_step_alone": round(attention_alone_s, 4),
        "self_attention_tflops_alone": round(self_tflop / attention_alone_s, 1),
        "fused_add_bandwidth_tb_s": round(bandwidth / 1e12, 3),
        "ideal_elementwise_s_per_step": round(elementwise_s, 4),
        "floor_s_per_step": round(floor_s, 4),
        "target_s_per_step": args.target,
        "headroom_s_for_everything_else": round(args.target - best_skeleton, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
