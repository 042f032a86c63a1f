"""Video reading and writing with PyAV, plus the reference's resize rule.

Frames cross this module as uint8 arrays (T, H, W, 3) RGB; convert to float [0, 1] at the caller.
Colour videos are written as H.264 (yuv420p, so H and W must be even) and binary masks losslessly
as FFV1 in ``.mkv`` so that later stages read exact {0, 1} masks.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ex4d.errors import InputError
from ex4d.io.files import atomic_path, require_file

log = logging.getLogger(__name__)


def _open_video(path: Path):
    import av

    try:
        return av.open(str(path))
    except av.error.EOFError:  # a valid header-only file: the container ends before any frame
        raise InputError(f"{path} contains zero frames; give a video with at least one frame") from None
    except Exception as exc:  # PyAV raises many error types for a non-video file
        raise InputError(f"cannot read {path} as a video ({type(exc).__name__}); give an mp4/mkv/mov/avi file") from None


def threaded_decoding(stream) -> None:
    """Let the stream's decoder work on several frames at once (FFmpeg's frame and slice threads).

    PyAV decodes on one thread by default, and ex4d's own H.264 files have one slice a frame, so
    only frame threads run in parallel. The frames are the same: FFmpeg's threaded decoders are
    bit-exact (tests compare them with a default decode)."""
    stream.thread_type = "AUTO"


def _decoded(path: Path, num_frames: int | None, convert: bool):
    """Yield (fps, frame) for the first ``num_frames`` frames (all if None): rgb24 arrays if ``convert``,
    else PyAV frames. A decode error after the first frame ends the video there (a truncated file)."""
    container = _open_video(path)
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream; give a video file")
        stream = container.streams.video[0]
        threaded_decoding(stream)
        fps = float(stream.average_rate) if stream.average_rate else 30.0
        count = 0
        try:
            for frame in container.decode(stream):
                yield fps, (frame.to_ndarray(format="rgb24") if convert else frame)
                count += 1
                if num_frames is not None and count >= num_frames:
                    break
        except InputError:
            raise
        except Exception as exc:
            if not count:
                raise InputError(f"cannot decode {path} ({type(exc).__name__}); is it a valid video?") from None


def _too_few(path: Path, count: int, num_frames: int | None) -> None:
    if not count:
        raise InputError(f"{path} contains zero frames; give a video with at least one frame")
    if num_frames is not None and count < num_frames:
        raise InputError(
            f"{path} has only {count} frames but {num_frames} are needed; "
            f"pass --num-frames {max(1, (count - 1) // 4 * 4 + 1)} (4k+1, which generation needs too) or use a "
            f"longer video"
        )


def read_video(path: str | os.PathLike, num_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode the first ``num_frames`` frames (all if None) of a video.

    Returns (frames uint8 (T, H, W, 3) RGB, fps). Raises :class:`InputError` for a missing or
    unreadable file, a file without a video stream, zero frames or too few frames.
    """
    path = require_file(path, "video")
    frames: list[np.ndarray] = []
    fps = 30.0
    for fps, frame in _decoded(path, num_frames, convert=True):
        frames.append(frame)
    _too_few(path, len(frames), num_frames)
    return np.stack(frames), fps


def probe_video(path: str | os.PathLike, num_frames: int | None = None) -> tuple[int, tuple[int, int], float]:
    """Check that a video has ``num_frames`` decodable frames without keeping them.

    Returns (frame count, capped at ``num_frames``; (H, W); fps). Same errors as :func:`read_video`.
    """
    path = require_file(path, "video")
    count, size, fps = 0, (0, 0), 30.0
    for fps, frame in _decoded(path, num_frames, convert=False):
        if not count:
            size = (int(frame.height), int(frame.width))
        count += 1
    _too_few(path, count, num_frames)
    return count, size, fps


def iter_video(path: str | os.PathLike, num_frames: int | None = None,
               size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield the first ``num_frames`` frames as uint8 (H, W, 3) RGB, one at a time, resized to ``size``
    (as :func:`resize_frames`, frame by frame: the same values as resizing the stacked video)."""
    path = require_file(path, "video")
    count = 0
    for _, frame in _decoded(path, num_frames, convert=True):
        count += 1
        yield frame if size is None or frame.shape[:2] == tuple(size) else resize_frames(frame[None], size)[0]
    _too_few(path, count, num_frames)


def count_frames(path: str | os.PathLike) -> int:
    """Number of decodable frames in a video (decodes it without keeping the frames)."""
    return probe_video(path)[0]


#: libx264's thread count, fixed: x264's output depends on its thread count, which by default follows
#: the CPUs this process may use, so the same frames gave different bytes on different machines (and
#: under different CPU affinities); 4 threads keep encoding fast on small and large machines alike.
H264_THREADS = 4
#: H.264 frames are coded this many pixels wide (a multiple of it), the extra columns repeating the
#: last one and cropped away in the stream header (SPS cropping: decoders show the true size). PyAV
#: allocates frame planes without padding (line size == width), and libx264 most likely reads past a
#: plane's end where the chroma width is not a multiple of 64: the same 64x48 frames gave different
#: bytes from one process to the next (decoded up to 20 levels apart), while 128-wide frames, and
#: 64x48 frames coded 128 wide, were stable.
H264_WIDTH_MULTIPLE = 128
#: libx264's rate-control look-ahead in frames; None keeps preset medium's 40. It sets how many frames
#: the encoder holds back before coding any (the frame-type decision and MB-tree look that far ahead).
H264_LOOKAHEAD: int | None = None
#: The look-ahead of the condition videos recon writes (:class:`ex4d.types.ConditionWriter`); None
#: keeps preset medium's 40. Recon waits for their final flush, which holds back the look-ahead's
#: frames: on 2 CPU cores the wait after the last rendered frame was 0.18 s at 40 and 0.05 s at 10
#: (bench/bench_x264.py, render-like frames), and the colour condition of the README example lost
#: 0.04 dB PSNR (42.62 against 42.58 dB). The final video keeps H264_LOOKAHEAD: on natural video a
#: look-ahead of 10 cost 0.6 dB.
CONDITION_H264_LOOKAHEAD: int | None = 10


def h264_options(width: int, crf: int, x264_params: str = "",
                 lookahead: int | None = None) -> tuple[dict[str, str], int]:
    """libx264 options for frames ``width`` wide, and how many columns to add to each frame.

    Every H.264 writer of ex4d uses this, so all get the fixed thread count and the width padding
    (H264_THREADS, H264_WIDTH_MULTIPLE). x264_params: further ``x264-params`` (``key=value:...``).
    lookahead: libx264's rc-lookahead in frames; None takes H264_LOOKAHEAD.
    """
    pad = -width % H264_WIDTH_MULTIPLE
    lookahead = H264_LOOKAHEAD if lookahead is None else lookahead
    lookahead = f"rc-lookahead={lookahead}" if lookahead is not None else ""
    params = ":".join(p for p in (x264_params, lookahead, f"crop-rect=0,0,{pad},0" if pad else "") if p)
    options = {"crf": str(crf), "preset": "medium", "threads": str(H264_THREADS)}
    if params:
        options["x264-params"] = params
    return options, pad


def pad_columns(image: np.ndarray, pad: int) -> np.ndarray:
    """(H, W, C) -> (H, W + pad, C), the last column repeated (the columns h264_options crops away)."""
    return np.concatenate([image, np.repeat(image[:, -1:], pad, axis=1)], axis=1) if pad else image


_FLUSH = object()  # a background writer's end mark: flush the encoder, then stop


class VideoWriter:
    """Write a video one frame at a time, atomically (the file appears only when the block succeeds).

    with VideoWriter(path, fps, codec="h264") as writer:
        for frame in frames: writer.write(frame)   # uint8 (H, W, 3) or (H, W)

    ``codec`` is ``"h264"`` (lossy, yuv420p, for viewing and for the generator's colour input) or
    ``"ffv1"`` (lossless; use a ``.mkv`` path). Grey (H, W) frames are written as grey for FFV1 and
    replicated to RGB for H.264. Writing no frame at all is an error (nothing is kept).

    ``background=True`` encodes on a thread of the writer's own: ``write`` checks the frame, copies
    it into a queue of at most ``queue_frames`` frames and returns, so the caller makes the next frame
    while this one is encoded (PyAV releases the GIL inside the encoder), and several background
    writers encode at the same time. The bytes are the same as in the foreground. An encoding error
    is raised by the next ``write`` or at the end of the block; the file is then not kept. The
    encoder's final flush runs on that thread too: x264 holds back its look-ahead (about 40 frames at
    ``medium``), so most of a short clip is encoded there. ``end_input`` starts it without waiting,
    so that several writers flush at once (:class:`ex4d.types.ConditionWriter` ends its three so).
    ``lookahead``: libx264's rc-lookahead for this video (None: H264_LOOKAHEAD).

    ``decoded_frame_sink``: called with each frame as a reader of the finished file will decode it
    ((H, W, 3) uint8 RGB, as :func:`read_video`), in order, on the encoding thread, decoded in memory
    from the encoder's own packets. For a lossy codec those frames exist before the file does: x264
    hands out frame k's packet once its look-ahead is full, long before the last frame. The sink
    must be quick (hand the frame to another thread). Returning False ends the hand-over (no more
    decoding); an exception in it is logged and ends it too, as it concerns only work done ahead,
    never the file. ``decoding`` says whether frames are still handed over.
    """

    def __init__(self, path: str | os.PathLike, fps: float, codec: str = "h264", crf: int = 16,
                 background: bool = False, queue_frames: int = 4, lookahead: int | None = None,
                 decoded_frame_sink=None):
        if codec not in ("h264", "ffv1"):
            raise ValueError(f"unknown codec {codec!r}; use 'h264' or 'ffv1'")
        if decoded_frame_sink is not None and codec != "h264":
            raise ValueError("decoded_frame_sink is for H.264 (a lossless video's frames are the frames written)")
        self.path, self.fps, self.codec, self.crf = Path(path), fps, codec, crf
        self.lookahead = lookahead
        self.background, self.queue_frames = background, max(1, int(queue_frames))
        self.frames_written = 0
        self._atomic = self._tmp = self._container = self._stream = None
        self._fmt = None
        self._shape = None  # (H, W, grey) of the first frame; every frame must match it
        self._pad = 0  # extra H.264 columns (H264_WIDTH_MULTIPLE), cropped in the stream header
        self._queue = self._thread = self._error = None
        self._input_ended = False  # end_input() was called: the thread flushes and stops
        self._decoded_sink = decoded_frame_sink
        self._decoder = None  # in-memory decoder of the encoder's packets (decoded_frame_sink)

    def __enter__(self) -> "VideoWriter":
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        return self

    def _open(self, height: int, width: int, grey: bool) -> None:
        import av

        rate = Fraction(self.fps).limit_denominator(1001)
        self._container = av.open(str(self._tmp), mode="w")
        if self.codec == "h264":
            stream = self._container.add_stream("libx264", rate=rate)
            stream.pix_fmt = "yuv420p"
            stream.options, self._pad = h264_options(width, self.crf, lookahead=self.lookahead)
            self._fmt = "rgb24"
        else:
            stream = self._container.add_stream("ffv1", rate=rate)
            stream.pix_fmt = "gray" if grey else "bgr0"
            self._fmt = "gray" if grey else "rgb24"
        stream.width, stream.height = width + self._pad, height
        self._stream = stream

    def _checked(self, frame: np.ndarray) -> np.ndarray:
        """The frame as uint8 (H, W, C), checked against the first one (in the caller's thread)."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8:
            raise TypeError(f"VideoWriter expects uint8 frames, got {frame.dtype}")
        if frame.ndim == 2:
            frame = frame[..., None]
        if frame.ndim != 3 or frame.shape[-1] not in (1, 3):
            raise ValueError(f"a frame must be (H,W,3) or (H,W), got {frame.shape}")
        shape = (frame.shape[0], frame.shape[1], frame.shape[-1] == 1)
        if self._shape is None:
            if self.codec == "h264" and (shape[0] % 2 or shape[1] % 2):
                raise InputError(f"H.264 needs even sizes, got {shape[0]}x{shape[1]} for {self.path}")
            self._shape = shape
        elif self._shape != shape:
            raise ValueError(f"frame {self.frames_written} is {frame.shape}, the first was {self._shape}")
        return frame

    def _encode(self, frame: np.ndarray) -> None:
        """Encode one checked (H, W, C) uint8 frame and mux its packets."""
        import av

        if self._container is None:
            self._open(*self._shape)
        if self._fmt == "gray":
            image = frame[..., 0]
        elif frame.shape[-1] == 1:
            image = np.repeat(frame, 3, axis=-1)
        else:
            image = frame
        image = pad_columns(image, self._pad)
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=self._fmt)
        self._mux(self._stream.encode(video_frame))

    def _flush(self) -> None:
        """Drain the encoder's delayed frames into the container (the end of the stream)."""
        self._mux(self._stream.encode(), last=True)

    @property
    def decoding(self) -> bool:
        """Whether decoded frames still go to ``decoded_frame_sink``."""
        return self._decoded_sink is not None

    def _mux(self, packets, last: bool = False) -> None:
        for packet in packets:
            if self._decoded_sink is not None:
                self._decode_packet(bytes(packet))
            self._container.mux(packet)
        if last and self._decoded_sink is not None:
            self._decode_packet(None)  # the decoder gives up the frames it holds back

    def _decode_packet(self, data: bytes | None) -> None:
        """Feed one packet's bytes (None: the end) to the in-memory decoder; hand its frames to the sink.

        The decoder sees the same NAL units and parameter sets as a reader of the file (the mp4 muxer
        only re-wraps them), and H.264 decoding is exact, so the frames are the file's frames."""
        import av

        try:
            if self._decoder is None:
                decoder = av.CodecContext.create("h264", "r")  # FFmpeg's decoder, as a reader uses
                if self._stream.codec_context.extradata:  # the parameter sets (mp4: a global header)
                    decoder.extradata = self._stream.codec_context.extradata
                self._decoder = decoder
            for frame in self._decoder.decode(av.Packet(data) if data is not None else None):
                if self._decoded_sink(frame.to_ndarray(format="rgb24")) is False:  # it wants no more
                    self._decoded_sink = self._decoder = None
                    return
        except Exception:  # noqa: BLE001 (work ahead only: the file is not affected)
            self._decoded_sink = self._decoder = None
            log.warning("handing the decoded frames of %s ahead failed", self.path.name, exc_info=True)

    def write(self, frame: np.ndarray) -> None:
        """Encode one uint8 frame (H, W, 3) RGB or (H, W) / (H, W, 1) grey."""
        if self._input_ended:
            raise ValueError(f"{self.path}: write after end_input")
        frame = self._checked(frame)
        if not self.background:
            self._encode(frame)
        else:
            self._raise_encoder_error()
            if self._thread is None:
                self._start_encoder()
            self._queue.put(np.array(frame, copy=True))  # the caller may reuse its buffer
        self.frames_written += 1

    def _start_encoder(self) -> None:
        import queue
        import threading

        self._queue = queue.Queue(maxsize=self.queue_frames)
        self._thread = threading.Thread(target=self._encode_queued, name=f"encode {self.path.name}", daemon=True)
        self._thread.start()

    def _encode_queued(self) -> None:
        """The encoder thread: encode queued frames until None; after an error, only drain the queue."""
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            if frame is _FLUSH:
                if self._error is None and self._container is not None:
                    try:
                        self._flush()
                    except BaseException as error:
                        self._error = error
                return
            if self._error is None:
                try:
                    self._encode(frame)
                except BaseException as error:  # raised again in the caller's thread
                    self._error = error

    def _raise_encoder_error(self) -> None:
        if self._error is not None:
            raise self._error

    def end_input(self) -> None:
        """No more frames: a background writer starts its final flush on its thread and returns at once
        (the block's end then waits for it). Without ``background`` this does nothing until the end."""
        if self.background and not self._input_ended and self._thread is not None:
            self._queue.put(_FLUSH)
        self._input_ended = True

    def _stop_encoder(self) -> None:
        """End the encoder thread and wait for it: after its flush if ``end_input`` came first, else at once
        (the end mark is queued even for a thread still starting: it ends on it)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if not self._input_ended:
            self._queue.put(None)
            self._input_ended = True
        if thread.ident is not None:  # an interrupt (Ctrl-C) can land between creating and starting it
            thread.join()

    def __exit__(self, exc_type, exc, tb):
        flushed_on_thread = self.background and self._thread is not None
        try:
            if exc_type is None:
                self.end_input()
            self._stop_encoder()
            try:
                if exc_type is None:
                    self._raise_encoder_error()
            finally:
                if self._container is not None:
                    try:
                        if exc_type is None and not flushed_on_thread:
                            self._flush()
                    finally:
                        self._container.close()
            if exc_type is None and not self.frames_written:
                raise ValueError(f"no frames were written to {self.path}")
        except BaseException as error:
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        return self._atomic.__exit__(exc_type, exc, tb)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str = "h264",
                crf: int = 16) -> Path:
    """Atomically write uint8 frames (T, H, W, 3) or (T, H, W) to ``path``.

    ``codec`` is ``"h264"`` (lossy, yuv420p, for viewing and for the generator's colour input) or
    ``"ffv1"`` (lossless; use a ``.mkv`` path). Grey (T, H, W) input is written as grey for FFV1 and
    replicated to RGB for H.264. ``frames`` may also be a :class:`~ex4d.io.arrays.FrameSequence`
    (written frame by frame); see :class:`VideoWriter` to write frames as they are made.
    """
    from ex4d.io.arrays import FrameSequence

    if not isinstance(frames, FrameSequence):
        frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"write_video expects uint8 frames, got {frames.dtype}")
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] not in (1, 3)) or len(frames) == 0:
        raise ValueError(f"frames must be (T,H,W,3) or (T,H,W), got {frames.shape}")
    if codec not in ("h264", "ffv1"):
        raise ValueError(f"unknown codec {codec!r}; use 'h264' or 'ffv1'")
    path = Path(path)
    with VideoWriter(path, fps, codec=codec, crf=crf) as writer:
        for frame in (frames if isinstance(frames, FrameSequence) else iter(frames)):
            writer.write(frame)
    return path


def read_mask_video(path: str | os.PathLike) -> np.ndarray:
    """Read a mask video as bool (T, H, W): exact for FFV1, thresholded at 0.5 for lossy files."""
    import av

    path = require_file(path, "mask video")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            threaded_decoding(stream)
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
    """float [0, 1] -> uint8, rounded (the reference truncated; rounding is the documented fix).

    float32/float64 arrays convert in torch: the same IEEE operations in the input's precision
    (multiply, round half to even, clip, cast), so the same bytes, on all of torch's CPU threads
    (a 512x512 frame in 1.0 ms instead of 2.9 ms on 2 cores; recon converts every frame on its main
    thread). Other dtypes convert in numpy.
    """
    array = np.asarray(frames01)
    if array.dtype == np.float32 or array.dtype == np.float64:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
