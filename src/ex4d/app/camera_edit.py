"""The app's camera path: a preset string or a keyframe table, always saved as a documented pose file.

Whatever the page shows, the path *is* a file of docs/trajectories.md: presets are saved as the
``.npz`` form (``cam_from_world`` (T,4,4), ``K`` (T,3,3)) and keyframes as the JSON keyframe form
with ``"time_unit": "frame"``. Previews render that file through :func:`ex4d.camera.make_trajectory`,
the code ``ex4d recon --cam FILE`` runs, so an exported file gives the same cameras on the command line.

Keyframe rows (the page's table) are ``[frame, x, y, z, look_x, look_y, look_z, focal]``: the camera
centre and the point it looks at, in world coordinates (OpenCV, world = the source camera of frame 0:
x right, y down, z forward), and the focal length in pixels (``None``/blank: the source's). They map
one to one onto JSON keyframes ``{"time": frame, "position": [x, y, z], "look_at": [...], "focal": f}``.
No gradio here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ex4d.errors import InputError

#: Column names of the keyframe table, in order.
KEYFRAME_COLUMNS = ("frame", "x", "y", "z", "look_x", "look_y", "look_z", "focal")

#: Presets offered on the page -> which parameters (sliders) they use.
PRESETS = {
    "orbit (reference)": ("angle",),
    "180 (reference loop)": (),
    "zoom_in": ("travel", "ease"),
    "zoom_out": ("travel", "ease"),
    "dolly_zoom": ("direction", "travel", "ease"),
    "orbit yaw/pitch": ("yaw", "pitch", "radius", "ease"),
}


def _fmt(value: float) -> str:
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"camera parameter {value!r} must be a finite number")
    return str(int(value)) if value == int(value) else f"{value:g}"


def preset_spec(preset: str, *, angle: float = 90.0, travel: float = 0.5, direction: str = "out",
                yaw: float = 45.0, pitch: float = 0.0, radius: float = 1.0, ease: str = "linear") -> str:
    """The ``--cam`` string of a preset and its slider values (docs/trajectories.md).

    angle: degrees of the reference orbit; travel: fraction for the zooms; radius: multiple of the
    pivot radius r for ``orbit yaw/pitch`` (1 = r). Raises InputError for an unknown preset.
    """
    if preset == "orbit (reference)":
        return _fmt(angle)
    if preset == "180 (reference loop)":
        return "180"
    if preset in ("zoom_in", "zoom_out"):
        return f"{preset}:travel={_fmt(travel)},ease={ease}"
    if preset == "dolly_zoom":
        return f"dolly_zoom:direction={direction},travel={_fmt(travel)},ease={ease}"
    if preset == "orbit yaw/pitch":
        return f"orbit:yaw={_fmt(yaw)},pitch={_fmt(pitch)},radius={_fmt(radius)}x,ease={ease}"
    raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass
class Keyframe:
    """One keyframe: at ``frame`` the camera sits at ``position`` looking at ``look_at`` (world, OpenCV)."""

    frame: int
    position: tuple[float, float, float]
    look_at: tuple[float, float, float]
    focal: float | None = None

    def row(self) -> list:
        return [self.frame, *self.position, *self.look_at, self.focal]

    def to_json(self) -> dict:
        item = {"time": int(self.frame), "position": [float(v) for v in self.position],
                "look_at": [float(v) for v in self.look_at]}
        if self.focal is not None:
            item["focal"] = float(self.focal)
        return item


def _cell(value, where: str, *, optional: bool = False) -> float | None:
    # A cleared cell arrives as None, "" or NaN depending on the table widget.
    if value is None or (isinstance(value, str) and not value.strip()) or \
            (isinstance(value, float) and math.isnan(value)):
        if optional:
            return None
        raise InputError(f"{where} is empty; type a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise InputError(f"{where} is {value!r}; give a finite number")
    return number


def keyframes_from_rows(rows, num_frames: int) -> list[Keyframe]:
    """Table rows -> keyframes sorted by frame; blank rows are skipped. One-line InputError naming the
    row and column for a bad cell, a frame outside 0..T-1, a repeated frame, or a camera looking at itself."""
    keyframes = []
    for i, row in enumerate(rows or [], 1):
        row = list(row) + [None] * (len(KEYFRAME_COLUMNS) - len(row))
        if all(v is None or (isinstance(v, str) and not v.strip()) or
               (isinstance(v, float) and math.isnan(v)) for v in row):
            continue
        cells = [_cell(row[c], f"keyframe row {i}, column {KEYFRAME_COLUMNS[c]}", optional=c == 7)
                 for c in range(len(KEYFRAME_COLUMNS))]
        frame = cells[0]
        if frame != int(frame) or not 0 <= frame <= num_frames - 1:
            raise InputError(f"keyframe row {i}: frame {row[0]!r} must be a whole number from 0 to {num_frames - 1} "
                             f"(the clip has {num_frames} frames)")
        if cells[7] is not None and cells[7] <= 0:
            raise InputError(f"keyframe row {i}: focal {row[7]!r} must be positive (pixels), or blank for the source's")
        position, look_at = tuple(cells[1:4]), tuple(cells[4:7])
        if np.linalg.norm(np.subtract(look_at, position)) < 1e-6:
            raise InputError(f"keyframe row {i}: the camera looks at its own position; move look_x/y/z away")
        keyframes.append(Keyframe(int(frame), position, look_at, cells[7]))
    keyframes.sort(key=lambda k: k.frame)
    frames = [k.frame for k in keyframes]
    if len(set(frames)) != len(frames):
        twice = sorted({f for f in frames if frames.count(f) > 1})
        raise InputError(f"keyframe frame(s) {twice} appear twice; each frame can hold one keyframe")
    if not keyframes:
        raise InputError("the keyframe table is empty; add a keyframe (or choose a preset)")
    return keyframes


def keyframe_from_pose(frame: int, cam_from_world: np.ndarray, pivot: np.ndarray,
                       focal: float | None = None, decimals: int = 6) -> Keyframe:
    """A keyframe for a camera pose (4,4): its centre, and the point on its axis as far ahead as the
    ``pivot`` (3,) is from it (so an orbit's cameras look at the pivot itself).

    Numbers are rounded to ``decimals`` places so that the table shows what the pose file holds.
    Roll is dropped: keyframes look at a point without roll, as docs/trajectories.md defines them.
    """
    cam_from_world = np.asarray(cam_from_world, dtype=np.float64)
    rotation, translation = cam_from_world[:3, :3], cam_from_world[:3, 3]
    centre = -rotation.T @ translation
    forward = rotation[2]  # the camera's +z axis in world coordinates
    pivot = np.asarray(pivot, dtype=np.float64)
    distance = float(np.linalg.norm(pivot - centre))
    if distance < 1e-6:
        distance = max(float(np.linalg.norm(pivot)), 1.0)
    target = centre + forward * distance
    return Keyframe(int(frame), tuple(round(float(v), decimals) + 0.0 for v in centre),
                    tuple(round(float(v), decimals) + 0.0 for v in target), focal)


def keyframes_json(keyframes: list[Keyframe], name: str = "app") -> dict:
    """The JSON pose-file document (docs/trajectories.md, ``time_unit`` frame) for ``keyframes``."""
    return {"name": name, "time_unit": "frame", "keyframes": [k.to_json() for k in keyframes]}


def poses_json(cam_from_world: np.ndarray, K: np.ndarray, K_src: np.ndarray, name: str = "app") -> dict:
    """A JSON pose file with one ``cam_from_world`` keyframe per frame (an exported preset)."""
    items = []
    for k, pose in enumerate(np.asarray(cam_from_world, dtype=np.float64)):
        item = {"time": k, "cam_from_world": pose.tolist()}
        if abs(float(K[k][0, 0]) - float(K_src[0, 0])) > 1e-9:
            item["focal"] = float(K[k][0, 0])
        items.append(item)
    return {"name": name, "time_unit": "frame", "keyframes": items}


def write_json(path: str | os.PathLike, document: dict) -> Path:
    """Write a pose-file JSON whole (atomic, recorded in the folder's ledger)."""
    from ex4d.io.files import atomic_path, check_output

    path = check_output(Path(path), "pose file")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(document, indent=2) + "\n")
    return path


@dataclass
class CameraPath:
    """The session's path: ``mode`` "preset" (``spec``), "keyframes" (``keyframes``) or "file" (an
    imported pose file, ``file``). ``version`` counts changes (the 3D view and the page poll it)."""

    mode: str = "preset"
    spec: str = "90"
    keyframes: list[Keyframe] = field(default_factory=list)
    file: Path | None = None
    version: int = 0

    def describe(self) -> str:
        if self.mode == "preset":
            return f"preset `{self.spec}`"
        if self.mode == "keyframes":
            return f"{len(self.keyframes)} keyframe(s) at frames {[k.frame for k in self.keyframes]}"
        return f"imported pose file `{self.file.name}`" if self.file is not None else "imported pose file"

    def save(self, folder: str | os.PathLike, *, num_frames: int, size, K_src, depth0) -> Path:
        """Write the path as a pose file into ``folder`` (``path.npz`` for a preset or an imported npz,
        ``path.json`` for keyframes or an imported JSON) and return it."""
        import shutil

        from ex4d.camera.trajectory import make_trajectory
        from ex4d.io.files import atomic_path, check_output

        folder = Path(folder)
        if self.mode == "keyframes":
            return write_json(folder / "path.json", keyframes_json(self.keyframes))
        if self.mode == "file":
            if self.file is None:
                raise InputError("no pose file was imported")
            target = check_output(folder / f"path{self.file.suffix.lower()}", "pose file")
            with atomic_path(target) as tmp:
                shutil.copyfile(self.file, tmp)
            return target
        trajectory = make_trajectory(self.spec, num_frames=num_frames, size=size, K=K_src, depth0=depth0)
        trajectory.name = "path"
        return trajectory.save(check_output(folder / "path.npz", "pose file"))
