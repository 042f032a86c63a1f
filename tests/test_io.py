"""Video IO, resize rule and atomic writes."""

import os

import numpy as np
import pytest

from ex4d.errors import InputError
from ex4d.io.files import atomic_path, prepare_output_dir
from ex4d.io.video import (read_mask_video, read_video, reference_size, resize_frames, to_uint8,
                           write_video)


def test_reference_size_examples_from_spec():
    assert reference_size(1080, 1920) == (576, 1024)
    assert reference_size(512, 512) == (512, 512)
    # 480/64 = 7.5 rounds (half to even) to 8; 854/64 = 13.3 rounds to 13.
    assert reference_size(480, 854) == (512, 832)


def test_h264_round_trip_is_close_and_fps_kept(tmp_path):
    base = np.linspace(0, 255, 32 * 48, dtype=np.float32).reshape(32, 48)
    frames = np.stack([np.stack([base, base[::-1], np.full_like(base, 30 * k)], -1) for k in range(5)])
    frames = frames.astype(np.uint8)
    path = write_video(tmp_path / "clip.mp4", frames, fps=15)
    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape
    assert abs(fps - 15) < 1e-6
    # H.264 at crf 16 with 4:2:0 chroma subsampling: a few levels of error on this sharp colour ramp.
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 5.0


def test_ffv1_mask_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 24)) > 0.5
    path = write_video(tmp_path / "mask.mkv", masks.astype(np.uint8) * 255, fps=30, codec="ffv1")
    np.testing.assert_array_equal(read_mask_video(path), masks)


def test_read_video_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("hello")
    with pytest.raises(InputError, match="cannot read"):
        read_video(not_video)
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    path = write_video(tmp_path / "short.mp4", frames, fps=10)
    with pytest.raises(InputError, match="only 3 frames"):
        read_video(path, num_frames=49)


def test_resize_frames_matches_bilinear_half_pixel():
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    out = resize_frames(frames, (2, 2))
    # Half-pixel centres: output pixel (0,0) samples input at (0.5, 0.5), the mean of the 2x2 block.
    np.testing.assert_allclose(out[0, 0, 0], frames[0, :2, :2].mean(axis=(0, 1)))
    assert resize_frames(to_uint8(frames / frames.max()), (8, 8)).dtype == np.uint8


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done"


def test_prepare_output_dir_rejects_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create output folder"):
        prepare_output_dir(blocker / "sub")


_ENCODE_SCRIPT = """
import hashlib, os, sys
import numpy as np
from ex4d.io.video import write_video
os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(',')})
rng = np.random.default_rng(0)
frames = (np.clip(rng.random((1, 256, 256, 3)) + 0.02 * np.arange(17)[:, None, None, None], 0, 1) * 255)
write_video(sys.argv[1], frames.astype(np.uint8), fps=24)
print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs at least 2 CPUs to compare encodes under different CPU counts")
def test_h264_bytes_do_not_depend_on_the_cpus_available(tmp_path):
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    digests = set()
    for name, allowed in (("one", cpus[:1]), ("all", cpus)):
        out = subprocess.run([sys.executable, "-c", _ENCODE_SCRIPT, str(tmp_path / f"{name}.mp4"),
                              ",".join(map(str, allowed))], capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_h264_of_a_narrow_video_decodes_to_its_own_size(tmp_path):
    """Widths that are not a multiple of 128 are coded wider and cropped in the stream header."""
    from ex4d.io.video import H264_WIDTH_MULTIPLE

    y, x = np.mgrid[0:48, 0:64]
    # A smooth picture whose columns all differ: a crop in the wrong place would shift it visibly.
    frame = np.stack([4 * x, 5 * y, 2 * x + 2 * y], axis=-1).clip(0, 255).astype(np.uint8)
    frames = np.stack([frame] * 5)
    path = write_video(tmp_path / "narrow.mp4", frames, fps=24)
    decoded = read_video(path)[0].astype(int)
    assert 64 % H264_WIDTH_MULTIPLE != 0 and decoded.shape == (5, 48, 64, 3)
    in_place = np.abs(decoded - frames).mean()
    assert in_place < 2.0  # lossy (1.63 measured, as without the extra columns), but the same picture
    assert np.abs(decoded[:, :, 1:] - frames[:, :, :-1]).mean() > in_place + 0.3  # one column off: worse
    assert np.abs(decoded[:, :, :-1] - frames[:, :, 1:]).mean() > in_place + 0.3


def test_read_ahead_keeps_order_and_raises_the_sources_error_in_place():
    from ex4d.io.arrays import read_ahead

    assert list(read_ahead(range(10), ahead=3)) == list(range(10))

    def source():
        yield 1
        yield 2
        raise InputError("frame 3 is unreadable")

    got = []
    with pytest.raises(InputError, match="frame 3 is unreadable"):
        for item in read_ahead(source()):
            got.append(item)
    assert got == [1, 2], "the items before the error arrive first"
    with pytest.raises(ValueError, match="ahead"):
        next(read_ahead([1], ahead=0))


def test_read_ahead_closed_early_stops_its_thread_and_closes_the_source():
    import threading

    from ex4d.io.arrays import read_ahead

    closed = threading.Event()

    def endless():
        try:
            k = 0
            while True:
                yield k
                k += 1
        finally:
            closed.set()

    before = threading.active_count()
    stream = read_ahead(endless(), ahead=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert closed.wait(5), "the source generator was closed (its open files released)"
    assert threading.active_count() == before, "the reading thread ended"


def test_to_uint8_gives_the_numpy_formula_s_bytes():
    """The torch conversion of float frames equals clip(rint(x * 255), 0, 255) in the input's precision:
    ties (round half to even), values outside [0, 1], float64, strided views; other dtypes go through numpy."""
    rng = np.random.default_rng(0)
    frames = (rng.random((3, 16, 24, 3)) * 1.4 - 0.2).astype(np.float32)
    frames[0, 0, :12, 0] = (np.arange(12) + 0.5) / 255  # exact ties after the multiplication (or nearly)
    for array in (frames, frames.astype(np.float64), frames[:, ::2, ::-1], frames[..., 0]):
        expected = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        out = to_uint8(array)
        assert out.dtype == np.uint8 and out.shape == array.shape
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(to_uint8(np.array([[0, 1]], np.int64)), np.array([[0, 255]], np.uint8))


def test_h264_options_carry_the_fixed_threads_and_lookahead(monkeypatch):
    import ex4d.io.video as video

    options, pad = video.h264_options(500, 16)
    assert options["threads"] == str(video.H264_THREADS) and options["crf"] == "16" and pad == 12
    assert "crop-rect=0,0,12,0" in options["x264-params"]
    monkeypatch.setattr(video, "H264_LOOKAHEAD", 7)
    options, _ = video.h264_options(512, 16)
    assert options["x264-params"] == "rc-lookahead=7"
    assert video.h264_options(512, 16, lookahead=3)[0]["x264-params"] == "rc-lookahead=3"  # a writer's own
    monkeypatch.setattr(video, "H264_LOOKAHEAD", None)
    assert "x264-params" not in video.h264_options(512, 16)[0]  # the preset's own look-ahead


def _x264_settings(path) -> str:
    """The settings line libx264 writes into the stream (an SEI message: ``x264 - core ... options: ...``)."""
    data = path.read_bytes()
    start = data.index(b"options: ")
    return data[start:data.index(b"\x00", start)].decode("ascii", "replace")


def test_condition_videos_use_their_own_lookahead_and_the_final_video_the_default(tmp_path, monkeypatch):
    import ex4d.io.video as video
    from ex4d.types import ConditionWriter

    monkeypatch.setattr(video, "H264_LOOKAHEAD", None)
    frames = np.random.default_rng(0).random((12, 32, 48, 3), dtype=np.float32)
    with ConditionWriter(tmp_path, "t", 24.0) as writer:
        for frame in frames:
            writer.write(frame, frame[..., 0] > 0.5)
    for role in ("color", "mask"):
        assert f" rc_lookahead={video.CONDITION_H264_LOOKAHEAD} " in _x264_settings(writer.paths[role]), role
    final = tmp_path / "final.mp4"
    video.write_video(final, (frames * 255).astype(np.uint8), fps=24.0)
    assert " rc_lookahead=40 " in _x264_settings(final)  # preset medium's
    monkeypatch.setattr(video, "CONDITION_H264_LOOKAHEAD", None)  # None: the preset's, for conditions too
    with ConditionWriter(tmp_path / "default", "t", 24.0) as writer:
        for frame in frames:
            writer.write(frame, frame[..., 0] > 0.5)
    assert " rc_lookahead=40 " in _x264_settings(writer.paths["color"])


def test_h264_lookahead_setting_reaches_the_encoder(tmp_path, monkeypatch):
    """A shorter look-ahead holds back fewer frames: the first packet leaves the encoder sooner."""
    import av

    import ex4d.io.video as video

    frames = np.random.default_rng(0).integers(0, 256, (30, 64, 128, 3), dtype=np.uint8)

    def frames_before_first_packet(lookahead):
        monkeypatch.setattr(video, "H264_LOOKAHEAD", lookahead)
        options, _ = video.h264_options(128, 16)
        with av.open(str(tmp_path / f"la{lookahead}.mp4"), mode="w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.pix_fmt, stream.width, stream.height, stream.options = "yuv420p", 128, 64, options
            for k, frame in enumerate(frames):
                if stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    return k
        return len(frames)

    assert frames_before_first_packet(2) < frames_before_first_packet(20)


def test_threaded_decoding_gives_the_single_threaded_frames(tmp_path):
    """read_video, the mask readers and the condition's mask decode use FFmpeg's frame threads; every
    frame equals PyAV's default single-threaded decode (H.264 with B-frames, and FFV1)."""
    import av

    from ex4d.diffusion.conditioning import _read_grey_video
    from ex4d.io.video import read_mask_video, read_video, write_video

    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, size=(1, 128, 128, 3))
    moving = np.stack([np.roll(base[0], 3 * t, axis=1) for t in range(25)])  # motion: P- and B-frames
    colour = write_video(tmp_path / "colour.mp4", moving.astype(np.uint8), fps=25.0)
    mask = write_video(tmp_path / "mask.mkv", ((moving[..., 0] > 127) * 255).astype(np.uint8), fps=25.0,
                       codec="ffv1")

    def plain(path, fmt):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.thread_type != "AUTO"  # the default: what the threaded decode is checked against
            return np.stack([f.to_ndarray(format=fmt) for f in container.decode(stream)])

    frames, _ = read_video(colour)
    np.testing.assert_array_equal(frames, plain(colour, "rgb24"))
    grey = plain(mask, "gray")
    np.testing.assert_array_equal(_read_grey_video(mask, "mask video")[0], grey)
    np.testing.assert_array_equal(read_mask_video(mask), grey > 127)
    assert len(frames) == 25


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("width", [64, 100])  # 100: padded columns, cropped in the stream header
def test_decoded_frame_sink_gets_the_frames_as_the_file_decodes_before_the_last_is_written(tmp_path, background,
                                                                                         width):
    """VideoWriter(decoded_frame_sink=) hands over every frame decoded from the encoder's own packets, in
    order, on the encoding thread, frame 0 while frames are still being written: the same pixels as
    reading the finished file (not the frames given, which H.264 changes)."""
    import threading

    from ex4d.io.video import CONDITION_H264_LOOKAHEAD, VideoWriter

    yy, xx = np.mgrid[:96, :width]
    frames = [np.stack([(xx * 3 + t * 5) % 256, (yy * 2 + t) % 256, ((xx + yy) * t) % 256], -1).astype(np.uint8)
              for t in range(25)]
    got = []

    def sink(frame):
        got.append((frame.copy(), writer.frames_written, threading.current_thread() is threading.main_thread()))

    with VideoWriter(tmp_path / "v.mp4", 15, background=background, lookahead=CONDITION_H264_LOOKAHEAD,
                     decoded_frame_sink=sink) as writer:
        for frame in frames:
            writer.write(frame)
    decoded, _ = read_video(tmp_path / "v.mp4")
    assert len(got) == len(frames)
    np.testing.assert_array_equal(np.stack([g[0] for g in got]), decoded)
    assert not np.array_equal(got[0][0], frames[0])  # lossy: the file's frame, not the frame written
    assert all(on_main is not background for _, _, on_main in got)
    if not background:  # (in the background the caller may run ahead of the encoder)
        assert got[0][1] < len(frames)  # frame 0 before the last frame was written


def test_decoded_frame_sink_is_for_h264_and_its_errors_leave_the_file_alone(tmp_path, caplog):
    from ex4d.io.video import VideoWriter

    with pytest.raises(ValueError, match="H.264"):
        VideoWriter(tmp_path / "m.mkv", 15, codec="ffv1", decoded_frame_sink=print)

    def broken(frame):
        raise RuntimeError("sink failed")

    frames = (np.random.default_rng(1).random((9, 32, 32, 3)) * 255).astype(np.uint8)
    with caplog.at_level("WARNING"):
        with VideoWriter(tmp_path / "v.mp4", 15, decoded_frame_sink=broken) as writer:
            for frame in frames:
                writer.write(frame)
    assert read_video(tmp_path / "v.mp4")[0].shape == frames.shape
    assert any("decoded frames of v.mp4 ahead failed" in r.message for r in caplog.records)


def test_decoded_frame_sink_returning_false_ends_the_hand_over_and_the_condition_keeps_no_masks(tmp_path):
    """A sink that wants no more frames (returns False) gets no more, and ConditionWriter then keeps no
    masks for it (they are held only until their colour frame is decoded)."""
    from ex4d.types import ConditionWriter

    got = []

    def sink(index, colour, mask):
        got.append((index, colour.shape, mask.dtype))
        return index < 2  # three frames, then no more

    rng = np.random.default_rng(2)
    with ConditionWriter(tmp_path, "30", 10, frame_sink=sink) as writer:
        for t in range(30):
            writer.write(rng.random((32, 48, 3)).astype(np.float32), rng.random((32, 48)) > 0.5)
    assert [g[0] for g in got] == [0, 1, 2] and got[0][1:] == ((32, 48, 3), np.dtype(bool))
    assert not writer._masks  # nothing held after the hand-over ended
    assert read_video(writer.paths["color"])[0].shape == (30, 32, 48, 3)
