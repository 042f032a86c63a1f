"""Clips per hour of ``ex4d batch --ray`` against the native ``ex4d batch``, same jobs, same machine.

Prints ONE JSON object (and appends it to --out if given): git commit, device, versions, shapes,
for each engine the wall clock of every repeat of the whole ``ex4d batch`` command (a fresh process,
as a user runs it) and its median, clips per hour (jobs / median wall clock: imports, model loading
and, for Ray, the driver's connection and the actors' start-up are paid as a user pays them; the Ray
instance itself is started once, outside the timing, as a running cluster is: ``--ray ADDRESS``), the
median per-job seconds from the job records leaving out the first job of each process or actor
(the steady state of a long batch), and the ratios Ray / native of both (goal >= 0.97).

The two engines run the same jobs with the same resources: the native batch is one process (one GPU,
or all CPUs); Ray gets one actor for that GPU (``--workers``, default 1; on a CPU machine the actor
takes every CPU of the local instance, as the native process does). Repeats alternate native / Ray,
each into fresh output folders, after one warm-up of each (not timed: first imports, page cache).

Jobs:
  recon   ``stage: recon`` on a synthetic clip (boxes scene), depth from a file: decoding, DW-mesh,
          rendering, encoding (CPU: llvmpipe; GPU: the NVIDIA EGL driver)
  run     ``stage: run`` with tiny random Wan2.1 weights on disk (tests/tiny_wan): recon + loading
          the generator + generation; measures the engine's overhead around a real job, not
          full-size generation (bench_batch.py measures that)

  python bench/bench_ray.py --stage recon --jobs 6 --repeats 3          # CPU here
  source bench/gpu_env.sh && python bench/bench_ray.py --stage run --jobs 8 --repeats 3   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_batch import CAMS, make_inputs  # noqa: E402
from bench_generate import emit, git_commit, note  # noqa: E402


def write_jobs(work: Path, name: str, video: Path, depth: Path, args, device: str) -> Path:
    defaults = {"stage": args.stage, "depth": str(depth), "num_frames": args.frames, "resize": "keep",
                "save_mesh": "none", "device": device}
    if args.stage == "run":
        defaults.update(models_dir=str(work / "models"), size="16x16", steps=2, guidance=5.0)
    lines = [f"defaults: {json.dumps(defaults)}", "jobs:"]
    lines += [f"  - {{video: {json.dumps(str(video))}, cam: {json.dumps(CAMS[i % len(CAMS)])}, output: {name}/job{i}}}"
              for i in range(args.jobs)]
    path = work / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="recon", choices=["recon", "run"], help="job kind (default recon)")
    parser.add_argument("--jobs", type=int, default=6, help="jobs per batch (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per engine, >= 3 (default 3)")
    parser.add_argument("--frames", type=int, default=25, help="frames per clip (default 25)")
    parser.add_argument("--size", type=int, default=256, help="clip size, square (default 256)")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors (default 1: one GPU, or all CPUs)")
    parser.add_argument("--workdir", default=None, help="folder for inputs and outputs (default: a temp folder)")
    parser.add_argument("--out", default=None, help="append the JSON line to this file (default: none)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (a median of at least 3 runs)")

    import ray
    import torch

    from ex4d.batch import load_jobs, read_record

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ray_"))
    work.mkdir(parents=True, exist_ok=True)
    video, depth = make_inputs(work, args.frames, args.size)
    if args.stage == "run":
        from tiny_wan import write_tiny_models_dir

        write_tiny_models_dir(work / "models")
    cpus = os.cpu_count() or 1
    t0 = time.perf_counter()
    # as `ex4d batch --ray` starts a local instance: workers at normal priority (Ray's default is nice 15)
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=cpus, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    note(f"local Ray instance up in {ray_start_s:.1f}s ({cpus} CPUs)")

    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src")] + sys.path[1:])}

    def one(engine: str, tag: str) -> tuple[float, list[float]]:
        """One whole `ex4d batch` command, as a user runs it (a fresh process: imports, model loading and,
        for Ray, the driver's connection and the actors' start-up all included)."""
        jobs_file = write_jobs(work, f"{engine}_{tag}", video, depth, args, device)
        command = [sys.executable, "-m", "ex4d.cli", "batch", str(jobs_file)]
        if engine == "ray":
            command += ["--ray", address, "--ray-workers", str(args.workers)]
        t = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        jobs = load_jobs(jobs_file)
        if proc.returncode != 0:
            raise SystemExit(f"{engine} batch failed ({proc.returncode}): {proc.stderr[-2000:]}")
        note(f"{engine} {tag}: {wall:.2f}s for {args.jobs} jobs")
        # steady state: every job but the first of each process/actor, which pays the lazy imports and
        # the renderer's and models' set-up in both engines
        firsts: dict = {}
        for job in jobs:
            firsts.setdefault(read_record(job).get("rank"), job["index"])
        return wall, [read_record(job)["seconds"] for job in jobs if job["index"] not in firsts.values()]

    one("native", "warmup")
    one("ray", "warmup")
    walls: dict[str, list[float]] = {"native": [], "ray": []}
    per_job: dict[str, list[float]] = {"native": [], "ray": []}
    for r in range(args.repeats):
        for engine in ("native", "ray"):
            wall, seconds = one(engine, f"r{r}")
            walls[engine].append(wall)
            per_job[engine] += seconds
    ray.shutdown()

    engines = {}
    for engine in ("native", "ray"):
        median = statistics.median(walls[engine])
        engines[engine] = {"batch_s_median": round(median, 3), "batch_s_runs": [round(x, 3) for x in walls[engine]],
                           "clips_per_hour": round(3600.0 * args.jobs / median, 1),
                           "job_s_median": round(statistics.median(per_job[engine]), 3),
                           "clips_per_hour_steady": round(3600.0 / statistics.median(per_job[engine]), 1)}
    out = {
        "bench": "ray_batch", "commit": git_commit(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({cpus} cores)",
        "torch": torch.__version__, "ray": ray.__version__, "stage": args.stage,
        "shape": {"frames": args.frames, "height": args.size, "width": args.size},
        "jobs": args.jobs, "repeats": args.repeats, "ray_workers": args.workers,
        "ray_start_s": round(ray_start_s, 2), "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]),
        "load_average_1min": round(os.getloadavg()[0], 2), "engines": engines,
        "ratio_ray_vs_native": round(engines["ray"]["clips_per_hour"] / engines["native"]["clips_per_hour"], 3),
        "ratio_ray_vs_native_steady": round(engines["ray"]["clips_per_hour_steady"]
                                            / engines["native"]["clips_per_hour_steady"], 3),
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
