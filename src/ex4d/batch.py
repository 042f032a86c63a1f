"""Batch jobs: many (video, camera path, settings, output folder) jobs run unattended.

A jobs file is YAML or CSV (format in docs/scale.md). Each job writes into its own output folder
and, when it ends, a record ``<output>/ex4d_job.json`` (status, timings, outputs, error). Those
records are what makes a batch resumable: a job whose record says ``done`` for the same settings
and the same input files (every file it reads, weights included: :func:`job_input_files`), and
whose outputs still exist, is skipped the next time. A failing job is recorded with its error and
the batch goes on. After every job the batch manifest (one JSON file for the whole batch, default
``<jobs file name>.manifest.json`` beside the jobs file) is rebuilt from the records under a lock
file that exists only while it is held, so several processes can share it.

Writes follow :mod:`ex4d.io.files`' policy: the jobs file and every job's inputs are never written
(the manifest path is checked against them before any job runs), each job runs in its own nested
policy, and files ex4d did not write are replaced only with ``overwrite``. Jobs are numbered from 1
in every message and in the manifest's ``job`` field.

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
from ex4d.io.files import atomic_path, check_output, forget_output, require_file, write_policy

log = logging.getLogger(__name__)

#: Name of the per-job record written in each job's output folder.
RECORD_NAME = "ex4d_job.json"

#: Runs one job: (job dict with absolute paths, per-process cache) -> {role: output path}.
JobRunner = Callable[[dict, dict], dict]

# Keys a job may set, with the type a CSV cell (a string) is converted to. Unknown keys are an
# error so that a typo ("num_frame") fails at load time, not after hours of the batch.
_STR, _INT, _FLOAT, _BOOL, _LIST = str, int, float, bool, list
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
    "preset": _STR, "shift": _FLOAT, "lora": _LIST, "prompt_cache": _STR,
    # evaluation of the generated video (ex4d eval; stage: run only)
    "eval": _BOOL,
}
MEMORY_MODES = ("full", "low-vram", "cpu-offload")
_DEPTH_SWITCHES = ("depth_compile", "depth_fast_kernels", "depth_fp16_encode", "depth_offload")
STAGES = ("recon", "run")
_PATH_KEYS = ("video", "output", "models_dir", "adapter")
# Settings that are either a name or a file: resolved like paths when they name a file.
_MAYBE_FILE_KEYS = {"depth": (".npz", ".npy"), "cam": (".npz", ".json", ".txt")}
#: Largest jobs file read (a million jobs fit in far less); a bigger file is refused before parsing.
MAX_JOBS_FILE_BYTES = 16 * 1024 * 1024
#: Most YAML values a jobs file may expand to, aliases counted at every use (an "alias bomb" of a few
#: hundred bytes expands to billions); ~10 per job, so far more than any real batch needs.
MAX_YAML_NODES = 2_000_000


# --------------------------------------------------------------------------------------------
# Jobs file
# --------------------------------------------------------------------------------------------

def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _convert(key: str, value, where: str):
    kind = JOB_KEYS[key]
    if value is None:
        return None
    if kind is _LIST:  # lora: a list of "FILE[:STRENGTH]"; a CSV cell or a plain string separates them by ';'
        items = value if isinstance(value, (list, tuple)) else str(value).split(";")
        if isinstance(value, (dict, set)) or not all(isinstance(v, (str, int, float)) for v in items):
            raise InputError(f"{where}: {key} must be a list of FILE[:STRENGTH] (a CSV cell separates them by ';')")
        return [str(v).strip() for v in items if str(v).strip()] or None
    if isinstance(value, (list, tuple, set, dict)):
        what = "a mapping" if isinstance(value, dict) else "a list"
        raise InputError(f"{where}: {key} is {what}, but every setting takes one {kind.__name__} value; "
                         f"write one job per value (e.g. one job per camera path)")
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
        raise InputError(f"{where}: {key}={_short(value)} is not a valid {kind.__name__}") from None


def _normalise_job(raw: dict, defaults: dict, index: int, base: Path, source: str) -> dict:
    where = f"{source}, job {index + 1}"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a job must be a mapping of settings, got {type(raw).__name__}")
    merged = {**defaults, **{k: v for k, v in raw.items() if v is not None and v != ""}}
    unknown = sorted(str(k) for k in set(merged) - set(JOB_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(JOB_KEYS)}")
    job = {}
    for key, value in merged.items():
        value = _convert(key, value, where if key in raw else f"{source}, defaults (for job {index + 1})")
        if value is not None:
            job[key] = value
    for key in ("video", "output"):
        if key not in job:
            raise InputError(f"{where}: '{key}' is required (every job needs an input video and an output folder)")
    for key in _PATH_KEYS:
        if key in job:
            path = Path(os.path.expanduser(job[key]))
            job[key] = str(path if path.is_absolute() else (base / path).resolve())
    if job.get("lora"):  # each FILE of FILE[:STRENGTH] relative to the jobs file, like the other paths
        from ex4d.diffusion.weights.lora import parse_lora_spec

        resolved = []
        for spec in (parse_lora_spec(item, f"{where}: lora") for item in job["lora"]):
            path = Path(os.path.expanduser(spec.path))
            resolved.append(f"{path if path.is_absolute() else (base / path).resolve()}:{spec.strength!r}")
        job["lora"] = resolved
    if job.get("prompt_cache") and job["prompt_cache"].lower() not in ("off", "none", "no"):
        path = Path(os.path.expanduser(job["prompt_cache"]))
        job["prompt_cache"] = str(path if path.is_absolute() else (base / path).resolve())
    for key, suffixes in _MAYBE_FILE_KEYS.items():
        if key in job and _names_file(job[key], suffixes):
            path = Path(os.path.expanduser(job[key]))
            job[key] = str(path if path.is_absolute() else (base / path).resolve())
    job.setdefault("stage", "run")
    if job["stage"] not in STAGES:
        raise InputError(f"{where}: stage={job['stage']!r}; use one of {', '.join(STAGES)}")
    if job.get("eval") and job["stage"] != "run":
        raise InputError(f"{where}: eval: true evaluates the generated video, so it needs stage: run "
                         f"(run ex4d eval on a recon's outputs by hand)")
    if job.get("memory", "full") not in MEMORY_MODES:
        raise InputError(f"{where}: memory={job['memory']!r}; use one of {', '.join(MEMORY_MODES)}")
    switches = [k for k in _DEPTH_SWITCHES if job.get(k)]
    if switches and job.get("depth", "depthcrafter").lower() != "depthcrafter":
        raise InputError(f"{where}: {', '.join(switches)} apply to depth: depthcrafter only, not {job['depth']!r}")
    job.setdefault("cam", "90")
    job.setdefault("name", Path(job["output"]).name)
    job["index"] = index
    return job


def _names_file(value: str, suffixes: tuple[str, ...]) -> bool:
    """True if a depth/cam setting names a file (by its suffix, or a path separator) rather than a preset."""
    return Path(value).suffix.lower() in suffixes or "/" in value or (os.altsep or "/") in value


def _yaml_loader():
    """A SafeLoader that counts every value it composes, an alias counting as everything it refers to.

    PyYAML shares an aliased node instead of copying it, so a "billion laughs" file parses small; it
    explodes only when walked (converting a value to text). Counting the expanded size while the file
    is composed refuses such a file in milliseconds, whatever uses the data later.
    """
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.expanded = 0
            self.sizes: dict[int, int] = {}

        def _size(self, node) -> int:
            known = self.sizes.get(id(node))
            if known is not None:
                return known
            self.sizes[id(node)] = 1  # a recursive alias counts once while it is being sized
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(child) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            else:
                size = 1
            self.sizes[id(node)] = size
            return size

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                node = self.anchors.get(self.peek_event().anchor)
                self.expanded += self._size(node) if node is not None else 1
            else:
                self.expanded += 1
            if self.expanded > MAX_YAML_NODES:
                raise InputError(f"the YAML aliases (*name) of this file expand to more than {MAX_YAML_NODES:,} "
                                 f"values (an alias bomb?); write the settings out, or share them with 'defaults:'")
            return super().compose_node(parent, index)

    return BoundedLoader


def load_jobs(path: str | os.PathLike) -> list[dict]:
    """Read a YAML or CSV jobs file into a list of normalised job dicts.

    YAML: either a list of jobs, or a mapping with ``jobs:`` (a list) and optional ``defaults:``
    (settings every job gets unless it sets them). CSV: a header row of setting names, one job
    per row, empty cells = unset. Relative paths are relative to the jobs file's folder. Every job
    needs ``video`` and ``output``; ``stage`` defaults to ``run`` (recon + generate), ``cam`` to 90.
    Raises InputError for unreadable files, unknown settings, bad values (a list where one value is
    expected included), duplicate outputs, a file over :data:`MAX_JOBS_FILE_BYTES` and YAML whose
    aliases expand to more than :data:`MAX_YAML_NODES` values.
    """
    path = require_file(path, "jobs file")
    base = path.resolve().parent
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if size > MAX_JOBS_FILE_BYTES:
        raise InputError(f"{path} is {size / 2**20:.0f} MiB; a jobs file may be at most "
                         f"{MAX_JOBS_FILE_BYTES // 2**20} MiB (split the batch into several files)")
    defaults: dict = {}
    try:
        if suffix in (".yaml", ".yml", ".json"):
            with open(path, "rb") as handle:
                loader = _yaml_loader()(handle)  # a yaml.SafeLoader: plain data only, never objects
                try:
                    data = loader.get_single_data()
                finally:
                    loader.dispose()
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
    except InputError as exc:
        text = str(exc)
        raise (exc if text.startswith(str(path)) else InputError(f"{path}: {text}")) from None
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

#: Files up to this size are fingerprinted by their content (pose files, configs); larger ones (videos,
#: depth files, weights) by size and modification time, which every rewrite changes.
CONTENT_HASH_BYTES = 1 << 20
_CONTENT_HASHES: dict[tuple, str] = {}  # one hash per file version per process (the stat is in the key)
_MODEL_FILES: dict[tuple, tuple[float, list[str]]] = {}  # which weight files a job loads, briefly cached
_MODEL_FILES_TTL_S = 30.0


def file_fingerprint(path: str | os.PathLike):
    """Identity of one input file: ``["sha256", hex]`` for small files, ``["stat", bytes, mtime_ns]`` for
    large ones, ``"missing"`` if absent."""
    import hashlib
    import stat as stat_module

    path = Path(path)
    try:
        st = path.stat()
    except (OSError, ValueError):
        return "missing"
    if not stat_module.S_ISREG(st.st_mode):
        return "not a file"
    if st.st_size > CONTENT_HASH_BYTES:
        return ["stat", st.st_size, st.st_mtime_ns]
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _CONTENT_HASHES.get(key)
    if digest is None:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        except OSError:
            return "unreadable"
        _CONTENT_HASHES[key] = digest
    return ["sha256", digest]


def _depth_model_files(spec: str, models_dir: str | None) -> list[str]:
    """The config and weight files the depth estimator ``spec`` loads (resolved without downloading)."""
    from ex4d.depth import weights

    return weights.estimator_weight_paths(spec, models_dir) or [f"unknown estimator {spec}"]


def _generate_model_files(models_dir: str | None, adapter: str | None) -> list[str]:
    """Every file the generation stage loads: the EX-4D adapter (and its config) and the Wan model."""
    from ex4d.diffusion.weights import models_dir as md

    files: list[str] = []
    try:
        found = md.resolve_adapter(models_dir, adapter, download=False)
    except Exception:  # missing: the job itself will say so; here "missing" is its identity
        files.append("missing adapter")
    else:
        files += [str(found), str(found.parent / md.ADAPTER_CONFIG)]  # the config may be absent ("missing")
    try:
        layout, folder = md.resolve_wan(models_dir, download=False)
    except Exception:
        return files + ["missing Wan2.1 weights"]
    folder = Path(folder)
    if layout == "original":
        wan = [*md.dit_shards(folder), folder / md.DIT_INDEX, folder / "config.json", folder / md.T5_FILE,
               folder / md.CLIP_FILE, folder / md.VAE_FILE, *sorted((folder / md.TOKENIZER_DIR).rglob("*"))]
    else:
        wan = [folder / "model_index.json"] + [p for c in md.DIFFUSERS_COMPONENTS for p in sorted((folder / c).rglob("*"))]
    return files + sorted({str(p) for p in wan if p.is_file() or not p.exists()})


def _model_files(kind: str, *args, fresh: bool = False) -> list[str]:
    """:func:`_depth_model_files` / :func:`_generate_model_files`, cached for a few seconds (a manifest
    rebuild asks for every job); ``fresh`` resolves again, as the record of a job about to run needs."""
    key = (kind, *args)
    now = time.monotonic()
    cached = _MODEL_FILES.get(key)
    if fresh or cached is None or now - cached[0] > _MODEL_FILES_TTL_S:
        files = _depth_model_files(*args) if kind == "depth" else _generate_model_files(*args)
        cached = _MODEL_FILES[key] = (now, files)
    return list(cached[1])


def job_input_files(job: dict, *, fresh: bool = False) -> dict[str, list[str]]:
    """Every file a job reads, by part: ``video``, ``depth_file`` or ``depth_models`` (the estimator's
    weights), ``cam_file`` (a pose file), ``generate_models`` (adapter + Wan, for ``stage: run``),
    ``lora_files`` (its extra LoRAs).

    Weight files are the ones the loaders would pick now (models dir, then the Hugging Face cache;
    nothing is downloaded); a part whose weights are missing says so instead of naming files.
    """
    parts: dict[str, list[str]] = {"video": [job["video"]]}
    depth = str(job.get("depth", "depthcrafter"))
    if Path(depth).suffix.lower() in _MAYBE_FILE_KEYS["depth"]:
        parts["depth_file"] = [depth]
    else:
        parts["depth_models"] = _model_files("depth", depth, job.get("models_dir"), fresh=fresh)
    cam = str(job.get("cam", "90"))
    if _names_file(cam, _MAYBE_FILE_KEYS["cam"]):
        parts["cam_file"] = [cam]
    if job.get("stage", "run") == "run":
        parts["generate_models"] = _model_files("generate", job.get("models_dir"), job.get("adapter"), fresh=fresh)
        if job.get("lora"):  # a LoRA file replaced under the same name reruns the job
            from ex4d.diffusion.weights.lora import parse_lora_spec

            parts["lora_files"] = [parse_lora_spec(item).path for item in job["lora"]]
    return parts


def job_fingerprint_parts(job: dict, *, fresh: bool = False) -> dict[str, str]:
    """Hash of the job's settings and of each part of :func:`job_input_files` (files by path and identity)."""
    from ex4d.pipeline import stable_hash

    settings = {k: v for k, v in job.items() if k not in ("index", "name", "device") and not k.startswith("_")}
    parts = {"settings": stable_hash(settings)}
    for part, files in job_input_files(job, fresh=fresh).items():
        parts[part] = stable_hash([[name, file_fingerprint(name)] for name in files])
    return parts


def job_fingerprint(job: dict, *, fresh: bool = False, parts: dict | None = None) -> str:
    """What a resume checks: the job's settings and the identity of every file it reads
    (:func:`job_input_files`; small files by content, large ones by size and modification time)."""
    from ex4d.pipeline import stable_hash

    return stable_hash(parts if parts is not None else job_fingerprint_parts(job, fresh=fresh))


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


SKIP_FINISHED, SKIP_FAILED = "finished earlier, skipped", "failed earlier, not retried"


def skip_reason(job: dict, retry_failed: bool) -> str | None:
    """Why a batch skips ``job`` (SKIP_FINISHED or SKIP_FAILED), or None to run it. Both engines (this
    module's and ex4d.batch_ray) decide with this."""
    record = read_record(job)
    if is_finished(job, record):
        return SKIP_FINISHED
    if (not retry_failed and record and record.get("status") == "failed"
            and record.get("fingerprint") == job_fingerprint(job)):
        return SKIP_FAILED
    return None


def write_record(job: dict, record: dict) -> Path:
    path = Path(job["output"]) / RECORD_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    return path


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_LOCK_MARK = b"ex4d batch manifest lock (removed when the batch has written the manifest)\n"


def lock_path(manifest: str | os.PathLike) -> Path:
    """The lock file of a manifest: ``<manifest>.lock``, present only while a process writes the manifest."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.name + ".lock")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` for read-modify-write by many ranks; the file is gone afterwards.

    The holder deletes the lock file before it lets go. A process that was waiting on that file then
    holds a lock on a deleted file, sees that the path now names another file (or none) and starts
    over, so two processes can never both believe they hold the lock. A file left by a process killed
    inside (SIGKILL) is taken over by the next one, which removes it in turn. A file of that name with
    foreign content is refused, never deleted.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            raise InputError(f"cannot create the manifest lock {path}: {exc.strerror or exc} "
                             f"(choose another --manifest, or remove what is in the way)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the previous holder deleted the file while this process waited: lock the new one
    try:
        content = os.pread(fd, len(_LOCK_MARK) + 1, 0)
        if content and content != _LOCK_MARK:
            raise InputError(f"{path} exists and was not written by ex4d; move it away or choose another "
                             f"--manifest (ex4d locks the manifest with a file of that name)")
        if not content:
            os.write(fd, _LOCK_MARK)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        try:
            os.unlink(path)  # still holding the lock: waiters notice the file is gone and retry
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def build_manifest(jobs: list[dict], jobs_file: str = "") -> dict:
    """The batch manifest assembled from every job's record: one entry per job, plus counts.

    ``job`` is the job's 1-based number in the jobs file (as every message counts); ``index`` the
    same position 0-based (as :class:`BatchResult` and Python lists count).
    """
    entries = []
    counts = {"done": 0, "failed": 0, "running": 0, "pending": 0}
    for job in jobs:
        record = read_record(job) or {}
        status = record.get("status", "pending")
        if status == "done" and not is_finished(job, record):
            status = "pending"  # settings or inputs changed since, or outputs deleted
        counts[status] = counts.get(status, 0) + 1
        entries.append({
            "job": job["index"] + 1, "index": job["index"], "name": job["name"], "output": job["output"],
            "status": status, "started": record.get("started"), "finished": record.get("finished"),
            "seconds": record.get("seconds"), "rank": record.get("rank"), "error": record.get("error"),
            "outputs": record.get("outputs"), "timings": record.get("timings"),
        })
    return {"about": "ex4d batch manifest: 'job' counts jobs from 1 in file order (as messages do), "
                     "'index' from 0", "jobs_file": jobs_file, "updated": _now(), "counts": counts, "jobs": entries}


def check_manifest_path(path: str | os.PathLike, jobs: list[dict]) -> Path:
    """Refuse a manifest path that is a folder, a job's output folder or record, an input of the batch
    (the jobs file or any file a job reads, when protected by the write policy) or a foreign file."""
    path = Path(path)
    resolved = path.resolve()
    if path.is_dir():
        raise InputError(f"--manifest {path} is a folder; give a file name such as {path / 'manifest.json'}")
    for job in jobs:
        if resolved in (Path(job["output"]).resolve(), (Path(job["output"]) / RECORD_NAME).resolve()):
            raise InputError(f"--manifest {path} is job {job['index'] + 1}'s output; choose another --manifest")
    check_output(path, "--manifest")
    return path


def write_manifest(path: str | os.PathLike, jobs: list[dict], jobs_file: str = "", *, check: bool = False) -> Path:
    """Rebuild and atomically write the manifest, under a lock shared by all ranks.

    Each rank writes its record *before* taking the lock, so the last writer has seen every record.
    The lock file is removed again (see :func:`_locked`). ``check``: :func:`check_manifest_path` first,
    under the lock (so that another rank's write in progress never looks like a foreign file).
    """
    path = Path(path)
    with _locked(lock_path(path)):
        if check:
            check_manifest_path(path, jobs)
        manifest = build_manifest(jobs, jobs_file)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
    return path


# --------------------------------------------------------------------------------------------
# Checking without running (--dry-run)
# --------------------------------------------------------------------------------------------

_ESTIMATOR_NAMES = ("depthcrafter", "depth-anything", "depth-anything-v2", "depthanything", "vda", "vda-metric",
                    "vda-base", "vda-large", "vda-metric-base", "vda-metric-large")


def probe_video(path: str | os.PathLike, need: int) -> tuple[int, tuple[int, int]]:
    """Decode up to ``need`` frames of a video without keeping them: (frames found, at most ``need``; (H, W)).

    Raises :class:`InputError` with read_video's messages for a missing, unreadable or empty video.
    """
    import av

    path = require_file(path, "video")
    try:
        container = av.open(str(path))
    except av.error.EOFError:
        raise InputError(f"{path} contains zero frames; give a video with at least one frame") from None
    except Exception as exc:  # PyAV raises many error types for a non-video file
        raise InputError(f"cannot read {path} as a video ({type(exc).__name__}); give an mp4/mkv/mov/avi file") from None
    count, size = 0, (0, 0)
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream; give a video file")
        try:
            for frame in container.decode(container.streams.video[0]):
                size = (frame.height, frame.width)
                count += 1
                if count >= need:
                    break
        except Exception as exc:
            if not count:
                raise InputError(f"cannot decode {path} ({type(exc).__name__}); is it a valid video?") from None
    if not count:
        raise InputError(f"{path} contains zero frames; give a video with at least one frame")
    return count, size


def _gpu_feature_problem(job: dict) -> str:
    """Why this machine's GPUs cannot run ``job``'s ``fp8`` / ``attention: fp8`` (``ex4d run``'s one-line
    check); "" when they can or the job asks for neither."""
    if job.get("stage") != "run" or not (job.get("fp8") or job.get("attention") == "fp8"):
        return ""
    from ex4d.diffusion.performance import check_gpu_features

    try:
        check_gpu_features(fp8=bool(job.get("fp8")), attention=job.get("attention"))
    except UserError as exc:
        return _one_line(exc)
    return ""


def check_jobs_gpu_features(jobs: list[dict]) -> None:
    """One-line InputError before job 1 when an unfinished ``run`` job asks for ``fp8`` or ``attention: fp8``
    and this machine's GPUs cannot run it (``ex4d run`` checks the same at its start), instead of
    failing when that job's generation starts, after the jobs before it and its own depth and recon."""
    for job in jobs:
        problem = "" if is_finished(job) else _gpu_feature_problem(job)
        if problem:
            raise InputError(f"job {job['index'] + 1} ({job['name']}): {problem}")


def check_jobs(jobs: list[dict], *, manifest: str | os.PathLike | None = None, jobs_file: str = "",
               overwrite: bool = False) -> list[str]:
    """Check what running ``jobs`` would read, without running them; one line per problem found.

    Every video is opened and its frames counted against ``num_frames``; every camera path is
    parsed, pose files read for the clip's frame count and size; depth files and adapters must
    exist and estimator names be known; the manifest path is checked as :func:`run_batch` would.
    Problems name the job by its 1-based number.
    """
    import numpy as np

    from ex4d.camera.trajectory import make_trajectory, parse_spec
    from ex4d.camera.posefile import load_pose_file
    from ex4d.conventions import reference_intrinsics
    from ex4d.io.video import reference_size

    problems: list[str] = []
    probes: dict[tuple[str, int], tuple | UserError] = {}
    with write_policy(overwrite=overwrite, inputs=[jobs_file] + [f for job in jobs for f in job_inputs(job)]):
        for job in jobs:
            tag = f"job {job['index'] + 1} ({job['name']})"
            need = job.get("num_frames", 49)
            size = None
            key = (job["video"], need)
            if key not in probes:
                try:
                    probes[key] = probe_video(job["video"], need)
                except UserError as exc:
                    probes[key] = exc
            probe = probes[key]
            if isinstance(probe, UserError):
                problems.append(f"{tag}: {_one_line(probe)}")
            else:
                count, (height, width) = probe
                if count < need:
                    fit = max(1, (count - 1) // 4 * 4 + 1)  # 4k+1: valid for generation too
                    problems.append(f"{tag}: video {job['video']} has only {count} frames but num_frames is "
                                    f"{need}; set num_frames: {fit} or fewer, or use a longer video")
                if job.get("resize", "reference") == "keep":
                    size = (height - height % 2, width - width % 2)
                elif job.get("resize", "reference") == "reference":
                    size = reference_size(height, width, max_res=job.get("max_res", 1024))
                else:
                    problems.append(f"{tag}: resize={job['resize']!r}; use 'reference' or 'keep'")
            cam = job["cam"]
            try:
                if size is not None:
                    make_trajectory(cam, num_frames=need, size=size, K=reference_intrinsics(*size),
                                    depth0=np.full(size, 5.0, np.float32), resample=job.get("resample", False))
                elif _names_file(cam, _MAYBE_FILE_KEYS["cam"]):
                    load_pose_file(cam, num_frames=need, K_src=reference_intrinsics(512, 512),
                                   pivot=np.array([0.0, 0.0, 5.0]), resample=job.get("resample", False))
                else:
                    parse_spec(cam)
            except UserError as exc:
                problems.append(f"{tag}: cam: {_one_line(exc)}")
            depth = str(job.get("depth", "depthcrafter"))
            if Path(depth).suffix.lower() in _MAYBE_FILE_KEYS["depth"]:
                if not Path(depth).is_file():
                    problems.append(f"{tag}: depth file not found: {depth} (check the path)")
            elif depth.lower().replace("_", "-") not in _ESTIMATOR_NAMES:
                problems.append(f"{tag}: unknown depth estimator {depth!r}; use depthcrafter, depth-anything, "
                                f"vda, vda-metric (or vda-base/-large, non-commercial) or a .npz/.npy file")
            if job.get("stage") == "run" and job.get("adapter") and not Path(job["adapter"]).exists():
                problems.append(f"{tag}: adapter not found: {job['adapter']} (check the path)")
            gpu_problem = _gpu_feature_problem(job)  # this machine's GPU, as ex4d run checks at its start
            if gpu_problem:
                problems.append(f"{tag}: {gpu_problem}")
            if job.get("stage") == "run" and job.get("lora"):
                from ex4d.diffusion.weights.lora import parse_lora_spec

                for spec in (parse_lora_spec(item, f"{tag}: lora") for item in job["lora"]):
                    if not Path(spec.path).is_file():
                        problems.append(f"{tag}: LoRA file not found: {spec.path} (check the path)")
        if manifest is not None:
            try:
                check_manifest_path(manifest, jobs)
            except UserError as exc:
                problems.append(_one_line(exc))
    return problems


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
    """What this process did: the jobs it ran, skipped as finished, left alone as failed before
    (``retry_failed=False``), and that failed now, as 0-based indices (job number - 1)."""

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


def job_inputs(job: dict) -> list[str]:
    """Every file ``job`` reads (:func:`job_input_files`, flattened): protected from writes while a batch runs."""
    return [name for files in job_input_files(job).values() for name in files]


def run_batch(jobs: list[dict], *, runner: JobRunner | None = None, manifest: str | os.PathLike | None = None,
              jobs_file: str = "", worker: Worker | None = None, cache: dict | None = None,
              retry_failed: bool = True, progress: Callable[..., Iterable] | None = None,
              report: Callable[[str], None] | None = None, overwrite: bool = False) -> BatchResult:
    """Run this process's share of ``jobs``; skip finished ones; record every outcome.

    runner: runs one job (default :func:`default_runner`). manifest: path of the batch manifest
    (None: none written). cache: kept across jobs so models load once (a fresh dict by default).
    retry_failed: False skips jobs whose record says failed. progress: a tqdm-like callable used
    for the one progress bar over this process's jobs. report: called with one plain line per job
    (for logs, when stderr is not a terminal); without it those lines go to the logger.
    overwrite: let jobs replace files that ex4d did not write (``--overwrite``).

    Writes follow :func:`ex4d.io.files.write_policy`: the jobs file and every file any job reads are
    protected for the whole batch (the manifest is checked against them before any job runs), and
    each job runs in its own nested policy. Never raises for a failing job.
    """
    runner = runner or default_runner
    worker = worker or Worker()
    cache = {} if cache is None else cache
    mine = worker.share(jobs)
    result = BatchResult(manifest=Path(manifest) if manifest else None)
    prefix = "" if worker.world_size == 1 else f"rank {worker.rank}: "

    def say(message: str, level: int = logging.INFO) -> None:
        if report is not None:
            report(prefix + message)
        else:
            log.log(level, prefix + message)

    with write_policy(overwrite=overwrite, inputs=[jobs_file] + [f for job in jobs for f in job_inputs(job)]):
        if manifest:  # before any job: a clash fails now, not after hours
            write_manifest(manifest, jobs, jobs_file, check=True)
        bar = progress(total=len(mine), desc="batch" if worker.world_size == 1 else f"batch rank {worker.rank}",
                       unit="job", position=worker.rank) if progress else None
        try:
            for count, job in enumerate(mine, 1):
                tag = f"[{count}/{len(mine)}] job {job['index'] + 1} ({job['name']})"
                reason = skip_reason(job, retry_failed)
                if reason is not None:
                    say(f"{tag}: {reason}")
                    (result.skipped if reason == SKIP_FINISHED else result.skipped_failed).append(job["index"])
                else:
                    with write_policy(overwrite=overwrite, inputs=job_inputs(job)):
                        _run_one(job, runner, cache, worker, result, say, tag)
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


def _run_one(job: dict, runner: JobRunner, cache: dict, worker: Worker, result: BatchResult,
             say: Callable[..., None], tag: str) -> None:
    job = dict(job)
    device = worker.device(job.get("device"))
    if device is not None:
        job["device"] = device
    parts = job_fingerprint_parts(job, fresh=True)  # the inputs as this run reads them
    base = {"job": job["index"] + 1, "index": job["index"], "name": job["name"],
            "fingerprint": job_fingerprint(job, parts=parts), "inputs": parts,
            "settings": {k: v for k, v in job.items() if k != "index"}, "rank": worker.rank}
    started, t0 = _now(), time.perf_counter()
    try:
        Path(job["output"]).mkdir(parents=True, exist_ok=True)
        before = (read_record(job) or {}).get("inputs") or {}
        if before.get("depth_models") not in (None, parts.get("depth_models")):
            # depth.npz's own reuse check knows the estimator's name, not its weights: drop it so that
            # the new weights compute it again (before the "running" record, so a crash cannot revive it)
            stale = Path(job["output"]) / "depth.npz"
            with contextlib.suppress(InputError):  # never one that is an input (another job's depth file)
                forget_output(check_output(stale))
        # A "running" record marks a job a crash (e.g. killed for memory) interrupted; resume reruns it.
        write_record(job, {**base, "status": "running", "started": started})
    except (OSError, UserError) as exc:  # no record can be written there; the manifest will show it as pending
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
        say(f"{tag}: failed: cannot write to its output folder {job['output']}: {why}", logging.WARNING)
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
        record = {**base, "status": "failed", "error": _one_line(exc)}
        if not isinstance(exc, UserError):
            record["traceback"] = traceback.format_exc()
        result.failed.append(job["index"])
        _free_accelerator_memory()
    record.update(started=started, finished=_now(), seconds=round(time.perf_counter() - t0, 3))
    write_record(job, record)
    if record["status"] == "done":
        say(f"{tag}: done in {record['seconds']:.1f} s")
    else:
        say(f"{tag}: failed: {record['error']}", logging.WARNING)


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
    # A warm pipeline does generation's work on the condition (frame 0, the encodes) while recon renders.
    ahead = pipeline.start_ahead_of_recon(job_generate_options(job), cache, clip.num_frames) \
        if job["stage"] == "run" else None
    try:
        t = time.perf_counter()
        written = {k: str(v) for k, v in pipeline.run_recon(clip, depth, job["output"], options,
                                                            condition_sink=ahead.sink if ahead else None).items()}
        timings["recon"] = time.perf_counter() - t
        if job["stage"] == "run":
            t = time.perf_counter()
            written.update(generate_stage(job, written, cache, timings, ahead=ahead))
            timings["generate"] = time.perf_counter() - t
    finally:
        if ahead is not None:  # a failed job's work ahead stops here, not in the next job
            ahead.close()
    if job["stage"] == "run" and job.get("eval"):
        t = time.perf_counter()
        written.update(eval_stage(job, written))
        timings["eval"] = time.perf_counter() - t
    written["_timings"] = {k: round(v, 3) for k, v in timings.items()}
    return written


def eval_stage(job: dict, written: dict) -> dict:
    """``eval: true``: evaluate the generated video against its camera path and condition render
    (docs/eval.md) into ``eval_<cam>/`` of the job's output folder. Returns {"eval_<file>": path}."""
    from ex4d.eval.evaluate import OUTPUT_NAMES, evaluate_video, write_report
    from ex4d.io.files import check_outputs, prepare_output_dir

    video = Path(written["video"])
    name = video.stem.replace("ex4d_", "eval_", 1) if video.stem.startswith("ex4d_") else f"eval_{video.stem}"
    out_dir = prepare_output_dir(Path(job["output"]) / name)
    check_outputs([out_dir / file for file in OUTPUT_NAMES])
    summary, arrays = evaluate_video(video, written["camera"], written.get("color"), written.get("mask_lossless"))
    return {f"eval_{role}": str(path) for role, path in write_report(out_dir, summary, arrays).items()}


# --------------------------------------------------------------------------------------------
# Generation stage (pipeline loaded once per process and kept while the settings match)
# --------------------------------------------------------------------------------------------

def job_generate_options(job: dict):
    """The :class:`ex4d.pipeline.GenerateOptions` of a ``stage: run`` job."""
    from ex4d.pipeline import GenerateOptions

    memory = job.get("memory", "full")
    return GenerateOptions(
        seed=job.get("seed", 0), steps=job.get("steps"), cfg=job.get("guidance"), shift=job.get("shift"),
        preset=job.get("preset", "full"), loras=tuple(job.get("lora") or ()), prompt_cache=job.get("prompt_cache"),
        prompt=job.get("prompt"), negative_prompt=job.get("negative_prompt"), size=job.get("size", "512x512"),
        fps=job.get("out_fps"), erode=job.get("erode", True), window=job.get("window", 49),
        overlap=job.get("overlap", 17), models_dir=job.get("models_dir"), adapter=job.get("adapter"),
        device=job.get("device", "auto"), attention=job.get("attention"), compile=job.get("compile", False),
        low_vram=memory == "low-vram", cpu_offload=memory == "cpu-offload", fp8=job.get("fp8", False),
        vram_budget=job.get("vram_budget"))


def generation_key(job: dict) -> tuple:
    """What the cached generation pipeline depends on; a job with another key reloads it."""
    return job_generate_options(job).pipeline_key()


def generate_stage(job: dict, recon: dict, cache: dict, timings: dict | None = None, *,
                   ahead=None) -> dict:
    """Generate ``ex4d_<cam>.mp4`` in the job's output folder from the recon files in ``recon``.

    The pipeline is loaded once per process and kept in ``cache``; clips longer than the window
    (default 49 frames) go through overlapping windows. ``ahead``: generation's work on the condition
    started during recon (``ex4d.pipeline.start_ahead_of_recon``). Returns {"video": path}.
    """
    from ex4d.pipeline import run_generate

    if "color" not in recon:
        raise UserError(f"job {job['index'] + 1}: the recon stage wrote no colour video to generate from")
    color = Path(recon["color"])
    mask = Path(recon["mask_lossless"]) if "mask_lossless" in recon else None
    name = color.name.replace("color_", "ex4d_", 1) if color.name.startswith("color_") else f"ex4d_{color.name}"
    out = run_generate(color, mask, Path(job["output"]) / Path(name).with_suffix(".mp4"), job_generate_options(job),
                       cache=cache, show_progress=False,  # the batch has its own progress display
                       ahead=ahead)
    result = {"video": str(out)}
    if "left" in recon:  # cam: stereo -- pack the left eye with the generated right eye (docs/stereo.md)
        from ex4d.stereo.pack import LAYOUTS, output_paths, pack_generated

        packed = output_paths(job["output"], Path(name).stem, LAYOUTS, "mkv")
        result.update({f"stereo_{layout}": str(path) for layout, path in pack_generated(recon["left"], out,
                                                                                          packed).items()})
    return result
