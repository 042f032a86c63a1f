"""``make_trajectory``: turn a ``--cam`` string (preset, parametrised path or pose file) into a Trajectory.

Accepted forms (``TRAJECTORY_FORMS``; user documentation in ``docs/trajectories.md``):

* ``30``, ``-60``, ``90``, ``22.5`` ...: the reference's orbit of that many degrees (rounds = 1).
* ``180``: the reference's closed loop (at most 45 degrees of yaw; *not* a 180-degree orbit).
* ``zoom_in`` / ``zoom_out`` [``:travel=F,ease=linear|smooth``]: dolly along the optical axis.
* ``dolly_zoom`` [``:direction=out|in,travel=F,ease=...``]: dolly while the focal length keeps the
  pivot's size.
* ``orbit:yaw=D,pitch=D`` [``,radius=R|Rx,ease=...``]: a true orbit about the pivot.
* ``stereo`` [``:baseline=B|Kx|Mm,converge=subject|infinity``]: the right eye of a stereo pair whose left
  eye is the source (docs/stereo.md).
* a path to a ``.npz`` or ``.json`` pose file (see :mod:`ex4d.camera.posefile`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from ex4d.camera import presets
from ex4d.camera.posefile import POSE_FILE_SUFFIXES, check_pose_file, load_pose_file
from ex4d.camera.poses import check_intrinsics
from ex4d.errors import InputError
from ex4d.types import Trajectory

logger = logging.getLogger(__name__)

#: Ready-made names for CLI help and menus (any angle and the parametrised forms also work).
PRESET_NAMES: tuple[str, ...] = ("30", "60", "90", "-30", "-60", "-90", "180", "zoom_in", "zoom_out",
                                 "dolly_zoom", "stereo")

#: One line listing every accepted form, used in error messages and help.
TRAJECTORY_FORMS = ("an orbit angle in degrees (30, -60, 90, ...), 180 (the reference's loop), zoom_in, zoom_out, "
                    "dolly_zoom, orbit:yaw=<deg>,pitch=<deg>[,radius=<units>|<k>x][,ease=linear|smooth], "
                    "zoom_in:travel=<0..0.9>, zoom_out:travel=<f>, dolly_zoom:direction=out|in,travel=<f>, "
                    "stereo[:baseline=<units>|<k>x|<metres>m,converge=subject|infinity], "
                    "or a pose file (.npz / .json, see docs/trajectories.md)")

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_NAME_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")

# Allowed parameters of each parametrised form, with their parsers.
_PARAMS = {
    "orbit": ("yaw", "pitch", "radius", "ease"),
    "zoom_in": ("travel", "ease"),
    "zoom_out": ("travel", "ease"),
    "dolly_zoom": ("direction", "travel", "ease"),
    "stereo": ("baseline", "converge"),
}
_TEXT_PARAMS = {"ease": presets.EASES, "direction": ("out", "in"), "converge": presets.CONVERGENCES}
#: Parameters that also take a unit suffix: "x" (a multiple of the pivot/subject distance), "m" (metres).
_SUFFIXED = {"radius": ("x",), "baseline": ("x", "m")}


def _fmt(value: float) -> str:
    """Short, stable text for a number: 30.0 -> '30', 22.5 -> '22.5', -0.0 -> '0'."""
    value = float(value)
    if value == int(value):
        return str(int(value))
    return f"{value:g}"


def _bad_spec(spec: str, why: str) -> InputError:
    return InputError(f"bad camera path {spec!r}: {why}. Valid forms: {TRAJECTORY_FORMS}")


def parse_spec(spec: str) -> tuple[str, dict]:
    """Parse a non-file ``--cam`` string -> (kind, params).

    kind is "angle" (params: angle), "loop", "orbit", "zoom_in", "zoom_out" or "dolly_zoom". Numbers
    are floats; ``radius`` may be a string ending in "x" (a multiple of the default radius).
    Raises InputError naming the bad part and listing the valid forms.
    """
    text = spec.strip()
    if text == "180":
        return "loop", {}
    if _NUMBER.match(text):
        angle = float(text)
        if not np.isfinite(angle):
            raise _bad_spec(spec, "the angle must be finite")
        return "angle", {"angle": angle}
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in _PARAMS:
        raise _bad_spec(spec, f"unknown preset {kind!r} (and no such pose file)")
    params: dict = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not eq or not key or not value:
                raise _bad_spec(spec, f"{item!r} is not key=value")
            if key not in _PARAMS[kind]:
                raise _bad_spec(spec, f"{kind} takes {', '.join(_PARAMS[kind])}, not {key!r}")
            if key in params:
                raise _bad_spec(spec, f"{key} is given twice")
            if key in _TEXT_PARAMS:
                if value.lower() not in _TEXT_PARAMS[key]:
                    raise _bad_spec(spec, f"{key} must be one of {', '.join(_TEXT_PARAMS[key])}, not {value!r}")
                params[key] = value.lower()
            elif key in _SUFFIXED and value[-1:].lower() in _SUFFIXED[key] and _NUMBER.match(value[:-1]):
                if not np.isfinite(float(value[:-1])):
                    raise _bad_spec(spec, f"{key}={value!r} is too large")
                params[key] = value.lower()
            elif _NUMBER.match(value):
                if not np.isfinite(float(value)):
                    raise _bad_spec(spec, f"{key}={value!r} is too large")
                params[key] = float(value)
            else:
                raise _bad_spec(spec, f"{key}={value!r} is not a number")
    elif ":" in text:
        raise _bad_spec(spec, f"nothing after '{kind}:'")
    if kind == "orbit" and "yaw" not in params and "pitch" not in params:
        raise _bad_spec(spec, "orbit needs yaw= and/or pitch= (degrees)")
    return kind, params


def _spec_name(kind: str, params: dict) -> str:
    if kind == "angle":
        return _fmt(params["angle"])
    if kind == "loop":
        return "180"
    parts = [kind]
    for key in _PARAMS[kind]:
        if key in params:
            value = params[key]
            if isinstance(value, float):
                parts.append(f"{key}{_fmt(value)}")
            elif key in _SUFFIXED:  # "2x", "0.065m"
                parts.append(f"{key}{_fmt(float(value[:-1]))}{value[-1]}")
            else:  # text values are self-explanatory: "smooth", "in"
                parts.append(value)
    return _safe_name("_".join(parts))


def _safe_name(text: str) -> str:
    return _NAME_SAFE.sub("_", text).strip("._") or "custom"


def _looks_like_file(spec: str) -> bool:
    seps = {os.sep, os.altsep} - {None}
    return Path(spec).suffix.lower() in POSE_FILE_SUFFIXES or any(sep in spec for sep in seps)


def make_trajectory(spec: str, *, num_frames: int, size: tuple[int, int], K: np.ndarray,
                    depth0: np.ndarray | None, resample: bool = False,
                    depth_metric: bool | None = None) -> Trajectory:
    """Build the target camera path for a clip.

    spec: a ``--cam`` string (see ``TRAJECTORY_FORMS``). num_frames: T. size: (H, W).
    K: (3, 3) source intrinsics (also the target intrinsics unless the path changes them).
    depth0: (H, W) frame-0 z-depth; sets the pivot (0, 0, r), r = min(depth after the border push)
    + 0.15. It may be None only for pose files that need no pivot.
    resample: let a pose file with another pose count be interpolated to T frames.
    depth_metric: whether the depth is in metres (a depth file from a metric estimator or a scanner)
    rather than the relative depth of DepthCrafter / Depth Anything / vda; ``stereo:baseline=<v>m`` needs
    True and is refused with False (None: unknown, accepted, as in the checks before any work).

    Returns a Trajectory with cam_from_world (T, 4, 4) OpenCV, K (T, 3, 3), a filename-safe name
    and JSON-serialisable settings. Raises InputError for bad specs or files.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad_spec(str(spec), "it is empty")
    if int(num_frames) != num_frames or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
    num_frames = int(num_frames)
    height, width = (int(v) for v in size)
    K = check_intrinsics(K, "source intrinsics K")
    if K.ndim == 3:
        K = K[0]

    nearest = radius = None
    if depth0 is not None:
        nearest, radius = presets.scene_depths(depth0, (height, width))

    spec = spec.strip()
    if _looks_like_file(spec):
        pivot = None if radius is None else np.array([0.0, 0.0, radius])
        loaded = load_pose_file(spec, num_frames=num_frames, K_src=K, pivot=pivot, resample=resample)
        name = _safe_name(Path(spec).stem)
        settings = dict(loaded.settings)
        if radius is not None:
            settings["radius"] = radius
        _check_file_path(loaded.cam_from_world, loaded.K, (height, width), spec)
        return Trajectory(loaded.cam_from_world, loaded.K, name=name, settings=settings)

    try:
        kind, params = parse_spec(spec)
    except InputError:
        if os.path.isfile(spec):  # an existing file with an unexpected suffix: say so
            load_pose_file(spec, num_frames=num_frames, K_src=K, pivot=None, resample=resample)
        raise
    if depth0 is None:
        raise InputError(f"camera path {spec!r} needs the frame-0 depth to place its pivot")
    ease = params.get("ease", "linear")
    K_path = np.repeat(K[None], num_frames, axis=0)
    settings: dict = {"kind": kind, "spec": spec, "num_frames": num_frames, "radius": radius,
                      "nearest_depth": nearest, "pivot": [0.0, 0.0, radius]}
    if kind == "angle":
        poses = presets.reference_orbit(params["angle"], num_frames, radius)
        settings.update(angle=params["angle"], rounds=1, rise=presets.REFERENCE_RISE)
    elif kind == "loop":
        poses = presets.reference_loop(num_frames, radius)
        settings.update(rounds=1, rise=presets.REFERENCE_RISE, max_yaw_deg=45.0)
    elif kind == "orbit":
        orbit_radius = _orbit_radius(params.get("radius"), radius, spec)
        poses = presets.orbit(params.get("yaw", 0.0), params.get("pitch", 0.0), num_frames, orbit_radius, ease)
        settings.update(yaw=params.get("yaw", 0.0), pitch=params.get("pitch", 0.0), radius=orbit_radius,
                        pivot=[0.0, 0.0, orbit_radius], ease=ease)
    elif kind == "zoom_in":
        travel = params.get("travel", presets.ZOOM_IN_TRAVEL)
        poses = presets.zoom_in(num_frames, nearest, travel, ease)
        settings.update(travel=travel, distance=travel * nearest, ease=ease)
    elif kind == "zoom_out":
        travel = params.get("travel", presets.ZOOM_OUT_TRAVEL)
        poses = presets.zoom_out(num_frames, radius, travel, ease)
        settings.update(travel=travel, distance=travel * radius, ease=ease)
    elif kind == "stereo":
        baseline = _stereo_baseline(params.get("baseline"), radius, depth_metric, spec)
        converge = params.get("converge", "subject")
        poses, K_path = presets.stereo(num_frames, K, baseline, radius if converge == "subject" else None)
        shift = float(K_path[0, 0, 2] - K[0, 2])
        settings.update(baseline=baseline, baseline_spec=params.get("baseline", f"{presets.STEREO_BASELINE_FRACTION:.6g}x"),
                        converge=converge, subject_depth=radius, principal_point_shift_px=shift,
                        subject_disparity_px=0.0 if converge == "subject" else float(K[0, 0] * baseline / radius),
                        eye="right", left_eye="source", first_frame="rendered")
    else:  # dolly_zoom
        travel = params.get("travel", presets.DOLLY_ZOOM_TRAVEL)
        direction = params.get("direction", "out")
        poses, K_path = presets.dolly_zoom(num_frames, K, nearest, radius, direction, travel, ease)
        settings.update(direction=direction, travel=travel, ease=ease,
                        focal_start=float(K_path[0, 0, 0]), focal_end=float(K_path[-1, 0, 0]))
    return Trajectory(poses, K_path, name=_spec_name(kind, params), settings=settings)


def is_stereo_spec(spec) -> bool:
    """True if ``spec`` is a ``stereo`` camera path (a right eye whose frame 0 is rendered, not the source)."""
    spec = str(spec).strip()
    if _looks_like_file(spec):
        return False
    return spec.partition(":")[0].strip().lower() == "stereo"


def trajectory_name(spec: str) -> str:
    """The name :func:`make_trajectory` gives ``spec`` (used in output file names), without building it."""
    spec = str(spec).strip()
    if _looks_like_file(spec):
        return _safe_name(Path(spec).stem)
    kind, params = parse_spec(spec)
    return _spec_name(kind, params)


def check_spec(spec: str, num_frames: int | None = None, resample: bool = False) -> None:
    """The checks of a ``--cam`` string that need no clip, run before any work starts.

    A preset or parametrised path is built once for a small stand-in scene (so a bad parameter fails
    now, not after depth estimation); a pose file must exist, have a known suffix and a sane size, and
    a JSON file must parse; with ``num_frames`` a pose file is also loaded (values, pose count; see
    :func:`ex4d.camera.posefile.check_pose_file`). Raises the one-line InputError that
    :func:`make_trajectory` would.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad_spec(str(spec), "it is empty")
    spec = spec.strip()
    if _looks_like_file(spec):
        check_pose_file(spec, num_frames=num_frames, resample=resample)
        return
    try:
        parse_spec(spec)
    except InputError:
        if os.path.isfile(spec):  # an existing file with an unexpected suffix: say so
            check_pose_file(spec)
        raise
    size = (64, 64)
    K = np.array([[50.0, 0.0, 32.0], [0.0, 50.0, 32.0], [0.0, 0.0, 1.0]])
    quiet = logging.getLogger("ex4d.camera")  # its warnings come once, from the real build
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        make_trajectory(spec, num_frames=5, size=size, K=K, depth0=np.full(size, 2.0, np.float32))
    finally:
        quiet.setLevel(level)


def _stereo_baseline(value, subject: float, depth_metric: bool | None, spec: str) -> float:
    """The stereo baseline in scene units: default 1/30 of the subject distance; ``<k>x`` k times it;
    ``<v>m`` metres (the depth must be metric); a bare number in scene units (the depth's units)."""
    if value is None:
        result = presets.STEREO_BASELINE_FRACTION * subject
    elif isinstance(value, str) and value.endswith("x"):
        result = float(value[:-1]) * subject
    elif isinstance(value, str):  # "0.065m"
        if depth_metric is False:
            raise InputError(f"camera path {spec!r}: baseline={value} is in metres but the depth is relative "
                             "(DepthCrafter, Depth Anything and vda have no metric scale); use --depth vda-metric, "
                             "a metric depth file (--depth depth.npz in metres) or a fraction of the subject "
                             "distance, e.g. baseline=0.033x")
        result = float(value[:-1])
    else:
        result = float(value)
    if not result > 0:
        raise _bad_spec(spec, "baseline must be positive")
    if result > presets.MAX_STEREO_BASELINE_FRACTION * subject:
        raise _bad_spec(spec, f"baseline {result:g} is more than the subject distance {subject:g} (the pair could "
                              f"not be fused; the default is {presets.STEREO_BASELINE_FRACTION:.4g}x)")
    return result


def _orbit_radius(value, default: float, spec: str) -> float:
    if value is None:
        return default
    if isinstance(value, str):  # "1.5x": a multiple of the default pivot radius
        result = float(value[:-1]) * default
    else:
        result = float(value)
    if not result > 0:
        raise _bad_spec(spec, "radius must be positive")
    return result


def _check_file_path(cam_from_world: np.ndarray, K: np.ndarray, size: tuple[int, int], where: str) -> None:
    """Warn about paths that are valid but probably not what the user meant."""
    height, width = size
    if not np.allclose(cam_from_world[0], np.eye(4), atol=1e-4):
        logger.warning("%s: the first pose is not the source camera (identity); frame 0 of the condition is "
                       "always the source image, so the path will jump after frame 0", where)
    cx, cy = K[:, 0, 2], K[:, 1, 2]
    if np.any(np.abs(cx - width / 2) > width / 4) or np.any(np.abs(cy - height / 2) > height / 4):
        logger.warning("%s: the principal point (%.1f, %.1f) is far from the image centre (%.1f, %.1f); was the "
                       "file made for another resolution?", where, cx[0], cy[0], width / 2, height / 2)
