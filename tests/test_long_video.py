"""Longer videos in overlapping windows: planning, conditioning of later windows, seams, length."""

import os
import sys

import numpy as np
import pytest
import torch

from ex4d.diffusion.long_video import (blend_weights, generate_long, generate_long_video, plan_windows, seam_frames,
                                       window_condition)
from ex4d.errors import InputError


@pytest.mark.parametrize("num_frames, window, overlap, expected", [
    (49, 49, 17, [(0, 49)]),
    (97, 49, 17, [(0, 49), (32, 81), (48, 97)]),
    (145, 49, 17, [(0, 49), (32, 81), (64, 113), (96, 145)]),
    (97, 49, 9, [(0, 49), (40, 89), (48, 97)]),
    (145, 49, 9, [(0, 49), (40, 89), (80, 129), (96, 145)]),
    (13, 9, 5, [(0, 9), (4, 13)]),
    (5, 49, 17, [(0, 5)]),
])
def test_plan_windows(num_frames, window, overlap, expected):
    windows = plan_windows(num_frames, window, overlap)
    assert windows == expected
    assert windows[0][0] == 0 and windows[-1][1] == num_frames  # covers everything
    assert all(end - start == min(window, num_frames) for start, end in windows)  # the trained length
    for (s0, e0), (s1, e1) in zip(windows, windows[1:]):
        assert s0 < s1 < e0 and e1 - e0 > 0  # strictly advancing, always overlapping
        assert e0 - s1 >= overlap  # at least the asked overlap (more only for the last window)


@pytest.mark.parametrize("args, match", [
    ((97, 48, 17), "4k\\+1"),
    ((97, 49, 0), "overlap"),
    ((97, 49, 49), "overlap"),
    ((30, 49, 17), "4k\\+1"),
    ((0, 49, 17), "at least 1"),
])
def test_plan_windows_rejects(args, match):
    with pytest.raises(InputError, match=match):
        plan_windows(*args)


def test_blend_weights_ramp():
    w = blend_weights(4)
    np.testing.assert_allclose(w, [0.0, 0.25, 0.5, 0.75])
    assert blend_weights(17)[0] == 0.0 and np.all(np.diff(blend_weights(17)) > 0)


def test_window_condition_replaces_overlap_with_generated():
    T, H, W = 13, 4, 4
    color = np.full((T, H, W, 3), 0.2, np.float32)
    mask = np.zeros((T, H, W), bool)
    mask[0] = True
    generated = np.full((T, H, W, 3), 0.9, np.float32)
    c, m = window_condition(color, mask, generated, 4, 13, known_end=9)
    assert c.shape == (9, H, W, 3) and m.shape == (9, H, W)
    assert np.all(c[:5] == 0.9) and np.all(m[:5])  # frames 4..8 come from what was generated
    assert np.all(c[5:] == 0.2) and not m[5:].any()  # the rest keeps the rendered condition
    assert np.all(color == 0.2) and mask.sum() == H * W  # inputs untouched


class RecordingGenerator:
    """A fake model: returns the condition colour where the mask is 1 and a per-window constant
    elsewhere, so each output frame tells where it came from. Records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, color, mask, index):
        self.calls.append((color.copy(), mask.copy(), index))
        fill = np.float32(0.1 * (index + 1))
        return np.where(mask[..., None], color, fill).astype(np.float32) + np.float32(0.01 * index)


@pytest.mark.parametrize("num_frames, expected", [
    (29, [(0, 13), (8, 21), (16, 29)]),  # tiles exactly: every seam lies outside earlier overlaps
    (25, [(0, 13), (8, 21), (12, 25)]),  # last window moved back into the previous overlap
])
def test_generate_long_seams_and_length(num_frames, expected):
    T, H, W, window, overlap = num_frames, 6, 8, 13, 5
    rng = np.random.default_rng(0)
    color = rng.random((T, H, W, 3), dtype=np.float32)
    mask = rng.random((T, H, W)) > 0.5
    mask[0] = True
    gen = RecordingGenerator()
    outputs = {}
    out = generate_long(color, mask, gen, window=window, overlap=overlap,
                        on_window=lambda i, span, frames: outputs.__setitem__(i, (span, frames)))
    windows = plan_windows(T, window, overlap)
    assert windows == expected and seam_frames(windows) == [w[0] for w in expected[1:]]
    assert out.shape == color.shape and out.dtype == np.float32  # output length = input length
    assert [c[2] for c in gen.calls] == list(range(len(windows)))
    for i, (start, end) in enumerate(windows[1:], start=1):
        cond_color, cond_mask, _ = gen.calls[i]
        (prev_start, prev_end), prev_frames = outputs[i - 1]
        k = prev_end - start
        # The condition's overlap is the video generated so far, with mask 1; the rest is rendered.
        assert np.all(cond_mask[:k])
        np.testing.assert_array_equal(cond_mask[k:], mask[start + k:end])
        np.testing.assert_array_equal(cond_color[k:], color[start + k:end])
        # Its first frame (the I2V image) is the seam frame of the final video, which later windows
        # never touch; where the seam lies outside earlier overlaps, it is the previous window's own frame.
        np.testing.assert_array_equal(cond_color[0], out[start])
        if start >= windows[i - 1][0] + (windows[i - 2][1] - windows[i - 1][0] if i >= 2 else 0):
            np.testing.assert_array_equal(cond_color[:k], prev_frames[start - prev_start:])
            np.testing.assert_array_equal(out[start], prev_frames[start - prev_start])
        # Inside the overlap the new window's weight rises linearly from 0 at the seam.
        for j in range(k):
            w = j / k
            np.testing.assert_allclose(out[start + j], (1 - w) * cond_color[j] + w * outputs[i][1][j],
                                       rtol=1e-6, atol=1e-6)
    last_start, last_end = windows[-1]
    k_last = windows[-2][1] - last_start
    np.testing.assert_array_equal(out[last_start + k_last:], outputs[len(windows) - 1][1][k_last:])


def test_generate_long_single_window_is_one_call():
    color = np.random.default_rng(1).random((9, 4, 4, 3), dtype=np.float32)
    mask = np.ones((9, 4, 4), bool)
    gen = RecordingGenerator()
    out = generate_long(color, mask, gen, window=49)
    assert len(gen.calls) == 1
    np.testing.assert_array_equal(out, color)


def test_generate_long_rejects_bad_inputs():
    gen = RecordingGenerator()
    with pytest.raises(InputError, match="\\(T,H,W,3\\)"):
        generate_long(np.zeros((9, 4, 4)), np.ones((9, 4, 4), bool), gen)
    with pytest.raises(InputError, match="does not match"):
        generate_long(np.zeros((9, 4, 4, 3)), np.ones((9, 4, 5), bool), gen)
    with pytest.raises(ValueError, match="returned"):
        generate_long(np.zeros((9, 4, 4, 3)), np.ones((9, 4, 4), bool), lambda c, m, i: c[:3], window=9)


# ---------------------------------------------------------------------------------------------
# With the real EX4DPipeline (tiny random components, CPU)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe():
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_wan import make_tiny_components

    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline

    pipe = build_pipeline(make_tiny_components(0), None, PerformanceOptions(dtype=torch.float32), "cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a non-trivial camera encoder (its last layer is zero-initialised)
        for p in pipe.camera_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pipe.set_progress_bar_config(disable=True)
    # Text embeddings once (the tiny umT5 over 512 tokens is the slow part of a call here).
    positive, negative = pipe.encode_prompt("a wide view", "blurred", True, torch.device("cpu"), torch.float32)
    return pipe, dict(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=2,
                      guidance_scale=5.0)


def tiny_condition(num_frames=7, size=16):
    from ex4d.diffusion.conditioning import ConditionInputs, scale_condition

    g = torch.Generator().manual_seed(5)
    color = torch.rand(num_frames, size, size, 3, generator=g)
    mask = torch.rand(num_frames, size, size, generator=g) > 0.4
    mask[0] = True
    cond, mask_scaled = scale_condition(color, mask)
    first = np.floor((cond[0, :, 0].permute(1, 2, 0).numpy() + 1.0) * 0.5 * 255.0).clip(0, 255).astype(np.uint8)
    return ConditionInputs(cond=cond, mask=mask_scaled, first_frame=first, kernel_sizes=[0] * num_frames, fps=10.0)


def test_long_video_with_tiny_pipeline(tiny_pipe):
    """7 frames of 16x16 in windows of 5 overlapping by 3: windows (0, 5) and (2, 7)."""
    tiny_pipe, kwargs = tiny_pipe
    condition = tiny_condition(7)
    calls = []
    original_call = type(tiny_pipe).__call__

    def spy(self, cond, mask, **kw):
        calls.append((cond.clone(), mask.clone(), kw["image"].copy()))
        return original_call(self, cond, mask, **kw)

    type(tiny_pipe).__call__ = spy
    try:
        frames = generate_long_video(tiny_pipe, condition, window=5, overlap=3, seed=7, **kwargs)
    finally:
        type(tiny_pipe).__call__ = original_call
    assert frames.shape == (7, 16, 16, 3) and frames.dtype == np.uint8  # output length = input length
    assert len(calls) == 2

    # Window 0 is one plain pipeline call on the first 5 frames, bit for bit.
    plain = tiny_pipe(condition.cond[:, :, :5], condition.mask[:, :, :5], image=condition.first_frame,
                      generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kwargs).frames[0]
    np.testing.assert_array_equal(frames[:2], plain[:2])  # before the overlap: untouched
    np.testing.assert_array_equal(frames[2], plain[2])  # the seam frame comes from window 0
    assert frames.std() > 1.0

    # Window 1 was conditioned on window 0's output: overlap frames 2..4 visible, colour = generated.
    cond1, mask1, image1 = calls[1]
    assert cond1.shape[2] == 5 and torch.all(mask1[:, :, :3] == 1.0)
    torch.testing.assert_close(mask1[:, :, 3:], condition.mask[:, :, 5:7])
    generated_as_cond = torch.from_numpy(plain[2:5].astype(np.float32) / 255.0).permute(3, 0, 1, 2)[None] * 2 - 1
    torch.testing.assert_close(cond1[:, :, :3], generated_as_cond, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(image1, plain[2])  # its I2V image is window 0's frame at the seam
