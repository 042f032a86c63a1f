"""The EX-4D training system on tiny random Wan models: it learns, resumes exactly, and what it saves
is what the generation stage loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_wan import make_tiny_components, tiny_transformer_config  # noqa: E402

from ex4d.train.trainer import TrainConfig, train  # noqa: E402
from ex4d.train.wan_system import EX4DTrainSystem, ModelConfig  # noqa: E402

T, H, W = 5, 16, 16
HEADS = 4  # inner dim 96 >= the 64 outputs per token (16 channels x 2 x 2), so the output is reachable


def _components(seed: int = 0) -> dict:
    """tiny_wan's VAE/CLIP, with a default-initialised (small-output) DiT 4 heads x 24 wide."""
    from diffusers import WanTransformer3DModel

    comps = make_tiny_components(seed)
    torch.manual_seed(seed)
    comps["transformer"] = WanTransformer3DModel.from_config(
        {**tiny_transformer_config(), "num_attention_heads": HEADS, "attention_head_dim": 24,
         "added_kv_proj_dim": HEADS * 24})
    return comps


def _text() -> torch.Tensor:
    return torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))


class _Clips(torch.utils.data.Dataset):
    """One or two synthetic clips with a simulated-looking mask (right half hidden after frame 0)."""

    def __init__(self, count: int = 1) -> None:
        from ex4d.synthetic.scenes import make_example

        videos = [torch.from_numpy(make_example(s, T, (H, W))[0].frames) for s in ("boxes", "planes")[:count]]
        self.video = torch.stack(videos)
        self.mask = torch.ones(count, T, H, W, dtype=torch.bool)
        self.mask[:, 1:, :, W // 2:] = False

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], "mask": self.mask[i], "index": torch.tensor(i)}


def _system(**overrides) -> EX4DTrainSystem:
    values = dict(lora_rank=8, lora_alpha=8.0, encoder_hidden=16, gradient_checkpointing=False, erode=False,
                  cache_encodings=True)
    values.update(overrides)
    return EX4DTrainSystem(_components(), ModelConfig(**values), text_embeds=_text())


def _fixed_loss(system: EX4DTrainSystem, dataset) -> tuple[float, float]:
    """Unweighted loss at fixed sigmas and noises, and the noise floor mean(eps^2) of those draws."""
    batch = {k: v[None] for k, v in dataset[0].items()}
    batch["seed"] = torch.tensor([123])
    total = floor = 0.0
    with torch.no_grad():
        inputs = system.prepare(batch)
        sigmas = (0.2, 0.4, 0.6, 0.8, 0.95)
        for i, s in enumerate(sigmas):
            sigma = torch.tensor([s])
            noise = torch.randn(inputs["x0"].shape, generator=torch.Generator().manual_seed(i))
            x_t, target = system.objective.noisy(inputs["x0"], noise, sigma)
            v = system.predict(x_t, sigma, inputs["y"], inputs["image_embeds"], inputs["tokens"])
            total += float(((v - target) ** 2).mean())
            floor += float((noise ** 2).mean())
    return total / len(sigmas), floor / len(sigmas)


def test_fresh_adapter_is_a_no_op_and_counts_parameters():
    system = _system()
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("camera_encoder.") for n in trainable)
    lora = system.lora_state_dict()
    assert len(lora) == 2 * 10 * tiny_transformer_config()["num_layers"]
    batch = {k: v[None] for k, v in _Clips()[0].items()}
    batch["seed"] = torch.tensor([5])
    inputs = system.prepare(batch)
    assert float(inputs["tokens"].detach().abs().max()) == 0.0  # zero-initialised last layer


def test_tiny_model_overfits_one_clip(tmp_path):
    """With a random (untrained) base DiT, the adapter cannot learn to pass the noise through (the
    base model's job), so the loss has a floor of about mean(eps^2); what the adapter must learn is
    the rest (the clip's content from its condition). Measured: the loss above the floor falls from
    1.47 to 0.32 (factor 4.3-4.6) in 30 steps; asserted > 3.
    """
    dataset = _Clips()
    system = _system(timestep_weighting="none")
    before, floor = _fixed_loss(system, dataset)
    train(system, dataset, TrainConfig(output_dir=str(tmp_path), max_steps=30, learning_rate=2e-2, max_grad_norm=0,
                                       checkpoint_every=0, tensorboard=False))
    after, _ = _fixed_loss(system, dataset)
    assert after < before
    assert (before - floor) / (after - floor) > 3.0, (before, after, floor)


def test_resume_equals_uninterrupted_run_and_generation_loads_it(tmp_path):
    from ex4d.diffusion.pipeline import build_pipeline
    from ex4d.diffusion.weights.adapter import load_ex4d_adapter

    dataset = _Clips(2)
    config = dict(max_steps=4, batch_size=1, learning_rate=1e-2, checkpoint_every=2, tensorboard=False)
    full = train(_system(), dataset, TrainConfig(output_dir=str(tmp_path / "full"), **config))
    first = train(_system(), dataset, TrainConfig(output_dir=str(tmp_path / "split"), **config), stop_after=2)
    resumed_system = _system()
    second = train(resumed_system, dataset, TrainConfig(output_dir=str(tmp_path / "split"), **config))
    assert first.step == 2 and second.step == 4
    assert first.losses + second.losses == full.losses  # bit-identical
    from safetensors.torch import load_file

    # Tensors, not file bytes: the safetensors header's metadata order is not stable across processes.
    a = load_file(str(tmp_path / "full" / "final" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The generation stage loads the saved ex4d.ckpt unchanged and predicts what the trainer predicts.
    weights = load_ex4d_adapter(tmp_path / "split" / "final" / "ex4d.ckpt",
                                transformer_config=dict(resumed_system.transformer.config))
    pipe = build_pipeline(_components(), weights, device="cpu")  # merged LoRA, fused QKV: the generate path
    batch = {k: v[None] for k, v in dataset[1].items()}
    batch["seed"] = torch.tensor([77])
    with torch.no_grad():
        inputs = resumed_system.prepare(batch)
        assert float(inputs["tokens"].abs().max()) > 0  # the encoder did train
        cond = resumed_system.condition(batch["video"][0], batch["mask"][0], seed=0)
        y, tokens = pipe.prepare_condition(cond["cond"], cond["mask"], cond["image"], torch.device("cpu"))
        torch.testing.assert_close(tokens, inputs["tokens"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, inputs["y"], rtol=1e-5, atol=1e-6)
        sigma = torch.tensor([0.7])
        x_t = torch.randn(inputs["x0"].shape, generator=torch.Generator().manual_seed(1))
        trained = resumed_system.predict(x_t, sigma, inputs["y"], inputs["image_embeds"], inputs["tokens"])
        with pipe.injector.active(tokens):
            loaded = pipe.transformer(hidden_states=torch.cat([x_t, y], 1), timestep=sigma * 1000,
                                      encoder_hidden_states=_text(), encoder_hidden_states_image=inputs["image_embeds"],
                                      return_dict=False)[0]
        torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
        # and the adapter changed the prediction relative to the base model
        with pipe.injector.active(torch.zeros_like(tokens)):
            assert not torch.allclose(loaded, _components()["transformer"](
                hidden_states=torch.cat([x_t, y], 1), timestep=sigma * 1000, encoder_hidden_states=_text(),
                encoder_hidden_states_image=inputs["image_embeds"], return_dict=False)[0], atol=1e-4)


def test_inputs_follow_the_inference_conditioning():
    """Erosion sizes come from the sample seed; cond/mask are the pipeline's scalings of the eroded mask."""
    from ex4d.diffusion.conditioning import erode_masks, sample_erosion_sizes, scale_condition

    system = _system(erode=True, cache_encodings=False)
    clip = _Clips()[0]
    out = system.condition(clip["video"], clip["mask"], seed=9)
    sizes = sample_erosion_sizes(T, 9)
    assert out["kernel_sizes"] == sizes
    cond, mask = scale_condition(clip["video"], erode_masks(clip["mask"], sizes))
    assert torch.equal(out["cond"], cond) and torch.equal(out["mask"], mask)
    assert out["image"].shape == (1, 3, H, W) and float(out["image"].min()) >= -1.0
    again = system.condition(clip["video"], clip["mask"], seed=9)
    assert torch.equal(again["cond"], out["cond"])


def test_bad_settings_are_user_errors(tmp_path):
    from ex4d.errors import InputError

    with pytest.raises(InputError, match="unknown LoRA target"):
        _system(lora_targets=("q", "wq"))
    with pytest.raises(InputError, match="empty"):
        train(_system(), torch.utils.data.Subset(_Clips(), []),
              TrainConfig(output_dir=str(tmp_path), max_steps=1, tensorboard=False))


def test_cli_train_bad_inputs(tmp_path, capsys):
    from ex4d.cli import main

    (tmp_path / "ds" / "clips").mkdir(parents=True)
    assert main(["train", str(tmp_path / "ds"), "-o", str(tmp_path / "run")]) == 1
    assert "no finished pairs" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing"), "-o", str(tmp_path / "run")]) == 1
    assert main(["train", str(tmp_path / "ds"), "-o", str(tmp_path / "run"), "--steps", "0"]) == 1


def test_cli_make_pairs_train_generate(tmp_path, capsys):
    """The whole chain through the CLI: pairs -> 2 training steps -> `ex4d generate` loads the result."""
    from ex4d.cli import main
    from ex4d.io.video import read_video

    _make_pairs(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "pairs"), "-o", str(run), "--models-dir", str(tmp_path / "models"),
                 "--steps", "2", "--size", "16x16", "--num-frames", str(T), "--encoder-hidden", "16",
                 "--lora-rank", "4", "--lora-alpha", "4", "--num-workers", "0", "--validation-pairs", "1",
                 "--validate-every", "2"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert (run / "validation" / "step-000002" / "sample_00.mp4").is_file()
    assert (run / "validation.csv").read_text().splitlines()[0] == "step,psnr"
    pair = tmp_path / "pairs" / "clips" / "planes"
    out = tmp_path / "generated.mp4"
    assert main(["generate", "--color", str(pair / "cond.mp4"), "--mask", str(pair / "mask.mkv"), "-o", str(out),
                 "--models-dir", str(tmp_path / "models"), "--adapter", str(run / "final" / "ex4d.ckpt"),
                 "--steps", "2", "--size", "16x16", "--num-frames", str(T), "--device", "cpu"]) == 0
    frames, _ = read_video(out)
    assert frames.shape == (T, 16, 16, 3)


def test_erosion_stays_on_the_mask_device():
    """condition() erodes where the mask lives (no CPU round trip): on the meta device, where a
    copy to the CPU is impossible, it runs and keeps every output there."""
    system = _system(erode=True, cache_encodings=False)
    clip = _Clips()[0]
    out = system.condition(clip["video"].to("meta"), clip["mask"].to("meta"), seed=9)
    assert out["cond"].device.type == out["mask"].device.type == out["image"].device.type == "meta"
    assert out["cond"].shape == (1, 3, T, H, W)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_erosion_on_the_gpu_equals_the_cpu():
    system = _system(erode=True, cache_encodings=False)
    clip = _Clips()[0]
    cpu = system.condition(clip["video"], clip["mask"], seed=9)
    gpu = system.condition(clip["video"].cuda(), clip["mask"].cuda(), seed=9)
    assert torch.equal(gpu["mask"].cpu(), cpu["mask"]) and torch.equal(gpu["cond"].cpu(), cpu["cond"])


def test_adapter_export_from_gathered_tensors_equals_the_module_state():
    """Under FSDP the trainer exports from gathered tensors; they must name what the module does."""
    from ex4d.train.trainer import gather_trainable

    system = _system()
    with torch.no_grad():
        for i, p in enumerate(q for q in system.parameters() if q.requires_grad):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    lora, encoder = system.split_trainable(gather_trainable(system))
    want_lora, want_encoder = system.lora_state_dict(), system.camera_encoder.state_dict()
    assert lora.keys() == want_lora.keys() and encoder.keys() == want_encoder.keys()
    assert all(torch.equal(lora[k], want_lora[k]) for k in lora)
    assert all(torch.equal(encoder[k], want_encoder[k]) for k in encoder)


def _make_pairs(tmp_path) -> None:
    """Two synthetic clips with exact depth -> tmp_path/pairs, and tiny Wan weights in tmp_path/models."""
    from tiny_wan import write_tiny_original_layout

    from ex4d.cli import main
    from ex4d.io.video import to_uint8, write_video
    from ex4d.synthetic.scenes import make_example

    videos, depths = tmp_path / "videos", tmp_path / "depth"
    videos.mkdir()
    depths.mkdir()
    for scene in ("boxes", "planes"):
        clip, depth = make_example(scene, T, (32, 32))
        write_video(videos / f"{scene}.mp4", to_uint8(clip.frames), 15.0)
        depth.save(depths / f"{scene}.npz")
    write_tiny_original_layout(tmp_path / "models" / "Wan-AI" / "Wan2.1-I2V-14B-480P", seed=0)
    assert main(["make-pairs", str(videos), "--depth", str(depths), "--num-frames", str(T), "-o",
                 str(tmp_path / "pairs"), "--device", "cpu"]) == 0


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo DDP): both join one group, and the main process's result
    equals a single process taking both samples per step (batch 2), i.e. gradients were averaged
    across the processes; a process training alone would differ. About 40 s (spawns processes)."""
    import json
    import subprocess

    from safetensors.torch import load_file

    from ex4d.cli import main

    _make_pairs(tmp_path)
    common = ["--models-dir", str(tmp_path / "models"), "--steps", "2", "--size", "16x16", "--num-frames", str(T),
              "--encoder-hidden", "16", "--lora-rank", "4", "--lora-alpha", "4", "--num-workers", "0",
              "--lr", "1e-2", "--max-grad-norm", "0"]
    ddp = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ex4d.cli", "train", str(tmp_path / "pairs"), "-o", str(ddp), *common]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("trained to step 2") == 1  # only the main process reports
    run = json.loads((ddp / "config.json").read_text())["run"]
    assert run == {"world_size": 2, "distributed_type": "MULTI_CPU"}
    assert len((ddp / "log.csv").read_text().splitlines()) == 3

    single = tmp_path / "single"
    assert main(["train", str(tmp_path / "pairs"), "-o", str(single), "--batch-size", "2", *common]) == 0
    assert json.loads((single / "config.json").read_text())["run"]["world_size"] == 1
    a = load_file(str(ddp / "final" / "adapter.safetensors"))
    b = load_file(str(single / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # equal up to float reordering (Adam's first steps amplify it on near-zero gradients)
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    # ... and not what one process training on its own samples (batch 1) ends at
    alone = tmp_path / "alone"
    assert main(["train", str(tmp_path / "pairs"), "-o", str(alone), "--batch-size", "1", *common]) == 0
    c = load_file(str(alone / "final" / "adapter.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3
