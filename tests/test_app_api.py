"""The web app through its API (gradio_client) against the real app started in-process on a free port:
the example -> preset -> keyframes -> preview -> export flow, errors as one line while the app keeps
serving, the missing-weights panel, sessions, upload limits and generation with tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from ex4d.app.backend import AppBackend  # noqa: E402
from ex4d.app.camera_edit import KEYFRAME_COLUMNS  # noqa: E402
from ex4d.cli import main  # noqa: E402
from ex4d.commands.app import free_port  # noqa: E402
from ex4d.io.video import read_mask_video, read_video  # noqa: E402

FRAMES = 5
SIZE = (64, 64)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_HOME", "GRADIO_TEMP_DIR")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"))
    backend = AppBackend(root / "work", device="cpu", example_size=SIZE)  # no weights: the HF cache is empty
    from ex4d.app.ui import launch

    demo = launch(backend, port=free_port("127.0.0.1", 7900), block=False, max_upload_mb=1)
    assert demo.analytics_enabled is False  # no telemetry, no version check: the app calls nobody
    try:
        yield backend, demo.local_url
    finally:
        demo.close()
        backend.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(url):
    return gradio_client.Client(url, verbose=False)


def _session_of(backend, c):
    return backend.sessions[c.session_hash]


def _table(rows):
    return {"headers": list(KEYFRAME_COLUMNS), "data": rows, "metadata": None}


def test_example_preset_keyframes_preview_export_flow(app, tmp_path):
    backend, url = app
    c = client(url)
    info, video, slider, scene, path_info, depth_preview, error = c.predict("spheres_moving", FRAMES,
                                                                            api_name="/example")
    assert error == "" and f"{FRAMES} of {FRAMES} frames" in info and "64x64" in info and "15 fps" in info
    assert read_video(video)[0].shape == (FRAMES, *SIZE, 3)
    assert read_video(depth_preview)[0].shape == (FRAMES, *SIZE, 3)
    assert slider["maximum"] == FRAMES - 1
    assert "scene3d_frame" in scene or "scene3d_unavailable" in scene
    session = _session_of(backend, c)
    assert session.folder.is_relative_to(backend.workdir)
    assert session.video.parent.parent == backend.workdir / "examples"  # made once, shared read-only

    path_info, table, error = c.predict("orbit (reference)", 30, 0.5, "out", 45, 0, 1, "linear",
                                                 api_name="/preset")
    assert error == "" and path_info == "preset `30`"
    assert c.predict("mesh", api_name="/scene_kind") == ""  # frame 0's DW-Mesh in the 3D view
    assert session.scene_kind == "mesh" and not session.scene_error
    path_info, table, error = c.predict(0, api_name="/to_keyframes")
    rows = table["data"]
    assert error == "" and [row[0] for row in rows] == [0, 2, 4]
    rows[2][1] = 1.0  # the last keyframe's x, typed into the table
    rows.append([3, *rows[1][1:]])  # and a row added for frame 3 (the table sorts by frame)
    path_info, table, error = c.predict(_table(rows), api_name="/keyframes")
    assert error == "" and "4 keyframe(s) at frames [0, 2, 3, 4]" in path_info and table["data"][3][1] == 1.0

    color, mask, plot, warning, files, command, error = c.predict(api_name="/preview")
    assert error == ""
    assert read_video(color)[0].shape == (FRAMES, *SIZE, 3)  # served, and decodes to the clip's frames
    assert read_video(mask)[0].shape[0] == FRAMES
    visible = [row[1] for row in plot["data"]]
    assert len(visible) == FRAMES and visible[0] == 1.0
    assert ("Lowest visible fraction" in warning) or warning.startswith("warning:")
    names = sorted(Path(f).name for f in files)
    assert names == sorted(["DW-Mesh.ply", "color_path.mp4", "mask_path.mp4", "mask_path.mkv", "camera_path.npz",
                            "recon_path.json", "path.json", "settings.json"])
    assert command.startswith("ex4d recon ")
    preview_camera = next(f for f in files if Path(f).name == "camera_path.npz")

    exported, error = c.predict(api_name="/export_json")
    assert error == "" and json.loads(Path(exported).read_text())["time_unit"] == "frame"
    local = tmp_path / "path.json"
    local.write_bytes(Path(exported).read_bytes())
    out = tmp_path / "cli"
    assert main(["recon", str(session.video), "--depth", str(session.depth_file), "--cam", str(local),
                 "--num-frames", str(FRAMES), "-o", str(out), "--device", "cpu"]) == 0
    with np.load(out / "camera_path.npz") as cli, np.load(preview_camera) as app_cameras:
        assert np.array_equal(cli["cam_from_world"], app_cameras["cam_from_world"])
    mkv = next(f for f in files if Path(f).name == "mask_path.mkv")
    assert np.array_equal(read_mask_video(out / "mask_path.mkv"), read_mask_video(mkv))


def test_errors_are_one_line_and_the_app_keeps_serving(app):
    backend, url = app
    c = client(url)
    *_, error = c.predict(api_name="/preview")
    assert error == "error: no video yet: pick an example or upload a video first"
    c.predict("boxes", FRAMES, api_name="/example")
    *_, error = c.predict(_table([[0, 0, 0, 0, 0, 0, "nope", None]]), api_name="/keyframes")
    assert error.startswith("error: keyframe row 1, column look_z") and "\n" not in error
    *_, error = c.predict(_table([[9, 0, 0, 0, 0, 0, 1, None]]), api_name="/keyframes")
    assert "from 0 to 4" in error
    path_info, _, error = c.predict("zoom_in", 90, 0.3, "out", 0, 0, 1, "smooth", api_name="/preset")
    assert error == "" and path_info == "preset `zoom_in:travel=0.3,ease=smooth`"


def test_invalid_upload_is_an_error_line(app, tmp_path):
    backend, url = app
    c = client(url)
    bogus = tmp_path / "broken.mp4"
    bogus.write_bytes(os.urandom(2000))
    *_, error = c.predict(gradio_client.handle_file(str(bogus)), FRAMES, "reference", api_name="/upload_video")
    assert error.startswith("error: ") and "\n" not in error
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(Exception, match="Invalid file type"):  # refused by the upload box itself
        c.predict(gradio_client.handle_file(str(text)), FRAMES, "reference", api_name="/upload_video")
    *_, error = c.predict(api_name="/preview")  # and the app still answers
    assert error.startswith("error: no video yet")
    # the uploads were saved inside the work folder, not in a system temporary folder
    assert any((backend.workdir / "uploads").rglob("broken.mp4"))


def test_uploaded_video_and_depth_file_preview(app, tmp_path):
    """A video and its depth file uploaded (here the synthetic example's, written by ex4d synth)."""
    backend, url = app
    assert main(["synth", "-o", str(tmp_path / "mine"), "--scene", "planes", "--num-frames", "7",
                 "--size", "64x128"]) == 0
    c = client(url)
    info, *_, error = c.predict(gradio_client.handle_file(str(tmp_path / "mine" / "video.mp4")), 5, "keep",
                                api_name="/upload_video")
    assert error == "" and "5 of 7 frames used, 64x128" in info and "Depth: none yet" in info
    panel, depth_preview, _, error = c.predict("file", gradio_client.handle_file(str(tmp_path / "mine" / "depth.npz")),
                                               api_name="/depth")
    assert error == "" and panel["visible"] is False
    assert read_video(depth_preview)[0].shape == (5, 64, 128, 3)
    color, *_, error = c.predict(api_name="/preview")
    assert error == "" and read_video(color)[0].shape == (5, 64, 128, 3)
    session = _session_of(backend, c)
    assert session.video.read_bytes() == (tmp_path / "mine" / "video.mp4").read_bytes()
    assert session.video.is_relative_to(session.folder / "inputs")  # a copy; the upload is not used in place


def test_upload_over_the_size_limit_is_refused(app, tmp_path):
    _, url = app
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))  # 2 MB against --max-upload-mb 1
    with pytest.raises(Exception, match="(?i)size|large|limit"):
        client(url).predict(gradio_client.handle_file(str(big)), FRAMES, "reference", api_name="/upload_video")


def test_missing_generation_weights_show_the_download_panel(app):
    backend, url = app
    c = client(url)
    c.predict("boxes", FRAMES, api_name="/example")
    c.predict(api_name="/preview")
    panel, *_, error = c.predict(2, 0, 5.0, "16x16", False, None, False, False, False, "full", api_name="/generate")
    assert panel["visible"] is True and "Wan2.1" in panel["value"] and "download with" in panel["value"]
    assert error == "error: missing weights for generation; see the panel"


def test_missing_depth_weights_show_the_download_panel(app):
    backend, url = app
    c = client(url)
    c.predict("boxes", FRAMES, api_name="/example")
    panel, preview, scene, error = c.predict("depth-anything", None, api_name="/depth")
    assert panel["visible"] is True and "download with: hf download" in panel["value"]
    assert error.startswith("error: missing weights for depth-anything")
    # the example's exact depth still works: a preview renders
    *_, error = c.predict(api_name="/preview")
    assert error == ""


def test_each_browser_session_has_its_own_folder(app):
    backend, url = app
    first, second = client(url), client(url)
    first.predict("boxes", FRAMES, api_name="/example")
    second.predict("planes", FRAMES, api_name="/example")
    a, b = _session_of(backend, first), _session_of(backend, second)
    assert a.folder != b.folder and a.folder.parent == b.folder.parent == backend.workdir / "sessions"
    assert "planes" in b.video.parent.name and "boxes" in a.video.parent.name


@pytest.mark.slow
def test_generate_with_tiny_models_through_the_queue(app, tmp_path):
    backend, url = app
    tiny_wan = pytest.importorskip("tiny_wan")
    backend.models_dir = str(tiny_wan.write_tiny_models_dir(tmp_path / "models"))
    c = client(url)
    c.predict("boxes", FRAMES, api_name="/example")
    c.predict("orbit (reference)", 30, 0.5, "out", 45, 0, 1, "linear", api_name="/preset")
    c.predict(api_name="/preview")
    panel, video, report, files, commands, error = c.predict(2, 0, 5.0, "16x16", False, None, False, False, False,
                                                             "full", api_name="/generate")
    assert panel["visible"] is False
    assert error == ""
    assert read_video(video)[0].shape == (FRAMES, 16, 16, 3)
    assert "final.mp4" in {Path(f).name for f in files}
    assert "ex4d generate " in commands and "--steps 2" in commands
    assert report.startswith("**Evaluation**") or report.startswith("Evaluation not available:")


def test_fast_preset_without_a_lora_shows_a_warning_and_no_path_is_taken(app):
    backend, url = app
    c = client(url)
    warning = c.predict("fast", [], api_name="/generate_warning")
    assert warning.startswith("warning: the fast preset (4 steps, no CFG) is meant for a step-distillation LoRA")
    assert "`ex4d app --lora distill.safetensors`" in warning
    assert c.predict("full", [], api_name="/generate_warning") == ""
    c.predict("boxes", FRAMES, api_name="/example")
    c.predict(api_name="/preview")
    # a server path sent as a LoRA is refused (by gradio's choices or by the app), and nothing runs
    try:
        *_, error = c.predict(2, 0, 5.0, "16x16", False, None, False, False, False, "fast", ["/etc/hostname"],
                              api_name="/generate")
    except Exception as exc:  # gradio refuses a value that is not among the choices
        error = str(exc)
    assert "not in the list of choices" in error or "the app offers only those given at launch" in error
    assert "hostname" not in {p.name for p in backend.workdir.rglob("*")}
    assert not list(_session_of(backend, c).folder.glob("runs/*generate*"))


def test_a_launch_lora_ticked_on_the_page_reaches_the_generation(tmp_path, monkeypatch):
    from ex4d.app.backend import Session
    from ex4d.app.ui import launch
    from ex4d.diffusion.weights.lora import LoraSpec
    from ex4d.errors import InputError

    lora = tmp_path / "distill.safetensors"
    lora.write_bytes(b"x")  # the launch checks only that it exists; merging is tested in test_lora_extra.py
    seen = []

    def generate(self, options, progress=None):
        seen.append(options)
        raise InputError("stopped by the test")

    monkeypatch.setattr(Session, "generate", generate)
    backend = AppBackend(tmp_path / "work", device="cpu", example_size=SIZE, loras=[f"{lora}:0.8"])
    demo = launch(backend, port=free_port("127.0.0.1", 7950), block=False)
    try:
        c = client(demo.local_url)
        label = "distill.safetensors (strength 0.8)"
        assert c.predict("fast", [label], api_name="/generate_warning") == ""
        assert "tick one under Extra LoRAs" in c.predict("fast", [], api_name="/generate_warning")
        *_, error = c.predict(2, 0, 5.0, "16x16", False, None, False, False, False, "fast", [label],
                              api_name="/generate")
        assert error == "error: stopped by the test"
        # no LoRA ticked; steps and CFG 0, as the browser sends an empty number box: the preset's
        *_, error = c.predict(0, 0, 0, "16x16", False, None, False, False, False, "fast", api_name="/generate")
        # the "--attention fp8" tick box (last, so callers that predate it keep their positions)
        *_, error = c.predict(0, 0, 0, "16x16", False, None, False, True, True, "full", [], True,
                              api_name="/generate")
    finally:
        demo.close()
        backend.close()
    assert [options.loras for options in seen] == [(LoraSpec(str(lora.resolve()), 0.8),), (), ()]
    assert (seen[0].preset, seen[0].steps, seen[0].cfg) == ("fast", 2, 5.0)
    assert (seen[1].preset, seen[1].steps, seen[1].cfg) == ("fast", 4, 1.0)
    assert [options.attention for options in seen] == [None, None, "fp8"]
    assert seen[2].fp8 and seen[2].compile


def test_a_missing_lora_file_is_one_line_before_anything_starts(capsys, tmp_path):
    missing = tmp_path / "distill.safetensors"
    assert main(["app", "--lora", str(missing), "--workdir", str(tmp_path / "work")]) == 1
    assert not (tmp_path / "work").exists()  # refused before the work folder or the server
    assert capsys.readouterr().err == f"error: LoRA file (--lora) not found: {missing} (check the path)\n"
    assert main(["app", "--lora", f"{missing}:50", "--workdir", str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --lora {missing}: strength must be a number from -10 to 10") and \
        err.count("\n") == 1


def test_app_without_its_extra_is_one_line_exit_1(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app"]) == 1
    err = capsys.readouterr().err
    assert err == 'error: the web app needs its optional extra; install it with: pip install -e ".[app]"\n'


def test_cli_help_does_not_import_gradio():
    code = ("import sys\nfrom ex4d.cli import build_parser\nparser = build_parser()\nparser.format_help()\n"
            "parser.parse_args(['app', '--port', '8000'])\nprint('gradio' in sys.modules, 'viser' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("target", ["/etc/hostname", __file__])
def test_a_server_path_sent_as_an_upload_is_refused(app, target):
    """The API cannot make the app read a server file: only files uploaded through gradio are taken."""
    import httpx

    backend, url = app
    before = {p for p in backend.workdir.rglob("*") if p.is_file()}
    base = url.rstrip("/")
    reply = httpx.post(f"{base}/gradio_api/call/upload_video",
                       json={"data": [{"path": target, "meta": {"_type": "gradio.FileData"}}, FRAMES, "reference"]},
                       timeout=30)
    event = reply.json()["event_id"]
    with httpx.stream("GET", f"{base}/gradio_api/call/upload_video/{event}", timeout=60) as stream:
        answer = "".join(stream.iter_text())
    assert "event: error" in answer and "event: complete" not in answer
    after = {p for p in backend.workdir.rglob("*") if p.is_file()}
    assert not any(p.name == Path(target).name for p in after - before)  # nothing copied in


@pytest.mark.parametrize("target", ["/etc/hostname", __file__, "README.md"])
def test_files_outside_the_work_folder_are_not_served(app, target):
    import httpx

    _, url = app
    reply = httpx.get(f"{url.rstrip('/')}/gradio_api/file={target}", timeout=30)
    assert reply.status_code == 403


def test_abort_when_idle_does_not_stop_the_next_run(app):
    backend, url = app
    c = client(url)
    c.predict("boxes", FRAMES, api_name="/example")
    assert c.predict(api_name="/abort") == ""
    assert _session_of(backend, c).abort.is_set()
    *_, error = c.predict(api_name="/preview")  # each run clears the flag when it starts
    assert error == ""


def test_a_port_in_use_is_one_line_exit_1(app, capsys, tmp_path):
    _, url = app
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert main(["app", "--port", str(port), "--workdir", str(tmp_path / "work")]) == 1
    assert not (tmp_path / "work").exists()  # refused before anything is made
    err = capsys.readouterr().err
    assert err == f"error: port {port} on 127.0.0.1 is in use; choose another --port, or leave it out to take the " \
                  f"next free one from 7860\n"


@pytest.mark.parametrize("capabilities, cudnn_installed, expected", [
    ([], True, ("no CUDA GPU here", "no CUDA GPU here")),
    ([(8, 0)], True, ("no fp8 tensor cores", "needs a Hopper or newer GPU")),
    ([(8, 9)], True, ("", "needs a Hopper or newer GPU")),
    ([(9, 0)], False, ("", "pip install nvidia-cudnn-frontend")),
    ([(8, 0), (9, 0)], True, ("", ""))])
def test_the_generate_tab_greys_out_what_this_machine_cannot_run(monkeypatch, capabilities, cudnn_installed, expected):
    import importlib.util

    import torch

    from ex4d.app.ui import gpu_feature_gaps

    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real_find_spec("json") if cudnn_installed else None) if name == "cudnn"
                        else real_find_spec(name, *a))
    gaps = gpu_feature_gaps()
    for gap, words in zip(gaps, expected):
        assert (gap == "") if not words else (gap.startswith("not available: ") and words in gap), gaps
