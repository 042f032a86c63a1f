"""Batch hardening: the manifest never lands on an input or a foreign file, resume sees every
input file, the manifest lock is removed, jobs files are bounded, jobs are counted from 1, --dry-run checks
videos and cams, and a batch killed mid-job resumes cleanly."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ex4d.batch as batch
from ex4d.batch import (RECORD_NAME, is_finished, load_jobs, lock_path, read_record, run_batch, write_manifest)
from ex4d.cli import main
from ex4d.errors import InputError
from ex4d.io.files import atomic_path

sys.path.insert(0, os.path.dirname(__file__))
from test_batch import FakeRunner, make_jobs_file, write_yaml  # noqa: E402

T, H, W = 5, 48, 64


def tiny_video(path, frames=T):
    from ex4d.io.video import write_video

    u, v = np.meshgrid(np.arange(W), np.arange(H))
    stack = [np.stack([(((u + k) // 8 + v // 8) % 2) * 200 + 30, u * 4 % 255, v * 5 % 255], -1) for k in range(frames)]
    write_video(path, np.stack(stack).astype(np.uint8), fps=10)
    return path


def tiny_depth(path, frames=T, value=6.0):
    depth = np.full((frames, H, W), value, np.float32)
    depth[:, 14:34, 20:44] = 2.5
    np.savez(path, depth=depth)
    return path


def pose_file(path, count=T):
    np.savez(path, cam_from_world=np.tile(np.eye(4), (count, 1, 1)))
    return path


# ---------------------------------------------------------------------------------------------
# The manifest never overwrites the jobs file, a job's input, or a foreign file


@pytest.mark.parametrize("target", ["jobs", "video", "pose", "foreign"])
def test_manifest_refused_on_inputs_and_foreign_files(tmp_path, capsys, target):
    jobs_file = make_jobs_file(tmp_path, n=2)
    pose_file(tmp_path / "path.npz")
    jobs_file.write_text(jobs_file.read_text() + "  - {video: clips/a.mp4, cam: path.npz, output: out/p}\n")
    (tmp_path / "notes.json").write_text("the user's own notes")
    path = {"jobs": jobs_file, "video": tmp_path / "clips" / "a.mp4", "pose": tmp_path / "path.npz",
            "foreign": tmp_path / "notes.json"}[target]
    before = path.read_bytes()
    for extra in ([], ["--status"]):
        code = main(["batch", str(jobs_file), "--manifest", str(path), *extra])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert ("input of this run" if target != "foreign" else "--overwrite") in err
        assert path.read_bytes() == before
    assert not (tmp_path / "out").exists(), "refused before any job ran"
    assert not lock_path(path).exists()
    code = main(["batch", str(jobs_file), "--manifest", str(path), "--dry-run"])
    assert code == 1 and "--manifest" in capsys.readouterr().err and path.read_bytes() == before


def test_manifest_refused_on_a_job_output_or_record(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=2))
    for path in (Path(jobs[1]["output"]), Path(jobs[1]["output"]) / RECORD_NAME):
        path.parent.mkdir(parents=True, exist_ok=True)
        with pytest.raises(InputError, match="job 2's output|is a folder"):
            run_batch(jobs, runner=FakeRunner(), manifest=path)


def test_foreign_manifest_replaced_only_with_overwrite(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=2))
    manifest = tmp_path / "mine.json"
    manifest.write_text("{}")
    with pytest.raises(InputError, match="--overwrite"):
        run_batch(jobs, runner=FakeRunner(), manifest=manifest)
    result = run_batch(jobs, runner=FakeRunner(), manifest=manifest, overwrite=True)
    assert result.ok and json.loads(manifest.read_text())["counts"]["done"] == 2
    assert run_batch(jobs, runner=FakeRunner(), manifest=manifest).skipped == [0, 1]  # ex4d's own now


def test_each_job_runs_in_a_policy_protecting_the_batch_inputs(tmp_path):
    """A job that tries to write onto its own input, or onto another job's input, fails; the files survive."""
    jobs_file = make_jobs_file(tmp_path, n=3)
    other = tmp_path / "clips" / "b.mp4"
    other.write_bytes(b"b")
    jobs_file.write_text(jobs_file.read_text().replace("job002}", "job002, video: clips/b.mp4}"))
    jobs = load_jobs(jobs_file)
    targets = {0: jobs[0]["video"], 1: str(other), 2: str(jobs_file)}

    def vandal(job, cache):
        with atomic_path(targets[job["index"]]) as tmp:
            tmp.write_text("overwritten")
        return {}

    result = run_batch(jobs, runner=vandal, jobs_file=str(jobs_file))
    assert result.failed == [0, 1, 2]
    assert all("input of this run" in read_record(job)["error"] for job in jobs)
    assert other.read_bytes() == b"b" and b"overwritten" not in (tmp_path / "clips" / "a.mp4").read_bytes()
    assert "jobs:" in jobs_file.read_text()


# ---------------------------------------------------------------------------------------------
# Resume fingerprints every file a job reads


def _first_run(jobs):
    runner = FakeRunner()
    assert run_batch(jobs, runner=runner).ok and runner.calls == [j["index"] for j in jobs]


def _rerun(jobs):
    runner = FakeRunner()
    assert run_batch(jobs, runner=runner).ok
    return runner.calls


def _touch_later(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_resume_sees_pose_file_depth_file_and_video(tmp_path):
    tiny_depth(tmp_path / "d.npz")
    pose_file(tmp_path / "p.npz")
    (tmp_path / "v.mp4").write_bytes(b"video")
    write_yaml(tmp_path / "jobs.yaml", "defaults: {stage: recon, video: v.mp4}\njobs:\n"
               "  - {output: out/pose, cam: p.npz, depth: d.npz}\n"
               "  - {output: out/plain, cam: 30, depth: d.npz}\n")
    jobs = load_jobs(tmp_path / "jobs.yaml")
    _first_run(jobs)
    assert _rerun(jobs) == []  # untouched: skipped

    # Edit the pose file in place without changing its size or modification time: content counts.
    path = tmp_path / "p.npz"
    st = path.stat()
    pose = np.tile(np.eye(4), (T, 1, 1))
    pose[1:, 0, 3] = 0.1
    np.savez(path, cam_from_world=pose)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _rerun(jobs) == [0] and _rerun(jobs) == []

    tiny_depth(tmp_path / "d.npz", value=7.0)  # the depth file replaced: both jobs read it
    assert _rerun(jobs) == [0, 1] and _rerun(jobs) == []
    (tmp_path / "v.mp4").write_bytes(b"other")
    assert _rerun(jobs) == [0, 1]


def test_large_inputs_use_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "CONTENT_HASH_BYTES", 0)
    jobs = load_jobs(make_jobs_file(tmp_path, n=1))
    _first_run(jobs)
    assert _rerun(jobs) == []
    _touch_later(jobs[0]["video"])
    assert _rerun(jobs) == [0]


def _fake_wan(models: Path) -> None:
    from ex4d.diffusion.weights import models_dir as md

    wan = models / md.WAN_REPO
    (wan / md.TOKENIZER_DIR).mkdir(parents=True)
    for name in ["diffusion_pytorch_model-00001-of-00002.safetensors",
                 "diffusion_pytorch_model-00002-of-00002.safetensors", md.T5_FILE, md.CLIP_FILE, md.VAE_FILE,
                 "config.json", f"{md.TOKENIZER_DIR}/tokenizer.json"]:
        (wan / name).write_bytes(b"weights of " + name.encode())
    adapter = models / md.EX4D_REPO / md.ADAPTER_CKPT
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"adapter")


@pytest.mark.parametrize("edit", ["shard", "tokenizer", "adapter_in_models", "explicit_adapter", "unrelated"])
def test_resume_sees_generation_weights(tmp_path, edit):
    from ex4d.diffusion.weights import models_dir as md

    models = tmp_path / "models"
    _fake_wan(models)
    (tmp_path / "my_adapter.ckpt").write_bytes(b"mine")
    (models / "README.txt").write_text("notes")
    (tmp_path / "v.mp4").write_bytes(b"video")
    write_yaml(tmp_path / "jobs.yaml", "defaults: {stage: run, video: v.mp4, depth: d.npz, models_dir: models}\n"
               "jobs:\n  - {output: out/a}\n  - {output: out/b, adapter: my_adapter.ckpt}\n  - {output: out/c, "
               "stage: recon}\n")
    jobs = load_jobs(tmp_path / "jobs.yaml")
    files = batch.job_input_files(jobs[0])["generate_models"]
    assert str(models / md.EX4D_REPO / md.ADAPTER_CKPT) in files and len(files) == 10  # + config, 7 Wan files, index (both absent)
    _first_run(jobs)
    assert _rerun(jobs) == []
    path, expect = {"shard": (models / md.WAN_REPO / "diffusion_pytorch_model-00002-of-00002.safetensors", [0, 1]),
                    "tokenizer": (models / md.WAN_REPO / md.TOKENIZER_DIR / "tokenizer.json", [0, 1]),
                    "adapter_in_models": (models / md.EX4D_REPO / md.ADAPTER_CKPT, [0]),
                    "explicit_adapter": (tmp_path / "my_adapter.ckpt", [1]),
                    "unrelated": (models / "README.txt", [])}[edit]
    path.write_bytes(path.read_bytes() + b" v2")
    assert _rerun(jobs) == expect  # the recon-only job reads none of these
    assert _rerun(jobs) == []


def _depth_anything_weights(models: Path, text: bytes) -> Path:
    from ex4d.depth.weights import DEPTH_ANYTHING_REPOS

    folder = models / DEPTH_ANYTHING_REPOS["small"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(text)
    return folder / "model.safetensors"


def test_new_depth_weights_rerun_the_job_and_recompute_depth(tmp_path, monkeypatch):
    """Replaced estimator weights rerun the job, and its depth.npz (whose own reuse check knows only the
    estimator's name) is computed again rather than reused."""
    import ex4d.depth
    from ex4d.types import DepthVideo

    estimates = []

    class Estimator:
        name = "depth-anything"

        def estimate(self, frames):
            estimates.append(len(frames))
            depth = np.full(frames.shape[:3], 6.0, np.float32)
            return DepthVideo(depth=depth, valid=np.ones_like(depth, bool), estimator=self.name)

    monkeypatch.setattr(ex4d.depth, "get_estimator", lambda spec, **kwargs: Estimator())
    weights = _depth_anything_weights(tmp_path / "models", b"v1")
    tiny_video(tmp_path / "clip.mp4")
    write_yaml(tmp_path / "jobs.yaml", (
        f"defaults: {{stage: recon, depth: depth-anything, models_dir: models, num_frames: {T}, resize: keep, "
        "save_mesh: none, device: cpu}\njobs:\n  - {video: clip.mp4, cam: 30, output: out/a}\n"))
    jobs = load_jobs(tmp_path / "jobs.yaml")
    assert run_batch(jobs).ok and len(estimates) == 1
    assert run_batch(jobs).skipped == [0] and len(estimates) == 1
    weights.write_bytes(b"v2")
    assert run_batch(jobs).ran == [0] and len(estimates) == 2, "depth.npz of the old weights was reused"
    assert is_finished(jobs[0])


# ---------------------------------------------------------------------------------------------
# The manifest lock file is removed, and still excludes


def test_lock_removed_after_runs_and_taken_over_after_a_crash(tmp_path):
    jobs = load_jobs(make_jobs_file(tmp_path, n=3))
    manifest = tmp_path / "jobs.manifest.json"
    run_batch(jobs, runner=FakeRunner(), manifest=manifest)
    assert manifest.is_file() and not lock_path(manifest).exists()
    lock_path(manifest).write_bytes(b"")  # left by a process killed while it held the lock
    write_manifest(manifest, jobs)
    assert not lock_path(manifest).exists()
    lock_path(manifest).write_text("somebody's file")
    with pytest.raises(InputError, match="not written by ex4d"):
        write_manifest(manifest, jobs)
    assert lock_path(manifest).read_text() == "somebody's file"


def test_lock_excludes_while_it_is_removed(tmp_path):
    """Many writers take the lock at once; the file is deleted at every release, yet never two hold it."""
    path = tmp_path / "m.json.lock"
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def worker():
        try:
            for _ in range(40):
                with batch._locked(path):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.0005)
                    with guard:
                        inside[0] -= 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and most[0] == 1 and not path.exists()


# ---------------------------------------------------------------------------------------------
# Jobs files are bounded; lists are refused


BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                 + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                    f"*{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
                 + ["jobs:", "  - {video: a.mp4, output: o, cam: *i}"]) + "\n"


def test_yaml_alias_bomb_refused(tmp_path):
    with pytest.raises(InputError, match="alias bomb") as info:
        load_jobs(write_yaml(tmp_path / "jobs.yaml", BOMB))
    assert str(info.value).startswith(str(tmp_path / "jobs.yaml")) and "\n" not in str(info.value)


def test_yaml_aliases_of_ordinary_size_work(tmp_path):
    jobs = load_jobs(write_yaml(tmp_path / "jobs.yaml", (
        "jobs:\n  - &first {video: a.mp4, stage: recon, depth: d.npz, output: o1, cam: 30}\n"
        "  - {<<: *first, output: o2, cam: 90}\n")))
    assert [j["cam"] for j in jobs] == ["30", "90"] and jobs[1]["stage"] == "recon"


def test_jobs_file_size_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "MAX_JOBS_FILE_BYTES", 100)
    path = make_jobs_file(tmp_path, n=5)
    with pytest.raises(InputError, match="at most"):
        load_jobs(path)
    with pytest.raises(InputError, match="at most"):
        load_jobs(make_jobs_file(tmp_path, n=5, fmt="csv"))


@pytest.mark.parametrize("text, expect", [
    ("jobs:\n  - {video: a.mp4, output: o}\n  - {video: a.mp4, output: p, cam: [30, 60]}\n",
     r"job 2: cam is a list"),
    ("jobs:\n  - {video: a.mp4, output: o, seed: [1]}\n", r"job 1: seed is a list"),
    ("jobs:\n  - {video: a.mp4, output: o, prompt: {a: b}}\n", r"job 1: prompt is a mapping"),
    ("defaults: {cam: [30, 60]}\njobs:\n  - {video: a.mp4, output: o}\n", r"defaults \(for job 1\): cam is a list"),
])
def test_list_values_refused(tmp_path, text, expect):
    with pytest.raises(InputError, match=expect) as info:
        load_jobs(write_yaml(tmp_path / "jobs.yaml", text))
    assert "one job per value" in str(info.value)


# ---------------------------------------------------------------------------------------------
# One job numbering, --dry-run checks, separate manifests, plain progress lines


def test_jobs_counted_from_one_in_lines_summary_and_manifest(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch, "default_runner", FakeRunner(fail={"job001"}))
    jobs_file = make_jobs_file(tmp_path, n=3)
    assert main(["batch", str(jobs_file)]) == 1
    err = capsys.readouterr().err  # not a terminal: one plain line per job, no progress bar
    assert "[1/3] job 1 (job000): done in" in err and "[2/3] job 2 (job001): failed: RuntimeError" in err
    assert "failed jobs (numbered from 1; errors in the manifest): 2" in err and "\r" not in err
    manifest = json.loads((tmp_path / "jobs.yaml.manifest.json").read_text())
    assert [(e["job"], e["status"]) for e in manifest["jobs"]] == [(1, "done"), (2, "failed"), (3, "done")]
    assert read_record(load_jobs(jobs_file)[1])["job"] == 2
    assert main(["batch", str(jobs_file), "--skip-failed"]) == 0
    err = capsys.readouterr().err
    assert "[1/3] job 1 (job000): finished earlier, skipped" in err
    assert "[2/3] job 2 (job001): failed earlier, not retried" in err


def test_yaml_and_csv_manifests_do_not_collide(tmp_path, capsys):
    make_jobs_file(tmp_path, n=2, fmt="yaml")
    make_jobs_file(tmp_path, n=3, fmt="csv")
    for name in ("jobs.yaml", "jobs.csv"):
        assert main(["batch", str(tmp_path / name), "--status"]) == 0
    capsys.readouterr()
    yaml_manifest = json.loads((tmp_path / "jobs.yaml.manifest.json").read_text())
    csv_manifest = json.loads((tmp_path / "jobs.csv.manifest.json").read_text())
    assert len(yaml_manifest["jobs"]) == 2 and len(csv_manifest["jobs"]) == 3


def test_dry_run_reports_every_video_and_cam_problem(tmp_path, capsys):
    tiny_video(tmp_path / "clip.mp4")
    tiny_depth(tmp_path / "depth.npz")
    pose_file(tmp_path / "good.npz")
    pose_file(tmp_path / "short.npz", count=3)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    jobs_file = write_yaml(tmp_path / "jobs.yaml", (
        f"defaults: {{stage: recon, depth: depth.npz, num_frames: {T}, resize: keep}}\njobs:\n"
        "  - {video: clip.mp4, cam: 30, output: out/ok}\n"
        "  - {video: clip.mp4, cam: good.npz, output: out/pose_ok}\n"
        "  - {video: clip.mp4, cam: 'orbit:yaw=abc', output: out/bad_cam}\n"
        "  - {video: clip.mp4, cam: short.npz, output: out/short_pose}\n"
        "  - {video: clip.mp4, cam: missing.npz, output: out/no_pose}\n"
        "  - {video: broken.mp4, cam: 30, output: out/broken}\n"
        "  - {video: clip.mp4, cam: 30, output: out/long, num_frames: 9}\n"
        "  - {video: nowhere.mp4, cam: zoom_in, output: out/no_video, depth: nowhere.npz}\n"))
    code = main(["batch", str(jobs_file), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 1 and len(out.strip().splitlines()) == 8
    problems = [line for line in err.splitlines() if line.startswith("problem: ")]
    assert all(not p.startswith(("problem: job 1 ", "problem: job 2 ")) for p in problems), problems
    expected = ["job 3 (bad_cam): cam: bad camera path", "job 4 (short_pose): cam: ", "3 camera poses",
                "job 5 (no_pose): cam: camera path file not found", "job 6 (broken): cannot read",
                "job 7 (long): video", "has only 5 frames but num_frames is 9; set num_frames: 5 or fewer",
                "job 8 (no_video): video not found", "job 8 (no_video): depth file not found"]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert "7 problem(s) found" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.yaml.manifest.json").exists()
    jobs_file.write_text("\n".join(jobs_file.read_text().splitlines()[:4]) + "\n")
    assert main(["batch", str(jobs_file), "--dry-run"]) == 0
    assert "no problems found in 2 job(s)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_dry_run_reports_gpu_features_this_machine_lacks(tmp_path, capsys):
    tiny_video(tmp_path / "clip.mp4")
    tiny_depth(tmp_path / "depth.npz")
    jobs_file = write_yaml(tmp_path / "jobs.yaml", (
        f"defaults: {{stage: run, depth: depth.npz, num_frames: {T}, resize: keep}}\njobs:\n"
        "  - {video: clip.mp4, cam: 30, output: out/plain}\n"
        "  - {video: clip.mp4, cam: 30, output: out/fp8, fp8: true}\n"
        "  - {video: clip.mp4, cam: 30, output: out/fp8_attention, attention: fp8}\n"))
    assert main(["batch", str(jobs_file), "--dry-run"]) == 1
    problems = [line for line in capsys.readouterr().err.splitlines() if line.startswith("problem: job")]
    assert not any(p.startswith("problem: job 1 ") for p in problems), problems
    assert any(p.startswith("problem: job 2 (fp8): --fp8 ") for p in problems), problems
    assert any(p.startswith("problem: job 3 (fp8_attention): --attention fp8 ") for p in problems), problems


def test_real_batch_refuses_gpu_features_this_machine_lacks_before_job_1(tmp_path, capsys):
    """Not only --dry-run: a real batch stops before job 1 (no depth, no recon, no manifest progress)
    when a later run job asks for fp8 that this machine cannot run, with one line naming the job."""
    tiny_video(tmp_path / "clip.mp4")
    tiny_depth(tmp_path / "depth.npz")
    jobs_file = write_yaml(tmp_path / "jobs.yaml", (
        f"defaults: {{stage: recon, depth: depth.npz, num_frames: {T}, resize: keep}}\njobs:\n"
        "  - {video: clip.mp4, cam: 30, output: out/first}\n"
        "  - {video: clip.mp4, cam: 30, output: out/fp8, stage: run, fp8: true}\n"))
    code = main(["batch", str(jobs_file)])
    err = capsys.readouterr().err
    assert code not in (0, 3), err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: job 2 (fp8): --fp8 "), err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Kill a real batch mid-job (SIGKILL), rerun it


STALL = '''
import os, sys, time
from pathlib import Path
import ex4d.io.video as video


def stall_here(path):
    if os.sep + os.environ["STALL_IN"] + os.sep in str(path):  # the job's folder (or a staging folder in it)
        Path(os.environ["STALL_READY"]).write_text("stalled")
        time.sleep(300)


if hasattr(video, "VideoWriter"):  # frames are encoded as they are rendered: stall mid-encode
    original = video.VideoWriter.write

    def write(self, frame):
        original(self, frame)
        if self.frames_written >= 2:
            stall_here(self.path)

    video.VideoWriter.write = write
else:
    from ex4d.io.files import atomic_path
    original = video.write_video

    def write_video(path, frames, fps, **kwargs):
        with atomic_path(path) as tmp:  # a half-written output, as a kill mid-encode leaves it
            tmp.write_bytes(b"half a video")
            stall_here(path)
        return original(path, frames, fps, **kwargs)

    video.write_video = write_video

from ex4d.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_killed_batch_resumes_cleanly(tmp_path, capsys):
    tiny_video(tmp_path / "clip.mp4")
    tiny_depth(tmp_path / "depth.npz")
    jobs_file = write_yaml(tmp_path / "jobs.yaml", (
        f"defaults: {{stage: recon, depth: depth.npz, num_frames: {T}, resize: keep, save_mesh: none, "
        "device: cpu}\njobs:\n"
        + "".join(f"  - {{video: clip.mp4, cam: {cam}, output: out/{name}}}\n"
                  for name, cam in (("a", 30), ("b", 60), ("c", 30), ("d", -30)))))
    (tmp_path / "stall.py").write_text(STALL)
    ready = tmp_path / "stalled"
    env = {**os.environ, "STALL_IN": str(Path("out", "c")), "STALL_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "stall.py"), "batch", str(jobs_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the batch never reached job 3"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = tmp_path / "out"
    assert list((out / "c").glob(".*.partial-*")), "killed mid-write: a temporary was left"
    assert read_record({"output": str(out / "c")})["status"] == "running"
    assert not (out / "d").exists()

    code = main(["batch", str(jobs_file)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "job 1 (a): finished earlier, skipped" in err and "job 2 (b): finished earlier, skipped" in err
    assert "job 3 (c): done" in err and "job 4 (d): done" in err and "2 ran, 2 skipped" in err
    leftovers = [p for p in tmp_path.rglob("*") if ".partial" in p.name or p.name.endswith(".lock")]
    assert leftovers == []
    manifest = json.loads((tmp_path / "jobs.yaml.manifest.json").read_text())
    assert manifest["counts"] == {"done": 4, "failed": 0, "running": 0, "pending": 0}
    for entry, job in zip(manifest["jobs"], load_jobs(jobs_file)):
        record = read_record(job)
        assert record["status"] == entry["status"] == "done" and is_finished(job, record)
        assert entry["outputs"] == record["outputs"] and all(Path(p).is_file() for p in entry["outputs"].values())
    from ex4d.io.video import read_mask_video

    assert read_mask_video(out / "c" / "mask_30.mp4").shape == (T, H, W)


def test_dry_run_reports_missing_weights_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_video(tmp_path / "clip.mp4")
    (tmp_path / "models").mkdir()
    jobs_file = write_yaml(tmp_path / "jobs.yaml", (
        f"defaults: {{stage: recon, num_frames: {T}, resize: keep, models_dir: models}}\njobs:\n"
        "  - {video: clip.mp4, cam: 30, output: out/a, depth: depth-anything}\n"))
    assert main(["batch", str(jobs_file), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "problem: " in err and "Depth-Anything-V2-Small-hf" in err and "1 problem(s) found" in err
