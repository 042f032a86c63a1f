"""bench/bench_generate.py under torchrun: two CPU (gloo) processes on tiny models, and --compare.

Slow (each case starts two Python processes that import diffusers): run with ``-m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_generate.py"
TINY = ["--tiny", "--mode", "eager", "--runs", "1", "--steps", "3", "--warmup-steps", "1"]

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # --tiny is a CPU check even where a GPU exists
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # one JSON object, printed by rank 0 only
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "one.npy"
    result = _run([sys.executable, str(SCRIPT), *TINY, "--save-output", str(path)])
    return result, path


@pytest.mark.parametrize("mode", ["cfg", "ulysses"])
def test_two_processes_report_and_agree_with_one(mode, one_process, tmp_path):
    single, single_path = one_process
    assert "world_size" not in single and "parallel_mode" not in single  # single-process fields unchanged
    assert single["output_ok"] and single["saved_output"]["frames"] == str(single_path)

    path = tmp_path / f"{mode}.npy"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   str(SCRIPT), *TINY, "--parallel", mode, "--save-output", str(path),
                   "--baseline-step-s", "0.5"])
    assert result["bench"] == "generate" and result["output_ok"]
    assert result["world_size"] == 2 and result["parallel_mode"] == mode
    assert (result["cfg_degree"], result["ulysses_degree"]) == ((2, 1) if mode == "cfg" else (1, 2))
    assert len(result["peak_mem_gib_per_rank"]) == 2 and len(result["step_s_median_per_rank"]) == 2
    assert all(s > 0 for s in result["step_s_median_per_rank"])
    assert result["step_s_median"] == result["step_s_median_per_rank"][0]
    assert result["speedup_vs_baseline_step"] == pytest.approx(0.5 / result["step_s_median"], rel=1e-2)
    assert path.is_file() and Path(result["saved_output"]["latents"]).is_file()

    compare = _run([sys.executable, str(SCRIPT), "--compare", str(single_path), str(path)])
    assert compare["bench"] == "generate-compare"
    assert compare["frames"]["shape"] == [9, 32, 32, 3]
    # float32 on the CPU: the split only reorders work, so the same seed gives the same video.
    assert compare["frames"]["max_abs"] <= 1.0
    assert compare["latents"]["max_abs"] < 1e-4


def test_compare_reports_a_difference(tmp_path):
    import numpy as np

    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 10
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    result = _run([sys.executable, str(SCRIPT), "--compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])
    frames = result["frames"]
    assert frames["max_abs"] == 10 and not frames["identical"]
    assert frames["mean_abs"] == pytest.approx(10 / a.size)
    assert frames["psnr_db"] == pytest.approx(10 * np.log10(255**2 / (100 / a.size)), abs=0.01)
    assert "latents" not in result
