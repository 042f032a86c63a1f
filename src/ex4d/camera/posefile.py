"""Camera paths from files: our ``.npz``, the reference's ``camera_<cam>.npz``, and JSON keyframes.

Formats (full description for users in ``docs/trajectories.md``):

* ``.npz`` with ``cam_from_world`` (T, 4, 4) OpenCV and optionally ``K`` (3, 3) or (T, 3, 3). Files
  written by :meth:`ex4d.types.Trajectory.save` are of this kind (they also carry the reference's
  keys; ``cam_from_world`` is preferred when present).
* The reference's ``.npz`` with ``extrinsics`` (T, 4, 4), world -> OpenGL camera, and ``intrinsics``
  (3, 3): ``cam_from_world = diag(1, -1, -1, 1) @ extrinsics``.
* ``.json`` keyframes, interpolated over the clip (SLERP for rotations, linear for camera centres,
  orbit keyframes along true arcs, linear focal lengths).

Files without intrinsics use the source camera's K. ``.npz`` files are read with
``allow_pickle=False``: they cannot run code.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ex4d.camera.interpolate import (
    interpolate_linear,
    interpolate_poses,
    resample_path,
)
from ex4d.camera.poses import check_cam_from_world, check_intrinsics, look_at
from ex4d.camera.presets import MAX_ORBIT_PITCH, orbit_eye
from ex4d.conventions import OPENCV_TO_OPENGL
from ex4d.errors import InputError
from ex4d.io.files import require_file

logger = logging.getLogger(__name__)

POSE_FILE_SUFFIXES = (".npz", ".json")
#: Largest pose file read (a JSON keyframe file or npz of 10,000 poses is far smaller).
MAX_POSE_FILE_BYTES = 64 * 1024 * 1024
TIME_UNITS = ("normalized", "frame")
_KEYFRAME_KEYS = {"time", "position", "look_at", "look_dir", "yaw", "pitch", "radius", "cam_from_world", "focal"}
_FILE_KEYS = {"keyframes", "time_unit", "pivot", "name"}
#: Orbit radii accepted in keyframes (scene units; the reference's scenes are about 1 unit deep).
MIN_RADIUS, MAX_RADIUS = 1e-6, 1e6


class NeedsPivot(InputError):
    """A keyframe needs the scene's pivot, which was not given (known only once the depth is)."""


@dataclass
class LoadedPath:
    """A path read from a file: cam_from_world (T, 4, 4), K (T, 3, 3), and what was read."""

    cam_from_world: np.ndarray
    K: np.ndarray
    settings: dict


def load_pose_file(path, *, num_frames: int, K_src: np.ndarray, pivot: np.ndarray | None,
                   resample: bool = False) -> LoadedPath:
    """Read a camera path file for a clip of ``num_frames`` frames.

    K_src: (3, 3) source intrinsics, used where the file has none. pivot: (3,) default look-at
    target and orbit centre for JSON keyframes (None if unknown: such keyframes then fail).
    A pose count other than ``num_frames`` is an InputError unless ``resample`` is True.
    """
    path = check_pose_file(path)  # exists, size, suffix, JSON syntax
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            return _load_npz(path, num_frames=num_frames, K_src=K_src, resample=resample)
        return _load_json(path, num_frames=num_frames, K_src=K_src, pivot=pivot, resample=resample)
    except InputError:
        raise
    except (ValueError, ArithmeticError, RecursionError, MemoryError) as exc:
        # Whatever a hostile file provokes in the maths (an overflow, a degenerate camera) is the file's fault.
        raise InputError(f"cannot use camera path file {path}: {type(exc).__name__}: {_first_line(exc)}; "
                         f"check its values against docs/trajectories.md") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no details"


def check_pose_file(path, num_frames: int | None = None, resample: bool = False) -> Path:
    """The checks of a pose file that need no clip, done before any work: it exists, is not huge, has a
    known suffix and parses. With ``num_frames`` the whole file is loaded for a stand-in camera, so
    bad values and a wrong pose count fail now; keyframes that need the scene's pivot (known only from
    the depth) are checked up to the first such keyframe.

    Returns the path (protected as an input). Raises a one-line InputError.
    """
    path = require_file(path, "camera path file")
    if path.suffix.lower() not in POSE_FILE_SUFFIXES:
        raise InputError(f"unsupported camera path file {path}: use a .npz (cam_from_world/K, or the reference's "
                         "extrinsics/intrinsics) or a .json keyframe file (docs/trajectories.md)")
    size = path.stat().st_size
    if size > MAX_POSE_FILE_BYTES:
        raise InputError(f"camera path file {path} is {size / 2**20:.0f} MB, more than the "
                         f"{MAX_POSE_FILE_BYTES // 2**20} MB a pose file may have; give one pose per frame or keyframes")
    if path.suffix.lower() == ".json":
        _read_json(path)  # syntax and nesting now, not after depth estimation
    if num_frames is not None:
        K_standin = np.array([[500.0, 0.0, 256.0], [0.0, 500.0, 256.0], [0.0, 0.0, 1.0]])
        try:
            load_pose_file(path, num_frames=num_frames, K_src=K_standin, pivot=None, resample=resample)
        except NeedsPivot:
            pass  # checked again with the real pivot once the depth is known
    return path


def _fit_count(poses: np.ndarray, K: np.ndarray, num_frames: int, resample: bool, where: str):
    if len(poses) == num_frames:
        return poses, K, False
    if not resample:
        raise InputError(f"{where} has {len(poses)} camera poses but the clip has {num_frames} frames: pass "
                         "--resample to interpolate the path over the clip, or use a file with one pose per frame")
    logger.info("resampling %d poses from %s to %d frames", len(poses), where, num_frames)
    poses, K = resample_path(poses, K, num_frames)
    return poses, K, True


def _load_npz(path: Path, *, num_frames: int, K_src: np.ndarray, resample: bool) -> LoadedPath:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read camera file {path}: {exc} (expected a numpy .npz archive)") from None

    if "cam_from_world" in arrays:
        fmt = "ex4d"
        poses = check_cam_from_world(arrays["cam_from_world"], f"{path} [cam_from_world]")
        K_key = "K" if "K" in arrays else ("intrinsics" if "intrinsics" in arrays else None)
    elif "extrinsics" in arrays:
        fmt = "reference"
        # The reference saved its row-negated, OpenGL-style world -> camera matrices.
        gl = check_cam_from_world(arrays["extrinsics"], f"{path} [extrinsics]")
        poses = OPENCV_TO_OPENGL @ gl
        K_key = "intrinsics" if "intrinsics" in arrays else None
    else:
        raise InputError(f"camera file {path} has keys {sorted(arrays)}; expected 'cam_from_world' (T,4,4) "
                         "[+ 'K'], or the reference's 'extrinsics' (T,4,4) + 'intrinsics' (3,3)")

    if K_key is None:
        logger.info("%s has no intrinsics; using the source camera's", path)
        K = np.asarray(K_src, dtype=np.float64)
    else:
        K = check_intrinsics(arrays[K_key], f"{path} [{K_key}]")
    if K.ndim == 2:
        K = np.repeat(K[None], len(poses), axis=0)
    elif len(K) != len(poses):
        raise InputError(f"{path}: {K_key} has {len(K)} matrices but there are {len(poses)} poses")

    poses_in_file = len(poses)
    poses, K, resampled = _fit_count(poses, K, num_frames, resample, str(path))
    settings = {"kind": "file", "format": fmt, "source": str(path), "poses_in_file": poses_in_file,
                "resampled": resampled}
    if "name" in arrays and arrays["name"].shape == ():
        settings["source_name"] = str(arrays["name"])
    return LoadedPath(poses, K, settings)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read camera file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InputError(f"camera path file {path} is nested too deeply to be a keyframe file; see "
                         f"docs/trajectories.md for the format") from None


def _vector(value, what: str, size: int = 3) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        array = None
    if array is None or array.shape != (size,) or not np.all(np.isfinite(array)):
        raise InputError(f"{what} must be a list of {size} finite numbers, got {value!r}")
    return array


def _number(value, what: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:  # an integer beyond float range
        number = None
    if number is None or not np.isfinite(number):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise InputError(f"{what} must be a finite number, got {shown}")
    return number


def _keyframe_pose(frame: dict, where: str, pivot: np.ndarray | None) -> tuple[np.ndarray, tuple | None]:
    """One keyframe -> (cam_from_world (4, 4), orbit parameters (yaw, pitch, radius) or None)."""
    kinds = [key for key in ("position", "yaw", "pitch", "cam_from_world") if key in frame]
    if "cam_from_world" in frame:
        if len(kinds) > 1:
            raise InputError(f"{where}: give either cam_from_world or position/yaw/pitch, not both")
        try:
            matrix = np.asarray(frame["cam_from_world"], dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{where}: cam_from_world must be a 4x4 list of numbers") from None
        return check_cam_from_world(matrix[None], f"{where} cam_from_world")[0], None
    if "position" in frame:
        if "yaw" in frame or "pitch" in frame or "radius" in frame:
            raise InputError(f"{where}: give either position (+ look_at/look_dir) or yaw/pitch/radius, not both")
        eye = _vector(frame["position"], f"{where} position")
        if "look_at" in frame and "look_dir" in frame:
            raise InputError(f"{where}: give look_at or look_dir, not both")
        if "look_dir" in frame:
            target = eye + _vector(frame["look_dir"], f"{where} look_dir")
        elif "look_at" in frame:
            target = _vector(frame["look_at"], f"{where} look_at")
        elif pivot is not None:
            target = pivot
        else:
            raise NeedsPivot(f"{where}: no look_at given and no pivot known")
        try:
            return look_at(eye, target), None
        except ValueError as exc:
            raise InputError(f"{where}: cannot orient the camera ({exc}); move the target or use cam_from_world") \
                from None
    if "yaw" in frame or "pitch" in frame:
        if pivot is None:
            raise NeedsPivot(f"{where}: yaw/pitch keyframes need a pivot (set \"pivot\" in the file)")
        yaw = _number(frame.get("yaw", 0.0), f"{where} yaw")
        pitch = _number(frame.get("pitch", 0.0), f"{where} pitch")
        radius = _number(frame.get("radius", float(pivot[2])), f"{where} radius")
        if abs(pitch) > MAX_ORBIT_PITCH or not MIN_RADIUS <= radius <= MAX_RADIUS:
            raise InputError(f"{where}: need |pitch| <= {MAX_ORBIT_PITCH:g} degrees and radius from {MIN_RADIUS:g} "
                             f"to {MAX_RADIUS:g}, got pitch {pitch:g} and radius {radius:g}")
        try:
            return look_at(orbit_eye(yaw, pitch, radius, pivot), pivot), (yaw, pitch, radius)
        except ValueError as exc:
            raise InputError(f"{where}: cannot orient the camera ({exc}); change yaw/pitch/radius") from None
    raise InputError(f"{where}: a keyframe needs 'position', 'yaw'/'pitch' or 'cam_from_world'")


def _load_json(path: Path, *, num_frames: int, K_src: np.ndarray, pivot: np.ndarray | None,
               resample: bool) -> LoadedPath:
    doc = _read_json(path)
    if isinstance(doc, list):
        doc = {"keyframes": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("keyframes"), list) or not doc["keyframes"]:
        raise InputError(f"{path}: expected a non-empty list of keyframes, or an object with \"keyframes\": [...]")
    unknown = set(doc) - _FILE_KEYS
    if unknown:
        raise InputError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_FILE_KEYS)}")
    unit = doc.get("time_unit", "normalized")
    if unit not in TIME_UNITS:
        raise InputError(f"{path}: time_unit must be one of {TIME_UNITS}, got {unit!r}")
    if "pivot" in doc:
        pivot = _vector(doc["pivot"], f"{path} pivot")

    frames = doc["keyframes"]
    poses, orbits, focals, times = [], [], [], []
    for i, frame in enumerate(frames):
        where = f"{path} keyframe {i}"
        if not isinstance(frame, dict):
            raise InputError(f"{where}: each keyframe must be an object, got {frame!r}")
        unknown = set(frame) - _KEYFRAME_KEYS
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYFRAME_KEYS)}")
        pose, orbit_params = _keyframe_pose(frame, where, pivot)
        poses.append(pose)
        orbits.append(orbit_params)
        focal = frame.get("focal")
        if focal is not None and (_number(focal, f"{where} focal") <= 0):
            raise InputError(f"{where}: focal must be positive (pixels), got {focal!r}")
        focals.append(float(K_src[0, 0]) if focal is None else float(focal))
        if "time" in frame:
            times.append(_number(frame["time"], f"{where} time"))

    count = len(frames)
    if times and len(times) != count:
        raise InputError(f"{path}: give 'time' on every keyframe or on none")
    if not times:
        times = list(np.linspace(0.0, 1.0, count)) if count > 1 else [0.0]
        unit = "normalized"
    times = np.asarray(times, dtype=np.float64)
    if count > 1 and np.any(np.diff(times) <= 0):
        raise InputError(f"{path}: keyframe times must be strictly increasing, got {times.tolist()}")
    if unit == "frame":
        if times[0] < 0:
            raise InputError(f"{path}: keyframe frames must be >= 0, got {times[0]:g}")
        last = num_frames - 1
        if times[-1] > last:
            if not resample:
                raise InputError(f"{path}: a keyframe is at frame {times[-1]:g} but the clip has {num_frames} "
                                 f"frames (0..{last}); pass --resample to stretch the keyframes over the clip")
            times = times / times[-1] * last
        times = times / max(last, 1)
    elif times[0] < 0 or times[-1] > 1:
        raise InputError(f"{path}: normalized keyframe times must lie in [0, 1], got {times.tolist()}")

    query = np.linspace(0.0, 1.0, num_frames)
    cam_from_world = interpolate_poses(times, np.stack(poses), query)
    # Segments between two orbit keyframes about the same pivot follow the arc, not the chord.
    if count > 1 and pivot is not None:
        index = np.clip(np.searchsorted(times, query, side="right") - 1, 0, count - 2)
        for seg in range(count - 1):
            if orbits[seg] is None or orbits[seg + 1] is None:
                continue
            inside = index == seg
            params = interpolate_linear(times[seg:seg + 2], np.array([orbits[seg], orbits[seg + 1]]), query[inside])
            eye = orbit_eye(params[:, 0], params[:, 1], params[:, 2], pivot)
            cam_from_world[inside] = look_at(eye, pivot)

    scale = interpolate_linear(times, np.asarray(focals) / float(K_src[0, 0]), query)
    K = np.repeat(np.asarray(K_src, dtype=np.float64)[None], num_frames, axis=0)
    K[:, 0, 0] *= scale
    K[:, 1, 1] *= scale
    settings = {"kind": "file", "format": "json", "source": str(path), "keyframes": count, "time_unit": unit,
                "pivot": None if pivot is None else [float(v) for v in pivot]}
    if isinstance(doc.get("name"), str):
        settings["source_name"] = doc["name"]
    return LoadedPath(cam_from_world, K, settings)
