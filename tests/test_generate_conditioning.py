"""Geometry conditioning of the generator: scaling, seeded erosion, file loading and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ex4d.diffusion.conditioning import (
    EROSION_RANGE,
    check_num_frames,
    encoder_mask_input,
    erode_masks,
    find_mask_for,
    first_frame_latent_mask,
    load_condition,
    parse_size,
    sample_erosion_sizes,
    scale_condition,
)
from ex4d.errors import InputError
from ex4d.io.video import write_video


# ---------------------------------------------------------------------------------------------
# Scaling (spec 7.2, 7.4, 10.16)


def test_scaling_matches_reference_values():
    colour = torch.tensor([0.0, 0.25, 0.6, 1.0]).view(1, 1, 4, 1).expand(1, 1, 4, 3)  # (T,H,W,3)
    mask = torch.tensor([True, False, True, True]).view(1, 1, 4)
    cond, mask_scaled = scale_condition(colour, mask)
    assert cond.shape == (1, 3, 1, 1, 4) and mask_scaled.shape == (1, 3, 1, 1, 4)
    # visible: 2c - 1; hidden: -1 whatever the colour
    assert torch.allclose(cond[0, 0, 0, 0], torch.tensor([-1.0, -1.0, 0.2, 1.0]))
    assert torch.equal(mask_scaled[0, :, 0, 0], torch.tensor([1.0, -1.0, 1.0, 1.0]).expand(3, 4))
    # the encoder's second 2x-1: the VAE sees {-3, +1}
    assert torch.equal(encoder_mask_input(mask_scaled)[0, 0, 0, 0], torch.tensor([1.0, -3.0, 1.0, 1.0]))


def test_first_frame_latent_mask_layout():
    known = first_frame_latent_mask(9, 2, 3)
    assert known.shape == (1, 4, 3, 2, 3)
    assert torch.all(known[:, :, 0] == 1) and torch.all(known[:, :, 1:] == 0)


# ---------------------------------------------------------------------------------------------
# Erosion (spec 7.2: k x k ones, k in [2, 8], cv2 border convention; seeded here)


def test_erosion_sizes_seeded_and_in_range():
    a = sample_erosion_sizes(49, seed=3)
    assert a == sample_erosion_sizes(49, seed=3)
    assert a != sample_erosion_sizes(49, seed=4)
    many = sample_erosion_sizes(2000, seed=0)
    assert min(many) == EROSION_RANGE[0] and max(many) == EROSION_RANGE[1]


def test_erosion_hand_cases_follow_cv2_anchor():
    masks = torch.ones(3, 9, 9, dtype=torch.bool)
    masks[1:, 4, 4] = False  # one hidden pixel
    out = erode_masks(masks, [5, 3, 2])
    assert out[0].all(), "an all-visible frame stays unchanged (outside counts as visible)"
    expected3 = torch.ones(9, 9, dtype=torch.bool)
    expected3[3:6, 3:6] = False
    assert torch.equal(out[1], expected3)
    # even kernel: anchor k // 2 = 1, so the hidden pixel grows down/right by one
    expected2 = torch.ones(9, 9, dtype=torch.bool)
    expected2[4:6, 4:6] = False
    assert torch.equal(out[2], expected2)


def test_erosion_shrinks_a_square_by_half_the_kernel():
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 5:15, 5:15] = True
    out = erode_masks(mask, [5])[0]
    assert out.sum() == 6 * 6 and out[7:13, 7:13].all()


def test_scale_condition_is_the_reference_formula_bit_for_bit():
    from ex4d.diffusion.conditioning import scale_condition

    rng = np.random.default_rng(5)
    color = torch.from_numpy(rng.random((5, 6, 7, 3), dtype=np.float32))
    mask = torch.from_numpy(rng.random((5, 6, 7)) > 0.4)
    cond, mask_scaled = scale_condition(color, mask)
    m = mask.float()[..., None]
    expected_cond = ((color * m) * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0)
    expected_mask = (m.expand(5, 6, 7, 3) * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0)
    assert cond.shape == mask_scaled.shape == (1, 3, 5, 6, 7)
    assert cond.is_contiguous() and mask_scaled.is_contiguous() and cond.dtype == mask_scaled.dtype == torch.float32
    assert torch.equal(cond, expected_cond) and torch.equal(mask_scaled, expected_mask)


def test_erosion_equals_the_direct_k_by_k_minimum_for_every_size():
    """The grouped, separable erosion gives what a plain k x k minimum with cv2's anchor and border gives."""
    rng = np.random.default_rng(3)
    masks = torch.from_numpy(rng.random((12, 23, 31)) > 0.2)
    sizes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 3, 8, 2]
    out = erode_masks(masks, sizes)
    for t, k in enumerate(sizes):
        frame = masks[t].numpy()
        if k <= 1:
            assert np.array_equal(out[t].numpy(), frame)
            continue
        before, after = k // 2, k - 1 - k // 2
        padded = np.pad(frame, ((before, after), (before, after)), constant_values=True)  # outside is visible
        expected = np.ones_like(frame)
        for dy in range(k):
            for dx in range(k):
                expected &= padded[dy:dy + frame.shape[0], dx:dx + frame.shape[1]]
        assert np.array_equal(out[t].numpy(), expected), f"frame {t}, k={k}"


# ---------------------------------------------------------------------------------------------
# Files


def _write_pair(folder, frames=5, size=(32, 32), mask_frames=None, mask_size=None, mask_values=None, cam="90"):
    rng = np.random.default_rng(0)
    h, w = size
    colour = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    mh, mw = mask_size or size
    mask = np.full((mask_frames or frames, mh, mw), 255, np.uint8)
    mask[1:, :, : mw // 2] = 0  # novel views: left half hidden
    if mask_values is not None:
        mask[1:, :, : mw // 2] = mask_values
    colour_path = write_video(folder / f"color_{cam}.mp4", colour, fps=30.0)
    mask_path = write_video(folder / f"mask_{cam}.mkv", mask, fps=30.0, codec="ffv1")
    return colour_path, mask_path


def test_load_condition_shapes_values_and_seed(tmp_path):
    colour_path, mask_path = _write_pair(tmp_path)
    a = load_condition(colour_path, mask_path, size=(16, 16), seed=1)
    assert a.cond.shape == (1, 3, 5, 16, 16) and a.mask.shape == (1, 3, 5, 16, 16)
    assert a.cond.min() >= -1 and a.cond.max() <= 1
    assert set(a.mask.unique().tolist()) == {-1.0, 1.0}
    assert torch.all(a.mask[:, :, 0] == 1), "frame 0 (the source) stays fully visible"
    assert torch.all(a.cond[a.mask < 0] == -1), "hidden pixels are black (-1)"
    assert all(EROSION_RANGE[0] <= k <= EROSION_RANGE[1] for k in a.kernel_sizes)
    assert a.first_frame.shape == (16, 16, 3) and a.first_frame.dtype == np.uint8
    b = load_condition(colour_path, mask_path, size=(16, 16), seed=1)
    assert torch.equal(a.mask, b.mask) and a.kernel_sizes == b.kernel_sizes
    c = load_condition(colour_path, mask_path, size=(16, 16), seed=2, erode=False)
    assert (c.mask > 0).sum() > (a.mask > 0).sum(), "erosion shrinks the visible area"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("size", [(32, 32), (16, 16)])
def test_load_condition_equals_the_formula_on_the_decoded_files_bit_for_bit(tmp_path, size, device):
    """At the file's own size (no resize, no frame pick) and resized: the same bits as the formula
    applied step by step to the decoded videos (numpy's uint8 -> [0, 1], bilinear resize, erosion),
    also with the erosion and scaling on a GPU."""
    from ex4d.diffusion.conditioning import first_frame_uint8
    from ex4d.io.video import read_mask_video, read_video, resize_frames, to_float01

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    colour_path, mask_path = _write_pair(tmp_path)
    got = load_condition(colour_path, mask_path, size=size, seed=4, device=device)
    assert got.cond.device.type == device and got.mask.device.type == device
    got = got.to("cpu")
    colour, _ = read_video(colour_path)
    visible = read_mask_video(mask_path) > 0
    if size != colour.shape[1:3]:
        colour = resize_frames(colour, size)
        visible = resize_frames(visible[..., None].astype(np.float32), size)[..., 0] > 0.5
    mask = erode_masks(torch.from_numpy(visible), sample_erosion_sizes(len(colour), 4))
    cond, mask_scaled = scale_condition(torch.from_numpy(to_float01(colour)), mask)
    assert torch.equal(got.cond, cond) and torch.equal(got.mask, mask_scaled)
    assert np.array_equal(got.first_frame, first_frame_uint8(cond).permute(1, 2, 0).numpy().astype(np.uint8))


@pytest.mark.gpu
def test_load_condition_on_a_gpu_gives_the_cpu_bits_for_every_level(tmp_path):
    """Every uint8 level (0..255) and the eroded masks of a 49-frame clip: the GPU's division by 255
    and scaling give the CPU's bits (a divisor given as a Python number would be multiplied by its
    reciprocal on CUDA, which can be one bit off)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    frames, side = 49, 64
    colour = np.arange(frames * side * side * 3, dtype=np.int64).reshape(frames, side, side, 3) % 256
    colour_path = write_video(tmp_path / "color_90.mkv", colour.astype(np.uint8), fps=30.0, codec="ffv1")
    visible = np.ones((frames, side, side), np.uint8) * 255
    visible[1:, :, side // 2:] = 0
    mask_path = write_video(tmp_path / "mask_90.mkv", visible, fps=30.0, codec="ffv1")
    on_cpu = load_condition(colour_path, mask_path, size=(side, side), seed=3)
    on_gpu = load_condition(colour_path, mask_path, size=(side, side), seed=3, device="cuda").to("cpu")
    assert torch.equal(on_gpu.cond, on_cpu.cond) and torch.equal(on_gpu.mask, on_cpu.mask)
    assert np.array_equal(on_gpu.first_frame, on_cpu.first_frame)
    assert len(torch.unique(on_cpu.cond)) > 200  # the levels did reach the division


def test_mask_found_beside_colour_and_mkv_preferred(tmp_path):
    colour_path, mask_path = _write_pair(tmp_path)
    assert find_mask_for(colour_path) == mask_path
    assert find_mask_for(colour_path, tmp_path / "mask_90.mp4") == mask_path  # the lossless twin wins


@pytest.mark.parametrize("kind, pattern", [
    ("frames", "frames but mask"),
    ("size", "but mask"),
    ("nonbinary", "not binary"),
    ("empty", "empty"),
    ("unreadable", "cannot read"),
    ("not4k1", "4k\\+1"),
])
def test_bad_inputs_raise_clear_input_errors(tmp_path, kind, pattern):
    if kind == "frames":
        colour_path, mask_path = _write_pair(tmp_path, mask_frames=9)
    elif kind == "size":
        colour_path, mask_path = _write_pair(tmp_path, mask_size=(32, 48))
    elif kind == "nonbinary":
        colour_path, mask_path = _write_pair(tmp_path, mask_values=128)
    elif kind == "empty":
        colour_path, _ = _write_pair(tmp_path)
        mask_path = write_video(tmp_path / "empty.mkv", np.zeros((5, 32, 32), np.uint8), fps=30.0, codec="ffv1")
    elif kind == "unreadable":
        colour_path, _ = _write_pair(tmp_path)
        mask_path = tmp_path / "broken.mkv"
        mask_path.write_bytes(b"this is not a video")
    else:
        colour_path, mask_path = _write_pair(tmp_path, frames=6)
    with pytest.raises(InputError, match=pattern):
        load_condition(colour_path, mask_path, size=(16, 16))


def test_num_frames_rule_and_size_rule():
    check_num_frames(49)
    with pytest.raises(InputError, match="--num-frames 45"):
        check_num_frames(48)
    assert parse_size("512x512", (576, 1024)) == (512, 512)
    h, w = parse_size("keep-aspect", (576, 1024))
    assert h % 16 == 0 and w % 16 == 0 and w > h
    with pytest.raises(InputError, match="multiple of 16"):
        parse_size("500x512", (512, 512))
    with pytest.raises(InputError, match="bad --size"):
        parse_size("big", (512, 512))


@pytest.mark.parametrize("size", [(32, 32), (16, 32)])
def test_first_frame_ahead_is_load_condition_s_frame_0_from_one_decoded_frame(tmp_path, size):
    """From the colour file alone: the same (H, W, 3) uint8 frame 0 as load_condition (whose mask frame
    0 is fully visible), at the file's size and resized, and the header's frame count; None for a file
    it cannot read or whose header has no count (then nothing is computed ahead)."""
    from ex4d.diffusion.conditioning import first_frame_ahead

    colour_path, mask_path = _write_pair(tmp_path)
    image, count = first_frame_ahead(colour_path, size)
    want = load_condition(colour_path, mask_path, size=size, seed=2)
    assert count == want.num_frames == 5
    assert image.dtype == np.uint8 and np.array_equal(image, want.first_frame)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert first_frame_ahead(broken, size) is None
    frames = (np.random.default_rng(1).random((5, 32, 32, 3)) * 255).astype(np.uint8)
    no_count = write_video(tmp_path / "colour.mkv", frames, fps=30.0, codec="ffv1")
    import av
    with av.open(str(no_count)) as container:
        header_count = container.streams.video[0].frames
    assert (first_frame_ahead(no_count, size) is None) == (header_count == 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("size", ["48x64", "32x32"])  # the recon size, and a resize
@pytest.mark.parametrize("erode", [True, False])
def test_condition_frame_by_frame_equals_load_condition(tmp_path, size, erode, device):
    """condition_frame on each decoded colour frame and exact mask frame, put side by side, is
    load_condition's cond and mask, bit for bit (resize, division, per-frame erosion, scaling)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ex4d.diffusion.conditioning import condition_frame, load_condition, sample_erosion_sizes
    from ex4d.io.video import read_mask_video, read_video

    rng = np.random.default_rng(4)
    colour = (rng.random((9, 48, 64, 3)) * 255).astype(np.uint8)
    visible = np.ones((9, 48, 64), bool)
    for t in range(1, 9):
        visible[t, 10:20 + t, 5 + 3 * t:30 + 3 * t] = False
    write_video(tmp_path / "color_30.mp4", colour, fps=10)
    write_video(tmp_path / "mask_30.mkv", visible.astype(np.uint8) * 255, fps=10, codec="ffv1")
    want = load_condition(tmp_path / "color_30.mp4", size=size, seed=7, erode=erode, device=device)
    decoded, _ = read_video(tmp_path / "color_30.mp4")
    masks = read_mask_video(tmp_path / "mask_30.mkv")
    sizes = sample_erosion_sizes(9, 7) if erode else [0] * 9
    frames = [condition_frame(decoded[t], np.asarray(masks[t]), sizes[t], size, device) for t in range(9)]
    assert torch.equal(torch.cat([f[0] for f in frames], dim=2), want.cond)
    assert torch.equal(torch.cat([f[1] for f in frames], dim=2), want.mask)
    assert want.kernel_sizes == sizes
