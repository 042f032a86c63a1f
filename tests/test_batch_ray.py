"""``ex4d batch --ray``: the same outputs and manifest as the native batch, on a local Ray cluster;
a worker killed mid-job, a driver killed mid-batch, failing jobs, Ray missing."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ex4d.batch import RECORD_NAME, is_finished, load_jobs, read_record
from ex4d.cli import main
from ex4d.errors import InputError

sys.path.insert(0, os.path.dirname(__file__))
from test_batch_safety import tiny_depth, tiny_video, T  # noqa: E402

ray = pytest.importorskip("ray")
from ex4d.batch_ray import _sweep_dead_worker, plan_workers, run_batch_ray  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test runners travel to the workers


@pytest.fixture(scope="module")
def cluster():
    """One local 2-CPU Ray instance for the whole module (starting one costs seconds)."""
    from ex4d.batch_ray import _local_worker_niceness

    with _local_worker_niceness():  # as `ex4d batch --ray` starts one
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def jobs_yaml(folder: Path, name: str, out: str, jobs: list[str], defaults: str = "") -> Path:
    path = folder / name
    path.write_text(f"defaults: {{stage: recon, depth: depth.npz, num_frames: {T}, resize: keep, save_mesh: none, "
                    f"device: cpu{defaults}}}\njobs:\n" + "".join(f"  - {{{j}, output: {out}/{k}}}\n"
                                                                 for k, j in zip("abcdefgh", jobs)))
    return path


def inputs(folder: Path) -> Path:
    tiny_video(folder / "clip.mp4")
    tiny_depth(folder / "depth.npz")
    return folder


def assert_same_outputs(native: Path, other: Path, cams: list[str], generated: bool = False) -> None:
    """Cameras and colour videos byte for byte, decoded masks and generated videos frame for frame (ex4d's
    H.264 bytes do not depend on the process or the CPUs a worker may use: ex4d.io.video)."""
    from ex4d.io.video import read_mask_video, read_video

    for cam in cams:
        assert (native / f"camera_{cam}.npz").read_bytes() == (other / f"camera_{cam}.npz").read_bytes()
        for name in (f"mask_{cam}.mkv", f"mask_{cam}.mp4"):
            a, b = read_mask_video(native / name), read_mask_video(other / name)
            assert a.shape[0] == T and np.array_equal(a, b), name
        assert (native / f"color_{cam}.mp4").read_bytes() == (other / f"color_{cam}.mp4").read_bytes()
        if generated:
            a, b = read_video(native / f"ex4d_{cam}.mp4")[0], read_video(other / f"ex4d_{cam}.mp4")[0]
            assert a.shape[0] == T and np.array_equal(a, b)


def test_recon_jobs_equal_native_with_failing_jobs(cluster, tmp_path, capsys):
    """Three recon jobs, a missing video and an output folder that cannot be created: the same
    outputs and manifest counts as the native batch; each failure is one line naming the host."""
    inputs(tmp_path)
    jobs = ["video: clip.mp4, cam: 30", "video: clip.mp4, cam: zoom_in", "video: missing.mp4, cam: 30",
            "video: clip.mp4, cam: -30", "video: clip.mp4, cam: 60"]
    for out in ("native", "ray"):
        (tmp_path / out).mkdir()
        (tmp_path / out / "e").write_text("a file where job 5's output folder should be")
    native = jobs_yaml(tmp_path, "native.yaml", "native", jobs)
    on_ray = jobs_yaml(tmp_path, "ray.yaml", "ray", jobs)
    assert main(["batch", str(native)]) == 1
    capsys.readouterr()
    assert main(["batch", str(on_ray), "--ray", cluster, "--ray-workers", "2"]) == 1
    err = capsys.readouterr().err
    host = socket.gethostname()
    assert "3 ran, 0 skipped (finished), 2 failed" in err and "failed jobs (numbered from 1; errors in the manifest): 3, 5" in err
    assert f"video not found or not readable on host {host}: {tmp_path / 'missing.mp4'}" in err
    assert f"job 5 (e): failed: cannot write the output folder {tmp_path / 'ray' / 'e'} on host {host}" in err
    assert "clips/hour" in err and "2 CPU actor(s)" in err
    manifests = [json.loads((tmp_path / f"{name}.yaml.manifest.json").read_text()) for name in ("native", "ray")]
    assert manifests[0]["counts"] == manifests[1]["counts"] == {"done": 3, "failed": 1, "running": 0, "pending": 1}
    for a, b in zip(*(m["jobs"] for m in manifests)):
        assert a["status"] == b["status"] and (a["outputs"] is None) == (b["outputs"] is None)
        if a["outputs"]:
            assert [Path(p).name for p in a["outputs"].values()] == [Path(p).name for p in b["outputs"].values()]
    assert f"on host {host}" in manifests[1]["jobs"][2]["error"]
    for k, cams in (("a", ["30"]), ("b", ["zoom_in"]), ("d", ["-30"])):
        assert_same_outputs(tmp_path / "native" / k, tmp_path / "ray" / k, cams)
    # a rerun skips what is done, and with --skip-failed leaves the failed job alone
    assert main(["batch", str(on_ray), "--ray", cluster, "--skip-failed"]) == 1  # job 5 has no record: runs again
    err = capsys.readouterr().err
    assert "job 1 (a): finished earlier, skipped" in err and "job 3 (c): failed earlier, not retried" in err
    assert "0 ran, 3 skipped (finished), 1 failed earlier (not retried), 1 failed" in err


def test_run_jobs_with_tiny_models_equal_native(cluster, tmp_path):
    """stage: run with tiny weights on disk: recon + generation in a Ray actor (models loaded once per
    actor) gives the native batch's files, generated videos included (the one actor takes both CPUs,
    so torch runs on as many threads as in the native process)."""
    from tiny_wan import write_tiny_models_dir

    from ex4d.batch import run_batch

    inputs(tmp_path)
    write_tiny_models_dir(tmp_path / "models")
    settings = ", stage: run, models_dir: models, size: 16x16, steps: 1, guidance: 2.0"
    jobs = ["video: clip.mp4, cam: 30", "video: clip.mp4, cam: zoom_in, seed: 3"]
    native = load_jobs(jobs_yaml(tmp_path, "native.yaml", "native", jobs, settings))
    on_ray = load_jobs(jobs_yaml(tmp_path, "ray.yaml", "ray", jobs, settings))
    assert run_batch(native).ok
    lines = []
    result = run_batch_ray(on_ray, workers=1, manifest=tmp_path / "m.json", report=lines.append)
    assert result.ok and result.ran == [0, 1], lines
    assert_same_outputs(tmp_path / "native" / "a", tmp_path / "ray" / "a", ["30"], generated=True)
    assert_same_outputs(tmp_path / "native" / "b", tmp_path / "ray" / "b", ["zoom_in"], generated=True)
    assert all(is_finished(job) for job in on_ray)
    assert json.loads((tmp_path / "m.json").read_text())["counts"]["done"] == 2


def kill_worker_runner(job, cache):
    """Job b kills its worker once, mid-write (a temporary is left); job c kills it every time."""
    from ex4d.batch import default_runner
    from ex4d.io.files import atomic_path

    marker = Path(job["output"]).parent / f"{job['name']}.killed"
    if job["name"] == "c" or (job["name"] == "b" and not marker.exists()):
        marker.write_text("killed")
        with atomic_path(Path(job["output"]) / "color_60.mp4") as tmp:
            tmp.write_bytes(b"half a video")
            os.kill(os.getpid(), signal.SIGKILL)
    return default_runner(job, cache)


def test_killed_worker_loses_only_its_job(cluster, tmp_path):
    """SIGKILL of the actor mid-write: the job goes to a fresh actor, the dead process's temporaries
    are removed, the other jobs are untouched; a job that kills every worker is recorded as failed
    (here after its second death: max_worker_deaths=1)."""
    inputs(tmp_path)
    jobs = load_jobs(jobs_yaml(tmp_path, "jobs.yaml", "out", ["video: clip.mp4, cam: 30",
                                                              "video: clip.mp4, cam: 60", "video: clip.mp4, cam: 90"]))
    lines = []
    result = run_batch_ray(jobs, workers=2, runner=kill_worker_runner, manifest=tmp_path / "m.json",
                           report=lines.append, max_worker_deaths=1)
    text = "\n".join(lines)
    assert sorted(result.ran) == [0, 1] and result.failed == [2], text
    assert "job 2 (b): its worker" in text and "1 temporaries removed; retrying it on another actor" in text
    assert is_finished(jobs[1]) and read_record(jobs[1])["outputs"]["color"].endswith("color_60.mp4")
    failed = read_record(jobs[2])
    assert failed["status"] == "failed" and "its Ray worker died 2 times while" in failed["error"]
    assert not [p for p in (tmp_path / "out").rglob("*") if ".partial" in p.name]
    counts = json.loads((tmp_path / "m.json").read_text())["counts"]
    assert counts == {"done": 2, "failed": 1, "running": 0, "pending": 0}


DRIVER = '''
import sys, time
from pathlib import Path
from ex4d.batch import default_runner, load_jobs
from ex4d.batch_ray import run_batch_ray

READY = sys.argv[3]  # a global: pickled with the runner (sys.argv in the worker is the worker's)


def stall_in_c(job, cache):
    if job["name"] == "c":
        Path(READY).write_text("stalled")
        time.sleep(300)
    return default_runner(job, cache)


run_batch_ray(load_jobs(sys.argv[1]), address=sys.argv[2], workers=1, runner=stall_in_c,
              manifest=sys.argv[1] + ".manifest.json", report=print)
'''


def test_resume_after_the_driver_is_killed(cluster, tmp_path, capsys):
    inputs(tmp_path)
    jobs_file = jobs_yaml(tmp_path, "jobs.yaml", "out", [f"video: clip.mp4, cam: {c}" for c in (30, 60, 90, -30)])
    (tmp_path / "driver.py").write_text(DRIVER)
    ready = tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(jobs_file), cluster, str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the driver never reached job 3"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = tmp_path / "out"
    assert read_record({"output": str(out / "c")})["status"] == "running" and not (out / "d").exists()
    assert main(["batch", str(jobs_file), "--ray", cluster, "--ray-workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "job 1 (a): finished earlier, skipped" in err and "job 2 (b): finished earlier, skipped" in err
    assert "job 3 (c): done" in err and "job 4 (d): done" in err and "2 ran, 2 skipped" in err
    manifest = json.loads((tmp_path / "jobs.yaml.manifest.json").read_text())
    assert manifest["counts"] == {"done": 4, "failed": 0, "running": 0, "pending": 0}
    assert all(is_finished(job) for job in load_jobs(jobs_file))
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name or p.name.endswith(".lock")]


def test_without_ray_one_line_with_the_install_command(tmp_path, capsys, monkeypatch):
    jobs_file = jobs_yaml(inputs(tmp_path), "jobs.yaml", "out", ["video: clip.mp4, cam: 30"])
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main(["batch", str(jobs_file), "--ray", "auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[ray]"' in err
    assert not (tmp_path / "out" / "a" / RECORD_NAME).exists()
    assert main(["batch", str(jobs_file), "--ray-workers", "2"]) == 1
    assert "add --ray" in capsys.readouterr().err


@pytest.mark.parametrize("address, expect", [("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1"),
                                             ("ray://127.0.0.1:1", "cannot reach the Ray cluster at ray://"),
                                             ("headnode", "give auto, HOST:PORT")])
def test_unreachable_address_is_one_line(address, expect):
    """Ray would retry an unreachable head for minutes; ex4d checks it first and says so in one line."""
    from ex4d.batch_ray import _check_reachable

    with pytest.raises(InputError, match=expect):
        _check_reachable(address, timeout_s=2)


def test_plan_workers():
    gpu_node = {"GPU": 4.0, "CPU": 64.0}
    assert plan_workers([gpu_node], None) == (4, {"num_gpus": 1, "num_cpus": 16})
    assert plan_workers([gpu_node, {"GPU": 8.0, "CPU": 64.0}, {"CPU": 8.0}], None) == (12, {"num_gpus": 1, "num_cpus": 8})
    assert plan_workers([gpu_node], 2)[0] == 2
    assert plan_workers([{"CPU": 8.0}], None) == (1, {"num_gpus": 0, "num_cpus": 8})
    assert plan_workers([{"CPU": 8.0}], 3) == (3, {"num_gpus": 0, "num_cpus": 2})
    assert plan_workers([{"CPU": 8.0}, {"CPU": 8.0}], 16) == (16, {"num_gpus": 0, "num_cpus": 1})
    with pytest.raises(InputError, match="has 4 GPU"):
        plan_workers([gpu_node], 5)
    with pytest.raises(InputError, match="no GPU and 2 CPU"):
        plan_workers([{"CPU": 2.0}], 3)
    with pytest.raises(InputError, match="at least 1"):
        plan_workers([{"CPU": 2.0}], 0)


def test_sweep_dead_worker(tmp_path):
    """Only the dead owner's temporaries go; a folder it had renamed aside comes back."""
    out = tmp_path / "out"
    (out / "eval_30").mkdir(parents=True)
    dead, alive = "nodeA-123", "nodeB-77"
    (out / f".color_30.partial-{dead}-ab12.mp4").write_bytes(b"half")
    (out / f".stage.partial-{dead}-cd34").mkdir()
    (out / "eval_30" / f".summary.partial-{dead}-ef56.json").write_text("{")
    (out / f".color_60.partial-{alive}-0000.mp4").write_bytes(b"another worker's")
    (out / f".recon.old-{dead}-9999").mkdir()  # killed between the two renames of a folder swap
    (out / "color_30.mp4").write_bytes(b"done")
    swept = _sweep_dead_worker(str(out), dead)
    assert len(swept) == 4
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["eval_30", f".color_60.partial-{alive}-0000.mp4", "recon", "color_30.mp4"])
    assert _sweep_dead_worker(str(out), None) == []
