"""The trainer's files: nothing in a run folder is unpickled, its files are replaced whole (a kill
never leaves a half line), and a resume that cannot continue is a one-line user error."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from test_train_loop import Points, Toy, _config  # noqa: E402

from ex4d.errors import CheckpointError, InputError  # noqa: E402
from ex4d.io.files import is_ex4d_file, write_policy  # noqa: E402
from ex4d.train.trainer import (  # noqa: E402
    LEGACY_RNG_FILE,
    RNG_FILE,
    MetricsLog,
    list_checkpoints,
    load_checkpoint,
    load_rng_state,
    save_rng_state,
    train,
)


class _Payload:
    """A pickle that creates a folder when unpickled: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _draws() -> tuple:
    return (torch.rand(4).tolist(), np.random.rand(3).tolist(), np.random.randn(3).tolist(), random.random(),
            random.gauss(0, 1))


def _load_args(system):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-2)
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=12)


# ---------------------------------------------------------------------------------------------
# No unpickling


def test_rng_state_round_trips_exactly_without_pickle(tmp_path):
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state ...
    random.gauss(0, 1)  # ... and in python's
    save_rng_state(tmp_path / RNG_FILE)
    expected = _draws()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    load_rng_state(tmp_path / RNG_FILE)
    assert _draws() == expected
    from safetensors import safe_open

    with safe_open(str(tmp_path / RNG_FILE), framework="pt") as handle:  # plain tensors + JSON metadata
        assert set(handle.keys()) >= {"torch", "numpy.keys", "python.state"}
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError, match="cannot read the RNG state"):
        load_rng_state(tmp_path / "bad.safetensors")


def test_checkpoints_hold_no_pickled_rng_and_resume_restores_the_rng(tmp_path):
    train(Toy(), Points(), _config(tmp_path, "run"), stop_after=4)
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert (checkpoint / RNG_FILE).is_file() and not (checkpoint / LEGACY_RNG_FILE).exists()
    torch.manual_seed(123)
    expected_torch = torch.rand(3)
    torch.manual_seed(123)
    save_rng_state(checkpoint / RNG_FILE)  # a known state in the checkpoint
    torch.manual_seed(0)
    system = Toy()
    optimizer, scheduler = _load_args(system)
    assert load_checkpoint(checkpoint, system, optimizer, scheduler, _config(tmp_path, "run")) == 4
    assert torch.equal(torch.rand(3), expected_torch)


def test_pickles_in_a_checkpoint_are_never_executed(tmp_path, caplog):
    """A shared run folder must not run code: a malicious rng.pt is never opened (an old checkpoint
    without rng.safetensors resumes, with a warning), and a malicious optimizer.pt or scheduler.pt is
    refused by the weights-only loader with a one-line CheckpointError (exit 2)."""
    marker = tmp_path / "pwned"
    control = tmp_path / "control"
    torch.save(_Payload(control), tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)  # the payload is live: an unsafe load runs it
    assert control.is_dir()

    full = train(Toy(), Points(), _config(tmp_path, "full"))
    train(Toy(), Points(), _config(tmp_path, "run"), stop_after=4)
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    (checkpoint / RNG_FILE).unlink()  # an older checkpoint: only the pickle
    torch.save(_Payload(marker), checkpoint / LEGACY_RNG_FILE)
    with caplog.at_level(logging.WARNING, logger="ex4d.train.trainer"):
        resumed = train(Toy(), Points(), _config(tmp_path, "run"))
    assert not marker.exists()
    assert resumed.losses == full.losses[4:]  # still exact: no sample depends on the global RNG
    assert any(LEGACY_RNG_FILE in r.message and "never loaded" in r.message for r in caplog.records)

    for name in ("optimizer.pt", "scheduler.pt"):
        train(Toy(), Points(), _config(tmp_path, name), stop_after=4)
        checkpoint = list_checkpoints(tmp_path / name)[-1]
        torch.save(_Payload(marker), checkpoint / name)
        system = Toy()
        with pytest.raises(CheckpointError, match=f"cannot load the .* {checkpoint / name}") as info:
            load_checkpoint(checkpoint, system, *_load_args(system), _config(tmp_path, name))
        assert "\n" not in str(info.value) and info.value.exit_code == 2
        assert not marker.exists()


def test_corrupt_checkpoint_files_are_checkpoint_errors(tmp_path):
    train(Toy(), Points(), _config(tmp_path, "run"), stop_after=4)
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    config = _config(tmp_path, "run")
    for name, content, message in [("optimizer.pt", b"", "cannot load the optimizer state"),
                                   ("trainable.safetensors", b"\x00" * 5, "cannot read"),
                                   ("state.json", b"{not json", "cannot read")]:
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(content)
        system = Toy()
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(checkpoint, system, *_load_args(system), config)
        assert "\n" not in str(info.value)
        (checkpoint / name).write_bytes(original)


# ---------------------------------------------------------------------------------------------
# A resume that cannot continue is a user error


def test_resume_with_other_shapes_is_a_user_error(tmp_path):
    """Any system: trainables of another shape (e.g. another LoRA rank) are named, not a RuntimeError."""

    class Wider(Toy):
        def __init__(self) -> None:
            super().__init__()
            self.adapter = nn.Sequential(nn.Linear(9, 48), nn.SiLU(), nn.Linear(48, 8))

    train(Toy(), Points(), _config(tmp_path, "run"), stop_after=4)
    with pytest.raises(InputError, match=r"another shape \(e\.g\. adapter\.0\.weight \(32, 9\) here \(48, 9\)\)"):
        train(Wider(), Points(), _config(tmp_path, "run"))


def test_resume_with_a_changed_lora_rank_is_a_one_line_user_error(tmp_path, capsys):
    from test_train_wan import _Clips, _system

    from ex4d.cli import main
    from ex4d.train.trainer import TrainConfig

    config = dict(output_dir=str(tmp_path / "run"), max_steps=4, learning_rate=1e-2, checkpoint_every=1,
                  tensorboard=False)
    train(_system(lora_rank=8), _Clips(), TrainConfig(**config), stop_after=1)
    with pytest.raises(InputError, match="cannot resume from .*step-000001: --lora-rank was 8, now 4"):
        train(_system(lora_rank=4), _Clips(), TrainConfig(**config))
    with pytest.raises(InputError, match="--encoder-hidden was 16, now 32"):
        train(_system(lora_rank=8, encoder_hidden=32), _Clips(), TrainConfig(**config))
    # the command refuses it before loading any model (the dataset folder is not even read)
    capsys.readouterr()
    code = main(["train", str(tmp_path / "no-pairs"), "-o", str(tmp_path / "run"), "--lora-rank", "4",
                 "--encoder-hidden", "16", "--lora-alpha", "8", "--steps", "4", "--size", "16x16"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: cannot resume") and "--lora-rank was 8, now 4" in err
    assert len(err.splitlines()) == 1
    assert main(["train", str(tmp_path / "no-pairs"), "-o", str(tmp_path / "run"), "--resume",
                 str(tmp_path / "nowhere")]) == 1
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_a_diverging_run_is_a_user_error(tmp_path):
    class Diverging(Toy):
        def forward(self, batch):
            return {"loss": super().forward(batch)["loss"] * float("nan")}

    with pytest.raises(InputError, match="non-finite loss .* at step 1; lower the learning rate"):
        train(Diverging(), Points(), _config(tmp_path, "nan"))


# ---------------------------------------------------------------------------------------------
# Config.json and log.csv are written whole


def _steps(path: Path) -> list[int]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(None not in row.values() and len(row) == len(MetricsLog.COLUMNS) for row in rows), rows
    return [int(row["step"]) for row in rows]


def test_run_files_are_ex4d_files_and_foreign_ones_are_refused(tmp_path):
    train(Toy(), Points(), _config(tmp_path, "run", max_steps=2, checkpoint_every=0))
    for name in ("config.json", "log.csv"):
        assert is_ex4d_file(tmp_path / "run" / name), name  # written through atomic_path (ledger entry)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("the user's own file")
    with pytest.raises(InputError, match="config.json is an existing file that ex4d did not write"):
        train(Toy(), Points(), _config(tmp_path, "mine", max_steps=2))
    assert (mine / "config.json").read_text() == "the user's own file"
    assert not (mine / "log.csv").exists()  # refused before any work
    with write_policy(overwrite=True):
        train(Toy(), Points(), _config(tmp_path, "mine", max_steps=2))
    assert json.loads((mine / "config.json").read_text())["train"]["max_steps"] == 2


def test_resume_drops_log_rows_after_the_checkpoint_and_half_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(MetricsLog, "FLUSH_SECONDS", 0.0)  # every row reaches the file at once
    full = train(Toy(), Points(), _config(tmp_path, "full"))
    train(Toy(), Points(), _config(tmp_path, "run"), stop_after=6)  # checkpoint at 4, rows up to 6
    log_csv = tmp_path / "run" / "log.csv"
    assert _steps(log_csv) == [1, 2, 3, 4, 5, 6]
    with open(log_csv, "a") as handle:  # what an in-place writer killed mid-line left (older ex4d)
        handle.write("7,0.53")
    with write_policy(overwrite=True):  # the edited file is no longer ex4d's as written
        resumed = train(Toy(), Points(), _config(tmp_path, "run"))
    assert _steps(log_csv) == list(range(1, 13))
    assert resumed.losses == full.losses[4:]


_KILLED_WORKER = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import ex4d.train.trainer as trainer
from test_train_loop import Points, Toy, _config
from pathlib import Path

trainer.MetricsLog.FLUSH_SECONDS = 0.0
real = trainer._write_csv

def dying(path, columns, rows):
    if rows and int(rows[-1]["step"]) == 7:  # killed halfway through writing the log at step 7
        with open(path, "w") as handle:
            handle.write("step,loss\n1,0.5\n7,0.1")
            handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, columns, rows)

trainer._write_csv = dying
trainer.train(Toy(), Points(), _config(Path(sys.argv[1]), "run"))
'''


def test_sigkill_while_writing_the_log_leaves_whole_files_and_resumes(tmp_path):
    """A real SIGKILL in the middle of a log write: log.csv keeps its previous whole rows, config.json
    is whole, and a rerun resumes from the last checkpoint with the log reading as one run."""
    script = tmp_path / "worker.py"
    script.write_text(_KILLED_WORKER)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    run = tmp_path / "run"
    assert _steps(run / "log.csv") == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 12
    leftovers = [p.name for p in run.iterdir() if ".partial-" in p.name]
    assert leftovers  # the killed write's temporary (swept by the next write of log.csv)
    full = train(Toy(), Points(), _config(tmp_path, "full"))
    resumed = train(Toy(), Points(), _config(tmp_path, "run"))
    assert resumed.losses == full.losses[4:]  # from the step-4 checkpoint
    assert _steps(run / "log.csv") == list(range(1, 13))
    assert not [p.name for p in run.iterdir() if ".partial-" in p.name]
