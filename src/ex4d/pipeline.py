"""The only module that chains stages: video -> depth -> DW-Mesh render -> (generation).

Each function here is what one CLI command does, usable from Python too. Stages write their files
atomically; a stage whose output already exists *and matches* its inputs and settings is skipped
(recorded in the output folder's ``recon.json`` / the depth file's ``settings``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ex4d.conventions import reference_intrinsics
from ex4d.devices import resolve_device
from ex4d.errors import InputError
from ex4d.io.files import (atomic_path, check_outputs, forget_output, is_ex4d_file, prepare_output_dir,
                           protect_inputs, require_file)
from ex4d.io.video import reference_size, to_float01
from ex4d.types import Clip, DepthVideo

log = logging.getLogger(__name__)

Progress = Callable[..., Iterable]

def load_clip(video: str | os.PathLike, *, num_frames: int = 49, resize: str = "reference",
              max_res: int = 1024) -> Clip:
    """Open the first ``num_frames`` frames of ``video`` as a lazy :class:`Clip` (float [0,1]).

    The video is decoded once to check that it has the frames (nothing is kept); frames are decoded
    again, one at a time, when used (:meth:`Clip.iter_frames`), so memory does not grow with T.
    resize: ``"reference"`` rounds H and W to multiples of 64 with the long side capped at
    ``max_res`` (as the reference does; the published weights saw such inputs), ``"keep"`` keeps the
    size (rounded down to even, which H.264 needs).
    """
    from ex4d.io.video import iter_video, probe_video

    if num_frames < 1:
        raise InputError(f"--num-frames must be >= 1, got {num_frames}")
    if resize not in ("reference", "keep"):
        raise InputError(f"unknown --resize {resize!r}; use 'reference' or 'keep'")
    count, (height, width), fps = probe_video(video, num_frames)
    if resize == "reference":
        size = reference_size(height, width, max_res=max_res)
    else:
        size = (height - height % 2, width - width % 2)
    source = str(Path(video).resolve())

    def reader():
        for frame in iter_video(video, num_frames, size=size):
            yield to_float01(frame)

    identity = {"source": _file_fingerprint(video), "num_frames": int(num_frames), "size": list(size),
                "resize": resize, "max_res": int(max_res)}
    return Clip(fps=fps, source=source, reader=reader, num_frames=count, size=size, identity=identity)


def _file_fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file (absolute path, size, mtime) for reuse checks."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_depth_file(depth_spec: str) -> bool:
    return Path(depth_spec).suffix.lower() in (".npz", ".npy")


def _depth_request(clip: Clip, depth_spec: str, estimator_options: dict,
                   models_dir: str | os.PathLike | None = None) -> dict:
    """What a cached ``depth.npz`` must have been made from for it to be reused: the video, frames and
    size, and the depth file or the estimator with its options and the identity of its weight files."""
    from ex4d.depth.weights import estimator_weight_paths

    source = _file_fingerprint(clip.source) if clip.source and Path(clip.source).is_file() else clip.source
    request = {"source": source, "num_frames": clip.num_frames, "size": list(clip.size)}
    if _is_depth_file(depth_spec):
        request["depth_file"] = _file_fingerprint(require_file(depth_spec, "depth file"))
    else:
        request["estimator"] = depth_spec
        request["weights"] = [[path, _file_fingerprint(path) if Path(path).is_file() else None]
                              for path in estimator_weight_paths(depth_spec, models_dir)]
        if estimator_options:
            request["estimator_options"] = {k: estimator_options[k] for k in sorted(estimator_options)}
    return request


def _load_cached_depth(path: Path, request: dict) -> DepthVideo | None:
    """Return the DepthVideo at ``path`` (frames read lazily) if it was made from ``request``; else None."""
    if not path.is_file():
        return None
    try:
        cached = DepthVideo.load(path)
        if cached.settings.get("request") != json.loads(json.dumps(request, default=str)):
            return None
        return cached
    except Exception:  # unreadable cache: recompute rather than fail
        log.warning("ignoring unreadable cached depth %s", path)
        return None


#: Bytes of memory per pixel of one frame while recon streams it (mesh build + render + encode);
#: measured peak growth at 512x512 (bench/bench_recon_memory.py) with a margin.
RECON_BYTES_PER_PIXEL = 800
#: Bytes per pixel and frame an estimator holds (the clip as float32 RGB, the depth, its work arrays).
ESTIMATOR_BYTES_PER_PIXEL_FRAME = 48
#: Frames a streaming estimator holds at most (a DepthCrafter window of 110 plus a chunk; far fewer for
#: Depth Anything), for the memory check.
STREAMING_FRAMES_HELD = 128


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse (one-line InputError) work that needs more memory than is available."""
    available = available_memory()
    if available is not None and needed > available:
        raise InputError(f"{what} needs about {needed / 2**30:.1f} GiB of memory but {available / 2**30:.1f} GiB "
                         f"is available; {fix}")


def estimate_depth(clip: Clip, depth_spec: str, *, out_dir: str | os.PathLike | None = None,
                   models_dir: str | None = None, device: str = "auto", progress: Progress | None = None,
                   reuse: bool = True, estimator=None, estimator_options: dict | None = None) -> DepthVideo:
    """Depth for ``clip`` from an estimator name or a depth file, reusing ``out_dir/depth.npz``.

    A file (``.npz``/``.npy``) is checked and fitted to the clip one frame at a time. An estimator
    name runs that estimator (weights resolved as documented in docs/depth.md; pass an already loaded
    ``estimator`` to reuse it across clips, as batch jobs do; ``estimator_options`` are passed to
    :func:`ex4d.depth.get_estimator`, e.g. ``compile``). Estimators that stream (``streams = True``:
    Depth Anything, DepthCrafter) get the lazy clip and read it frame by frame / window by window,
    spilling their raw output to a temporary ``.npy`` in ``out_dir`` for the clip-level normalisation,
    so memory does not grow with T; any other estimator gets ``clip.frames`` and a clip too large for
    the available memory is refused first. When ``out_dir`` is given the result is saved there as
    ``depth.npz`` (uncompressed, written and read back frame by frame) and reused next time if the
    source video, frame count, size and depth source are unchanged; the returned DepthVideo then reads
    its frames from that file when used, so memory does not grow with T.
    """
    from ex4d.io.files import check_output

    estimator_options = dict(estimator_options or {})
    request = _depth_request(clip, depth_spec, estimator_options, models_dir)
    cache_path = Path(out_dir) / "depth.npz" if out_dir is not None else None
    if reuse and cache_path is not None:
        cached = _load_cached_depth(cache_path, request)
        if cached is not None:
            log.info("reusing %s", cache_path)
            return cached

    is_file = _is_depth_file(depth_spec)
    writes_cache = cache_path is not None and (not is_file or Path(depth_spec).resolve() != cache_path.resolve())
    if is_file:
        from ex4d.depth.files import DepthFile

        require_file(depth_spec, "depth file")
        if writes_cache:
            check_output(cache_path)  # before reading the file, not after
        depth = DepthFile(depth_spec, num_frames=clip.num_frames, size=clip.size).video()
    else:
        if writes_cache:
            check_output(cache_path)  # before the estimator runs, not after
        from ex4d.depth import ESTIMATORS

        height, width = clip.size
        streams = getattr(estimator, "streams", False) if estimator is not None else \
            depth_spec.lower().replace("_", "-") in ESTIMATORS
        held = min(clip.num_frames, STREAMING_FRAMES_HELD) if streams else clip.num_frames
        check_memory(held * height * width * ESTIMATOR_BYTES_PER_PIXEL_FRAME,
                     f"depth estimation of {clip.num_frames} frames at {width}x{height}",
                     "use fewer --num-frames, --resize reference, or give a depth file (--depth x.npy)")
        if estimator is None:
            from ex4d.depth import get_estimator  # raises a clear error for an unknown name

            estimator = get_estimator(depth_spec, models_dir=models_dir, device=device, progress=progress,
                                      **estimator_options)
        if getattr(estimator, "streams", False):
            depth = estimator.estimate(clip, spill_dir=out_dir)  # frames read lazily, raw output spilled
        else:
            depth = estimator.estimate(clip.frames)
    depth.settings = {**depth.settings, "request": request}
    if writes_cache:
        from ex4d.io.arrays import release_frames

        try:
            depth.save(cache_path)
        finally:
            release_frames(depth.depth, depth.valid)  # deletes a spilled temporary now, not at exit
        return DepthVideo.load(cache_path)  # frames from the file: the estimate's arrays can be freed
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
    pixel_convention: str = "centers"  # "centers" (integer pixel centres) | "reference" (pixel corners)


class ReconResult(dict):
    """The written paths by role (a dict), plus ``reused``: True if the outputs were already current."""

    reused: bool = False


def plan_recon_outputs(out_dir: str | os.PathLike, options: ReconOptions, *, num_frames: int,
                       depth_spec: str | None = None) -> list[Path]:
    """Every file ``recon`` will write into ``out_dir`` (for :func:`ex4d.io.files.check_outputs` before
    any work): depth.npz (unless ``depth_spec`` is that file itself, or None), color/mask/camera/record
    files of the trajectory, and the DW-Mesh PLY files of ``options.save_mesh``."""
    from ex4d.camera.trajectory import is_stereo_spec, trajectory_name

    out_dir = Path(out_dir)
    name = trajectory_name(options.cam)
    paths = []
    if depth_spec is not None and not (_is_depth_file(depth_spec) and
                                       Path(depth_spec).resolve() == (out_dir / "depth.npz").resolve()):
        paths.append(out_dir / "depth.npz")
    paths += [out_dir / f"color_{name}.mp4", out_dir / f"mask_{name}.mp4", out_dir / f"mask_{name}.mkv",
              out_dir / f"camera_{name}.npz"]
    if is_stereo_spec(options.cam):  # the left eye, as rendered (frames, size, fps), for ex4d stereo-pack
        paths.append(out_dir / f"left_{name}.mp4")
    if options.save_mesh == "first":
        paths.append(out_dir / "DW-Mesh.ply")
    elif options.save_mesh == "all":
        paths += [out_dir / f"DW-Mesh_{k:04d}.ply" for k in range(1 if options.only_first_frame else num_frames)]
    paths.append(out_dir / f"recon_{name}.json")
    return paths


def check_recon_outputs(video: str | os.PathLike, out_dir: str | os.PathLike, options: ReconOptions, *,
                        num_frames: int, depth_spec: str | None = None) -> list[Path]:
    """Before any work: register the inputs (video, depth file, pose file) and refuse planned outputs
    that are inputs or foreign files (one-line InputError; ``--overwrite`` allows foreign files).
    Returns the planned paths."""
    from ex4d.io.files import check_outputs, protect_inputs, require_file

    require_file(video, "input video")
    if depth_spec is not None and _is_depth_file(depth_spec):
        require_file(depth_spec, "depth file (--depth)")
    if Path(str(options.cam).strip()).is_file():
        protect_inputs(str(options.cam).strip())
    planned = plan_recon_outputs(out_dir, options, num_frames=num_frames, depth_spec=depth_spec)
    check_outputs(planned)
    return planned


def check_depth_outputs(video: str | os.PathLike, out_dir: str | os.PathLike, depth_spec: str, *,
                        preview: bool = True) -> list[Path]:
    """``ex4d depth`` before any work: inputs registered, depth.npz and depth_preview.mp4 checked."""
    from ex4d.io.files import check_outputs, require_file

    require_file(video, "input video")
    out_dir = Path(out_dir)
    planned = []
    if _is_depth_file(depth_spec):
        require_file(depth_spec, "depth file (--depth)")
    if not (_is_depth_file(depth_spec) and Path(depth_spec).resolve() == (out_dir / "depth.npz").resolve()):
        planned.append(out_dir / "depth.npz")
    if preview:
        planned.append(out_dir / "depth_preview.mp4")
    check_outputs(planned)
    return planned


def run_recon(clip: Clip, depth: DepthVideo, out_dir: str | os.PathLike, options: ReconOptions,
              progress: Progress | None = None, *, condition_sink=None) -> ReconResult:
    """Render ``clip`` + ``depth`` along ``options.cam``; write color/mask/camera/mesh files.

    Files in ``out_dir`` (``<cam>`` = the trajectory's name): ``color_<cam>.mp4``,
    ``mask_<cam>.mp4``, ``mask_<cam>.mkv`` (lossless), ``camera_<cam>.npz``, ``DW-Mesh.ply`` (frame 0;
    ``DW-Mesh_<k>.ply`` for every frame with save_mesh="all") and ``recon_<cam>.json`` (settings and
    the sha256 of every file). Returns the written paths by role (``.reused``: already current).

    Frames stream from the clip and the depth through mesh, render and encoder one at a time, so
    memory does not grow with the frame count. The set is written as a whole: files are rendered
    into a staging folder (``.recon_<cam>.partial-...``), then the old record is retracted, the files
    are renamed into place and the new record is written last. An interrupted run leaves either the
    old set with its record, or no record at all; never a record that calls a mixed set current.
    Reuse needs the record's request to match and every file's sha256 to match the record.
    ``condition_sink(index, colour, mask)``: called (on an encoder thread, in order) with each frame of
    the condition as its files will decode, as soon as the colour encoder has it (``ConditionWriter(
    frame_sink=)``; :meth:`ReconAhead.sink`); not called when the outputs are reused.
    """
    from ex4d.camera.trajectory import make_trajectory
    from ex4d.io.arrays import frames_sha1, iter_frames
    from ex4d.io.files import check_outputs, sweep_folder
    from ex4d.render.rasterizer import check_pixel_convention

    out_dir = prepare_output_dir(out_dir)
    sweep_folder(out_dir)  # staging folders and temporaries of killed runs
    check_pixel_convention(options.pixel_convention)
    depth_shape = tuple(int(s) for s in depth.depth.shape)
    if depth_shape[0] != clip.num_frames or depth_shape[1:] != clip.size:
        raise InputError(f"depth is {depth_shape} but the clip is {(clip.num_frames, *clip.size)}")
    planned = plan_recon_outputs(out_dir, options, num_frames=clip.num_frames)
    check_outputs(planned)
    height, width = clip.size
    check_memory(height * width * RECON_BYTES_PER_PIXEL, f"rendering {width}x{height} frames",
                 "use --resize reference or a smaller video")
    device = resolve_device(options.device)
    K_src = depth.K if depth.K is not None else reference_intrinsics(*clip.size)
    trajectory = make_trajectory(options.cam, num_frames=clip.num_frames, size=clip.size, K=K_src,
                                 depth0=np.asarray(depth.depth[0]), resample=options.resample,
                                 depth_metric=_depth_is_metric(depth))
    fps = float(options.fps) if options.fps else clip.fps
    mesh_options = dict(cap=options.cap, filter=options.filter, stretch_test=options.stretch_test,
                        watertight=options.watertight)
    record_path = out_dir / f"recon_{trajectory.name}.json"
    request = {
        "source": _file_fingerprint(clip.source) if clip.source and Path(clip.source).is_file() else clip.source,
        "frames": clip.identity(),
        "depth": frames_sha1(depth.depth),
        "K_src": np.asarray(K_src).tolist(), "fps": fps,
        "trajectory": stable_hash([trajectory.cam_from_world.tolist(), trajectory.K.tolist()]),
        "options": {k: v for k, v in vars(options).items() if k not in ("device", "fps")},
    }
    previous = _current_outputs(record_path, request, out_dir)
    if previous is not None:
        log.info("recon outputs in %s are up to date", out_dir)
        result = ReconResult(previous)
        result.reused = True
        return result

    staging = out_dir / f".recon_{trajectory.name}{_staging_tag()}"
    staging.mkdir(mode=0o777)
    try:
        staged, settings = _render_into(staging, clip, depth, K_src, trajectory, options, mesh_options, fps,
                                        device, progress, iter_frames, condition_sink)
        digests = {path.name: _sha256(path) for path in staged.values()}
        record = {
            "request": request,
            "source": clip.source, "num_frames": clip.num_frames, "size": list(clip.size), "fps": fps,
            "depth": {"estimator": depth.estimator, "settings": depth.settings},
            "trajectory": {"name": trajectory.name, "settings": trajectory.settings},
            "options": {**mesh_options, "only_first_frame": options.only_first_frame,
                        "save_mesh": options.save_mesh, "antialias": options.antialias,
                        "pixel_convention": options.pixel_convention},
            "render": settings,
            "files": {**{role: path.name for role, path in staged.items()}, "record": record_path.name},
            "sha256": digests,
        }
        written = _publish(out_dir, staged, record_path, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReconResult(written)


def _depth_is_metric(depth: DepthVideo) -> bool:
    """Whether ``depth`` may be taken as metres: an estimator that says so in its settings (``metric``:
    Video Depth Anything's metric models), else not from DepthCrafter / Depth Anything / relative Video
    Depth Anything (relative depth, also when read back from their depth.npz), so from a depth file of
    another tool or a scene."""
    metric = (depth.settings or {}).get("metric")
    if isinstance(metric, bool):
        return metric
    name = str(depth.estimator or "").lower().replace("_", "-").replace(" ", "-")
    if name.startswith("vda"):
        return "metric" in name
    return not any(key in name for key in ("depthcrafter", "depth-anything", "depthanything"))


def _staging_tag() -> str:
    """``.partial-<host>-<pid>-<random>``: the temporary-name scheme of :mod:`ex4d.io.files`, so that a
    staging folder of a killed run is swept like any other temporary."""
    from ex4d.io.files import temporary_tag

    return temporary_tag()


def _render_into(staging: Path, clip: Clip, depth: DepthVideo, K_src, trajectory, options: ReconOptions,
                 mesh_options: dict, fps: float, device, progress, iter_frames,
                 condition_sink=None) -> tuple[dict[str, Path], dict]:
    """Render and encode the condition, meshes and camera file into ``staging``, frame by frame."""
    from concurrent.futures import ThreadPoolExecutor

    from ex4d.io.arrays import read_ahead
    from ex4d.mesh.dwmesh import export_ply
    from ex4d.render.condition import iter_condition
    from ex4d.types import ConditionWriter

    staged: dict[str, Path] = {}
    exports: list = []  # (role, future of the written path), in frame order

    def save_mesh(k: int, mesh) -> None:
        # Meshes are exported as the renderer builds them, so none is built twice, and on a thread of
        # their own while the next frames render. At most one waits: memory stays flat with "all".
        if options.save_mesh == "all":
            role, name = f"mesh_{k}", f"DW-Mesh_{k:04d}.ply"
        elif options.save_mesh == "first" and k == 0:
            role, name = "mesh", "DW-Mesh.ply"
        else:
            return
        if exports:
            exports[-1][1].result()
        exports.append((role, exporter.submit(export_ply, mesh, staging / name)))

    settings: dict = {}
    render = iter_condition
    stereo = trajectory.settings.get("kind") == "stereo"
    if stereo:  # the right eye: frame 0 is rendered too (ex4d.stereo.render)
        from ex4d.stereo.render import iter_stereo_condition

        stats: dict = {}
        render = functools.partial(iter_stereo_condition, stats=stats)
    # The video decodes and the depth reads one frame ahead, on threads, while the frame before renders.
    stream = render(read_ahead(clip.iter_frames()), read_ahead(iter_frames(depth.depth)), K_src, trajectory,
                    size=clip.size, num_frames=clip.num_frames, **mesh_options, only_first_frame=options.only_first_frame,
                    device=str(device), progress=progress, antialias=options.antialias,
                    pixel_convention=options.pixel_convention,
                    mesh_callback=None if options.save_mesh == "none" else save_mesh, settings=settings)
    with ThreadPoolExecutor(1, thread_name_prefix="export mesh") as exporter:
        with ConditionWriter(staging, trajectory.name, fps, frame_sink=condition_sink) as writer:
            for color, mask in stream:
                writer.write(color, mask)
        staged.update((role, written.result()) for role, written in exports)
    staged.update(writer.paths)
    if stereo:
        from ex4d.io.video import VideoWriter, to_uint8

        settings.update(stats)
        with VideoWriter(staging / f"left_{trajectory.name}.mp4", fps) as left:
            for frame in clip.iter_frames():
                left.write(to_uint8(frame))
        staged["left"] = left.path
    staged["camera"] = trajectory.save(staging / f"camera_{trajectory.name}.npz")
    return staged, settings


def _publish(out_dir: Path, staged: dict[str, Path], record_path: Path, record: dict) -> dict[str, Path]:
    """Swap a staged output set in: retract the old record, rename the files in, write the record last.

    SIGINT is held back until the set is complete (a few renames), so that Ctrl-C never leaves a
    half-swapped set; a crash (SIGKILL) in between leaves no record, so nothing is reused.
    """
    from ex4d.io.files import atomic_path, forget_output

    written: dict[str, Path] = {}
    with _sigint_deferred():
        forget_output(record_path)
        if record_path.exists() or record_path.is_symlink():  # a foreign record, replaced under --overwrite
            record_path.unlink()
        for role, path in staged.items():
            final = out_dir / path.name
            with atomic_path(final) as tmp:
                os.replace(path, tmp)
            written[role] = final
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str))
        written["record"] = record_path
    return written


@contextlib.contextmanager
def _sigint_deferred():
    """Hold SIGINT (Ctrl-C) and SIGTERM back inside the block; after it, the first one caught is handled
    as it would have been (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)  # e.g. the CLI's SIGTERM handler, or Python's KeyboardInterrupt
        elif handler == signal.SIG_DFL and caught[0] == signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)
        raise KeyboardInterrupt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _current_outputs(record_path: Path, request: dict, out_dir: Path) -> dict[str, Path] | None:
    """The files of a previous recon run if its record matches ``request`` and every file still has the
    content the record hashed (sha256); else None."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or json.loads(json.dumps(request, default=str)) != record.get("request"):
        return None
    files = {role: out_dir / name for role, name in (record.get("files") or {}).items()}
    digests = record.get("sha256")
    if not files or not isinstance(digests, dict) or not all(path.is_file() for path in files.values()):
        return None
    for role, path in files.items():
        if role != "record" and (path.name not in digests or _sha256(path) != digests[path.name]):
            log.info("%s changed since %s was written; rendering again", path, record_path.name)
            return None
    return files


def stable_hash(obj) -> str:
    """Short hash of a JSON-serialisable object (for skip-if-unchanged checks)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Generation (Wan2.1-I2V-14B + the EX-4D adapter)


@dataclass
class GenerateOptions:
    """Settings of the generation stage (see ``ex4d generate --help``).

    The first group decides what is computed; the second only how fast and in how much memory,
    and together with ``models_dir``/``adapter``/``device``/``loras`` it decides the loaded pipeline
    (:meth:`pipeline_key`).

    Sampler: ``preset`` (``full``: 25 steps, guidance 5, shift 5, the reference's; ``fast``: 4 steps,
    guidance 1, shift 5, for a step/CFG-distillation LoRA) gives ``steps``, ``cfg`` (the guidance
    scale) and ``shift`` where they are None; values given explicitly win. After construction the
    three always hold numbers. ``loras``: extra Wan LoRAs, ``FILE[:STRENGTH]`` strings or
    ``(file, strength)`` pairs, merged in order. ``prompt_cache``: folder of cached prompt
    embeddings (None: ``<models_dir>/prompt_cache``, or the user cache folder without a models
    folder; ``off``: no cache).
    """

    seed: int = 0
    steps: int | None = None  # None: the preset's (25 full, 4 fast)
    cfg: float | None = None  # guidance scale; None: the preset's (5 full, 1 fast = no CFG)
    prompt: str | None = None  # None: the reference's fixed prompt
    negative_prompt: str | None = None  # None: Wan's standard negative prompt
    size: str = "512x512"
    num_frames: int | None = None  # None: every frame of the colour video (4k+1)
    fps: float | None = None  # None: the colour video's (the source's frame rate)
    erode: bool = True
    window: int = 49  # longer clips are generated in overlapping windows of this many frames
    overlap: int = 17
    models_dir: str | None = None
    adapter: str | None = None
    device: str = "auto"
    merge_lora: bool = True
    attention: str | None = None
    compile: bool = False
    batch_cfg: bool | None = None  # None: batched only when offloading (measured faster there)
    low_vram: bool = False
    vram_budget: float | None = None  # GiB for --low-vram (None: the GPU's memory); more resident blocks
    cpu_offload: bool = False
    fp8: bool = False
    shift: float | None = None  # flow-matching shift; None: the preset's (5)
    preset: str = "full"
    loras: tuple = ()  # extra Wan LoRAs: "FILE[:STRENGTH]" or (file, strength), merged in order
    prompt_cache: str | None = None  # None: <models_dir>/prompt_cache (or the user cache); "off": none

    def __post_init__(self):
        from ex4d.diffusion.pipeline import SAMPLER_PRESETS

        preset = SAMPLER_PRESETS.get(str(self.preset).strip().lower()) if isinstance(self.preset, str) else None
        if preset is None:
            raise InputError(f"--preset must be one of {', '.join(SAMPLER_PRESETS)}, got {self.preset!r}; "
                             f"e.g. --preset fast (with a step-distillation --lora)")
        self.preset = str(self.preset).strip().lower()
        if self.steps is None:
            self.steps = preset["steps"]
        if self.cfg is None:
            self.cfg = preset["guidance"]
        if self.shift is None:
            self.shift = preset["shift"]
        from ex4d.diffusion.weights.lora import parse_lora_specs

        self.loras = parse_lora_specs(self.loras)

    def lora_identities(self) -> list[dict]:
        """Each extra LoRA's path, size, mtime and strength (cached pipelines and records compare these)."""
        return [spec.identity() for spec in self.loras]

    def pipeline_key(self) -> tuple:
        """What the loaded pipeline depends on; jobs with equal keys share one loaded pipeline."""
        loras = tuple(tuple(sorted(item.items())) for item in self.lora_identities())
        return (self.models_dir, self.adapter, str(resolve_device(self.device)), self.merge_lora, self.attention,
                self.compile, self.batch_cfg, self.low_vram, self.vram_budget, self.cpu_offload, self.fp8, loras)

    def call_kwargs(self) -> dict:
        from ex4d.diffusion.pipeline import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT

        return dict(prompt=self.prompt if self.prompt is not None else DEFAULT_PROMPT,
                    negative_prompt=self.negative_prompt if self.negative_prompt is not None
                    else DEFAULT_NEGATIVE_PROMPT,
                    num_inference_steps=self.steps, guidance_scale=self.cfg, shift=self.shift)

    def validate(self) -> "GenerateOptions":
        """Check every number (and that every --lora file exists) before any work starts; a one-line
        InputError names the option and its range."""
        from ex4d.checks import (
            MAX_GENERATE_SIDE,
            MAX_STEPS,
            check_4k1,
            check_cfg,
            check_fps,
            check_int,
            check_positive,
            check_seed,
            check_shift,
            check_windows,
        )
        from ex4d.diffusion.conditioning import parse_size
        from ex4d.diffusion.weights.lora import check_lora_files

        check_seed(self.seed)
        check_int(self.steps, "--steps", 1, MAX_STEPS, example=25)
        check_cfg(self.cfg)
        check_shift(self.shift)
        check_fps(self.fps, "--fps", default="or 'source' for the colour video's rate")
        parse_size(self.size, (512, 512), max_side=MAX_GENERATE_SIDE)
        if self.num_frames is not None:
            check_4k1(self.num_frames, "--num-frames", "the generator")
        check_windows(self.window, self.overlap)
        check_positive(self.vram_budget, "--vram-budget", "20")
        check_lora_files(self.loras)
        return self

    def record(self) -> dict:
        """The settings that change the output video (for skip-if-unchanged checks).

        ``shift`` and ``loras`` appear only when they differ from the reference's (5, none), so that
        records written before they existed still match the same settings.
        """
        from ex4d.diffusion.pipeline import FLOW_SHIFT

        record = {k: getattr(self, k) for k in ("seed", "steps", "cfg", "prompt", "negative_prompt", "size",
                                                  "num_frames", "fps", "erode", "window", "overlap", "models_dir",
                                                  "adapter", "merge_lora", "fp8")}
        if self.shift != FLOW_SHIFT:
            record["shift"] = self.shift
        if self.loras:
            record["loras"] = self.lora_identities()
        return record

    def prompt_cache_dir(self) -> Path | None:
        """Where cached prompt embeddings live (None: the cache is off)."""
        from ex4d.diffusion.prompt_cache import default_cache_dir, resolve_cache_dir

        if self.prompt_cache is None and self.models_dir is not None:
            return Path(self.models_dir).expanduser() / "prompt_cache"
        return resolve_cache_dir(self.prompt_cache) if self.prompt_cache is not None else default_cache_dir()


def _planned_tokens(options: GenerateOptions) -> int:
    """Video tokens of one generation window at ``options.size`` (for the low-VRAM memory plan)."""
    from ex4d.diffusion.parallel import num_video_tokens

    try:
        height, width = (int(v) for v in str(options.size).lower().split("x"))
    except ValueError:
        height = width = 512  # an aspect-preserving size is known only once the video is read
    frames = min(options.num_frames or options.window, options.window)
    return num_video_tokens(frames, height, width)


def _generation_device(options: GenerateOptions, parallel=None):
    """(device, compute dtype) of a generation: bf16 on CUDA, float32 on the CPU."""
    import torch

    device = parallel.device if parallel is not None and parallel.world_size > 1 else resolve_device(options.device)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _condition_device(options: GenerateOptions, parallel=None):
    """Where the condition's erosion and scaling run: the generation's GPU (the same bits, in
    milliseconds instead of about 0.3 s of CPU on a 16-core machine), or None for the CPU where the
    GPU's memory is budgeted (``--low-vram``, ``--cpu-offload``: the condition would take 0.3 GB of
    it at 49x512x512 for the whole run), with several GPUs, or without one."""
    if options.low_vram or options.cpu_offload or (parallel is not None and parallel.world_size > 1):
        return None
    device, _ = _generation_device(options, parallel)
    return device if device.type == "cuda" else None


def _lora_param_shapes(models_dir) -> dict:
    """Parameter shapes of the DiT that will load (a meta-device model of its config: no weights read)."""
    import torch
    from diffusers import WanTransformer3DModel

    from ex4d.diffusion.weights.lora import transformer_param_shapes
    from ex4d.diffusion.weights.wan import wan_transformer_config

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(wan_transformer_config(models_dir))
    return transformer_param_shapes(model)


def load_generator(options: GenerateOptions, parallel=None, *, text_encoder: bool = True):
    """Load Wan2.1-I2V-14B + the EX-4D adapter as an EX4DPipeline with ``options``' speed settings.

    Missing weights raise one MissingWeightsError (exit 2) naming every missing file and its download
    command (:mod:`ex4d.weights_preflight`); the adapter and the extra LoRAs are read and validated
    first, so that a missing or corrupt one fails before 40 GB of weights are read.
    parallel: an :class:`ex4d.diffusion.parallel.ParallelContext` under torchrun, else None.
    text_encoder: False loads neither umT5 nor its tokenizer (the prompt embeddings come from the
    cache, :mod:`ex4d.diffusion.prompt_cache`).
    """
    import time

    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline
    from ex4d.diffusion.weights import load_ex4d_adapter, load_wan_components, resolve_adapter
    from ex4d.diffusion.weights.lora import prepare_loras

    device, dtype = _generation_device(options, parallel)
    perf = PerformanceOptions(merge_lora=options.merge_lora, attention=options.attention, compile=options.compile,
                              batch_cfg=options.batch_cfg, low_vram=options.low_vram,
                              cpu_offload=options.cpu_offload, fp8=options.fp8, vram_budget_gib=options.vram_budget,
                              low_vram_tokens=_planned_tokens(options))
    perf.dtype = dtype
    perf.validate()
    from ex4d.diffusion.weights.models_dir import DIFFUSERS_COMPONENTS
    from ex4d.diffusion.weights.wan import wan_transformer_config
    from ex4d.weights_preflight import check_weights

    check_weights(generation=True, models_dir=options.models_dir, adapter=options.adapter)  # all missing, at once
    adapter_path = resolve_adapter(options.models_dir, options.adapter)
    started = time.perf_counter()
    # The adapter is read in full and checked against the DiT's config (from the shard headers) before
    # the 40 GB of Wan weights load: a corrupt adapter fails in a second. So are the extra LoRAs.
    adapter = load_ex4d_adapter(adapter_path, transformer_config=wan_transformer_config(options.models_dir))
    loras = prepare_loras(options.loras, _lora_param_shapes(options.models_dir)) if options.loras else []
    offloading = options.low_vram or options.cpu_offload
    wanted = [c for c in DIFFUSERS_COMPONENTS if text_encoder or c not in ("text_encoder", "tokenizer")]
    components = load_wan_components(options.models_dir, torch_dtype=perf.dtype,
                                     device="cpu" if offloading else device, components=wanted)
    pipe = build_pipeline(components, adapter, perf, device, loras=loras)
    log.info("generation models ready in %.1f s%s", time.perf_counter() - started,
             "" if text_encoder else " (prompt embeddings cached: no text encoder loaded)")
    return pipe


def _reusable_generator(options: GenerateOptions, cache: dict, text_encoder: bool):
    """The pipeline in ``cache`` if :func:`cached_generator` would use it as is, else None."""
    pipe = cache.get("generate_pipe")
    if cache.get("generate_key") == options.pipeline_key() and pipe is not None and \
            (not text_encoder or getattr(pipe, "text_encoder", True) is not None):
        return pipe
    return None


#: Compute frame 0's CLIP features and latent ahead on warm runs: while the condition loads
#: (_first_frame_ahead), or while recon still renders (start_ahead_of_recon).
FIRST_FRAME_AHEAD = True


def _ahead_pipeline(options: GenerateOptions, cache: dict | None, parallel=None, *, text_encoder: bool = True):
    """The pipeline frame 0's work may run on ahead of ``run_generate``, or None.

    Only where it is already loaded and will be used as is (warm runs: batch jobs, the app;
    ``text_encoder`` as for :func:`cached_generator`), on one GPU whose memory is not budgeted."""
    if not FIRST_FRAME_AHEAD or cache is None or _condition_device(options, parallel) is None:
        return None
    pipe = _reusable_generator(options, cache, text_encoder)
    return pipe if pipe is not None and hasattr(pipe, "first_frame_context") else None


def _side_stream(device):
    """A CUDA stream of its own on ``device`` for work done ahead, so that the other threads' GPU work
    (recon's meshes, the condition) does not queue behind it; it starts after what is queued now."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def _hand_over_from(stream, device, tensors) -> None:
    """Wait for ``stream``'s work, and mark ``tensors`` (made on it) as used on the default stream, where
    the caller uses and frees them (the caching allocator then keeps their memory until that is done)."""
    import torch

    stream.synchronize()
    for tensor in tensors:
        tensor.record_stream(torch.cuda.default_stream(device))


def _first_frame_context_beside(pipe, frame: np.ndarray, num_frames: int):
    """``pipe.first_frame_context`` on a CUDA stream of its own (:func:`_side_stream`). Returns once done."""
    import torch

    device = torch.device(pipe._execution_device)
    if device.type != "cuda":
        return pipe.first_frame_context(frame, num_frames)
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        context = pipe.first_frame_context(frame, num_frames)
    _hand_over_from(stream, device, (context.image_embeds, context.y))
    return context


def _submit_first_frame(pipe, options: GenerateOptions, peek, pool=None):
    """Run frame 0's work on a helper thread: a Future of (pipeline, FirstFrameContext or None).

    peek(): ((H, W, 3) uint8 frame 0 as the sampler takes it, the condition's frame count) or None.
    pool: the executor to run it on (default: a thread of its own)."""
    from concurrent.futures import ThreadPoolExecutor

    def work():
        try:
            got = peek()
        except InputError:  # load_condition reports what is wrong with the file
            return pipe, None
        if got is None:
            return pipe, None
        frame, count = got
        num_frames = options.num_frames or count
        if num_frames > options.window:  # windows get no single context
            return pipe, None
        try:
            return pipe, _first_frame_context_beside(pipe, frame, num_frames)
        except Exception:  # noqa: BLE001 (work ahead, e.g. out of GPU memory beside recon: the sampler does it)
            log.warning("computing frame 0's CLIP features and latent ahead failed; the sampler computes them",
                        exc_info=True)
            return pipe, None

    if pool is not None:
        return pool.submit(work)
    pool = ThreadPoolExecutor(1, thread_name_prefix="first frame ahead")
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one task


def _first_frame_ahead(color: Path, options: GenerateOptions, cache: dict | None, parallel=None, *,
                       text_encoder: bool = True):
    """Start CLIP and the first-frame latent on a helper thread while the condition loads: a Future of
    (pipeline, FirstFrameContext or None), or None where :func:`_ahead_pipeline` gives none.

    About 0.4 s of GPU work (CLIP, one 49-frame VAE encode) then overlaps reading the colour and mask
    videos (0.2-0.3 s of CPU on an H100 machine). Frame 0 is taken from the colour video alone
    (``first_frame_ahead``); the caller uses the result only if it equals the loaded condition's
    frame 0 and length.
    """
    from ex4d.diffusion.conditioning import first_frame_ahead

    pipe = _ahead_pipeline(options, cache, parallel, text_encoder=text_encoder)
    if pipe is None:
        return None
    return _submit_first_frame(pipe, options, lambda: first_frame_ahead(color, options.size))


#: In a chained warm run, also encode the condition (its two VAE encodes and the camera encoder) while
#: recon renders, frame by frame (ReconAhead).
CONDITION_AHEAD = True


class ReconAhead:
    """Generation's work on the condition done while recon still renders, for a warm recon -> generate
    chain (batch jobs, the benchmark); from :func:`start_ahead_of_recon`.

        ahead = start_ahead_of_recon(options, cache, clip.num_frames)   # None where it does not apply
        run_recon(..., condition_sink=ahead.sink if ahead else None)
        run_generate(..., ahead=ahead)

    Recon's colour encoder hands over each frame as the finished file will decode (``VideoWriter(
    decoded_frame_sink=)``), frame 0 about 15 frames into the render loop, with its exact mask
    (``ConditionWriter(frame_sink=)``). On one helper thread, on CUDA streams of its own:
    frame 0's CLIP features and latent, then (``CONDITION_AHEAD``) each frame as ``load_condition``
    will make it and the condition's VAE encodes in the VAE's time chunks as frames arrive, then
    the camera tokens. ``run_generate`` uses each result only if it equals what it computes from the
    files (frame 0 and length; the whole scaled condition), and does the work itself otherwise: when
    no frame came (recon's outputs reused), for another frame pick or a clip longer than the window.
    """

    def __init__(self, pipe, options: GenerateOptions, num_frames: int, prompt_lookup, device):
        from concurrent.futures import ThreadPoolExecutor

        from ex4d.diffusion.conditioning import sample_erosion_sizes

        self.pipe, self.options, self.num_frames = pipe, options, int(num_frames)
        self.prompt_lookup = prompt_lookup  # _prompt_lookup's result: run_generate reads the cache once
        self.device = device  # where load_condition will put the condition (_condition_device)
        self.future = None  # frame 0's work: a Future of (pipeline, FirstFrameContext or None)
        self.condition = None  # the condition's: a Future of ConditionContext or None
        single = options.num_frames in (None, self.num_frames) and self.num_frames <= options.window and \
            (self.num_frames - 1) % 4 == 0  # (else load_condition refuses it, or windows it)
        self._encodes = pipe.condition_encode_stream() if CONDITION_AHEAD and single and \
            hasattr(pipe, "condition_encode_stream") else None
        if self._encodes is not None and not self._encodes.supported:
            self._encodes = None
        self._sizes = sample_erosion_sizes(self.num_frames, options.seed) if options.erode else [0] * self.num_frames
        self._cuda_stream = None
        self._closed = False
        # One thread, so frame 0's work and the condition's chunks run in order and never at once.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="generation work ahead")

    def sink(self, index: int, colour: np.ndarray, mask: np.ndarray) -> bool:
        """Frame ``index`` of the condition: colour (H, W, 3) uint8 as decoded, mask (H, W) bool; called
        in order, on recon's colour encoder thread. Returns False once it wants no more frames."""
        from ex4d.diffusion.conditioning import first_frame_from_decoded

        if self._closed:
            return False
        if index == 0:
            frame0 = np.array(colour, copy=True)
            self.future = _submit_first_frame(self.pipe, self.options, lambda: (
                first_frame_from_decoded(frame0, self.options.size), self.num_frames), pool=self._pool)
        if self._encodes is None or index >= self.num_frames:
            self._pool.shutdown(wait=False)  # nothing more to do: the thread ends after the queued work
            return False
        self._pool.submit(self._add, index, colour, mask)
        if index == self.num_frames - 1:
            self.condition = self._pool.submit(self._finish)
            return False
        return True

    def close(self) -> None:
        """Stop: work not started is dropped, and none is queued any more (a failed recon, a finished job)."""
        self._closed = True
        self._encodes = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def release(self) -> None:
        """Let go of the pipeline and the results (another pipeline is about to load)."""
        self.close()
        self.pipe = self.future = self.condition = None

    def _stream(self):
        import contextlib

        import torch

        if torch.device(self.device).type != "cuda":
            return contextlib.nullcontext()
        if self._cuda_stream is None:
            self._cuda_stream = _side_stream(self.device)
        return torch.cuda.stream(self._cuda_stream)

    def _add(self, index: int, colour: np.ndarray, mask: np.ndarray) -> None:
        from ex4d.diffusion.conditioning import condition_frame

        encodes = self._encodes
        if encodes is None:  # an earlier frame failed, or closed
            return
        try:
            with self._stream():
                encodes.add(*condition_frame(colour, mask, self._sizes[index], self.options.size, self.device))
        except Exception:  # noqa: BLE001 (work ahead: generation encodes the condition itself)
            self._encodes = None
            log.warning("encoding the condition during recon failed; generation encodes it", exc_info=True)

    def _finish(self):
        encodes, self._encodes = self._encodes, None
        try:
            if encodes is None:
                return None
            with self._stream():
                context = encodes.finish()
            if self._cuda_stream is not None:
                _hand_over_from(self._cuda_stream, self.device, (context.cond, context.mask, context.tokens))
            return context
        except Exception:  # noqa: BLE001 (work ahead: generation encodes the condition itself)
            log.warning("encoding the condition during recon failed; generation encodes it", exc_info=True)
            return None
        finally:
            self._pool.shutdown(wait=False)


def start_ahead_of_recon(options: GenerateOptions, cache: dict | None, num_frames: int,
                         parallel=None) -> ReconAhead | None:
    """A :class:`ReconAhead` for the recon whose ``num_frames``-frame condition ``run_generate`` will take
    next with ``options`` and ``cache``, or None where nothing can run ahead (no warm pipeline,
    several GPUs, a GPU memory budget, FIRST_FRAME_AHEAD off)."""
    looked_up = _prompt_lookup(options, parallel)
    pipe = _ahead_pipeline(options, cache, parallel, text_encoder=looked_up[1])
    if pipe is None:
        return None
    return ReconAhead(pipe, options, num_frames, looked_up, _condition_device(options, parallel))


def cached_generator(options: GenerateOptions, cache: dict, parallel=None, *, text_encoder: bool = True):
    """The pipeline for ``options`` from ``cache`` (``generate_pipe``/``generate_key``), loading it once.

    Only one pipeline is kept: a 14B model per GPU is all there is room for, so other settings
    drop the old one first. A pipeline placed in the cache with a matching key is used as is.
    text_encoder: whether the pipeline must hold the text encoder (a cached one without it is
    loaded again with it when a prompt is not in the prompt cache).
    """
    pipe = _reusable_generator(options, cache, text_encoder)
    if pipe is not None:
        return pipe
    key = options.pipeline_key()
    if cache.pop("generate_pipe", None) is not None:
        cache.pop("generate_key", None)
        import gc

        import torch

        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    pipe = load_generator(options, parallel=parallel, text_encoder=text_encoder)
    cache["generate_pipe"], cache["generate_key"] = pipe, key
    return pipe


def _prompts(options: GenerateOptions, both: bool = False) -> dict[str, str]:
    """The prompts the sampler encodes: the positive one, and the negative one only with CFG (or ``both``)."""
    kwargs = options.call_kwargs()
    prompts = {"positive": kwargs["prompt"]}
    if options.cfg != 1.0 or both:
        prompts["negative"] = kwargs["negative_prompt"]
    return prompts


def _cached_prompt_embeds(options: GenerateOptions, parallel=None, both: bool = False):
    """(cache folder or None, cache keys by name, embeddings found by name: a tensor or None).

    Nothing is looked up when the cache is off or no Wan weights are found (the loader then reports
    the missing files as usual)."""
    from ex4d.diffusion import prompt_cache
    from ex4d.diffusion.weights.wan import TEXT_LENGTH
    from ex4d.errors import UserError

    cache_dir = options.prompt_cache_dir()
    prompts = _prompts(options, both)
    if cache_dir is None:
        return None, {}, {name: None for name in prompts}
    try:
        encoder = prompt_cache.text_encoder_identity(options.models_dir)
    except UserError:
        return None, {}, {name: None for name in prompts}
    device, dtype = _generation_device(options, parallel)
    keys = {name: prompt_cache.cache_key(text, encoder=encoder, text_len=TEXT_LENGTH, dtype=dtype,
                                         device_type=device.type) for name, text in prompts.items()}
    return cache_dir, keys, {name: prompt_cache.load(cache_dir, key) for name, key in keys.items()}


def _prompt_lookup(options: GenerateOptions, parallel=None):
    """(:func:`_cached_prompt_embeds`'s result, whether the pipeline must hold the text encoder)."""
    looked_up = _cached_prompt_embeds(options, parallel)
    return looked_up, looked_up[0] is None or any(embeds is None for embeds in looked_up[2].values())


def _prompt_embeds(pipe, options: GenerateOptions, looked_up, parallel=None) -> dict:
    """Pipeline-call arguments with the prompt embeddings from the cache (``looked_up``:
    :func:`_cached_prompt_embeds`' result), computing (and storing) the ones it lacks; {} when the
    cache is off (the pipeline encodes the prompts itself)."""
    from ex4d.diffusion import prompt_cache

    cache_dir, keys, found = looked_up
    found = dict(found)
    if cache_dir is None:
        return {}
    prompts = _prompts(options)
    for name, embeds in found.items():
        if embeds is None:
            device, dtype = pipe._execution_device, pipe.context_dtype()
            embeds, _ = pipe.encode_prompt(prompts[name], None, False, device, dtype)
            found[name] = embeds
            if parallel is None or parallel.is_main:
                prompt_cache.store(cache_dir, keys[name], embeds)
    out = {"prompt_embeds": found["positive"]}
    if "negative" in found:
        out["negative_prompt_embeds"] = found["negative"]
    return out


def precompute_prompt_embeds(options: GenerateOptions) -> dict[str, Path]:
    """Fill the prompt cache for ``options`` (its prompts, models folder, device and cache folder) by
    loading only umT5 and its tokenizer; returns {"positive"/"negative": cache file}. Entries that are
    already current are kept. Used by ``ex4d convert --prompt-embeds``."""
    from ex4d.diffusion import prompt_cache
    from ex4d.diffusion.pipeline import encode_text
    from ex4d.diffusion.weights import load_wan_components

    if options.prompt_cache_dir() is None:
        raise InputError("the prompt cache is off (--prompt-cache off); give a folder to fill")
    # Both prompts, whatever the guidance: a later run with CFG needs the negative one too.
    cache_dir, keys, found = _cached_prompt_embeds(options, both=True)
    written = {name: prompt_cache.entry_path(cache_dir, keys[name]) for name, embeds in found.items()
               if embeds is not None}
    missing = [name for name, embeds in found.items() if embeds is None]
    if missing:
        device, dtype = _generation_device(options)
        parts = load_wan_components(options.models_dir, torch_dtype=dtype, device=device,
                                    components=["text_encoder", "tokenizer"])
        prompts = _prompts(options, both=True)
        for name in missing:
            embeds = encode_text(parts["tokenizer"], parts["text_encoder"], prompts[name], device, dtype)
            path = prompt_cache.store(cache_dir, keys[name], embeds)
            if path is None:
                raise InputError(f"cannot write the prompt cache folder {cache_dir}; choose another with "
                                  f"--prompt-cache")
            written[name] = path
    return written


def _generate_request(color: Path, mask: Path, options: GenerateOptions) -> dict:
    return {"color": _file_fingerprint(color), "mask": _file_fingerprint(mask), "options": options.record()}


def generation_is_current(output: str | os.PathLike, color, mask, options: GenerateOptions) -> bool:
    """True if ``output`` and its ``.json`` record are exactly as ex4d wrote them (ledger) and the record
    says they were made from these inputs and settings."""
    output = Path(output)
    record = output.with_suffix(".json")
    if not (is_ex4d_file(output) and is_ex4d_file(record)):
        return False
    try:
        return json.loads(record.read_text()).get("request") == _generate_request(Path(color), Path(mask), options)
    except (OSError, ValueError):
        return False


def check_generate_paths(color: str | os.PathLike, mask: str | os.PathLike | None, output: str | os.PathLike,
                         options: GenerateOptions) -> tuple[Path, Path, Path, Path]:
    """The file checks of a generation, before any work: returns (colour, mask used, output, record).

    Every input is protected from writes: the colour video, the mask as given and the one used (a
    .mp4 given with a .mkv twin uses the twin), and the adapter. The outputs, ``output`` (.mp4) and
    its record (same name, .json), must not be inputs, nor files ex4d did not write (unless
    ``--overwrite``). Raises a one-line InputError.
    """
    from ex4d.diffusion.conditioning import find_mask_for

    color = require_file(color, "colour video")
    given_mask = mask
    mask = find_mask_for(color, mask)
    inputs = [color, mask] + [Path(p) for p in (given_mask, options.adapter) if p is not None]
    inputs += [Path(spec.path).expanduser() for spec in options.loras]
    protect_inputs(*inputs)
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"output {output} must be an .mp4 file (its record is written beside it as .json)")
    record_path = output.with_suffix(".json")
    for planned in (output, record_path):  # also without a write policy (library use)
        for path in inputs:
            if _same_file(planned, path):
                raise InputError(f"output {planned} would overwrite the input {path}; choose another -o")
    prepare_output_dir(output.parent)
    check_outputs([output, record_path])
    return color, mask, output, record_path


def _context_computed_ahead(ahead, condition):
    """Wait for frame 0's work run ahead (a Future of :func:`_submit_first_frame`, or None): (pipeline,
    FirstFrameContext) where it equals the loaded ``condition``'s frame 0 and length, else None."""
    if ahead is None:
        return None
    ahead_pipe, context = ahead.result()
    if context is not None and context.matches(condition.first_frame, condition.num_frames):
        return ahead_pipe, context
    if context is not None:
        log.info("frame 0 computed ahead differs from the condition's (mask frame 0 not fully visible?); "
                 "computing it in the sampler")
    return None


def _condition_computed_ahead(ahead: ReconAhead | None, condition):
    """Wait for the condition's encodes run during recon: where its scaled condition equals the loaded
    ``condition``'s, a ConditionContext of the loaded tensors and the tokens (the streamed copy of the
    condition is let go), else None."""
    from ex4d.diffusion.pipeline import ConditionContext

    if ahead is None or ahead.condition is None:
        return None
    context = ahead.condition.result()
    ahead.condition = None
    if context is None:
        return None
    if context.matches(condition.cond, condition.mask):
        return ConditionContext(cond=condition.cond, mask=condition.mask, tokens=context.tokens)
    log.info("the condition encoded during recon differs from the one read from the files; encoding it again")
    return None


def run_generate(color: str | os.PathLike, mask: str | os.PathLike | None, output: str | os.PathLike,
                 options: GenerateOptions, *, cache: dict | None = None, parallel=None,
                 progress: Progress | None = None, show_progress: bool = True,
                 ahead: ReconAhead | None = None) -> Path:
    """Generate the re-filmed video from a colour video and its mask; write ``output`` (.mp4).

    mask: None takes ``mask_<cam>.mkv`` (lossless) beside ``color_<cam>.mp4``. Clips longer than
    ``options.window`` frames are generated in overlapping windows (docs/scale.md). Inputs are
    checked before any weights load. ``cache``: a dict kept across calls so the models load once.
    ``parallel``: a ParallelContext under torchrun (only its main rank writes). ``show_progress``:
    the sampler's progress bar (batch jobs have their own). ``ahead``: work on the condition started
    during recon (:func:`start_ahead_of_recon`). Writes
    ``output`` and ``output.json`` (the settings and input fingerprints) atomically.
    """
    import torch

    from ex4d.diffusion.conditioning import load_condition
    from ex4d.io.video import VideoWriter, write_video

    options.validate()
    color, mask, output, record_path = check_generate_paths(color, mask, output, options)
    # Prompt embeddings all in the cache: the text encoder is not even loaded.
    same_options = ahead is not None and ahead.options == options
    looked_up, need_text_encoder = ahead.prompt_lookup if same_options else _prompt_lookup(options, parallel)
    # Warm runs: frame 0's CLIP features and latent are computed during recon, or while the condition is read.
    frame0 = ahead.future if ahead is not None else None
    if frame0 is None:
        frame0 = _first_frame_ahead(color, options, cache, parallel, text_encoder=need_text_encoder)
    # Inputs first: a bad video should fail in a second, not after loading 40 GB of weights.
    try:
        condition = load_condition(color, mask, size=options.size, num_frames=options.num_frames,
                                   seed=options.seed, erode=options.erode, device=_condition_device(options, parallel))
    except BaseException:
        if frame0 is not None:
            frame0.cancel()
            with contextlib.suppress(Exception):  # the condition's own error is the one to report
                frame0.result()
        raise
    first_frame_context = _context_computed_ahead(frame0, condition)
    condition_context = _condition_computed_ahead(ahead, condition)
    frame0 = None  # (its result holds the pipeline it ran on)
    log.info("condition: %d frames at %dx%d, erosion sizes %s", condition.num_frames, *condition.size,
             condition.kernel_sizes)
    long_clip = condition.num_frames > options.window
    if long_clip:
        condition = condition.to("cpu")  # the windows are cut and re-scaled on the host
    if parallel is not None and parallel.world_size > 1:
        from ex4d.diffusion.parallel import FP8_ATTENTION_WITH_ULYSSES, WAN_14B_HEADS, check_ulysses, num_video_tokens

        if long_clip:
            raise InputError(f"multi-GPU generation handles up to {options.window} frames; run longer clips on "
                             f"one GPU per clip (ex4d batch spreads clips over GPUs)")
        tokens = num_video_tokens(condition.num_frames, *condition.size)
        if parallel.ulysses_degree > 1:
            if options.attention == "fp8":  # before the weights load (enable_ulysses refuses it too)
                raise InputError(FP8_ATTENTION_WITH_ULYSSES)
            check_ulysses(WAN_14B_HEADS, tokens, parallel.ulysses_degree)

    # Work done ahead counts only if done with the pipeline this call uses: cached_generator returns
    # the reusable one when there is one, else loads another (then the work ahead lets go of its own).
    reusable = _reusable_generator(options, cache or {}, need_text_encoder)
    if first_frame_context is not None and first_frame_context[0] is not reusable:
        first_frame_context = None
    if ahead is not None and ahead.pipe is not reusable:
        condition_context = None
        if reusable is None:
            ahead.release()
    reusable = None
    pipe = cached_generator(options, cache if cache is not None else {}, parallel=parallel,
                            text_encoder=need_text_encoder)
    call_kwargs = {**options.call_kwargs(), **_prompt_embeds(pipe, options, looked_up, parallel)}
    if first_frame_context is not None and not long_clip:
        call_kwargs["first_frame_context"] = first_frame_context[1]
    if condition_context is not None and not long_clip:
        call_kwargs["condition_context"] = condition_context
    pipe.set_progress_bar_config(disable=not show_progress)
    _use_sampler_progress(pipe, progress if show_progress and (parallel is None or parallel.is_main) else None)
    if parallel is not None and parallel.world_size > 1:
        from ex4d.diffusion.parallel import parallelize_pipeline

        parallelize_pipeline(pipe, parallel, num_tokens=tokens)
    fps = options.fps if options.fps is not None else condition.fps
    writes = parallel is None or parallel.is_main
    # One GPU, one window: the video is encoded while the VAE decodes its later frames (the writer keeps
    # it under a temporary name until it is complete; a failed run leaves nothing of it).
    streamed = not long_clip and (parallel is None or parallel.world_size == 1)
    # The record goes first and comes back last: a run killed between the two writes leaves a video
    # with no record, which is never taken for current (generation_is_current).
    if long_clip:
        from ex4d.diffusion.long_video import generate_long_video

        frames = generate_long_video(pipe, condition, window=options.window, overlap=options.overlap,
                                     seed=options.seed, progress=progress, **call_kwargs)
    else:
        # Room for every frame in the writer's queue: the decoder never waits for the encoder.
        with (VideoWriter(output, fps, background=True, queue_frames=condition.num_frames) if streamed
              else contextlib.nullcontext()) as writer:

            def hand_over(frame: np.ndarray) -> None:
                if not writer.frames_written:  # a run that fails before decoding keeps the old pair
                    forget_output(record_path)
                writer.write(frame)
            result = pipe(condition.cond, condition.mask, image=condition.first_frame,
                          generator=torch.Generator("cpu").manual_seed(options.seed), output_type="np",
                          frame_sink=hand_over if streamed else None, **call_kwargs)
        frames = result.frames[0]
    if writes and not streamed:
        forget_output(record_path)
        write_video(output, np.asarray(frames), fps=fps)
    if writes:
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps({"request": _generate_request(color, mask, options),
                                       "frames": int(len(frames)), "erosion_sizes": condition.kernel_sizes},
                                      indent=2, default=str))
    return output


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def _use_sampler_progress(pipe, progress: Progress | None) -> None:
    """Show the sampler's steps with ``progress`` (plain lines off a terminal), or diffusers' own bar if None."""
    if progress is None:
        pipe.__dict__.pop("progress_bar", None)
        return

    def progress_bar(iterable=None, total=None):
        return progress(iterable, total=total, desc="sampling", unit="step")

    pipe.__dict__["progress_bar"] = progress_bar
