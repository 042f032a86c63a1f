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
from ex4d.weights_common import MissingWeight, check_tensor_values, first_line, hub_unreachable, offline_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """One model inside a Hub repository: its folder, config and weight-file candidates (preferred first)."""

    repo: str
    subfolder: str
    config: str  # "" for a single-file checkpoint (VDA's .pth): the weight file then stands in the config's place
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


#: Video Depth Anything: (variant, metric) -> (Hub repository, file, licence). vda-spec.md section 1.
VDA_FILES = {
    ("small", False): ("depth-anything/Video-Depth-Anything-Small", "video_depth_anything_vits.pth", "Apache-2.0"),
    ("base", False): ("depth-anything/Video-Depth-Anything-Base", "video_depth_anything_vitb.pth", "CC-BY-NC-4.0"),
    ("large", False): ("depth-anything/Video-Depth-Anything-Large", "video_depth_anything_vitl.pth", "CC-BY-NC-4.0"),
    ("small", True): ("depth-anything/Metric-Video-Depth-Anything-Small", "metric_video_depth_anything_vits.pth",
                      "Apache-2.0"),
    ("base", True): ("depth-anything/Metric-Video-Depth-Anything-Base", "metric_video_depth_anything_vitb.pth",
                     "CC-BY-NC-4.0"),
    ("large", True): ("depth-anything/Metric-Video-Depth-Anything-Large", "metric_video_depth_anything_vitl.pth",
                      "CC-BY-NC-4.0"),
}
#: ``--depth`` names of Video Depth Anything -> (variant, metric)
VDA_NAMES = {"vda": ("small", False), "vda-base": ("base", False), "vda-large": ("large", False),
             "vda-metric": ("small", True), "vda-metric-base": ("base", True), "vda-metric-large": ("large", True)}


def vda_file(variant: str = "small", metric: bool = False) -> WeightFile:
    """The single ``.pth`` of a Video Depth Anything model (no config file: the size is in the file name)."""
    repo, name, _ = VDA_FILES[(variant, bool(metric))]
    return WeightFile(repo, "", "", (name,), files=(name,))


def download_command(spec: WeightFile, models_dir: str | os.PathLike | None) -> str:
    """The ``hf download`` command that fills ``<models_dir>/<repo>`` (``huggingface-cli download`` takes
    the same arguments in huggingface_hub < 1.0)."""
    target = f"{models_dir or 'MODELS'}/{spec.repo}"
    files = "".join(f" {p}" for p in spec.files)
    return f"hf download {spec.repo}{files} --local-dir {target}"


def _offline() -> bool:
    return offline_env()


def _pick(folder: Path, spec: WeightFile) -> tuple[Path, Path] | None:
    config = folder / spec.rel(spec.config) if spec.config else None
    if config is not None and not config.is_file():
        return None
    for name in spec.weights:
        if (folder / spec.rel(name)).is_file():
            return config or folder / spec.rel(name), folder / spec.rel(name)
    return None


def _hf_hub_download():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers/transformers
        return None
    return hf_hub_download


def _fetch(spec: WeightFile, local_only: bool) -> tuple[Path, Path] | None:
    """(config, weights) from the Hugging Face cache (``local_only``) or the Hub; None if not there."""
    hf_hub_download = _hf_hub_download()
    if hf_hub_download is None:
        return None
    config = None
    if spec.config:
        try:
            config = hf_hub_download(spec.repo, spec.rel(spec.config), local_files_only=local_only)
        except Exception as exc:
            if not local_only:
                log.warning("download of %s failed: %s", spec.repo, first_line(exc))
            return None
    for name in spec.weights:
        try:
            weights = Path(hf_hub_download(spec.repo, spec.rel(name), local_files_only=local_only))
            return Path(config) if config else weights, weights
        except Exception as exc:  # try the next candidate (e.g. no fp16 variant)
            if not local_only and not spec.config:
                log.warning("download of %s failed: %s", spec.repo, first_line(exc))
            continue
    return None


def locate(spec: WeightFile, models_dir: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """(config path, weight path) of ``spec`` on this machine (``models_dir``, then the Hugging Face
    cache), or None. Never touches the network."""
    if models_dir is not None:
        found = _pick(Path(models_dir).expanduser() / spec.repo, spec)
        if found:
            return found
    return _fetch(spec, local_only=True)


def _where(spec: WeightFile, models_dir) -> Path:
    return Path(models_dir) / spec.repo if models_dir is not None else Path("<models-dir>") / spec.repo


def _models_dir_hint(spec: WeightFile, models_dir) -> str:
    """A hint when ``--models-dir`` names a repository folder itself (MODELS/tencent/DepthCrafter)."""
    if models_dir is None:
        return ""
    md = Path(models_dir).expanduser()
    if md.as_posix().rstrip("/").endswith(spec.repo) or _pick(md, spec) is not None:
        parent = md
        for _ in spec.repo.split("/"):
            parent = parent.parent
        return (f"; --models-dir must be the folder that holds {spec.repo}/, not the repository folder itself "
                f"(try --models-dir {parent})")
    return ""


def resolve(spec: WeightFile, models_dir: str | os.PathLike | None = None, *,
            allow_download: bool = True) -> tuple[Path, Path]:
    """Return (config path, weight path) for ``spec`` or raise :class:`MissingWeightsError`.

    Looks in ``models_dir``, then the Hugging Face cache, then downloads, unless ``allow_download``
    is False or the Hub is unreachable (checked once, quickly: :func:`ex4d.weights_common.hub_unreachable`;
    no request is sent to a Hub that does not answer).
    """
    found = locate(spec, models_dir)
    if found:
        return found
    unreachable = hub_unreachable() if allow_download else None
    if allow_download and unreachable is None:
        found = _fetch(spec, local_only=False)
        if found:
            return found
    where = _where(spec, models_dir)
    why = (f"not in the Hugging Face cache, and the Hub is unreachable ({unreachable})" if unreachable
           else "not in the Hugging Face cache and not downloadable now")
    gated = (f"; accept the model's licence on https://huggingface.co/{spec.repo} and run `hf auth login` first"
             if spec.gated else "")
    raise MissingWeightsError(
        f"missing weights {where / spec.rel(spec.weights[0])} ({why}); download them with: "
        f"{download_command(spec, models_dir)} "
        f"(or `huggingface-cli download` with the same arguments on huggingface_hub < 1.0){gated}"
        f"{_models_dir_hint(spec, models_dir)}")


#: Approximate download sizes in GB (the files the download commands fetch).
SIZES_GB = {
    "tencent/DepthCrafter": 3.05,
    "stabilityai/stable-video-diffusion-img2vid-xt": 1.46,  # fp16 VAE 0.2 + fp16 CLIP image encoder 1.26
    DEPTH_ANYTHING_REPOS["small"]: 0.1,
    DEPTH_ANYTHING_REPOS["base"]: 0.39,
    DEPTH_ANYTHING_REPOS["large"]: 1.34,
    VDA_FILES[("small", False)][0]: 0.12,
    VDA_FILES[("base", False)][0]: 0.46,
    VDA_FILES[("large", False)][0]: 1.54,
    # the metric files' sizes are not published; same architecture and fp32, so the same sizes
    VDA_FILES[("small", True)][0]: 0.12,
    VDA_FILES[("base", True)][0]: 0.46,
    VDA_FILES[("large", True)][0]: 1.54,
}


def estimator_files(estimator: str, variant: str = "small") -> list[tuple[str, list[WeightFile]]]:
    """The weight files an estimator name needs, grouped per download: [(what, [WeightFile, ...])].

    Unknown names and depth files give [] (:func:`ex4d.depth.get_estimator` reports a bad name).
    """
    key = str(estimator).lower().replace("_", "-")
    if Path(str(estimator)).suffix.lower() in (".npz", ".npy"):
        return []
    if key == "depthcrafter":
        return [("DepthCrafter UNet", [DEPTHCRAFTER_UNET]),
                ("Stable Video Diffusion VAE and image encoder (for DepthCrafter)", [SVD_VAE, SVD_IMAGE_ENCODER])]
    if key in ("depth-anything", "depth-anything-v2", "depthanything") and variant in DEPTH_ANYTHING_REPOS:
        return [(f"Depth Anything V2 {variant.capitalize()}", [depth_anything_file(variant)])]
    if key in VDA_NAMES:
        size, metric = VDA_NAMES[key]
        what = f"{'Metric-' if metric else ''}Video-Depth-Anything-{size.capitalize()}"
        return [(what, [vda_file(size, metric)])]
    return []


def estimator_weight_paths(estimator: str, models_dir: str | os.PathLike | None = None) -> list[str]:
    """The config and weight files the estimator ``estimator`` would load now (``models_dir``, then the
    Hugging Face cache; nothing is downloaded), as paths; an absent one is named ``missing weights ...``.

    This is the estimator's identity for reuse checks: a cached depth made with other weights is stale.
    """
    files: list[str] = []
    for _, specs in estimator_files(estimator):
        for weight in specs:
            found = locate(weight, models_dir)
            paths = list(dict.fromkeys(str(p) for p in found)) if found else None  # config-less: one file
            files += paths if paths else [f"missing weights {weight.repo}/{weight.subfolder}"]
    return files


def missing_depth_weights(estimator: str | None, models_dir: str | os.PathLike | None = None, *,
                          variant: str = "small", allow_download: bool = True,
                          suggest_dir: str | os.PathLike = "MODELS") -> list[MissingWeight]:
    """Every download the depth estimator ``estimator`` needs that is not on this machine (no network).

    Each item is marked ``auto`` when :func:`resolve` would download it by itself (``allow_download``
    and not ``HF_HUB_OFFLINE``); whether the Hub answers is for the caller to ask. Paths and
    commands name ``models_dir``, or ``suggest_dir`` when there is none.
    """
    if not estimator:
        return []
    out = []
    for what, specs in estimator_files(estimator, variant):
        absent = [spec for spec in specs if locate(spec, models_dir) is None]
        if not absent:
            continue
        spec = specs[0]
        gated = (f"accept the licence on https://huggingface.co/{spec.repo} and run `hf auth login` first"
                 if spec.gated else "")
        target = models_dir if models_dir is not None else suggest_dir
        out.append(MissingWeight(
            what=what, repo=spec.repo, paths=[str(_where(s, target) / s.rel(s.weights[0])) for s in absent],
            command=download_command(spec, target), size_gb=SIZES_GB.get(spec.repo, 0.0),
            auto=allow_download and not offline_env(), note=gated))
    return out


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file is a :class:`CheckpointError` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise CheckpointError(f"cannot read weight file {path}: {first_line(exc)} (the file is corrupt or "
                              f"incomplete; delete it and download it again)") from None


def read_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read model config {path}: {first_line(exc)} (download it again)") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"model config {path} is not a JSON object (found {type(config).__name__}); "
                              f"download it again")
    return config


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
    model_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    check_tensor_values({k: v for k, v in state.items() if k not in ignore}, f"weight file {path}", model_dtypes)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in state.items() if k not in ignore}
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"weight file {path} left {len(leftover)} tensors unset ({', '.join(leftover[:3])})")
    return model.eval().requires_grad_(False)
