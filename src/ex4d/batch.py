"""Batch jobs: many (video, camera path, settings, output folder) jobs run unattended.

A jobs file is YAML or CSV (format in docs/scale.md). Each job writes into its own output folder
and, when it ends, a record ``<output>/ex4d_job.json`` (status, timings, outputs, error). Those
records are what makes a batch resumable: a job whose record says ``done`` for the same settings
and input file, and whose outputs still exist, is skipped the next time. A failing job is recorded
with its error and the batch goes on. After every job the batch manifest (one JSON file for the
whole batch, default ``<jobs file stem>.manifest.json`` beside the jobs file) is rebuilt from the
records under a file lock, so several processes can share it.

Models load once per process: the job runner gets a ``cache`` dict that lives for the whole batch
(the depth estimator, the generation pipeline). With several GPUs, start one process per GPU with
torchrun or accelerate; process r of N takes jobs r, r+N, r+2N, ... (no scheduler).
"""

from __future__ import annotations

import csv
import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ex4d.errors import InputError, UserError
from ex4d.io.files import atomic_path, require_file

log = logging.getLogger(__name__)

#: Name of the per-job record written in each job's output folder.
RECORD_NAME = "ex4d_job.json"

#: Runs one job: (job dict with absolute paths, per-process cache) -> {role: output path}.
JobRunner = Callable[[dict, dict], dict]

# Keys a job may set, with the type a CSV cell (a string) is converted to. Unknown keys are an
# error so that a typo ("num_frame") fails at load time, not after hours of the batch.
_STR, _INT, _FLOAT, _BOOL = str, int, float, bool
JOB_KEYS: dict[str, type] = {
    # the job itself
    "name": _STR, "video": _STR, "output": _STR, "stage": _STR, "cam": _STR,
    # reconstruction (ex4d recon options)
    "depth": _STR, "models_dir": _STR, "num_frames": _INT, "resize": _STR, "max_res": _INT, "cap": _STR,
    "filter": _STR, "stretch_test": _BOOL, "torn": _BOOL, "only_first_frame": _BOOL, "save_mesh": _STR,
    "fps": _FLOAT, "resample": _BOOL, "device": _STR,
    # DepthCrafter speed/memory switches (ex4d recon --depth-compile etc.)
    "depth_compile": _BOOL, "depth_fast_kernels": _BOOL, "depth_fp16_encode": _BOOL, "depth_offload": _BOOL,
    # generation (ex4d generate options)
    "prompt": _STR, "negative_prompt": _STR, "seed": _INT, "steps": _INT, "guidance": _FLOAT, "size": _STR,
    "erode": _BOOL, "out_fps": _FLOAT, "adapter": _STR, "memory": _STR, "vram_budget": _FLOAT, "fp8": _BOOL, "compile": _BOOL,
    "attention": _STR, "window": _INT, "overlap": _INT,
}
MEMORY_MODES = ("full", "low-vram", "cpu-offload")
_DEPTH_SWITCHES = ("depth_compile", "depth_fast_kernels", "depth_fp16_encode", "depth_offload")
STAGES = ("recon", "run")
_PATH_KEYS = ("video", "output", "models_dir", "adapter")
# Settings that are either a name or a file: resolved like paths when they name a file.
_MAYBE_FILE_KEYS = {"depth": (".npz", ".npy"), "cam": (".npz", ".json", ".txt")}


# --------------------------------------------------------------------------------------------
# Jobs file
# --------------------------------------------------------------------------------------------

def _convert(key: str, value, where: str):
    kind = JOB_KEYS[key]
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return None
    try:
        if kind is _BOOL:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "y", "on"):
                return True
            if text in ("0", "false", "no", "n", "off"):
                return False
            raise ValueError(value)
        if kind is _INT:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is _FLOAT:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key}={value!r} is not a valid {kind.__name__}") from None


def _normalise_job(raw: dict, defaults: dict, index: int, base: Path, source: str) -> dict:
    where = f"{source}, job {index + 1}"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a job must be a mapping of settings, got {type(raw).__name__}")
    merged = {**defaults, **{k: v for k, v in raw.items() if v is not None and v != ""}}
    unknown = sorted(set(merged) - set(JOB_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(JOB_KEYS)}")
    job = {}
    for key, value in merged.items():
        value = _convert(key, value, where)
        if value is not None:
            job[key] = value
    for key in ("video", "output"):
        if key not in job:
            raise InputError(f"{where}: '{key}' is required (every job needs an input video and an output folder)")
    for key in _PATH_KEYS:
        if key in job:
            path = Path(os.path.expanduser(job[key]))
            job[key] = str(path if path.is_absolute() else (base / path).resolve())
    for key, suffixes in _MAYBE_FILE_KEYS.items():
        if key in job and Path(job[key]).suffix.lower() in suffixes and not Path(job[key]).is_absolute():
            job[key] = str((base / job[key]).resolve())
    job.setdefault("stage", "run")
    if job["stage"] not in STAGES:
        raise InputError(f"{where}: stage={job['stage']!r}; use one of {', '.join(STAGES)}")
    if job.get("memory", "full") not in MEMORY_MODES:
        raise InputError(f"{where}: memory={job['memory']!r}; use one of {', '.join(MEMORY_MODES)}")
    switches = [k for k in _DEPTH_SWITCHES if job.get(k)]
    if switches and job.get("depth", "depthcrafter").lower() != "depthcrafter":
        raise InputError(f"{where}: {', '.join(switches)} apply to depth: depthcrafter only, not {job['depth']!r}")
    job.setdefault("cam", "90")
    job.setdefault("name", Path(job["output"]).name)
    job["index"] = index
    return job


def load_jobs(path: str | os.PathLike) -> list[dict]:
    """Read a YAML or CSV jobs file into a list of normalised job dicts.

    YAML: either a list of jobs, or a mapping with ``jobs:`` (a list) and optional ``defaults:``
    (settings every job gets unless it sets them). CSV: a header row of setting names, one job
    per row, empty cells = unset. Relative paths are relative to the jobs file's folder. Every job
    needs ``video`` and ``output``; ``stage`` defaults to ``run`` (recon + generate), ``cam`` to 90.
    Raises InputError for unreadable files, unknown settings, bad values or duplicate outputs.
    """
    path = require_file(path, "jobs file")
    base = path.resolve().parent
    suffix = path.suffix.lower()
    defaults: dict = {}
    try:
        if suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(path.read_text())
            if isinstance(data, dict):
                defaults = data.get("defaults") or {}
                extra = sorted(set(data) - {"defaults", "jobs"})
                if extra:
                    raise InputError(f"{path}: unknown top-level key(s) {', '.join(extra)}; use 'defaults' and 'jobs'")
                rows = data.get("jobs")
            else:
                rows = data
            if not isinstance(rows, list):
                raise InputError(f"{path}: expected a list of jobs (or 'jobs:' with a list), got {type(rows).__name__}")
            if not isinstance(defaults, dict):
                raise InputError(f"{path}: 'defaults' must be a mapping of settings")
        elif suffix in (".csv", ".tsv"):
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
            for row in rows:
                if None in row:
                    raise InputError(f"{path}: a row has more cells than the header has names")
        else:
            raise InputError(f"{path}: unknown jobs file type {suffix!r}; use .yaml, .yml, .json or .csv")
    except InputError:
        raise
    except Exception as exc:  # yaml/csv parse errors
        raise InputError(f"cannot parse {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not rows:
        raise InputError(f"{path} lists no jobs")
    jobs = [_normalise_job(row, defaults, i, base, str(path)) for i, row in enumerate(rows)]
    seen: dict[str, int] = {}
    for job in jobs:
        other = seen.setdefault(job["output"], job["index"])
        if other != job["index"]:
            raise InputError(f"{path}: jobs {other + 1} and {job['index'] + 1} write to the same output folder "
                             f"{job['output']}; give each job its own 'output'")
    return jobs


# --------------------------------------------------------------------------------------------
# Records, resume, manifest
# --------------------------------------------------------------------------------------------

def job_fingerprint(job: dict) -> str:
    """Hash of a job's settings and its input file's identity (size, mtime): what a resume checks."""
    from ex4d.pipeline import stable_hash

    settings = {k: v for k, v in job.items() if k not in ("index", "name", "device")}
    video = Path(job["video"])
    if video.is_file():
        stat = video.stat()
        settings["_video"] = [stat.st_size, stat.st_mtime_ns]
    return stable_hash(settings)


def read_record(job: dict) -> dict | None:
    """The job's record from its output folder, or None if absent or unreadable."""
    path = Path(job["output"]) / RECORD_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(job: dict, record: dict | None = None) -> bool:
    """True if the job's record says done, for these settings, and its outputs are all still there."""
    record = read_record(job) if record is None else record
    if not record or record.get("status") != "done" or record.get("fingerprint") != job_fingerprint(job):
        return False
    return all(Path(p).exists() for p in (record.get("outputs") or {}).values())


def write_record(job: dict, record: dict) -> Path:
    path = Path(job["output"]) / RECORD_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    return path


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed) for read-modify-write by many ranks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_manifest(jobs: list[dict], jobs_file: str = "") -> dict:
    """The batch manifest assembled from every job's record: one entry per job, plus counts."""
    entries = []
    counts = {"done": 0, "failed": 0, "running": 0, "pending": 0}
    for job in jobs:
        record = read_record(job) or {}
        status = record.get("status", "pending")
        if status == "done" and not is_finished(job, record):
            status = "pending"  # settings or inputs changed since, or outputs deleted
        counts[status] = counts.get(status, 0) + 1
        entries.append({
            "index": job["index"], "name": job["name"], "output": job["output"], "status": status,
            "started": record.get("started"), "finished": record.get("finished"),
            "seconds": record.get("seconds"), "rank": record.get("rank"), "error": record.get("error"),
            "outputs": record.get("outputs"), "timings": record.get("timings"),
        })
    return {"jobs_file": jobs_file, "updated": _now(), "counts": counts, "jobs": entries}


def write_manifest(path: str | os.PathLike, jobs: list[dict], jobs_file: str = "") -> Path:
    """Rebuild and atomically write the manifest, under a lock shared by all ranks.

    Each rank writes its record *before* taking the lock, so the last writer has seen every record.
    """
    path = Path(path)
    with _locked(path.with_name(path.name + ".lock")):
        manifest = build_manifest(jobs, jobs_file)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
    return path


# --------------------------------------------------------------------------------------------
# Processes (one per GPU)
# --------------------------------------------------------------------------------------------

@dataclass
class Worker:
    """This process's share of a batch: rank r of world N takes jobs r, r+N, ...

    Read from the launcher's environment (torchrun and accelerate both set RANK, WORLD_SIZE and
    LOCAL_RANK); a plain run is rank 0 of 1.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Worker":
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise UserError("RANK / WORLD_SIZE / LOCAL_RANK in the environment are not integers") from None
        if not 0 <= rank < world:
            raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, local)

    def share(self, jobs: list[dict]) -> list[dict]:
        return jobs[self.rank::self.world_size]

    def device(self, requested: str | None) -> str | None:
        """The device a job runs on: with several processes and CUDA, "auto"/"cuda" become cuda:LOCAL_RANK."""
        if self.world_size == 1 or requested not in (None, "auto", "cuda"):
            return requested
        try:
            import torch
        except ImportError:  # pragma: no cover
            return requested
        if not torch.cuda.is_available():
            return requested
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """What this process did: job indices it ran, skipped as finished, left alone as failed before
    (``retry_failed=False``), and that failed now."""

    ran: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    skipped_failed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    manifest: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def run_batch(jobs: list[dict], *, runner: JobRunner | None = None, manifest: str | os.PathLike | None = None,
              jobs_file: str = "", worker: Worker | None = None, cache: dict | None = None,
              retry_failed: bool = True, progress: Callable[..., Iterable] | None = None) -> BatchResult:
    """Run this process's share of ``jobs``; skip finished ones; record every outcome.

    runner: runs one job (default :func:`default_runner`). manifest: path of the batch manifest
    (None: none written). cache: kept across jobs so models load once (a fresh dict by default).
    retry_failed: False skips jobs whose record says failed. progress: a tqdm-like callable used
    for the one progress bar over this process's jobs. Never raises for a failing job.
    """
    runner = runner or default_runner
    worker = worker or Worker()
    cache = {} if cache is None else cache
    mine = worker.share(jobs)
    result = BatchResult(manifest=Path(manifest) if manifest else None)
    bar = progress(total=len(mine), desc="batch" if worker.world_size == 1 else f"batch rank {worker.rank}",
                   unit="job", position=worker.rank) if progress else None
    try:
        for job in mine:
            record = read_record(job)
            if is_finished(job, record):
                log.info("job %d (%s): finished earlier, skipped", job["index"], job["name"])
                result.skipped.append(job["index"])
            elif (not retry_failed and record and record.get("status") == "failed"
                  and record.get("fingerprint") == job_fingerprint(job)):
                log.info("job %d (%s): failed earlier, not retried", job["index"], job["name"])
                result.skipped_failed.append(job["index"])
            else:
                _run_one(job, runner, cache, worker, result)
                if manifest:
                    write_manifest(manifest, jobs, jobs_file)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ran=len(result.ran), skipped=len(result.skipped) + len(result.skipped_failed),
                                failed=len(result.failed))
    finally:
        if bar is not None:
            bar.close()
    if manifest:
        write_manifest(manifest, jobs, jobs_file)
    return result


def _run_one(job: dict, runner: JobRunner, cache: dict, worker: Worker, result: BatchResult) -> None:
    job = dict(job)
    device = worker.device(job.get("device"))
    if device is not None:
        job["device"] = device
    base = {"index": job["index"], "name": job["name"], "fingerprint": job_fingerprint(job),
            "settings": {k: v for k, v in job.items() if k != "index"}, "rank": worker.rank}
    started, t0 = _now(), time.perf_counter()
    try:
        Path(job["output"]).mkdir(parents=True, exist_ok=True)
        # A "running" record marks a job a crash (e.g. killed for memory) interrupted; resume reruns it.
        write_record(job, {**base, "status": "running", "started": started})
    except OSError as exc:  # no record can be written there; the manifest will show it as pending
        log.warning("job %d (%s) failed: cannot write to its output folder %s: %s", job["index"], job["name"],
                    job["output"], exc.strerror or exc)
        result.failed.append(job["index"])
        return
    try:
        outputs = runner(job, cache) or {}
        timings = outputs.pop("_timings", None) if isinstance(outputs, dict) else None
        record = {**base, "status": "done", "outputs": {k: str(v) for k, v in outputs.items()}}
        if timings:
            record["timings"] = timings
        result.ran.append(job["index"])
    except Exception as exc:  # a failing job is recorded and the batch goes on
        log.warning("job %d (%s) failed: %s", job["index"], job["name"], _one_line(exc))
        record = {**base, "status": "failed", "error": _one_line(exc)}
        if not isinstance(exc, UserError):
            record["traceback"] = traceback.format_exc()
        result.failed.append(job["index"])
        _free_accelerator_memory()
    record.update(started=started, finished=_now(), seconds=round(time.perf_counter() - t0, 3))
    write_record(job, record)


def _free_accelerator_memory() -> None:
    """After a failure (often out of memory) give cached GPU memory back before the next job."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# The default job: ex4d.pipeline stages, models cached per process
# --------------------------------------------------------------------------------------------

def default_runner(job: dict, cache: dict) -> dict:
    """Run one job through :mod:`ex4d.pipeline`.

    Chains load_clip -> depth (estimator cached in ``cache``) -> run_recon, and for
    ``stage: run`` :func:`generate_stage` (pipeline cached in ``cache``). Returns {role: path} of
    the files written, plus ``_timings`` (seconds per stage).
    """
    import ex4d.pipeline as pipeline

    return _chain_stages(pipeline, job, cache)


def job_depth_options(job: dict) -> dict:
    """The DepthCrafter options of a job's ``depth_*`` switches."""
    from ex4d.depth.depthcrafter import speed_options

    return speed_options(**{key.removeprefix("depth_"): bool(job.get(key)) for key in _DEPTH_SWITCHES})


def _cached_estimator(cache: dict, spec: str, models_dir, device, options: dict):
    """The depth estimator for ``spec`` and ``options``, built once per process and kept in ``cache``."""
    key = ("depth", str(spec), str(models_dir), str(device), tuple(sorted(options.items())))
    if key not in cache:
        from ex4d.depth import get_estimator

        log.info("loading depth estimator %s (once per process)", spec)
        cache[key] = get_estimator(spec, models_dir=models_dir, device=device, **options)
    return cache[key]


def _chain_stages(pipeline, job: dict, cache: dict) -> dict:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    clip = pipeline.load_clip(job["video"], num_frames=job.get("num_frames", 49),
                              resize=job.get("resize", "reference"), max_res=job.get("max_res", 1024))
    timings["load"] = time.perf_counter() - t
    device = job.get("device", "auto")
    depth_spec = job.get("depth", "depthcrafter")
    t = time.perf_counter()
    is_file = Path(depth_spec).suffix.lower() in (".npz", ".npy")
    depth_options = job_depth_options(job)
    estimator = None if is_file else _cached_estimator(cache, depth_spec, job.get("models_dir"), device,
                                                       depth_options)
    depth = pipeline.estimate_depth(clip, depth_spec, out_dir=job["output"], models_dir=job.get("models_dir"),
                                    device=device, estimator=estimator, estimator_options=depth_options)
    timings["depth"] = time.perf_counter() - t
    options = pipeline.ReconOptions(
        cam=job["cam"], cap=job.get("cap", "none"), filter=job.get("filter", "angle"),
        stretch_test=job.get("stretch_test", False), watertight=not job.get("torn", False),
        only_first_frame=job.get("only_first_frame", False), save_mesh=job.get("save_mesh", "first"),
        fps=job.get("fps"), resample=job.get("resample", False), device=device)
    t = time.perf_counter()
    written = {k: str(v) for k, v in pipeline.run_recon(clip, depth, job["output"], options).items()}
    timings["recon"] = time.perf_counter() - t
    if job["stage"] == "run":
        t = time.perf_counter()
        written.update(generate_stage(job, written, cache, timings))
        timings["generate"] = time.perf_counter() - t
    written["_timings"] = {k: round(v, 3) for k, v in timings.items()}
    return written


# --------------------------------------------------------------------------------------------
# Generation stage (pipeline loaded once per process and kept while the settings match)
# --------------------------------------------------------------------------------------------

def job_generate_options(job: dict):
    """The :class:`ex4d.pipeline.GenerateOptions` of a ``stage: run`` job."""
    from ex4d.pipeline import GenerateOptions

    memory = job.get("memory", "full")
    return GenerateOptions(
        seed=job.get("seed", 0), steps=job.get("steps", 25), cfg=job.get("guidance", 5.0),
        prompt=job.get("prompt"), negative_prompt=job.get("negative_prompt"), size=job.get("size", "512x512"),
        fps=job.get("out_fps", 15.0), erode=job.get("erode", True), window=job.get("window", 49),
        overlap=job.get("overlap", 17), models_dir=job.get("models_dir"), adapter=job.get("adapter"),
        device=job.get("device", "auto"), attention=job.get("attention"), compile=job.get("compile", False),
        low_vram=memory == "low-vram", cpu_offload=memory == "cpu-offload", fp8=job.get("fp8", False),
        vram_budget=job.get("vram_budget"))


def generation_key(job: dict) -> tuple:
    """What the cached generation pipeline depends on; a job with another key reloads it."""
    return job_generate_options(job).pipeline_key()


def generate_stage(job: dict, recon: dict, cache: dict, timings: dict | None = None) -> dict:
    """Generate ``ex4d_<cam>.mp4`` in the job's output folder from the recon files in ``recon``.

    The pipeline is loaded once per process and kept in ``cache``; clips longer than the window
    (default 49 frames) go through overlapping windows. Returns {"video": path}.
    """
    from ex4d.pipeline import run_generate

    if "color" not in recon:
        raise UserError(f"job {job['index'] + 1}: the recon stage wrote no colour video to generate from")
    color = Path(recon["color"])
    mask = Path(recon["mask_lossless"]) if "mask_lossless" in recon else None
    name = color.name.replace("color_", "ex4d_", 1) if color.name.startswith("color_") else f"ex4d_{color.name}"
    out = run_generate(color, mask, Path(job["output"]) / Path(name).with_suffix(".mp4"), job_generate_options(job),
                       cache=cache, show_progress=False)  # the batch has its own progress display
    return {"video": str(out)}
