"""ex4d stereo-pack (layouts, sizes, metadata read back with PyAV, error lines), and --cam stereo through
recon -> stereo-pack (offline), run (tiny weights) and batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.io.video import probe_video, read_video, write_video
from ex4d.stereo.pack import (DUBOIS_LEFT, DUBOIS_RIGHT, MATROSKA_STEREO_MODE_VALUE, anaglyph_dubois, pack_frame,
                              read_stereo_metadata)

H, W, T = 32, 46, 3  # W / 2 = 23 is odd: sbs-half squeezes each eye to 22 (even, for H.264)


def _eyes(tmp_path, *, frames=T, size=(H, W), fps=10.0, names=("left.mp4", "right.mp4")):
    height, width = size
    left = np.zeros((frames, height, width, 3), np.uint8)
    right = np.zeros_like(left)
    left[..., 0] = 220  # a red left eye and a blue right eye: easy to tell apart after packing
    right[..., 2] = 220
    paths = tmp_path / names[0], tmp_path / names[1]
    write_video(paths[0], left, fps=fps)
    write_video(paths[1], right, fps=fps)
    return paths


def test_pack_frame_layouts():
    left = np.full((4, 6, 3), 10, np.uint8)
    right = np.full((4, 6, 3), 200, np.uint8)
    sbs = pack_frame(left, right, "sbs")
    assert sbs.shape == (4, 12, 3) and (sbs[:, :6] == 10).all() and (sbs[:, 6:] == 200).all()
    tb = pack_frame(left, right, "tb")
    assert tb.shape == (8, 6, 3) and (tb[:4] == 10).all() and (tb[4:] == 200).all()
    half = pack_frame(left, right, "sbs-half")
    assert half.shape == (4, 4, 3) and (half[:, :2] == 10).all() and (half[:, 2:] == 200).all()  # 6/2=3 -> 2
    anaglyph = pack_frame(left, right, "anaglyph")
    assert anaglyph.shape == (4, 6, 3)


def test_anaglyph_is_dubois_red_cyan():
    grey, black = np.full((1, 1, 3), 100, np.uint8), np.zeros((1, 1, 3), np.uint8)
    # The left eye alone reaches only the red channel (the red filter), the right eye only green and blue.
    left_only = anaglyph_dubois(grey, black)[0, 0]
    assert left_only[0] == round(100 * DUBOIS_LEFT[0].sum()) == 113 and left_only[1] == 0 and left_only[2] == 0
    right_only = anaglyph_dubois(black, grey)[0, 0]
    assert right_only[0] == 0 and right_only[1] == round(100 * DUBOIS_RIGHT[1].sum()) == 109
    assert right_only[2] == round(100 * DUBOIS_RIGHT[2].sum()) == 104


@pytest.mark.parametrize("container", ["mkv", "mp4"])
def test_stereo_pack_writes_every_layout_with_its_metadata(tmp_path, capsys, container):
    left, right = _eyes(tmp_path)
    out = tmp_path / "packed"
    assert main(["stereo-pack", str(left), str(right), "-o", str(out), "--container", container]) == 0
    sizes = {"sbs": (H, 2 * W), "sbs-half": (H, 44), "tb": (2 * H, W), "anaglyph": (H, W)}
    for layout, size in sizes.items():
        path = out / f"right_{layout}.{container}"
        assert str(path) in capsys.readouterr().out or path.is_file()
        frames, fps = read_video(path)
        assert frames.shape == (T, *size, 3), layout
        assert fps == pytest.approx(10.0)
        meta = read_stereo_metadata(path)
        # H.264 frame-packing SEI in both containers: FFmpeg's AVStereo3DType 1 side by side, 2 top-bottom
        assert meta["stereo3d_type"] == {"sbs": 1, "sbs-half": 1, "tb": 2, "anaglyph": None}[layout], layout
        mode = {"sbs": "left_right", "sbs-half": "left_right", "tb": "top_bottom"}.get(layout)
        raw = path.read_bytes()
        if container == "mkv" and mode:
            assert meta["stereo_mode"] == mode
            # the Matroska StereoMode element itself: ID 0x53B8, size 1, value 1 (side by side) or 3 (top-bottom)
            assert bytes([0x53, 0xB8, 0x81, MATROSKA_STEREO_MODE_VALUE[mode]]) in raw
        else:
            assert meta["stereo_mode"] is None
    frames, _ = read_video(out / f"right_sbs.{container}")
    assert frames[0, H // 2, W // 2, 0] > 150 and frames[0, H // 2, W + W // 2, 2] > 150  # left eye on the left
    frames, _ = read_video(out / f"right_tb.{container}")
    assert frames[0, H // 2, W // 2, 0] > 150 and frames[0, H + H // 2, W // 2, 2] > 150  # left eye on top


def test_layouts_prefix_and_a_bad_layout(tmp_path, capsys):
    left, right = _eyes(tmp_path)
    out = tmp_path / "packed"
    assert main(["stereo-pack", str(left), str(right), "-o", str(out), "--layouts", "anaglyph,sbs",
                 "--prefix", "movie"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["movie_anaglyph.mkv",
                                                                                   "movie_sbs.mkv"]
    capsys.readouterr()
    assert main(["stereo-pack", str(left), str(right), "-o", str(tmp_path / "p2"), "--layouts", "sbs,3d"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown stereo layout '3d'" in err
    assert not (tmp_path / "p2" / "right_sbs.mkv").exists()


@pytest.mark.parametrize("other, message", [
    (dict(frames=T + 1), "the eyes differ in frame count"),
    (dict(size=(H, W + 2)), "the eyes differ in size"),
    (dict(fps=12.0), "the eyes differ in frame rate"),
])
def test_mismatched_eyes_are_refused_in_one_line(tmp_path, capsys, other, message):
    left, _ = _eyes(tmp_path)
    _, right = _eyes(tmp_path, names=("unused.mp4", "right_other.mp4"), **other)
    out = tmp_path / "packed"
    assert main(["stereo-pack", str(left), str(right), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not any(p.suffix in (".mkv", ".mp4") for p in out.iterdir())  # nothing written


def test_stereo_pack_never_overwrites_an_input(tmp_path, capsys):
    left, right = _eyes(tmp_path, names=("left.mp4", "right_sbs.mp4"))
    code = main(["stereo-pack", str(left), str(right), "-o", str(tmp_path), "--prefix", "right",
                 "--layouts", "sbs", "--container", "mp4", "--overwrite"])
    assert code == 1 and "input" in capsys.readouterr().err
    assert probe_video(right)[1] == (H, W)


# ------------------------------------------------------------------------------------------------
# --cam stereo end to end


def _example(tmp_path, frames=5):
    example = tmp_path / "example"
    if not (example / "video.mp4").exists():
        assert main(["synth", "-o", str(example), "--scene", "boxes", "--num-frames", str(frames),
                     "--size", "64x64"]) == 0
    return example


def test_recon_stereo_then_stereo_pack_offline(tmp_path, capsys):
    example = _example(tmp_path)
    out = tmp_path / "out"
    assert main(["recon", str(example / "video.mp4"), "--depth", str(example / "depth.npz"), "--cam", "stereo",
                 "--num-frames", "5", "--resize", "keep", "-o", str(out), "--device", "cpu"]) == 0
    for name in ("color_stereo.mp4", "mask_stereo.mkv", "camera_stereo.npz", "left_stereo.mp4", "recon_stereo.json"):
        assert (out / name).is_file(), name
    with np.load(out / "camera_stereo.npz") as camera:
        K, poses = camera["K"], camera["cam_from_world"]
    record = json.loads((out / "recon_stereo.json").read_text())
    settings = record["trajectory"]["settings"]
    assert K.shape == (5, 3, 3) and settings["kind"] == "stereo" and settings["converge"] == "subject"
    np.testing.assert_allclose(poses[:, 0, 3], -settings["baseline"])  # right eye B to the right
    np.testing.assert_allclose(K[:, 0, 2], 32 + 500 * settings["baseline"] / settings["subject_depth"])
    # a synthetic depth file counts as metric, so baseline=<v>m is accepted with it
    left_frames, _ = read_video(out / "left_stereo.mp4")
    source, _ = read_video(example / "video.mp4")
    assert np.abs(left_frames.astype(int) - source.astype(int)).mean() < 3  # the left eye is the source
    right_frames, _ = read_video(out / "color_stereo.mp4")
    assert np.abs(right_frames[0].astype(int) - source[0].astype(int)).mean() > 3  # frame 0 is the right eye
    capsys.readouterr()
    packed = tmp_path / "packed"
    assert main(["stereo-pack", str(out / "left_stereo.mp4"), str(out / "color_stereo.mp4"), "-o", str(packed)]) == 0
    frames, _ = read_video(packed / "color_stereo_sbs.mkv")
    assert frames.shape == (5, 64, 128, 3)
    assert read_stereo_metadata(packed / "color_stereo_sbs.mkv")["stereo_mode"] == "left_right"


def test_recon_stereo_metres_need_metric_depth(tmp_path, capsys):
    example = _example(tmp_path)
    out = tmp_path / "out"
    assert main(["recon", str(example / "video.mp4"), "--depth", str(example / "depth.npz"), "--cam",
                 "stereo:baseline=0.065m", "--num-frames", "5", "--resize", "keep", "-o", str(out), "--device",
                 "cpu"]) == 0
    with np.load(out / "camera_stereo_baseline0.065m.npz") as camera:
        assert camera["cam_from_world"][0, 0, 3] == -0.065


def test_batch_passes_stereo_through_and_dry_run_checks_it(tmp_path, capsys):
    example = _example(tmp_path)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"defaults: {{stage: recon, depth: {example / 'depth.npz'}, num_frames: 5, resize: keep, save_mesh: none, "
        "device: cpu}\njobs:\n"
        f"  - {{video: {example / 'video.mp4'}, cam: 'stereo:baseline=0.05x', output: {tmp_path / 'out' / 'a'}}}\n"
        f"  - {{video: {example / 'video.mp4'}, cam: 'stereo:converge=toe-in', output: {tmp_path / 'out' / 'b'}}}\n")
    assert main(["batch", str(jobs), "--dry-run"]) == 1
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and "job 2" in problems[0] and "converge must be one of subject, infinity" in problems[0]
    jobs.write_text("\n".join(jobs.read_text().splitlines()[:-1]) + "\n")
    assert main(["batch", str(jobs), "--dry-run"]) == 0
    assert main(["batch", str(jobs)]) == 0
    done = tmp_path / "out" / "a"
    assert (done / "color_stereo_baseline0.05x.mp4").is_file() and (done / "left_stereo_baseline0.05x.mp4").is_file()


tiny_wan = pytest.importorskip("tiny_wan")


@pytest.fixture()
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = tmp_path / "models"
    return tiny_wan.write_tiny_models_dir(root)


def test_run_stereo_end_to_end_writes_the_packed_result(tmp_path, models, capsys):
    example = _example(tmp_path)
    out = tmp_path / "out"
    argv = ["run", str(example / "video.mp4"), "--depth", str(example / "depth.npz"), "--cam", "stereo",
            "--num-frames", "5", "--resize", "keep", "-o", str(out), "--models-dir", str(models), "--size", "16x16",
            "--steps", "2", "--device", "cpu", "--stereo-layouts", "sbs,tb,anaglyph"]
    assert main(argv) == 0
    right, fps = read_video(out / "ex4d_stereo.mp4")
    assert right.shape == (5, 16, 16, 3)
    sizes = {"sbs": (16, 32), "tb": (32, 16), "anaglyph": (16, 16)}
    for layout, size in sizes.items():
        frames, packed_fps = read_video(out / f"ex4d_stereo_{layout}.mkv")
        assert frames.shape == (5, *size, 3) and packed_fps == pytest.approx(fps)
    assert not (out / "ex4d_stereo_sbs-half.mkv").exists()
    # the left half is the source, resized to the generated size; the right half the generated video
    sbs, _ = read_video(out / "ex4d_stereo_sbs.mkv")
    to_right = np.abs(sbs[:, :, 16:].astype(int) - right.astype(int)).mean()
    to_left = np.abs(sbs[:, :, 16:].astype(int) - sbs[:, :, :16].astype(int)).mean()
    assert to_right < 12 and to_right < to_left / 2, (to_right, to_left)  # (16x16 H.264 twice: not exact)
    assert read_stereo_metadata(out / "ex4d_stereo_tb.mkv") == {"stereo_mode": "top_bottom", "stereo3d_type": 2}
    before = (out / "ex4d_stereo_sbs.mkv").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # everything current: nothing is redone
    assert "up to date" in capsys.readouterr().out
    assert (out / "ex4d_stereo_sbs.mkv").stat().st_mtime_ns == before


def test_batch_run_job_packs_the_stereo_result(tmp_path, models):
    from ex4d.batch import load_jobs, read_record, run_batch

    example = _example(tmp_path)
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(
        f"defaults: {{stage: run, depth: {example / 'depth.npz'}, num_frames: 5, resize: keep, save_mesh: none, "
        f"device: cpu, models_dir: {models}, size: 16x16, steps: 1}}\njobs:\n"
        f"  - {{video: {example / 'video.mp4'}, cam: stereo, output: {tmp_path / 'out'}}}\n")
    jobs = load_jobs(jobs_file)
    result = run_batch(jobs, cache={})
    assert result.ok, [read_record(j).get("traceback") or read_record(j).get("error") for j in jobs]
    outputs = read_record(jobs[0])["outputs"]
    for layout, size in {"sbs": (16, 32), "sbs-half": (16, 16), "tb": (32, 16), "anaglyph": (16, 16)}.items():
        assert outputs[f"stereo_{layout}"].endswith(f"ex4d_stereo_{layout}.mkv")
        frames, _ = read_video(tmp_path / "out" / f"ex4d_stereo_{layout}.mkv")
        assert frames.shape == (5, *size, 3), layout
