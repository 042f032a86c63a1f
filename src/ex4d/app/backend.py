"""The web app's work, without gradio: sessions, inputs, depth, camera path, preview, generation, outputs.

Every page event maps onto one method of :class:`Session`; the UI module only turns its results into
components. All files live under the app's work folder::

    WORKDIR/
      uploads/                    gradio's upload and file cache (set by ex4d app; pruned daily)
      examples/<scene>-<T>f-<H>x<W>-<fps>fps/   built-in examples, made once, read by every session
      sessions/<session>/
        inputs/<stamp>-<what>/    an uploaded video, depth or pose file (a copy)
        depth/<stamp>/            depth.npz and depth_preview.mp4 of one depth run
        camera/                   path.json / path.npz: the current path, as shown in the 3D view
        exports/<stamp>/          exported pose files
        runs/<stamp>-preview|generate-<id>/   one folder per run, never reused

A session only ever writes into new folders of its own, so it cannot overwrite another session's
finished run; writes go through :mod:`ex4d.io.files` (atomic, ledger). The app never opens a path
typed by a user: uploads arrive as files gradio saved, and are copied into ``inputs/``. Extra Wan LoRAs
come only from whoever starts the app (``ex4d app --lora FILE[:STRENGTH]``); the page picks among them
by label.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ex4d.app.camera_edit import CameraPath, Keyframe, keyframe_from_pose, keyframes_from_rows, poses_json, write_json
from ex4d.app.outputs import (cli_folder, eval_command, generate_command, lora_labels, recon_command,
                              visibility_warning, write_settings)
from ex4d.app.progress import Report, step_bars
from ex4d.errors import InputError, UserError

log = logging.getLogger(__name__)

#: Video files the upload accepts (PyAV reads more; these are what people have).
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
#: Points of frame 0 sent to the 3D view at most (a browser draws 100k points at once without effort).
MAX_SCENE_POINTS = 100_000
#: What the 3D view can draw of frame 0.
SCENE_KINDS = ("points", "mesh")
#: Frames of a video the app looks at, at most (the frame-count box offers up to this many).
MAX_FRAMES = 1000
#: Keyframes that "Edit as keyframes" makes from a preset: first, middle and last frame (few numbers to
#: edit; add more where the path must follow a curve closely).
DEFAULT_KEYFRAMES = 3
#: Size (H, W) of the built-in examples (ex4d.synthetic; exact depth, no weights).
EXAMPLE_SIZE = (512, 512)


def launch_loras(values) -> tuple:
    """The app's ``--lora FILE[:STRENGTH]`` values as :class:`~ex4d.diffusion.weights.lora.LoraSpec`s with
    absolute paths (so the command lines shown on the page work from any folder), in the order given.

    Raises a one-line InputError for a bad strength or a missing file, before anything is started."""
    from ex4d.diffusion.weights.lora import LoraSpec, check_lora_files, parse_lora_specs

    specs = parse_lora_specs(values)
    check_lora_files(specs)
    return tuple(LoraSpec(str(Path(spec.path).expanduser().resolve()), spec.strength) for spec in specs)


def _safe_name(text: str, default: str = "file") -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text)).name).strip("._")
    return name[:80] or default


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def new_folder(parent: Path, what: str) -> Path:
    """A fresh folder ``parent/<time>-<what>-<random>`` (never an existing one)."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        folder = parent / f"{_stamp()}-{what}-{secrets.token_hex(3)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new folder in {parent}")


def copy_upload(upload: str | os.PathLike, folder: Path, what: str, suffixes: tuple[str, ...]) -> Path:
    """Copy a file gradio received into ``folder`` (the session's inputs) under a safe name."""
    from ex4d.io.files import atomic_path

    source = Path(upload)
    if not source.is_file():
        raise InputError(f"the {what} upload did not arrive; upload it again")
    if source.suffix.lower() not in suffixes:
        raise InputError(f"{source.name}: the {what} must be one of {', '.join(suffixes)}")
    target = folder / _safe_name(source.name, f"upload{source.suffix.lower()}")
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def count_video_frames(video: Path, cap: int = MAX_FRAMES) -> tuple[int, float]:
    """(frames, up to ``cap``; fps) of a video, decoding no more than ``cap`` frames; one-line InputError
    for a file that is not a video (the messages of :func:`ex4d.io.video.probe_video`)."""
    import av

    from ex4d.io.video import probe_video

    _, _, fps = probe_video(video, 1)
    count = 0
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        try:
            for _ in container.decode(stream):
                count += 1
                if count >= cap:
                    break
        except Exception:  # a truncated file ends where decoding fails, as ex4d.io.video reads it
            pass
    return max(count, 1), fps


@dataclass
class DepthResult:
    depth_file: Path
    preview: Path | None
    estimator: str


@dataclass
class PreviewResult:
    """A preview run: its folder, files by role, visible fraction per frame and a warning line (or "")."""

    folder: Path
    files: dict[str, Path]
    visible: list[float]
    warning: str
    commands: list[str]
    path_file: Path


@dataclass
class GenerateResult:
    folder: Path
    video: Path
    files: dict[str, Path]
    commands: list[str]
    eval_summary: dict | None = None
    eval_error: str = ""


@dataclass
class Session:
    """One browser session's state and folder. Methods raise UserError subclasses for user problems."""

    key: str
    folder: Path
    app: "AppBackend"
    video: Path | None = None
    video_fps: float | None = None
    video_frames: int | None = None
    num_frames: int = 49
    resize: str = "reference"
    depth_file: Path | None = None
    depth_source: str = ""
    depth_preview: Path | None = None
    path: CameraPath = field(default_factory=CameraPath)
    last_preview: PreviewResult | None = None
    last_generate: GenerateResult | None = None
    scene: object | None = None
    scene_error: str = ""
    scene_kind: str = "points"  # what the 3D view draws of frame 0: "points" or "mesh" (its DW-Mesh)
    abort: threading.Event = field(default_factory=threading.Event)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # ---------------------------------------------------------------- folders
    def sub(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---------------------------------------------------------------- input
    def load_example(self, scene: str = "spheres_moving", *, num_frames: int = 49,
                     size: tuple[int, int] | None = None, fps: float = 15.0, progress: Report | None = None) -> dict:
        """Use a synthetic example (as ``ex4d synth`` makes it): video.mp4 and its exact depth.npz.

        Examples are made once per scene, frame count and size into the work folder's ``examples/``
        (shared by the sessions, which only read them) and reused."""
        size = tuple(size) if size is not None else self.app.example_size
        folder = self.app.example(scene, num_frames=num_frames, size=size, fps=fps, progress=progress)
        with self.lock:
            self._set_video(folder / "video.mp4", num_frames=num_frames)
            self.depth_file, self.depth_source = folder / "depth.npz", f"exact depth of the {scene} example"
            self.depth_preview = folder / "depth_preview.mp4"
        return self.info()

    def set_video(self, upload: str | os.PathLike, *, num_frames: int | None = None,
                  resize: str | None = None) -> dict:
        """Take an uploaded video (copied into the session's inputs) with the page's frame count and
        resize settings (default: the session's); the depth must then be made anew."""
        folder = new_folder(self.sub("inputs"), "video")
        video = copy_upload(upload, folder, "video", VIDEO_SUFFIXES)
        with self.lock:
            self._set_video(video, num_frames=self.num_frames if num_frames is None else int(num_frames))
            self.depth_file, self.depth_source, self.depth_preview = None, "", None
        return self.set_clip_settings(self.num_frames, resize or self.resize)

    def _set_video(self, video: Path, *, num_frames: int) -> None:
        count, fps = count_video_frames(video)
        self.video, self.video_frames, self.video_fps = video, count, fps
        self.num_frames = min(int(num_frames), count)
        self.last_preview = self.last_generate = None
        self.path.version += 1

    def set_clip_settings(self, num_frames, resize: str) -> dict:
        """The CLI's ``--num-frames`` and ``--resize`` (docs: ``ex4d recon --help``)."""
        from ex4d.checks import check_int

        if resize not in ("reference", "keep"):
            raise InputError(f"resize must be 'reference' or 'keep', got {resize!r}")
        num_frames = check_int(num_frames, "frames", 1, example=49)
        self.require_video()
        if num_frames > self.video_frames:
            raise InputError(f"the video has {self.video_frames} frames; choose at most {self.video_frames}")
        if resize == "keep":
            from ex4d.checks import MAX_RECON_PIXELS
            from ex4d.io.video import probe_video

            _, (height, width), _ = probe_video(self.video, 1)
            if height * width > MAX_RECON_PIXELS:
                raise InputError(f"the video is {width}x{height}; resize 'keep' takes at most "
                                 f"{MAX_RECON_PIXELS / 1e6:.1f} megapixels (4096x2160) a frame; use 'reference'")
        with self.lock:
            changed = (num_frames, resize) != (self.num_frames, self.resize)
            self.num_frames, self.resize = num_frames, resize
            if changed and self.path.mode == "keyframes":
                self.path.keyframes = [k for k in self.path.keyframes if k.frame < num_frames] or \
                    self.path.keyframes[:1]
            if changed:
                self.path.version += 1
        return self.info()

    def require_video(self) -> Path:
        if self.video is None:
            raise InputError("no video yet: pick an example or upload a video first")
        return self.video

    def clip(self):
        from ex4d.pipeline import load_clip

        return load_clip(self.require_video(), num_frames=self.num_frames, resize=self.resize)

    def info(self) -> dict:
        """Frames, size (after --resize), fps of the input, and where its depth comes from."""
        clip = self.clip()
        height, width = clip.size
        return {"video": self.video.name, "frames": clip.num_frames, "video_frames": self.video_frames,
                "size": f"{height}x{width}", "height": height, "width": width, "fps": clip.fps,
                "resize": self.resize, "depth": self.depth_source or "none yet"}

    # ---------------------------------------------------------------- depth
    def missing_depth_weights(self, estimator: str) -> list[str]:
        """Every download ``estimator`` lacks here, each with its download command ([] when all are present)."""
        return self._missing(depth=estimator)

    def missing_generation_weights(self) -> list[str]:
        """Every download generation lacks here (Wan2.1-I2V-14B, the EX-4D adapter), with its command."""
        return self._missing(generation=True)

    def _missing(self, **needs) -> list[str]:
        from ex4d.weights_common import hub_unreachable
        from ex4d.weights_preflight import SUGGESTED_MODELS_DIR, _dedupe, missing_weights

        items = _dedupe(missing_weights(models_dir=self.app.models_dir, **needs))
        if items and all(item.auto for item in items) and hub_unreachable() is None:
            return []  # downloaded by the stage itself
        lines = [item.describe() for item in items]
        if lines and self.app.models_dir is None:
            lines.append(f"after downloading, start the app with --models-dir {SUGGESTED_MODELS_DIR}")
        return lines

    def estimate_depth(self, source: str, upload: str | os.PathLike | None = None,
                       progress: Report | None = None) -> DepthResult:
        """Depth for the clip from an estimator (``ex4d.depth.ESTIMATORS``) or an uploaded depth file.

        Raises MissingWeightsError (listing every missing file) before any work when weights are missing.
        """
        from ex4d.depth import ESTIMATORS
        from ex4d.depth.preview import write_depth_preview
        from ex4d.pipeline import estimate_depth

        clip = self.clip()
        if source == "file":
            if upload is None:
                raise InputError("choose a depth file (.npz or .npy) to upload first")
            spec = str(copy_upload(upload, new_folder(self.sub("inputs"), "depth"), "depth file", (".npz", ".npy")))
        elif source in ESTIMATORS:
            from ex4d.weights_preflight import check_weights

            spec = source
            check_weights(depth=source, models_dir=self.app.models_dir)
        else:
            raise InputError(f"unknown depth source {source!r}; use {', '.join(ESTIMATORS)} or file")
        folder = new_folder(self.sub("depth"), _safe_name(Path(spec).stem if source == "file" else source))
        self.abort.clear()
        try:
            depth = estimate_depth(clip, spec, out_dir=folder, models_dir=self.app.models_dir, device=self.app.device,
                                   progress=step_bars(progress, self.abort))
            preview = write_depth_preview(folder / "depth_preview.mp4", depth.depth, clip.fps)
        except BaseException:  # aborted or failed: no half-made depth folder is left for anyone to pick up
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self.lock:
            self.depth_file, self.depth_preview = folder / "depth.npz", preview
            self.depth_source = f"uploaded {Path(spec).name}" if source == "file" else source
            self.last_preview = None
            self.path.version += 1
        return DepthResult(self.depth_file, preview, self.depth_source)

    def require_depth(self) -> Path:
        if self.depth_file is None:
            raise InputError("no depth yet: pick the example (exact depth), run an estimator or upload a depth file")
        return self.depth_file

    def depth_video(self, clip):
        """The session's depth fitted to ``clip`` (frames read lazily), as ``ex4d recon --depth FILE`` reads it."""
        from ex4d.pipeline import estimate_depth

        return estimate_depth(clip, str(self.require_depth()), out_dir=None)

    def scene_geometry(self) -> dict:
        """What the 3D view needs: K (3,3), size, frame-0 depth (H,W) and pivot distance r."""
        from ex4d.camera.presets import scene_depths
        from ex4d.conventions import reference_intrinsics

        clip = self.clip()
        depth = self.depth_video(clip)
        K = depth.K if depth.K is not None else reference_intrinsics(*clip.size)
        depth0 = np.asarray(depth.depth[0], dtype=np.float32)
        _, radius = scene_depths(depth0, clip.size)
        return {"clip": clip, "depth": depth, "K": np.asarray(K, np.float64), "size": clip.size,
                "depth0": depth0, "radius": float(radius), "pivot": np.array([0.0, 0.0, float(radius)])}

    # ---------------------------------------------------------------- camera path
    def set_preset(self, spec: str) -> str:
        """Use the preset ``spec`` (a ``--cam`` string); checked as ``ex4d recon`` checks it."""
        from ex4d.camera.trajectory import check_spec

        check_spec(spec)
        with self.lock:
            self.path.mode, self.path.spec = "preset", spec
            self.path.version += 1
        return spec

    def set_keyframes(self, rows) -> list[Keyframe]:
        """Use the keyframe table ``rows`` (see :data:`ex4d.app.camera_edit.KEYFRAME_COLUMNS`)."""
        keyframes = keyframes_from_rows(rows, self.num_frames)
        with self.lock:
            self.path.mode, self.path.keyframes = "keyframes", keyframes
            self.path.version += 1
        return keyframes

    def keyframe_rows(self) -> list[list]:
        return [k.row() for k in self.path.keyframes]

    def path_file(self, folder: Path | None = None, geometry: dict | None = None) -> Path:
        """Save the current path as a pose file into ``folder`` (default: the session's camera/ folder).
        ``geometry``: :meth:`scene_geometry`, when the caller has it already."""
        geometry = geometry if geometry is not None else self.scene_geometry()
        folder = folder if folder is not None else self.sub("camera")
        with self.lock:
            return self.path.save(folder, num_frames=geometry["clip"].num_frames, size=geometry["size"],
                                  K_src=geometry["K"], depth0=geometry["depth0"])

    def trajectory(self, path_file: Path | None = None, geometry: dict | None = None):
        """The cameras of the current path exactly as ``ex4d recon --cam FILE`` builds them."""
        from ex4d.camera.trajectory import make_trajectory

        geometry = geometry if geometry is not None else self.scene_geometry()
        path_file = path_file if path_file is not None else self.path_file(geometry=geometry)
        return make_trajectory(str(path_file), num_frames=geometry["clip"].num_frames, size=geometry["size"],
                               K=geometry["K"], depth0=geometry["depth0"])

    def to_keyframes(self, frames: list[int] | None = None) -> list[Keyframe]:
        """Turn the current path into editable keyframes at ``frames`` (default: first, middle and last).

        Between keyframes the camera moves in a straight line (docs/trajectories.md), so an orbit becomes
        chords: with three keyframes over 90 degrees the middle of a chord is 7.6 % of r nearer the pivot
        (1.9 % with five); "Add keyframe" puts more on the path where it must follow the arc closely.
        """
        geometry = self.scene_geometry()
        trajectory = self.trajectory(geometry=geometry)
        pivot = geometry["pivot"]
        last = trajectory.num_frames - 1
        default = np.round(np.linspace(0, last, min(DEFAULT_KEYFRAMES, last + 1))).astype(int).tolist()
        frames = sorted(set(frames if frames is not None else default))
        source_focal = float(geometry["K"][0, 0])
        keyframes = []
        for frame in frames:
            focal = float(trajectory.K[frame, 0, 0])
            keep = None if abs(focal - source_focal) <= 1e-9 * source_focal else focal  # blank: the source's
            keyframes.append(keyframe_from_pose(frame, trajectory.cam_from_world[frame], pivot, keep))
        with self.lock:
            self.path.mode, self.path.keyframes = "keyframes", keyframes
            self.path.version += 1
        return keyframes

    def add_keyframe(self, frame: int) -> list[Keyframe]:
        """Add a keyframe at ``frame`` where the current path is there (then edit its numbers)."""
        frame = int(frame)
        if not 0 <= frame < self.num_frames:
            raise InputError(f"frame {frame} is outside the clip (0 to {self.num_frames - 1})")
        if self.path.mode != "keyframes":
            self.to_keyframes()
        geometry = self.scene_geometry()
        trajectory = self.trajectory(geometry=geometry)
        pivot = geometry["pivot"]
        existing = [k for k in self.path.keyframes if k.frame != frame]
        added = keyframe_from_pose(frame, trajectory.cam_from_world[frame], pivot)
        with self.lock:
            self.path.keyframes = sorted(existing + [added], key=lambda k: k.frame)
            self.path.version += 1
        return self.path.keyframes

    def delete_keyframe(self, frame: int) -> list[Keyframe]:
        frame = int(frame)
        if self.path.mode != "keyframes":
            raise InputError("the path is a preset; press 'Edit as keyframes' first")
        remaining = [k for k in self.path.keyframes if k.frame != frame]
        if len(remaining) == len(self.path.keyframes):
            raise InputError(f"there is no keyframe at frame {frame}; keyframes are at "
                             f"{[k.frame for k in self.path.keyframes]}")
        if not remaining:
            raise InputError("the path needs at least one keyframe; add another before deleting this one")
        with self.lock:
            self.path.keyframes = remaining
            self.path.version += 1
        return remaining

    def keyframes_edited_in_3d(self, edited: list[tuple[int, np.ndarray]]) -> None:
        """The 3D view's callback (viser's thread): dragged/added/deleted keyframes replace the table."""
        pivot = self.scene_geometry()["pivot"]
        previous = {k.frame: k for k in self.path.keyframes}
        keyframes = []
        for frame, pose in edited:
            focal = previous[frame].focal if frame in previous else None
            keyframes.append(keyframe_from_pose(int(frame), pose, pivot, focal))
        keyframes_from_rows([k.row() for k in keyframes], self.num_frames)  # same checks as the table
        with self.lock:
            self.path.mode, self.path.keyframes = "keyframes", sorted(keyframes, key=lambda k: k.frame)
            self.path.version += 1

    def import_pose_file(self, upload: str | os.PathLike) -> str:
        """Use an uploaded pose file (.json/.npz of docs/trajectories.md); checked against the clip now."""
        from ex4d.camera.posefile import POSE_FILE_SUFFIXES

        target = copy_upload(upload, new_folder(self.sub("inputs"), "path"), "pose file", tuple(POSE_FILE_SUFFIXES))
        self.trajectory(target)  # a bad file fails now, with its one line
        with self.lock:
            self.path.mode, self.path.file = "file", target
            self.path.version += 1
        return target.name

    def export_path(self, fmt: str) -> Path:
        """The current path as a downloadable pose file: ``json`` (keyframes; a preset or npz path as one
        ``cam_from_world`` keyframe per frame) or ``npz`` (the cameras, as ``camera_<name>.npz``).

        The file the preview renders (keyframes: JSON; preset: npz) is exported as is, so ``ex4d recon
        --cam`` gives bit-identical cameras from it; a preset exported as JSON goes through the JSON
        keyframe interpolation and agrees to about 1e-15 (a rounding step of the SLERP)."""
        folder = new_folder(self.sub("exports"), fmt)
        if fmt == "json":
            if self.path.mode == "keyframes" or (self.path.mode == "file" and self.path.file.suffix == ".json"):
                return self.path_file(folder)
            geometry = self.scene_geometry()
            trajectory = self.trajectory(geometry=geometry)
            return write_json(folder / "path.json", poses_json(trajectory.cam_from_world, trajectory.K,
                                                                geometry["K"]))
        if fmt == "npz":
            trajectory = self.trajectory()
            trajectory.name = "path"
            return trajectory.save(folder / "path.npz")
        raise InputError(f"export format must be json or npz, got {fmt!r}")

    # ---------------------------------------------------------------- 3D view
    def scene_view(self):
        """This session's SceneView (ex4d.app.scene3d), started on first use; None if unavailable."""
        if self.scene is not None or self.scene_error:
            return self.scene
        try:
            from ex4d.app.scene3d import SceneView

            self.scene = SceneView(host=self.app.host)
            self.scene.on_keyframes_edited(self._on_3d_edit)
        except Exception as exc:  # the 3D view is optional: the page says why and works without it
            log.warning("3D view unavailable: %s", exc, exc_info=True)
            self.scene_error = f"3D view unavailable ({type(exc).__name__}: {exc})"
        return self.scene

    def _on_3d_edit(self, edited) -> None:
        try:
            self.keyframes_edited_in_3d(edited)
        except UserError as exc:
            log.warning("3D keyframe edit refused: %s", exc)
        except Exception:
            log.exception("3D keyframe edit failed")
        self.update_scene(points=False)

    def update_scene(self, *, points: bool = True) -> None:
        """Send frame 0's points, the source camera, the path and its keyframes to the 3D view."""
        view = self.scene_view()
        if view is None or self.video is None or self.depth_file is None:
            return
        geometry = self.scene_geometry()
        if points:
            xyz, rgb = frame0_points(geometry["clip"], geometry["depth0"], geometry["K"])
            view.set_scene(xyz, rgb, mesh=frame0_mesh(geometry["clip"], geometry["depth0"], geometry["K"])
                           if self.scene_kind == "mesh" else None)
        trajectory = self.trajectory(geometry=geometry)
        if self.path.mode == "keyframes":
            keyframes = [(k.frame, trajectory.cam_from_world[k.frame]) for k in self.path.keyframes]
        else:
            keyframes = []
        view.set_cameras(geometry["K"], geometry["size"], np.eye(4), trajectory.cam_from_world, keyframes)

    def set_scene_kind(self, kind: str) -> None:
        """Draw frame 0 as ``points`` or as its DW-``mesh`` in the 3D view."""
        if kind not in SCENE_KINDS:
            raise InputError(f"the 3D view draws {' or '.join(SCENE_KINDS)}, not {kind!r}")
        self.scene_kind = kind
        self.update_scene_safely(points=True)

    def update_scene_safely(self, *, points: bool = True) -> None:
        """:meth:`update_scene`, logging instead of raising: the page works without the 3D view."""
        try:
            self.update_scene(points=points)
        except UserError:
            raise
        except Exception as exc:
            log.warning("3D view update failed: %s", exc, exc_info=True)
            self.scene_error = f"3D view failed ({type(exc).__name__}: {exc})"

    def look_through(self, frame: int) -> None:
        view = self.scene_view()
        if view is None:
            raise InputError(self.scene_error or "the 3D view is not running")
        geometry = self.scene_geometry()
        trajectory = self.trajectory(geometry=geometry)
        frame = int(np.clip(int(frame), 0, trajectory.num_frames - 1))
        view.look_through(trajectory.cam_from_world[frame], trajectory.K[frame], geometry["size"])

    def set_frame(self, frame: int) -> None:
        view = self.scene_view()
        if view is not None:
            view.set_frame(int(frame))

    # ---------------------------------------------------------------- preview
    def preview(self, progress: Report | None = None) -> PreviewResult:
        """Render colour + mask along the path into a new run folder (``ex4d recon --cam path.<ext>``)."""
        from ex4d.io.video import read_mask_video
        from ex4d.pipeline import ReconOptions, run_recon

        geometry = self.scene_geometry()  # the clip and depth opened once for the path and the render
        clip, depth = geometry["clip"], geometry["depth"]
        self.abort.clear()
        bars = step_bars(progress, self.abort)
        folder = new_folder(self.sub("runs"), "preview")
        try:
            path_file = self.path_file(folder, geometry)
            options = ReconOptions(cam=str(path_file), device=self.app.device)
            files = dict(run_recon(clip, depth, folder, options,
                                   progress=lambda it, **kw: bars(it, **{**kw, "desc": "render"})))
        except BaseException:  # aborted or failed: no half-made run folder is left
            shutil.rmtree(folder, ignore_errors=True)
            raise
        files["path"] = path_file
        visible = [float(m.mean()) for m in read_mask_video(files["mask_lossless"])]
        warning = visibility_warning(visible)
        commands = [recon_command(self.video, self.depth_file, path_file, self.num_frames, self.resize,
                                  cli_folder(folder))]
        settings = self._settings("preview", path_file=path_file, visible=visible, commands=commands)
        files["settings"] = write_settings(folder, settings)
        result = PreviewResult(folder, files, visible, warning, commands, path_file)
        self.last_preview = result
        return result

    def _settings(self, kind: str, **extra) -> dict:
        return {"kind": kind, "video": str(self.video), "num_frames": self.num_frames, "resize": self.resize,
                "depth": str(self.depth_file), "depth_source": self.depth_source,
                "path": {"mode": self.path.mode, "spec": self.path.spec if self.path.mode == "preset" else None,
                         "keyframes": [k.to_json() for k in self.path.keyframes] if self.path.mode == "keyframes"
                         else None},
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()}}

    # ---------------------------------------------------------------- generation
    def generate(self, options, progress: Report | None = None) -> GenerateResult:
        """Generate from the last preview's colour + mask into a new run folder (one job at a time),
        then evaluate the result (``ex4d eval``). ``options``: :class:`ex4d.pipeline.GenerateOptions`."""
        from ex4d.pipeline import run_generate

        from ex4d.weights_preflight import check_weights

        options.models_dir = options.models_dir if options.models_dir is not None else self.app.models_dir
        options.device = self.app.device if options.device == "auto" else options.device
        stray = [spec for spec in options.loras if spec not in self.app.loras]
        if stray:  # the app merges only what its owner gave at launch, never a path from the page
            raise InputError(f"LoRA {stray[0].path} was not given when the app was started; the app uses only "
                             f"the files of `ex4d app --lora FILE[:STRENGTH]`")
        options.validate()
        # Missing weights first: a person should learn that before making a preview for nothing.
        check_weights(generation=True, models_dir=options.models_dir, adapter=options.adapter)
        preview = self.last_preview
        if preview is None:
            raise InputError("preview the path first: generation fills in that preview's colour and mask")
        self.abort.clear()
        folder = new_folder(self.sub("runs"), "generate")
        output = folder / "final.mp4"

        bar = step_bars(progress, self.abort)

        color = preview.files["color"]
        mask = preview.files["mask_lossless"]
        with self.app.gpu_lock:  # one generation at a time, whatever the page's queue does
            if progress is not None:  # loading 40 GB takes a while: say so before the first step
                loaded = self.app.generator_cache.get("generate_key") == options.pipeline_key()
                progress(0, None, "starting" if loaded else "loading the models (the first run only)")
            try:
                run_generate(color, mask, output, options, cache=self.app.generator_cache, progress=bar)
            except BaseException:  # aborted or failed: nothing of this run is kept
                shutil.rmtree(folder, ignore_errors=True)
                raise
        files = {"final": output, "record": output.with_suffix(".json")}
        cli_preview, cli_output = cli_folder(preview.folder), cli_folder(folder) / output.name
        commands = preview.commands + [generate_command(cli_preview / color.name, cli_preview / mask.name, cli_output,
                                                        options)]
        result = GenerateResult(folder, output, files, commands)
        try:
            from ex4d.eval.evaluate import evaluate_video, write_report

            summary, arrays = evaluate_video(output, preview.files["camera"], condition=color, mask=mask)
            (folder / "eval").mkdir()
            report = write_report(folder / "eval", summary, arrays)
            files.update({f"eval_{name.split('.')[0]}": path for name, path in report.items()})
            result.eval_summary = summary
            result.commands.append(eval_command(cli_output, cli_preview / preview.files["camera"].name,
                                                cli_preview / color.name, cli_preview / mask.name,
                                                cli_folder(folder) / "eval"))
        except UserError as exc:
            result.eval_error = str(exc)
        except Exception as exc:  # the video is made; a failing report must not lose it
            log.exception("ex4d eval failed on %s", output)
            result.eval_error = f"internal error in ex4d eval: {type(exc).__name__}: {exc} (logged)"
        settings = self._settings("generate", preview=preview.folder, options=options.record(),
                                  commands=result.commands)
        files["settings"] = write_settings(folder, settings)
        self.last_generate = result
        return result

    def request_abort(self) -> None:
        self.abort.set()

    def close(self) -> None:
        if self.scene is not None:
            try:
                self.scene.close()
            except Exception:
                log.exception("closing the 3D view failed")
            self.scene = None


def frame0_points(clip, depth0: np.ndarray, K: np.ndarray, max_points: int = MAX_SCENE_POINTS):
    """Frame 0's pixels lifted to world points (N,3) float32 with colours (N,3) uint8, on a regular
    subsampling grid so that N <= max_points; the one-pixel border ring (pushed to z = 100) is left out."""
    from ex4d.conventions import pixel_rays
    from ex4d.io.video import to_uint8

    frame = next(iter(clip.iter_frames()))
    height, width = depth0.shape
    step = max(1, int(np.ceil(np.sqrt(height * width / max_points))))
    rays = pixel_rays(height, width, K)
    rows, cols = slice(1, height - 1, step), slice(1, width - 1, step)
    points = (rays[rows, cols] * depth0[rows, cols, None]).reshape(-1, 3).astype(np.float32)
    colors = to_uint8(frame[rows, cols]).reshape(-1, 3)
    keep = np.isfinite(points).all(axis=1)
    return points[keep], colors[keep]


def frame0_mesh(clip, depth0: np.ndarray, K: np.ndarray):
    """Frame 0's DW-Mesh for the 3D view: (vertices (V,3) float32, faces (F,3) of the unflagged faces,
    vertex colours (V,3) uint8). The flagged faces (occlusion edges, the border ring at z = 100) are
    left out: they are what generation fills in, and would hide the scene behind black walls."""
    from ex4d.mesh.dwmesh import build_dw_mesh

    frame = next(iter(clip.iter_frames()))
    mesh = build_dw_mesh(np.asarray(depth0, np.float32), np.asarray(frame, np.float32), np.asarray(K, np.float64))
    faces = mesh.faces[mesh.face_valid].cpu().numpy()
    colors = np.round(mesh.colors[:, :3].cpu().numpy() * 255).astype(np.uint8)
    return mesh.vertices.cpu().numpy().astype(np.float32), faces, colors


class AppBackend:
    """The app's shared state: the work folder, the sessions, the loaded generator and the GPU lock."""

    def __init__(self, workdir: str | os.PathLike, *, models_dir: str | None = None, device: str = "auto",
                 host: str = "127.0.0.1", example_size: tuple[int, int] = EXAMPLE_SIZE, loras=()):
        from ex4d.io.files import prepare_output_dir

        #: The extra Wan LoRAs given at launch (``ex4d app --lora``): the only ones a generation may use.
        self.loras = launch_loras(loras)
        self.workdir = prepare_output_dir(Path(workdir).expanduser()).resolve()
        self.models_dir, self.device, self.host = models_dir, device, host
        self.example_size = tuple(example_size)  # (H, W) of the built-in examples
        self.sessions: dict[str, Session] = {}
        self.generator_cache: dict = {}  # pipeline.cached_generator keeps the models loaded between runs
        self.gpu_lock = threading.Lock()
        self._lock = threading.Lock()
        self._example_lock = threading.Lock()

    def lora_labels(self) -> list[str]:
        """The page's label for each launch LoRA (file name and strength), in launch order."""
        return lora_labels(self.loras)

    def selected_loras(self, labels) -> tuple:
        """The launch LoRAs whose labels the page ticked, in launch order (the merge order does not
        depend on the order of the clicks, so neither does the loaded pipeline). ``labels``: a list of
        :meth:`lora_labels` entries (None or [] for none); anything else is a one-line InputError."""
        by_label = dict(zip(self.lora_labels(), self.loras))
        chosen = set()
        for label in labels or ():
            if label not in by_label:
                offered = ", ".join(by_label) or "none (start the app with --lora FILE)"
                raise InputError(f"unknown LoRA {label!r}; the app offers only those given at launch: {offered}")
            chosen.add(label)
        return tuple(spec for label, spec in by_label.items() if label in chosen)

    def example(self, scene: str, *, num_frames: int, size: tuple[int, int], fps: float = 15.0,
                progress: Report | None = None) -> Path:
        """The folder of a synthetic example (video.mp4 + depth.npz), made on first use (whole or not at all)."""
        from ex4d.checks import MAX_SYNTH_FRAMES, check_fps, check_int
        from ex4d.depth.preview import write_depth_preview
        from ex4d.io.files import atomic_dir
        from ex4d.io.video import to_uint8, write_video
        from ex4d.synthetic.scenes import SCENES, make_example

        if scene not in SCENES:
            raise InputError(f"unknown example {scene!r}; choose one of {', '.join(sorted(SCENES))}")
        num_frames = check_int(num_frames, "frames", 1, MAX_SYNTH_FRAMES, example=49)
        fps = check_fps(fps)
        height, width = (int(v) for v in size)
        folder = self.workdir / "examples" / f"{scene}-{num_frames}f-{height}x{width}-{fps:g}fps"
        with self._example_lock:  # two sessions asking for the same example make it once
            if all((folder / name).is_file() for name in ("video.mp4", "depth.npz", "depth_preview.mp4")):
                return folder
            bars = step_bars(progress, None)
            wrap = (lambda it: bars(it, total=num_frames, desc=f"example {scene}")) if progress else None
            clip, depth = make_example(scene, num_frames=num_frames, size=(height, width), fps=fps, progress=wrap)
            with atomic_dir(folder) as tmp:
                write_video(tmp / "video.mp4", to_uint8(clip.frames), clip.fps)
                depth.save(tmp / "depth.npz")
                write_depth_preview(tmp / "depth_preview.mp4", depth.depth, clip.fps)
        return folder

    def session(self, key: str | None) -> Session:
        """The session for a browser session's key (gradio's session hash), created on first use."""
        key = _safe_name(key or "default", "default")
        with self._lock:
            session = self.sessions.get(key)
            if session is None:
                folder = self.workdir / "sessions" / key
                folder.mkdir(parents=True, exist_ok=True)
                session = self.sessions[key] = Session(key=key, folder=folder, app=self)
            return session

    def end_session(self, key: str | None) -> None:
        """Close a session's 3D view when its browser tab goes; its files stay."""
        with self._lock:
            session = self.sessions.pop(_safe_name(key or "default", "default"), None)
        if session is not None:
            session.close()

    def close(self) -> None:
        for key in list(self.sessions):
            self.end_session(key)
