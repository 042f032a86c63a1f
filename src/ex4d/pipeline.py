"""The only module that chains stages: video -> depth -> DW-Mesh render -> (generation).

Each function here is what one CLI command does, usable from Python too. Stages write their files
atomically; a stage whose output already exists *and matches* its inputs and settings is skipped
(recorded in the output folder's ``recon.json`` / the depth file's ``settings``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ex4d.conventions import reference_intrinsics
from ex4d.errors import InputError
from ex4d.io.files import atomic_path, prepare_output_dir, require_file
from ex4d.io.video import read_video, reference_size, resize_frames, to_float01
from ex4d.types import Clip, DepthVideo

log = logging.getLogger(__name__)

Progress = Callable[..., Iterable]

def load_clip(video: str | os.PathLike, *, num_frames: int = 49, resize: str = "reference",
              max_res: int = 1024) -> Clip:
    """Read the first ``num_frames`` frames of ``video`` as a :class:`Clip` (float [0,1]).

    resize: ``"reference"`` rounds H and W to multiples of 64 with the long side capped at
    ``max_res`` (as the reference does; the published weights saw such inputs), ``"keep"`` keeps the
    size (rounded down to even, which H.264 needs).
    """
    if num_frames < 1:
        raise InputError(f"--num-frames must be >= 1, got {num_frames}")
    frames, fps = read_video(video, num_frames)
    height, width = frames.shape[1:3]
    if resize == "reference":
        size = reference_size(height, width, max_res=max_res)
    elif resize == "keep":
        size = (height - height % 2, width - width % 2)
    else:
        raise InputError(f"unknown --resize {resize!r}; use 'reference' or 'keep'")
    return Clip(frames=to_float01(resize_frames(frames, size)), fps=fps, source=str(Path(video).resolve()))


def _file_fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file (absolute path, size, mtime) for reuse checks."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _depth_request(clip: Clip, depth_spec: str, estimator_options: dict) -> dict:
    """What a cached ``depth.npz`` must have been made from for it to be reused."""
    request = {"source": _file_fingerprint(clip.source), "num_frames": clip.num_frames, "size": list(clip.size)}
    if Path(depth_spec).suffix.lower() in (".npz", ".npy"):
        request["depth_file"] = _file_fingerprint(depth_spec)
    else:
        request["estimator"] = depth_spec
        if estimator_options:
            request["estimator_options"] = {k: estimator_options[k] for k in sorted(estimator_options)}
    return request


def _load_cached_depth(path: Path, request: dict) -> DepthVideo | None:
    """Return the DepthVideo at ``path`` if it exists and was made from ``request``; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            settings = json.loads(str(data["settings"]))
            if settings.get("request") != request:
                return None
            K = data["K"]
            return DepthVideo(depth=data["depth"], valid=data["valid"], K=K if K.size else None,
                              estimator=str(data["estimator"]), settings=settings)
    except Exception:  # unreadable cache: recompute rather than fail
        log.warning("ignoring unreadable cached depth %s", path)
        return None


def estimate_depth(clip: Clip, depth_spec: str, *, out_dir: str | os.PathLike | None = None,
                   models_dir: str | None = None, device: str = "auto", progress: Progress | None = None,
                   reuse: bool = True, estimator=None, estimator_options: dict | None = None) -> DepthVideo:
    """Depth for ``clip`` from an estimator name or a depth file, reusing ``out_dir/depth.npz``.

    A file (``.npz``/``.npy``) is loaded, checked and resized to the clip. An estimator name runs
    that estimator (weights resolved as documented in docs/depth.md; pass an already loaded
    ``estimator`` to reuse it across clips, as batch jobs do; ``estimator_options`` are passed to
    :func:`ex4d.depth.get_estimator`, e.g. ``compile``). When ``out_dir`` is given
    the result is saved there as ``depth.npz`` and reused next time if the source video, frame
    count, size and depth source are unchanged.
    """
    estimator_options = dict(estimator_options or {})
    request = _depth_request(clip, depth_spec, estimator_options)
    cache_path = Path(out_dir) / "depth.npz" if out_dir is not None else None
    if reuse and cache_path is not None:
        cached = _load_cached_depth(cache_path, request)
        if cached is not None:
            log.info("reusing %s", cache_path)
            return cached

    is_file = Path(depth_spec).suffix.lower() in (".npz", ".npy")
    if is_file:
        from ex4d.depth import load_depth_file

        require_file(depth_spec, "depth file")
        depth = load_depth_file(depth_spec, num_frames=clip.num_frames, size=clip.size)
    else:
        if estimator is None:
            from ex4d.depth import get_estimator  # raises a clear error for an unknown name

            estimator = get_estimator(depth_spec, models_dir=models_dir, device=device, progress=progress,
                                      **estimator_options)
        depth = estimator.estimate(clip.frames)
    depth.settings = {**depth.settings, "request": request}
    if cache_path is not None and (not is_file or Path(depth_spec).resolve() != cache_path.resolve()):
        depth.save(cache_path)
    return depth


@dataclass
class ReconOptions:
    """Settings of the reconstruction stage (see ``ex4d recon --help``)."""

    cam: str = "90"
    cap: str = "none"
    filter: str = "angle"
    stretch_test: bool = False
    watertight: bool = True
    only_first_frame: bool = False
    save_mesh: str = "first"  # "none" | "first" | "all"
    fps: float | None = None  # None: the source's
    resample: bool = False
    antialias: str = "analytic"  # "analytic" (like the reference's) | "msaa" | "none"
    device: str = "auto"


def run_recon(clip: Clip, depth: DepthVideo, out_dir: str | os.PathLike, options: ReconOptions,
              progress: Progress | None = None) -> dict[str, Path]:
    """Render ``clip`` + ``depth`` along ``options.cam``; write color/mask/camera/mesh files.

    Files in ``out_dir`` (``<cam>`` = the trajectory's name): ``color_<cam>.mp4``,
    ``mask_<cam>.mp4``, ``mask_<cam>.mkv`` (lossless), ``camera_<cam>.npz``, ``DW-Mesh.ply`` (frame 0;
    ``DW-Mesh_<k>.ply`` for every frame with save_mesh="all") and ``recon_<cam>.json`` (settings).
    Returns the written paths by role.
    """
    from ex4d.camera.trajectory import make_trajectory
    from ex4d.mesh.dwmesh import export_ply
    from ex4d.render.condition import render_condition

    out_dir = prepare_output_dir(out_dir)
    if depth.depth.shape[0] != clip.num_frames or depth.depth.shape[1:] != clip.size:
        raise InputError(f"depth is {depth.depth.shape} but the clip is {(clip.num_frames, *clip.size)}")
    device = _resolve_device(options.device)
    K_src = depth.K if depth.K is not None else reference_intrinsics(*clip.size)
    trajectory = make_trajectory(options.cam, num_frames=clip.num_frames, size=clip.size, K=K_src,
                                 depth0=depth.depth[0], resample=options.resample)
    fps = float(options.fps) if options.fps else clip.fps
    mesh_options = dict(cap=options.cap, filter=options.filter, stretch_test=options.stretch_test,
                        watertight=options.watertight)
    written: dict[str, Path] = {}

    def save_mesh(k: int, mesh) -> None:
        # Meshes are exported as the renderer builds them, so none is built twice.
        if options.save_mesh == "all":
            written[f"mesh_{k}"] = export_ply(mesh, out_dir / f"DW-Mesh_{k:04d}.ply")
        elif options.save_mesh == "first" and k == 0:
            written["mesh"] = export_ply(mesh, out_dir / "DW-Mesh.ply")

    condition = render_condition(clip.frames, depth.depth, K_src, trajectory, **mesh_options,
                                 only_first_frame=options.only_first_frame, device=str(device), fps=fps,
                                 progress=progress, antialias=options.antialias,
                                 mesh_callback=None if options.save_mesh == "none" else save_mesh)
    written.update(condition.save(out_dir))
    written["camera"] = trajectory.save(out_dir / f"camera_{trajectory.name}.npz")

    record = {
        "source": clip.source, "num_frames": clip.num_frames, "size": list(clip.size), "fps": fps,
        "depth": {"estimator": depth.estimator, "settings": depth.settings},
        "trajectory": {"name": trajectory.name, "settings": trajectory.settings},
        "options": {**mesh_options, "only_first_frame": options.only_first_frame,
                    "save_mesh": options.save_mesh, "antialias": options.antialias},
        "render": condition.settings,
        "files": {role: path.name for role, path in written.items()},
    }
    with atomic_path(out_dir / f"recon_{trajectory.name}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    written["record"] = out_dir / f"recon_{trajectory.name}.json"
    return written


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return device


def stable_hash(obj) -> str:
    """Short hash of a JSON-serialisable object (for skip-if-unchanged checks)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
