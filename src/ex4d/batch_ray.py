"""``ex4d batch --ray``: the jobs of a batch on a Ray cluster, one long-lived actor per GPU.

The driver (the process that runs ``ex4d batch``) decides what runs, exactly as the native batch
does (:mod:`ex4d.batch`): a job whose record says done for the same settings and input files is
skipped, a job that failed before is retried (or left alone with ``retry_failed=False``). It hands
the jobs one at a time to idle actors, so a job never runs on two actors at once, and it alone
writes the batch manifest (rebuilt from the job records after every job, as the native batch does).

Each actor is one Ray worker process holding one GPU (``num_gpus=1``; on a cluster without GPUs, a
stated number of CPU actors). It keeps a model cache for its whole life, so the depth estimator and
the generation pipeline load once per actor, and runs each job with the native batch's own code
(``ex4d.batch._run_one`` under the same write policies): the job record in the job's output folder
and the outputs are written by the actor, atomically, exactly as one native process writes them.
Inputs and outputs are therefore paths on a filesystem every node sees (NFS, Lustre, a cloud
filesystem mount); before a job the actor checks that it can read the job's input files and write
its output folder, and fails the job with a line naming its host and the path if not.

A worker that dies (killed, out of memory, a lost node) loses only its current job: the driver gets
``RayActorError``, removes the temporaries the dead process left in that job's output folder (named
after its host and process id), starts a replacement actor and gives the job to the next idle actor.
A job whose worker died ``max_worker_deaths + 1`` times is recorded as failed. A job killed half-way
keeps its ``running`` record, so it is never taken for done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from collections import deque
from pathlib import Path
from typing import Callable

from ex4d.batch import (BatchResult, JobRunner, Worker, _one_line, _run_one, job_fingerprint, job_input_files,
                        SKIP_FINISHED, job_inputs, read_record, skip_reason, write_manifest, write_record, _now)
from ex4d.errors import InputError, UserError
from ex4d.io.files import temporary_tag, write_policy

log = logging.getLogger(__name__)

#: How to get Ray, in every message that needs it.
INSTALL_HINT = 'pip install -e ".[ray]"  (or: pip install "ray>=2.40")'
#: Times a job may kill its worker before it is recorded as failed (a job that crashes the process
#: every time, e.g. a segfault in a driver, must not take down worker after worker forever).
MAX_WORKER_DEATHS = 2
#: Seconds between progress lines while no job ends.
PROGRESS_EVERY_S = 60.0

# The input parts a worker must be able to read itself (weights are checked by their loaders, which
# name the missing file and its download command).
_READ_PARTS = {"video": "video", "depth_file": "depth file", "cam_file": "pose file", "lora_files": "LoRA file"}


def import_ray():
    """``ray``, or a one-line :class:`InputError` with the install command."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed; install it with: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None):
    """Connect to Ray. None or "": start a local instance; "auto": the running cluster (``ray start``);
    ``ray://host:port`` (Ray Client) or ``host:port`` (the head's GCS address): that cluster.

    Returns (ray, started): ``started`` is True if this call connected (and should disconnect).
    An existing connection of this process is used as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs = {"include_dashboard": False, "log_to_driver": True}
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            with _local_worker_niceness():
                ray.init(**kwargs)
    except (ConnectionError, TimeoutError, ValueError) as exc:
        where = f"at {address}" if address else "(a local instance)"
        raise InputError(f"cannot connect to the Ray cluster {where}: {_one_line(exc)}; start one with "
                         f"'ray start --head' or pass its address (--ray auto, --ray HOST:6379, "
                         f"--ray ray://HOST:10001)") from None
    return ray, True


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """One TCP connection to ``[ray://]host:port`` first: Ray itself retries an unreachable address for
    minutes before it gives up."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"--ray {address}: give auto, HOST:PORT (e.g. head-node:6379) or ray://HOST:PORT "
                         f"(e.g. ray://head-node:10001), or nothing to start a local instance")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; is the head node "
                         f"running ('ray start --head') and the address right?") from None


@contextlib.contextmanager
def _local_worker_niceness():
    """Start a local Ray instance whose workers run at normal priority (``RAY_worker_niceness=0``).

    Ray starts its worker processes at niceness 15 by default. On a machine that also runs other
    work, the actors would then get a fraction of the CPU that a native ``ex4d batch`` process gets
    (measured: every job twice as long on a busy 2-core machine). A value the user set is kept.
    """
    key = "RAY_worker_niceness"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def plan_workers(nodes: list[dict], workers: int | None) -> tuple[int, dict]:
    """How many actors and what each asks for, from the resources of the cluster's nodes.

    With GPUs: one actor per GPU (``workers`` may ask for fewer), each ``num_gpus=1`` and its share of
    its node's CPUs (the fewest CPUs per GPU of any GPU node). Without: a stated number of CPU actors
    (default 1); on one node each takes an equal share of its CPUs, on several nodes one CPU each.
    Ray sets a worker's thread count (``OMP_NUM_THREADS``) from its CPUs, so an actor that takes
    one CPU of a node of 16 would run torch's CPU work on one thread. Asking for more actors than the
    cluster can hold is refused (they would wait for resources forever).
    """
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
    gpus = sum(int(n["GPU"]) for n in gpu_nodes)
    cpus = sum(int(n.get("CPU", 0)) for n in nodes)
    if workers is not None and workers < 1:
        raise InputError(f"--ray-workers {workers}: give at least 1")
    if gpus:
        count = gpus if workers is None else workers
        if count > gpus:
            raise InputError(f"--ray-workers {count}: the Ray cluster has {gpus} GPU(s), one actor per GPU; "
                             f"give at most {gpus} or add GPU nodes")
        share = min(int(n.get("CPU", 0)) // int(n["GPU"]) for n in gpu_nodes)
        return count, {"num_gpus": 1, "num_cpus": share}
    count = 1 if workers is None else workers
    if count > cpus:
        raise InputError(f"--ray-workers {count}: the Ray cluster has no GPU and {cpus} CPU(s), at least one CPU "
                         f"per actor; give at most {cpus}")
    return count, {"num_gpus": 0, "num_cpus": cpus // count if len(nodes) == 1 else 1}


class JobActor:
    """One Ray actor: a model cache for its whole life, one job at a time (made remote by
    :func:`run_batch_ray`, so this class stays importable without Ray)."""

    def __init__(self, slot: int, protected: list[str], overwrite: bool, runner: JobRunner | None):
        self.slot = slot
        self.protected = protected  # the batch's inputs: never written, whichever job runs
        self.overwrite = overwrite
        self.runner = runner
        self.cache: dict = {}  # models stay resident between jobs, as in one native batch process
        self.host = socket.gethostname()

    def where(self) -> dict:
        """Host, process id and the ``<host>-<pid>`` tag its temporaries carry (see ex4d.io.files)."""
        tag = temporary_tag().removeprefix(".partial-").rsplit("-", 1)[0]
        return {"host": self.host, "pid": os.getpid(), "tag": tag, "slot": self.slot}

    def access_problem(self, job: dict) -> str | None:
        """Why this worker cannot run ``job`` (an input it cannot read, an output folder it cannot write),
        naming the host and the path; None if it can."""
        shared = "(ex4d batch --ray needs inputs and outputs on a filesystem every Ray node sees)"
        for part, what in _READ_PARTS.items():
            for name in job_input_files(job).get(part, []):
                if not os.path.isfile(name) or not os.access(name, os.R_OK):
                    return f"{what} not found or not readable on host {self.host}: {name} {shared}"
        out = Path(job["output"])
        probe = out / f".ex4d-access{temporary_tag()}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as exc:
            return (f"cannot write the output folder {out} on host {self.host}: {exc.strerror or exc} "
                    f"{shared}")
        return None

    def run(self, job: dict, tag: str) -> dict:
        """Run one job with the native batch's code; its record and outputs land in its output folder.

        Returns {"status": done|failed, "line": what happened, "recorded": whether the record says so}.
        """
        import ex4d.batch as native

        problem = self.access_problem(job)
        if problem is not None:
            return {"status": "failed", "line": f"{tag}: failed: {problem}", "error": problem, "recorded": False}
        result, lines = BatchResult(), []
        runner = self.runner or native.default_runner
        with write_policy(overwrite=self.overwrite, inputs=self.protected):
            with write_policy(overwrite=self.overwrite, inputs=job_inputs(job)):
                _run_one(job, runner, self.cache, Worker(rank=self.slot), result,
                         lambda message, level=logging.INFO: lines.append(message), tag)
        status = "done" if job["index"] in result.ran else "failed"
        record = read_record(job) or {}
        return {"status": status, "line": lines[-1] if lines else f"{tag}: {status}",
                "error": record.get("error"), "recorded": record.get("status") == status}


def run_batch_ray(jobs: list[dict], *, address: str | None = None, workers: int | None = None,
                  runner: JobRunner | None = None, manifest: str | os.PathLike | None = None, jobs_file: str = "",
                  retry_failed: bool = True, report: Callable[[str], None] | None = None,
                  overwrite: bool = False, max_worker_deaths: int = MAX_WORKER_DEATHS,
                  progress_every_s: float = PROGRESS_EVERY_S) -> BatchResult:
    """Run ``jobs`` on Ray actors; same skipping, records and manifest as :func:`ex4d.batch.run_batch`.

    address: see :func:`connect`. workers: actors to start (default one per GPU, or 1 on a cluster
    without GPUs). runner: runs one job inside an actor (default :func:`ex4d.batch.default_runner`);
    it is pickled to the workers. report: gets one plain line per job event and a progress line
    (jobs done / failed / running / pending and clips per hour); without it the lines go to the
    logger. Never raises for a failing job or a dying worker.
    """
    say = report or (lambda line: log.info(line))
    result = BatchResult(manifest=Path(manifest) if manifest else None)
    protected = [jobs_file] + [f for job in jobs for f in job_inputs(job)]
    with write_policy(overwrite=overwrite, inputs=protected):
        if manifest:  # before any job and before Ray starts: a clash fails now, not after hours
            write_manifest(manifest, jobs, jobs_file, check=True)
        queue: deque[dict] = deque()
        for job in jobs:
            tag = f"job {job['index'] + 1} ({job['name']})"
            reason = skip_reason(job, retry_failed)
            if reason is not None:
                say(f"{tag}: {reason}")
                (result.skipped if reason == SKIP_FINISHED else result.skipped_failed).append(job["index"])
            else:
                queue.append(job)
        if queue:
            ray, started = connect(address)
            try:
                _drive(ray, queue, jobs, result, say, runner=runner, workers=workers, protected=protected,
                       overwrite=overwrite, manifest=manifest, jobs_file=jobs_file,
                       max_worker_deaths=max_worker_deaths, progress_every_s=progress_every_s)
            finally:
                if started:
                    ray.shutdown()
        if manifest:
            write_manifest(manifest, jobs, jobs_file)
    return result


def _drive(ray, queue: deque, jobs: list[dict], result: BatchResult, say, *, runner, workers, protected,
           overwrite, manifest, jobs_file, max_worker_deaths, progress_every_s) -> None:
    """The scheduling loop: idle actors take the next job; ends when every job has ended."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    count, resources = plan_workers([n["Resources"] for n in ray.nodes() if n.get("Alive")], workers)
    remote_class = ray.remote(max_restarts=0, max_task_retries=0, **resources)(JobActor)
    protected_ref = ray.put(protected)  # one copy in the object store, not one per actor
    total = len(queue)
    deaths: dict[int, int] = {}
    slots = iter(range(1 << 30))

    def start_actor():
        slot = next(slots)
        actor = remote_class.remote(slot, protected_ref, overwrite, runner)
        return {"actor": actor, "slot": slot, "where": actor.where.remote()}

    idle = [start_actor() for _ in range(count)]
    try:
        # Fail now (not job by job) when no worker can start, e.g. ex4d is not installed on the nodes.
        ray.get(idle[0]["where"])
    except RayActorError as exc:
        raise UserError(f"the Ray workers cannot start ({_one_line(exc)}); every node needs ex4d installed "
                        f"(pip install -e \".[ray]\") and access to the shared filesystem") from None
    kind = "GPU" if resources["num_gpus"] else "CPU"
    say(f"ray: {count} {kind} actor(s) on {len(ray.nodes())} node(s); {total} job(s) to run")
    running: dict = {}  # object ref -> (worker, job, tag)
    t0, last_line = time.perf_counter(), 0.0
    done_now = 0

    def progress_line() -> None:
        hours = (time.perf_counter() - t0) / 3600
        rate = done_now / hours if hours > 0 else 0.0
        say(f"ray: {len(result.ran)} done, {len(result.failed)} failed, {len(running)} running, "
            f"{len(queue)} pending ({len(result.skipped)} finished earlier); {rate:.1f} clips/hour")

    try:
        while queue or running:
            while idle and queue:
                worker, job = idle.pop(), queue.popleft()
                tag = f"job {job['index'] + 1} ({job['name']})"
                running[worker["actor"].run.remote(job, tag)] = (worker, job, tag)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=progress_every_s)
            for ref in ready:
                worker, job, tag = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except RayActorError as exc:
                    where = _where(ray, worker, GetTimeoutError)
                    swept = _sweep_dead_worker(job["output"], where.get("tag"))
                    deaths[job["index"]] = deaths.get(job["index"], 0) + 1
                    host = where.get("host", "?")
                    reason = _one_line(exc)
                    if deaths[job["index"]] > max_worker_deaths:
                        times = deaths[job["index"]]
                        error = (f"its Ray worker died {times} time{'s' if times > 1 else ''} while running it "
                                 f"(last on host {host}: {reason})")
                        _record_failure(job, error, worker["slot"])
                        result.failed.append(job["index"])
                        say(f"{tag}: failed: {error}")
                    else:
                        queue.appendleft(job)  # the next idle actor takes it first
                        say(f"{tag}: its worker (actor {worker['slot']} on host {host}) died; "
                            f"{len(swept)} temporaries removed; retrying it on another actor")
                    ray.kill(worker["actor"], no_restart=True)
                    idle.append(start_actor())
                    continue
                except RayTaskError as exc:  # a bug outside the job's own code (which records its errors)
                    outcome = {"status": "failed", "recorded": False, "error": f"ray worker error: {_one_line(exc)}"}
                    outcome["line"] = f"{tag}: failed: {outcome['error']}"
                if outcome["status"] == "done":
                    result.ran.append(job["index"])
                    done_now += 1
                else:
                    result.failed.append(job["index"])
                    if not outcome["recorded"] and outcome.get("error"):
                        # the worker could not write there; record it from here if this host can
                        _record_failure(job, outcome["error"], worker["slot"])
                say(outcome["line"] + ("" if outcome["status"] == "failed" else f" (actor {worker['slot']})"))
                idle.append(worker)
                if manifest:
                    write_manifest(manifest, jobs, jobs_file)
            if ready or time.perf_counter() - last_line >= progress_every_s:
                progress_line()
                last_line = time.perf_counter()
    finally:
        for worker in idle + [w for w, _, _ in running.values()]:
            ray.kill(worker["actor"], no_restart=True)


def _where(ray, worker: dict, timeout_error) -> dict:
    """What a (now dead) actor reported when it started: host, pid, temporary tag; {} if it never did."""
    try:
        return ray.get(worker["where"], timeout=5)
    except (timeout_error, Exception):  # it died before reporting: nothing of its own to sweep
        return {}


def _sweep_dead_worker(output: str, owner: str | None) -> list[Path]:
    """Remove the temporaries that the dead process ``owner`` (``<host>-<pid>``) left under a job's output
    folder: ``.<name>.partial-<owner>-...`` files and staging folders, and a folder it had renamed
    aside (``.<name>.old-<owner>-...``) goes back if its replacement never arrived.

    The sweep in :mod:`ex4d.io.files` judges only temporaries of its own host (it asks the OS whether
    the process lives); here Ray has told the driver that this process is dead, on whatever host.
    """
    touched: list[Path] = []
    root = Path(output)
    if not owner or not root.is_dir():
        return touched
    partial, old = f".partial-{owner}-", f".old-{owner}-"
    for folder, dirs, files in os.walk(root):
        for name in list(dirs) + files:
            entry = Path(folder) / name
            if not name.startswith("."):
                continue
            if partial in name:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                    dirs.remove(name)
                else:
                    entry.unlink(missing_ok=True)
                touched.append(entry)
            elif old in name:
                final = entry.with_name(name[1:].split(old, 1)[0])
                if final.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    os.replace(entry, final)
                if name in dirs:
                    dirs.remove(name)
                touched.append(entry)
    return touched


def _record_failure(job: dict, error: str, slot: int) -> None:
    """Record a failure the worker could not record itself (it died, or cannot write there)."""
    try:
        previous = read_record(job) or {}
        write_record(job, {"job": job["index"] + 1, "index": job["index"], "name": job["name"],
                           "fingerprint": job_fingerprint(job), "inputs": previous.get("inputs"),
                           "settings": {k: v for k, v in job.items() if k != "index"}, "rank": slot,
                           "status": "failed", "error": error, "started": previous.get("started"),
                           "finished": _now()})
    except (OSError, UserError) as exc:  # not writable from the driver either: the driver's line says it
        log.warning("cannot record the failure of job %d in %s: %s", job["index"] + 1, job["output"], exc)
