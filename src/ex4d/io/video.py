"""Video reading and writing with PyAV, plus the reference's resize rule.

Frames cross this module as uint8 arrays (T, H, W, 3) RGB; convert to float [0, 1] at the caller.
Colour videos are written as H.264 (yuv420p, so H and W must be even) and binary masks losslessly
as FFV1 in ``.mkv`` so that later stages read exact {0, 1} masks.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ex4d.errors import InputError
from ex4d.io.files import atomic_path, require_file


def read_video(path: str | os.PathLike, num_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode the first ``num_frames`` frames (all if None) of a video.

    Returns (frames uint8 (T, H, W, 3) RGB, fps). Raises :class:`InputError` for a missing or
    unreadable file, a file without a video stream, zero frames or too few frames.
    """
    import av

    path = require_file(path, "video")
    try:
        container = av.open(str(path))
    except av.error.EOFError:  # a valid header-only file: the container ends before any frame
        raise InputError(f"{path} contains zero frames; give a video with at least one frame") from None
    except Exception as exc:  # PyAV raises many error types for a non-video file
        raise InputError(f"cannot read {path} as a video ({type(exc).__name__}); give an mp4/mkv/mov/avi file") from None
    frames: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream; give a video file")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 30.0
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if num_frames is not None and len(frames) >= num_frames:
                    break
        except Exception as exc:
            if not frames:
                raise InputError(f"cannot decode {path} ({type(exc).__name__}); is it a valid video?") from None
    if not frames:
        raise InputError(f"{path} contains zero frames; give a video with at least one frame")
    if num_frames is not None and len(frames) < num_frames:
        raise InputError(
            f"{path} has only {len(frames)} frames but {num_frames} are needed; "
            f"pass --num-frames {len(frames)} or fewer, or use a longer video"
        )
    return np.stack(frames), fps


def count_frames(path: str | os.PathLike) -> int:
    """Number of decodable frames in a video (decodes it; cheap for short clips)."""
    return len(read_video(path)[0])


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str = "h264",
                crf: int = 16) -> Path:
    """Atomically write uint8 frames (T, H, W, 3) or (T, H, W) to ``path``.

    ``codec`` is ``"h264"`` (lossy, yuv420p, for viewing and for the generator's colour input) or
    ``"ffv1"`` (lossless; use a ``.mkv`` path). Grey (T, H, W) input is written as grey for FFV1 and
    replicated to RGB for H.264.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"write_video expects uint8 frames, got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or len(frames) == 0:
        raise ValueError(f"frames must be (T,H,W,3) or (T,H,W), got {frames.shape}")
    height, width = frames.shape[1:3]
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            if codec == "h264":
                if height % 2 or width % 2:
                    raise InputError(f"H.264 needs even sizes, got {height}x{width} for {path}")
                stream = container.add_stream("libx264", rate=rate)
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "medium"}
                fmt = "rgb24"
                if frames.shape[-1] == 1:
                    frames = np.repeat(frames, 3, axis=-1)
            elif codec == "ffv1":
                stream = container.add_stream("ffv1", rate=rate)
                grey = frames.shape[-1] == 1
                stream.pix_fmt = "gray" if grey else "bgr0"
                fmt = "gray" if grey else "rgb24"
            else:
                raise ValueError(f"unknown codec {codec!r}; use 'h264' or 'ffv1'")
            stream.width, stream.height = width, height
            for frame in frames:
                image = frame[..., 0] if fmt == "gray" else frame
                video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=fmt)
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def read_mask_video(path: str | os.PathLike) -> np.ndarray:
    """Read a mask video as bool (T, H, W): exact for FFV1, thresholded at 0.5 for lossy files."""
    import av

    path = require_file(path, "mask video")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            masks = [f.to_ndarray(format="gray") for f in container.decode(stream)]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read mask video {path} ({type(exc).__name__})") from None
    if not masks:
        raise InputError(f"mask video {path} contains zero frames")
    return np.stack(masks) > 127


# ---------------------------------------------------------------------------------------------
# Resizing


def reference_size(height: int, width: int, max_res: int = 1024, multiple: int = 64) -> tuple[int, int]:
    """The reference's working size: round each side to a multiple of 64, capping the long side.

    If max(H, W) > ``max_res``, scale by max_res / max(H, W) first. Python's round() (banker's
    rounding) is used as in the reference. 1920x1080 -> (576, 1024); 512x512 -> (512, 512).
    """
    if max(height, width) > max_res:
        scale = max_res / max(height, width)
        height, width = height * scale, width * scale
    out_h = max(multiple, int(round(height / multiple)) * multiple)
    out_w = max(multiple, int(round(width / multiple)) * multiple)
    return out_h, out_w


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize frames (T, H, W, C) (any dtype) to ``size`` = (H', W').

    Uses half-pixel centres without antialiasing, which matches OpenCV's INTER_LINEAR that the
    reference uses. uint8 input gives uint8 output (rounded).
    """
    frames = np.asarray(frames)
    if frames.shape[1:3] == tuple(size):
        return frames.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    out = out.permute(0, 2, 3, 1).numpy()
    if frames.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(frames.dtype)


def to_float01(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 in [0, 1]."""
    return np.asarray(frames_uint8, dtype=np.float32) / 255.0


def to_uint8(frames01: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8, rounded (the reference truncated; rounding is the documented fix)."""
    return np.clip(np.rint(np.asarray(frames01) * 255.0), 0, 255).astype(np.uint8)
