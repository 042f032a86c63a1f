"""fp8 self-attention (ex4d.diffusion.attention_fp8, ``--attention fp8``).

CPU: the tensor-wise quantisation, the key centring (the attention does not change), the processor
against diffusers' own (bit for bit when both use the same exact kernel), the emulated fp8 maths
against exact attention, the pipeline option and its one-line refusal without a GPU. GPU
(``-m gpu``, Hopper or newer with nvidia-cudnn-frontend): cuDNN's kernel against the emulation and
bf16 attention, eager and compiled.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from tiny_wan import make_tiny_components, tiny_velocity  # noqa: E402

from ex4d.diffusion import attention_fp8  # noqa: E402
from ex4d.diffusion.attention_fp8 import (  # noqa: E402
    FP8_DTYPE,
    FP8_MAX,
    FP8SelfAttentionProcessor,
    centre_keys,
    fp8_attention,
    quantize_tensorwise,
    use_fp8_self_attention,
)
from ex4d.diffusion.performance import PerformanceOptions, apply_performance, fuse_self_attention_qkv  # noqa: E402
from ex4d.errors import InputError  # noqa: E402


def exact_attention(q, k, v, **_):
    """(B, S, H, D) attention as diffusers' native backend computes it (SDPA over (B, H, S, D) views)."""
    return F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3),
                                          v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def relative_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def qkv(seed=0, b=1, s=64, h=2, d=16, key_offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    return q, k + key_offset, v


def test_tensorwise_quantisation_maps_the_largest_value_onto_448():
    t = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    q, descale = quantize_tensorwise(t)
    assert q.dtype == FP8_DTYPE and descale.shape == (1,)
    assert float(q.float().abs().max()) == FP8_MAX
    assert torch.allclose(q.float() * descale, t, rtol=0.07)
    zeros, zero_descale = quantize_tensorwise(torch.zeros(3, 4))
    assert torch.isfinite(zero_descale).all() and not zeros.float().any()


def test_centring_the_keys_changes_their_range_not_the_attention():
    q, k, v = qkv(key_offset=5.0)  # keys far from zero: their shared offset is what centring removes
    centred = centre_keys(k)
    assert float(centred.abs().max()) < 0.6 * float(k.abs().max())
    assert torch.allclose(exact_attention(q, centred, v), exact_attention(q, k, v), atol=1e-5)


def test_emulated_fp8_attention_is_close_to_exact_but_rounded():
    q, k, v = qkv(s=128, key_offset=3.0)
    out = fp8_attention(q, k, v, emulate=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    deviation = relative_l2(out, exact_attention(q, k, v))
    assert 1e-3 < deviation < 0.08, deviation  # fp8 keeps 3 mantissa bits: rounded, not wrong


def _tiny_transformer():
    torch.manual_seed(0)
    return make_tiny_components(seed=0)["transformer"].eval()


@pytest.mark.parametrize("fused", [False, True], ids=["separate-qkv", "fused-qkv"])
def test_processor_is_diffusers_computation_around_the_kernel(monkeypatch, fused):
    """With the fp8 product swapped for the exact one, the processor gives diffusers' output bit for bit."""
    transformer = _tiny_transformer()
    if fused:
        fuse_self_attention_qkv(transformer)
    reference = tiny_velocity(transformer, seed=1)
    monkeypatch.setattr(attention_fp8, "fp8_attention", exact_attention)
    assert use_fp8_self_attention(transformer) == len(transformer.blocks)
    assert all(isinstance(b.attn1.processor, FP8SelfAttentionProcessor) for b in transformer.blocks)
    assert not any(isinstance(b.attn2.processor, FP8SelfAttentionProcessor) for b in transformer.blocks)
    assert torch.equal(tiny_velocity(transformer, seed=1), reference)


def test_fp8_attention_in_the_tiny_transformer_deviates_by_rounding_only():
    transformer = _tiny_transformer()
    reference = tiny_velocity(transformer, seed=1)
    use_fp8_self_attention(transformer, emulate=True)
    out = tiny_velocity(transformer, seed=1)
    deviation = relative_l2(out, reference)
    assert 1e-4 < deviation < 0.05, deviation


def test_the_option_installs_the_processor_and_is_refused_on_the_cpu():
    transformer = _tiny_transformer()

    class Pipe:  # what apply_performance touches of an EX4DPipeline
        pass

    pipe = Pipe()
    pipe.transformer = transformer
    pipe.to = lambda device: None
    apply_performance(pipe, PerformanceOptions(attention="fp8", fp8_emulate=True), "cpu")
    assert all(isinstance(b.attn1.processor, FP8SelfAttentionProcessor) for b in transformer.blocks)
    assert FP8SelfAttentionProcessor().emulate is False  # the real kernel unless asked
    if not torch.cuda.is_available():
        with pytest.raises(InputError) as err:
            PerformanceOptions(attention="fp8").validate()
        message = str(err.value)
        assert "--attention fp8" in message and "\n" not in message


def test_processor_refuses_cross_attention():
    transformer = _tiny_transformer()
    with pytest.raises(ValueError, match="self-attention"):
        FP8SelfAttentionProcessor(emulate=True)(transformer.blocks[0].attn2, torch.zeros(1, 4, 24),
                                                encoder_hidden_states=torch.zeros(1, 600, 24))


@pytest.mark.parametrize("fp8_out", [True, False], ids=["fp8-output (Hopper)", "bf16-output (Blackwell)"])
def test_the_op_path_traces_as_one_graph_with_an_fp8_output_scaled_back_in_it(monkeypatch, fp8_out):
    """The non-emulated path, on the op's CPU emulation: fp8_output is a constant to the compiler, the op
    (a bool argument, an fp8 or bf16 output) traces without a graph break, and an fp8 O is divided by its
    scale outside the op (so that the compiler can fuse it), giving the eager result."""
    from torch._dynamo.utils import counters

    asked = []

    @torch.compiler.assume_constant_result
    def cudnn_writes_fp8(device):
        asked.append(device)
        return fp8_out

    assert getattr(attention_fp8.fp8_output, "_dynamo_marked_constant", False)  # the real one is a constant too
    monkeypatch.setattr(attention_fp8, "fp8_output", cudnn_writes_fp8)
    q, k, v = (t.to(torch.bfloat16) for t in qkv(seed=3, s=96))
    eager = fp8_attention(q, k, v)
    assert eager.dtype == torch.bfloat16 and eager.shape == q.shape
    assert relative_l2(eager, exact_attention(q.float(), k.float(), v.float())) < 0.08
    emulated = fp8_attention(q, k, v, emulate=True)
    if fp8_out:  # O's own rounding to fp8 shows on top of the emulation's
        assert 0 < relative_l2(eager, emulated) < 0.05
    else:
        assert torch.equal(eager, emulated)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(fp8_attention, fullgraph=True)(q, k, v)  # inductor checks the fake's strides too
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    assert not counters["graph_break"] and asked


def test_fp8_blocks_with_the_op_path_compile_with_inductor(monkeypatch):
    """The DiT as ``--fp8 --attention fp8 --compile`` runs it on Hopper, on the CPU: fp8 linears, the
    self-attention through the op (its CPU emulation, O written in fp8) and its scaling back, the blocks
    compiled by inductor as one graph each (as apply_performance does). The velocity stays the eager one
    up to the compiler's own rounding (it may keep the scaled-back O in fp32 inside its fused kernel)."""
    from torch._dynamo.utils import counters

    from ex4d.diffusion.fp8 import convert_to_fp8

    @torch.compiler.assume_constant_result
    def hopper(device):
        return True

    monkeypatch.setattr(attention_fp8, "fp8_output", hopper)
    transformer = _tiny_transformer()
    reference = tiny_velocity(transformer, seed=2)
    convert_to_fp8(transformer, emulate=True)
    use_fp8_self_attention(transformer)
    eager = tiny_velocity(transformer, seed=2)
    assert 1e-4 < relative_l2(eager, reference) < 0.08
    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(fullgraph=True)
    try:
        compiled = tiny_velocity(transformer, seed=2)
    finally:
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    print(f"fp8 blocks with the op path: eager vs fp32 {relative_l2(eager, reference):.4f}, compiled vs eager "
          f"{relative_l2(compiled, eager):.5f}")
    assert relative_l2(compiled, eager) < 0.02


def _cudnn_ready() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    import importlib.util

    return importlib.util.find_spec("cudnn") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _cudnn_ready(), reason="needs a Hopper or newer GPU and nvidia-cudnn-frontend")
def test_cudnn_kernel_matches_the_emulation_and_compiles():
    torch.manual_seed(0)
    shape = (1, 1024, 40, 128)  # the DiT's heads, a shorter sequence
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    exact = exact_attention(q.float(), k.float(), v.float())
    cudnn_out = fp8_attention(q, k, v)
    emulated = fp8_attention(q, k, v, emulate=True)
    assert cudnn_out.dtype == torch.bfloat16 and cudnn_out.shape == shape
    assert relative_l2(cudnn_out, exact) < 0.08
    assert relative_l2(cudnn_out, emulated) < 0.05
    compiled = torch.compile(fp8_attention, fullgraph=True)(q, k, v)
    assert relative_l2(compiled, cudnn_out) < 0.01


def test_sequence_parallel_is_refused_with_fp8_attention():
    """Ulysses splits the tokens over ranks; the fp8 processor would attend over one rank's share only."""
    from types import SimpleNamespace

    from ex4d.diffusion.parallel import enable_ulysses

    transformer = _tiny_transformer()
    use_fp8_self_attention(transformer, emulate=True)
    with pytest.raises(InputError, match="--parallel cfg"):
        enable_ulysses(transformer, SimpleNamespace(ulysses_degree=2), num_tokens=64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("flags, named", [(["--attention", "fp8"], "--attention fp8"), (["--fp8"], "--fp8")])
def test_run_refuses_gpu_features_before_depth_and_recon(tmp_path, capsys, flags, named):
    """ex4d run checks --fp8 / --attention fp8 at its start, not after minutes of depth and recon."""
    import numpy as np

    from ex4d.cli import main
    from ex4d.io.video import write_video

    video = tmp_path / "clip.mp4"
    write_video(video, np.zeros((5, 32, 32, 3), np.uint8), fps=10)
    out = tmp_path / "out"
    assert main(["run", str(video), "--cam", "30", "-o", str(out), *flags]) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error:") and named in message and "\n" not in message
    assert not out.exists()
