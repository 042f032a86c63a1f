"""One preflight message for every missing weight file, before any work; a
Hub that cannot be reached is detected at once (no retry storm); ``--models-dir`` help and hints."""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.depth import weights as dw
from ex4d.diffusion.weights import models_dir as md
from ex4d.errors import MissingWeightsError
from ex4d import weights_common
from ex4d.weights_preflight import check_pairs_weights, check_weights, missing_weights

T = 5
SIZE = 64


@pytest.fixture
def hub_down(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, an empty cache, and HF_ENDPOINT at a local port where nothing listens."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    weights_common.forget_probe()
    yield f"127.0.0.1:{port}"
    weights_common.forget_probe()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A short video and its exact depth file (ex4d synth)."""
    folder = tmp_path_factory.mktemp("clip")
    assert main(["synth", "-o", str(folder), "--num-frames", str(T), "--size", f"{SIZE}x{SIZE}"]) == 0
    return folder / "video.mp4", folder / "depth.npz"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _full_models_dir(root: Path) -> Path:
    """Every file the preflight looks for (placeholders: the preflight checks presence, not contents)."""
    for spec in (dw.DEPTHCRAFTER_UNET, dw.SVD_VAE, dw.SVD_IMAGE_ENCODER, dw.depth_anything_file("small")):
        _touch(root / spec.repo / spec.rel(spec.config))
        _touch(root / spec.repo / spec.rel(spec.weights[0]))
    wan = root / md.WAN_REPO
    for i in range(1, 8):
        _touch(wan / f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors")
    for name in (md.T5_FILE, md.CLIP_FILE, md.VAE_FILE, f"{md.TOKENIZER_DIR}/tokenizer.json"):
        _touch(wan / name)
    _touch(root / md.EX4D_REPO / md.ADAPTER_CKPT)
    return root


# ------------------------------------------------------------------------------------------
# One message, every missing file, its command and size
# ------------------------------------------------------------------------------------------

def test_models_dir_missing_everything_gives_one_message_naming_all(tmp_path, offline):
    models = tmp_path / "models"
    with pytest.raises(MissingWeightsError) as info:
        check_weights(depth="depthcrafter", generation=True, models_dir=models)
    message = str(info.value)
    assert "\n" not in message and "4 downloads" in message
    for expected in (
        f"{models}/tencent/DepthCrafter/diffusion_pytorch_model.safetensors",
        f"hf download tencent/DepthCrafter --local-dir {models}/tencent/DepthCrafter", "3.05 GB",
        f"{models}/stabilityai/stable-video-diffusion-img2vid-xt/vae/diffusion_pytorch_model.fp16.safetensors",
        "image_encoder/model.fp16.safetensors", "1.46 GB", "hf auth login",
        f"{models}/{md.WAN_REPO}", f"hf download {md.WAN_REPO} --local-dir {models}/{md.WAN_REPO}", "82 GB",
        f"{models}/{md.EX4D_REPO}/{md.ADAPTER_CKPT}",
        f"hf download {md.EX4D_REPO} {md.ADAPTER_CKPT} --local-dir {models}/{md.EX4D_REPO}", "0.4 GB",
    ):
        assert expected in message, expected
    assert missing_weights(depth="depthcrafter", generation=True, models_dir=_full_models_dir(tmp_path / "full")) == []


def test_partial_wan_folder_names_each_missing_file(tmp_path, offline):
    models = _full_models_dir(tmp_path / "models")
    (models / md.WAN_REPO / md.T5_FILE).unlink()
    (models / md.WAN_REPO / "diffusion_pytorch_model-00003-of-00007.safetensors").unlink()
    (models / "stabilityai").rename(tmp_path / "elsewhere")  # SVD gone: DepthCrafter needs it too
    with pytest.raises(MissingWeightsError) as info:
        check_weights(depth="depthcrafter", generation=True, models_dir=models)
    message = str(info.value)
    assert "2 downloads" in message and md.T5_FILE in message
    assert "diffusion_pytorch_model-00003-of-00007.safetensors" in message and "00002-of" not in message
    assert "stable-video-diffusion-img2vid-xt" in message
    assert "tencent/DepthCrafter/" not in message.split("download with")[0]  # present: not listed
    assert md.ADAPTER_CKPT not in message


def test_no_models_dir_suggests_one_folder_for_everything(tmp_path, offline):
    with pytest.raises(MissingWeightsError) as info:
        check_weights(depth="depth-anything", generation=True)
    message = str(info.value)
    assert "--local-dir models/depth-anything/Depth-Anything-V2-Small-hf" in message
    assert f"--local-dir models/{md.WAN_REPO}" in message and "pass --models-dir models" in message


def test_run_with_missing_generation_weights_fails_before_any_recon_output(tmp_path, offline, clip_files, capsys):
    video, depth = clip_files
    out = tmp_path / "out"
    code = main(["run", str(video), "--depth", str(depth), "--num-frames", str(T), "--resize", "keep", "--cam", "30",
                 "-o", str(out), "--models-dir", str(tmp_path / "models"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert md.WAN_REPO in err and md.ADAPTER_CKPT in err and "2 downloads" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # no colour, mask, mesh or depth file


def test_run_with_depthcrafter_lists_depth_and_generation_weights(tmp_path, offline, clip_files, capsys):
    video, _ = clip_files
    out = tmp_path / "out"
    code = main(["run", str(video), "--num-frames", str(T), "--resize", "keep", "--cam", "30", "-o", str(out),
                 "--models-dir", str(tmp_path / "models"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "4 downloads" in err
    assert all(name in err for name in ("tencent/DepthCrafter", "stable-video-diffusion", md.WAN_REPO, md.ADAPTER_CKPT))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command", ["depth", "recon"])
def test_depth_and_recon_check_the_estimator_before_any_work(tmp_path, offline, clip_files, capsys, command):
    video, _ = clip_files
    out = tmp_path / "out"
    args = [command, str(video), "-o", str(out), "--num-frames", str(T), "--models-dir", str(tmp_path / "m"),
            "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tencent/DepthCrafter" in err and "stable-video-diffusion" in err and "2 downloads" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_depth_file_made_by_the_estimator_is_reused_without_its_weights(tmp_path, offline, clip_files):
    from ex4d.types import DepthVideo

    video, _ = clip_files
    cache = tmp_path / "out" / "depth.npz"
    cache.parent.mkdir()
    d = np.full((T, SIZE, SIZE), 5.0, np.float32)
    DepthVideo(depth=d, valid=np.ones_like(d, bool), estimator="depthcrafter",
               settings={"request": {"estimator": "depthcrafter", "source": {"path": str(video.resolve())}}}).save(cache)
    check_weights(depth="depthcrafter", models_dir=tmp_path / "m", depth_cache=cache, video=video)  # no error
    with pytest.raises(MissingWeightsError):  # made from another video: the estimator will run
        check_weights(depth="depthcrafter", models_dir=tmp_path / "m", depth_cache=cache, video=tmp_path / "x.mp4")
    with pytest.raises(MissingWeightsError):  # made by another estimator
        check_weights(depth="depth-anything", models_dir=tmp_path / "m", depth_cache=cache, video=video)


def test_make_pairs_checks_the_estimator_once_before_the_first_clip(tmp_path, offline, clip_files, capsys):
    from ex4d.train.pairs import ClipInput

    video, depth = clip_files
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(video, videos / name)
    out = tmp_path / "pairs"
    assert main(["make-pairs", str(videos), "-o", str(out), "--models-dir", str(tmp_path / "m"),
                 "--num-frames", str(T), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "tencent/DepthCrafter" in err and len(err.strip().splitlines()) == 1
    assert not (out / "clips").exists()
    # every clip brings its depth, or a folder of depth files: no estimator, nothing to check
    check_pairs_weights("depthcrafter", [ClipInput("a", video, depth)], tmp_path / "m")
    check_pairs_weights(str(tmp_path), [ClipInput("a", video, None)], tmp_path / "m")


def test_batch_checks_every_jobs_weights_before_the_first_job(tmp_path, offline, clip_files, capsys):
    video, depth = clip_files
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"defaults: {{num_frames: {T}, resize: keep, device: cpu, models_dir: {tmp_path / 'm'}}}\n"
        "jobs:\n"
        f"  - {{video: {video}, depth: {depth}, cam: 30, output: {tmp_path / 'out' / 'a'}, stage: run}}\n"
        f"  - {{video: {video}, depth: depth-anything, cam: 30, output: {tmp_path / 'out' / 'b'}, stage: recon}}\n")
    assert main(["batch", str(jobs)]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("Depth-Anything-V2-Small-hf", md.WAN_REPO, md.ADAPTER_CKPT))
    assert "3 downloads" in err
    assert not (tmp_path / "out").exists()  # no job started, no record written


def test_train_checks_the_wan_weights_before_loading(tmp_path, offline, clip_files, capsys):
    video, depth = clip_files
    videos, depths = tmp_path / "videos", tmp_path / "depths"
    videos.mkdir()
    depths.mkdir()
    shutil.copy(video, videos / "a.mp4")
    shutil.copy(depth, depths / "a.npz")
    assert main(["make-pairs", str(videos), "--depth", str(depths), "--num-frames", str(T), "-o",
                 str(tmp_path / "pairs"), "--device", "cpu", "--families", "orbit=1"]) == 0
    capsys.readouterr()
    code = main(["train", str(tmp_path / "pairs"), "-o", str(tmp_path / "run"), "--models-dir", str(tmp_path / "m"),
                 "--num-frames", str(T), "--size", "32x32", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"hf download {md.WAN_REPO}" in err and "1 download," in err
    assert md.ADAPTER_CKPT not in err  # training does not need the released adapter


def test_downloadable_weights_pass_when_the_hub_answers(tmp_path, monkeypatch):
    """Depth weights are fetched by their stage when online: the preflight lets them through then,
    and only then; Wan and the adapter are never downloaded by the commands, so they always count."""
    import ex4d.weights_preflight as wp

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(wp, "hub_unreachable", lambda: None)
    check_weights(depth="depth-anything", models_dir=tmp_path / "m")  # will download: no error
    with pytest.raises(MissingWeightsError) as info:
        check_weights(depth="depth-anything", generation=True, models_dir=tmp_path / "m")
    assert "Depth-Anything-V2-Small-hf" in str(info.value) and md.WAN_REPO in str(info.value)
    monkeypatch.setattr(wp, "hub_unreachable", lambda: "https://huggingface.co cannot be reached: no route")
    with pytest.raises(MissingWeightsError, match="Hub is unreachable.*no route"):
        check_weights(depth="depth-anything", models_dir=tmp_path / "m")


# ------------------------------------------------------------------------------------------
# An unreachable Hub is one fast line, never the retry loop
# ------------------------------------------------------------------------------------------

def test_unreachable_hub_is_one_line_without_retries(tmp_path, hub_down, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(MissingWeightsError) as info:
        dw.resolve(dw.DEPTHCRAFTER_UNET, tmp_path / "m")
    message = str(info.value)
    assert "Hub is unreachable" in message and hub_down in message and "\n" not in message
    assert "hf download tencent/DepthCrafter" in message
    with pytest.raises(MissingWeightsError, match="nothing was downloaded.*cannot be reached"):
        md.resolve_adapter(tmp_path / "m", download=True)
    captured = capfd.readouterr()
    for text in (caplog.text, captured.err, captured.out):
        assert "Retrying" not in text and "Retry " not in text


def test_the_hub_is_probed_once_per_process(tmp_path, hub_down, monkeypatch):
    calls = []
    probe = weights_common._probe
    monkeypatch.setattr(weights_common, "_probe", lambda url, timeout: calls.append(url) or probe(url, timeout))
    for spec in (dw.DEPTHCRAFTER_UNET, dw.SVD_VAE, dw.depth_anything_file("small")):
        with pytest.raises(MissingWeightsError):
            dw.resolve(spec, tmp_path / "m")
    assert len(calls) == 1 and calls[0].endswith(hub_down)


def test_cli_with_the_hub_down_prints_one_line(tmp_path, hub_down, clip_files, capfd):
    video, _ = clip_files
    code = main(["depth", str(video), "-o", str(tmp_path / "out"), "--depth", "depth-anything", "--num-frames", str(T),
                 "--models-dir", str(tmp_path / "m"), "--device", "cpu"])
    err = capfd.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: missing weights")
    assert "Hub is unreachable" in err and "Retrying" not in err


def test_probe_tells_reachable_from_unreachable(hub_down):
    import http.server
    import threading

    assert weights_common.hub_unreachable() is not None  # nothing listens there
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert weights_common._probe(f"http://127.0.0.1:{server.server_port}", 3.0) is None  # any answer counts
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------
# --models-dir is the folder above the repositories
# ------------------------------------------------------------------------------------------

def test_depth_help_does_not_suggest_the_repository_folder(capsys):
    with pytest.raises(SystemExit):
        main(["depth", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    option = help_text.split("--models-dir MODELS_DIR")[-1].split(" --", 1)[0]  # the option, not the usage
    assert "e.g. MODELS for MODELS/tencent/DepthCrafter/" in option and "not that folder itself" in option
    docs = Path(__file__).resolve().parents[1] / "docs"
    for name in ("depth.md", "models.md"):
        text = (docs / name).read_text()
        assert "--models-dir MODELS/tencent" not in text and "--models-dir models/tencent" not in text


def test_models_dir_pointing_at_the_repository_folder_gets_a_hint(tmp_path, offline):
    spec = dw.DEPTHCRAFTER_UNET
    folder = tmp_path / "models" / spec.repo
    _touch(folder / spec.config)
    _touch(folder / spec.weights[0])
    with pytest.raises(MissingWeightsError, match=f"try --models-dir {tmp_path / 'models'}"):
        dw.resolve(spec, folder, allow_download=False)
