"""Recon's outputs: refused before any work when they would overwrite inputs or foreign
files, written as one set so that interruptions never leave a record claiming a mixed set,
and the depth range and the pixel convention on the command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.io.video import read_mask_video, write_video

T, H, W = 5, 64, 96


def _scene(folder: Path, frames: int = T, height: int = H, width: int = W):
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    video = np.stack([np.stack([((u + k) // 8 + v // 8) % 2 * 200 + 30, u * 255 // width, v * 255 // height], -1)
                      for k in range(frames)]).astype(np.uint8)
    path = write_video(folder / "clip.mkv", video, fps=12, codec="ffv1")
    depth = np.full((frames, height, width), 8.0, np.float32)
    depth[:, height // 3: 2 * height // 3, width // 3: 2 * width // 3] = 3.0
    np.save(folder / "d.npy", depth)
    return path, folder / "d.npy"


def _recon(video, depth, out, *extra, frames=T):
    return ["recon", str(video), "--depth", str(depth), "--cam", "30", "--num-frames", str(frames),
            "--resize", "keep", "-o", str(out), *extra]


def _consistent(out: Path, name: str = "30") -> dict | None:
    """The record if it exists, after checking that every file it lists has its recorded sha256."""
    from ex4d.pipeline import _sha256

    record_path = out / f"recon_{name}.json"
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    for role, file in record["files"].items():
        if role != "record":
            assert _sha256(out / file) == record["sha256"][file], f"{file} does not match its record"
    return record


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ---- planned outputs checked before any work ---------------------------------------------------
def test_foreign_depth_npz_is_refused_before_any_work(tmp_path, capsys):
    video, depth = _scene(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "depth.npz").write_bytes(b"the user's own depth")
    assert main(_recon(video, "depth-anything", out)) == 1  # an estimator: nothing may run first
    err = capsys.readouterr().err
    assert "depth.npz" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "depth.npz").read_bytes() == b"the user's own depth"
    assert sorted(p.name for p in out.iterdir()) == ["depth.npz"]
    assert main(["depth", str(video), "--depth", str(depth), "-o", str(out), "--num-frames", str(T)]) == 1
    assert (out / "depth.npz").read_bytes() == b"the user's own depth"
    assert main(_recon(video, depth, out, "--overwrite")) == 0
    assert _consistent(out) is not None


@pytest.mark.parametrize("name", ["DW-Mesh.ply", "recon_30.json", "mask_30.mkv", "camera_30.npz"])
def test_foreign_recon_output_is_refused(tmp_path, capsys, name):
    video, depth = _scene(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("mine")
    assert main(_recon(video, depth, out)) == 1
    assert name in capsys.readouterr().err and (out / name).read_text() == "mine"
    assert not (out / "color_30.mp4").exists()


def test_recon_refuses_its_own_input_video(tmp_path, capsys):
    video, depth = _scene(tmp_path)
    out = tmp_path / "out"
    assert main(_recon(video, depth, out)) == 0
    capsys.readouterr()
    before = (out / "color_30.mp4").read_bytes()
    assert main(_recon(out / "color_30.mp4", depth, out)) == 1
    err = capsys.readouterr().err
    assert "also an input" in err and "color_30.mp4" in err
    assert (out / "color_30.mp4").read_bytes() == before
    preview_in = tmp_path / "p"
    assert main(["depth", str(video), "--depth", str(depth), "-o", str(preview_in), "--num-frames", str(T)]) == 0
    capsys.readouterr()
    # ``depth`` reading its own depth_preview.mp4 as the video would overwrite it
    assert main(["depth", str(preview_in / "depth_preview.mp4"), "--depth", str(depth), "-o", str(preview_in),
                 "--num-frames", str(T)]) == 1
    assert "also an input" in capsys.readouterr().err


def test_recon_plan_names_every_output(tmp_path):
    # (trajectory_name itself is checked against built trajectories in test_camera.py)
    from ex4d.pipeline import ReconOptions, plan_recon_outputs

    names = [p.name for p in plan_recon_outputs(tmp_path, ReconOptions(cam="30", save_mesh="all"), num_frames=3,
                                                depth_spec="x.npy")]
    assert names == ["depth.npz", "color_30.mp4", "mask_30.mp4", "mask_30.mkv", "camera_30.npz",
                     "DW-Mesh_0000.ply", "DW-Mesh_0001.ply", "DW-Mesh_0002.ply", "recon_30.json"]


# ---- the output set is atomic -----------------------------------------------------------------
def test_record_holds_hashes_and_a_changed_file_is_rendered_again(tmp_path, capsys):
    video, depth = _scene(tmp_path)
    out = tmp_path / "out"
    assert main(_recon(video, depth, out)) == 0
    record = _consistent(out)
    assert set(record["sha256"]) == {"color_30.mp4", "mask_30.mp4", "mask_30.mkv", "camera_30.npz", "DW-Mesh.ply"}
    assert record["render"]["pixel_convention"] == "centers"
    mtime = (out / "recon_30.json").stat().st_mtime_ns
    assert main(_recon(video, depth, out)) == 0  # reused
    assert (out / "recon_30.json").stat().st_mtime_ns == mtime
    # a file replaced behind ex4d's back (same size, so only the hash can tell) is not reused
    data = bytearray((out / "mask_30.mkv").read_bytes())
    data[-1] ^= 1
    os.chmod(out / "mask_30.mkv", 0o644)
    (out / "mask_30.mkv").write_bytes(bytes(data))
    assert main(_recon(video, depth, out, "--overwrite")) == 0
    assert (out / "recon_30.json").stat().st_mtime_ns != mtime and _consistent(out) is not None


def test_crash_while_swapping_leaves_no_record(tmp_path, monkeypatch, capsys):
    """Killed between renames: the old record was retracted first, so nothing claims the mixed set."""
    import ex4d.io.files as files

    video, depth = _scene(tmp_path)
    out = tmp_path / "out"
    assert main(_recon(video, depth, out)) == 0
    real, calls = files.atomic_path, []

    def failing(path):
        calls.append(path)
        if len(calls) == 2:
            raise SystemExit("power cut")
        return real(path)

    monkeypatch.setattr(files, "atomic_path", failing)
    with pytest.raises(SystemExit):
        main(_recon(video, depth, out, "--cap", "masked"))
    monkeypatch.setattr(files, "atomic_path", real)
    assert not (out / "recon_30.json").exists()
    assert not _leftovers(out)
    assert main(_recon(video, depth, out, "--cap", "masked")) == 0
    assert _consistent(out)["options"]["cap"] == "masked"


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "ex4d.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_render(proc, out: Path, timeout: float = 60.0) -> None:
    """Until the staging folder holds the first mesh (the render loop has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in out.glob(".recon_30.partial-*"):
            if (entry / "DW-Mesh.ply").exists():
                return
        if proc.poll() is not None:
            raise AssertionError(f"recon ended before it could be interrupted: {proc.communicate()[1][-500:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("recon never started rendering")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_rerun_then_rerun(tmp_path, sig, capsys):
    frames, height, width = 60, 64, 96
    video, depth = _scene(tmp_path, frames, height, width)
    out, clean = tmp_path / "out", tmp_path / "clean"
    assert main(_recon(video, depth, out, frames=frames)) == 0  # settings A
    first = _consistent(out)
    proc = _start(_recon(video, depth, out, "--cap", "masked", frames=frames), tmp_path)  # settings B
    _wait_for_render(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and "partial outputs were not kept" in err
        assert not _leftovers(out)  # the message is true: nothing of the interrupted run is left
    after = _consistent(out)  # the old set is untouched and still consistent with its record
    assert after is not None and after["sha256"] == first["sha256"] and after["options"]["cap"] == "none"
    assert main(_recon(video, depth, out, "--cap", "masked", frames=frames)) == 0
    assert main(_recon(video, depth, clean, "--cap", "masked", frames=frames)) == 0
    assert not _leftovers(out)
    final, reference = _consistent(out), _consistent(clean)
    assert final["options"]["cap"] == "masked" and final["request"] == reference["request"]
    np.testing.assert_array_equal(read_mask_video(out / "mask_30.mkv"), read_mask_video(clean / "mask_30.mkv"))
    for name in ["camera_30.npz", "DW-Mesh.ply"]:
        assert (out / name).read_bytes() == (clean / name).read_bytes()


# ---- the depth range and the pixel convention on the command line -------------------------------
@pytest.mark.parametrize("value", [1e30, 1e-30, 5000.0])
def test_depth_that_renders_nothing_is_refused(tmp_path, capsys, value):
    video, _ = _scene(tmp_path)
    np.save(tmp_path / "bad.npy", np.full((T, H, W), value, np.float32))
    assert main(_recon(video, tmp_path / "bad.npy", tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "bad.npy" in err and err.count("\n") == 1 and ("render" in err)
    assert not (tmp_path / "out" / "color_30.mp4").exists()


def test_pixel_convention_is_recorded(tmp_path, capsys):
    video, depth = _scene(tmp_path)
    out = tmp_path / "out"
    assert main(_recon(video, depth, out, "--pixel-convention", "reference")) == 0
    record = _consistent(out)
    assert record["render"]["pixel_convention"] == "reference" and record["options"]["pixel_convention"] == "reference"
    assert record["render"]["pixel_centres"] == "half-integer"
