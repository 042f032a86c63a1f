"""Estimators work window by window: lazy clips in, depth frames out, same numbers.

Tiny random models on the CPU. The oracle for DepthCrafter is the whole-clip pipeline
(``DepthCrafterPipeline.__call__``, which the sampler tests pin to the reference), and for Depth
Anything the whole-array functions ``predict`` + ``align_video`` + the reference normalisation.
Memory is checked without timing: numpy's allocations (traced by tracemalloc) must not grow with the
frame count, and a streaming estimator must produce its first frames before it has read the clip.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from ex4d.depth.normalize import (RunningMinMax, disparity_stream_to_depth, minmax_normalize,
                                  normalized_disparity_to_depth)
from ex4d.errors import InputError
from ex4d.io.arrays import NpyFrameWriter, TemporaryFrames
from ex4d.types import Clip

from test_depthcrafter import save_tiny_weights  # noqa: E402

DA_REPO = "depth-anything/Depth-Anything-V2-Small-hf"

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingClip(Clip):
    """A lazy clip of seeded random frames that records how many frames were read, and refuses
    ``clip.frames`` (what a streaming consumer must never ask for)."""

    def __init__(self, T: int, H: int = 16, W: int = 16, seed: int = 0):
        self.pulled = 0
        self._all = np.random.default_rng(seed).random((T, H, W, 3), dtype=np.float32)

        def reader():
            for k in range(T):
                self.pulled = k + 1
                yield self._all[k].copy()

        super().__init__(fps=10.0, source="synthetic", reader=reader, num_frames=T, size=(H, W))

    @property
    def frames(self):
        raise AssertionError("the whole clip was loaded")

    @property
    def array(self) -> np.ndarray:
        return self._all


def no_spills(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".depth_raw")]


# ---- building blocks -------------------------------------------------------------------------
def test_running_minmax_equals_whole_clip_min_max():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(7, 5, 6)).astype(np.float32)
    stats = RunningMinMax()
    for frame in d:
        stats.update(frame)
    assert stats.checked("x") == (float(d.min()), float(d.max()))
    flat = RunningMinMax()
    flat.update(np.ones((2, 3), np.float32))
    with pytest.raises(InputError, match="constant"):
        flat.checked("x")
    d[3, 1, 1] = np.nan  # like d.min() on the whole clip: NaN anywhere is an error, not ignored
    nan = RunningMinMax()
    for frame in d:
        nan.update(frame)
    with pytest.raises(InputError, match="constant"):
        nan.checked("x")


@pytest.mark.parametrize("in_memory", [True, False])
def test_disparity_stream_to_depth_equals_the_whole_clip_conversion(tmp_path, in_memory):
    d = np.random.default_rng(1).normal(size=(9, 6, 5)).astype(np.float32) * 3 + 1
    expected = normalized_disparity_to_depth(minmax_normalize(d))
    chunks = (d[i:i + 4] for i in range(0, 9, 4))
    got = disparity_stream_to_depth(chunks, 9, (6, 5), where="test", spill_dir=tmp_path, in_memory=in_memory)
    np.testing.assert_array_equal(np.asarray(got), expected)
    if not in_memory:
        assert len(no_spills(tmp_path)) == 1 and ".partial-" in no_spills(tmp_path)[0]
        got.release()
    assert no_spills(tmp_path) == []


def test_disparity_stream_errors_leave_no_spill(tmp_path):
    with pytest.raises(InputError, match="constant"):
        disparity_stream_to_depth(iter([np.zeros((3, 4, 4), np.float32)]), 3, (4, 4), where="flat",
                                  spill_dir=tmp_path)
    with pytest.raises(InputError, match="got 2 frames, expected 3"):
        disparity_stream_to_depth(iter([np.zeros((2, 4, 4), np.float32)]), 3, (4, 4), where="short",
                                  spill_dir=tmp_path)
    with pytest.raises(InputError, match="chunk of shape"):
        disparity_stream_to_depth(iter([np.zeros((2, 4, 5), np.float32)]), 3, (4, 4), where="bad",
                                  spill_dir=tmp_path)
    assert no_spills(tmp_path) == []


def test_a_killed_runs_spill_is_swept_by_the_next_one(tmp_path):
    """A spill left by a dead process (SIGKILL) goes at the next spill into the folder; a live one stays."""
    import subprocess
    import sys

    from ex4d.io.files import _owner_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = _owner_tag().rsplit("-", 1)[0]
    stale = tmp_path / f".depth_raw.partial-{host}-{int(dead.stdout)}-0123abcd.npy"
    live = tmp_path / f".depth_raw.partial-{_owner_tag()}-4567cdef.npy"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    d = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    got = disparity_stream_to_depth(iter([d]), 2, (2, 2), where="test", spill_dir=tmp_path)
    assert not stale.exists() and live.exists()
    got.release()


def test_npy_frame_writer_and_temporary_frames(tmp_path):
    path = tmp_path / "x.npy"
    data = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    with NpyFrameWriter(path, data.shape, np.float32) as writer:
        writer.write(data[:1])
        writer.write(data[1:])
    np.testing.assert_array_equal(np.load(path), data)
    with pytest.raises(ValueError, match="2 of 4 frames"):
        with NpyFrameWriter(tmp_path / "y.npy", data.shape, np.float32) as writer:
            writer.write(data[:2])
    frames = TemporaryFrames(path)
    np.testing.assert_array_equal(frames[2], data[2])
    frames.release()
    assert not path.exists()
    path2 = tmp_path / "z.npy"
    np.save(path2, data)
    frames = TemporaryFrames(path2)
    del frames  # garbage collected: the temporary goes too
    assert not path2.exists()


# ---- DepthCrafter ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crafter(tmp_path_factory):
    from ex4d.depth.depthcrafter import DepthCrafter

    root = save_tiny_weights(tmp_path_factory.mktemp("dc_models"))
    return DepthCrafter.from_pretrained(models_dir=root, device="cpu", allow_download=False)


def small_windows(crafter, monkeypatch, window=6, overlap=2, **others):
    settings = crafter.pipeline.settings
    monkeypatch.setattr(settings, "window_size", window)
    monkeypatch.setattr(settings, "overlap", overlap)
    for key, value in others.items():
        monkeypatch.setattr(settings, key, value)


@pytest.mark.parametrize("T, window, overlap, others", [
    (13, 6, 2, {}),  # 3 windows, the last one short
    (23, 8, 3, {"decode_batch": 2, "encode_chunk_size": 3}),  # decode calls and encode chunks across windows
    (7, 110, 25, {}),  # one window (EX-4D's case)
])
def test_depthcrafter_streaming_is_bit_identical_to_the_whole_clip(crafter, monkeypatch, tmp_path, T, window,
                                                                   overlap, others):
    small_windows(crafter, monkeypatch, window, overlap, **others)
    clip = CountingClip(T)
    expected = normalized_disparity_to_depth(minmax_normalize(crafter.pipeline(clip.array)))
    streamed = crafter.estimate(clip, spill_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(streamed.depth), expected)
    assert streamed.valid.shape == (T, 16, 16) and np.asarray(streamed.valid).all()
    np.testing.assert_array_equal(crafter.estimate(clip.array).depth, expected)  # the ndarray form too
    streamed.depth.release()
    assert no_spills(tmp_path) == []


def test_depthcrafter_reads_window_by_window_and_emits_early(crafter, monkeypatch):
    """Window k = [a, b) runs after at most b frames (rounded up to an encode chunk) were read, and the
    first disparity comes out long before the last frame is read."""
    from ex4d.depth.depthcrafter import window_plan

    small_windows(crafter, monkeypatch, 6, 2, encode_chunk_size=2)
    pipe = crafter.pipeline
    T = 21
    clip = CountingClip(T)
    windows, _ = window_plan(T, 6, 2)
    seen = []  # frames read at each window's first UNet call
    real_call = pipe._unet_call

    def spy(sample, t, ehs, ids):
        seen.append(clip.pulled)
        return real_call(sample, t, ehs, ids)

    monkeypatch.setattr(pipe, "_unet_call", spy)
    stream = pipe.stream(clip.iter_frames(), T, (16, 16))
    first = next(stream)
    # frames 0-7 (one decode chunk) are final once windows [0, 6) and [4, 10) are blended
    assert clip.pulled == 10 and len(first) == 8
    rest = list(stream)
    assert sum(len(c) for c in [first, *rest]) == T
    steps = crafter.pipeline.settings.num_inference_steps
    starts = seen[::steps]
    assert len(starts) == len(windows)
    for (a, b), pulled in zip(windows, starts):
        assert b <= pulled <= min(T, b + 1), (a, b, pulled)  # b rounded up to a chunk of 2


def test_depthcrafter_stream_refuses_a_short_clip(crafter, monkeypatch):
    small_windows(crafter, monkeypatch, 6, 2)
    frames = np.random.default_rng(0).random((5, 16, 16, 3), dtype=np.float32)
    with pytest.raises(InputError, match="ended after 5 of 9 frames"):
        list(crafter.pipeline.stream(iter(frames), 9, (16, 16)))
    with pytest.raises(InputError, match="divisible by 4"):
        list(crafter.pipeline.stream(iter(frames), 5, (16, 18)))


# ---- Depth Anything ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anything(tmp_path_factory):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from ex4d.depth.depth_anything import DepthAnythingV2

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=518,
                            patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    root = tmp_path_factory.mktemp("da_models")
    DepthAnythingForDepthEstimation(config).save_pretrained(root / DA_REPO)
    return DepthAnythingV2.from_pretrained(models_dir=root, device="cpu", allow_download=False)


@pytest.fixture
def small_input(monkeypatch):
    """A 56x56 network input instead of 518x518: the same code, much faster on a CPU."""
    import ex4d.depth.depth_anything as da

    monkeypatch.setattr(da, "input_size", lambda height, width: (56, 56))


@pytest.mark.parametrize("align", [True, False])
def test_depth_anything_streaming_is_bit_identical(anything, small_input, monkeypatch, tmp_path, align):
    from ex4d.depth.depth_anything import align_video

    monkeypatch.setattr(anything, "align", align)
    T = 19  # batches of 8, 8 and 3
    clip = CountingClip(T, 28, 42, seed=3)
    disparity = anything.predict(clip.array)
    if align:
        disparity, params = align_video(disparity)
    expected = normalized_disparity_to_depth(minmax_normalize(disparity))
    streamed = anything.estimate(clip, spill_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(streamed.depth), expected)
    if align:
        assert streamed.settings["scale_shift"] == [list(p) for p in params]
    in_memory = anything.estimate(clip.array)
    assert isinstance(in_memory.depth, np.ndarray)
    np.testing.assert_array_equal(in_memory.depth, expected)
    streamed.depth.release()
    assert no_spills(tmp_path) == []


def test_depth_anything_reads_frame_by_frame(anything, small_input):
    clip = CountingClip(30, 28, 28)
    chunks = anything._disparity_chunks(clip.iter_frames(), 30, None)
    first = next(chunks)
    assert len(first) == anything.batch_size and clip.pulled == anything.batch_size
    assert sum(len(c) for c in chunks) == 30 - anything.batch_size


def test_depth_anything_bad_frame_in_a_stream(anything, small_input):
    clip = CountingClip(3, 28, 28)
    clip._all[2] *= 255
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        anything.estimate(clip)


# ---- estimate_depth: the lazy clip goes in, depth.npz comes out, memory stays flat --------------
def test_estimate_depth_streams_the_clip_into_depth_npz(anything, small_input, tmp_path):
    from ex4d.pipeline import estimate_depth
    from ex4d.types import DepthVideo

    clip = CountingClip(11, 28, 28)  # .frames raises: estimate_depth must pass the clip itself
    depth = estimate_depth(clip, "depth-anything", out_dir=tmp_path, estimator=anything)
    expected = anything.estimate(clip.array)
    np.testing.assert_array_equal(np.asarray(depth.depth), expected.depth)
    np.testing.assert_array_equal(np.load(tmp_path / "depth.npz")["depth"], expected.depth)
    assert DepthVideo.load(tmp_path / "depth.npz").settings["scale_shift"] == expected.settings["scale_shift"]
    assert no_spills(tmp_path) == []  # the raw spill was deleted once depth.npz was written


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_depth_anything_memory_does_not_grow_with_frames(anything, small_input, tmp_path):
    """Peak numpy memory (tracemalloc) of estimate_depth over 60 frames vs 15 at 64x64. Holding the clip
    as float32 RGB, as before, costs 45 x 48 KiB = 2.2 MB more at 60 frames, and any single whole-clip
    float32 depth array 0.7 MB more (6.6 MB more in all with the former whole-clip code, measured);
    streaming must stay within 0.5 MB of the 15-frame peak (measured: 0.11 MB)."""
    from ex4d.pipeline import estimate_depth

    def run(T, name):
        clip = CountingClip(T, 64, 64)  # its frames are made before tracing starts
        return _traced_peak(lambda: estimate_depth(clip, "depth-anything", out_dir=tmp_path / name, estimator=anything))

    run(15, "warm-up")
    short, long = run(15, "short"), run(60, "long")
    assert long - short < 0.5e6, (short, long)


def test_depthcrafter_memory_does_not_grow_with_frames(crafter, monkeypatch, tmp_path):
    """The same for DepthCrafter with windows of 8 (8 windows at 40 frames) at 32x32: the clip as float32
    RGB would cost 30 x 12 KiB = 0.37 MB more at 40 frames than at 10, the whole-clip float32 disparity
    0.12 MB, plus the temporaries of its normalisation (1.0 MB more in all with the former whole-clip
    code, measured); streaming must stay within 0.2 MB of the 10-frame peak (measured: 0.06 MB)."""
    from ex4d.pipeline import estimate_depth

    small_windows(crafter, monkeypatch, 8, 3)

    def run(T, name):
        clip = CountingClip(T, 32, 32)
        return _traced_peak(lambda: estimate_depth(clip, "depthcrafter", out_dir=tmp_path / name,
                                                   estimator=crafter))

    run(10, "warm-up")
    short, long = run(10, "short"), run(40, "long")
    assert long - short < 0.2e6, (short, long)
