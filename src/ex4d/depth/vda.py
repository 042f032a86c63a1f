"""Video Depth Anything (``--depth vda``, ``vda-metric``; base/large sizes too), offline windowed inference.

A fast, temporally consistent video depth model (Small: 29M parameters, Apache-2.0). This module
follows ``shared/reference/vda-spec.md`` (sections 4 and 5):

- **Preprocessing** (:func:`input_size`, :func:`preprocess`): the short side goes to 518 (less when
  the aspect ratio exceeds 1.78), each side a multiple of 14 (rounded, but never below the target),
  bicubic on float [0, 1], ImageNet mean/std. The reference resizes with OpenCV's INTER_CUBIC; here
  PyTorch's bicubic, the same kernel (Keys, a = -0.75, half-pixel centres, clamped borders), runs on the
  estimator's device: the two agree within 1.2e-4 on [0, 1] pixels (tests/test_vda.py), a thirtieth of
  an 8-bit level, and the GPU does in microseconds what costs the CPU milliseconds a frame.
- **Windows** (:func:`window_inputs`): 32 frames with stride 22. Window k >= 1 takes its first 10 input
  slots from the previous window's slots [0, 12, 24..31]: slot 0 is always video frame 0, slot 1 the
  frame the previous window had in slot 12, slots 2..9 the 8 true overlap frames, 10..31 new frames.
  The clip is padded by repeating its last frame.
- **Stitching** (:class:`WindowStitcher`, on the estimator's device): each window's output is fitted
  (scale a, shift b, least squares over all pixels, summed in float64 where the reference uses float32:
  :func:`fit_scale_shift`) on its two keyframe slots against the reference pair (window 0's raw frame 0
  forever, and the previous window's aligned slot 12); negatives are clipped; the 8 overlap frames are
  cross-faded linearly with the previous window's. Metric models skip the fit (a = 1, b = 0) but
  blend the same way.
- On CUDA the network runs under fp16 autocast by default (the reference's default; ``dtype="float32"``
  turns it off); on CPU in fp32.

Everything streams window by window: the model sees 32 frames at a time, and at most 32 preprocessed
inputs, one window's output and 10 stitched frames are held, so memory does not grow with T.

Output: the relative models give affine-invariant inverse depth, converted to z-depth with the same
clip-level normalisation as DepthCrafter and Depth Anything V2 (:mod:`ex4d.depth.normalize`). The
metric models give depth in metres, used as it is (``settings["metric"] = True``: camera paths and
stereo baselines are then in metres).

Differences from the reference scripts, by design: depth is produced at the clip's size (ex4d's
``--resize`` already limits it; the reference first limits the long side to 1280 px), and frames
come from ex4d's decoder as float [0, 1].
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ex4d.depth.depthcrafter import _wrap, check_unit_frames
from ex4d.devices import resolve_device
from ex4d.errors import CheckpointError, InputError
from ex4d.types import DepthVideo

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Window constants of the reference ("do not change"): vda-spec.md section 5.
WINDOW = 32
OVERLAP = 10
STRIDE = WINDOW - OVERLAP  # 22
KEYFRAMES = (0, 12, 24, 25, 26, 27, 28, 29, 30, 31)
INTERP_LEN = 8
ALIGN_LEN = OVERLAP - INTERP_LEN  # 2 keyframe slots are fitted

#: The network's input short side (the reference's ``--input_size``; the models were trained at 518).
DEFAULT_INPUT_SIZE = 518

#: Model size -> the backbone name in the file names and :data:`ex4d.depth.vda_model.CONFIGS`.
ENCODERS = {"small": "vits", "base": "vitb", "large": "vitl"}


# --- preprocessing --------------------------------------------------------------------------------

def input_size(height: int, width: int, target: int = 518, multiple: int = 14) -> tuple[int, int]:
    """Network input size (h, w) for a (height, width) frame, as the reference computes it.

    Aspect guard: for long/short > 1.78 the target becomes round(int(518 * 1.777 / r) / 14) * 14.
    Then scale s = max(target/height, target/width) (the short side goes to the target), and each side
    becomes round(s * side / 14) * 14, or the ceil multiple if that would fall below the target.
    E.g. 720x1280 -> (518, 924), 480x640 -> (518, 686), 544x1280 -> (392, 924).
    """
    if height < 1 or width < 1:
        raise InputError(f"frame size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > 1.78:
        target = int(round(int(target * 1.777 / ratio) / multiple) * multiple)
    scale = max(target / height, target / width)

    def fit(value: float) -> int:
        out = int(np.round(value / multiple) * multiple)
        return out if out >= target else int(np.ceil(value / multiple) * multiple)

    return fit(height * scale), fit(width * scale)


def preprocess(frame: np.ndarray, size: tuple[int, int], device: str | torch.device = "cpu") -> torch.Tensor:
    """frame (H, W, 3) float [0, 1] -> (3, h, w) float32 on ``device``, bicubic-resized (no antialias, no
    clipping of the overshoot, as the reference) and ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32)).to(device).permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


# --- windows and stitching ------------------------------------------------------------------------

def num_windows(num_frames: int) -> int:
    return -(-int(num_frames) // STRIDE)


def window_inputs(items: Iterable, num_frames: int) -> Iterator[list]:
    """Per window, the 32 input slots (items of ``items``, e.g. preprocessed frames), read lazily.

    ``items`` must yield ``num_frames`` items; the last one is repeated as padding. Window k >= 1 reuses
    the previous window's slots [0, 12, 24..31] as its slots 0..9 (so slot 0 is always frame 0), and
    reads 22 new items; window 0 reads 32.
    """
    if num_frames < 1:
        raise InputError("Video Depth Anything needs at least one frame")
    source = iter(items)
    read = 0
    last = None

    def take(count: int) -> list:
        nonlocal read, last
        out = []
        for _ in range(count):
            if read < num_frames:
                try:
                    last = next(source)
                except StopIteration:
                    raise InputError(f"the clip ended after {read} frames, expected {num_frames}") from None
                read += 1
            out.append(last)  # padding: the last frame again
        return out

    previous = None
    for k in range(num_windows(num_frames)):
        slots = take(WINDOW) if k == 0 else [previous[i] for i in KEYFRAMES] + take(WINDOW - OVERLAP)
        yield slots
        previous = slots


def fit_scale_shift(prediction, target) -> tuple[float, float]:
    """Least squares (a, b) with a * prediction + b ~= target over all pixels, by the 2x2 normal
    equations as the reference; (1, 0) when the system is singular. Arrays or tensors (on any device).

    The sums are taken in float64, where the reference uses float32: in float32 the determinant
    cancels badly and the fit error compounds from window to window (on a synthetic video with exact
    per-window affine maps: 0.17 % of the disparity range after 100 frames, 1.6 % after 200; in float64
    under 3e-6, tests/test_vda.py).
    """
    p = torch.as_tensor(prediction).double()
    t = torch.as_tensor(target).to(p.device).double()
    a00, a01, b0, b1 = (float(v) for v in torch.stack([(p * p).sum(), p.sum(), (p * t).sum(), t.sum()]).cpu())
    a11 = float(p.numel())
    det = a00 * a11 - a01 * a01
    if det == 0:
        return 1.0, 0.0
    return (a11 * b0 - a01 * b1) / det, (-a01 * b0 + a00 * b1) / det


class WindowStitcher:
    """Stitch window outputs (32, H, W) into frames, keeping only what the next window needs.

    ``push(window_output)`` returns the frames that are final as a numpy (n, H, W) float32 array;
    ``finish()`` the rest. Only the first ``num_frames`` frames are ever returned. ``params`` lists
    (a, b) per window. The outputs may be numpy arrays or tensors: the stitching runs where they are
    (on the GPU for the estimator), and only the final frames are copied to the CPU.
    """

    def __init__(self, num_frames: int, metric: bool = False):
        self.num_frames = int(num_frames)
        self.metric = bool(metric)
        self.emitted = 0
        self.pending: torch.Tensor | None = None  # the last 8 stitched frames (window k's slots 24..31)
        self.ref: list[torch.Tensor] = []
        self.params: list[tuple[float, float]] = []

    def _emit(self, frames: torch.Tensor) -> np.ndarray:
        frames = frames[:max(0, self.num_frames - self.emitted)]
        self.emitted += len(frames)
        return frames.cpu().numpy()

    def push(self, depth) -> np.ndarray:
        depth = torch.as_tensor(depth).float()
        if depth.ndim != 3 or len(depth) != WINDOW:
            raise ValueError(f"a window output must be ({WINDOW}, H, W), got {tuple(depth.shape)}")
        if self.pending is None:  # window 0: kept as predicted
            self.ref = [depth[0].clone(), depth[KEYFRAMES[1]].clone()]
            self.params.append((1.0, 0.0))
            self.pending = depth[WINDOW - INTERP_LEN:].clone()
            return self._emit(depth[:WINDOW - INTERP_LEN])
        if self.metric:
            a, b = 1.0, 0.0
        else:
            a, b = fit_scale_shift(depth[:ALIGN_LEN], torch.stack(self.ref))
        self.params.append((a, b))
        aligned = torch.clamp_min(depth * a + b, 0.0)
        # weight of the previous window: 1 -> 0 over the 8 overlap frames (reference: np.linspace(1, 0, 8))
        weights = torch.linspace(1, 0, INTERP_LEN, dtype=torch.float32, device=depth.device)[:, None, None]
        blended = self.pending * weights + aligned[ALIGN_LEN:OVERLAP] * (1 - weights)
        # ref[0] stays window 0's raw frame 0; ref[1] is the frame the next window sees in slot 1
        self.ref[1] = aligned[KEYFRAMES[1]].clone()
        self.pending = aligned[WINDOW - INTERP_LEN:].clone()
        return self._emit(torch.cat([blended, aligned[OVERLAP:WINDOW - INTERP_LEN]]))

    def finish(self) -> np.ndarray:
        if self.pending is None:
            raise ValueError("no window was stitched")
        out, self.pending = self._emit(self.pending), None
        return out


def stitch_windows(outputs: Iterable[np.ndarray], num_frames: int, metric: bool = False,
                   stitcher: WindowStitcher | None = None) -> Iterator[np.ndarray]:
    """Window outputs (32, H, W) in order -> stitched frames in chunks (n, H, W), ``num_frames`` in all."""
    stitcher = stitcher or WindowStitcher(num_frames, metric)
    for output in outputs:
        chunk = stitcher.push(output)
        if len(chunk):
            yield chunk
    chunk = stitcher.finish()
    if len(chunk):
        yield chunk
    if stitcher.emitted != num_frames:
        raise InputError(f"Video Depth Anything stitched {stitcher.emitted} frames, expected {num_frames}")


def run_windows(infer: Callable[[list], np.ndarray], items: Iterable, num_frames: int, *, metric: bool = False,
                stitcher: WindowStitcher | None = None, progress=None) -> Iterator[np.ndarray]:
    """``infer(32 slots) -> (32, H, W)`` over the windows of ``items``, stitched: chunks (n, H, W)."""
    windows = _wrap(progress, window_inputs(items, num_frames), "depth windows", num_windows(num_frames))
    return stitch_windows((infer(slots) for slots in windows), num_frames, metric, stitcher)


# --- loading --------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official flat state dict, read with ``weights_only=True`` (nothing in the file is executed)
    and memory-mapped when the file allows it. A wrapped, damaged or non-tensor file is a CheckpointError."""
    path = Path(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # only files of the old (non-zip) torch format cannot be mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        from ex4d.weights_common import first_line

        raise CheckpointError(f"cannot read weight file {path}: {first_line(exc)} (the file is corrupt, incomplete "
                              f"or not a Video Depth Anything checkpoint; delete it and download it again)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))[:3] \
            if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"weight file {path} is not a flat state dict of tensors (found {inner}); the official "
                              f"video_depth_anything_*.pth files are")
    return state


def load_vda(path: str | os.PathLike, config, *, device) -> torch.nn.Module:
    """Strict load of an official ``.pth`` into :class:`~ex4d.depth.vda_model.VideoDepthAnythingNet` (fp32).

    Every key and shape must match (the 8 ``pos_encoder.pe`` tables included), the tensor count and the
    parameter count must be those of ``config`` when it states them, and the position tables must hold
    the sinusoids; anything else is a :class:`CheckpointError`. No tensor is left unset.
    """
    from ex4d.depth.vda_model import VideoDepthAnythingNet, sinusoid_table
    from ex4d.depth.weights import assign_weights

    state = read_state_dict(path)
    with torch.device("meta"):
        model = VideoDepthAnythingNet(config)
    model = assign_weights(model, state, Path(path), dtype=torch.float32, device=torch.device("cpu"))
    tensors = len(model.state_dict())
    params = sum(p.numel() for p in model.parameters())
    if (config.num_tensors is not None and tensors != config.num_tensors) or \
            (config.num_params is not None and params != config.num_params):
        raise CheckpointError(f"weight file {path} gave {tensors} tensors and {params} parameters, expected "
                              f"{config.num_tensors} and {config.num_params}")
    for name, buffer in model.named_buffers():
        if name.endswith("pos_encoder.pe"):
            expected = sinusoid_table(buffer.shape[1], buffer.shape[2])
            if not torch.allclose(buffer.float(), expected, atol=1e-4):
                raise CheckpointError(f"weight file {path}: {name} is not the sinusoidal position table; "
                                      f"not a Video Depth Anything checkpoint")
    return model.to(device)


# --- the estimator --------------------------------------------------------------------------------

def _autocast_dtype(dtype, device: torch.device) -> torch.dtype | None:
    """None (fp32) or the autocast dtype. Default: fp16 on CUDA (the reference), fp32 on CPU."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else None
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": None, "fp32": None, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16,
             torch.float32: None}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
    return table[dtype]


class VideoDepthAnything:
    """Video Depth Anything estimator. ``variant``: small (default), base or large; ``metric``: depth in metres."""

    #: :meth:`estimate` takes a lazy :class:`~ex4d.types.Clip` and works window by window
    streams = True

    def __init__(self, model, *, device, dtype=None, variant: str = "small", metric: bool = False,
                 progress=None, source: str = "", licence: str = "", input_size: int = 518):
        if int(input_size) != input_size or input_size < 14 or input_size % 14:
            raise InputError(f"Video Depth Anything's input size must be a positive multiple of 14, got {input_size!r}")
        self.input_size = int(input_size)
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.autocast = _autocast_dtype(dtype, self.device)
        self.variant, self.metric, self.progress = variant, bool(metric), progress
        self.source, self.licence = source, licence
        self.name = "vda" + ("-metric" if metric else "") + ("" if variant == "small" else f"-{variant}")

    @classmethod
    def from_pretrained(cls, *, models_dir: str | os.PathLike | None = None, device: str = "auto", dtype=None,
                        variant: str = "small", metric: bool = False, progress=None, allow_download: bool = True,
                        input_size: int | None = None, **options) -> "VideoDepthAnything":
        """Find the weights (``models_dir``, the Hugging Face cache, or a download) and load them strictly.

        dtype: autocast dtype, None = fp16 on CUDA, fp32 on CPU. input_size: the network's short side
        (None: :data:`DEFAULT_INPUT_SIZE`, 518, as trained; the reference's ``--input_size``)."""
        from ex4d.depth import vda_model
        from ex4d.depth.weights import VDA_FILES, resolve, vda_file

        if variant not in ENCODERS:
            raise InputError(f"unknown Video Depth Anything size {variant!r}; use {', '.join(ENCODERS)}")
        if options:
            raise InputError(f"options {', '.join(sorted(options))} do not apply to Video Depth Anything")
        device = resolve_device(device)
        _autocast_dtype(dtype, device)  # a bad dtype fails before the weights are read
        repo, _, licence = VDA_FILES[(variant, bool(metric))]
        if licence != "Apache-2.0":
            log.warning("%s is licensed %s (non-commercial use only); for commercial work use --depth %s "
                        "(Small, Apache-2.0)", repo.split("/")[-1], licence, "vda-metric" if metric else "vda")
        _, weights = resolve(vda_file(variant, metric), models_dir, allow_download=allow_download)
        model = load_vda(weights, vda_model.CONFIGS[ENCODERS[variant]], device=device)
        return cls(model, device=device, dtype=dtype, variant=variant, metric=metric, progress=progress,
                   source=str(weights), licence=licence,
                   input_size=DEFAULT_INPUT_SIZE if input_size is None else input_size)

    @torch.no_grad()
    def infer_window(self, slots: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """32 preprocessed frames (3, h, w) on the device -> depth (32, H, W) float32 at the frame size
        ``size``, on the device.

        The network output (in the autocast dtype, as the reference) is cast to fp32 and resized
        bilinearly with align_corners=True."""
        x = torch.stack(list(slots))[None]
        with torch.autocast(device_type=self.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            depth = self.model(x)[0]
        depth = torch.nn.functional.interpolate(depth[:, None].float(), size=tuple(size), mode="bilinear",
                                                align_corners=True)[:, 0]
        return depth

    def _chunks(self, source: Iterable[np.ndarray], num_frames: int, size: tuple[int, int],
                stitcher: WindowStitcher) -> Iterator[np.ndarray]:
        net_size = input_size(*size, target=self.input_size)

        def prepared():
            for frame in source:
                frame = np.asarray(frame)
                check_unit_frames(frame[None])
                yield preprocess(frame, net_size, self.device)

        return run_windows(lambda slots: self.infer_window(slots, size), prepared(), num_frames,
                           metric=self.metric, stitcher=stitcher, progress=self.progress)

    def estimate(self, frames, *, spill_dir: str | os.PathLike | None = None) -> DepthVideo:
        """frames -> DepthVideo (T, H, W): reference-range z-depth (relative models) or metres (metric).

        ``frames``: a (T, H, W, 3) float array in [0, 1] (arrays come back), or a lazy
        :class:`~ex4d.types.Clip` read window by window (depth and valid come back as
        :class:`~ex4d.io.arrays.FrameSequence` objects read from a temporary ``.npy`` in ``spill_dir``
        (T*H*W*4 bytes; the system's temporary folder if None), so memory does not grow with T).
        """
        from ex4d.depth.normalize import disparity_stream_to_depth
        from ex4d.types import Clip

        if isinstance(frames, Clip):
            num_frames, size, source, in_memory = frames.num_frames, frames.size, frames.iter_frames(), False
        else:
            frames = np.asarray(frames)
            check_unit_frames(frames)
            num_frames, size, source, in_memory = len(frames), tuple(frames.shape[1:3]), frames, True
        stitcher = WindowStitcher(num_frames, self.metric)
        chunks = self._chunks(source, num_frames, size, stitcher)
        if self.metric:
            depth, valid = metric_stream_to_depth(chunks, num_frames, size, spill_dir=spill_dir, in_memory=in_memory)
        else:
            depth = disparity_stream_to_depth(chunks, num_frames, size, where="Video Depth Anything output",
                                              spill_dir=spill_dir, in_memory=in_memory)
            valid = _all_valid(num_frames, size, in_memory)
        settings = {"estimator": self.name, "variant": self.variant, "metric": self.metric,
                    "units": "metres" if self.metric else "relative (reference normalisation)",
                    "licence": self.licence, "input_size": list(input_size(*size, target=self.input_size)),
                    "autocast": str(self.autocast).replace("torch.", "") if self.autocast else "float32",
                    "device": str(self.device), "weights": self.source, "window": WINDOW, "stride": STRIDE,
                    "scale_shift": [list(p) for p in stitcher.params]}
        return DepthVideo(depth=depth, valid=valid, K=None, estimator=self.name, settings=settings)


def _all_valid(num_frames: int, size: tuple[int, int], in_memory: bool):
    from ex4d.io.arrays import MappedFrames

    if in_memory:
        return np.ones((num_frames, *size), dtype=bool)
    return MappedFrames(num_frames, size, bool, lambda k: np.ones(size, dtype=bool))


def metric_frame(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Metric depth (H, W) in metres -> (z, valid): pixels outside [1e-4, 1e4] m (the reference's depth
    range; 0 where the model's ReLU cut) are invalid and take the frame's farthest valid depth (as
    masked pixels of depth files do), or 1e4 if none is valid."""
    from ex4d.depth.normalize import FAR, NEAR

    d = np.asarray(depth, dtype=np.float32)
    valid = np.isfinite(d) & (d >= np.float32(NEAR)) & (d <= np.float32(FAR))
    fill = np.float32(d[valid].max()) if valid.any() else np.float32(FAR)
    return np.where(valid, d, fill).astype(np.float32), valid


def metric_stream_to_depth(chunks: Iterable[np.ndarray], num_frames: int, size: tuple[int, int], *,
                           spill_dir: str | os.PathLike | None = None, in_memory: bool = False):
    """Metric depth chunks (n, H, W) -> (depth, valid) (T, H, W), as arrays or as frame sequences read
    from a temporary ``.npy`` (like :func:`ex4d.depth.normalize.disparity_stream_to_depth`, without the
    min-max pass: metres are kept)."""
    shape = (int(num_frames), int(size[0]), int(size[1]))
    if in_memory:
        raw = np.concatenate(list(chunks)) if num_frames else np.empty(shape, np.float32)
        if raw.shape != shape:
            raise InputError(f"Video Depth Anything output is {raw.shape}, expected {shape}")
        pairs = [metric_frame(d) for d in raw]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    from ex4d.io.arrays import MappedFrames, NpyFrameWriter, TemporaryFrames
    from ex4d.io.files import sweep_stale_partials, temporary_tag

    folder = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(folder / "depth_raw")
    path = folder / f".depth_raw{temporary_tag()}.npy"
    try:
        with NpyFrameWriter(path, shape, np.float32) as writer:
            for chunk in chunks:
                writer.write(np.asarray(chunk, dtype=np.float32))
            if writer.written != shape[0]:
                raise InputError(f"Video Depth Anything output has {writer.written} frames, expected {shape[0]}")
        raw = TemporaryFrames(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    depth = MappedFrames(shape[0], shape[1:], np.float32, lambda k: metric_frame(raw.frame(k))[0],
                         release=raw.release)
    valid = MappedFrames(shape[0], shape[1:], bool, lambda k: metric_frame(raw.frame(k))[1])
    return depth, valid
