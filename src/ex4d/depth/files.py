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

from ex4d.depth.normalize import normalized_disparity_to_depth, resize_depth, resize_mask, scale_intrinsics
from ex4d.errors import InputError
from ex4d.io.files import require_file
from ex4d.types import DepthVideo

log = logging.getLogger(__name__)

KINDS = ("auto", "depth", "disparity")


#: Accepted z-depth values (scene units): the reference's own clip range (ex4d-spec.md section 3.2),
#: i.e. the renderer's near/far planes (1e-3, 1e3) widened ten times on each side. Outside it a value
#: is either clipped away by the renderer or overflows float32 geometry (1e30 squared is inf).
DEPTH_RANGE = (1e-4, 1e4)
# compared in float32, the depth's precision (float32(1e-4) is just below 1e-4)
_LOW, _HIGH = float(np.float32(DEPTH_RANGE[0])), float(np.float32(DEPTH_RANGE[1]))


def _as_video(array, path: Path, key: str):
    """(T, H, W) or (T, 1, H, W) -> (T, H, W) (frames read lazily); anything else is an InputError."""
    from ex4d.io.arrays import MappedFrames

    shape = tuple(array.shape)
    if len(shape) == 4 and shape[1] == 1:
        source = array
        array = MappedFrames(shape[0], (shape[2], shape[3]), array.dtype, lambda k: source[k][0])
        shape = tuple(array.shape)
    if len(shape) != 3:
        raise InputError(f"{path}: '{key}' has shape {shape}; expected (T, H, W) or (T, 1, H, W) "
                         f"(save one map per frame, frames first)")
    if shape[0] == 0 or shape[1] < 2 or shape[2] < 2:
        raise InputError(f"{path}: '{key}' has shape {shape}; it needs at least 1 frame of 2x2 pixels")
    dtype = np.dtype(array.dtype)
    numeric = np.issubdtype(dtype, np.number) or dtype == bool
    if not numeric or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"{path}: '{key}' has dtype {dtype}; expected a real number array")
    return array


def _open(path: Path, kind: str):
    """Open the array to use without reading it: (frames, kind found, extras)."""
    import zipfile

    from ex4d.io.arrays import NpyFrames, npz_members, read_npz_small

    extras: dict = {}

    def cannot_read(exc) -> InputError:
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        return InputError(f"cannot read depth file {path}: {text} (expected a .npz or .npy written by numpy)")

    def frames(key):
        try:
            return NpyFrames(path, key)
        except ValueError as exc:
            if "pickle" in str(exc) or "objects" in str(exc):
                raise InputError(f"{path}: {exc} (save plain numeric arrays; pickled objects are not loaded)") from None
            raise cannot_read(exc) from None
        except (OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
            raise cannot_read(exc) from None

    if path.suffix.lower() == ".npy" and not zipfile.is_zipfile(path):
        return frames(None), ("disparity" if kind == "disparity" else "depth"), extras
    try:
        keys = set(npz_members(path))
    except (OSError, zipfile.BadZipFile) as exc:
        raise cannot_read(exc) from None
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
    array = frames(key)
    try:
        if "valid" in keys:
            extras["valid"] = frames("valid")
        if "K" in keys:
            extras["K"] = read_npz_small(path, "K")
        if "estimator" in keys:
            extras["estimator"] = str(read_npz_small(path, "estimator"))
        if "settings" in keys:
            try:
                extras["settings"] = json.loads(str(read_npz_small(path, "settings")))
            except json.JSONDecodeError:
                extras["settings"] = {}
    except ValueError as exc:  # object arrays need pickle, which is refused for safety
        raise InputError(f"{path}: {exc} (save plain numeric arrays; pickled objects are not loaded)") from None
    return array, found, extras


class DepthFile:
    """A depth file opened, checked and fitted to ``num_frames`` x ``size``, read one frame at a time.

    Opening reads the file once, frame by frame (never all of it at once), to check every value and
    to find the clip-wide numbers the conversion needs (the fill value of masked pixels; the
    disparity range). ``depth`` and ``valid`` are then :class:`~ex4d.io.arrays.FrameSequence` objects
    whose frames are converted and resized when read: ``depth[k]`` equals frame k of
    :func:`load_depth_file`'s array. Arguments and errors: see :func:`load_depth_file`.

    Chunk-friendly layouts (docs/depth.md): an uncompressed ``.npy`` or ``np.savez`` archive (and every
    ``depth.npz`` ex4d writes) is read at random; a compressed ``.npz`` is decompressed as a stream.
    """

    def __init__(self, path: str | os.PathLike, *, num_frames: int, size: tuple[int, int], kind: str = "auto"):
        from ex4d.io.arrays import MappedFrames

        if kind not in KINDS:
            raise InputError(f"unknown depth kind {kind!r}; use one of {', '.join(KINDS)}")
        path = require_file(path, "depth file")
        if path.suffix.lower() not in (".npz", ".npy"):
            raise InputError(f"depth file must be .npz or .npy, got {path.name} (see docs/depth.md)")
        if num_frames < 1:
            raise InputError(f"num_frames must be >= 1, got {num_frames}")
        raw, found, extras = _open(path, kind)
        raw = _as_video(raw, path, found)
        if raw.shape[0] < num_frames:
            raise InputError(f"{path}: has {raw.shape[0]} frames but {num_frames} are needed "
                             f"(use --num-frames {max(1, (raw.shape[0] - 1) // 4 * 4 + 1)}, 4k+1 as generation "
                             f"needs, or a longer depth file)")
        file_size = tuple(int(s) for s in raw.shape[1:])
        raw_valid = extras.get("valid")
        if raw_valid is not None:
            raw_valid = _as_video(raw_valid, path, "valid")
            if raw_valid.shape[0] < num_frames or tuple(raw_valid.shape[1:]) != file_size:
                raise InputError(f"{path}: 'valid' has shape {tuple(raw_valid.shape)} but '{found}' has "
                                 f"{(raw.shape[0], *file_size)}; they must match")
        self.path, self.kind, self.num_frames, self.file_size = path, found, int(num_frames), file_size
        self._raw, self._raw_valid = raw, raw_valid
        try:
            self._scan()
        except InputError:
            raise
        except ValueError as exc:  # a truncated file
            raise InputError(f"cannot read depth file {path}: {exc} (is the file complete?)") from None

        K = extras.get("K")
        if K is not None:
            K = np.asarray(K, dtype=np.float64)
            if K.size == 0:
                K = None
            elif K.shape != (3, 3) or not np.isfinite(K).all():
                raise InputError(f"{path}: 'K' has shape {K.shape}; expected (3, 3) pixel intrinsics or an empty array")
        self.size = (int(size[0]), int(size[1]))
        if file_size != self.size:
            log.info("resizing depth from %s to %s", file_size, self.size)
            if K is not None:
                K = scale_intrinsics(K, file_size, self.size)
        self.K = K
        settings = dict(extras.get("settings") or {})
        settings.update({"file": str(path.resolve()), "kind": found, "file_size": list(file_size)})
        self.settings = settings
        self.estimator = extras.get("estimator") or "file"
        self.depth = MappedFrames(self.num_frames, self.size, np.float32, self._depth_frame)
        self.valid = MappedFrames(self.num_frames, self.size, bool, self._valid_frame)

    # -- the checking pass ------------------------------------------------------------------------
    def _frame_pair(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        array = np.asarray(self._raw[k], dtype=np.float32)
        valid = None if self._raw_valid is None else np.asarray(self._raw_valid[k]).astype(bool)
        return array, valid

    def _scan(self) -> None:
        from ex4d.conventions import REFERENCE_FAR, REFERENCE_NEAR

        path, found = self.path, self.kind
        nonfinite = nonpositive = 0
        nonfinite_first = nonpositive_first = None
        has_nan = any_valid = False
        lo, hi = np.inf, -np.inf
        out_of_range = empty = None  # (frame, min, max) of the first such frame
        for k in range(self.num_frames):
            array, valid = self._frame_pair(k)
            # values under valid=False are ignored (they may be NaN)
            checked = array if valid is None else np.where(valid, array, np.float32(1.0))
            bad = ~np.isfinite(checked)
            if bad.any():
                nonfinite += int(bad.sum())
                nonfinite_first = k if nonfinite_first is None else nonfinite_first
                has_nan = has_nan or bool(np.isnan(checked).any())
                continue
            values = array if valid is None else array[valid]
            if not values.size:
                continue
            any_valid = True
            frame_lo, frame_hi = float(values.min()), float(values.max())
            lo, hi = min(lo, frame_lo), max(hi, frame_hi)
            if found == "depth":
                count = int((values <= 0).sum())
                if count:
                    nonpositive += count
                    nonpositive_first = k if nonpositive_first is None else nonpositive_first
                    continue
                if out_of_range is None and not (_LOW <= frame_lo and frame_hi <= _HIGH):
                    out_of_range = (k, frame_lo, frame_hi)
                if empty is None and not ((values >= np.float32(REFERENCE_NEAR)) &
                                          (values <= np.float32(REFERENCE_FAR))).any():
                    empty = (k, frame_lo, frame_hi)
        if self._raw_valid is not None and not any_valid and not nonfinite:
            raise InputError(f"{path}: 'valid' is False everywhere; no depth to use")
        if nonfinite:
            kind = "NaN" if has_nan else "inf"
            raise InputError(f"{path}: '{found}' contains {nonfinite} {kind}/non-finite values (first in frame "
                             f"{nonfinite_first}); fill or mask them before saving (e.g. np.nan_to_num or a "
                             f"'valid' mask)")
        if nonpositive:
            raise InputError(f"{path}: 'depth' has {nonpositive} values <= 0 (first in frame {nonpositive_first}); "
                             f"z-depth must be positive (mark holes in a 'valid' array, or save disparity= instead)")
        if out_of_range is not None:
            k, a, b = out_of_range
            raise InputError(f"{path}: 'depth' has values outside [{DEPTH_RANGE[0]:g}, {DEPTH_RANGE[1]:g}] (frame {k} "
                             f"spans {a:.3g} .. {b:.3g}), which render nothing; save z-depth in scene units such "
                             f"as metres, mark unknown pixels in a 'valid' array, or save disparity= instead")
        if empty is not None:
            k, a, b = empty
            raise InputError(f"{path}: frame {k} has no depth within the renderer's range [{REFERENCE_NEAR:g}, "
                             f"{REFERENCE_FAR:g}] (it spans {a:.3g} .. {b:.3g}), so it would render an empty "
                             f"frame; rescale the depth (e.g. metres, not millimetres)")
        self._lo, self._hi = lo, hi
        if found == "disparity" and not hi > lo:
            raise InputError(f"{path}: 'disparity' is constant ({lo}) over the whole clip, so no depth can be "
                             f"derived from it (check the file or the estimator output)")

    # -- converted frames -------------------------------------------------------------------------
    def _depth_frame(self, k: int) -> np.ndarray:
        array, valid = self._frame_pair(k)
        if self.kind == "disparity":
            # = disparity_to_depth over the whole clip (masked pixels take the smallest disparity):
            # the same float32 operations in the same order, with the clip-wide min and max.
            filled = array if valid is None else np.where(valid, array, np.float32(self._lo))
            lo, hi = self._lo, self._hi
            d_hat = ((filled - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
            depth = normalized_disparity_to_depth(d_hat)
        else:
            depth = array if valid is None else np.where(valid, array, np.float32(self._hi)).astype(np.float32)
        if self.file_size != self.size:
            depth = resize_depth(depth[None], self.size)[0]
        return depth

    def _valid_frame(self, k: int) -> np.ndarray:
        if self._raw_valid is None:
            return np.ones(self.size, dtype=bool)
        valid = np.asarray(self._raw_valid[k]).astype(bool)
        return resize_mask(valid[None], self.size)[0] if self.file_size != self.size else valid

    def video(self) -> DepthVideo:
        """A :class:`DepthVideo` whose depth and valid frames are read from the file when used."""
        return DepthVideo(depth=self.depth, valid=self.valid, K=self.K, estimator=self.estimator,
                          settings=dict(self.settings))


def load_depth_file(path: str | os.PathLike, *, num_frames: int, size: tuple[int, int],
                    kind: str = "auto") -> DepthVideo:
    """Load a depth video file, check it and fit it to ``num_frames`` x ``size``.

    path: ``.npz`` or ``.npy`` (layouts in the module docstring). num_frames: frames needed; a file
    with fewer is an error, extra frames are dropped from the end. size: (H, W) of the clip; depth is
    resized bilinearly, ``valid`` by nearest neighbour, K scaled. kind: "auto" (npz key decides;
    .npy = z-depth), "depth" or "disparity".
    Returns a :class:`DepthVideo` with depth float32 (T, H, W) > 0 and valid bool (T, H, W), in memory;
    :class:`DepthFile` gives the same frames one at a time.
    Raises :class:`InputError` (one line: what, where, how to fix) for a missing/unreadable file,
    wrong rank, too few frames, NaN/inf, non-positive z-depth, or z-depth outside
    :data:`DEPTH_RANGE` or wholly outside the renderer's range in some frame.
    """
    opened = DepthFile(path, num_frames=num_frames, size=size, kind=kind)
    return DepthVideo(depth=np.asarray(opened.depth), valid=np.asarray(opened.valid), K=opened.K,
                      estimator=opened.estimator, settings=opened.settings)


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
