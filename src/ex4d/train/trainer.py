"""The adapter trainer: a deterministic, resumable loop over any :class:`TrainSystem`.

What is trained is decided by the system (``ex4d.train.wan_system.EX4DTrainSystem`` trains the
LoRA + CamVidEncoder of EX-4D); this module owns the loop:

* **Determinism and exact resume.** Every random draw of a training sample (timestep, noise, mask
  erosion) comes from a seed derived from ``(seed, global sample index)``, and the data order of
  epoch ``e`` is a permutation seeded by ``(seed, e)``. Nothing depends on RNG state carried from
  step to step, so a run resumed from a checkpoint repeats the uninterrupted run step for step, and
  the samples a run sees do not depend on the number of GPUs (only their grouping into steps does).
* **Multi-GPU** through accelerate: the system is wrapped by ``accelerator.prepare`` (DDP, or FSDP2
  when launched with an ``fsdp_version: 2`` config); each process takes every ``world_size``-th
  sample. Gradient accumulation is explicit (``no_sync`` on all but the last micro-batch). Under
  FSDP2 the trainable tensors are sharded DTensors: checkpoints and the final adapter gather them
  (and the optimizer state) on every process before the main process writes them.
* **Checkpoints** every ``checkpoint_every`` steps in ``<out>/checkpoints/step-NNNNNN/``: the fp32
  trainable tensors, optimizer, LR scheduler, RNG states (safetensors) and step, plus the system's exported
  adapter (``ex4d.ckpt`` that ``ex4d generate`` loads unchanged, and a safetensors adapter +
  config). Each folder is written under a temporary name and renamed when complete.
* **Logging**: ``<out>/log.csv`` (step, loss, lr, grad_norm, samples/s), TensorBoard when the
  ``tensorboard`` package is installed, validation outputs every ``validate_every`` steps. The CSV
  files and ``config.json`` are replaced whole (temporary name, then rename), never edited in place.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ex4d.errors import CheckpointError, InputError
from ex4d.io.files import atomic_dir, atomic_path, check_outputs

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
#: Config fields that must not change when a run is resumed (they change which sample a step sees).
RESUME_INVARIANTS = ("seed", "batch_size", "grad_accum")


@dataclass
class TrainConfig:
    """Loop settings (the model-side settings live in the system's own config)."""

    output_dir: str = "train_out"
    max_steps: int = 1000
    batch_size: int = 1            # per process and micro-batch
    grad_accum: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_schedule: str = "constant_with_warmup"  # any diffusers.optimization scheduler name
    warmup_steps: int = 0
    max_grad_norm: float = 1.0     # <= 0 disables clipping
    seed: int = 0
    checkpoint_every: int = 500    # <= 0: only the final checkpoint
    keep_checkpoints: int = 3      # <= 0 keeps all
    log_every: int = 1
    validate_every: int = 0        # <= 0 disables validation
    num_workers: int = 0
    tensorboard: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise InputError(f"learning rate must be > 0, got {self.learning_rate}")


class TrainSystem(nn.Module):
    """What the trainer trains. Subclasses implement :meth:`forward` and the adapter export.

    ``forward(batch)`` takes a collated batch that includes ``seed`` (B,) int64 per-sample seeds and
    returns a dict with a scalar ``loss``. Only parameters with ``requires_grad`` are optimised.
    """

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by stable name (detached, any device)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise InputError(f"checkpoint does not match the model: {len(missing)} missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                             f"it was trained with other model settings: use the same, or start a new run")
        shapes = [f"{name} {tuple(state[name].shape)} here {tuple(p.shape)}" for name, p in params.items()
                  if tuple(state[name].shape) != tuple(p.shape)]
        if shapes:
            raise InputError(f"checkpoint does not match the model: {len(shapes)} tensor(s) of another shape "
                             f"(e.g. {shapes[0]}); it was trained with other model settings (e.g. --lora-rank): "
                             f"use the same, or start a new run")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device, p.dtype))

    def export_adapter(self, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> dict[str, Path]:
        """Write the inference-ready adapter files into ``out_dir``; return them by role.

        state: the full trainable tensors by :meth:`trainable_state_dict` name (the trainer passes
        them gathered from every process under FSDP); None reads them from the module.
        """
        return {}

    def validate(self, out_dir: Path, step: int) -> dict[str, float]:
        """Produce validation outputs under ``out_dir``; return scalar metrics."""
        return {}

    def describe(self) -> dict:
        """JSON-serialisable description of the model-side settings (saved with checkpoints)."""
        return {}

    def resume_mismatches(self, saved: dict) -> list[str]:
        """Settings that differ from a checkpoint's saved :meth:`describe` and make it impossible to resume
        (e.g. ``"lora_rank was 16, now 8"``); empty when the checkpoint fits. Default: none."""
        return []


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers, stable across runs, platforms and process counts."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepSampler(torch.utils.data.Sampler):
    """Yields dataset indices for steps ``start_step .. max_steps - 1`` of this process.

    Global sample ``g`` (counted over all processes and micro-batches) is dataset index
    ``perm_e[g mod N]`` with ``e = g // N`` and ``perm_e`` a permutation seeded by (seed, e).
    Process ``rank`` of ``world`` takes, in each micro-batch, global samples
    ``(step * accum + micro) * world * B + rank * B + b``.
    """

    def __init__(self, dataset_len: int, *, seed: int, batch_size: int, grad_accum: int, start_step: int,
                 max_steps: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.batch, self.accum = dataset_len, seed, batch_size, grad_accum
        self.start, self.stop, self.rank, self.world = start_step, max_steps, rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def global_ids(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            for micro in range(self.accum):
                first = ((step * self.accum + micro) * self.world + self.rank) * self.batch
                yield from range(first, first + self.batch)

    def index_of(self, global_id: int) -> int:
        epoch, position = divmod(global_id, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(derive_seed(self.seed, epoch)).permutation(self.n)}
        return int(self._perms[epoch][position])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for g in self.global_ids():
            yield (self.index_of(g), g)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum * self.batch


class _SeededView(torch.utils.data.Dataset):
    """Wraps a dataset so that item ``(index, global_id)`` also carries its per-sample seed."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, global_id = key
        item = dict(self.dataset[index])
        item["seed"] = torch.tensor(derive_seed(self.seed, global_id, 1), dtype=torch.int64)
        item["sample_id"] = torch.tensor(global_id, dtype=torch.int64)
        return item


# ---------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``<output_dir>/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


#: The RNG states of a checkpoint: plain tensors + JSON metadata (never a pickle; see load_checkpoint).
RNG_FILE = "rng.safetensors"
#: What checkpoints written before RNG_FILE hold instead: a pickle, never loaded (it could run code).
LEGACY_RNG_FILE = "rng.pt"


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The global RNG states (torch CPU, CUDA if present, numpy, python) as tensors + string metadata."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python.state": torch.tensor(python_state, dtype=torch.int64)}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for index, value in enumerate(cuda):
        tensors[f"cuda.{index}"] = value
    meta = {"format": 1, "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                                   "cached_gaussian": float(cached_gaussian)},
            "python": {"version": int(version), "gauss_next": gauss_next}, "cuda_devices": len(cuda)}
    return tensors, {"ex4d_rng": json.dumps(meta)}


def save_rng_state(path: Path) -> None:
    """Write the global RNG states to ``path`` (safetensors: loading it runs no code)."""
    from safetensors.torch import save_file

    tensors, metadata = _rng_state()
    save_file(tensors, str(path), metadata=metadata)


def load_rng_state(path: Path) -> None:
    """Restore the global RNG states saved by :func:`save_rng_state`; a bad file is a CheckpointError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["ex4d_rng"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        numpy_meta, python_meta = meta["numpy"], meta["python"]
        numpy_state = (str(numpy_meta["name"]), tensors["numpy.keys"].numpy().astype(np.uint32),
                       int(numpy_meta["pos"]), int(numpy_meta["has_gauss"]), float(numpy_meta["cached_gaussian"]))
        gauss_next = python_meta["gauss_next"]
        python_state = (int(python_meta["version"]), tuple(int(v) for v in tensors["python.state"].tolist()),
                        None if gauss_next is None else float(gauss_next))
        torch_state = tensors["torch"]
        # validate every part on throwaway generators before changing any global state
        torch.Generator().set_state(torch_state)
        random.Random().setstate(python_state)
        np.random.RandomState().set_state(numpy_state)
    except Exception as exc:  # any malformed content: the file is not what save_rng_state wrote
        raise CheckpointError(f"cannot read the RNG state {path}: {_first_line(exc)} (the checkpoint is corrupt; "
                              f"resume from another one with --resume DIR, or start over with --resume none)") from None
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if torch.cuda.is_available():
        saved = [tensors[f"cuda.{i}"] for i in range(int(meta.get("cuda_devices", 0))) if f"cuda.{i}" in tensors]
        for index, value in enumerate(saved[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value, index)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name (messages may be empty)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_plain(path: Path, what: str):
    """``torch.load(weights_only=True)`` (tensors and plain containers only; no code can run), with every
    failure (missing, truncated, or a pickle that asks for anything else) as a one-line CheckpointError."""
    import pickle

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} has no {path.name}; it is incomplete: resume from another "
                              f"one with --resume DIR, or start over with --resume none")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError,
            TypeError, ImportError, IndexError) as exc:
        raise CheckpointError(f"cannot load the {what} {path}: {_first_line(exc)} (it holds more than plain tensors "
                              f"and was refused, or it is corrupt; resume from another checkpoint with --resume DIR, "
                              f"or start over with --resume none)") from None


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather_trainable(system: TrainSystem, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """The full trainable tensors, fp32 on the CPU, by :meth:`TrainSystem.trainable_state_dict` name.

    FSDP2-sharded tensors (DTensors) are all-gathered, so under FSDP every process must call this
    in the same order; ``keep=False`` (the non-main processes) takes part in the gathers but returns
    an empty dict. Unsharded tensors are only copied.
    """
    out = {}
    for name, value in system.trainable_state_dict().items():
        value = value.detach()
        if _is_sharded(value):
            value = value.full_tensor()  # collective: every process, same order
        if keep:
            # activation-checkpoint wrappers add a path component; names must match the unwrapped model
            out[name.replace("_checkpoint_wrapped_module.", "")] = value.float().cpu().contiguous()
    return out


@dataclass
class TrainingState:
    """What a checkpoint holds besides the scheduler/RNG: gathered trainables + optimizer state.

    optimizer_format: ``"torch"`` (``optimizer.state_dict()``, unsharded runs) or ``"full"``
    (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` with full_state_dict,
    parameters keyed by name; FSDP2 runs).
    """

    trainable: dict[str, torch.Tensor]
    optimizer: dict
    optimizer_format: str = "torch"


def gather_training_state(system: TrainSystem, optimizer, *, model=None, keep: bool = True) -> TrainingState:
    """Collect the checkpoint tensors. Under FSDP2 (any trainable is a DTensor) every process must
    call it (the gathers are collectives; ``model`` is then the prepared model); the result is only
    filled where ``keep``. Otherwise it is a plain copy and only the writing process needs to call it."""
    sharded = any(_is_sharded(p) for p in system.parameters() if p.requires_grad)
    trainable = gather_trainable(system, keep=keep)
    if not sharded:
        return TrainingState(trainable, optimizer.state_dict() if keep else {}, "torch")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # full_state_dict + cpu_offload: all ranks gather, only rank 0 keeps a (CPU) copy
    optim = get_optimizer_state_dict(model if model is not None else system, _plain_optimizer(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return TrainingState(trainable, optim if keep else {}, "full")


def _plain_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper (if any)."""
    return getattr(optimizer, "optimizer", optimizer)


def save_checkpoint(folder: Path, system: TrainSystem, optimizer, scheduler, step: int,
                    config: TrainConfig, *, state: TrainingState | None = None) -> Path:
    """Atomically write a checkpoint folder (see module doc). Call on the main process only.

    state: from :func:`gather_training_state` (required under FSDP2, where it must be gathered on
    every process first); None gathers it here (unsharded runs).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = gather_training_state(system, optimizer)
    with atomic_dir(folder) as tmp:
        save_file(state.trainable, str(tmp / "trainable.safetensors"))
        torch.save(state.optimizer, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_rng_state(tmp / RNG_FILE)
        adapter = system.export_adapter(tmp, state.trainable)
        record = {"step": step, "train_config": asdict(config), "system": system.describe(),
                  "optimizer_format": state.optimizer_format,
                  "adapter_files": {role: Path(p).name for role, p in adapter.items()},
                  "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "state.json").write_text(json.dumps(record, indent=2, default=str))
    return folder


def read_checkpoint_record(folder: Path) -> dict:
    """A checkpoint's ``state.json``; a missing or unreadable one is a one-line user error."""
    folder = Path(folder)
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise InputError(f"{folder} is not a complete checkpoint (no state.json); pick another with --resume DIR "
                         f"or start over with --resume none")
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {state_path}: {_first_line(exc)} (the checkpoint is corrupt; pick another "
                              f"with --resume DIR or start over with --resume none)") from None
    return state


def check_resumable(folder: Path, state: dict, config: TrainConfig, system_mismatches: Iterable[str] = ()) -> None:
    """Refuse (one line, exit 1) to resume a checkpoint made with settings that this run cannot continue:
    the batch layout (:data:`RESUME_INVARIANTS`) or the system's shape-deciding settings
    (``system_mismatches``, from :meth:`TrainSystem.resume_mismatches`, e.g. the LoRA rank)."""
    saved = state.get("train_config") or {}
    changed = [f"{k} was {saved[k]}, now {getattr(config, k)}" for k in RESUME_INVARIANTS
               if k in saved and saved[k] != getattr(config, k)]
    changed += list(system_mismatches)
    if changed:
        raise InputError(f"cannot resume from {folder}: {'; '.join(changed)}; use the same settings, or start a new "
                         f"run (another -o, or --resume none)")


def find_resume_checkpoint(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint a run resumes from: ``"auto"`` = the latest complete one in ``output_dir`` (None if
    there is none), ``None``/``"none"`` = none, anything else = that folder."""
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if resume in (None, "none"):
        return None
    return Path(resume)


def load_checkpoint(folder: Path, system: TrainSystem, optimizer, scheduler, config: TrainConfig, *,
                    load_optimizer: bool = True) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; return its step.

    Call before ``accelerator.prepare``. ``load_optimizer=False`` leaves the optimizer to
    :func:`load_optimizer_full` after prepare (FSDP2, whose optimizer state is sharded).

    Nothing that needs unpickling is loaded: the trainables and the RNG states are safetensors, the
    optimizer and scheduler states go through ``torch.load(weights_only=True)`` (tensors and plain
    containers only). The ``rng.pt`` pickle of older checkpoints is never opened.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_checkpoint_record(folder)
    check_resumable(folder, state, config, system.resume_mismatches(state.get("system") or {}))
    trainable_path = folder / "trainable.safetensors"
    try:
        trainable = load_file(str(trainable_path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {trainable_path}: {_first_line(exc)} (the checkpoint is corrupt or "
                              f"incomplete; pick another with --resume DIR or start over with --resume none)") from None
    system.load_trainable_state_dict(trainable)
    if load_optimizer:
        if state.get("optimizer_format", "torch") != "torch":
            raise InputError(f"{folder} was saved by an FSDP run; resume it with FSDP (fsdp_version 2)")
        saved = _load_plain(folder / "optimizer.pt", "optimizer state")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise InputError(f"the optimizer state in {folder} does not match this model ({_first_line(exc)}); "
                             f"resume with the settings of that run, or start over with --resume none") from None
    try:
        scheduler.load_state_dict(_load_plain(folder / "scheduler.pt", "LR scheduler state"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot restore the LR scheduler from {folder / 'scheduler.pt'}: {_first_line(exc)} "
                              f"(pick another checkpoint with --resume DIR or start over with --resume none)") from None
    if (folder / RNG_FILE).is_file():
        load_rng_state(folder / RNG_FILE)
    else:
        # Checkpoints written before RNG_FILE hold a pickle (rng.pt), which could run arbitrary code; it is
        # not opened. Resuming stays exact without it: no training draw uses the global RNG state (every
        # sample's randomness comes from (seed, sample index), see the module doc).
        log.warning("%s has no %s (an older checkpoint; its %s is a pickle and is never loaded): the global RNG "
                    "state is not restored, which does not change the training samples", folder, RNG_FILE,
                    LEGACY_RNG_FILE)
    return int(state["step"])


def load_optimizer_full(folder: Path, model, optimizer) -> None:
    """Load a checkpoint's optimizer state into an FSDP2-prepared optimizer (every process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    folder = Path(folder)
    state = read_checkpoint_record(folder)
    if state.get("optimizer_format", "torch") != "full":
        raise InputError(f"{folder} was saved by an unsharded run; resume it without FSDP (or --resume none)")
    saved = _load_plain(folder / "optimizer.pt", "optimizer state")
    set_optimizer_state_dict(model, _plain_optimizer(optimizer), saved,
                             options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------
# Logging


class _CsvTable:
    """One CSV file of a run, held in memory and replaced whole (atomic_path) when flushed: a kill at any
    moment leaves the previous complete file, never a half line."""

    def __init__(self, path: Path, columns: tuple[str, ...] | None, resume_step: int) -> None:
        self.path, self.columns, self.rows, self.dirty = Path(path), columns, [], True
        if resume_step > 0 and self.path.is_file():
            # keep the whole rows up to the resumed step, so that the file reads as one run
            with open(self.path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = self.columns or (tuple(reader.fieldnames) if reader.fieldnames else None)
                for row in reader:
                    if None in row or None in row.values():
                        continue  # a half line (left by an older ex4d that appended in place)
                    try:
                        step = int(row["step"])
                    except (KeyError, ValueError):
                        continue
                    if step <= resume_step:
                        self.rows.append(row)

    def append(self, row: dict) -> None:
        if self.columns is None:
            self.columns = tuple(row)
        self.rows.append(row)
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty or self.columns is None:
            return
        with atomic_path(self.path) as tmp:
            _write_csv(tmp, self.columns, self.rows)
        self.dirty = False


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class MetricsLog:
    """CSV (always) and TensorBoard (if installed) scalars; main process only.

    ``log.csv`` and ``<prefix>.csv`` are rewritten whole under a temporary name and renamed (never
    appended in place): at least every :attr:`FLUSH_SECONDS`, and always before a checkpoint is
    written (:meth:`flush`) so that a resume never leaves a gap. On resume, rows after the resumed
    step are dropped (those steps run again).
    """

    COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "seconds")
    #: The ``<prefix>.csv`` files :meth:`scalars` may write (each listed in RUN_FILES).
    PREFIXES = ("validation",)
    FLUSH_SECONDS = 10.0

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "log.csv"
        self.resume_step = resume_step
        self._tables = {"log": _CsvTable(self.path, self.COLUMNS, resume_step)}
        for prefix in self.PREFIXES:
            if (self.output_dir / f"{prefix}.csv").is_file():
                self._tables[prefix] = _CsvTable(self.output_dir / f"{prefix}.csv", None, resume_step)
        self.flush()
        self._last_flush = time.monotonic()
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; logging to log.csv only")

    def write(self, row: dict) -> None:
        self._tables["log"].append({k: row.get(k, "") for k in self.COLUMNS})
        if time.monotonic() - self._last_flush >= self.FLUSH_SECONDS:
            self.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"train/{key}", value, row["step"])

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        """Add ``values`` to ``<prefix>.csv`` (columns fixed by the first call) and TensorBoard."""
        if values:
            if prefix not in self.PREFIXES:
                raise ValueError(f"unknown metrics table {prefix!r}; add it to MetricsLog.PREFIXES and RUN_FILES")
            table = self._tables.get(prefix)
            if table is None:
                table = self._tables[prefix] = _CsvTable(self.path.with_name(f"{prefix}.csv"),
                                                         ("step", *sorted(values)), 0)
            table.append({"step": step, **values})
            table.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        """Write every CSV whose rows changed (whole, atomically)."""
        for table in self._tables.values():
            table.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()


#: Files directly in a run folder that the trainer writes (checked before any work; see check_run_folder).
RUN_FILES = ("config.json", "log.csv", "validation.csv", "final")


def check_run_folder(output_dir: str | os.PathLike) -> None:
    """Refuse, before any work, a run folder whose files the trainer would write over but ex4d did not
    write (one line; ``--overwrite`` allows it), or that is an input of this run."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"the run folder {out} is an existing file; choose another -o")
    check_outputs([out / name for name in RUN_FILES], "training output")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)   # mean loss of each step run in this call
    final_dir: Path | None = None


def _collate(items: list[dict]) -> dict:
    return torch.utils.data.default_collate(items)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(system: TrainSystem, dataset, config: TrainConfig, *, resume: str | None = "auto",
          accelerator=None, progress: Callable[..., Iterable] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train ``system`` on ``dataset`` (a map-style dataset of dicts of tensors) as ``config`` says.

    resume: ``"auto"`` (latest complete checkpoint in the output folder, else start), ``None`` /
    ``"none"`` (start from scratch), or a checkpoint folder. ``stop_after``: stop once this step is
    reached (as if interrupted; used by tests and for time-boxed jobs). Returns the last step,
    the per-step mean losses of this call and the final adapter folder (when ``max_steps`` was reached).
    """
    from diffusers.optimization import get_scheduler

    config.validate()
    if len(dataset) == 0:
        raise InputError("the training dataset is empty; make pairs first with `ex4d make-pairs`")
    accelerator = accelerator or make_accelerator()
    fsdp2 = bool(getattr(accelerator, "is_fsdp2", False))
    if accelerator.distributed_type.value == "FSDP" and not fsdp2:
        raise InputError("FSDP1 flattens each block's parameters into one dtype and cannot hold fp32 LoRA in bf16 "
                         "blocks; set fsdp_version: 2 in the accelerate config (docs/training.md)")
    if fsdp2 and config.validate_every > 0:
        # validation samples on the main process only; a sharded model needs every process in each forward
        raise InputError("validation samples are not supported under FSDP; set --validate-every 0")
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        check_run_folder(out)
        out.mkdir(parents=True, exist_ok=True)

    params = [p for p in system.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    # Built on the unprepared parameters and prepared together with the model: accelerate maps the
    # optimizer onto the parameters FSDP2 creates (matched by name).
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps)

    start_step = 0
    resume_dir = find_resume_checkpoint(out, resume)
    if resume_dir is not None:
        start_step = load_checkpoint(resume_dir, system, optimizer, scheduler, config, load_optimizer=not fsdp2)

    model, optimizer = accelerator.prepare(system, optimizer)
    unwrapped: TrainSystem = accelerator.unwrap_model(model)
    # FSDP2 replaces the parameter objects: clip the prepared ones (the old list gets no gradients).
    params = [p for p in model.parameters() if p.requires_grad]
    if resume_dir is not None:
        if fsdp2:
            load_optimizer_full(resume_dir, model, optimizer)
        log.info("resumed from %s at step %d", resume_dir, start_step)
    sampler = StepSampler(len(dataset), seed=config.seed, batch_size=config.batch_size, grad_accum=config.grad_accum,
                          start_step=start_step, max_steps=config.max_steps, rank=accelerator.process_index,
                          world_size=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(_SeededView(dataset, config.seed), batch_size=config.batch_size,
                                         sampler=sampler, num_workers=config.num_workers, collate_fn=_collate,
                                         pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=config.num_workers > 0)
    metrics = None
    if accelerator.is_main_process:
        run = {"world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value}
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps({"train": asdict(config), "system": unwrapped.describe(), "run": run},
                                      indent=2, default=str))
        metrics = MetricsLog(out, start_step, config.tensorboard)

    result = TrainResult(step=start_step)
    try:
        if config.num_workers > 0:
            # The data workers are forked here. A child that collects garbage inherited from this
            # process can hang for good: a decoded PyAV frame left in a reference cycle frees a
            # swscale context whose slice threads exist only in the parent. Collect it here first.
            gc.collect()
        batches = iter(loader)
        steps = range(start_step, config.max_steps)
        if progress is not None and accelerator.is_main_process:
            steps = progress(steps, total=config.max_steps, initial=start_step, desc="train", unit="step")
        model.train()
        for step in steps:
            started = time.perf_counter()
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(config.grad_accum):
                batch = _to_device(next(batches), accelerator.device)
                sync = contextlib.nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    loss = model(batch)["loss"]
                    if not torch.isfinite(loss):
                        raise InputError(f"training diverged: non-finite loss {loss.item()} at step {step + 1}; "
                                         f"lower the learning rate (--lr) and start over (--resume none), or resume "
                                         f"from an earlier checkpoint with --resume DIR")
                    accelerator.backward(loss / config.grad_accum)
                step_loss += loss.detach() / config.grad_accum
            grad_norm = float("nan")
            if config.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = float(accelerator.reduce(step_loss, reduction="mean"))
            result.losses.append(mean_loss)
            result.step = step + 1
            seconds = time.perf_counter() - started

            done = result.step >= config.max_steps
            if metrics is not None and (result.step % max(1, config.log_every) == 0 or done):
                samples = config.batch_size * config.grad_accum * accelerator.num_processes
                metrics.write({"step": result.step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                               "grad_norm": grad_norm, "samples_per_s": samples / seconds, "seconds": seconds})
            if config.validate_every > 0 and result.step % config.validate_every == 0 and accelerator.is_main_process:
                model.eval()
                values = unwrapped.validate(out / "validation" / f"{CHECKPOINT_PREFIX}{result.step:06d}", result.step)
                model.train()
                metrics.scalars("validation", values, result.step)
            if (config.checkpoint_every > 0 and result.step % config.checkpoint_every == 0) or done:
                accelerator.wait_for_everyone()
                # Under FSDP2 every process takes part in the gathers; only the main one keeps and writes.
                state = None
                if fsdp2 or accelerator.is_main_process:
                    state = gather_training_state(unwrapped, optimizer, model=model, keep=accelerator.is_main_process)
                if accelerator.is_main_process:
                    metrics.flush()  # the log first: a checkpoint must never be ahead of it (resume would leave a gap)
                    save_checkpoint(out / "checkpoints" / f"{CHECKPOINT_PREFIX}{result.step:06d}", unwrapped,
                                    optimizer, scheduler, result.step, config, state=state)
                    _prune(out, config.keep_checkpoints)
            if stop_after is not None and result.step >= stop_after:
                break

        if result.step >= config.max_steps:
            accelerator.wait_for_everyone()
            trainable = None
            if fsdp2 or accelerator.is_main_process:
                trainable = gather_trainable(unwrapped, keep=accelerator.is_main_process)
            if accelerator.is_main_process:
                final = out / "final"
                with atomic_dir(final) as tmp:
                    unwrapped.export_adapter(tmp, trainable)
                result.final_dir = final
    except BaseException:
        if metrics is not None:  # also on an error or Ctrl-C: the log keeps every finished step
            try:
                metrics.close()
            except Exception as exc:  # (e.g. the disk is full) never hide the error that stopped the run
                log.warning("could not write the final rows of %s: %s", metrics.path, _first_line(exc))
        raise
    if metrics is not None:
        metrics.close()
    return result


def make_accelerator(**kwargs):
    """An ``Accelerator`` that also joins a CPU-only process group.

    Without ``cpu=True`` on a machine with no GPU, accelerate does not join the gloo group that
    ``torchrun`` set up, and every process would train alone on its share of the data.
    """
    from accelerate import Accelerator

    kwargs.setdefault("cpu", not torch.cuda.is_available())
    return Accelerator(**kwargs)


def _prune(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
