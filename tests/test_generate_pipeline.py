"""EX4DPipeline end to end on tiny real models (2 steps, CPU) and the ``ex4d generate`` command."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_wan import make_tiny_components, write_tiny_ex4d_ckpt, write_tiny_original_layout  # noqa: E402

from ex4d.diffusion.performance import PerformanceOptions  # noqa: E402
from ex4d.diffusion.pipeline import build_pipeline, make_scheduler, reference_sigmas  # noqa: E402
from ex4d.errors import InputError  # noqa: E402

SPEC_SIGMAS = [1.0, .9917, .9829, .9735, .9633, .9524, .9406, .9278, .9140, .8989, .8824, .8642, .8442, .8219,
               .7971, .7692, .7377, .7018, .6604, .6122, .5556, .4878, .4054, .3030, .1724]
T, H, W = 5, 16, 16


def _condition(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(1, 3, T, H, W, generator=g) * 2 - 1
    mask = torch.where(torch.rand(1, 1, T, H, W, generator=g) > 0.3, 1.0, -1.0).expand(1, 3, T, H, W).clone()
    mask[:, :, 0] = 1.0
    return cond, mask


@pytest.fixture(scope="module")
def pipe():
    comps = make_tiny_components(0)
    p = build_pipeline(comps, None, PerformanceOptions(), "cpu")
    # Give the fresh (zero-output) camera encoder random weights so that the geometry matters.
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for param in p.camera_encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    p.set_progress_bar_config(disable=True)
    return p


def test_sigma_schedule_equals_the_reference():
    scheduler = make_scheduler()
    scheduler.set_timesteps(sigmas=reference_sigmas(25).tolist())
    assert np.allclose(scheduler.sigmas[:25].numpy(), SPEC_SIGMAS, atol=6e-5)
    assert scheduler.sigmas[25] == 0
    assert np.allclose(scheduler.timesteps.numpy(), 1000 * scheduler.sigmas[:25].numpy())


def test_generate_end_to_end_seeded(pipe):
    cond, mask = _condition()
    run = lambda seed: pipe(cond, mask, num_inference_steps=2,  # noqa: E731
                            generator=torch.Generator().manual_seed(seed)).frames
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, T, H, W, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b), "same seed, same video"
    assert not np.array_equal(a, c), "different seed, different video"
    latents = pipe(cond, mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="latent").frames
    assert latents.shape == (1, 16, 2, 2, 2) and torch.isfinite(latents).all()


def test_streamed_decode_hands_over_the_same_frames_while_decoding(pipe, monkeypatch):
    import threading

    cond, mask = _condition()
    latents = pipe(cond, mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="latent").frames
    whole = pipe.decode_latents(latents).numpy()
    first_frame_out = threading.Event()
    decoder_calls = []
    forward = type(pipe.vae.decoder).forward

    def decoder_forward(self, *args, **kwargs):
        decoder_calls.append(len(decoder_calls))
        if len(decoder_calls) == 2:  # the second chunk only starts once the first chunk's frame is out
            assert first_frame_out.wait(10), "the first chunk's frame was not handed over before the next chunk"
        return forward(self, *args, **kwargs)

    got = []

    def sink(frame):
        got.append(frame.copy())
        first_frame_out.set()

    monkeypatch.setattr(type(pipe.vae.decoder), "forward", decoder_forward)
    streamed = pipe.decode_latents_streamed(latents, sink)
    assert len(decoder_calls) == 2  # T' = 2 latent frames: 1 video frame, then 4
    assert streamed.shape == whole.shape and np.array_equal(streamed, whole)
    assert np.array_equal(np.stack(got), whole[0]), "every frame once, in order"
    assert not pipe.vae.decoder._forward_hooks, "the hook is removed"


def test_frame_sink_gets_the_pipeline_output_and_its_errors_stop_the_call(pipe):
    cond, mask = _condition()
    run = lambda sink: pipe(cond, mask, num_inference_steps=2,  # noqa: E731
                            generator=torch.Generator().manual_seed(0), frame_sink=sink).frames
    got = []
    assert np.array_equal(run(got.append), run(None))
    assert np.array_equal(np.stack(got), run(None)[0])

    def broken(frame):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run(broken)
    assert not pipe.vae.decoder._forward_hooks


def test_geometry_condition_reaches_the_model(pipe):
    cond, mask = _condition()
    kwargs = dict(num_inference_steps=2, output_type="latent")
    a = pipe(cond, mask, generator=torch.Generator().manual_seed(0), **kwargs).frames
    mask2 = mask.clone()
    mask2[:, :, 1:] = -1.0  # everything hidden in the novel views
    b = pipe(cond, mask2, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert (a - b).abs().max() > 1e-4


@torch.no_grad()
def test_batched_cfg_equals_two_forwards(pipe):
    g = torch.Generator().manual_seed(4)
    latent_input = torch.randn(1, 36, 2, 2, 2, generator=g)
    positive, negative = torch.randn(2, 1, 512, 32, generator=g)
    image = torch.randn(1, 257, 32, generator=g)
    tokens = torch.randn(1, 24, 2, 1, 1, generator=g)
    with pipe.injector.active(tokens):
        args = (latent_input, torch.tensor([700.0]), positive, negative, image, 5.0)
        batched = pipe._predict(*args, batch_cfg=True)
        separate = pipe._predict(*args, batch_cfg=False)
    assert torch.allclose(batched, separate, atol=1e-4, rtol=1e-4)


def test_check_inputs_rejects_bad_conditions(pipe):
    cond, mask = _condition()
    with pytest.raises(InputError, match="4k\\+1"):
        pipe(cond[:, :, :4], mask[:, :, :4], num_inference_steps=1)
    with pytest.raises(InputError, match="-1 and \\+1"):
        pipe(cond, mask * 0.5, num_inference_steps=1)
    with pytest.raises(InputError, match="differ"):
        pipe(cond, mask[..., :8], num_inference_steps=1)
    with pytest.raises(InputError, match="multiples of 16"):
        pipe(cond[..., :8, :8], mask[..., :8, :8], num_inference_steps=1)


# ---------------------------------------------------------------------------------------------
# ex4d generate


def _write_condition_files(folder):
    from ex4d.io.video import write_video

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8)
    mask = np.full((T, 32, 32), 255, np.uint8)
    mask[1:, :, :10] = 0
    return (write_video(folder / "color_90.mp4", colour, fps=24.0),
            write_video(folder / "mask_90.mkv", mask, fps=24.0, codec="ffv1"))


def test_cli_missing_weights_exit_2(tmp_path, monkeypatch, capsys):
    from ex4d.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    colour, _ = _write_condition_files(tmp_path)
    code = main(["generate", "--color", str(colour), "-o", str(tmp_path / "out.mp4"),
                 "--models-dir", str(tmp_path / "models"), "--size", "16x16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing" in err and "download" in err
    assert not (tmp_path / "out.mp4").exists()


def test_cli_bad_input_exit_1_before_loading(tmp_path, capsys):
    from ex4d.cli import main

    colour, _ = _write_condition_files(tmp_path)
    code = main(["generate", "--color", str(colour), "-o", str(tmp_path / "out.mp4"), "--size", "16x16",
                 "--num-frames", "4", "--device", "cpu"])
    assert code == 1 and "4k+1" in capsys.readouterr().err
    code = main(["generate", "--color", str(colour), "-o", str(colour), "--device", "cpu"])
    assert code == 1 and "overwrite" in capsys.readouterr().err


def test_cli_generates_from_tiny_weight_files(tmp_path, monkeypatch):
    from ex4d.cli import main
    from ex4d.io.video import read_video

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    models = tmp_path / "models"
    write_tiny_original_layout(models / "Wan-AI" / "Wan2.1-I2V-14B-480P", seed=0)
    write_tiny_ex4d_ckpt(models / "yihouxiang" / "EX-4D" / "ex4d.ckpt")
    colour, _ = _write_condition_files(tmp_path)
    out = tmp_path / "gen.mp4"
    code = main(["generate", "--color", str(colour), "-o", str(out), "--models-dir", str(models),
                 "--size", "16x16", "--steps", "2", "--fps", "source", "--device", "cpu"])
    assert code == 0 and out.exists()
    frames, fps = read_video(out)
    assert frames.shape == (T, 16, 16, 3) and abs(fps - 24.0) < 1e-3


@torch.no_grad()
def test_pinned_swap_keeps_outputs_and_restores_host_weights():
    from ex4d.diffusion.performance import PinnedSwap
    from ex4d.diffusion.pipeline import _module_device

    encoder = make_tiny_components(1)["text_encoder"]
    ids = torch.tensor([[5, 6, 7, 1, 0, 0]])
    attention = (ids > 0).long()
    before = encoder(ids, attention).last_hidden_state
    swap = PinnedSwap(encoder, "cpu")
    hosts = [host for _, host in swap.tensors]
    calls = []
    encoder.register_forward_pre_hook(lambda m, a: calls.append(m.shared.weight.data_ptr()))
    after = encoder(ids, attention).last_hidden_state
    assert torch.equal(before, after)
    assert calls and all(t.data_ptr() == h.data_ptr() for (t, _), h in zip(swap.tensors, hosts)), \
        "after the forward the parameters point at the host copies again"
    assert len(swap.tensors) == len({id(t) for t, _ in swap.tensors}), "tied weights are swapped once"
    assert _module_device(encoder) == torch.device("cpu")
    swap.remove()
    assert not hasattr(encoder, "_ex4d_execution_device")


@torch.no_grad()
@pytest.mark.parametrize("resident", [0, 1, 2])
def test_block_streamer_keeps_outputs_and_points_back_at_host(resident):
    from ex4d.diffusion.performance import BlockStreamer

    comps = make_tiny_components(2)
    dit = comps["transformer"]
    cond, mask = _condition(4)
    x = torch.randn(1, 36, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = dict(hidden_states=x, timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32), encoder_hidden_states_image=torch.randn(1, 257, 32),
                  return_dict=False)
    before = dit(**kwargs)[0]
    streamer = BlockStreamer(dit.blocks, "cpu", resident=resident)
    assert streamer.resident == resident and len(streamer.streamed) == len(dit.blocks) - resident
    seen = []
    for block in streamer.streamed:
        block.register_forward_pre_hook(lambda m, a: seen.append(m.ffn.net[2].weight.data_ptr()))
    after = [dit(**kwargs)[0] for _ in range(2)]
    assert all(torch.equal(before, a) for a in after), "streaming does not change the result"
    for pairs in streamer.host:
        assert all(p.data_ptr() == h.data_ptr() for p, h in pairs), "after the forward: host copies again"
    if streamer.streamed:
        host_ptrs = {h.data_ptr() for pairs in streamer.host for _, h in pairs}
        assert seen and not (set(seen) & host_ptrs), "inside the forward a streamed block uses device copies"
        assert set(streamer.pending) == {0}, "the first streamed block is prefetched for the next forward"
    streamer.remove()
    assert not streamer.pending


def test_plan_resident_blocks_fits_the_budget():
    from ex4d.diffusion.performance import module_bytes, plan_resident_blocks

    blocks = torch.nn.ModuleList(torch.nn.Linear(256, 256, bias=False) for _ in range(10))
    per = module_bytes(blocks[0])
    assert per == 256 * 256 * 4
    assert plan_resident_blocks(blocks, budget_bytes=100 * per, other_bytes=0) == 10
    assert plan_resident_blocks(blocks, budget_bytes=7 * per + per // 2, other_bytes=per) == 4  # 2 in flight
    assert plan_resident_blocks(blocks, budget_bytes=2 * per, other_bytes=per) == 0


@torch.no_grad()
def test_low_vram_streaming_keeps_the_pipeline_output(pipe):
    """enable_low_vram's placement (DiT blocks and T5 streamed, CLIP swapped) computes the same video.

    Run on the CPU: the hooks and host/device bookkeeping are the same as on a GPU; only the copy
    stream is absent. Compiling the blocks' forward (fullgraph) keeps one graph for all blocks."""
    from ex4d.diffusion.performance import BlockStreamer, enable_low_vram

    comps = make_tiny_components(0)
    plain = build_pipeline(comps, None, PerformanceOptions(), "cpu")
    plain.set_progress_bar_config(disable=True)
    cond, mask = _condition(5)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    expected = plain(cond, mask, generator=torch.Generator().manual_seed(0), **kwargs).frames
    used = enable_low_vram(plain, torch.device("cpu"), resident_blocks=1)
    assert used == 1
    assert isinstance(plain.transformer._ex4d_streamer, BlockStreamer)
    assert isinstance(plain.text_encoder._ex4d_streamer, BlockStreamer)
    streamed = plain(cond, mask, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert torch.equal(expected, streamed)

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for block in plain.transformer.blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, backend="eager")
    compiled = plain(cond, mask, generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch._dynamo.reset()
    assert torch.allclose(expected, compiled, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, "the streamed and the resident block share one graph"


def test_vram_budget_must_be_positive():
    from ex4d.diffusion.performance import low_vram_budget_bytes

    assert low_vram_budget_bytes(torch.device("cpu"), 24) == 24 * 2**30
    with pytest.raises(InputError, match="--vram-budget must be positive"):
        low_vram_budget_bytes(torch.device("cpu"), 0)


def test_attention_backend_errors_name_the_fix():
    from diffusers import WanTransformer3DModel

    from ex4d.diffusion.performance import set_attention_backend
    from tiny_wan import tiny_transformer_config

    dit = WanTransformer3DModel(**tiny_transformer_config())
    with pytest.raises(InputError, match="use --attention native"):
        set_attention_backend(dit, "no-such-kernel")
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pip install flash-attn-4"):
            set_attention_backend(dit, "fa4")


@torch.no_grad()
def test_vae_channels_last_keeps_the_outputs():
    """The VAE with channels-last convolutions computes the same latents and frames (CPU, fp32)."""
    from ex4d.diffusion.performance import channels_last_convolutions

    vae = make_tiny_components(0)["vae"].float().eval()
    video = torch.rand(1, 3, T, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = vae.encode(video).latent_dist.mode()
    decoded_before = vae.decode(before, return_dict=False)[0]
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert channels_last_convolutions(vae) == len(convs) > 0
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    after = vae.encode(video).latent_dist.mode()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(after, return_dict=False)[0], decoded_before, rtol=1e-5, atol=1e-5)


def test_vae_channels_last_only_on_cuda(pipe):
    """On the CPU apply_performance leaves the VAE as loaded (the option is for cuDNN's kernels)."""
    convs = [m for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(c.weight.is_contiguous() for c in convs)


@pytest.mark.gpu
@torch.no_grad()
def test_vae_channels_last_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    on = build_pipeline(make_tiny_components(0), None, PerformanceOptions(), "cuda")
    off = build_pipeline(make_tiny_components(0), None, PerformanceOptions(vae_channels_last=False), "cuda")
    conv = next(m for m in on.vae.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    video = torch.rand(1, 3, T, H, W, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2 - 1
    torch.testing.assert_close(on._vae_encode(video), off._vae_encode(video), rtol=0.05, atol=0.05)


@torch.no_grad()
def test_compiled_vae_norms_keep_the_outputs(monkeypatch):
    """compile_vae_norms compiles every RMS norm, all of them (no silent fall-back to eager past dynamo's
    recompile limit), and the VAE computes the same latents and frames (CPU, fp32)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from ex4d.diffusion.performance import channels_last_convolutions, compile_vae_norms

    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    torch._dynamo.reset()
    vae = make_tiny_components(0)["vae"].float().eval()
    channels_last_convolutions(vae)  # as on CUDA: the norms see channels-last activations
    video = torch.rand(1, 3, T, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = vae.encode(video).latent_dist.mode()
    decoded_before = vae.decode(before, return_dict=False)[0]
    norms = [m for m in vae.modules() if isinstance(m, WanRMS_norm)]
    assert compile_vae_norms(vae) == len(norms) > 0
    assert all(m._compiled_call_impl is not None for m in norms)
    after = vae.encode(video).latent_dist.mode()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(after, return_dict=False)[0], decoded_before, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_vae_norms_are_compiled_only_on_cuda_without_offloading():
    """--compile on the CPU compiles the DiT's blocks but leaves the VAE's norms eager."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    pipe = build_pipeline(make_tiny_components(0), None, PerformanceOptions(compile=True), "cpu")
    norms = [m for m in pipe.vae.modules() if isinstance(m, WanRMS_norm)]
    assert norms and all(m._compiled_call_impl is None for m in norms)


@pytest.mark.gpu
@torch.no_grad()
def test_vae_norms_compiled_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    on = build_pipeline(make_tiny_components(0), None, PerformanceOptions(compile=True), "cuda")
    off = build_pipeline(make_tiny_components(0), None, PerformanceOptions(compile=True, compile_vae_norms=False),
                         "cuda")
    assert all(m._compiled_call_impl is not None for m in on.vae.modules() if isinstance(m, WanRMS_norm))
    assert all(m._compiled_call_impl is None for m in off.vae.modules() if isinstance(m, WanRMS_norm))
    video = torch.rand(1, 3, T, H, W, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2 - 1
    torch.testing.assert_close(on._vae_encode(video), off._vae_encode(video), rtol=0.05, atol=0.05)


def test_condition_prepared_on_the_generation_gpu_only_where_its_memory_is_not_budgeted(monkeypatch):
    """The condition's erosion and scaling go to the generation's GPU on a plain one-GPU run, and stay on
    the CPU with --low-vram, --cpu-offload, several GPUs or no GPU."""
    from types import SimpleNamespace

    import ex4d.pipeline as pipeline
    from ex4d.pipeline import GenerateOptions

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pipeline, "_generation_device", lambda options, parallel=None: (cuda, torch.bfloat16))
    assert pipeline._condition_device(GenerateOptions()) == cuda
    assert pipeline._condition_device(GenerateOptions(), SimpleNamespace(world_size=1)) == cuda
    assert pipeline._condition_device(GenerateOptions(low_vram=True)) is None
    assert pipeline._condition_device(GenerateOptions(cpu_offload=True)) is None
    assert pipeline._condition_device(GenerateOptions(), SimpleNamespace(world_size=2)) is None
    monkeypatch.setattr(pipeline, "_generation_device",
                        lambda options, parallel=None: (torch.device("cpu"), torch.float32))
    assert pipeline._condition_device(GenerateOptions()) is None


def test_first_frame_context_computed_ahead_gives_the_call_s_own_result(pipe, caplog):
    """CLIP features and y computed ahead for the call's frame 0 and length give the same latents as
    computing them in the call; a context for another frame 0 (or length) is not used, with a warning;
    and frame 0 does matter (another one gives other latents)."""
    from ex4d.diffusion.conditioning import first_frame_uint8

    cond, mask = _condition()
    image = first_frame_uint8(cond).permute(1, 2, 0).numpy().astype(np.uint8)

    def latents(**kwargs):
        return pipe(cond, mask, image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="latent", **kwargs).frames

    want = latents()
    np.testing.assert_array_equal(latents(first_frame_context=pipe.first_frame_context(image, T)), want)
    other = pipe.first_frame_context(255 - image, T)
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(latents(first_frame_context=other), want)
        np.testing.assert_array_equal(latents(first_frame_context=pipe.first_frame_context(image, T + 4)), want)
    assert sum("first-frame context" in r.message for r in caplog.records) == 2
    moved = pipe(cond, mask, image=255 - image, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="latent", first_frame_context=other).frames
    assert not torch.equal(moved, want)


def test_first_frame_context_on_a_helper_thread_builds_no_autograd_graph(pipe):
    """Grad mode is per thread: computed on a helper thread (as pipeline._first_frame_ahead does), the
    context must still carry no autograd graph, or the VAE's activations are all kept alive (on a
    full-size model that ran an H100 out of memory)."""
    from concurrent.futures import ThreadPoolExecutor

    from ex4d.diffusion.conditioning import first_frame_uint8

    assert any(p.requires_grad for p in pipe.vae.parameters())  # else this test could not fail
    cond, _ = _condition()
    image = first_frame_uint8(cond).permute(1, 2, 0).numpy().astype(np.uint8)
    with ThreadPoolExecutor(1) as pool:
        context = pool.submit(pipe.first_frame_context, image, T).result()
    assert context.y.grad_fn is None and not context.y.requires_grad
    assert context.image_embeds.grad_fn is None and not context.image_embeds.requires_grad


@pytest.mark.parametrize("frames", [5, 9])
def test_condition_encode_stream_gives_prepare_condition_s_tokens_bit_for_bit(pipe, frames):
    """The condition fed frame by frame (as recon renders it) gives the camera tokens of encoding the
    whole video, exactly: the VAE runs the same time chunks with its causal cache carried over."""
    from ex4d.diffusion.pipeline import ConditionEncodeStream

    g = torch.Generator().manual_seed(frames)
    cond = torch.rand(1, 3, frames, H, W, generator=g) * 2 - 1
    mask = torch.where(torch.rand(1, 1, frames, H, W, generator=g) > 0.3, 1.0, -1.0).expand(1, 3, frames, H, W)
    mask = mask.clone()
    _, want = pipe.prepare_condition(cond, mask, torch.zeros(1, 3, H, W), torch.device("cpu"),
                                     y=torch.zeros(1))
    stream = pipe.condition_encode_stream()
    assert isinstance(stream, ConditionEncodeStream) and stream.supported
    for t in range(frames):
        stream.add(cond[:, :, t:t + 1], mask[:, :, t:t + 1])
    context = stream.finish()
    assert torch.equal(context.tokens, want)
    assert context.matches(cond, mask) and not context.matches(cond, -mask)


def test_condition_context_is_used_only_for_its_own_condition(pipe, caplog):
    """The sampler takes tokens computed ahead for an equal cond and mask (same latents, no VAE encode of
    the condition), and ignores them, with a warning, for another condition."""
    cond, mask = _condition()
    stream = pipe.condition_encode_stream()
    for t in range(T):
        stream.add(cond[:, :, t:t + 1], mask[:, :, t:t + 1])
    context = stream.finish()

    def latents(c, m, **kwargs):
        return pipe(c, m, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                    **kwargs).frames

    want = latents(cond, mask)
    encodes = []
    original = pipe._vae_encode
    pipe._vae_encode = lambda video: encodes.append(video.shape[2]) or original(video)
    try:
        np.testing.assert_array_equal(latents(cond, mask, condition_context=context), want)
        assert encodes == [T]  # only the first-frame latent, not the condition's two encodes
        other = _condition(1)
        with caplog.at_level("WARNING"):
            np.testing.assert_array_equal(latents(*other, condition_context=context), latents(*other))
        assert any("condition context" in r.message for r in caplog.records)
    finally:
        del pipe._vae_encode


@pytest.mark.gpu
@torch.no_grad()
def test_condition_encode_stream_on_cuda_gives_prepare_condition_s_tokens():
    """On CUDA, with the VAE channels-last and its norms compiled (as ex4d runs it there): the streamed
    encodes give the whole-video encodes' tokens, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    p = build_pipeline(make_tiny_components(0), None, PerformanceOptions(compile=True), "cuda")
    g = torch.Generator("cuda").manual_seed(0)
    cond = torch.rand(1, 3, 9, H, W, device="cuda", generator=g) * 2 - 1
    mask = torch.where(torch.rand(1, 1, 9, H, W, device="cuda", generator=g) > 0.3, 1.0, -1.0).expand(1, 3, 9, H, W)
    mask = mask.clone()
    _, want = p.prepare_condition(cond, mask, None, torch.device("cuda"), y=torch.zeros(1))
    stream = p.condition_encode_stream()
    for t in range(9):
        stream.add(cond[:, :, t:t + 1], mask[:, :, t:t + 1])
    assert torch.equal(stream.finish().tokens, want)
