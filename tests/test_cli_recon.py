"""`ex4d recon` end to end on a tiny clip, and every bad input the CLI must reject cleanly."""

import os

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.io.video import read_mask_video, read_video, write_video

T, H, W = 5, 64, 96


@pytest.fixture()
def clip_and_depth(tmp_path):
    """A tiny textured clip and a two-plane depth (near box in front of a far wall)."""
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    frames = []
    for k in range(T):
        checker = (((u + k) // 8 + v // 8) % 2).astype(np.float32)
        frames.append(np.stack([checker * 200 + 30, (u / W) * 255, (v / H) * 255], -1))
    video = write_video(tmp_path / "clip.mp4", np.stack(frames).astype(np.uint8), fps=12)
    depth = np.full((T, H, W), 8.0, np.float32)
    depth[:, 20:44, 30:60] = 3.0
    depth_path = tmp_path / "depth.npz"
    np.savez(depth_path, depth=depth)
    return video, depth_path


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def finished_outputs(folder):
    return [name for name in os.listdir(folder) if name.startswith(("color_", "mask_", "camera_"))] \
        if os.path.isdir(folder) else []


def test_recon_writes_all_outputs(tmp_path, clip_and_depth, capsys):
    video, depth_path = clip_and_depth
    out = tmp_path / "out"
    code, err = run(["recon", str(video), "--depth", str(depth_path), "--cam", "30", "--num-frames", str(T),
                     "--resize", "keep", "-o", str(out)], capsys)
    assert code == 0, err
    for name in ["color_30.mp4", "mask_30.mp4", "mask_30.mkv", "camera_30.npz", "DW-Mesh.ply",
                 "recon_30.json", "depth.npz"]:
        assert (out / name).is_file(), name
    color, fps = read_video(out / "color_30.mp4")
    masks = read_mask_video(out / "mask_30.mkv")
    assert color.shape == (T, H, W, 3) and masks.shape == (T, H, W)
    assert abs(fps - 12) < 1e-6  # source fps kept
    assert masks[0].all()  # frame 0 is the source, fully visible
    assert not masks[-1].all() and masks[-1].any()  # a 30-degree orbit disoccludes something
    with np.load(out / "camera_30.npz") as cams:
        assert cams["cam_from_world"].shape == (T, 4, 4)
        np.testing.assert_allclose(cams["cam_from_world"][0], np.eye(4), atol=1e-9)


@pytest.mark.parametrize("case", ["missing", "not_video", "zero_frames", "too_few", "depth_shape",
                                  "depth_nan", "bad_cam", "unwritable"])
def test_recon_bad_inputs_fail_cleanly(case, tmp_path, clip_and_depth, capsys):
    video, depth_path = clip_and_depth
    out = tmp_path / "out"
    args = {"video": str(video), "depth": str(depth_path), "cam": "30", "frames": str(T), "out": str(out)}
    expect = None
    if case == "missing":
        args["video"], expect = str(tmp_path / "nope.mp4"), "not found"
    elif case == "not_video":
        bogus = tmp_path / "bogus.mp4"
        bogus.write_text("this is not a video")
        args["video"], expect = str(bogus), "cannot read"
    elif case == "zero_frames":
        import av

        empty = tmp_path / "empty.mkv"
        with av.open(str(empty), "w") as container:
            stream = container.add_stream("ffv1", rate=10)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "bgr0"
            container.start_encoding()
        args["video"], expect = str(empty), "zero frames"
    elif case == "too_few":
        args["frames"], expect = "49", "--num-frames"
    elif case == "depth_shape":
        bad = tmp_path / "bad_depth.npz"
        np.savez(bad, depth=np.ones((T, H), np.float32))
        args["depth"], expect = str(bad), "depth"
    elif case == "depth_nan":
        bad = tmp_path / "nan_depth.npz"
        depth = np.full((T, H, W), 5.0, np.float32)
        depth[2, 3, 4] = np.nan
        np.savez(bad, depth=depth)
        args["depth"], expect = str(bad), "NaN"
    elif case == "bad_cam":
        args["cam"], expect = "sideways", "sideways"
    elif case == "unwritable":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        args["out"], expect = str(blocker / "out"), "output folder"
    code, err = run(["recon", args["video"], "--depth", args["depth"], "--cam", args["cam"], "--num-frames",
                     args["frames"], "--resize", "keep", "-o", args["out"]], capsys)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert expect.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert finished_outputs(args["out"]) == []
