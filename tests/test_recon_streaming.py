"""Recon streams frames: same outputs as the in-memory code, nothing held per frame.

The digests below were computed with the in-memory implementation (commit 37c8959, before streaming)
on the scene of ``_scene`` (lossless input video): decoded lossless masks, camera files and PLY
meshes must stay identical.
(H.264 bytes are not compared: libx264 with its default threads is not byte-reproducible run to run.)
"""

import hashlib
import zipfile

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.io.arrays import MappedFrames, NpyFrames, frames_sha1, write_npz_stored
from ex4d.io.video import iter_video, read_mask_video, read_video, write_video

T, H, W = 7, 64, 96

OLD_DIGESTS = {
    "default": {
        "DW-Mesh.ply": "e7ba8fd32304da12f50550cff9a6b59948334e09d72fc4a466a0c70b8acdf909",
        "camera_30.npz": "26683b953636a3ce7ce950b29dca8e4a7bc20a3b1f64449fb08cb0cab2c4c90f",
        "mask_30.mkv:decoded": "f5032cd6ae661e2f908b0638667e9eb0bbb4a39cd2d64f5a9764a7e9bae1e913"},
    "masked_msaa": {
        "DW-Mesh_0000.ply": "182330601e3db878e7afe128834b67eb2df236f6da037443f09869a4a818e360",
        "DW-Mesh_0003.ply": "08291385051ddf178a95f006522c8183c566a17cdbef5924171bcc3b3894e944",
        "DW-Mesh_0006.ply": "82ccbbc92d87ad52ce4148407536fe764a9bc3dc389a6bdb46d64303be0671a4",
        "camera_30.npz": "26683b953636a3ce7ce950b29dca8e4a7bc20a3b1f64449fb08cb0cab2c4c90f",
        "mask_30.mkv:decoded": "64bd0635cb0e6c3a2c2752fdad0b3f34f35fd3e23264f5b82c202f2dc5bd2fac"},
    "first": {
        "DW-Mesh.ply": "31c56d9d388f6e1c368dad54321b71bdf23eef10999a97016ffb08fcea6265e2",
        "camera_zoom_in.npz": "744b473050d95ecebe3e034640623b2521bc3efa2888faca718857b63f223d49",
        "mask_zoom_in.mkv:decoded": "c1d81507b4ea65c2e9269b14d8663620b4e0f7fe2aa59c9baef7f93a5509eb5c"},
}
ARGS = {"default": [], "masked_msaa": ["--cap", "masked", "--antialias", "msaa", "--save-mesh", "all"],
        "first": ["--only-first-frame", "--cam", "zoom_in", "--resize", "reference"]}


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def _scene(tmp_path, compressed=False):
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    frames = []
    for k in range(T):
        checker = (((u + k) // 8 + v // 8) % 2).astype(np.float32)
        frames.append(np.stack([checker * 200 + 30, (u / W) * 255, (v / H) * 255], -1))
    # lossless input: libx264 does not give the same frames run to run here, FFV1 does
    video = write_video(tmp_path / "clip.mkv", np.stack(frames).astype(np.uint8), fps=12, codec="ffv1")
    depth = np.full((T, H, W), 8.0, np.float32)
    depth[:, 20:44, 30:60] = 3.0
    depth[:, :, :10] += np.arange(T)[:, None, None] * 0.5
    (np.savez_compressed if compressed else np.savez)(tmp_path / "depth.npz", depth=depth)
    return video, tmp_path / "depth.npz"


@pytest.mark.parametrize("case", sorted(ARGS))
def test_streamed_recon_matches_the_in_memory_implementation(case, tmp_path, capsys):
    video, depth = _scene(tmp_path, compressed=case == "first")
    out = tmp_path / case
    args = ["recon", str(video), "--depth", str(depth), "--cam", "30", "--num-frames", str(T), "--resize", "keep",
            "-o", str(out)] + ARGS[case]
    assert main(args) == 0, capsys.readouterr().err
    for name, digest in OLD_DIGESTS[case].items():
        path = out / name.split(":")[0]
        data = np.ascontiguousarray(read_mask_video(path)) if name.endswith(":decoded") else path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name


def test_recon_never_holds_the_whole_clip_or_depth(tmp_path, monkeypatch, capsys):
    """The recon path must read frames one at a time: materialising the clip or the depth is an error."""
    from ex4d.io.arrays import FrameSequence
    from ex4d.types import Clip

    def forbidden(self, *args, **kwargs):
        raise AssertionError("recon materialised a whole video")

    video, depth = _scene(tmp_path)
    monkeypatch.setattr(Clip, "frames", property(forbidden))
    monkeypatch.setattr(FrameSequence, "__array__", forbidden)
    code = main(["recon", str(video), "--depth", str(depth), "--cam", "30", "--num-frames", str(T),
                 "--resize", "keep", "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err


def test_meshes_export_on_a_thread_and_their_errors_fail_the_run(tmp_path, monkeypatch, capsys):
    """The PLY export runs beside the rendering, not on the main thread; a failed export fails the run
    with nothing of recon's published (no record, no mesh, no condition video, no staging folder)."""
    import threading

    import ex4d.mesh.dwmesh as dwmesh

    video, depth = _scene(tmp_path)
    real_export, threads = dwmesh.export_ply, []

    def recording_export(mesh, path):
        threads.append(threading.current_thread() is threading.main_thread())
        return real_export(mesh, path)

    monkeypatch.setattr(dwmesh, "export_ply", recording_export)
    args = ["recon", str(video), "--depth", str(depth), "--cam", "30", "--num-frames", str(T), "--resize", "keep",
            "--save-mesh", "all"]
    assert main(args + ["-o", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    assert threads == [False] * T
    assert sorted(p.name for p in (tmp_path / "ok").glob("DW-Mesh_*.ply")) == [f"DW-Mesh_{k:04d}.ply" for k in range(T)]

    def failing_export(mesh, path):
        if path.name.endswith("0003.ply"):
            raise OSError(28, "No space left on device")
        return real_export(mesh, path)

    monkeypatch.setattr(dwmesh, "export_ply", failing_export)
    code = main(args + ["-o", str(tmp_path / "failed")])
    assert code not in (0, 3)  # the user's disk, not a bug of ex4d
    assert "error: no space left on the disk" in capsys.readouterr().err
    # depth.npz is the finished depth stage's own output (reused by the next run); nothing of recon's
    left = [p.name for p in (tmp_path / "failed").iterdir() if p.name not in (".ex4d-files.json", "depth.npz")]
    assert left == []


def test_lazy_clip_frames_equal_the_stacked_resize(tmp_path):
    from ex4d.io.video import reference_size, resize_frames, to_float01
    from ex4d.pipeline import load_clip

    video, _ = _scene(tmp_path)
    clip = load_clip(video, num_frames=5, resize="reference")
    assert clip.is_lazy and clip.num_frames == 5 and clip.size == reference_size(H, W)
    stacked = to_float01(resize_frames(read_video(video, 5)[0], clip.size))
    np.testing.assert_array_equal(np.stack(list(clip.iter_frames())), stacked)
    np.testing.assert_array_equal(clip.frames, stacked)
    assert clip.identity() == load_clip(video, num_frames=5).identity() != load_clip(video, num_frames=4).identity()


@pytest.mark.parametrize("layout", ["npy", "npz", "npz_compressed", "T1HW"])
def test_depth_file_frames_equal_the_whole_array_conversion(tmp_path, layout, rng):
    """DepthFile converts frame by frame exactly as the whole-clip formulas (fill, disparity, resize)."""
    from ex4d.depth.files import DepthFile
    from ex4d.depth.normalize import disparity_to_depth, resize_depth, resize_mask

    disparity = (rng.random((4, 10, 12)) + 0.2).astype(np.float32)
    valid = rng.random((4, 10, 12)) > 0.1
    path = tmp_path / ("d.npy" if layout in ("npy", "T1HW") else "d.npz")
    if layout == "npy":
        np.save(path, disparity)
    elif layout == "T1HW":
        np.save(path, disparity[:, None])
    else:
        (np.savez_compressed if layout == "npz_compressed" else np.savez)(path, disparity=disparity, valid=valid)
    has_valid = layout.startswith("npz")
    opened = DepthFile(path, num_frames=3, size=(20, 24), kind="disparity")
    d = disparity[:3]
    v = valid[:3] if has_valid else np.ones_like(d, bool)
    expected = resize_depth(disparity_to_depth(np.where(v, d, d[v].min())), (20, 24))
    np.testing.assert_array_equal(np.asarray(opened.depth), expected)
    np.testing.assert_array_equal(np.asarray(opened.valid), resize_mask(v, (20, 24)))
    np.testing.assert_array_equal(opened.depth[2], expected[2])  # random access


def test_depth_npz_is_written_uncompressed_and_read_frame_by_frame(tmp_path, rng):
    from ex4d.types import DepthVideo

    depth = (rng.random((6, 5, 7)) + 1).astype(np.float32)
    lazy = MappedFrames(6, (5, 7), np.float32, lambda k: depth[k])
    DepthVideo(lazy, np.ones((6, 5, 7), bool), np.eye(3), "e", {"a": 1}).save(tmp_path / "depth.npz")
    with zipfile.ZipFile(tmp_path / "depth.npz") as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    loaded = DepthVideo.load(tmp_path / "depth.npz")
    assert isinstance(loaded.depth, NpyFrames) and not loaded.depth.compressed
    np.testing.assert_array_equal(loaded.depth[4], depth[4])
    np.testing.assert_array_equal(np.asarray(loaded.depth), depth)
    assert loaded.estimator == "e" and loaded.settings == {"a": 1} and loaded.K.shape == (3, 3)
    with np.load(tmp_path / "depth.npz") as data:  # still an ordinary npz
        np.testing.assert_array_equal(data["depth"], depth)
    assert frames_sha1(loaded.depth) == hashlib.sha1(depth).hexdigest()


def test_npz_stored_writer_and_truncated_file(tmp_path, rng):
    a = rng.random((3, 4, 5)).astype(np.float32)
    with open(tmp_path / "x.npz", "wb") as handle:
        write_npz_stored(handle, {"depth": a})
    np.save(tmp_path / "t.npy", a)
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        NpyFrames(tmp_path / "t.npy")[2]


def test_truncated_depth_file_is_one_line(tmp_path, rng):
    from ex4d.depth import load_depth_file
    from ex4d.errors import InputError

    np.save(tmp_path / "t.npy", (rng.random((3, 4, 5)) + 1).astype(np.float32))
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-10])
    with pytest.raises(InputError, match="t.npy.*complete"):
        load_depth_file(tmp_path / "t.npy", num_frames=3, size=(4, 5))


def test_video_writer_streams_and_leaves_nothing_on_error(tmp_path):
    from ex4d.io.video import VideoWriter

    frames = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    with VideoWriter(tmp_path / "a.mkv", 10, codec="ffv1") as writer:
        for frame in frames:
            writer.write(frame)
    np.testing.assert_array_equal(np.stack(list(iter_video(tmp_path / "a.mkv"))), frames)
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "b.mp4", 10) as writer:
            writer.write(frames[0])
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir() if p.name != ".ex4d-files.json"] == ["a.mkv"]


def test_background_video_writer_gives_the_same_bytes_and_owns_its_frames(tmp_path):
    import threading

    from ex4d.io.video import VideoWriter

    frames = (np.random.default_rng(1).random((9, 48, 64, 3)) * 255).astype(np.uint8)
    for background in (False, True):
        buffer = np.empty_like(frames[0])  # one buffer reused for every frame, as a render loop may do
        with VideoWriter(tmp_path / f"{background}.mp4", 10, background=background, queue_frames=2) as writer:
            for frame in frames:
                buffer[...] = frame
                writer.write(buffer)
            buffer[...] = 0  # after the last write: must not reach the file
        with VideoWriter(tmp_path / f"{background}.mkv", 10, codec="ffv1", background=background) as writer:
            for frame in frames:
                writer.write(frame[..., 0])
    assert (tmp_path / "True.mp4").read_bytes() == (tmp_path / "False.mp4").read_bytes()
    np.testing.assert_array_equal(np.stack(list(iter_video(tmp_path / "True.mkv")))[..., 0], frames[..., 0])
    assert not [t for t in threading.enumerate() if t.name.startswith("encode ")], "encoder threads left running"


def test_background_video_writer_errors_leave_nothing(tmp_path):
    import threading

    from ex4d.errors import InputError
    from ex4d.io.video import VideoWriter

    frames = (np.random.default_rng(2).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    # an error in the caller's block: the queued frames are dropped with the file
    with pytest.raises(RuntimeError, match="killed"):
        with VideoWriter(tmp_path / "a.mp4", 10, background=True) as writer:
            writer.write(frames[0])
            raise RuntimeError("killed")
    # an error inside the encoder thread: raised in the caller, no file kept
    with pytest.raises(ValueError, match="boom"):
        with VideoWriter(tmp_path / "b.mp4", 10, background=True) as writer:
            def fail(frame):
                raise ValueError("boom")
            writer._encode = fail
            writer.write(frames[0])
            writer.write(frames[1])
    # a bad frame is refused in the caller's thread, at once
    with pytest.raises(InputError, match="even sizes"):
        with VideoWriter(tmp_path / "c.mp4", 10, background=True) as writer:
            writer.write(np.zeros((15, 16, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir() if p.name != ".ex4d-files.json"] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("encode ")], "encoder threads left running"


def test_background_writers_flush_on_their_threads_at_once(tmp_path):
    """end_input starts each background writer's final flush on its own thread without waiting: the
    ConditionWriter's three videos flush at the same time. The bytes equal a foreground encode; a
    flush error is raised at the block's end and no file is kept; writing after end_input is refused."""
    import threading

    from ex4d.io.video import CONDITION_H264_LOOKAHEAD, VideoWriter
    from ex4d.types import ConditionWriter

    frames = (np.random.default_rng(3).random((12, 32, 48, 3)) * 255).astype(np.uint8)
    flushing = threading.Barrier(3, timeout=20)  # passes only if the three flushes run at the same time
    originals = {}

    def barrier_flush(writer):
        def flush():
            flushing.wait()
            originals[writer.path.name]()
        return flush

    with ConditionWriter(tmp_path / "bg", "x", 10) as condition:
        for writer in condition._writers.values():
            originals[writer.path.name] = writer._flush
            writer._flush = barrier_flush(writer)
        for frame in frames:
            condition.write(frame.astype(np.float32) / 255, frame[..., 0] > 127)
    (tmp_path / "fg").mkdir()
    with VideoWriter(tmp_path / "fg" / "color_x.mp4", 10, lookahead=CONDITION_H264_LOOKAHEAD) as writer:
        for frame in frames:
            writer.write(frame)
    assert (tmp_path / "bg" / "color_x.mp4").read_bytes() == (tmp_path / "fg" / "color_x.mp4").read_bytes()

    with pytest.raises(ValueError, match="write after end_input"):
        with VideoWriter(tmp_path / "late.mp4", 10, background=True) as writer:
            writer.write(frames[0])
            writer.end_input()
            writer.write(frames[1])

    def failing_flush():
        raise RuntimeError("flush failed")

    with pytest.raises(RuntimeError, match="flush failed"):
        with VideoWriter(tmp_path / "failed.mp4", 10, background=True) as writer:
            writer._flush = failing_flush
            for frame in frames:
                writer.write(frame)
    assert not (tmp_path / "late.mp4").exists() and not (tmp_path / "failed.mp4").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("encode ")], "encoder threads left running"


def test_ctrl_c_while_the_encoder_thread_starts_is_still_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C between creating the encoder thread and starting it: the interrupt goes through (exit
    130 in the CLI), not "cannot join thread before it is started" (exit 3), and nothing is kept."""
    import threading

    from ex4d.io.video import VideoWriter

    def interrupted_start(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "a.mp4", 10, background=True) as writer:
            writer.write(np.zeros((16, 16, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir() if p.name != ".ex4d-files.json"] == []


def test_memory_refusal_is_one_line(monkeypatch):
    from ex4d import pipeline
    from ex4d.errors import InputError

    monkeypatch.setattr(pipeline, "available_memory", lambda: 2**30)
    with pytest.raises(InputError, match="needs about 2.0 GiB of memory but 1.0 GiB") as info:
        pipeline.check_memory(2**31, "rendering 9000x9000 frames", "use --resize reference")
    assert "\n" not in str(info.value)
