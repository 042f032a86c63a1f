"""bench/bench_train.py --tiny: the training-step benchmark runs the real trainer end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_tiny_prints_one_json_object(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--tiny", "--steps", "3",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert out.read_text().strip() == lines[0]
    assert result["tiny"] is True and result["world_size"] == 1 and result["mode"] == "single"
    assert result["distributed_type"] == "NO" and result["parameters_sharded"] is False
    assert len(result["step_seconds"]) == 3 and len(result["warmup_step_seconds"]) == 1
    assert result["step_seconds_median"] > 0
    assert len(result["losses"]) == 4 and all(v == v for v in result["losses"])  # finite, one per step
    # tiny config: 2 blocks x 10 linears of rank 4 on width 24 (ffn 48) + a 16-wide CamVidEncoder
    assert result["trainable_parameters"] == 6856
    assert result["shapes"]["latent"] == [16, 2, 4, 4] and result["shapes"]["dit_tokens"] == 8
    assert result["git_commit"]


def test_expected_trainable_matches_the_released_adapter_size():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train

    from ex4d.diffusion.weights.keymaps import TRANSFORMER_CONFIG_I2V_14B

    assert bench_train.expected_trainable(TRANSFORMER_CONFIG_I2V_14B, 16, 1024) == bench_train.FULL_TRAINABLE
