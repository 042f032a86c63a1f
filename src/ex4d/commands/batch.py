"""``ex4d batch JOBS.yaml|csv``: run many jobs unattended, resumable, one process per GPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """jobs file (YAML; CSV takes the same names as header columns, docs/scale.md):
  defaults: {depth: depthcrafter, stage: run, seed: 0}
  jobs:
    - {video: clips/a.mp4, cam: 90, output: out/a_90}
    - {video: clips/a.mp4, cam: zoom_in, output: out/a_zoom}
    - {video: clips/b.mp4, cam: "orbit:yaw=60,pitch=15", output: out/b, stage: recon}

examples:
  ex4d batch jobs.yaml                                  # one process; rerun to resume
  torchrun --nproc-per-node 4 -m ex4d.cli batch jobs.yaml   # one process per GPU, jobs r, r+4, ...
  ex4d batch jobs.csv --status                          # print the manifest's counts, run nothing
  ex4d batch jobs.yaml --dry-run                        # check videos, cams and pose files; run nothing
  ex4d batch jobs.yaml --ray auto                       # on the running Ray cluster, one actor per GPU
  ex4d batch jobs.yaml --ray --ray-workers 2            # a local Ray instance, 2 actors (docs/scale.md)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="run many jobs from a YAML/CSV file (resumable, one process per GPU)",
        description="Run every job of a jobs file: each job reads a video and writes recon (and generated) "
                    "files into its own output folder. Finished jobs are skipped on a rerun; a failing job "
                    "is recorded with its error and the batch goes on. A manifest records status and timings.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", help="jobs file: .yaml/.yml/.json or .csv")
    parser.add_argument("--manifest", default=None,
                        help="manifest path (default: <jobs file name>.manifest.json beside the jobs file, e.g. "
                             "jobs.yaml.manifest.json); never the jobs file, a job's input or a file ex4d did not "
                             "write")
    parser.add_argument("--skip-failed", action="store_true",
                        help="do not retry jobs that failed in an earlier run (default: retry them)")
    parser.add_argument("--status", action="store_true", help="write and summarise the manifest; run nothing "
                                                             "(default: run the jobs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the jobs file, open every video (frame count vs num_frames), parse every "
                             "camera path and pose file, list what would run and every problem; run nothing "
                             "(exit 1 if a problem is found)")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run the jobs on a Ray cluster, one long-lived actor per GPU, inputs and outputs on a "
                             "filesystem every node sees: 'auto' joins the running cluster, HOST:PORT or "
                             "ray://HOST:PORT that cluster, no ADDRESS starts a local one (default: no Ray, one "
                             "process per GPU through torchrun); needs pip install -e \".[ray]\"")
    parser.add_argument("--ray-workers", type=int, default=None, metavar="N",
                        help="with --ray: number of actors (default: one per GPU of the cluster, each with its "
                             "share of its node's CPUs; on a cluster without GPUs 1, the actors sharing the CPUs)")
    parser.set_defaults(func=main)


def default_manifest(jobs_file: str) -> Path:
    """``<jobs file name>.manifest.json`` beside it: jobs.yaml and jobs.csv in one folder get two manifests."""
    path = Path(jobs_file).resolve()
    return path.with_name(f"{path.name}.manifest.json")


def main(args) -> int:
    from ex4d.batch import (Worker, build_manifest, check_jobs, is_finished, job_inputs, load_jobs, run_batch,
                            write_manifest)
    from ex4d.commands.common import progress
    from ex4d.diffusion.parallel import apply_safe_env
    from ex4d.io.files import protect_inputs

    apply_safe_env()  # launched by torchrun/accelerate: NVLink multicast stays off whatever runs inside

    jobs = load_jobs(args.jobs)  # the jobs file is now an input of this command: never written
    jobs_file = str(Path(args.jobs).resolve())
    manifest = Path(args.manifest) if args.manifest else default_manifest(args.jobs)
    worker = Worker.from_env()
    prefix = "" if worker.world_size == 1 else f"rank {worker.rank}: "
    if args.dry_run:
        for job in worker.share(jobs):
            state = "finished, skip" if is_finished(job) else "run"
            print(f"{job['index'] + 1:>5}  {job['stage']:<5} {job['cam']:<12} {job['output']}  [{state}]")
        problems = check_jobs(worker.share(jobs), manifest=manifest, jobs_file=jobs_file, overwrite=args.overwrite)
        from ex4d.errors import UserError
        from ex4d.weights_preflight import check_jobs_weights

        try:  # missing weights too, all in one message
            check_jobs_weights([job for job in worker.share(jobs) if not is_finished(job)])
        except UserError as exc:
            problems.append(str(exc))
        for problem in problems:
            print(f"{prefix}problem: {problem}", file=sys.stderr)
        if problems:
            print(f"{prefix}{len(problems)} problem(s) found (jobs counted from 1); fix them before running",
                  file=sys.stderr)
            return 1
        print(f"{prefix}no problems found in {len(worker.share(jobs))} job(s)", file=sys.stderr)
        return 0
    if args.status:
        protect_inputs(*(name for job in jobs for name in job_inputs(job)))
        write_manifest(manifest, jobs, jobs_file, check=True)
        counts = build_manifest(jobs)["counts"]
        print(" ".join(f"{k}={v}" for k, v in counts.items()) + f"  ({manifest})")
        return 0
    from ex4d.weights_preflight import check_jobs_weights
    if args.ray is None:  # with Ray the jobs run on the cluster's GPUs: checked as each job's generation starts
        from ex4d.batch import check_jobs_gpu_features

        check_jobs_gpu_features(worker.share(jobs))
    check_jobs_weights([job for job in worker.share(jobs) if not is_finished(job)])  # all missing weights, before job 1
    if args.ray is not None:
        return _main_ray(args, jobs, jobs_file, manifest, worker)
    if args.ray_workers is not None:
        from ex4d.errors import InputError

        raise InputError("--ray-workers counts Ray actors; add --ray (or leave --ray-workers out)")
    interactive = sys.stderr.isatty()  # a terminal gets the bar; logs and pipes get one plain line per job
    result = run_batch(jobs, manifest=manifest, jobs_file=jobs_file, worker=worker,
                       retry_failed=not args.skip_failed, progress=progress if interactive else None,
                       report=None if interactive else (lambda line: print(line, file=sys.stderr, flush=True)),
                       overwrite=args.overwrite)
    not_retried = f", {len(result.skipped_failed)} failed earlier (not retried)" if result.skipped_failed else ""
    print(f"{prefix}{len(result.ran)} ran, {len(result.skipped)} skipped (finished){not_retried}, "
          f"{len(result.failed)} failed; manifest: {manifest}", file=sys.stderr)
    if result.failed:
        print(f"{prefix}failed jobs (numbered from 1; errors in the manifest): "
              + ", ".join(str(i + 1) for i in result.failed), file=sys.stderr)
        return 1
    return 0


def _main_ray(args, jobs: list[dict], jobs_file: str, manifest: Path, worker) -> int:
    """``--ray``: the driver schedules the jobs onto Ray actors and writes the manifest (ex4d.batch_ray)."""
    from ex4d.batch_ray import import_ray, run_batch_ray
    from ex4d.errors import InputError

    if worker.world_size > 1:
        raise InputError("--ray runs one driver that schedules every job; start it once, not under "
                         "torchrun/accelerate (WORLD_SIZE is set)")
    import_ray()  # without Ray: one line with the install command, before anything runs
    result = run_batch_ray(jobs, address=args.ray or None, workers=args.ray_workers, manifest=manifest,
                           jobs_file=jobs_file, retry_failed=not args.skip_failed, overwrite=args.overwrite,
                           report=lambda line: print(line, file=sys.stderr, flush=True))
    not_retried = f", {len(result.skipped_failed)} failed earlier (not retried)" if result.skipped_failed else ""
    print(f"{len(result.ran)} ran, {len(result.skipped)} skipped (finished){not_retried}, "
          f"{len(result.failed)} failed; manifest: {manifest}", file=sys.stderr)
    if result.failed:
        print("failed jobs (numbered from 1; errors in the manifest): "
              + ", ".join(str(i + 1) for i in sorted(result.failed)), file=sys.stderr)
        return 1
    return 0
