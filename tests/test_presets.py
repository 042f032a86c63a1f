"""Sampler settings and presets: --preset full|fast, --steps, --guidance (--cfg), --shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ex4d.diffusion.pipeline import SAMPLER_PRESETS, make_scheduler, reference_sigmas, sampler_sigmas
from ex4d.errors import InputError
from ex4d.pipeline import GenerateOptions

tiny_wan = pytest.importorskip("tiny_wan")
pytestmark = pytest.mark.usefixtures("one_thread")

#: The step-distillation LoRAs' trained schedule (LightX2V WanStepDistillScheduler, shift 5, t = [1000, 750,
#: 500, 250] on the unshifted grid): shared/reference/distill-lora.md.
DISTILL_SIGMAS = [1.0, 0.9375, 5 / 6, 0.625]


def test_fast_preset_scheduler_gives_exactly_the_distillation_sigmas():
    options = GenerateOptions(preset="fast")
    assert (options.steps, options.cfg, options.shift) == (4, 1.0, 5.0)
    sigmas = sampler_sigmas(options.steps, options.shift)
    assert sigmas[-1] == 0.0 and len(sigmas) == 5
    assert np.allclose(sigmas[:4], DISTILL_SIGMAS, rtol=0, atol=1e-7)
    scheduler = make_scheduler(options.shift)
    scheduler.set_timesteps(sigmas=reference_sigmas(4).tolist())
    assert np.allclose(scheduler.timesteps.numpy(), [1000.0, 937.5, 833.3333, 625.0], atol=1e-3)
    # The Euler update is the trained one: x <- x + (sigma_next - sigma) v (= predict x0, re-noise to sigma_next).
    x, v = torch.randn(1, 4), torch.randn(1, 4)
    out = scheduler.step(v, scheduler.timesteps[1], x, return_dict=False)[0]
    assert torch.allclose(out, x + (scheduler.sigmas[2] - scheduler.sigmas[1]) * v)


def test_full_preset_is_todays_default_and_explicit_values_win():
    assert (GenerateOptions().steps, GenerateOptions().cfg, GenerateOptions().shift) == (25, 5.0, 5.0)
    assert SAMPLER_PRESETS["full"] == {"steps": 25, "guidance": 5.0, "shift": 5.0}
    mixed = GenerateOptions(preset="fast", steps=6, shift=3.0)
    assert (mixed.steps, mixed.cfg, mixed.shift) == (6, 1.0, 3.0)
    assert GenerateOptions(preset="fast", cfg=2.0).cfg == 2.0
    assert GenerateOptions(preset="FAST").preset == "fast"
    with pytest.raises(InputError, match="--preset must be one of full, fast"):
        GenerateOptions(preset="turbo")
    with pytest.raises(InputError, match="--shift must be"):
        GenerateOptions(shift=0.0).validate()
    with pytest.raises(InputError, match=r"--guidance \(--cfg\) must be"):
        GenerateOptions(cfg=0.5).validate()
    # The record keeps its old form for the reference's shift; another shift is a different output.
    assert "shift" not in GenerateOptions().record() and GenerateOptions(shift=3.0).record()["shift"] == 3.0
    assert GenerateOptions(preset="fast").record()["steps"] == 4


def parse(*argv):
    from ex4d.cli import build_parser
    from ex4d.commands.generate import options_from_args

    return options_from_args(build_parser().parse_args(["generate", "--color", "c.mp4", "-o", "o.mp4", *argv]))


def test_command_line_presets_guidance_alias_and_overrides():
    assert (parse().steps, parse().cfg, parse().shift) == (25, 5.0, 5.0)
    fast = parse("--preset", "fast")
    assert (fast.steps, fast.cfg, fast.shift) == (4, 1.0, 5.0)
    assert parse("--preset", "fast", "--steps", "8", "--guidance", "2").steps == 8
    assert parse("--preset", "fast", "--steps", "8", "--guidance", "2").cfg == 2.0
    assert parse("--cfg", "3.5").cfg == 3.5  # the old name still works
    assert parse("--shift", "3").shift == 3.0


@pytest.fixture(scope="module")
def pipe():
    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline

    p = build_pipeline(tiny_wan.make_tiny_components(0), None, PerformanceOptions(), "cpu")
    p.set_progress_bar_config(disable=True)
    return p


def _condition():
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
    mask = torch.ones(1, 3, 5, 16, 16)
    mask[:, :, 1:, :, 8:] = -1.0
    return cond, mask


def _count_calls(pipe, monkeypatch):
    """Record (batch size, timestep) of every DiT forward and every text-encoder forward."""
    forwards, texts = [], []
    dit_forward, text_forward = pipe.transformer.forward, pipe.text_encoder.forward

    def counted_dit(*args, **kwargs):
        forwards.append((kwargs["hidden_states"].shape[0], float(kwargs["timestep"][0])))
        return dit_forward(*args, **kwargs)

    def counted_text(*args, **kwargs):
        texts.append(1)
        return text_forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", counted_dit)
    monkeypatch.setattr(pipe.text_encoder, "forward", counted_text)
    return forwards, texts


def test_fast_preset_runs_one_forward_per_step_at_the_distillation_timesteps(pipe, monkeypatch):
    forwards, texts = _count_calls(pipe, monkeypatch)
    options = GenerateOptions(preset="fast")
    cond, mask = _condition()
    for batch_cfg in (False, True):  # batched CFG must not batch anything without CFG either
        forwards.clear()
        texts.clear()
        pipe(cond, mask, generator=torch.Generator().manual_seed(0), output_type="latent", batch_cfg=batch_cfg,
             **options.call_kwargs())
        assert [b for b, _ in forwards] == [1, 1, 1, 1]  # 4 steps, one forward of batch 1 each
        assert np.allclose([t for _, t in forwards], [1000.0, 937.5, 833.3333, 625.0], atol=1e-3)
        assert len(texts) == 1  # the negative prompt is not even encoded


def test_full_sampling_runs_two_forwards_per_step_and_shift_moves_the_timesteps(pipe, monkeypatch):
    forwards, texts = _count_calls(pipe, monkeypatch)
    cond, mask = _condition()
    pipe(cond, mask, generator=torch.Generator().manual_seed(0), output_type="latent",
         **GenerateOptions(steps=2).call_kwargs())
    assert len(forwards) == 4 and len(texts) == 2  # CFG: positive and negative each step
    shifted = [t for _, t in forwards[::2]]
    assert np.allclose(shifted, [1000.0, 1000 * 5 * 0.5 / (1 + 4 * 0.5)], atol=1e-3)
    forwards.clear()
    pipe(cond, mask, generator=torch.Generator().manual_seed(0), output_type="latent",
         **GenerateOptions(steps=2, shift=1.0).call_kwargs())
    assert np.allclose([t for _, t in forwards[::2]], [1000.0, 500.0], atol=1e-3)  # unshifted
    assert pipe.scheduler.config.shift == 5.0  # the pipeline's own scheduler keeps the reference's shift


def test_multi_gpu_workers_get_the_same_sampler_and_lora_options():
    from ex4d.commands import torchrun

    parser = torchrun.build_parser()
    args = parser.parse_args(["--color", "c.mp4", "-o", "o.mp4", "--preset", "fast", "--guidance", "2", "--shift", "3",
                              "--lora", "a.safetensors", "--lora", "b.safetensors:0.5", "--prompt-cache", "off"])
    again = parser.parse_args(torchrun.argv_from_args(args, parser))
    assert vars(again) == vars(args)
    assert again.loras == ["a.safetensors", "b.safetensors:0.5"] and (again.preset, again.cfg) == ("fast", 2.0)
