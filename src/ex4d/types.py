"""Small dataclasses passed between stages, each with save/load.

Conventions (frames, units, shapes) are those of :mod:`ex4d.conventions`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ex4d.conventions import (
    as_intrinsics_per_frame,
    opencv_to_opengl_extrinsics,
)
from ex4d.errors import InputError
from ex4d.io.files import atomic_path


@dataclass
class Clip:
    """Source video frames.

    frames: float32 (T, H, W, 3) RGB in [0, 1]. fps: source frame rate. source: where it came from.
    """

    frames: np.ndarray
    fps: float
    source: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


@dataclass
class DepthVideo:
    """Per-frame z-depth from an estimator or a file.

    depth: float32 (T, H, W) z-depth, > 0. valid: bool (T, H, W). K: (3, 3) intrinsics if the
    estimator gives them, else None (the reference's f = 500 is used downstream).
    estimator: name; settings: JSON-serialisable dict of what produced it.
    """

    depth: np.ndarray
    valid: np.ndarray
    K: np.ndarray | None = None
    estimator: str = "file"
    settings: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write ``depth.npz`` with keys depth, valid, K (or empty), estimator, settings."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle,
                    depth=self.depth.astype(np.float32),
                    valid=self.valid.astype(bool),
                    K=np.zeros((0, 3)) if self.K is None else np.asarray(self.K, dtype=np.float64),
                    estimator=np.array(self.estimator),
                    settings=np.array(json.dumps(self.settings, sort_keys=True)),
                )
        return path


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
        from ex4d.io.video import to_uint8, write_video

        out_dir = Path(out_dir)
        mask_u8 = self.mask.astype(np.uint8) * 255
        return {
            "color": write_video(out_dir / f"color_{self.name}.mp4", to_uint8(self.color), self.fps),
            "mask": write_video(out_dir / f"mask_{self.name}.mp4", mask_u8, self.fps),
            "mask_lossless": write_video(out_dir / f"mask_{self.name}.mkv", mask_u8, self.fps, codec="ffv1"),
        }
