"""Depth videos from files: ``.npz`` / ``.npy`` holding z-depth or relative disparity.

Accepted layouts (documented in docs/depth.md):

- ``.npy``: one array (T, H, W) or (T, 1, H, W); z-depth unless ``kind="disparity"``.
- ``.npz``: key ``depth`` = z-depth, or key ``disparity`` = relative disparity (larger = nearer);
  optional ``valid`` (same shape, bool) and ``K`` ((3, 3) pixel intrinsics; an empty (0, 3) array
  means "none"). The ``depth.npz`` written by :meth:`ex4d.types.DepthVideo.save` (keys depth,
  valid, K, estimator, settings) is one of these and loads back with its K, estimator and settings.
  A single unnamed array (``arr_0``) is read like a ``.npy``.

Disparity is converted with the reference normalisation (:mod:`ex4d.depth.normalize`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ex4d.depth.normalize import disparity_to_depth, resize_depth, resize_mask, scale_intrinsics
from ex4d.errors import InputError
from ex4d.io.files import require_file
from ex4d.types import DepthVideo

log = logging.getLogger(__name__)

KINDS = ("auto", "depth", "disparity")


def _as_video(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    """(T, H, W) or (T, 1, H, W) -> (T, H, W); anything else is an InputError."""
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise InputError(f"{path}: '{key}' has shape {tuple(array.shape)}; expected (T, H, W) or (T, 1, H, W) "
                         f"(save one map per frame, frames first)")
    if array.shape[0] == 0 or array.shape[1] < 2 or array.shape[2] < 2:
        raise InputError(f"{path}: '{key}' has shape {tuple(array.shape)}; it needs at least 1 frame of 2x2 pixels")
    numeric = np.issubdtype(array.dtype, np.number) or array.dtype == bool
    if not numeric or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{path}: '{key}' has dtype {array.dtype}; expected a real number array")
    return array


def _check_finite(array: np.ndarray, path: Path, key: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        frame = int(np.argwhere(bad)[0][0])
        kind = "NaN" if np.isnan(array).any() else "inf"
        raise InputError(f"{path}: '{key}' contains {int(bad.sum())} {kind}/non-finite values (first in frame "
                         f"{frame}); fill or mask them before saving (e.g. np.nan_to_num or a 'valid' mask)")


def _read(path: Path, kind: str) -> tuple[np.ndarray, str, dict]:
    """Return (array, kind, extras) where kind is 'depth' or 'disparity'."""
    extras: dict = {}
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for bad files
        raise InputError(f"cannot read depth file {path}: {exc} (expected a .npz or .npy written by numpy)") from None
    if isinstance(loaded, np.ndarray):
        return loaded, ("disparity" if kind == "disparity" else "depth"), extras
    with loaded as data:
        keys = set(data.files)
        if kind != "disparity" and "depth" in keys:
            key, found = "depth", "depth"
        elif kind != "depth" and "disparity" in keys:
            key, found = "disparity", "disparity"
        elif keys == {"arr_0"}:
            key, found = "arr_0", ("disparity" if kind == "disparity" else "depth")
        else:
            wanted = {"auto": "'depth' or 'disparity'", "depth": "'depth'", "disparity": "'disparity'"}[kind]
            raise InputError(f"{path}: no {wanted} array (found keys: {', '.join(sorted(keys)) or 'none'}); "
                             f"save z-depth as np.savez(path, depth=...) or disparity as disparity=...")
        try:
            array = data[key]
            if "valid" in keys:
                extras["valid"] = data["valid"]
            if "K" in keys:
                extras["K"] = data["K"]
            if "estimator" in keys:
                extras["estimator"] = str(data["estimator"])
            if "settings" in keys:
                try:
                    extras["settings"] = json.loads(str(data["settings"]))
                except json.JSONDecodeError:
                    extras["settings"] = {}
        except ValueError as exc:  # object arrays need pickle, which is refused for safety
            raise InputError(f"{path}: {exc} (save plain numeric arrays; pickled objects are not loaded)") from None
    return array, found, extras


def load_depth_file(path: str | os.PathLike, *, num_frames: int, size: tuple[int, int],
                    kind: str = "auto") -> DepthVideo:
    """Load a depth video file, check it and fit it to ``num_frames`` x ``size``.

    path: ``.npz`` or ``.npy`` (layouts in the module docstring). num_frames: frames needed; a file
    with fewer is an error, extra frames are dropped from the end. size: (H, W) of the clip; depth is
    resized bilinearly, ``valid`` by nearest neighbour, K scaled. kind: "auto" (npz key decides;
    .npy = z-depth), "depth" or "disparity".
    Returns a :class:`DepthVideo` with depth float32 (T, H, W) > 0 and valid bool (T, H, W).
    Raises :class:`InputError` (one line: what, where, how to fix) for a missing/unreadable file,
    wrong rank, too few frames, NaN/inf, or non-positive z-depth.
    """
    if kind not in KINDS:
        raise InputError(f"unknown depth kind {kind!r}; use one of {', '.join(KINDS)}")
    path = require_file(path, "depth file")
    if path.suffix.lower() not in (".npz", ".npy"):
        raise InputError(f"depth file must be .npz or .npy, got {path.name} (see docs/depth.md)")
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    array, found, extras = _read(path, kind)
    array = _as_video(array, path, found)
    if array.shape[0] < num_frames:
        raise InputError(f"{path}: has {array.shape[0]} frames but {num_frames} are needed "
                         f"(use --num-frames {array.shape[0]} or a longer depth file)")
    array = np.asarray(array[:num_frames], dtype=np.float32)
    file_size = tuple(int(s) for s in array.shape[1:])

    valid = extras.get("valid")
    if valid is not None:
        valid = _as_video(np.asarray(valid), path, "valid")
        if valid.shape[0] < num_frames or valid.shape[1:] != file_size:
            raise InputError(f"{path}: 'valid' has shape {valid.shape} but '{found}' has "
                             f"{(array.shape[0], *file_size)}; they must match")
        valid = np.asarray(valid[:num_frames]).astype(bool)
        if not valid.any():
            raise InputError(f"{path}: 'valid' is False everywhere; no depth to use")
    else:
        valid = np.ones(array.shape, dtype=bool)
    # values under valid=False are ignored (they may be NaN); they get the far end of the valid range
    _check_finite(np.where(valid, array, np.float32(1.0)), path, found)

    if found == "disparity":
        filled = np.where(valid, array, array[valid].min())
        depth = disparity_to_depth(filled, where=f"{path}: 'disparity'")
    else:
        bad = (array <= 0) & valid
        if bad.any():
            frame = int(np.argwhere(bad)[0][0])
            raise InputError(f"{path}: 'depth' has {int(bad.sum())} values <= 0 (first in frame {frame}); z-depth "
                             f"must be positive (mark holes in a 'valid' array, or save disparity= instead)")
        depth = np.where(valid, array, array[valid].max()).astype(np.float32)

    K = extras.get("K")
    if K is not None:
        K = np.asarray(K, dtype=np.float64)
        if K.size == 0:
            K = None
        elif K.shape != (3, 3) or not np.isfinite(K).all():
            raise InputError(f"{path}: 'K' has shape {K.shape}; expected (3, 3) pixel intrinsics or an empty array")
    size = (int(size[0]), int(size[1]))
    if file_size != size:
        log.info("resizing depth from %s to %s", file_size, size)
        depth = resize_depth(depth, size)
        valid = resize_mask(valid, size)
        if K is not None:
            K = scale_intrinsics(K, file_size, size)
    settings = dict(extras.get("settings") or {})
    settings.update({"file": str(path.resolve()), "kind": found, "file_size": list(file_size)})
    estimator = extras.get("estimator") or "file"
    return DepthVideo(depth=depth, valid=valid, K=K, estimator=estimator, settings=settings)


class FileDepth:
    """A :class:`~ex4d.depth.DepthEstimator` that reads a depth file instead of estimating.

    The clip's frame count and size are taken from the frames passed to :meth:`estimate`.
    """

    name = "file"

    def __init__(self, path: str | os.PathLike, *, kind: str = "auto", **_ignored):
        self.path = Path(path)
        self.kind = kind

    def estimate(self, frames: np.ndarray) -> DepthVideo:
        """frames: (T, H, W, 3) -> DepthVideo (T, H, W) read from the file and fitted to the frames."""
        frames = np.asarray(frames)
        return load_depth_file(self.path, num_frames=int(frames.shape[0]), size=tuple(frames.shape[1:3]),
                               kind=self.kind)
