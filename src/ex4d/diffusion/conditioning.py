"""Geometry conditioning for the EX-4D generator: load, erode, scale (shared by inference and training).

Everything here is pure tensor/numpy code with no model in sight, so that the trainer can build
exactly the input distribution the released adapter was trained on (spec 7.2, 7.4, 10.16-17, 11.5):

* the rendered colour video and its visibility mask are resized to the working size (512x512 by
  default, squashed like the reference), each mask frame is eroded with a random k x k all-ones
  kernel (k in [2, 8], cv2's border convention, seeded here instead of unseeded) and binarised;
* ``cond = 2 * (colour * mask) - 1`` and ``mask' = 2 * mask - 1`` (in {-1, +1});
* the camera encoder maps the mask once more through ``2 * mask' - 1``, so the VAE sees {-3, +1}:
  that double scaling is part of the trained model's input and must be kept.

Tensors leaving this module are channel-first video tensors ``(B, C, T, H, W)``; the letters follow
the project's glossary (T frames, H, W, B batch).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ex4d.errors import InputError
from ex4d.io.files import require_file

logger = logging.getLogger(__name__)

#: The working size of the released model (it was trained on square 512x512 clips).
DEFAULT_SIZE = (512, 512)
#: Frame count of the released model (13 latent frames).
DEFAULT_NUM_FRAMES = 49
#: Inclusive range of the erosion kernel size (reference: random.randint(2, 8)).
EROSION_RANGE = (2, 8)
#: Spatial multiple the generator needs: VAE factor 8 x DiT patch 2.
SIZE_MULTIPLE = 16
#: Largest side of the working size that is accepted (a 2048x2048 window already needs ~16x the
#: memory of 512x512; 8192x8192 would need terabytes).
MAX_SIDE = 2048
#: Temporal rule of the Wan VAE: 1 frame, then chunks of 4.
TEMPORAL_FACTOR = 4

# A lossy (H.264) mask has intermediate values only along edges; a soft or wrong video has many.
_MID_LOW, _MID_HIGH, _MAX_MID_FRACTION = 32, 223, 0.05


@dataclass
class ConditionInputs:
    """What the generator needs from a rendered condition, already scaled.

    cond:   (1, 3, T, H, W) float32 in [-1, 1]; masked pixels are -1.
    mask:   (1, 3, T, H, W) float32 in {-1, +1} (mask'; the encoder applies its own 2x-1 on top).
    first_frame: (H, W, 3) uint8, the source frame 0 as the reference hands it to CLIP and the VAE.
    kernel_sizes: the erosion size drawn per frame (0 where erosion was off).
    fps: frame rate of the colour file.
    """

    cond: torch.Tensor
    mask: torch.Tensor
    first_frame: np.ndarray
    kernel_sizes: list[int]
    fps: float

    @property
    def num_frames(self) -> int:
        return int(self.cond.shape[2])

    def to(self, device) -> "ConditionInputs":
        """The same inputs with ``cond`` and ``mask`` on ``device``."""
        return replace(self, cond=self.cond.to(device), mask=self.mask.to(device))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.cond.shape[3]), int(self.cond.shape[4])


# ---------------------------------------------------------------------------------------------
# Pure helpers (shared with training)


def check_num_frames(num_frames: int, where: str = "the condition") -> None:
    """Raise :class:`InputError` unless ``num_frames`` is 4k+1 (what the Wan VAE accepts)."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR:
        lower = max(1, (num_frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1)
        raise InputError(
            f"{where} has {num_frames} frames, but the generator needs 4k+1 frames (e.g. 49); "
            f"pass --num-frames {lower} or trim the videos to {lower} frames")


def sample_erosion_sizes(num_frames: int, seed: int | None,
                         low: int = EROSION_RANGE[0], high: int = EROSION_RANGE[1]) -> list[int]:
    """One kernel size per frame, uniform in [low, high] inclusive, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [int(k) for k in rng.integers(low, high + 1, size=num_frames)]


def erode_masks(masks: torch.Tensor, kernel_sizes: list[int]) -> torch.Tensor:
    """Erode each binary mask frame with its own k x k all-ones kernel, cv2-style.

    masks: (T, H, W) bool. kernel_sizes: T ints (k <= 1 leaves the frame unchanged).
    cv2.erode's defaults are reproduced: the anchor is the kernel centre (k // 2, so an even kernel
    reaches one pixel further up/left) and pixels outside the image count as *visible*, which is
    why an all-visible frame 0 is unchanged. Returns (T, H, W) bool.
    """
    if masks.ndim != 3 or len(kernel_sizes) != masks.shape[0]:
        raise ValueError(f"erode_masks wants (T,H,W) masks and T sizes, got {tuple(masks.shape)} and "
                         f"{len(kernel_sizes)}")
    hidden = (~masks.bool()).float()  # erosion of the visible set = dilation of the hidden set
    out = masks.bool().clone()  # k <= 1 leaves a frame unchanged
    # Frames that share a kernel size go through together (the sizes take 7 values, so 7 calls, not T),
    # and the k x k maximum is taken as a 1 x k row maximum then a k x 1 column maximum: the same
    # values (the maximum over a rectangle), at 2k instead of k*k comparisons per pixel.
    for k in sorted({int(k) for k in kernel_sizes if k > 1}):
        frames = torch.tensor([t for t, size in enumerate(kernel_sizes) if size == k], device=masks.device)
        before = k // 2
        after = k - 1 - before
        # dst(y, x) = min over dy, dx in [-before, after] of src(y + dy, x + dx); zero padding in the
        # hidden domain = "outside is visible" (cv2's morphologyDefaultBorderValue for erosion).
        padded = F.pad(hidden[frames][:, None], (before, after, before, after), value=0.0)
        rows = F.max_pool2d(padded, kernel_size=(1, k), stride=1)
        dilated = F.max_pool2d(rows, kernel_size=(k, 1), stride=1)[:, 0]
        out[frames] = dilated < 0.5
    return out


def scale_condition(color: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's scaling: cond = 2 * (c * m) - 1, mask' = 2 * m - 1.

    color: (T, H, W, 3) float in [0, 1]. mask: (T, H, W) bool (already eroded and binarised).
    Returns cond (1, 3, T, H, W) in [-1, 1] and mask' (1, 3, T, H, W) in {-1, +1}, float32.
    """
    num_frames, height, width = mask.shape
    m = mask.float()
    # Written straight into the (1, 3, T, H, W) layout and scaled in place: the same operations in the
    # same order as (c * m) * 2 - 1, without four full-size temporaries (0.15 GB each at 49x512x512).
    cond = torch.empty((1, 3, num_frames, height, width), dtype=torch.float32, device=color.device)
    torch.mul(color.float().permute(3, 0, 1, 2), m, out=cond[0])
    cond.mul_(2.0).sub_(1.0)
    mask_scaled = (m * 2.0 - 1.0).expand(1, 3, num_frames, height, width).contiguous()
    return cond, mask_scaled


def encoder_mask_input(mask_scaled: torch.Tensor) -> torch.Tensor:
    """The camera encoder's second 2x-1 on the already-scaled mask: {-1, +1} -> {-3, +1} (R, spec 10.16)."""
    return mask_scaled * 2.0 - 1.0


def first_frame_latent_mask(num_frames: int, latent_height: int, latent_width: int,
                            temporal_factor: int = TEMPORAL_FACTOR) -> torch.Tensor:
    """The 4-channel "frame known" map of Wan I2V: (1, 4, T', h, w), 1 on latent frame 0 only.

    Pixel frame 0 is repeated 4x so that T + 3 frames fold into (T' = (T-1)/4 + 1) x 4 channels.
    """
    known = torch.zeros(1, 1, num_frames, latent_height, latent_width)
    known[:, :, 0] = 1.0
    known = torch.cat([known[:, :, :1].repeat_interleave(temporal_factor, dim=2), known[:, :, 1:]], dim=2)
    known = known.view(1, -1, temporal_factor, latent_height, latent_width)
    return known.transpose(1, 2).contiguous()


def parse_size(spec: str | tuple[int, int] | None, source_hw: tuple[int, int],
               max_side: int = MAX_SIDE) -> tuple[int, int]:
    """Working size (H, W) from ``"HxW"`` (e.g. ``"512x512"``), ``"keep-aspect"`` or an (H, W) tuple.

    ``keep-aspect`` keeps about 512*512 pixels at the source's aspect ratio, each side a multiple
    of 16 (the released model was trained square: this mode is untested against it). Each side must
    be at most ``max_side`` (memory grows with the square of it).
    """
    if spec is None:
        return DEFAULT_SIZE
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("keep-aspect", "keep_aspect", "aspect"):
            h, w = source_hw
            area = DEFAULT_SIZE[0] * DEFAULT_SIZE[1]
            scale = math.sqrt(area / float(h * w))
            out = (max(SIZE_MULTIPLE, int(round(h * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE),
                   max(SIZE_MULTIPLE, int(round(w * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE))
            if max(out) > max_side:  # an extreme aspect ratio
                raise InputError(f"--size keep-aspect gives {out[0]}x{out[1]} for a {h}x{w} video, more than "
                                 f"{max_side} on a side; give --size HxW, e.g. --size 512x512")
            return out
        match = re.fullmatch(r"(\d+)\s*[x,]\s*(\d+)", text)
        if not match:
            raise InputError(f"bad --size {spec!r}; use HxW such as 512x512, or keep-aspect")
        spec = (int(match.group(1)), int(match.group(2)))
    h, w = int(spec[0]), int(spec[1])
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise InputError(f"size {h}x{w} is not a multiple of {SIZE_MULTIPLE} on each side; "
                         f"use e.g. 512x512 or keep-aspect")
    if h > max_side or w > max_side:
        raise InputError(f"--size {h}x{w} is larger than {max_side} on a side (memory grows with the square of "
                         f"the size); give e.g. --size 512x512 (the model's own size)")
    return h, w


# ---------------------------------------------------------------------------------------------
# Files


def find_mask_for(color_path: str | os.PathLike, mask_path: str | os.PathLike | None = None) -> Path:
    """The mask file to use: the lossless ``.mkv`` twin when it exists, else the given/derived file.

    ``ex4d recon`` writes ``color_<cam>.mp4``, ``mask_<cam>.mp4`` (lossy, for viewing) and
    ``mask_<cam>.mkv`` (lossless). Given ``--mask mask_90.mp4`` the ``mask_90.mkv`` beside it is
    preferred; with no mask given it is derived from the colour file's name.
    """
    color_path = Path(color_path)
    if mask_path is None:
        stem = color_path.stem
        if not stem.startswith("color"):
            raise InputError(f"no --mask given and {color_path.name} is not named color_<cam>.mp4; "
                             f"pass --mask mask_<cam>.mkv")
        base = color_path.with_name("mask" + stem[len("color"):])
        for candidate in (base.with_suffix(".mkv"), base.with_suffix(".mp4")):
            if candidate.is_file():
                return candidate
        raise InputError(f"no mask found beside {color_path} (looked for {base.name}.mkv/.mp4); pass --mask")
    mask_path = Path(mask_path)
    if mask_path.suffix.lower() != ".mkv":
        lossless = mask_path.with_suffix(".mkv")
        if lossless.is_file():
            logger.info("using the lossless mask %s instead of %s", lossless, mask_path)
            return lossless
    return mask_path


def _read_grey_video(path: Path, what: str) -> tuple[np.ndarray, float, str]:
    """Decode a video as uint8 grey (T, H, W); returns (frames, fps, codec name)."""
    import av

    from ex4d.io.video import threaded_decoding

    path = require_file(path, what)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{what} {path} has no video stream; give a video file")
            stream = container.streams.video[0]
            threaded_decoding(stream)
            codec = stream.codec_context.name
            fps = float(stream.average_rate) if stream.average_rate else 30.0
            frames = [frame.to_ndarray(format="gray") for frame in container.decode(stream)]
    except InputError:
        raise
    except Exception as exc:  # PyAV raises many error types for a non-video file
        raise InputError(f"cannot read {what} {path} ({type(exc).__name__}); give an mp4/mkv video") from None
    if not frames:
        raise InputError(f"{what} {path} contains zero frames")
    return np.stack(frames), fps, codec


def _binarise_mask_frames(grey: np.ndarray, path: Path, lossless: bool) -> np.ndarray:
    """uint8 grey (T, H, W) -> bool, refusing soft or wrong videos with a clear message."""
    if lossless:
        counts = np.bincount(grey.ravel(), minlength=256)  # the values present (faster than np.unique)
        values = np.flatnonzero(counts)
        if values.max() <= 1:  # a {0, 1} mask written without the 255 scale
            return grey > 0
        if not np.isin(values, (0, 255)).all():
            bad = values[~np.isin(values, (0, 255))][:5].tolist()
            raise InputError(f"mask {path} is not binary (values {bad} besides 0/255); "
                             f"give the mask_<cam>.mkv written by ex4d recon")
        return grey > 127
    mid = np.mean((grey >= _MID_LOW) & (grey <= _MID_HIGH))
    if mid > _MAX_MID_FRACTION:
        raise InputError(f"mask {path} is not binary ({mid:.0%} of its pixels are grey); "
                         f"give the black/white mask_<cam> video written by ex4d recon")
    return grey > 127


def load_condition(color_path: str | os.PathLike, mask_path: str | os.PathLike | None = None, *,
                   size: str | tuple[int, int] | None = DEFAULT_SIZE, num_frames: int | None = None,
                   seed: int | None = 0, erode: bool = True, device=None) -> ConditionInputs:
    """Read the rendered colour video + visibility mask and turn them into generator inputs.

    num_frames: None uses every frame (which must be 4k+1); a number N takes N frames spread over
    the file with the reference's ``linspace(0, n-1, N)`` rule (the identity when n == N).
    size: (H, W), ``"HxW"`` or ``"keep-aspect"``; default 512x512, squashed like the reference.
    seed: seeds the per-frame erosion sizes (the reference drew them unseeded).
    device: where the erosion and scaling run and ``cond``/``mask`` are returned (default: the CPU).
    On a GPU they take milliseconds instead of a few hundred on the CPU, and give the same bits: the
    frames go up as uint8 and bool, and every step is exact or one correctly rounded operation.
    Raises :class:`InputError` for unreadable files, colour/mask frame-count or size mismatch,
    non-binary or empty masks and frame counts that are not 4k+1.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ex4d.io.video import read_video

    color_path = require_file(color_path, "colour video")
    mask_file = find_mask_for(color_path, mask_path)
    # The mask decodes on a second thread while the colour decodes here (PyAV's decoders release the GIL).
    with ThreadPoolExecutor(1, thread_name_prefix="decode mask") as pool:
        mask_read = pool.submit(_read_grey_video, mask_file, "mask video")
        colour, fps = read_video(color_path)
        grey, _, codec = mask_read.result()
    if len(colour) != len(grey):
        raise InputError(f"colour video {color_path} has {len(colour)} frames but mask {mask_file} has "
                         f"{len(grey)}; give the matching color_<cam>/mask_<cam> pair from one ex4d recon run")
    if colour.shape[1:3] != grey.shape[1:3]:
        raise InputError(f"colour video {color_path} is {colour.shape[2]}x{colour.shape[1]} but mask {mask_file} "
                         f"is {grey.shape[2]}x{grey.shape[1]}; give the matching pair from one ex4d recon run")
    lossless = codec in ("ffv1", "png", "rawvideo", "huffyuv", "ffvhuff", "utvideo")
    visible = _binarise_mask_frames(grey, mask_file, lossless)
    if not visible.any():
        raise InputError(f"mask {mask_file} is empty (no visible pixel in any frame); "
                         f"check that it is the visibility mask written by ex4d recon")

    total = len(colour)
    if num_frames is None:
        check_num_frames(total, f"colour video {color_path}")
        indices = np.arange(total)
    else:
        check_num_frames(num_frames, "--num-frames")
        if num_frames > total:
            raise InputError(f"colour video {color_path} has {total} frames but {num_frames} were asked; "
                             f"pass --num-frames {max(1, (total - 1) // 4 * 4 + 1)}")
        indices = np.linspace(0, total - 1, num_frames).astype(int)  # the reference's frame pick
    if len(indices) != total:  # (the identity pick copies nothing: 37 MB of colour at 49x512x512)
        colour, visible = colour[indices], visible[indices]
    if not visible[0].all():
        logger.warning("mask frame 0 of %s is not fully visible; frame 0 should be the source view", mask_file)

    sizes = sample_erosion_sizes(len(indices), seed) if erode else [0] * len(indices)
    cond, mask_scaled = _scaled_condition(colour, visible, sizes, size, device)
    return ConditionInputs(cond=cond, mask=mask_scaled, first_frame=_first_frame_array(cond), kernel_sizes=sizes,
                           fps=fps)


def _scaled_condition(colour: np.ndarray, visible: np.ndarray, erosion_sizes: list[int],
                      size: str | tuple[int, int] | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-frame steps of :func:`load_condition`: colour uint8 (T, H, W, 3) and visible bool (T, H, W)
    -> (cond, mask), each (1, 3, T, H', W') on ``device`` (None: the CPU). Resized to ``size``, colour to
    [0, 1], each mask frame eroded with its own kernel size (k <= 1: unchanged), then scaled."""
    from ex4d.io.video import resize_frames

    height, width = parse_size(size, colour.shape[1:3])
    if colour.shape[1:3] != (height, width):
        colour = resize_frames(colour, (height, width))
        # Bilinear resize of the {0, 1} mask then threshold at 0.5 equals the reference's resize of the
        # 0/255 video, erosion and "> 0.5" (erosion is a min filter, so it commutes with thresholding).
        visible = resize_frames(visible[..., None].astype(np.float32), (height, width))[..., 0] > 0.5
    target = torch.device("cpu") if device is None else torch.device(device)
    mask = torch.from_numpy(np.ascontiguousarray(visible)).to(target)
    if any(k > 1 for k in erosion_sizes):
        mask = erode_masks(mask, erosion_sizes)
    return scale_condition(_colour01(colour, target), mask)


def _colour01(colour: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> [0, 1] float32 on ``device``: the same IEEE division as io.video.to_float01.

    The frames go up as uint8, and the divisor is a tensor on the device because CUDA multiplies by the
    reciprocal of a Python-number divisor, which can be one bit off the division."""
    colour01 = torch.from_numpy(np.ascontiguousarray(colour)).to(device).to(torch.float32)
    return colour01.div_(torch.tensor(255.0, dtype=torch.float32, device=device))


def _first_frame_array(cond: torch.Tensor) -> np.ndarray:
    """:func:`first_frame_uint8` of the scaled condition as an (H, W, 3) uint8 array on the host."""
    return first_frame_uint8(cond).permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def first_frame_ahead(color_path: str | os.PathLike, size: str | tuple[int, int] | None = DEFAULT_SIZE
                      ) -> tuple[np.ndarray, int] | None:
    """Frame 0 as :func:`load_condition` will hand it to the sampler, from the colour video's first frame
    alone, and the frame count in the video's header: ((H, W, 3) uint8, T), or None without a count.

    It decodes one frame, so it is ready long before the whole condition. It equals
    ``load_condition(...).first_frame`` when mask frame 0 is fully visible, which it is after ex4d
    recon (frame 0 is the source view, and erosion leaves an all-visible frame unchanged): the same
    resize, division and scaling, on one frame. Callers compare the two before using it
    (``FirstFrameContext.matches``). None also for a file it cannot read (load_condition says why).
    """
    import av

    from ex4d.io.video import read_video

    path = require_file(color_path, "colour video")
    try:
        with av.open(str(path)) as container:
            count = int(container.streams.video[0].frames) if container.streams.video else 0
    except Exception:  # noqa: BLE001 (load_condition reports an unreadable file with its own message)
        return None
    if count < 1:
        return None
    return first_frame_from_decoded(read_video(path, 1)[0][0], size), count


def first_frame_from_decoded(frame: np.ndarray, size: str | tuple[int, int] | None = DEFAULT_SIZE) -> np.ndarray:
    """Frame 0 for the sampler, (H', W', 3) uint8, from the colour video's decoded frame 0 (H, W, 3)
    uint8: :func:`load_condition`'s resize to ``size``, division and scaling, on that one frame (with
    frame 0 of the mask fully visible; see :func:`first_frame_ahead`)."""
    cond, _ = _scaled_condition(frame[None], np.ones((1, *frame.shape[:2]), dtype=bool), [0], size, None)
    return _first_frame_array(cond)


def condition_frame(colour: np.ndarray, visible: np.ndarray, erosion_size: int,
                    size: str | tuple[int, int] | None = DEFAULT_SIZE, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame of :func:`load_condition`'s result from that frame alone: (cond, mask), each
    (1, 3, 1, H', W') on ``device``, the values ``load_condition`` gives it.

    colour: (H, W, 3) uint8 as the colour video decodes; visible: (H, W) bool as the lossless mask
    holds it; erosion_size: the frame's kernel size (``sample_erosion_sizes``; 0 without erosion).
    Every step of ``load_condition`` is per frame (:func:`_scaled_condition`), so the frames of a clip
    put side by side are its condition, which callers check before relying on it
    (``ConditionContext.matches``)."""
    return _scaled_condition(colour[None], visible[None], [int(erosion_size)], size, device)


def first_frame_uint8(cond: torch.Tensor) -> torch.Tensor:
    """The I2V first frame as the reference makes it: (3, H, W) float holding integers 0..255.

    The reference hands CLIP and the y latent frame 0 of the *scaled* cond (B, 3, T, H, W) in
    [-1, 1], mapped back to [0, 1] and truncated to uint8 (a PIL round trip); frame 0 is fully
    visible, so this is the resized source frame.
    """
    return torch.floor((cond[0, :, 0].float() + 1.0) * 0.5 * 255.0).clamp(0, 255)


def image_to_model_range(image_uint8: torch.Tensor) -> torch.Tensor:
    """(3, H, W) values 0..255 -> (1, 3, H, W) in [-1, 1], what the CLIP and VAE inputs expect."""
    return (image_uint8.float() / 255.0 * 2.0 - 1.0).unsqueeze(0)
