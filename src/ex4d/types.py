"""Small dataclasses passed between stages, each with save/load.

Conventions (frames, units, shapes) are those of :mod:`ex4d.conventions`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ex4d.conventions import (
    as_intrinsics_per_frame,
    opencv_to_opengl_extrinsics,
)
from ex4d.errors import InputError
from ex4d.io.files import atomic_path


class Clip:
    """Source video frames.

    frames: float32 (T, H, W, 3) RGB in [0, 1]. fps: source frame rate. source: where it came from.

    A clip made by :func:`ex4d.pipeline.load_clip` is *lazy*: it knows its frame count and size but
    decodes frames only when asked. :meth:`iter_frames` yields them one at a time (what the
    reconstruction stage uses, so that memory does not grow with T); the ``frames`` property decodes
    the whole clip into one array each time it is read (estimators that need it all).
    """

    def __init__(self, frames: np.ndarray | None = None, fps: float = 30.0, source: str = "", *,
                 reader=None, num_frames: int | None = None, size: tuple[int, int] | None = None,
                 identity: dict | None = None):
        if frames is None and reader is None:
            raise TypeError("Clip needs frames or a reader")
        self._frames = frames
        self._reader = reader  # callable -> iterator of float32 (H, W, 3) frames, in order
        self.fps = fps
        self.source = source
        if frames is not None:
            num_frames, size = int(frames.shape[0]), (int(frames.shape[1]), int(frames.shape[2]))
        self._num_frames = int(num_frames)
        self._size = (int(size[0]), int(size[1]))
        self._identity = identity

    def __repr__(self) -> str:
        return (f"Clip({self.num_frames} frames, {self.size[0]}x{self.size[1]}, fps={self.fps}, "
                f"source={self.source!r}{', lazy' if self._frames is None else ''})")

    @property
    def frames(self) -> np.ndarray:
        """float32 (T, H, W, 3): the whole clip (decoded on each access for a lazy clip)."""
        if self._frames is not None:
            return self._frames
        out = np.empty((self.num_frames, *self.size, 3), dtype=np.float32)
        for k, frame in enumerate(self.iter_frames()):
            out[k] = frame
        return out

    @frames.setter
    def frames(self, value: np.ndarray) -> None:
        self._frames = value
        self._num_frames = int(value.shape[0])
        self._size = (int(value.shape[1]), int(value.shape[2]))

    @property
    def is_lazy(self) -> bool:
        return self._frames is None

    def iter_frames(self) -> Iterator[np.ndarray]:
        """Frames in order, float32 (H, W, 3) in [0, 1], one at a time."""
        if self._frames is not None:
            yield from self._frames
            return
        count = 0
        for frame in self._reader():
            if count == self._num_frames:
                break
            yield frame
            count += 1
        if count < self._num_frames:
            raise InputError(f"{self.source}: the video ended after {count} of {self._num_frames} frames while "
                             f"reading it again (was it replaced while ex4d ran?)")

    def identity(self) -> str:
        """What the frames are, for skip-if-unchanged checks: sha1 of an in-memory clip's frames, or
        of the source file's fingerprint and the decoding settings for a lazy clip."""
        if self._frames is not None or self._identity is None:
            from ex4d.io.arrays import frames_sha1

            return frames_sha1(self.frames if self._frames is None else self._frames)
        return "video:" + hashlib.sha1(json.dumps(self._identity, sort_keys=True).encode()).hexdigest()

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return self._size


@dataclass
class DepthVideo:
    """Per-frame z-depth from an estimator or a file.

    depth: float32 (T, H, W) z-depth, > 0. valid: bool (T, H, W). K: (3, 3) intrinsics if the
    estimator gives them, else None (the reference's f = 500 is used downstream).
    estimator: name; settings: JSON-serialisable dict of what produced it.

    ``depth`` and ``valid`` are numpy arrays or, for long videos read from files,
    :class:`~ex4d.io.arrays.FrameSequence` objects read one frame at a time (``np.asarray`` loads them).
    """

    depth: np.ndarray
    valid: np.ndarray
    K: np.ndarray | None = None
    estimator: str = "file"
    settings: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write ``depth.npz`` with keys depth, valid, K (or empty), estimator, settings.

        The archive is *uncompressed* and written frame by frame, so that it can be written and read
        back one frame at a time whatever the frame count (:meth:`load`); ``np.load`` reads it as usual.
        """
        from ex4d.io.arrays import FrameSequence, MappedFrames, write_npz_stored

        def frames_of(array, dtype):
            if isinstance(array, FrameSequence):
                return MappedFrames(len(array), array.frame_shape, dtype,
                                    lambda k: np.asarray(array[k]).astype(dtype, copy=False))
            return np.asarray(array).astype(dtype, copy=False)

        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                write_npz_stored(handle, {
                    "depth": frames_of(self.depth, np.float32),
                    "valid": frames_of(self.valid, bool),
                    "K": np.zeros((0, 3)) if self.K is None else np.asarray(self.K, dtype=np.float64),
                    "estimator": np.array(self.estimator),
                    "settings": np.array(json.dumps(self.settings, sort_keys=True)),
                })
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DepthVideo":
        """Open a ``depth.npz`` written by :meth:`save` (any version) with depth/valid read lazily.

        Raises ValueError / OSError / KeyError for an unreadable file (callers decide what that means).
        """
        from ex4d.io.arrays import NpyFrames, npz_members, read_npz_small

        keys = set(npz_members(path))
        depth = NpyFrames(path, "depth")
        valid = NpyFrames(path, "valid") if "valid" in keys else None
        if valid is None:
            from ex4d.io.arrays import MappedFrames

            valid = MappedFrames(len(depth), depth.frame_shape, bool, lambda k: np.ones(depth.frame_shape, bool))
        K = read_npz_small(path, "K") if "K" in keys else np.zeros((0, 3))
        estimator = str(read_npz_small(path, "estimator")) if "estimator" in keys else "file"
        settings = json.loads(str(read_npz_small(path, "settings"))) if "settings" in keys else {}
        return cls(depth=depth, valid=valid, K=K if K.size else None, estimator=estimator, settings=settings)


@dataclass
class Trajectory:
    """A target camera path.

    cam_from_world: float64 (T, 4, 4), OpenCV, world = source camera of frame 0.
    K: float64 (T, 3, 3) pixel intrinsics for the target views (constant unless dolly-zoom).
    name: short label used in file names (``camera_<name>.npz``).
    """

    cam_from_world: np.ndarray
    K: np.ndarray
    name: str = "custom"
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cam_from_world = np.asarray(self.cam_from_world, dtype=np.float64)
        if self.cam_from_world.ndim != 3 or self.cam_from_world.shape[1:] != (4, 4):
            raise InputError(f"cam_from_world must be (T,4,4), got {self.cam_from_world.shape}")
        self.K = as_intrinsics_per_frame(self.K, len(self.cam_from_world))

    @property
    def num_frames(self) -> int:
        return int(self.cam_from_world.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``camera_<name>.npz``.

        Keys: ``cam_from_world`` (T,4,4) OpenCV, ``K`` (T,3,3), plus the reference's own keys
        ``extrinsics`` (T,4,4) float32 in its OpenGL-flipped form and ``intrinsics`` (3,3) float32
        (frame 0's K) so that the reference's tools read our files.
        """
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    cam_from_world=self.cam_from_world,
                    K=self.K,
                    extrinsics=opencv_to_opengl_extrinsics(self.cam_from_world).astype(np.float32),
                    intrinsics=self.K[0].astype(np.float32),
                    name=np.array(self.name),
                    settings=np.array(json.dumps(self.settings, sort_keys=True)),
                )
        return path


@dataclass
class Condition:
    """What the reconstruction stage hands to the generator.

    color: float32 (T, H, W, 3) in [0, 1], already multiplied by the mask.
    mask: bool (T, H, W), True where the target view saw observed content; frame 0 all True.
    fps: frame rate to write at. name: trajectory name used in file names.
    """

    color: np.ndarray
    mask: np.ndarray
    fps: float
    name: str = "custom"
    settings: dict = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``color_<name>.mp4`` (H.264), ``mask_<name>.mp4`` (H.264, for viewing) and
        ``mask_<name>.mkv`` (FFV1, lossless, what the generator reads). Returns the paths."""
        with ConditionWriter(out_dir, self.name, self.fps) as writer:
            for color, mask in zip(self.color, self.mask):
                writer.write(color, mask)
        return writer.paths


class ConditionWriter:
    """Encode a condition frame by frame as it is rendered (the files of :meth:`Condition.save`).

    with ConditionWriter(out_dir, name, fps) as writer:
        writer.write(color, mask)   # float32 (H, W, 3) in [0, 1] (already masked), bool (H, W)

    The three videos appear only when the block succeeds; ``paths`` maps roles to them. (The lossless
    ``.mkv`` is the exact mask; the ``.mp4`` mask is H.264, lossy, for viewing.)
    ``frame_sink(index, colour, mask)``: gets each frame of the condition as a reader of the files
    will decode it, while later frames still render: colour (H, W, 3) uint8 decoded from the colour
    encoder's own packets (``VideoWriter(decoded_frame_sink=)``), mask (H, W) bool as the lossless
    mask holds it; in order, on the colour encoder's thread. It returns False once it wants no more
    frames (then nothing more is decoded or kept for it).
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, fps: float, frame_sink=None):
        import threading

        from ex4d.io import video as video_io

        out_dir = Path(out_dir)
        self.paths = {"color": out_dir / f"color_{name}.mp4", "mask": out_dir / f"mask_{name}.mp4",
                      "mask_lossless": out_dir / f"mask_{name}.mkv"}
        # Each video encodes on its own thread, so the three encode at once and while the next frame
        # renders (on a GPU, recon's encoding took as long as its rendering). A short look-ahead, so
        # that little is left to encode once the last frame is rendered (CONDITION_H264_LOOKAHEAD).
        h264 = dict(background=True, lookahead=video_io.CONDITION_H264_LOOKAHEAD)
        self._frame_sink = frame_sink
        self._masks: dict[int, np.ndarray] = {}  # masks written, until their colour frame is decoded
        self._lock = threading.Lock()
        self._written = self._decoded = 0
        self._writers = {"color": video_io.VideoWriter(self.paths["color"], fps, **h264,
                                                       decoded_frame_sink=self._pair if frame_sink else None),
                         "mask": video_io.VideoWriter(self.paths["mask"], fps, **h264),
                         "mask_lossless": video_io.VideoWriter(self.paths["mask_lossless"], fps, codec="ffv1",
                                                               background=True)}
        self._stack = None

    def __enter__(self) -> "ConditionWriter":
        import contextlib

        self._stack = contextlib.ExitStack()
        try:
            for writer in self._writers.values():
                self._stack.enter_context(writer)
        except BaseException:
            self._stack.close()
            raise
        return self

    def write(self, color: np.ndarray, mask: np.ndarray) -> None:
        from ex4d.io.video import to_uint8

        mask = np.asarray(mask)
        # bool -> 0/255 in one pass (a bool array viewed as uint8 is its 0/1 values)
        mask_u8 = np.multiply(mask.view(np.uint8), 255, dtype=np.uint8) if mask.dtype == bool else \
            mask.astype(np.uint8) * 255
        if self._frame_sink is not None:
            with self._lock:  # before the colour goes in: its decoded frame comes out later
                if self._writers["color"].decoding:
                    self._masks[self._written] = mask_u8 > 127
                else:  # the hand-over ended: keep no masks for it
                    self._masks.clear()
                self._written += 1
        self._writers["color"].write(to_uint8(color))
        self._writers["mask"].write(mask_u8)
        self._writers["mask_lossless"].write(mask_u8)

    def _pair(self, colour: np.ndarray):
        """The colour encoder's next decoded frame, with the mask written with it, to the frame sink."""
        with self._lock:
            index = self._decoded
            mask = self._masks.pop(index)
            self._decoded += 1
        return self._frame_sink(index, colour, mask)

    def __exit__(self, *exc):
        if exc[0] is None:
            for writer in self._writers.values():  # the three flush at once, each on its own thread
                writer.end_input()
        return self._stack.__exit__(*exc)
