"""fp8 compute for the DiT's linear layers (ex4d.diffusion.fp8): maths, conversion, pipeline integration.

CPU: the quantise/dequantise maths, the scales, which layers are converted, the state after
conversion, torch's CPU ``_scaled_mm`` (where this torch has it) against the emulation, the tiny
pipeline's velocity deviation from its full-precision self, LoRA merged before quantising, the
low-VRAM streamer carrying fp8 weights, and the one-line error on devices without fp8 tensor
cores. GPU (``-m gpu``): the cuBLASLt kernel against the emulation, compile, on an fp8-capable card.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from tiny_wan import make_tiny_components, tiny_velocity  # noqa: E402

from ex4d.diffusion.fp8 import (  # noqa: E402
    FP8_DTYPE,
    FP8_MAX,
    Float8Linear,
    check_fp8_device,
    convert_to_fp8,
    dequantize_rowwise,
    fp8_linear_names,
    native_scaled_mm,
    quantize_rowwise,
    scaled_mm_rowwise,
    velocity_deviation,
)
from ex4d.diffusion.performance import PerformanceOptions  # noqa: E402
from ex4d.diffusion.pipeline import build_pipeline  # noqa: E402
from ex4d.errors import InputError  # noqa: E402

# float8_e4m3fn has 3 mantissa bits: a round-to-nearest relative error of at most 2^-4 per element
# in the normal range (|v| >= 2^-6 after scaling to 448).
E4M3_REL = 2.0 ** -4
#: Each CPU test runs the emulated maths, and the real fp8 kernels where this torch has them on the CPU.
EMULATED_AND_NATIVE = [True, pytest.param(False, marks=pytest.mark.skipif(not native_scaled_mm("cpu"),
                                                                         reason="no CPU fp8 _scaled_mm"))]


def test_quantize_rowwise_scales_and_round_trip():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(7, 64, generator=g) * torch.logspace(-3, 3, 7).unsqueeze(1)  # rows of very different size
    t[3] = 0.0                                                                   # a zero row stays finite
    q, scale = quantize_rowwise(t)
    assert q.dtype == FP8_DTYPE and q.shape == t.shape and scale.shape == (7, 1) and scale.dtype == torch.float32
    # Each row's largest magnitude maps exactly onto 448 (a power-of-two-free scale, so compare values).
    amax = t.abs().amax(dim=1)
    nonzero = amax > 0
    assert torch.allclose(scale[nonzero, 0], amax[nonzero] / FP8_MAX, rtol=1e-6)
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((6,), FP8_MAX))
    back = dequantize_rowwise(q, scale)
    assert torch.equal(back[3], torch.zeros(64))
    # Element-wise error: within e4m3's rounding for values in the normal range of each row.
    normal = t.abs() >= (2.0 ** -6) * scale
    rel = ((back - t).abs() / t.abs().clamp(min=1e-30))[normal]
    assert rel.max() <= E4M3_REL + 1e-6
    # And each row's error scales with that row, not with the largest row (what row-wise buys).
    row_err = (back - t).norm(dim=1)[nonzero] / t.norm(dim=1)[nonzero]
    assert row_err.max() < 0.05


def test_emulated_gemm_is_the_dequantised_product():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(33, 48, generator=g), torch.randn(80, 48, generator=g) * 0.02
    x8, sx = quantize_rowwise(x)
    w8, sw = quantize_rowwise(w)
    y = scaled_mm_rowwise(x8, sx, w8, sw, emulate=True)
    expected = (dequantize_rowwise(x8, sx) @ dequantize_rowwise(w8, sw).t()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    dev = velocity_deviation(x @ w.t(), y)
    assert 0 < dev["rel_l2"] < 0.05  # fp8 rounding is there, and small


@pytest.mark.skipif(not native_scaled_mm("cpu"), reason="this torch build has no CPU fp8 _scaled_mm")
def test_cpu_scaled_mm_matches_the_emulation():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    x8, sx = quantize_rowwise(x)
    w8, sw = quantize_rowwise(w)
    native = scaled_mm_rowwise(x8, sx, w8, sw)
    emulated = scaled_mm_rowwise(x8, sx, w8, sw, emulate=True)
    # Both accumulate in fp32 and round once to bf16; summation order may differ by an ulp.
    assert torch.allclose(native.float(), emulated.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("emulate", EMULATED_AND_NATIVE)
def test_float8_linear_matches_linear(emulate):
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(32, generator=g))
    x = torch.randn(2, 5, 64, generator=g)
    ref = linear(x)
    fp8 = Float8Linear.from_linear(linear, emulate=emulate)
    assert fp8.weight.dtype == FP8_DTYPE and not fp8.weight.requires_grad
    assert all(p.dtype == torch.float32 for p in fp8.parameters())  # the model's dtype reads its parameters
    assert fp8.weight_scale.shape == (32, 1) and fp8.bias.dtype == torch.float32
    assert torch.allclose(fp8.dequantized_weight(), linear.weight, rtol=E4M3_REL, atol=1e-4)
    y = fp8(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    dev = velocity_deviation(ref, y)
    assert dev["rel_l2"] < 0.03, dev
    # The fp8 state survives a state_dict round trip (the buffers/params are where the tests look).
    sd = fp8.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"} and sd["weight"].dtype == FP8_DTYPE


@pytest.mark.parametrize("emulate", EMULATED_AND_NATIVE)
def test_bias_placement_and_fast_accum_flags_compute_the_same_layer(emulate):
    """The bias in the GEMM epilogue or after it, fast accumulation on or off: the same y up to bf16 rounding."""
    g = torch.Generator().manual_seed(4)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.bias.copy_(torch.randn(48, generator=g) * 3)  # large enough that a dropped bias shows
    x = torch.randn(7, 64, generator=g)
    outs = [Float8Linear.from_linear(linear, emulate=emulate, fast_accum=fast, bias_in_gemm=in_gemm)(x)
            for fast in (False, True) for in_gemm in (False, True)]
    for y in outs[1:]:
        assert torch.allclose(y, outs[0], atol=0.05, rtol=0.02)
    assert velocity_deviation(linear(x), outs[0])["rel_l2"] < 0.03


def test_conversion_covers_the_block_linears_only():
    transformer = make_tiny_components(0)["transformer"]
    all_linears = {n for n, m in transformer.named_modules() if type(m) is nn.Linear}
    in_blocks = {n for n in all_linears if n.startswith("blocks.")}
    expected_leaves = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                       "attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj",
                       "ffn.net.0.proj", "ffn.net.2"}
    assert {n.split(".", 2)[2] for n in in_blocks} == expected_leaves
    # The tiny model's widths (24, 48) are no multiples of 16: the fp8 kernels would skip them all,
    # the emulation converts them (the multiple-of-16 rule is for the real kernels).
    assert fp8_linear_names(transformer) == []
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    converted = convert_to_fp8(transformer, emulate=True)
    assert converted == len(in_blocks) == 2 * len(expected_leaves)
    for name in in_blocks:
        module = transformer.get_submodule(name)
        assert isinstance(module, Float8Linear) and module.emulate
        assert module.weight.dtype == FP8_DTYPE
        assert torch.allclose(module.dequantized_weight(), before[name + ".weight"], rtol=E4M3_REL, atol=1e-3)
    # Embeddings, norms, modulation tables and the head are untouched, bit for bit.
    for name, p in transformer.named_parameters():
        if not any(name.startswith(b + ".") for b in in_blocks):
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    assert transformer._ex4d_fp8
    assert transformer.dtype == torch.float32  # diffusers' dtype still reads the compute dtype


def _tiny_wide_transformer():
    """A Wan transformer whose widths are multiples of 16 (2 heads of 16, FFN 64): the kernels' rule holds."""
    from diffusers import WanTransformer3DModel

    from tiny_wan import tiny_transformer_config

    cfg = dict(tiny_transformer_config(), attention_head_dim=16, ffn_dim=64, added_kv_proj_dim=32)
    torch.manual_seed(0)
    return WanTransformer3DModel.from_config(cfg).eval()


def test_kernel_rule_converts_every_block_linear_of_a_16_multiple_model():
    transformer = _tiny_wide_transformer()
    names = fp8_linear_names(transformer)
    assert len(names) == 2 * 12
    assert all(type(transformer.get_submodule(n)) is nn.Linear for n in names)


@pytest.mark.parametrize("emulate", EMULATED_AND_NATIVE)
def test_tiny_transformer_velocity_deviation(emulate):
    """The velocity of the whole (16-multiple) tiny DiT in fp8 against fp32 (printed for the report)."""
    transformer = _tiny_wide_transformer()
    reference = tiny_velocity(transformer)
    assert convert_to_fp8(transformer, emulate=emulate) == 24
    out = tiny_velocity(transformer)
    dev = velocity_deviation(reference, out)
    print(f"tiny DiT fp8 ({'emulated' if emulate else 'CPU _scaled_mm'}) vs fp32 velocity: {dev}")
    assert torch.isfinite(out).all()
    assert 1e-4 < dev["rel_l2"] < 0.05, dev  # fp8 rounding shows, and stays at the per-GEMM level


@pytest.mark.parametrize("emulate", EMULATED_AND_NATIVE)
def test_converted_blocks_compile_as_one_full_graph(emulate):
    """torch.compile(fullgraph=True) traces the fp8 blocks without a graph break, as apply_performance does."""
    from torch._dynamo.utils import counters

    transformer = _tiny_wide_transformer()
    convert_to_fp8(transformer, emulate=emulate)
    eager = tiny_velocity(transformer)
    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    try:
        compiled = tiny_velocity(transformer)
    finally:
        torch._dynamo.reset()
    assert torch.equal(eager, compiled)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


def test_pipeline_fp8_after_merged_lora_and_low_vram_streaming(tmp_path):
    """build_pipeline merges the LoRA first, then quantises (the fp8 weight is of W + s B A, not W);
    the tiny pipeline's latents stay close to full precision; the low-VRAM streamer moves the fp8
    weights and scales like any other tensor (same latents streamed and resident)."""
    from ex4d.diffusion.performance import enable_low_vram
    from ex4d.diffusion.weights import load_ex4d_adapter

    from tiny_wan import tiny_transformer_config, write_tiny_ex4d_ckpt

    adapter = load_ex4d_adapter(write_tiny_ex4d_ckpt(tmp_path / "ex4d.ckpt"),
                                transformer_config=tiny_transformer_config())
    base_q = make_tiny_components(0)["transformer"].blocks[0].attn1.to_q.weight.detach().clone()
    plain = build_pipeline(make_tiny_components(0), adapter, PerformanceOptions(), "cpu")
    merged_q = plain.transformer.blocks[0].attn1.to_q.weight.detach().clone()
    assert not torch.allclose(merged_q, base_q, atol=1e-2)  # the LoRA changes the weight visibly
    pipe = build_pipeline(make_tiny_components(0), adapter, PerformanceOptions(fp8=True, fp8_emulate=True), "cpu")
    q = pipe.transformer.blocks[0].attn1.to_q
    assert isinstance(q, Float8Linear)
    assert torch.allclose(q.dequantized_weight(), merged_q, rtol=E4M3_REL, atol=1e-3)

    g = torch.Generator().manual_seed(0)
    cond = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
    mask = torch.ones(1, 3, 5, 16, 16)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    for p in (plain, pipe):
        p.set_progress_bar_config(disable=True)
    reference = plain(cond, mask, generator=torch.Generator().manual_seed(0), **kwargs).frames
    resident = pipe(cond, mask, generator=torch.Generator().manual_seed(0), **kwargs).frames
    dev = velocity_deviation(reference, resident)
    print(f"tiny pipeline (2 steps, CFG 5) fp8 emulated vs fp32 latents: {dev}")
    assert 0 < dev["rel_l2"] < 0.1, dev
    enable_low_vram(pipe, torch.device("cpu"), resident_blocks=1)
    streamed_q = pipe.transformer.blocks[1].attn1.to_q
    assert streamed_q.weight.dtype == FP8_DTYPE  # the streamed block's host copies are the fp8 ones
    streamed = pipe(cond, mask, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert torch.equal(resident, streamed)


def test_fused_qkv_is_converted_too():
    """--fuse (one 5120 -> 15360 QKV linear) then fp8: the fused projection computes in fp8, once."""
    pipe = build_pipeline(make_tiny_components(0), None,
                          PerformanceOptions(fuse_qkv=True, fp8=True, fp8_emulate=True), "cpu")
    attn = pipe.transformer.blocks[0].attn1
    assert isinstance(attn.to_qkv, Float8Linear) and not hasattr(attn, "to_q")
    assert attn.to_qkv.out_features == 3 * attn.to_qkv.in_features


def test_fp8_refuses_devices_without_fp8_tensor_cores():
    with pytest.raises(InputError) as info:
        check_fp8_device("cpu")
    message = str(info.value)
    assert "\n" not in message and "--fp8" in message and "8.9" in message
    comps = make_tiny_components(0)
    with pytest.raises(InputError, match="--fp8"):
        build_pipeline(comps, None, PerformanceOptions(fp8=True), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_fp8_is_refused_before_any_weights_load(tmp_path, capsys):
    """PerformanceOptions.validate (called by the CLI and load_generator before loading) refuses --fp8 here."""
    with pytest.raises(InputError, match="fp8 tensor cores"):
        PerformanceOptions(fp8=True).validate()
    PerformanceOptions(fp8=True, fp8_emulate=True).validate()  # the tests' emulation is allowed
    import numpy as np

    from ex4d.cli import main
    from ex4d.io.video import write_video

    write_video(tmp_path / "color_30.mp4", np.zeros((5, 32, 32, 3), np.uint8), 10)
    write_video(tmp_path / "mask_30.mkv", np.full((5, 32, 32), 255, np.uint8), 10, codec="ffv1")
    code = main(["generate", "--color", str(tmp_path / "color_30.mp4"), "-o", str(tmp_path / "out.mp4"), "--fp8",
                 "--device", "cpu", "--models-dir", str(tmp_path / "no_models")])
    err = capsys.readouterr().err
    assert code == 1 and "--fp8" in err
    assert not (tmp_path / "out.mp4").exists()


def test_fp8_refuses_unmerged_lora():
    comps = make_tiny_components(0)
    with pytest.raises(ValueError, match="merge the LoRA"):
        build_pipeline(comps, None, PerformanceOptions(fp8=True, fp8_emulate=True, merge_lora=False), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and native_scaled_mm("cuda")),
                    reason="needs a CUDA GPU with fp8 tensor cores")
def test_cuda_kernel_matches_emulation_and_compiles():
    g = torch.Generator(device="cuda").manual_seed(0)
    linear = nn.Linear(5120, 13824, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
        linear.bias.normal_(0, 0.02, generator=g)
    x = torch.randn(2, 1000, 5120, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = linear(x)
    fp8 = Float8Linear.from_linear(linear)
    assert not fp8.emulate
    y = fp8(x)
    emulated = Float8Linear(fp8.weight, fp8.weight_scale, fp8.bias, emulate=True)(x)
    assert torch.allclose(y.float(), emulated.float(), rtol=2e-2, atol=2e-2)
    assert velocity_deviation(ref, y)["rel_l2"] < 0.05
    compiled = torch.compile(fp8, fullgraph=True)
    assert torch.allclose(compiled(x).float(), y.float(), rtol=2e-2, atol=2e-2)


def _fp8_parallel_worker(rank, world_size, port, mode, out_dir):
    import os

    import test_parallel as tp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = tp.par.init_parallel(mode, guidance_scale=tp.GUIDANCE, backend="gloo")
    try:
        model = tp.tiny_transformer()
        convert_to_fp8(model, emulate=True)  # as apply_performance: before parallelising
        tp.par.enable_ulysses(model, ctx, num_tokens=48)
        torch.save({"x": tp.sample(model, ctx)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tp.par.shutdown(ctx)


@pytest.mark.parametrize("mode", ["ulysses", "cfg"])
def test_fp8_two_processes_match_one(mode, tmp_path):
    """The multi-GPU layouts (two gloo processes here) run the fp8 model and agree with one process."""
    import test_parallel as tp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tp.tiny_transformer()
        convert_to_fp8(model, emulate=True)
        single = tp.sample(model)
        reference = tp.sample(tp.tiny_transformer())
    finally:
        torch.set_num_threads(threads)
    ranks = tp.run_ranks(2, mode, tmp_path, target=_fp8_parallel_worker)
    for result in ranks:
        # Ulysses splits the tokens, so each token's activation scale is the same as in one process.
        assert torch.allclose(result["x"], single, atol=1e-4), (result["x"] - single).abs().max()
    assert not torch.allclose(single, reference, atol=1e-4)  # the fp8 path really ran
