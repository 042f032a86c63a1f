"""Batch jobs: jobs-file parsing, unattended runs that survive a failure, resume, ranks, real recon jobs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ex4d.batch import (RECORD_NAME, Worker, build_manifest, is_finished, load_jobs, read_record, run_batch,
                        write_manifest)
from ex4d.errors import InputError
from ex4d.io.files import atomic_path


def write_yaml(path, text):
    path.write_text(text)
    return path


def make_jobs_file(tmp_path, n=100, fmt="yaml"):
    (tmp_path / "clips").mkdir(exist_ok=True)
    video = tmp_path / "clips" / "a.mp4"
    video.write_bytes(b"not decoded by the fake runner")
    if fmt == "yaml":
        lines = ["defaults: {stage: recon, depth: depth.npz}", "jobs:"]
        lines += [f"  - {{video: clips/a.mp4, cam: {30 + i % 3}, output: out/job{i:03d}}}" for i in range(n)]
        return write_yaml(tmp_path / "jobs.yaml", "\n".join(lines) + "\n")
    rows = ["video,cam,output,stage,seed"] + [f"clips/a.mp4,{i},out/job{i:03d},recon,{i}" for i in range(n)]
    path = tmp_path / "jobs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


class FakeRunner:
    """A fast stand-in for the stages: 'loads a model' once per cache, writes one output atomically,
    and raises for the jobs named in ``fail``."""

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.calls = []
        self.loads = 0

    def __call__(self, job, cache):
        if "model" not in cache:
            self.loads += 1
            cache["model"] = object()
        self.calls.append(job["index"])
        if job["name"] in self.fail:
            raise RuntimeError(f"simulated crash in {job['name']}")
        out = Path(job["output"]) / "result.txt"
        with atomic_path(out) as tmp:
            tmp.write_text(f"{job['cam']}")
        return {"result": out, "_timings": {"fake": 0.0}}


def test_load_yaml_defaults_and_paths(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=3))
    assert len(jobs) == 3
    assert jobs[1]["cam"] == "31" and jobs[1]["stage"] == "recon" and jobs[1]["name"] == "job001"
    assert jobs[0]["video"] == str((tmp_path / "clips" / "a.mp4").resolve())  # relative to the jobs file
    assert jobs[2]["output"] == str((tmp_path / "out" / "job002").resolve())
    assert [j["index"] for j in jobs] == [0, 1, 2]


def test_load_csv_types(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=4, fmt="csv"))
    assert jobs[3]["seed"] == 3 and isinstance(jobs[3]["seed"], int)
    assert jobs[3]["cam"] == "3"
    assert "depth" not in jobs[0]  # not a column: unset, the stage default applies


@pytest.mark.parametrize("text, expect", [
    ("jobs:\n  - {video: a.mp4, output: o, num_frame: 49}\n", "unknown setting"),
    ("jobs:\n  - {video: a.mp4}\n", "'output' is required"),
    ("jobs:\n  - {video: a.mp4, output: o}\n  - {video: b.mp4, output: o}\n", "same output folder"),
    ("jobs:\n  - {video: a.mp4, output: o, seed: abc}\n", "not a valid int"),
    ("jobs:\n  - {video: a.mp4, output: o, stage: paint}\n", "stage="),
    ("jobs: []\n", "no jobs"),
    ("jobs: [unclosed\n", "cannot parse"),
    ("job:\n  - {video: a.mp4, output: o}\n", "unknown top-level"),
])
def test_load_rejects_bad_files(tmp_path, text, expect):
    with pytest.raises(InputError, match=expect):
        load_jobs(write_yaml(tmp_path / "jobs.yaml", text))


def test_load_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_jobs(tmp_path / "nope.yaml")
    other = tmp_path / "jobs.txt"
    other.write_text("x")
    with pytest.raises(InputError, match="unknown jobs file type"):
        load_jobs(other)


def test_hundred_jobs_survive_a_failure_and_resume(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=100))
    manifest = tmp_path / "jobs.manifest.json"
    runner = FakeRunner(fail={"job037"})
    result = run_batch(jobs, runner=runner, manifest=manifest)
    assert len(result.ran) == 99 and result.failed == [37] and not result.skipped
    assert runner.loads == 1  # the "model" was loaded once for the whole batch
    data = json.loads(manifest.read_text())
    assert data["counts"] == {"done": 99, "failed": 1, "running": 0, "pending": 0}
    failed = data["jobs"][37]
    assert failed["status"] == "failed" and "simulated crash in job037" in failed["error"]
    assert failed["seconds"] is not None and data["jobs"][0]["timings"] == {"fake": 0.0}
    assert "traceback" in read_record(jobs[37])  # a bug-like error keeps its traceback for debugging
    assert not (Path(jobs[37]["output"]) / "result.txt").exists()
    assert all((Path(j["output"]) / "result.txt").read_text() == j["cam"] for j in jobs if j["index"] != 37)

    # Resume: finished jobs are skipped; the failed one is retried (and now works).
    runner2 = FakeRunner()
    result2 = run_batch(jobs, runner=runner2, manifest=manifest)
    assert runner2.calls == [37] and len(result2.skipped) == 99 and result2.ok
    assert json.loads(manifest.read_text())["counts"]["done"] == 100

    # A third run does nothing at all.
    runner3 = FakeRunner()
    assert len(run_batch(jobs, runner=runner3, manifest=manifest).skipped) == 100 and runner3.calls == []


def test_resume_reruns_changed_or_deleted_and_can_skip_failed(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=5))
    run_batch(jobs, runner=FakeRunner(fail={"job004"}))
    jobs[1] = {**jobs[1], "cam": "45"}  # settings changed -> not finished any more
    os.remove(Path(jobs[2]["output"]) / "result.txt")  # output deleted -> not finished
    assert not is_finished(jobs[1]) and not is_finished(jobs[2]) and is_finished(jobs[0])
    runner = FakeRunner()
    result = run_batch(jobs, runner=runner, retry_failed=False)
    assert sorted(runner.calls) == [1, 2] and sorted(result.skipped) == [0, 3] and result.skipped_failed == [4]


def test_unwritable_output_does_not_stop_the_batch(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=3))
    blocker = Path(jobs[1]["output"])
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the output folder should be")
    result = run_batch(jobs, runner=FakeRunner())
    assert result.failed == [1] and result.ran == [0, 2]


def test_interrupted_job_is_rerun(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=2))

    def killed(job, cache):  # stands for a process killed mid-job: only the 'running' record remains
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, runner=killed)
    assert read_record(jobs[0])["status"] == "running"
    assert build_manifest(jobs)["counts"] == {"done": 0, "failed": 0, "running": 1, "pending": 1}
    runner = FakeRunner()
    run_batch(jobs, runner=runner)
    assert runner.calls == [0, 1]


def test_ranks_split_jobs_and_share_the_manifest(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=7))
    manifest = tmp_path / "m.json"
    runners = [FakeRunner(), FakeRunner(), FakeRunner()]
    for rank, runner in enumerate(runners):
        run_batch(jobs, runner=runner, manifest=manifest, worker=Worker(rank, 3, rank))
    assert [r.calls for r in runners] == [[0, 3, 6], [1, 4], [2, 5]]
    data = json.loads(manifest.read_text())
    assert data["counts"]["done"] == 7 and [e["rank"] for e in data["jobs"]] == [0, 1, 2, 0, 1, 2, 0]


def test_worker_from_env():
    assert Worker.from_env({}) == Worker(0, 1, 0)
    assert Worker.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Worker(3, 4, 1)
    w = Worker(1, 2, 1)
    assert w.share(list(range(5))) == [1, 3]
    assert w.device("cpu") == "cpu"  # an explicit device is kept
    with pytest.raises(Exception, match="outside"):
        Worker.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_write_manifest_is_complete(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=3))
    path = write_manifest(tmp_path / "m.json", jobs, "jobs.yaml")
    data = json.loads(path.read_text())
    assert data["counts"]["pending"] == 3 and data["jobs_file"] == "jobs.yaml"
    assert not list(tmp_path.glob(".m.*partial*"))  # atomic: no temporary left behind


# ---------------------------------------------------------------------------------------------
# Real reconstruction jobs (tiny clip, depth from a file) through the CLI
# ---------------------------------------------------------------------------------------------

T, H, W = 5, 48, 64


@pytest.fixture()
def tiny_inputs(tmp_path):
    from ex4d.io.video import write_video

    u, v = np.meshgrid(np.arange(W), np.arange(H))
    frames = [np.stack([(((u + k) // 8 + v // 8) % 2) * 200 + 30, u * 4 % 255, v * 5 % 255], -1) for k in range(T)]
    write_video(tmp_path / "clip.mp4", np.stack(frames).astype(np.uint8), fps=10)
    depth = np.full((T, H, W), 6.0, np.float32)
    depth[:, 14:34, 20:44] = 2.5
    np.savez(tmp_path / "depth.npz", depth=depth)
    return tmp_path


def test_real_recon_jobs_through_cli(tiny_inputs, capsys):
    from ex4d.cli import main

    jobs_file = write_yaml(tiny_inputs / "jobs.yaml", (
        f"defaults: {{stage: recon, depth: depth.npz, num_frames: {T}, resize: keep, save_mesh: none, device: cpu}}\n"
        "jobs:\n"
        "  - {video: clip.mp4, cam: 30, output: out/a}\n"
        "  - {video: clip.mp4, cam: zoom_in, output: out/b}\n"
        "  - {video: missing.mp4, cam: 30, output: out/c}\n"))
    code = main(["batch", str(jobs_file)])
    err = capsys.readouterr().err
    assert code == 1 and "2 ran" in err and "1 failed" in err
    for name in ["color_30.mp4", "mask_30.mkv", "camera_30.npz", RECORD_NAME]:
        assert (tiny_inputs / "out" / "a" / name).is_file(), name
    assert (tiny_inputs / "out" / "b" / "color_zoom_in.mp4").is_file()
    manifest = json.loads((tiny_inputs / "jobs.yaml.manifest.json").read_text())
    assert manifest["counts"] == {"done": 2, "failed": 1, "running": 0, "pending": 0}
    assert "not found" in manifest["jobs"][2]["error"]  # a user error: its one-line message
    assert set(manifest["jobs"][0]["timings"]) >= {"depth", "recon"}

    code = main(["batch", str(jobs_file), "--skip-failed"])
    err = capsys.readouterr().err
    assert code == 0 and "0 ran, 2 skipped (finished), 1 failed earlier (not retried)" in err


def _fake_estimators(monkeypatch):
    """Replace ``ex4d.depth.get_estimator`` by a factory of constant-depth estimators named after the
    spec. Returns (the (spec, options) of each estimator built, the factory)."""
    import ex4d.depth
    from ex4d.types import DepthVideo

    built = []

    class FakeEstimator:
        def __init__(self, name):
            self.name = name

        def estimate(self, frames):
            depth = np.full(frames.shape[:3], 6.0, np.float32)
            return DepthVideo(depth=depth, valid=np.ones_like(depth, bool), estimator=self.name)

    def fake_get_estimator(spec, **kwargs):
        built.append((spec, {k: v for k, v in kwargs.items() if k not in ("models_dir", "device")}))
        return FakeEstimator(spec)

    monkeypatch.setattr(ex4d.depth, "get_estimator", fake_get_estimator)
    return built, fake_get_estimator


def test_depth_model_loads_once_per_process(tiny_inputs, monkeypatch):
    """Three jobs with an estimator name: the estimator is built once and reused; each job still
    gets its own depth.npz (the pipeline's reuse/saving is unchanged)."""
    import ex4d.depth

    built, fake_get_estimator = _fake_estimators(monkeypatch)
    jobs_file = write_yaml(tiny_inputs / "jobs.yaml", (
        f"defaults: {{stage: recon, depth: depth-anything, num_frames: {T}, resize: keep, save_mesh: none, "
        "device: cpu}\njobs:\n"
        + "".join(f"  - {{video: clip.mp4, cam: {c}, output: out/{c}}}\n" for c in (10, 20, 30))))
    result = run_batch(load_jobs(jobs_file))
    assert result.ok and [spec for spec, _ in built] == ["depth-anything"]
    assert all((tiny_inputs / "out" / str(c) / "depth.npz").is_file() for c in (10, 20, 30))
    assert ex4d.depth.get_estimator is fake_get_estimator  # the batch's caching wrapper is gone again


def test_run_jobs_generate_with_tiny_weights(tiny_inputs, monkeypatch):
    """stage: run on tiny weights on disk: recon + generation; the generator loads once for both
    jobs; the second job is longer than its window and goes through overlapping windows."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_wan import write_tiny_ex4d_ckpt, write_tiny_original_layout

    import ex4d.diffusion.weights as weights
    from ex4d.diffusion.weights import models_dir as md
    from ex4d.io.video import read_video

    models = tiny_inputs / "models"
    write_tiny_original_layout(models / md.WAN_REPO)
    write_tiny_ex4d_ckpt(models / md.EX4D_REPO / md.ADAPTER_CKPT)
    loads = []
    original = weights.load_wan_components
    monkeypatch.setattr(weights, "load_wan_components", lambda *a, **k: loads.append(1) or original(*a, **k))
    jobs_file = write_yaml(tiny_inputs / "jobs.yaml", (
        "defaults: {stage: run, depth: depth.npz, resize: keep, save_mesh: none, device: cpu, models_dir: models,\n"
        "           size: 16x16, steps: 1, guidance: 2.0}\n"
        "jobs:\n"
        "  - {video: clip.mp4, cam: 30, output: out/a, num_frames: 5, eval: true}\n"
        "  - {video: clip.mp4, cam: zoom_in, output: out/b, num_frames: 5, window: 5, overlap: 3}\n"))
    jobs = load_jobs(jobs_file)
    jobs[1]["num_frames"] = 9  # (the tiny clip has 5 frames; write a longer one for the long job)
    from ex4d.io.video import write_video

    u = np.arange(W)[None, :, None] * np.ones((H, 1, 3))
    write_video(tiny_inputs / "long.mp4", np.stack([(u * 3 + 20 * k) % 255 for k in range(9)]).astype(np.uint8), 10)
    np.savez(tiny_inputs / "long_depth.npz", depth=np.full((9, H, W), 5.0, np.float32))
    jobs[1]["video"] = str(tiny_inputs / "long.mp4")
    jobs[1]["depth"] = str(tiny_inputs / "long_depth.npz")
    import torch

    import ex4d.pipeline as pipeline

    # As on one GPU: the second job, warm, does generation's work on the condition during recon
    # (start_ahead_of_recon) and hands it to its generation.
    monkeypatch.setattr(pipeline, "_condition_device", lambda options, parallel=None: torch.device("cpu"))
    aheads, handed = [], []
    make_ahead, generate = pipeline.start_ahead_of_recon, pipeline.run_generate
    monkeypatch.setattr(pipeline, "start_ahead_of_recon", lambda *a, **k: aheads.append(make_ahead(*a, **k)) or aheads[-1])
    monkeypatch.setattr(pipeline, "run_generate", lambda *a, **k: handed.append(k.get("ahead")) or generate(*a, **k))
    cache = {}
    result = run_batch(jobs, cache=cache)
    assert result.ok, [read_record(j).get("traceback") or read_record(j).get("error") for j in jobs]
    assert len(loads) == 1 and "generate_pipe" in cache  # loaded once, kept for the next job
    assert aheads[0] is None and aheads[1] is not None and aheads[1].future is not None  # cold, then warm
    assert handed == aheads
    short, _ = read_video(tiny_inputs / "out" / "a" / "ex4d_30.mp4")
    long, fps = read_video(tiny_inputs / "out" / "b" / "ex4d_zoom_in.mp4")
    assert short.shape == (5, 16, 16, 3) and long.shape == (9, 16, 16, 3) and fps == 10.0  # the source rate, as `ex4d run`
    record = read_record(jobs[1])
    assert record["outputs"]["video"].endswith("ex4d_zoom_in.mp4") and "generate" in record["timings"]
    # eval: true evaluates the generated video against its camera path and condition (docs/eval.md)
    summary = json.loads((tiny_inputs / "out" / "a" / "eval_30" / "summary.json").read_text())
    assert summary["num_frames"] == 5 and summary["camera"].endswith("camera_30.npz")
    assert summary["kept_what_was_seen"]["visible_fraction_mean"] > 0
    assert "eval" in read_record(jobs[0])["timings"] and "eval" not in record["timings"]
    assert not (tiny_inputs / "out" / "b" / "eval_zoom_in").exists()


def test_eval_needs_stage_run(tmp_path):
    jobs_file = write_yaml(tmp_path / "jobs.yaml", "jobs:\n  - {video: v.mp4, output: out, stage: recon, eval: true}\n")
    with pytest.raises(InputError, match="eval: true .* needs stage: run"):
        load_jobs(jobs_file)


@pytest.mark.slow
def test_bench_batch_tiny(capsys):
    """bench/bench_batch.py --tiny runs the batch end to end and prints one JSON object."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_batch.py"
    spec = importlib.util.spec_from_file_location("bench_batch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--jobs", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["jobs_timed"] == 3 and len(data["clip_s_runs"]) == 3 and data["clips_per_hour"] > 0
    assert {"recon", "generate"} <= set(data["stage_s_median"])


def test_low_vram_budget_reaches_the_generator_options(tmp_path):
    from ex4d.batch import generation_key, job_generate_options

    (tmp_path / "jobs.yaml").write_text(
        "defaults: {memory: low-vram, vram_budget: 16}\njobs:\n  - {video: a.mp4, output: o1}\n"
        "  - {video: a.mp4, output: o2, vram_budget: 22.5}\n")
    jobs = load_jobs(tmp_path / "jobs.yaml")
    first, second = (job_generate_options(job) for job in jobs)
    assert first.low_vram and first.vram_budget == 16.0 and second.vram_budget == 22.5
    assert generation_key(jobs[0]) != generation_key(jobs[1]), "another budget loads another pipeline"


def test_depth_speed_switches_reach_the_estimator(tiny_inputs, monkeypatch):
    """depth_* job keys become DepthCrafter options: passed to the estimator, part of its cache key and
    of depth.npz's reuse record; refused for another estimator when the jobs file is loaded."""
    from ex4d.depth.depthcrafter import COMPILE_PRESET

    built, _ = _fake_estimators(monkeypatch)
    jobs_file = write_yaml(tiny_inputs / "jobs.yaml", (
        f"defaults: {{stage: recon, num_frames: {T}, resize: keep, save_mesh: none, device: cpu}}\njobs:\n"
        "  - {video: clip.mp4, cam: 10, output: out/a, depth_compile: true, depth_fp16_encode: true}\n"
        "  - {video: clip.mp4, cam: 20, output: out/b, depth_compile: true, depth_fp16_encode: true}\n"
        "  - {video: clip.mp4, cam: 30, output: out/c}\n"))
    assert run_batch(load_jobs(jobs_file)).ok
    expected = {**COMPILE_PRESET, "encode_dtype": "model"}
    assert built == [("depthcrafter", expected), ("depthcrafter", {})]  # one estimator per option set
    with np.load(tiny_inputs / "out" / "a" / "depth.npz") as data:
        assert json.loads(str(data["settings"]))["request"]["estimator_options"] == expected
    bad = write_yaml(tiny_inputs / "bad.yaml", "jobs:\n  - {video: clip.mp4, output: out/d, depth: depth-anything, "
                                               "depth_compile: true}\n")
    with pytest.raises(InputError, match="depth_compile apply to depth: depthcrafter only"):
        load_jobs(bad)


def test_a_failed_generation_is_the_job_s_error_and_nothing_is_evaluated(monkeypatch, tmp_path):
    """stage: run with eval: true: when generation fails, its error is what the job reports, the work
    done ahead is closed, and no evaluation runs."""
    from types import SimpleNamespace

    import ex4d.batch as batch

    closed, evaluated = [], []
    ahead = SimpleNamespace(sink=None, close=lambda: closed.append(1))
    fake = SimpleNamespace(
        load_clip=lambda *a, **k: SimpleNamespace(num_frames=5), estimate_depth=lambda *a, **k: None,
        ReconOptions=lambda **k: k, run_recon=lambda *a, **k: {"color": str(tmp_path / "color_30.mp4")},
        start_ahead_of_recon=lambda *a, **k: ahead)

    def failing_generation(*args, **kwargs):
        raise InputError("generation failed here")

    monkeypatch.setattr(batch, "generate_stage", failing_generation)
    monkeypatch.setattr(batch, "eval_stage", lambda *a, **k: evaluated.append(1) or {})
    job = {"video": "clip.mp4", "cam": "30", "output": str(tmp_path), "stage": "run", "eval": True,
           "depth": "depth.npz"}
    with pytest.raises(InputError, match="generation failed here"):
        batch._chain_stages(fake, job, {})
    assert closed == [1] and evaluated == []
