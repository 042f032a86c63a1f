"""Time the DiT's attention calls on every kernel this GPU machine has (one GPU, bf16).

Shapes are those of one Wan2.1-I2V-14B forward at 512x512x49: self-attention over 13312 tokens, and
the two cross-attentions (512 text keys, 257 image keys), with 40 heads of 128. Inputs are
[1, S, H, D] tensors handed to SDPA as strided [1, H, S, D] views, the way diffusers passes them.

Kernels: torch SDPA as it picks (cuDNN on Hopper), forced cuDNN, forced torch flash (FA2-class),
FA4 (the ``flash-attn-4`` package) both directly and through torch's flash-attention registry
(``activate_flash_attention_impl("FA4")``, what ``--attention fa4`` uses), and ex4d's fp8 attention
(``--attention fp8``: cuDNN's fp8 flash attention through ``nvidia-cudnn-frontend``, timed with its
quantisation of q, k and v, eager). A kernel that is not installed is reported as such. Each
kernel's output is compared with the cuDNN bf16 one: max |difference| and relative L2.

Prints ONE JSON object: commit, device, per shape and kernel the median ms of a call and TFLOP/s.

  python bench/attention_kernels.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from bench_generate import git_commit, note  # noqa: E402

HEADS, HEAD_DIM, TOKENS = 40, 128, 13312
SHAPES = {"self": TOKENS, "cross_text": 512, "cross_image": 257}


def bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 1, 3)


def time_ms(fn, repeats: int = 7, inner: int = 10) -> float:
    """Median over ``repeats`` of the mean of ``inner`` back-to-back calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def kernels() -> dict:
    """name -> (callable on [1, S, H, D] q, k, v returning [1, S, H, D]) or a reason it is unavailable."""
    out = {}

    def sdpa(backend):
        def run(q, k, v):
            if backend is None:
                return bhsd(F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v)))
            with sdpa_kernel(backend):
                return bhsd(F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v)))
        return run

    out["sdpa_default"] = sdpa(None)
    out["cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    out["torch_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    try:
        from flash_attn.cute import flash_attn_func

        def fa4_direct(q, k, v):
            result = flash_attn_func(q, k, v)
            return result[0] if isinstance(result, tuple) else result

        out["fa4_direct"] = fa4_direct
    except Exception as exc:  # report, not fail: the point is to list what exists here
        out["fa4_direct"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    try:
        from ex4d.diffusion.attention_fp8 import (centre_keys, check_fp8_attention_device, cudnn_attention_fp8,
                                                  fp8_attention, quantize_tensorwise)

        check_fp8_attention_device("cuda")
        out["cudnn_fp8"] = fp8_attention
        quantized = {}

        def kernel_only(q, k, v):  # the cuDNN call alone (and an fp8 O's scaling back), on inputs quantised once
            key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
            if key not in quantized:
                quantized[key] = (quantize_tensorwise(q), quantize_tensorwise(centre_keys(k)), quantize_tensorwise(v))
            (q8, dq), (k8, dk), (v8, dv) = quantized[key]
            return cudnn_attention_fp8(q8, k8, v8, dq, dk, dv)

        out["cudnn_fp8_kernel_only"] = kernel_only
    except Exception as exc:
        out["cudnn_fp8"] = f"unavailable: {type(exc).__name__}: {exc}"[:400]
    return out


def inputs(keys: int):
    q = torch.randn(1, TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, keys, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v


def measure(fn, q, k, v, reference: torch.Tensor) -> dict | str:
    """Median ms, TFLOP/s and max |difference| from ``reference`` of one kernel on one shape."""
    tflop = 4 * TOKENS * k.shape[1] * HEADS * HEAD_DIM / 1e12
    try:
        ms = time_ms(lambda: fn(q, k, v))
        out = fn(q, k, v).float()
        diff = (out - reference).abs().max().item()
        rel_l2 = ((out - reference).norm() / reference.norm()).item()
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {exc}"[:400]
    return {"ms": round(ms, 3), "tflops": round(tflop / (ms / 1000.0), 1), "max_abs_vs_cudnn": diff,
            "rel_l2_vs_cudnn": rel_l2}


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("attention_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    candidates = kernels()
    shapes = {name: inputs(keys) for name, keys in SHAPES.items()}
    references = {name: candidates["cudnn"](*qkv).float() for name, qkv in shapes.items()}
    results: dict = {name: {} for name in SHAPES}
    for shape_name, qkv in shapes.items():
        for name, fn in candidates.items():
            results[shape_name][name] = fn if isinstance(fn, str) else measure(fn, *qkv, references[shape_name])
        note(f"{shape_name}: {json.dumps(results[shape_name])[:400]}")

    # FA4 through torch's flash-attention registry, as `--attention fa4` runs it. The switch is
    # process-global (torch_flash becomes FA4), so it comes after every other kernel is measured.
    try:
        from torch.nn.attention import activate_flash_attention_impl

        activate_flash_attention_impl("FA4")
        for shape_name, qkv in shapes.items():
            results[shape_name]["fa4_torch_registry"] = measure(candidates["torch_flash"], *qkv,
                                                                references[shape_name])
    except Exception as exc:
        results["fa4_torch_registry"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]

    print(json.dumps({"bench": "attention_kernels", "commit": git_commit(), "device": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "tokens": TOKENS, "heads": HEADS, "head_dim": HEAD_DIM, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
