"""`ex4d run` end to end with tiny weight files: depth file -> recon -> generation, then skip on rerun."""

import json

import pytest

from ex4d.cli import main
from ex4d.io.video import read_video

tiny_wan = pytest.importorskip("tiny_wan")


@pytest.fixture()
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = tmp_path / "models"
    return tiny_wan.write_tiny_models_dir(root)


def run_cli(tmp_path, models, frames, extra=()):
    example = tmp_path / "example"
    if not (example / "video.mp4").exists():
        assert main(["synth", "-o", str(example), "--scene", "boxes", "--num-frames", str(frames),
                     "--size", "64x64"]) == 0
    out = tmp_path / "out"
    code = main(["run", str(example / "video.mp4"), "--depth", str(example / "depth.npz"), "--cam", "30",
                 "--num-frames", str(frames), "--resize", "keep", "-o", str(out), "--models-dir", str(models),
                 "--size", "16x16", "--steps", "2", "--device", "cpu", *extra])
    return code, out


def test_run_end_to_end_and_skips_when_current(tmp_path, models, capsys):
    code, out = run_cli(tmp_path, models, 5)
    assert code == 0
    video = out / "ex4d_30.mp4"
    frames, fps = read_video(video)
    assert frames.shape == (5, 16, 16, 3)
    assert abs(fps - 15.0) < 1e-6  # the source's rate by default (synth wrote 15 fps)
    record = json.loads((out / "ex4d_30.json").read_text())
    assert record["request"]["options"]["steps"] == 2
    before = video.stat().st_mtime_ns
    first = capsys.readouterr()
    assert "reused" not in first.err
    code, _ = run_cli(tmp_path, models, 5)
    assert code == 0
    second = capsys.readouterr()
    assert "up to date" in second.out
    # recon says on stderr what it reused
    assert f"recon: outputs in {out} are current (recon_30.json); reused" in second.err
    assert f"depth in {out / 'depth.npz'} is current" in second.err
    assert video.stat().st_mtime_ns == before  # not regenerated
    code, _ = run_cli(tmp_path, models, 5, extra=["--seed", "1"])
    assert code == 0 and video.stat().st_mtime_ns != before  # a changed setting regenerates


def test_run_long_clip_in_windows(tmp_path, models):
    # 13 frames with 9-frame windows overlapping by 5: windows (0, 9) and (4, 13).
    code, out = run_cli(tmp_path, models, 13, extra=["--window", "9", "--overlap", "5"])
    assert code == 0
    frames, _ = read_video(out / "ex4d_30.mp4")
    assert frames.shape == (13, 16, 16, 3)


def test_run_rejects_a_clip_that_is_not_4k_plus_1(tmp_path, models, capsys):
    code, out = run_cli(tmp_path, models, 6)
    assert code == 1
    assert "4k+1" in capsys.readouterr().err.replace("4k + 1", "4k+1")
    assert not (out / "ex4d_30.mp4").exists()


def test_run_fps_sets_every_video_it_writes(tmp_path, models, capsys):
    """--fps is the output rate of the renders and of the generated video; --out-fps is a hidden old alias."""
    code, out = run_cli(tmp_path, models, 5, extra=["--fps", "12"])
    assert code == 0
    for name in ("color_30.mp4", "mask_30.mp4", "ex4d_30.mp4"):
        assert abs(read_video(out / name)[1] - 12.0) < 1e-6, name
    capsys.readouterr()
    code, out = run_cli(tmp_path, models, 5, extra=["--fps", "12", "--out-fps", "20"])
    assert code == 0
    assert "--out-fps is deprecated" in capsys.readouterr().err
    assert abs(read_video(out / "ex4d_30.mp4")[1] - 20.0) < 1e-6
    assert abs(read_video(out / "color_30.mp4")[1] - 12.0) < 1e-6
    from ex4d.cli import build_parser

    assert "--out-fps" not in build_parser()._subparsers._group_actions[0].choices["run"].format_help()
