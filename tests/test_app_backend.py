"""The web app's backend (no gradio): sessions and folders, inputs, depth, camera paths as pose files,
preview, generation with tiny models, abort, and that what the app authors runs identically in the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from ex4d.app.backend import AppBackend, copy_upload, frame0_points
from ex4d.app.outputs import LOW_VISIBLE_FRACTION, visibility_warning
from ex4d.app.progress import Aborted, StepBar
from ex4d.app.camera_edit import (Keyframe, keyframe_from_pose, keyframes_from_rows, keyframes_json, preset_spec)
from ex4d.camera.poses import look_at
from ex4d.cli import main
from ex4d.errors import InputError, MissingWeightsError
from ex4d.io.video import read_mask_video, read_video

FRAMES = 5
SIZE = (64, 64)


@pytest.fixture()
def backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    app = AppBackend(tmp_path / "work", device="cpu", example_size=SIZE)
    yield app
    app.close()


@pytest.fixture()
def session(backend):
    session = backend.session("browser-1")
    session.scene_error = "not in these tests"  # the 3D view is tested in test_app_scene3d.py
    session.load_example("spheres_moving", num_frames=FRAMES)
    return session


def _camera(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        return data["cam_from_world"].copy()


def test_example_gives_video_and_exact_depth_made_once(backend, session):
    info = session.info()
    assert (info["frames"], info["height"], info["width"], info["fps"]) == (FRAMES, *SIZE, 15.0)
    assert session.video.parent == backend.workdir / "examples" / "spheres_moving-5f-64x64-15fps"
    assert session.depth_file.parent == session.video.parent and session.depth_file.name == "depth.npz"
    frames, fps = read_video(session.video)
    assert frames.shape == (FRAMES, *SIZE, 3) and fps == 15.0
    with np.load(session.depth_file) as data:
        assert data["depth"].shape == (FRAMES, *SIZE) and data["K"][0, 0] == 500.0  # synth's exact depth and K
    stamp = session.video.stat().st_mtime_ns
    other = backend.session("browser-2")
    other.load_example("spheres_moving", num_frames=FRAMES)
    assert other.video == session.video and session.video.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(InputError, match="unknown example"):
        other.load_example("castle")


def test_clip_settings_are_checked_like_the_cli(session):
    assert session.set_clip_settings(3, "keep")["frames"] == 3
    with pytest.raises(InputError, match="has 5 frames; choose at most 5"):
        session.set_clip_settings(9, "reference")
    with pytest.raises(InputError, match="resize must be"):
        session.set_clip_settings(3, "bigger")


def test_the_shown_recon_command_renders_the_same_preview(session, tmp_path, monkeypatch):
    import shlex

    session.set_preset("orbit:yaw=-30,pitch=5")
    preview = session.preview()
    [line] = preview.commands
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(line)[1:]) == 0
    out = tmp_path / "ex4d_out" / preview.folder.name  # never the app's run folder
    assert np.array_equal(_camera(out / "camera_path.npz"), _camera(preview.files["camera"]))
    assert np.array_equal(read_mask_video(out / "mask_path.mkv"), read_mask_video(preview.files["mask_lossless"]))


def test_preview_renders_a_preset_into_a_new_run_folder(session):
    session.set_preset(preset_spec("orbit (reference)", angle=30))
    first = session.preview()
    assert first.folder.parent == session.folder / "runs"
    assert first.path_file.name == "path.npz"
    for role in ("color", "mask", "mask_lossless", "camera", "mesh", "record", "settings"):
        assert first.files[role].is_file(), role
    masks = read_mask_video(first.files["mask_lossless"])
    assert masks.shape == (FRAMES, *SIZE)
    np.testing.assert_allclose(first.visible, masks.reshape(FRAMES, -1).mean(axis=1))
    assert first.visible[0] == 1.0 and min(first.visible) < 1.0  # frame 0 is the source; the orbit loses some
    before = {path: path.stat().st_mtime_ns for path in first.files.values()}
    second = session.preview()  # same path: a new folder, the first run untouched
    assert second.folder != first.folder
    assert {path: path.stat().st_mtime_ns for path in first.files.values()} == before
    assert "ex4d recon" in first.commands[0] and f"--cam {first.path_file}" in first.commands[0]
    settings = json.loads(first.files["settings"].read_text())
    assert settings["path"]["spec"] == "30" and settings["num_frames"] == FRAMES


@pytest.mark.parametrize("mode", ["keyframes", "preset"])
def test_exported_pose_file_gives_bit_identical_cameras_in_ex4d_recon(session, tmp_path, mode):
    session.set_preset("orbit:yaw=40,pitch=10")
    if mode == "keyframes":
        session.to_keyframes()
        rows = session.keyframe_rows()
        rows[1][1] += 0.25  # move the middle keyframe to the right by numbers
        session.set_keyframes(rows)
    preview = session.preview()
    for fmt in ("json", "npz"):
        exported = session.export_path(fmt)
        assert exported.is_relative_to(session.folder / "exports") and exported.suffix == f".{fmt}"
        out = tmp_path / f"cli_{mode}_{fmt}"
        assert main(["recon", str(session.video), "--depth", str(session.depth_file), "--cam", str(exported),
                     "--num-frames", str(FRAMES), "-o", str(out), "--device", "cpu", "--save-mesh", "none"]) == 0
        cli_cameras = _camera(out / "camera_path.npz")
        if mode == "keyframes" or fmt == "npz":
            # the same file format as the preview rendered: the very same cameras, bit for bit
            assert np.array_equal(cli_cameras, _camera(preview.files["camera"])), (mode, fmt)
            assert np.array_equal(read_mask_video(out / "mask_path.mkv"),
                                  read_mask_video(preview.files["mask_lossless"]))
        else:  # a preset exported as JSON: one cam_from_world keyframe per frame; SLERP rounding only
            np.testing.assert_allclose(cli_cameras, _camera(preview.files["camera"]), rtol=0, atol=1e-14)


def test_keyframe_table_edit_add_delete(session):
    session.set_preset("30")
    keyframes = session.to_keyframes([0, 2, 4])
    assert [k.frame for k in keyframes] == [0, 2, 4]
    assert keyframes[0].position == (0.0, 0.0, 0.0)  # frame 0: the source camera
    pivot = session.scene_geometry()["pivot"]
    # the reference orbit looks at the pivot, so every keyframe's look-at point is the pivot
    for k in keyframes:
        np.testing.assert_allclose(k.look_at, pivot, atol=2e-6)
    assert [k.frame for k in session.to_keyframes()] == [0, 2, 4]  # the default: first, middle, last
    session.add_keyframe(3)
    assert [k.frame for k in session.path.keyframes] == [0, 2, 3, 4]
    session.delete_keyframe(2)
    assert [k.frame for k in session.path.keyframes] == [0, 3, 4]
    with pytest.raises(InputError, match="no keyframe at frame 1"):
        session.delete_keyframe(1)
    document = json.loads(session.path_file().read_text())
    assert document["time_unit"] == "frame" and [k["time"] for k in document["keyframes"]] == [0, 3, 4]


@pytest.mark.parametrize("rows, message", [
    ([[0, 0, 0, 0, 0, 0, "", None]], "row 1, column look_z is empty"),
    ([[0, float("nan"), 0, 0, 0, 0, 1, None]], "row 1, column x is empty"),
    ([[0, 0, 0, 0, 0, 0, "far", None]], "row 1, column look_z is 'far', not a number"),
    ([[7, 0, 0, 0, 0, 0, 1, None]], "frame 7 must be a whole number from 0 to 4"),
    ([[1.5, 0, 0, 0, 0, 0, 1, None]], "frame 1.5 must be a whole number"),
    ([[0, 0, 0, 0, 0, 0, 1, None], [0, 1, 0, 0, 0, 0, 1, None]], r"frame\(s\) \[0\] appear twice"),
    ([[0, 1, 2, 3, 1, 2, 3, None]], "looks at its own position"),
    ([[0, 0, 0, 0, 0, 0, 1, -5]], "focal -5 must be positive"),
    ([[0, 0, 0, 0, 0, 0, float("inf"), None]], "give a finite number"),
    ([], "the keyframe table is empty"),
])
def test_bad_keyframe_rows_are_one_line_errors(rows, message):
    with pytest.raises(InputError, match=message) as info:
        keyframes_from_rows(rows, 5)
    assert "\n" not in str(info.value)


def test_keyframe_rows_map_onto_the_documented_json_keyframes():
    keyframes = keyframes_from_rows([[4, 1, 0, 0, 0, 0, 3, 600], [0, 0, 0, 0, 0, 0, 3, None], [None] * 8], 5)
    assert [k.frame for k in keyframes] == [0, 4]  # sorted, blank row skipped
    assert keyframes_json(keyframes)["keyframes"] == [
        {"time": 0, "position": [0.0, 0.0, 0.0], "look_at": [0.0, 0.0, 3.0]},
        {"time": 4, "position": [1.0, 0.0, 0.0], "look_at": [0.0, 0.0, 3.0], "focal": 600.0}]


def test_keyframe_from_pose_recovers_centre_and_target():
    eye, target = np.array([1.0, -0.5, 0.3]), np.array([0.0, 0.0, 3.0])
    keyframe = keyframe_from_pose(2, look_at(eye, target), target)
    np.testing.assert_allclose(keyframe.position, eye, atol=1e-6)
    np.testing.assert_allclose(keyframe.look_at, target, atol=1e-6)
    assert isinstance(keyframe, Keyframe) and keyframe.frame == 2


@pytest.mark.parametrize("preset, params, spec", [
    ("orbit (reference)", {"angle": -60}, "-60"),
    ("180 (reference loop)", {}, "180"),
    ("zoom_in", {"travel": 0.3, "ease": "smooth"}, "zoom_in:travel=0.3,ease=smooth"),
    ("dolly_zoom", {"direction": "in", "travel": 0.4}, "dolly_zoom:direction=in,travel=0.4,ease=linear"),
    ("orbit yaw/pitch", {"yaw": 60, "pitch": 15, "radius": 1.5}, "orbit:yaw=60,pitch=15,radius=1.5x,ease=linear"),
])
def test_preset_specs_are_cli_cam_strings(preset, params, spec):
    from ex4d.camera.trajectory import check_spec

    assert preset_spec(preset, **params) == spec
    check_spec(spec)  # accepted by ex4d recon --cam


def test_visibility_warning_names_the_worst_frame():
    assert visibility_warning([1.0, 0.8, 0.5]) == ""
    line = visibility_warning([1.0, 0.4, 0.12, 0.2])
    assert "at frame 2 only 12.0%" in line and line.startswith("warning:") and "\n" not in line
    assert LOW_VISIBLE_FRACTION == 0.3


def test_frame0_points_lift_pixels_with_their_depth(session):
    geometry = session.scene_geometry()
    points, colors = frame0_points(geometry["clip"], geometry["depth0"], geometry["K"], max_points=400)
    assert points.dtype == np.float32 and colors.dtype == np.uint8 and len(points) == len(colors) <= 400
    # projecting a lifted point with K lands on a pixel whose depth is the point's z
    K = geometry["K"]
    u, v = ((points[:, :2] / points[:, 2:3]) @ np.diag([K[0, 0], K[1, 1]]) + K[:2, 2]).T
    np.testing.assert_allclose(u, np.round(u), atol=1e-3)
    np.testing.assert_allclose(points[:, 2], geometry["depth0"][np.round(v).astype(int), np.round(u).astype(int)],
                               rtol=1e-6)


def test_sessions_are_separate_folders(backend, session):
    other = backend.session("browser-2")
    assert other.folder != session.folder and other.video is None
    with pytest.raises(InputError, match="no video yet"):
        other.preview()
    assert backend.session("../../etc").folder.parent == backend.workdir / "sessions"


def test_uploads_are_copied_and_checked(session, tmp_path):
    bogus = tmp_path / "clip.mp4"
    bogus.write_bytes(b"not a video at all")
    with pytest.raises(InputError) as info:
        session.set_video(bogus)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="must be one of"):
        copy_upload(tmp_path / "clip.mp4", tmp_path, "video", (".mov",))
    good = session.video
    info = session.set_video(good)
    assert session.video != good and session.video.is_relative_to(session.folder / "inputs")
    assert info["depth"] == "none yet"  # a new video needs its depth made again
    with pytest.raises(InputError, match="no depth yet"):
        session.preview()


def test_frame_count_stops_at_the_cap(session):
    from ex4d.app.backend import count_video_frames

    assert count_video_frames(session.video) == (FRAMES, 15.0)
    assert count_video_frames(session.video, cap=3) == (3, 15.0)


def test_import_pose_file(session, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"time_unit": "frame", "keyframes": [{"time": 0, "position": [0, 0, 0]},
                                                                     {"time": 4, "yaw": 20, "pitch": 5}]}))
    assert session.import_pose_file(path) == "mine.json"
    assert session.path.mode == "file" and session.path.file.is_relative_to(session.folder / "inputs")
    preview = session.preview()
    assert preview.path_file.name == "path.json" and preview.path_file.read_text() == path.read_text()
    npz_preview = session.preview()
    assert session.import_pose_file(npz_preview.files["camera"]) == "camera_path.npz"  # an ex4d camera file
    again = session.preview()
    assert np.array_equal(_camera(again.files["camera"]), _camera(npz_preview.files["camera"]))
    assert np.array_equal(_camera(session.export_path("npz")), _camera(npz_preview.files["camera"]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keyframes": [{"time": 0, "roll": 5}]}))
    with pytest.raises(InputError, match="unknown key"):
        session.import_pose_file(bad)
    assert session.path.file.name == "camera_path.npz"  # a refused file leaves the path as it was


def test_missing_depth_weights_list_every_download(session, tmp_path):
    session.app.models_dir = str(tmp_path / "empty_models")
    lines = session.missing_depth_weights("depth-anything")
    assert lines and all("download with" in line for line in lines)
    with pytest.raises(MissingWeightsError):
        session.estimate_depth("depth-anything")
    assert session.depth_file is not None  # the example's depth still works


def test_depth_from_an_uploaded_file_writes_a_preview(session, tmp_path):
    upload = tmp_path / "d.npz"
    upload.write_bytes(session.depth_file.read_bytes())
    result = session.estimate_depth("file", upload)
    assert result.depth_file.is_relative_to(session.folder / "depth") and result.depth_file.is_file()
    frames, _ = read_video(result.preview)
    assert frames.shape == (FRAMES, *SIZE, 3)
    with pytest.raises(InputError, match="unknown depth source"):
        session.estimate_depth("midas")
    short = tmp_path / "short.npy"
    np.save(short, np.full((2, *SIZE), 3.0, np.float32))  # 2 frames for a 5-frame clip
    folders = set((session.folder / "depth").iterdir())
    with pytest.raises(InputError):
        session.estimate_depth("file", short)
    assert set((session.folder / "depth").iterdir()) == folders  # no half-made depth folder left
    assert session.depth_file == result.depth_file  # the previous depth stays in use


def test_abort_stops_at_the_next_step_and_keeps_nothing(session):
    abort = threading.Event()
    seen = []
    bar = StepBar(range(10), report=lambda done, total, desc: seen.append(done), abort=abort)
    with pytest.raises(Aborted):
        for item in bar:
            if item == 2:
                abort.set()
    assert seen == [0, 1, 2, 3][:len(seen)] and len(seen) == 3

    def report(done, total, desc):
        if desc == "render" and done == 2:
            session.request_abort()

    runs_before = set((session.folder / "runs").glob("*")) if (session.folder / "runs").exists() else set()
    with pytest.raises(Aborted):
        session.preview(progress=report)
    assert set((session.folder / "runs").glob("*")) == runs_before  # the aborted run's folder is gone
    session.set_preset("zoom_in:travel=0.9")
    session.path.spec = "zoom_in:travel=5"  # a path that fails only when built for this scene
    with pytest.raises(InputError):
        session.preview()
    assert set((session.folder / "runs").glob("*")) == runs_before  # a failed run leaves no folder either


@pytest.fixture()
def tiny_models(tmp_path):
    tiny_wan = pytest.importorskip("tiny_wan")
    return tiny_wan.write_tiny_models_dir(tmp_path / "models")


def test_generation_end_to_end_with_tiny_models_keeps_the_models_loaded(session, tiny_models):
    from ex4d.pipeline import GenerateOptions

    session.app.models_dir = str(tiny_models)
    with pytest.raises(InputError, match="preview the path first"):
        session.generate(GenerateOptions(size="16x16", steps=2))
    session.set_preset("30")
    session.preview()
    steps = []
    result = session.generate(GenerateOptions(size="16x16", steps=2),
                              progress=lambda done, total, desc: steps.append((desc, done, total)))
    frames, _ = read_video(result.video)
    assert frames.shape == (FRAMES, 16, 16, 3)
    assert result.folder.parent == session.folder / "runs" and result.folder.name.split("-")[2] == "generate"
    assert ("sampling", 2, 2) in steps
    generate = [line for line in result.commands if line.startswith("ex4d generate ")]
    assert len(generate) == 1 and " --steps 2" in generate[0] and " --size 16x16" in generate[0]
    assert f"--models-dir {tiny_models}" in generate[0]
    assert f"--color ex4d_out/{session.last_preview.folder.name}/color_path.mp4" in generate[0]
    assert f" -o ex4d_out/{result.folder.name}/final.mp4" in generate[0]
    assert result.eval_summary is not None or result.eval_error  # the eval report, or its one-line reason
    pipe = session.app.generator_cache["generate_pipe"]

    def abort_on_first_step(done, total, desc):
        if desc == "sampling" and done == 1:
            session.request_abort()

    runs = set((session.folder / "runs").iterdir())
    with pytest.raises(Aborted):
        session.generate(GenerateOptions(size="16x16", steps=2), progress=abort_on_first_step)
    assert set((session.folder / "runs").iterdir()) == runs  # nothing kept
    assert session.app.generator_cache["generate_pipe"] is pipe  # the models stayed loaded


def tiny_lora_file(path: Path, rank: int = 3) -> Path:
    """A rank-``rank`` LoRA (original/LightX2V layout) on the tiny DiT's first query projection (24 -> 24)."""
    import torch
    from safetensors.torch import save_file

    config = pytest.importorskip("tiny_wan").tiny_transformer_config()
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(1)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(rank, dim, generator=generator),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(dim, rank, generator=generator)},
              str(path))
    return path


def test_a_launch_lora_ticked_on_the_page_is_merged_recorded_and_shown_as_a_command(session, tiny_models,
                                                                                       tmp_path):
    from ex4d.app.backend import launch_loras
    from ex4d.pipeline import GenerateOptions

    lora = tiny_lora_file(tmp_path / "distill.safetensors")
    session.app.models_dir = str(tiny_models)
    session.app.loras = launch_loras([f"{lora}:0.5"])
    assert session.app.lora_labels() == ["distill.safetensors (strength 0.5)"]
    session.set_preset("30")
    session.preview()
    plain = session.generate(GenerateOptions(size="16x16", steps=2))
    key_without = session.app.generator_cache["generate_key"]
    ticked = session.app.selected_loras(["distill.safetensors (strength 0.5)"])
    merged = session.generate(GenerateOptions(size="16x16", steps=2, loras=ticked))
    # the selection is part of the loaded pipeline's key: ticking the LoRA loaded a pipeline with it merged
    assert session.app.generator_cache["generate_key"] != key_without
    assert not np.array_equal(read_video(plain.video)[0], read_video(merged.video)[0])
    generate = [line for line in merged.commands if line.startswith("ex4d generate ")][0]
    assert f" --lora {lora}:0.5" in generate
    assert "--lora" not in [line for line in plain.commands if line.startswith("ex4d generate ")][0]
    recorded = json.loads(merged.files["settings"].read_text())["options"]["loras"]
    assert [(item["path"], item["strength"]) for item in recorded] == [(str(lora.resolve()), 0.5)]
    assert "loras" not in json.loads(plain.files["settings"].read_text())["options"]


def test_launch_loras_are_checked_labelled_and_picked_in_launch_order(tmp_path):
    from ex4d.app.backend import launch_loras
    from ex4d.diffusion.weights.lora import LoraSpec

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for name in ("a/distill.safetensors", "b/distill.safetensors", "style.safetensors"):
        (tmp_path / name).write_bytes(b"x")  # only their existence is checked at launch
    with pytest.raises(InputError, match=r"LoRA file \(--lora\) not found: .*missing.safetensors"):
        launch_loras([str(tmp_path / "style.safetensors"), str(tmp_path / "missing.safetensors")])
    with pytest.raises(InputError, match="strength must be a number from -10 to 10"):
        launch_loras([f"{tmp_path / 'style.safetensors'}:50"])
    app = AppBackend(tmp_path / "work", device="cpu", loras=[
        str(tmp_path / "a" / "distill.safetensors"), f"{tmp_path / 'b' / 'distill.safetensors'}:1",
        f"{tmp_path / 'style.safetensors'}:0.6"])
    assert app.lora_labels() == ["distill.safetensors (strength 1) #1", "distill.safetensors (strength 1) #2",
                                 "style.safetensors (strength 0.6)"]
    assert app.selected_loras([]) == app.selected_loras(None) == ()
    picked = app.selected_loras(["style.safetensors (strength 0.6)", "distill.safetensors (strength 1) #1"])
    assert picked == (LoraSpec(str(tmp_path / "a" / "distill.safetensors"), 1.0),
                      LoraSpec(str(tmp_path / "style.safetensors"), 0.6))  # launch order, not click order
    for sent in (str(tmp_path / "style.safetensors"), "/etc/hostname", "distill.safetensors"):
        with pytest.raises(InputError, match="the app offers only those given at launch"):
            app.selected_loras([sent])  # a path (or any other text) from the page is never taken
    assert AppBackend(tmp_path / "work2", device="cpu").lora_labels() == []


def test_generation_refuses_a_lora_not_given_at_launch(session, tmp_path):
    from ex4d.pipeline import GenerateOptions

    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match="was not given when the app was started"):
        session.generate(GenerateOptions(size="16x16", steps=2, loras=(str(other),)))
    assert not (session.folder / "runs").exists() or not any((session.folder / "runs").iterdir())


def test_shown_generate_command_carries_the_loras_as_the_cli_reads_them(tmp_path):
    from ex4d.app.outputs import generate_command, lora_arg
    from ex4d.diffusion.weights.lora import LoraSpec, parse_lora_spec
    from ex4d.pipeline import GenerateOptions

    options = GenerateOptions(preset="fast", loras=(("/m/distill.safetensors", 1.0), ("/m/my style.safetensors", 0.6),
                                                    ("/m/odd:2", 1.0)))
    line = generate_command(Path("c.mp4"), Path("m.mkv"), Path("o.mp4"), options)
    assert line.endswith(" --preset fast --lora /m/distill.safetensors --lora '/m/my style.safetensors:0.6' "
                         "--lora /m/odd:2:1")
    assert " --steps" not in line and " --cfg" not in line  # the fast preset's own 4 steps and no CFG
    assert " --preset fast --steps 6 " in generate_command(Path("c.mp4"), Path("m.mkv"), Path("o.mp4"),
                                                          GenerateOptions(preset="fast", steps=6)) + " "
    for spec in options.loras:  # each --lora value reads back as the same file and strength
        assert parse_lora_spec(lora_arg(spec)) == spec
    assert parse_lora_spec(lora_arg(LoraSpec("/m/odd:2", 1.0))) == LoraSpec("/m/odd:2", 1.0)
    fp8 = generate_command(Path("c.mp4"), Path("m.mkv"), Path("o.mp4"), GenerateOptions(fp8=True, attention="fp8"))
    assert fp8.endswith(" --attention fp8 --fp8")  # the page's "--attention fp8" tick box


@pytest.mark.parametrize("preset, selected, offered, expected", [
    ("full", 0, 0, ""), ("fast", 1, 1, ""), ("fast", 0, 0, "start the app with `ex4d app --lora distill.safetensors`"),
    ("fast", 0, 2, "tick one under Extra LoRAs, or start the app with `ex4d app --lora distill.safetensors`")])
def test_fast_preset_without_a_lora_is_a_warning(preset, selected, offered, expected):
    from ex4d.app.outputs import fast_preset_warning

    line = fast_preset_warning(preset, selected, offered)
    if not expected:
        assert line == ""
    else:
        assert line.startswith("warning: the fast preset (4 steps, no CFG) is meant for a step-distillation LoRA")
        assert expected in line and "generation still runs" in line and "\n" not in line


class RecordingView:
    """Stands in for ex4d.app.scene3d.SceneView (tested on its own): records what the app sends."""

    url = "http://127.0.0.1:1"

    def __init__(self):
        self.calls, self.callback = [], None

    def on_keyframes_edited(self, callback):
        self.callback = callback

    def set_scene(self, points, colors, *, mesh=None):
        self.calls.append(("scene", points, colors, mesh))

    def set_cameras(self, K, size, source, path, keyframes):
        self.calls.append(("cameras", K, size, source, path, keyframes))

    def set_frame(self, frame):
        self.calls.append(("frame", frame))

    def look_through(self, cam_from_world, K, size):
        self.calls.append(("look", cam_from_world, K, size))

    def close(self):
        self.calls.append(("close",))


def test_the_3d_view_gets_scene_path_keyframes_and_edits_come_back(session):
    view = session.scene = RecordingView()
    view.on_keyframes_edited(session._on_3d_edit)
    session.set_preset("30")
    session.to_keyframes()
    session.update_scene()
    kind, points, colors, mesh = view.calls[-2]
    assert kind == "scene" and mesh is None and points.shape[1] == 3 and colors.dtype == np.uint8
    _, K, size, source, path, keyframes = view.calls[-1]
    assert size == SIZE and np.array_equal(source, np.eye(4)) and path.shape == (FRAMES, 4, 4)
    assert [frame for frame, _ in keyframes] == [0, 2, 4]
    np.testing.assert_array_equal(path, session.trajectory().cam_from_world)
    # a keyframe dragged in the 3D view: 0.5 to the right at frame 4, plus a new one at frame 3
    before = session.path.keyframes[2]
    moved = path[4].copy()
    moved[:3, 3] -= moved[:3, :3] @ np.array([0.5, 0.0, 0.0])  # the camera centre moves by (0.5, 0, 0)
    version = session.path.version
    view.callback([(0, path[0]), (2, path[2]), (3, path[3]), (4, moved)])
    assert session.path.version > version and [k.frame for k in session.path.keyframes] == [0, 2, 3, 4]
    np.testing.assert_allclose(session.path.keyframes[3].position, np.add(before.position, [0.5, 0, 0]), atol=2e-6)
    assert view.calls[-1][0] == "cameras"  # the view is told the new path at once
    session.set_scene_kind("mesh")
    _, _, _, mesh = [c for c in view.calls if c[0] == "scene"][-1]
    vertices, faces, vertex_colors = mesh
    assert vertices.shape == (SIZE[0] * SIZE[1], 3) and faces.shape[1] == 3 and vertex_colors.shape == vertices.shape
    assert 0 < len(faces) < 2 * (SIZE[0] - 1) * (SIZE[1] - 1)  # the flagged faces (the border ring at least) left out
    with pytest.raises(InputError, match="draws points or mesh"):
        session.set_scene_kind("voxels")
    session.look_through(2)
    _, pose, K_look, size_look = view.calls[-1]
    np.testing.assert_array_equal(pose, session.trajectory().cam_from_world[2])
    session.close()
    assert view.calls[-1] == ("close",) and session.scene is None


def test_exported_keyframes_give_the_same_cameras_in_a_batch_job(session, tmp_path):
    session.set_preset("30")
    session.to_keyframes()
    preview = session.preview()
    exported = session.export_path("json")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(json.dumps({"jobs": [{"video": str(session.video), "depth": str(session.depth_file),
                                          "cam": str(exported), "output": str(tmp_path / "batch"), "stage": "recon",
                                          "num_frames": FRAMES, "device": "cpu", "save_mesh": "none"}]}))
    assert main(["batch", str(jobs)]) == 0
    assert np.array_equal(_camera(tmp_path / "batch" / "camera_path.npz"), _camera(preview.files["camera"]))
