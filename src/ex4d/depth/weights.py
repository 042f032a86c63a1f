"""Finding and strictly loading the depth models' weight files.

Resolution order for each Hugging Face repository (docs/depth.md):

1. ``<models_dir>/<repo id>/`` (e.g. ``MODELS/tencent/DepthCrafter/config.json``);
2. the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``);
3. a download with huggingface_hub, unless offline (``HF_HUB_OFFLINE=1``) or ``allow_download=False``.

If none has the file: :class:`MissingWeightsError` (exit 2) naming the file and the exact
``hf download`` command. Loading builds the model on the meta device from the
file's config, checks every key and shape against the model (missing/unexpected/mismatched ->
:class:`CheckpointError`), then assigns the tensors: a model is never left with random weights.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ex4d.errors import CheckpointError, MissingWeightsError, key_mismatch_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """One model inside a Hub repository: its folder, config and weight-file candidates (preferred first)."""

    repo: str
    subfolder: str
    config: str
    weights: tuple[str, ...]
    files: tuple[str, ...] = ()  # files named in the download command (empty: the whole repository)
    gated: bool = False  # the Hub asks users to accept a licence before downloading

    def rel(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name


DEPTHCRAFTER_UNET = WeightFile("tencent/DepthCrafter", "", "config.json", ("diffusion_pytorch_model.safetensors",))
SVD_VAE = WeightFile("stabilityai/stable-video-diffusion-img2vid-xt", "vae", "config.json",
                     ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"),
                     files=("vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
                            "image_encoder/config.json", "image_encoder/model.fp16.safetensors"), gated=True)
SVD_IMAGE_ENCODER = WeightFile("stabilityai/stable-video-diffusion-img2vid-xt", "image_encoder", "config.json",
                               ("model.fp16.safetensors", "model.safetensors"), files=SVD_VAE.files, gated=True)
DEPTH_ANYTHING_REPOS = {
    "small": "depth-anything/Depth-Anything-V2-Small-hf",
    "base": "depth-anything/Depth-Anything-V2-Base-hf",
    "large": "depth-anything/Depth-Anything-V2-Large-hf",
}


def depth_anything_file(variant: str = "small") -> WeightFile:
    return WeightFile(DEPTH_ANYTHING_REPOS[variant], "", "config.json", ("model.safetensors",))


def download_command(spec: WeightFile, models_dir: str | os.PathLike | None) -> str:
    """The ``hf download`` command that fills ``<models_dir>/<repo>`` (``huggingface-cli download`` takes
    the same arguments in huggingface_hub < 1.0)."""
    target = f"{models_dir or 'MODELS'}/{spec.repo}"
    files = "".join(f" {p}" for p in spec.files)
    return f"hf download {spec.repo}{files} --local-dir {target}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _pick(folder: Path, spec: WeightFile) -> tuple[Path, Path] | None:
    config = folder / spec.rel(spec.config)
    if not config.is_file():
        return None
    for name in spec.weights:
        if (folder / spec.rel(name)).is_file():
            return config, folder / spec.rel(name)
    return None


def resolve(spec: WeightFile, models_dir: str | os.PathLike | None = None, *,
            allow_download: bool = True) -> tuple[Path, Path]:
    """Return (config path, weight path) for ``spec`` or raise :class:`MissingWeightsError`."""
    if models_dir is not None:
        found = _pick(Path(models_dir) / spec.repo, spec)
        if found:
            return found
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers/transformers
        hf_hub_download = None
    if hf_hub_download is not None:
        modes = [True] + ([False] if allow_download and not _offline() else [])
        for local_only in modes:
            try:
                config = hf_hub_download(spec.repo, spec.rel(spec.config), local_files_only=local_only)
                for name in spec.weights:
                    try:
                        weights = hf_hub_download(spec.repo, spec.rel(name), local_files_only=local_only)
                        return Path(config), Path(weights)
                    except Exception:  # try the next candidate (e.g. no fp16 variant)
                        continue
            except Exception as exc:
                if not local_only:
                    log.warning("download of %s failed: %s", spec.repo, exc)
    where = Path(models_dir) / spec.repo if models_dir is not None else Path("<models-dir>") / spec.repo
    gated = (f"; accept the model's licence on https://huggingface.co/{spec.repo} and run `hf auth login` first"
             if spec.gated else "")
    raise MissingWeightsError(
        f"missing weights {where / spec.rel(spec.weights[0])} (not in the Hugging Face cache and not "
        f"downloadable now); download them with: {download_command(spec, models_dir)} "
        f"(or `huggingface-cli download` with the same arguments on huggingface_hub < 1.0){gated}")


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file is a :class:`CheckpointError` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise CheckpointError(f"cannot read weight file {path}: {exc} (the file is corrupt or incomplete; "
                              f"delete it and download it again)") from None


def read_config(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read model config {path}: {exc} (download it again)") from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                     ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if k not in ignore}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or mismatched:
        raise key_mismatch_error(f"weight file {path}", missing, unexpected,
                                 [f"{k} {got[k]} != {expected[k]}" for k in mismatched])


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, *,
                   dtype: torch.dtype, device: torch.device, ignore: tuple[str, ...] = ()) -> torch.nn.Module:
    """Check ``state`` against a meta-device ``model``, then assign it (cast to dtype, on device).

    Non-persistent buffers (absent from files) must be rebuilt by the caller before this call; any
    tensor still on the meta device afterwards is an error.
    """
    check_state_dict(model, state, path, ignore)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in state.items() if k not in ignore}
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"weight file {path} left {len(leftover)} tensors unset ({', '.join(leftover[:3])})")
    return model.eval().requires_grad_(False)
