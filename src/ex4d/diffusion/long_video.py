"""Videos longer than one generation window, in overlapping windows.

The released model generates 49 frames at a time (13 latent frames). For a longer camera path the
reconstruction stage renders the whole path once (colour + visibility mask for every frame), and
generation runs window by window:

* window 0 is generated from the rendered condition as usual;
* every later window starts inside the previous one. Its overlap frames (the frames it shares with
  what is already generated) are replaced, in the condition colour, by the video assembled so far
  (the previous window's frames, blended where earlier overlaps were), and their mask is set to 1
  ("seen"), so the model copies them instead of inventing them. Its
  first frame -- the stock Wan I2V image -- is therefore the frame already generated at the window
  start, which keeps identity and lighting continuous;
* in each overlap the new window is blended with the old output by a linear ramp that is 0 at the
  window start (the old frame, exactly) and reaches 1 just after the overlap. Each seam is thus
  continuous by construction, and the ramp hides the small drift between the copied frames and
  what the model makes of them.

Windows all have the same length (the model's trained length); when the path does not tile exactly
the last window is moved back so that it ends on the last frame, and its overlap is larger.

Shapes: T frames, H, W. Colours are float (T, H, W, 3) in [0, 1], masks bool (T, H, W).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import numpy as np

from ex4d.errors import InputError

log = logging.getLogger(__name__)

#: Generates one window: (colour (T,H,W,3) float [0,1], mask (T,H,W) bool, window index) ->
#: frames (T,H,W,3) float [0,1]. The I2V first frame is colour[0] (its mask is all True).
WindowGenerator = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

#: The length the released EX-4D weights were trained and run at.
DEFAULT_WINDOW = 49
DEFAULT_OVERLAP = 17


def _check_4k1(value: int, what: str) -> None:
    if value < 1 or (value - 1) % 4 != 0:
        raise InputError(f"{what} must be 4k+1 frames (1, 5, 9, ..., 49, ...) because the Wan VAE packs "
                         f"frame 0 alone and then groups of 4; got {value}")


def plan_windows(num_frames: int, window: int = DEFAULT_WINDOW, overlap: int = DEFAULT_OVERLAP) -> list[tuple[int, int]]:
    """Split ``num_frames`` frames into overlapping windows of ``window`` frames.

    Returns half-open ``(start, end)`` pairs, in order, covering ``0 .. num_frames`` exactly. The
    stride is ``window - overlap``; the last window is moved back to end at ``num_frames`` (so its
    overlap with the previous one can be larger than ``overlap``). A clip of at most ``window``
    frames is one window ``(0, num_frames)``.

    ``window`` must be 4k+1 (the VAE's frame packing); so must ``num_frames`` when it fits in one
    window. ``overlap`` must be in ``[1, window - 1]``; 4k+1 values (9, 17) keep the copied frames
    on whole latent frames, which works best.

    Example: ``plan_windows(97, 49, 17)`` -> ``[(0, 49), (32, 81), (48, 97)]``;
    ``plan_windows(145, 49, 17)`` -> ``[(0, 49), (32, 81), (64, 113), (96, 145)]``.
    """
    num_frames, window, overlap = int(num_frames), int(window), int(overlap)
    _check_4k1(window, "the window length")
    if num_frames < 1:
        raise InputError(f"the video must have at least 1 frame, got {num_frames}")
    if num_frames <= window:
        _check_4k1(num_frames, "a video that fits in one window")
        return [(0, num_frames)]
    if not 1 <= overlap < window:
        raise InputError(f"the overlap must be between 1 and window-1 = {window - 1} frames, got {overlap}")
    stride = window - overlap
    windows = []
    start = 0
    while True:
        end = start + window
        if end >= num_frames:
            windows.append((num_frames - window, num_frames))
            break
        windows.append((start, end))
        start += stride
    return windows


def blend_weights(overlap: int) -> np.ndarray:
    """Weights of the NEW window over an overlap of ``overlap`` frames: ``j / overlap`` for j=0..overlap-1.

    0 at the window start (the previous window's frame is kept exactly), rising linearly so that the
    first frame after the overlap (weight 1) continues the ramp. float32 (overlap,).
    """
    return (np.arange(overlap, dtype=np.float32) / max(int(overlap), 1)).astype(np.float32)


def window_condition(color: np.ndarray, mask: np.ndarray, generated: np.ndarray | None, start: int, end: int,
                     known_end: int) -> tuple[np.ndarray, np.ndarray]:
    """The condition of window ``[start, end)`` given frames generated up to ``known_end`` (exclusive).

    Frames ``start .. known_end-1`` (the overlap) take their colour from ``generated`` and get mask
    1; the rest keep the rendered colour and mask. Returns copies: colour (T,H,W,3), mask (T,H,W).
    """
    c = np.array(color[start:end], dtype=np.float32, copy=True)
    m = np.array(mask[start:end], dtype=bool, copy=True)
    k = max(0, min(known_end, end) - start)
    if k and generated is not None:
        c[:k] = generated[start:start + k]
        m[:k] = True
    return c, m


def generate_long(color: np.ndarray, mask: np.ndarray, generate_window: WindowGenerator, *,
                  window: int = DEFAULT_WINDOW, overlap: int = DEFAULT_OVERLAP,
                  progress: Callable[[Iterable], Iterable] | None = None,
                  on_window: Callable[[int, tuple[int, int], np.ndarray], None] | None = None) -> np.ndarray:
    """Generate a video of any length from a whole-path condition, window by window.

    color: float (T, H, W, 3) in [0, 1], the rendered condition colour (already masked);
    mask: bool (T, H, W), frame 0 all True. generate_window: see :data:`WindowGenerator`; it is
    called once per window with that window's condition (overlap replaced by generated frames).
    on_window(index, (start, end), frames) is called after each window (for logging/checkpoints).
    Returns float32 (T, H, W, 3) in [0, 1], the same length as the input.
    """
    color = np.asarray(color)
    mask = np.asarray(mask)
    if color.ndim != 4 or color.shape[-1] != 3:
        raise InputError(f"condition colour must be (T,H,W,3), got {color.shape}")
    if mask.shape != color.shape[:3]:
        raise InputError(f"condition mask {mask.shape} does not match the colour {color.shape[:3]}")
    num_frames = color.shape[0]
    windows = plan_windows(num_frames, window, overlap)
    log.info("generating %d frames in %d window(s): %s", num_frames, len(windows), windows)
    out = np.zeros(color.shape, dtype=np.float32)
    known_end = 0
    iterator: Iterable = enumerate(windows)
    if progress is not None:
        iterator = progress(iterator, total=len(windows), desc="windows", unit="window")
    for index, (start, end) in iterator:
        cond_color, cond_mask = window_condition(color, mask, out if index else None, start, end, known_end)
        frames = np.asarray(generate_window(cond_color, cond_mask, index), dtype=np.float32)
        if frames.shape != cond_color.shape:
            raise ValueError(f"window {index} generator returned {frames.shape}, expected {cond_color.shape}")
        k = max(0, known_end - start)  # frames of this window already generated
        if k:
            w = blend_weights(k)[:, None, None, None]
            out[start:start + k] = (1.0 - w) * out[start:start + k] + w * frames[:k]
        out[start + k:end] = frames[k:]
        known_end = end
        if on_window is not None:
            on_window(index, (start, end), frames)
    return out


def pipeline_window_generator(pipe, *, seed: int = 0, first_window=None, **call_kwargs) -> WindowGenerator:
    """A :data:`WindowGenerator` over an :class:`ex4d.diffusion.pipeline.EX4DPipeline`.

    Each window's colour/mask are scaled as the reference does (``cond = 2 (c m) - 1``,
    ``mask' = 2 m - 1``; no further erosion: the whole-path mask was eroded once when loaded) and
    its first frame, as uint8, is the I2V image. Window ``i`` draws its
    noise from a CPU generator seeded ``seed + i``. first_window: optional ConditionInputs whose
    own scaled tensors and first frame window 0 uses as they are (so window 0 is bit-identical to
    one plain pipeline call). call_kwargs go to the pipeline call (prompt, num_inference_steps, ...).
    """
    import torch

    from ex4d.diffusion.conditioning import scale_condition

    def generate(color: np.ndarray, mask: np.ndarray, index: int) -> np.ndarray:
        if index == 0 and first_window is not None:
            n = color.shape[0]
            result = pipe(first_window.cond[:, :, :n], first_window.mask[:, :, :n], image=first_window.first_frame,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call_kwargs)
            return result.frames[0].astype(np.float32) / 255.0
        cond, mask_scaled = scale_condition(torch.from_numpy(np.ascontiguousarray(color)),
                                            torch.from_numpy(np.ascontiguousarray(mask)))
        # Window 0: the reference's truncation of the rendered frame 0 (equal to load_condition's
        # first_frame). Later windows start on generated (possibly blended) frames: round them.
        first = np.clip(color[0], 0.0, 1.0) * 255.0
        first = (np.floor(first) if index == 0 else np.round(first)).astype(np.uint8)
        result = pipe(cond, mask_scaled, image=first, generator=torch.Generator("cpu").manual_seed(seed + index),
                      output_type="np", **call_kwargs)
        return result.frames[0].astype(np.float32) / 255.0

    return generate


def generate_long_video(pipe, condition, *, window: int = DEFAULT_WINDOW, overlap: int = DEFAULT_OVERLAP,
                        seed: int = 0, progress: Callable[[Iterable], Iterable] | None = None,
                        **call_kwargs) -> np.ndarray:
    """Generate a whole-path condition of any length with an EX4DPipeline, window by window.

    condition: :class:`ex4d.diffusion.conditioning.ConditionInputs` of the whole path (from
    ``load_condition``; e.g. 97 or 145 frames). Returns uint8 (T, H, W, 3) frames, T = the
    condition's frame count. The first window is exactly what one ``pipe`` call gives for those
    frames (same seed, first frame and condition).
    """
    cond = condition.cond[0].float()  # (3, T, H, W) in [-1, 1], already masked
    color = ((cond.permute(1, 2, 3, 0).numpy() + 1.0) * 0.5).clip(0.0, 1.0).astype(np.float32)
    mask = (condition.mask[0, 0] > 0).numpy()
    generate = pipeline_window_generator(pipe, seed=seed, first_window=condition, **call_kwargs)
    frames = generate_long(color, mask, generate, window=window, overlap=overlap, progress=progress)
    return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)


def seam_frames(windows: Sequence[tuple[int, int]]) -> list[int]:
    """Frame index at which each window after the first starts (where the I2V image is copied)."""
    return [start for start, _ in windows[1:]]
