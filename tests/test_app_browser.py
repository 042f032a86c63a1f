"""The web app in a real browser: Debian's chromium driven by Playwright, against the real app started
in-process on a free port (``ex4d.app.ui.launch``), offline.

One page walks the flow a person follows: the example, a preset, one keyframe edited in the table and
one added in the 3D view, the preview (served, decodes to the right frame count), the exported pose
file (``ex4d recon --cam`` gives the same cameras). Two more pages: missing depth weights show the
download panel; an invalid upload shows one error line and the app keeps serving.

Screenshots go to a folder that each test prints (``pytest -s``); ``EX4D_SCREENSHOTS=<folder>`` picks
the folder (how docs/images/app_*.png are refreshed).
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the [app] extra (gradio) is not installed")
pytest.importorskip("viser", reason="the [app] extra (viser) is not installed")

from browser_util import browser_page, chromium_path, off_host, wait_for  # noqa: E402

FRAMES = 9
SIZE = (128, 128)
TIMEOUT_MS = 120_000   # one action at most (the example, the preview) on a busy 2-core CI box


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("EX4D_SCREENSHOTS") or tmp_path_factory.mktemp("app_screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shot(page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"app_{name}.png"), full_page=True)
    print(f"screenshot: {shots / f'app_{name}.png'}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app on a free port of 127.0.0.1; no weights anywhere (an empty models folder)."""
    chromium_path()  # skip before starting anything when there is no browser
    from ex4d.app.backend import AppBackend
    from ex4d.app.ui import launch

    root = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(root / "hf"))
        backend = AppBackend(root / "work", device="cpu", example_size=SIZE, models_dir=str(root / "no_models"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        demo = launch(backend, host="127.0.0.1", port=port, block=False)
        try:
            yield demo.local_url.rstrip("/"), backend
        finally:
            demo.close()
            backend.close()


def _session(backend, before: set):
    """The session the page created (the one not in ``before``)."""
    new = wait_for(lambda: [s for k, s in backend.sessions.items() if k not in before], what="the page's session")
    assert len(new) == 1
    return new[0]


def _error(page) -> str:
    return page.input_value("#error_box textarea")


def _open(page, url: str) -> None:
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#example_button")


def _use_example(page) -> None:
    page.fill("#num_frames input", str(FRAMES))
    page.click("#example_button")
    page.wait_for_function("document.querySelector('#input_info').innerText.includes('frames used')")


def _hide_webgl_notice(page) -> None:
    # Headless chromium renders WebGL in software and viser says so in a toast; close it so that the
    # screenshots show the scene. Cosmetic only: the assertions do not depend on it.
    close = page.frame_locator("#scene3d_frame").locator(".mantine-Notification-closeButton")
    if close.count():
        close.first.click()


# --- the main flow: one page, in order -------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow(app, shots):
    """Example -> preset -> keyframes (one edited in the table, one added in 3D) -> preview -> export.

    Returns what the tests check: the session, the page's preview video and exported file, its requests.
    """
    url, backend = app
    with browser_page(viewport=(1280, 1000)) as (page, requests):
        before = set(backend.sessions)
        _open(page, url)
        _use_example(page)
        session = _session(backend, before)
        assert _error(page) == ""
        _shot(page, shots, "input")

        page.get_by_role("tab", name="3. Camera").click()
        page.click("#preset input")
        page.get_by_role("option", name="orbit yaw/pitch", exact=True).click()
        page.click("#preset_button")
        page.wait_for_function("document.querySelector('#path_info').innerText.includes('orbit:yaw=45')")
        page.click("#to_keyframes_button")
        page.wait_for_function("document.querySelector('#path_info').innerText.includes('keyframe')")
        assert [k.frame for k in session.path.keyframes] == [0, 4, 8]

        # One keyframe edited by numbers in the table: frame 4's camera centre moves to x = 0.3.
        page.wait_for_function("document.querySelector('#keyframes [data-testid=cell-1-0]')?.innerText.trim() == '4'")
        page.dblclick("#keyframes [data-testid=cell-1-1]")
        page.fill("#keyframes [data-testid=cell-1-1] textarea", "0.3")
        page.keyboard.press("Enter")
        wait_for(lambda: session.path.keyframes[1].position[0] == 0.3, what="the table edit to reach the session")

        # The 3D view shows it, and a keyframe added in the 3D view's own panel reaches the table.
        frame = page.frame_locator("#scene3d_frame")
        view = wait_for(lambda: session.scene, what="the session's 3D view")
        wait_for(lambda: len(view.server.get_clients()) == 1, what="the 3D view's client to connect")

        def centre_x_of_frame_4():
            return [-(p[:3, :3].T @ p[:3, 3])[0] for f, p in view.keyframes() if f == 4]

        wait_for(lambda: np.allclose(centre_x_of_frame_4(), [0.3]), what="the 3D view to show the edit")
        _hide_webgl_notice(page)
        page.fill("#frame_slider input[type=number]", "2")     # the page's timeline...
        page.locator("#frame_slider input[type=number]").blur()  # ...tells the 3D view on release
        wait_for(lambda: view._frame == 2, what="the timeline to reach the 3D view")
        frame.get_by_role("button", name="Add keyframe at frame").click()
        page.wait_for_selector("#keyframes [data-testid=cell-3-0]")   # a fourth row, via the page's poll
        assert [k.frame for k in session.path.keyframes] == [0, 2, 4, 8]
        assert page.locator("#keyframes [data-testid=cell-1-0]").inner_text().strip() == "2"
        time.sleep(1.0)        # let the 3D view draw the new keyframe before the screenshot
        _shot(page, shots, "camera")
        # Frame 0 as its DW-Mesh instead of points: the view swaps the scene and keeps the keyframes.
        page.locator("#scene_kind").get_by_label("DW-Mesh", exact=True).check()
        wait_for(lambda: type(view._scene_node).__name__ == "GlbHandle", what="the 3D view to show the mesh")
        assert [f for f, _ in view.keyframes()] == [0, 2, 4, 8]
        time.sleep(1.0)
        _shot(page, shots, "camera_mesh")

        page.get_by_role("tab", name="4. Preview").click()
        page.click("#preview_button")
        page.wait_for_selector("#preview_color video[src]")
        page.wait_for_selector("#preview_mask video[src]")
        page.wait_for_function("document.querySelector('#preview_warning').innerText.trim().length > 0")
        for video in ("#preview_color video", "#preview_mask video"):   # the browser itself decodes them
            page.wait_for_function(f"document.querySelector('{video}').readyState >= 2")
        assert _error(page) == ""
        # Show the last frames (frame 0 is the source frame, fully seen): seek both players to the end.
        page.evaluate('''() => Promise.all([...document.querySelectorAll("#preview_color video, #preview_mask video")]
            .map(v => new Promise(done => { v.addEventListener("seeked", done, {once: true});
                                             v.currentTime = Math.max(v.duration - 0.05, 0); })))''')
        _shot(page, shots, "preview")
        color_src = page.get_attribute("#preview_color video", "src")
        mask_src = page.get_attribute("#preview_mask video", "src")
        color_bytes = page.request.get(color_src).body()
        mask_bytes = page.request.get(mask_src).body()

        page.get_by_role("tab", name="3. Camera").click()
        page.click("#export_json_button")
        link = page.wait_for_selector("#export_file a[href]")
        exported = page.request.get(link.get_attribute("href")).body()

        page.get_by_role("tab", name="6. Outputs").click()
        page.wait_for_function("document.querySelector('#cli_command').innerText.includes('ex4d recon')")
        cli_command = page.inner_text("#cli_command")
        _shot(page, shots, "outputs")
        return {"session": session, "color": color_bytes, "mask": mask_bytes, "exported": exported,
                "cli_command": cli_command, "requests": list(requests), "url": url}


def test_example_preset_keyframe_edits_and_preview(flow):
    session = flow["session"]
    assert [k.frame for k in session.path.keyframes] == [0, 2, 4, 8]
    assert session.path.keyframes[2].position[0] == 0.3
    assert session.last_preview is not None and len(session.last_preview.visible) == FRAMES
    # Everything the page loaded came from the app's own servers on 127.0.0.1 (nothing from a CDN).
    assert not off_host(flow["requests"]), f"requests left 127.0.0.1: {off_host(flow['requests'])}"


def test_preview_videos_are_served_and_decode_to_the_frame_count(flow, tmp_path):
    import av

    for name in ("color", "mask"):
        video = tmp_path / f"{name}.mp4"
        video.write_bytes(flow[name])
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == FRAMES and frames[0].shape == (*SIZE, 3), name


def test_exported_pose_file_gives_the_same_cameras_in_ex4d_recon(flow, tmp_path):
    from ex4d.cli import main

    pose_file = tmp_path / "path.json"
    pose_file.write_bytes(flow["exported"])
    # The command the page shows under Outputs, with the downloaded pose file and a new output folder.
    line = next(line for line in flow["cli_command"].splitlines() if line.startswith("ex4d recon"))
    args = shlex.split(line)[1:]
    args[args.index("--cam") + 1] = str(pose_file)
    args[args.index("-o") + 1] = str(tmp_path / "recon")
    assert main(args) == 0
    [recon_camera] = (tmp_path / "recon").glob("camera_*.npz")
    [preview_camera] = [p for p in flow["session"].last_preview.files.values() if p.name.startswith("camera_")]
    with np.load(recon_camera, allow_pickle=False) as got, np.load(preview_camera, allow_pickle=False) as want:
        assert got["cam_from_world"].shape == (FRAMES, 4, 4)
        assert np.array_equal(got["cam_from_world"], want["cam_from_world"])
        assert np.array_equal(got["K"], want["K"])


# --- other pages ---------------------------------------------------------------------------------------

def test_missing_depth_weights_show_the_download_panel(app, shots):
    url, backend = app
    with browser_page(viewport=(1280, 900)) as (page, _):
        before = set(backend.sessions)
        _open(page, url)
        _use_example(page)
        session = _session(backend, before)
        page.get_by_role("tab", name="2. Depth").click()
        page.get_by_label("depth-anything", exact=True).check()
        page.click("#depth_button")
        page.wait_for_selector("#weights_panel", state="visible")
        panel = page.inner_text("#weights_panel")
        expected = session.missing_depth_weights("depth-anything")
        assert expected, "the empty models folder should lack the depth-anything weights"
        for line in expected:          # every missing file with its download command
            assert line.split()[-1] in panel
        assert _error(page).startswith("error: missing weights for depth-anything")
        _shot(page, shots, "weights_panel")


def test_invalid_upload_shows_one_error_line_and_the_app_keeps_serving(app, shots, tmp_path):
    url, backend = app
    bad = tmp_path / "holiday.mp4"
    bad.write_bytes(b"this is not a video\n" * 100)
    with browser_page(viewport=(1280, 900)) as (page, _):
        _open(page, url)
        page.set_input_files("#upload_video input[type=file]", str(bad))
        page.wait_for_function("document.querySelector('#error_box textarea').value.startsWith('error:')")
        message = _error(page)
        assert "\n" not in message.strip() and "Traceback" not in message
        # Cosmetic, for the screenshot: let the page's pending (dimmed) components settle.
        page.wait_for_function("document.querySelectorAll('.pending').length == 0")
        time.sleep(1.0)
        _shot(page, shots, "upload_error")
        # Still serving: the example loads on the same page, and a fresh page opens.
        _use_example(page)
        assert _error(page) == ""
    with browser_page() as (page, _):
        _open(page, url)
