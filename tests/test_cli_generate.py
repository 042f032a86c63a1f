"""`ex4d generate` end to end on tiny weights: outputs, the write policy around X.mp4 / X.json, --fps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.io.video import read_video, write_video

tiny_wan = pytest.importorskip("tiny_wan")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_wan.write_tiny_models_dir(root)


@pytest.fixture()
def renders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    color = (rng.random((5, 32, 32, 3)) * 255).astype(np.uint8)
    mask = np.full((5, 32, 32), 255, np.uint8)
    mask[1:, :, 20:] = 0
    write_video(tmp_path / "color_30.mp4", color, 10)
    write_video(tmp_path / "mask_30.mkv", mask, 10, codec="ffv1")
    return tmp_path


def generate(models, folder, *extra):
    return main(["generate", "--color", str(folder / "color_30.mp4"), "--models-dir", str(models),
                 "--size", "32x32", "--steps", "2", "--device", "cpu", *extra])


def test_generate_writes_video_and_record_at_the_source_rate(models, renders, capsys):
    out = renders / "gen.mp4"
    assert generate(models, renders, "-o", str(out)) == 0
    frames, fps = read_video(out)
    assert frames.shape == (5, 32, 32, 3)
    assert abs(fps - 10.0) < 1e-6  # --fps defaults to the source's (the colour video's) rate
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["request"]["options"]["fps"] is None and record["frames"] == 5
    err = capsys.readouterr().err
    assert "sampling: 2/2 step" in err and "\r" not in err  # plain progress lines off a terminal
    # Its own outputs may be replaced by a rerun; --fps sets the rate.
    assert generate(models, renders, "-o", str(out), "--fps", "12") == 0
    assert abs(read_video(out)[1] - 12.0) < 1e-6


def test_generate_replaces_a_foreign_record_only_with_overwrite(models, renders, capsys):
    out = renders / "gen.mp4"
    foreign = out.with_suffix(".json")
    foreign.write_text("my notes\n")
    assert generate(models, renders, "-o", str(out)) == 1
    err = capsys.readouterr().err.strip()
    assert "did not write" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert foreign.read_text() == "my notes\n" and not out.exists()
    assert generate(models, renders, "-o", str(out), "--overwrite") == 0
    assert json.loads(foreign.read_text())["frames"] == 5


def test_generate_never_writes_onto_the_mask_it_was_given(models, renders, capsys):
    """The .mp4 mask given is swapped for its lossless .mkv twin; the .mp4 is still an input."""
    mask_mp4 = renders / "mask_30.mp4"
    write_video(mask_mp4, np.full((5, 32, 32, 3), 255, np.uint8), 10)
    before = mask_mp4.read_bytes()
    for flags in ([], ["--overwrite"]):
        assert generate(models, renders, "--mask", str(mask_mp4), "-o", str(mask_mp4), *flags) == 1
        assert "input" in capsys.readouterr().err
    assert mask_mp4.read_bytes() == before


def test_a_generation_killed_between_video_and_record_is_never_taken_for_current(models, renders, monkeypatch):
    """The record is retracted before the new video lands, so an old record never vouches for a new video;
    and a video edited after ex4d wrote it is not current either."""
    import ex4d.pipeline as pipeline
    from ex4d.pipeline import GenerateOptions, generation_is_current

    out = renders / "gen.mp4"
    color, mask = renders / "color_30.mp4", renders / "mask_30.mkv"
    assert generate(models, renders, "-o", str(out), "--seed", "1") == 0
    options_1 = GenerateOptions(seed=1, steps=2, size="32x32", models_dir=str(models), device="cpu", fps=None)
    assert generation_is_current(out, color, mask, options_1)

    real_atomic_path = pipeline.atomic_path

    def killed_before_the_record(path):
        if str(path).endswith(".json"):
            raise SystemExit("killed")  # the new video is in place, its record not yet
        return real_atomic_path(path)

    monkeypatch.setattr(pipeline, "atomic_path", killed_before_the_record)
    with pytest.raises(SystemExit):
        generate(models, renders, "-o", str(out), "--seed", "2")
    monkeypatch.setattr(pipeline, "atomic_path", real_atomic_path)
    assert out.is_file() and not out.with_suffix(".json").exists()
    assert not generation_is_current(out, color, mask, options_1)  # seed 2's video is not seed 1's

    assert generate(models, renders, "-o", str(out), "--seed", "1") == 0
    assert generation_is_current(out, color, mask, options_1)
    with open(out, "ab") as handle:
        handle.write(b"edited")
    assert not generation_is_current(out, color, mask, options_1)


@pytest.mark.parametrize("fails_in", ["sampler", "decode"])
def test_a_failed_regeneration_keeps_the_previous_video(models, renders, monkeypatch, fails_in):
    """The video is encoded while the VAE decodes. A run that fails keeps the previous video byte for byte;
    its record stays too if the failure came before any frame was decoded, and is retracted once the new
    frames have started to arrive (the old video is then no longer vouched for)."""
    from ex4d.diffusion.pipeline import EX4DPipeline

    out = renders / "gen.mp4"
    assert generate(models, renders, "-o", str(out), "--seed", "1") == 0
    video, record = out.read_bytes(), out.with_suffix(".json").read_text()

    if fails_in == "sampler":
        def broken(self, *args, **kwargs):
            raise MemoryError("out of memory in the sampler")
        monkeypatch.setattr(EX4DPipeline, "_predict", broken)
    else:
        def broken(self, latents, frame_sink):
            frame_sink(self.decode_latents(latents).numpy()[0, 0])
            raise MemoryError("out of memory in the decoder")
        monkeypatch.setattr(EX4DPipeline, "decode_latents_streamed", broken)
    assert generate(models, renders, "-o", str(out), "--seed", "2") != 0
    assert out.read_bytes() == video
    if fails_in == "sampler":
        assert out.with_suffix(".json").read_text() == record
    else:
        assert not out.with_suffix(".json").exists()
    ledger = ".ex4d-files.json"  # ex4d's list of the files it wrote
    assert [p.name for p in renders.iterdir() if p.name.startswith(".") and p.name != ledger] == []


def test_generation_failing_mid_decode_leaves_no_video(models, renders, monkeypatch):
    """The video is encoded while the VAE decodes: a failure after some frames were written keeps nothing."""
    from ex4d.diffusion.pipeline import EX4DPipeline

    handed_over = []

    def failing_decode(self, latents, frame_sink):
        frames = self.decode_latents(latents).numpy()
        for frame in frames[0][:3]:
            frame_sink(frame)
            handed_over.append(1)
        raise MemoryError("out of memory in the decoder")

    monkeypatch.setattr(EX4DPipeline, "decode_latents_streamed", failing_decode)
    before = sorted(p.name for p in renders.iterdir())
    assert generate(models, renders, "-o", str(renders / "gen.mp4")) != 0 and len(handed_over) == 3
    assert sorted(p.name for p in renders.iterdir()) == before, "no video, record or temporary file is left"
