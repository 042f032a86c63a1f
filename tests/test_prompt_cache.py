"""The prompt-embedding cache: a miss stores, a hit loads no text encoder and gives bit-identical embeddings
(and video), a stale key (the encoder file changed) recomputes, and ``ex4d convert --prompt-embeds`` fills it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ex4d.diffusion import prompt_cache as pc
from ex4d.diffusion.pipeline import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from ex4d.io.video import read_mask_video, read_video, write_video
from ex4d.pipeline import GenerateOptions, run_generate

tiny_wan = pytest.importorskip("tiny_wan")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tiny_wan.write_tiny_models_dir(tmp_path / "models")


@pytest.fixture()
def renders(tmp_path):
    rng = np.random.default_rng(0)
    write_video(tmp_path / "color_30.mp4", (rng.random((5, 16, 16, 3)) * 255).astype(np.uint8), 10)
    mask = np.full((5, 16, 16), 255, np.uint8)
    mask[1:, :, 9:] = 0
    write_video(tmp_path / "mask_30.mkv", mask, 10, codec="ffv1")
    return tmp_path / "color_30.mp4"


@pytest.fixture()
def loads(monkeypatch):
    """Which components each Wan load asked for, and how often umT5 itself was built."""
    from ex4d.diffusion import weights
    from ex4d.diffusion.weights import wan

    seen = {"components": [], "t5": 0}
    load, t5 = weights.load_wan_components, wan.load_t5_original

    def spy_load(*args, **kwargs):
        seen["components"].append(sorted(kwargs.get("components") or ()))
        return load(*args, **kwargs)

    def spy_t5(*args, **kwargs):
        seen["t5"] += 1
        return t5(*args, **kwargs)

    monkeypatch.setattr(weights, "load_wan_components", spy_load)
    monkeypatch.setattr(wan, "load_t5_original", spy_t5)
    return seen


def generate(models, color, out, **kwargs):
    options = GenerateOptions(models_dir=str(models), device="cpu", size="16x16", steps=1, **kwargs)
    return run_generate(color, None, out, options, cache={}, show_progress=False)


def entries(folder):
    return sorted(folder.glob("*.safetensors"))


def test_miss_then_hit_skips_the_text_encoder_and_keeps_the_video_bit_identical(models, renders, tmp_path, loads):
    cache = models / "prompt_cache"
    reference = generate(models, renders, tmp_path / "off.mp4", prompt_cache="off")
    assert not cache.exists() and loads["t5"] == 1
    generate(models, renders, tmp_path / "miss.mp4")  # miss: umT5 loads, both embeddings are stored
    assert loads["t5"] == 2 and len(entries(cache)) == 2
    generate(models, renders, tmp_path / "hit.mp4")  # hit: neither umT5 nor its tokenizer is loaded
    assert loads["t5"] == 2
    assert "text_encoder" not in loads["components"][-1] and "tokenizer" not in loads["components"][-1]
    assert "transformer" in loads["components"][-1]
    videos = [read_video(path)[0] for path in (reference, tmp_path / "miss.mp4", tmp_path / "hit.mp4")]
    assert np.array_equal(videos[0], videos[1]) and np.array_equal(videos[1], videos[2])


def test_without_cfg_only_the_positive_prompt_is_cached_and_needed(models, renders, tmp_path, loads):
    generate(models, renders, tmp_path / "a.mp4", cfg=1.0)
    assert len(entries(models / "prompt_cache")) == 1
    generate(models, renders, tmp_path / "b.mp4", cfg=1.0)
    assert loads["t5"] == 1  # the second run hit
    generate(models, renders, tmp_path / "c.mp4", cfg=5.0)  # needs the negative prompt too: a miss
    assert loads["t5"] == 2 and len(entries(models / "prompt_cache")) == 2


def test_a_changed_encoder_file_is_a_stale_key_and_recomputes(models, renders, tmp_path, loads):
    from ex4d.diffusion.weights import models_dir as md

    generate(models, renders, tmp_path / "a.mp4", prompt="a red car")
    t5_file = models / md.WAN_REPO / md.T5_FILE
    stat = t5_file.stat()
    os.utime(t5_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))  # re-downloaded / replaced
    generate(models, renders, tmp_path / "b.mp4", prompt="a red car")
    assert loads["t5"] == 2 and len(entries(models / "prompt_cache")) == 4  # new keys, new entries
    generate(models, renders, tmp_path / "c.mp4", prompt="a blue car")  # another prompt: a miss
    assert loads["t5"] == 3


def test_hit_gives_bit_identical_embeddings_and_checks_the_stored_key(tmp_path):
    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline

    pipe = build_pipeline(tiny_wan.make_tiny_components(0), None, PerformanceOptions(), "cpu")
    computed, _ = pipe.encode_prompt(DEFAULT_PROMPT, None, False, torch.device("cpu"), torch.float32)
    key = pc.cache_key(DEFAULT_PROMPT, encoder={"files": [["t5.pth", 1, 2]]}, text_len=512, dtype=torch.float32,
                       device_type="cpu")
    assert pc.load(tmp_path, key) is None  # a miss
    path = pc.store(tmp_path, key, computed)
    stored_rows = pc.load(tmp_path, key)
    assert stored_rows.dtype == computed.dtype and torch.equal(stored_rows, computed)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # only the true-length rows are on disk
        length = handle.get_slice("embeds").get_shape()[1]
    assert 0 < length < 512 and computed[:, length:].abs().max() == 0 and computed[:, length - 1].abs().max() > 0
    for changed in (dict(key, prompt=DEFAULT_NEGATIVE_PROMPT), dict(key, dtype="bfloat16"),
                    dict(key, device_type="cuda"), dict(key, encoder={"files": [["t5.pth", 1, 3]]})):
        assert pc.load(tmp_path, changed) is None
    # An entry whose stored key differs from its name (a copy, a collision) is a miss, not a wrong hit.
    other = pc.entry_path(tmp_path, dict(key, prompt="x"))
    other.write_bytes(path.read_bytes())
    assert pc.load(tmp_path, dict(key, prompt="x")) is None
    other.write_bytes(b"truncated")
    assert pc.load(tmp_path, dict(key, prompt="x")) is None


def test_cache_folder_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("EX4D_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert GenerateOptions().prompt_cache_dir() == tmp_path / "xdg" / "ex4d" / "prompt_embeds"
    assert GenerateOptions(models_dir=str(tmp_path / "m")).prompt_cache_dir() == tmp_path / "m" / "prompt_cache"
    assert GenerateOptions(models_dir="m", prompt_cache=str(tmp_path / "c")).prompt_cache_dir() == tmp_path / "c"
    assert GenerateOptions(prompt_cache="off").prompt_cache_dir() is None


def test_convert_precomputes_the_embeddings_that_generation_then_hits(models, renders, tmp_path, loads, capsys):
    from ex4d.cli import main

    assert main(["convert", "--models-dir", str(models), "--only", "prompt-embeds", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "prompt_embeds_positive:" in out and "prompt_embeds_negative:" in out
    assert loads["components"] == [["text_encoder", "tokenizer"]] and len(entries(models / "prompt_cache")) == 2
    generate(models, renders, tmp_path / "a.mp4")
    assert loads["t5"] == 1  # only convert's
    assert json.loads((tmp_path / "a.json").read_text())["frames"] == 5
    # Run again: the entries are current and kept.
    assert main(["convert", "--models-dir", str(models), "--only", "prompt-embeds", "--device", "cpu"]) == 0
    assert loads["t5"] == 1


condition_contexts: list = []


@pytest.fixture()
def first_frame_spies(monkeypatch):
    """(contexts, threads): the first_frame_context each pipeline call got, and the thread each frame-0
    computation ran on. The condition_context each call got goes to the module's condition_contexts."""
    import threading

    from ex4d.diffusion.pipeline import EX4DPipeline

    contexts, threads = [], []
    condition_contexts.clear()
    call, make = EX4DPipeline.__call__, EX4DPipeline.first_frame_context

    def spy_call(self, *args, **kwargs):
        contexts.append(kwargs.get("first_frame_context"))
        condition_contexts.append(kwargs.get("condition_context"))
        return call(self, *args, **kwargs)

    def spy_make(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return make(self, *args, **kwargs)

    monkeypatch.setattr(EX4DPipeline, "__call__", spy_call)
    monkeypatch.setattr(EX4DPipeline, "first_frame_context", spy_make)
    return contexts, threads


def test_warm_run_computes_frame_0_ahead_and_gives_the_same_video(models, renders, tmp_path, monkeypatch,
                                                                  request):
    """A warm run (the pipeline in the cache) starts CLIP and the first-frame latent on a helper thread
    while the condition loads, and the sampler takes them: the video is the one computed in the call. A
    frame 0 that differs from the condition's (here: forced) is not used."""
    import ex4d.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_condition_device", lambda options, parallel=None: torch.device("cpu"))
    options = GenerateOptions(models_dir=str(models), device="cpu", size="16x16", steps=1)
    cache = {}
    first = run_generate(renders, None, tmp_path / "cold.mp4", options, cache=cache, show_progress=False)
    contexts, threads = request.getfixturevalue("first_frame_spies")  # spies from here on
    warm = run_generate(renders, None, tmp_path / "warm.mp4", options, cache=cache, show_progress=False)
    assert threads and threads[0].startswith("first frame ahead")
    assert contexts[-1] is not None and contexts[-1].num_frames == 5
    np.testing.assert_array_equal(read_video(warm)[0], read_video(first)[0])

    import ex4d.diffusion.conditioning as conditioning
    peek = conditioning.first_frame_ahead
    monkeypatch.setattr(conditioning, "first_frame_ahead", lambda *a, **k: (255 - peek(*a, **k)[0], 5))
    other = run_generate(renders, None, tmp_path / "other.mp4", options, cache=cache, show_progress=False)
    assert len(threads) == 2 and contexts[-1] is None  # computed ahead, did not match, not passed
    np.testing.assert_array_equal(read_video(other)[0], read_video(first)[0])


def test_recon_chain_does_the_condition_s_work_during_recon_and_gives_the_same_video(models, tmp_path, monkeypatch,
                                                                                   request):
    """Chained warm as batch jobs chain them (start_ahead_of_recon): recon's colour encoder hands over
    each frame as the files will decode while recon runs; frame 0's work and then the condition's
    encodes run on a helper thread, and generation takes both (it neither reads frame 0 from the file
    nor VAE-encodes anything itself); the video is the one computed in the call. Reused recon outputs
    hand over nothing, and generation then does the work itself as before."""
    import threading

    import ex4d.diffusion.conditioning as conditioning
    import ex4d.pipeline as pipeline
    from ex4d.diffusion.pipeline import ConditionContext, EX4DPipeline

    frames = np.stack([np.roll((np.indices((32, 32)).sum(0)[..., None] * [7, 3, 5]) % 256, 2 * t, axis=1)
                       for t in range(5)]).astype(np.uint8)
    video = write_video(tmp_path / "clip.mkv", frames, fps=10, codec="ffv1")
    depth = np.full((5, 32, 32), 6.0, np.float32)
    depth[:, 8:20, 10:24] = 3.0
    np.savez(tmp_path / "depth.npz", depth=depth)
    clip = pipeline.load_clip(video, num_frames=5, resize="keep")
    depth_video = pipeline.estimate_depth(clip, str(tmp_path / "depth.npz"))
    recon_options = pipeline.ReconOptions(cam="30", device="cpu")

    monkeypatch.setattr(pipeline, "_condition_device", lambda options, parallel=None: torch.device("cpu"))
    # size 16x16: the condition is resized frame by frame during recon as load_condition resizes it
    options = GenerateOptions(models_dir=str(models), device="cpu", size="16x16", steps=1, seed=3)
    cache = {}
    assert pipeline.start_ahead_of_recon(options, cache, 5) is None  # cold: nothing to run ahead on
    recon = pipeline.run_recon(clip, depth_video, tmp_path / "recon", recon_options)
    assert not read_mask_video(recon["mask_lossless"]).all()  # some of it unseen: the mask matters
    monkeypatch.setattr(pipeline, "FIRST_FRAME_AHEAD", False)
    in_call = run_generate(recon["color"], None, tmp_path / "in_call.mp4", options, cache=cache, show_progress=False)
    monkeypatch.setattr(pipeline, "FIRST_FRAME_AHEAD", True)
    contexts, threads = request.getfixturevalue("first_frame_spies")  # spies from here on

    def no_file_peek(*args, **kwargs):
        raise AssertionError("frame 0 was read from the file")

    monkeypatch.setattr(conditioning, "first_frame_ahead", no_file_peek)
    lookups, lookup = [], pipeline._cached_prompt_embeds
    monkeypatch.setattr(pipeline, "_cached_prompt_embeds", lambda *a, **k: lookups.append(1) or lookup(*a, **k))
    encodes, encode = [], EX4DPipeline._vae_encode
    monkeypatch.setattr(EX4DPipeline, "_vae_encode", lambda self, video: encodes.append(
        threading.current_thread() is threading.main_thread()) or encode(self, video))
    ahead = pipeline.start_ahead_of_recon(options, cache, clip.num_frames)
    chained = pipeline.run_recon(clip, depth_video, tmp_path / "chained", recon_options, condition_sink=ahead.sink)
    assert ahead.future is not None and ahead.condition is not None
    out = run_generate(chained["color"], None, tmp_path / "chained.mp4", options, cache=cache, show_progress=False,
                       ahead=ahead)
    assert len(threads) == 1 and threads[0].startswith("generation work ahead")
    assert contexts[-1] is not None and contexts[-1].num_frames == 5
    assert isinstance(condition_contexts[-1], ConditionContext)
    assert encodes == [False]  # frame 0's latent, on the helper; the condition's encodes were streamed there
    assert len(lookups) == 1  # the prompt cache was read once for the chained job
    # The same condition files as recon's first run (same frames), so the same video as computed in the call.
    np.testing.assert_array_equal(read_video(chained["color"])[0], read_video(recon["color"])[0])
    np.testing.assert_array_equal(read_video(out)[0], read_video(in_call)[0])

    reused = pipeline.start_ahead_of_recon(options, cache, clip.num_frames)
    assert pipeline.run_recon(clip, depth_video, tmp_path / "chained", recon_options,
                              condition_sink=reused.sink).reused
    assert reused.future is None and reused.condition is None  # nothing encoded, nothing handed over


def test_work_ahead_that_fails_is_logged_and_done_in_the_call(models, renders, tmp_path, monkeypatch, caplog):
    """Frame 0's work ahead failing (say, out of GPU memory beside recon) does not fail the generation:
    it is logged, and the sampler computes frame 0 itself; the video is the same."""
    import ex4d.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_condition_device", lambda options, parallel=None: torch.device("cpu"))
    options = GenerateOptions(models_dir=str(models), device="cpu", size="16x16", steps=1)
    cache = {}
    first = run_generate(renders, None, tmp_path / "cold.mp4", options, cache=cache, show_progress=False)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(pipeline, "_first_frame_context_beside", out_of_memory)
    with caplog.at_level("WARNING"):
        warm = run_generate(renders, None, tmp_path / "warm.mp4", options, cache=cache, show_progress=False)
    assert any("frame 0's CLIP features and latent ahead failed" in r.message for r in caplog.records)
    np.testing.assert_array_equal(read_video(warm)[0], read_video(first)[0])
