"""Where the generation weights live: the ``--models-dir`` layout and how a folder is resolved.

Layout of ``--models-dir D`` (each folder is what ``hf download <repo> --local-dir <folder>`` writes)::

    D/Wan-AI/Wan2.1-I2V-14B-480P/              original Wan files (7 DiT shards, T5/CLIP/VAE .pth, google/umt5-xxl/)
    D/Wan-AI/Wan2.1-I2V-14B-480P-Diffusers/    the same model in the diffusers layout
    D/yihouxiang/EX-4D/ex4d.ckpt               the EX-4D adapter (LoRA + CamVidEncoder)
    D/converted/Wan2.1-I2V-14B-480P-Diffusers/ written by ``ex4d convert`` (diffusers layout, safetensors)
    D/converted/EX-4D/adapter.safetensors      written by ``ex4d convert`` (+ adapter_config.json)

Resolution order for each item: ``D``, then the local Hugging Face cache (``local_files_only``),
then a download when allowed and online; for Wan the converted copy comes first, then the
original files, then the -Diffusers repository (:func:`resolve_wan`). Anything
missing raises :class:`MissingWeightsError` (exit 2) naming the missing file and the exact
download command. Nothing here ever falls back to random weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

from ex4d.errors import MissingWeightsError
from ex4d.weights_common import MissingWeight, first_line, hub_unreachable, offline_env

log = logging.getLogger(__name__)

WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-480P"
WAN_DIFFUSERS_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
EX4D_REPO = "yihouxiang/EX-4D"
CONVERTED_DIR = "converted"
CONVERTED_WAN = "Wan2.1-I2V-14B-480P-Diffusers"
CONVERTED_ADAPTER = "EX-4D"

# Original Wan layout (file names from the Wan2.1 release; DiT shards are discovered, not listed).
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_GLOB = "diffusion_pytorch_model*.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"

# Diffusers layout: the sub-folders this project loads.
DIFFUSERS_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")

ADAPTER_CKPT = "ex4d.ckpt"
ADAPTER_SAFETENSORS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Only what the loaders read, so a download never pulls the repos' example videos.
_ALLOW = {
    WAN_REPO: [DIT_GLOB, DIT_INDEX, "config.json", T5_FILE, CLIP_FILE, VAE_FILE, f"{TOKENIZER_DIR}/*"],
    WAN_DIFFUSERS_REPO: ["model_index.json"] + [f"{c}/*" for c in DIFFUSERS_COMPONENTS],
    EX4D_REPO: [ADAPTER_CKPT],
}


def download_command(repo_id: str, models_dir: str | os.PathLike | None = None, filename: str | None = None) -> str:
    """The exact command that fetches ``repo_id`` (or one file of it) into the ``--models-dir`` layout."""
    target = Path(models_dir if models_dir is not None else "models") / repo_id
    file_part = f" {filename}" if filename else ""
    return f"hf download {repo_id}{file_part} --local-dir {target}"


# ------------------------------------------------------------------------------------------
# Completeness checks: each returns the first missing file (relative path) or None.
# ------------------------------------------------------------------------------------------

def _index_files(index: Path) -> list[str]:
    """The shard file names a ``*.safetensors.index.json`` lists; a damaged index is a CheckpointError."""
    from ex4d.errors import CheckpointError

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {type(exc).__name__}: {first_line(exc)} "
                              f"(damaged? delete it and download it again)") from None
    if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
        raise CheckpointError(f"the shard index {index} names files outside its folder or non-strings; "
                              f"delete it and download it again")
    return names


def dit_shards(folder: Path) -> list[Path]:
    """The DiT shard files of an original Wan folder: from the index json if present, else by glob.

    Shards that the index (or a ``-k-of-N`` name) promises but that are absent are still returned,
    so that :func:`missing_original` can name them.
    """
    index = folder / DIT_INDEX
    if index.is_file():
        return [folder / name for name in _index_files(index)]
    shards = sorted(folder.glob(DIT_GLOB))
    # "-0000k-of-0000N" names tell how many there must be even without the index.
    for shard in shards:
        m = re.search(r"-(\d+)-of-(\d+)\.safetensors$", shard.name)
        if m:
            n, width = int(m.group(2)), len(m.group(2))
            stem = shard.name[: m.start()]
            return [folder / f"{stem}-{i:0{width}d}-of-{n:0{width}d}.safetensors" for i in range(1, n + 1)]
    return shards


def missing_original(folder: Path) -> str | None:
    """First missing file of an original Wan I2V folder, or None when complete."""
    if not folder.is_dir():
        return DIT_GLOB
    shards = dit_shards(folder)
    if not shards:
        return "diffusion_pytorch_model-00001-of-00007.safetensors"
    for shard in shards:
        if not shard.is_file():
            return shard.name
    for name in (T5_FILE, CLIP_FILE, VAE_FILE):
        if not (folder / name).is_file():
            return name
    tok = folder / TOKENIZER_DIR
    if not ((tok / "tokenizer.json").is_file() or (tok / "spiece.model").is_file()):
        return f"{TOKENIZER_DIR}/tokenizer.json"
    return None


def missing_diffusers(folder: Path) -> str | None:
    """First missing file of a diffusers-layout Wan I2V folder, or None when complete."""
    if not (folder / "model_index.json").is_file():
        return "model_index.json"
    for component in DIFFUSERS_COMPONENTS:
        sub = folder / component
        if component == "tokenizer":
            if not any((sub / n).is_file() for n in ("tokenizer.json", "spiece.model")):
                return f"{component}/tokenizer.json"
            continue
        config = "preprocessor_config.json" if component == "image_processor" else "config.json"
        if not (sub / config).is_file():
            return f"{component}/{config}"
        if component == "image_processor":
            continue
        indexes = list(sub.glob("*.safetensors.index.json"))
        if indexes:
            for name in _index_files(indexes[0]):
                if not (sub / name).is_file():
                    return f"{component}/{name}"
        elif not list(sub.glob("*.safetensors")) and not list(sub.glob("*.bin")):
            return f"{component}/*.safetensors"
    return None


def adapter_file_in(folder: Path) -> Path | None:
    """The adapter file of a folder: our converted ``adapter.safetensors`` first, then ``ex4d.ckpt``."""
    for name in (ADAPTER_SAFETENSORS, ADAPTER_CKPT):
        if (folder / name).is_file():
            return folder / name
    return None


# ------------------------------------------------------------------------------------------
# Resolution: models dir -> HF cache -> download
# ------------------------------------------------------------------------------------------

def _offline() -> bool:
    """No download now: ``HF_HUB_OFFLINE`` is set, or the Hub does not answer (asked once, quickly)."""
    return offline_env() or hub_unreachable() is not None


def _from_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        # HF_HUB_CACHE is read here, not only at import, so a cache set later (tests, notebooks) counts.
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_ALLOW[repo_id],
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except Exception as exc:  # not cached (LocalEntryNotFoundError) or an unreadable cache
        log.debug("%s not in the Hugging Face cache: %s", repo_id, first_line(exc))
        return None


def _download(repo_id: str, models_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download

    local_dir = models_dir / repo_id if models_dir is not None else None
    log.info("downloading %s%s", repo_id, f" into {local_dir}" if local_dir else " into the Hugging Face cache")
    return Path(snapshot_download(repo_id, local_dir=local_dir, allow_patterns=_ALLOW[repo_id]))


def resolve_repo(repo_id: str, models_dir: str | os.PathLike | None, missing: Callable[[Path], str | None], *,
                 download: bool = False, local_candidates: tuple[Path, ...] = (),
                 command_file: str | None = None) -> Path:
    """Return a complete local folder of ``repo_id``: models dir, then HF cache, then download.

    ``missing(folder)`` names the first missing file of a candidate (None when complete).
    ``local_candidates`` are checked before ``models_dir/repo_id`` (e.g. converted folders).
    Raises :class:`MissingWeightsError` naming the missing file and the download command.
    """
    models_dir = Path(models_dir).expanduser() if models_dir is not None else None
    first_missing: tuple[Path, str] | None = None
    candidates = list(local_candidates) + ([models_dir / repo_id] if models_dir is not None else [])
    for folder in candidates:
        what = missing(folder)
        if what is None:
            return folder
        if folder.exists():  # the last one (the download folder) is the one worth naming
            first_missing = (folder, what)
    cached = _from_cache(repo_id)
    if cached is not None:
        what = missing(cached)
        if what is None:
            return cached
        log.debug("cached %s is incomplete (%s missing)", repo_id, what)
    offline_note = ""
    if download and _offline():
        offline_note = f"; nothing was downloaded ({hub_unreachable() or 'HF_HUB_OFFLINE is set'})"
    if download and not _offline():
        try:
            folder = _download(repo_id, models_dir)
        except Exception as exc:  # network or auth failure: fall through to the one-line error
            log.warning("download of %s failed: %s", repo_id, first_line(exc))
        else:
            what = missing(folder)
            if what is None:
                return folder
            first_missing = (folder, what)
    if models_dir is None:
        raise MissingWeightsError(
            f"missing weights: {repo_id} is not in the Hugging Face cache and no --models-dir was given; "
            f"download with: {download_command(repo_id, None, command_file)} and pass --models-dir models"
            f"{offline_note}")
    if first_missing is None:
        where = models_dir / repo_id
        first_missing = (where, missing(where) or "")
    folder, what = first_missing
    raise MissingWeightsError(
        f"missing weights: {folder / what} (not in the Hugging Face cache either); "
        f"download with: {download_command(repo_id, models_dir, command_file)}{offline_note}")


def resolve_wan(models_dir: str | os.PathLike | None = None, layout: str = "auto", *,
                download: bool = False) -> tuple[str, Path]:
    """Find the Wan2.1-I2V-14B-480P weights; returns ``(layout, folder)`` with layout ``original``/``diffusers``.

    ``models_dir`` may also point straight at one layout folder. ``auto`` takes, in order: the
    ``ex4d convert`` output (made from the original files, fast to load), the original files (what
    EX-4D ran with), then the -Diffusers repository (whose text and image encoders diffusers took
    from google/umt5-xxl and laion/CLIP-ViT-H-14 rather than converting Wan's files); it downloads
    the original files only if none is local.
    """
    if layout not in ("auto", "original", "diffusers"):
        raise ValueError(f"layout must be auto, original or diffusers, not {layout!r}")
    md = Path(models_dir).expanduser() if models_dir is not None else None
    if md is not None and md.is_dir():
        if layout in ("auto", "diffusers") and missing_diffusers(md) is None:
            return "diffusers", md
        if layout in ("auto", "original") and missing_original(md) is None:
            return "original", md
    converted = (md / CONVERTED_DIR / CONVERTED_WAN,) if md is not None else ()
    if layout == "diffusers":
        return "diffusers", resolve_repo(WAN_DIFFUSERS_REPO, md, missing_diffusers, download=download,
                                         local_candidates=converted)
    if layout == "original":
        return "original", resolve_repo(WAN_REPO, md, missing_original, download=download)
    for folder in converted:
        if missing_diffusers(folder) is None:
            return "diffusers", folder
    try:
        return "original", resolve_repo(WAN_REPO, md, missing_original, download=False)
    except MissingWeightsError as exc:
        original_missing = exc
    try:
        return "diffusers", resolve_repo(WAN_DIFFUSERS_REPO, md, missing_diffusers, download=False)
    except MissingWeightsError:
        pass
    if download and not _offline():
        return "original", resolve_repo(WAN_REPO, md, missing_original, download=True)
    raise original_missing


def resolve_adapter(models_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None, *,
                    download: bool = False) -> Path:
    """Find the EX-4D adapter file: ``path`` (file or folder), else converted, else ``ex4d.ckpt``."""
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        if path.is_dir() and adapter_file_in(path) is not None:
            return adapter_file_in(path)
        raise MissingWeightsError(
            f"missing adapter weights: {path} (expected ex4d.ckpt or adapter.safetensors); "
            f"download with: {download_command(EX4D_REPO, None, ADAPTER_CKPT)}")
    md = Path(models_dir).expanduser() if models_dir is not None else None
    converted = (md / CONVERTED_DIR / CONVERTED_ADAPTER,) if md is not None else ()

    def missing(folder: Path) -> str | None:
        return None if adapter_file_in(folder) is not None else ADAPTER_CKPT

    folder = resolve_repo(EX4D_REPO, md, missing, download=download, local_candidates=converted,
                          command_file=ADAPTER_CKPT)
    return adapter_file_in(folder)


# ------------------------------------------------------------------------------------------
# Preflight: every missing generation download at once (ex4d.weights_preflight combines stages)
# ------------------------------------------------------------------------------------------

#: Approximate sizes (GB) of what the download commands fetch (from the checkpoint manifests:
#: parameters x stored bytes).
WAN_SIZE_GB = 82.3
WAN_FILE_SIZES_GB = {T5_FILE: 11.4, CLIP_FILE: 4.8, VAE_FILE: 0.5, TOKENIZER_DIR: 0.02}
WAN_DIT_GB = 65.6  # 7 fp32 shards
WAN_DIFFUSERS_DIT_GB = 65.6
ADAPTER_SIZE_GB = 0.4  # 99.8 M parameters (fp32)


def missing_original_files(folder: Path) -> list[str]:
    """Every missing file of an original Wan I2V folder (relative names; [] when complete)."""
    if not folder.is_dir():
        return [f"{DIT_GLOB} (7 shards)", T5_FILE, CLIP_FILE, VAE_FILE, f"{TOKENIZER_DIR}/"]
    out = []
    shards = dit_shards(folder)
    if not shards:
        out.append(f"{DIT_GLOB} (7 shards)")
    out += [shard.name for shard in shards if not shard.is_file()]
    out += [name for name in (T5_FILE, CLIP_FILE, VAE_FILE) if not (folder / name).is_file()]
    tok = folder / TOKENIZER_DIR
    if not ((tok / "tokenizer.json").is_file() or (tok / "spiece.model").is_file()):
        out.append(f"{TOKENIZER_DIR}/tokenizer.json")
    return out


def _original_size_gb(folder: Path, missing: list[str]) -> float:
    shards = dit_shards(folder) if folder.is_dir() else []
    per_shard = WAN_DIT_GB / max(len(shards), 7)
    total = 0.0
    for name in missing:
        if name.startswith("diffusion_pytorch_model"):
            total += WAN_DIT_GB if "*" in name else per_shard
        else:
            total += WAN_FILE_SIZES_GB.get(name.rstrip("/").removesuffix("/tokenizer.json"), 0.0)
    return total


def _wan_folder(md: Path | None) -> Path:
    """The folder the original Wan files are expected in: ``md`` itself when it already looks like
    one (shards or their index inside), else ``md/Wan-AI/Wan2.1-I2V-14B-480P``."""
    if md is not None and md.is_dir() and ((md / DIT_INDEX).is_file() or any(md.glob(DIT_GLOB))):
        return md
    return (md if md is not None else Path("models")) / WAN_REPO


def missing_wan(models_dir: str | os.PathLike | None = None, layout: str = "auto") -> list[MissingWeight]:
    """[] if Wan2.1-I2V-14B-480P is on this machine for ``layout`` (no network), else one item naming
    every missing file of the original layout (or the -Diffusers one for ``layout="diffusers"``)."""
    try:
        resolve_wan(models_dir, layout, download=False)
        return []
    except MissingWeightsError:
        pass
    md = Path(models_dir).expanduser() if models_dir is not None else None
    base = md if md is not None else Path("models")
    if layout == "diffusers":
        folder = base / WAN_DIFFUSERS_REPO
        first = missing_diffusers(folder) if folder.is_dir() else None
        return [MissingWeight(
            what="Wan2.1-I2V-14B-480P (diffusers layout)", repo=WAN_DIFFUSERS_REPO,
            paths=[str(folder / first) if first else f"{folder}/ (the whole repository)"],
            command=download_command(WAN_DIFFUSERS_REPO, base), size_gb=WAN_DIFFUSERS_DIT_GB,
            note="the DiT alone; the repository holds a little more")]
    folder = _wan_folder(md)
    names = missing_original_files(folder)
    whole = not folder.is_dir()
    size = WAN_SIZE_GB if whole else _original_size_gb(folder, names)
    note = ""
    diffusers = base / WAN_DIFFUSERS_REPO
    if layout == "auto" and diffusers.is_dir():
        note = f"or complete {diffusers} (missing {missing_diffusers(diffusers)})"
    return [MissingWeight(
        what="Wan2.1-I2V-14B-480P", repo=WAN_REPO,
        paths=[f"{folder}/ (the whole repository)"] if whole else [str(folder / n) for n in names],
        command=(download_command(WAN_REPO, base) if folder == base / WAN_REPO
                 else f"hf download {WAN_REPO} --local-dir {folder}"),
        size_gb=size, note=note)]


def missing_adapter(models_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None
                    ) -> list[MissingWeight]:
    """[] if the EX-4D adapter (``path``, else found in ``models_dir``/the cache) is here, else one item."""
    try:
        resolve_adapter(models_dir, path)
        return []
    except MissingWeightsError:
        pass
    md = Path(models_dir).expanduser() if models_dir is not None else Path("models")
    where = Path(path).expanduser() if path is not None else md / EX4D_REPO / ADAPTER_CKPT
    target = md if path is None else Path("models")
    return [MissingWeight(what="EX-4D adapter (LoRA + CamVidEncoder)", repo=EX4D_REPO, paths=[str(where)],
                          command=download_command(EX4D_REPO, target, ADAPTER_CKPT), size_gb=ADAPTER_SIZE_GB,
                          note="then pass --adapter with the downloaded file" if path is not None else "")]
