"""On-disk cache of the umT5 prompt embeddings, so that later runs never load the 5.7B text encoder.

EX-4D samples with a fixed prompt and negative prompt. Their embeddings, (1, 512, 4096) each, are
stored once as safetensors files and read back bit for bit; a run whose embeddings are all cached
loads no text encoder (and no tokenizer) at all: less load time, host RAM and GPU memory.

An entry is keyed by everything its values depend on:

* the prompt text, as given (the pipeline cleans it the same way every time);
* the text length (512) and the version of this format;
* the text encoder's identity: the path, size and modification time (ns) of every file of it and of
  its tokenizer (the T5 ``.pth`` and ``google/umt5-xxl/`` of the original layout, or ``text_encoder/``
  and ``tokenizer/`` of the diffusers layout); a re-downloaded or converted encoder is a new key;
* the compute dtype and device type (bf16 on CUDA, float32 on the CPU), since umT5's output differs
  in the last bits between them.

A key that changed is a miss (recomputed and stored under the new key). Files are
``<cache dir>/<sha256 of the key>.safetensors``; each holds the key as JSON in its metadata and is
checked against it on read. Writes are atomic (:func:`ex4d.io.files.atomic_path`). Only the
true-length rows are stored: the pipeline zeroes the rest, so zero-padding restores the tensor
exactly. Default folder: ``$EX4D_CACHE_DIR/prompt_embeds``, else ``$XDG_CACHE_HOME/ex4d/prompt_embeds``,
else ``~/.cache/ex4d/prompt_embeds``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Bumped when the stored layout or the embedding computation changes.
FORMAT_VERSION = 1
#: ``--prompt-cache`` values that turn the cache off.
OFF = ("off", "none", "no")


def default_cache_dir() -> Path:
    """``$EX4D_CACHE_DIR/prompt_embeds``, else ``$XDG_CACHE_HOME/ex4d/prompt_embeds``, else
    ``~/.cache/ex4d/prompt_embeds``."""
    if os.environ.get("EX4D_CACHE_DIR"):
        return Path(os.environ["EX4D_CACHE_DIR"]).expanduser() / "prompt_embeds"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ex4d" / "prompt_embeds"


def resolve_cache_dir(value: str | os.PathLike | None) -> Path | None:
    """The cache folder for a ``--prompt-cache`` value: None -> the default, ``off`` -> None (no cache)."""
    if value is None:
        return default_cache_dir()
    if str(value).strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def text_encoder_identity(models_dir: str | os.PathLike | None = None, layout: str = "auto") -> dict:
    """Path, size and mtime of every file of the umT5 encoder and its tokenizer that would load now.

    Raises MissingWeightsError when no Wan weights are found (as loading them would).
    """
    from ex4d.diffusion.weights import models_dir as md

    found, folder = md.resolve_wan(models_dir, layout, download=False)
    if found == "original":
        parts = [folder / md.T5_FILE, folder / md.TOKENIZER_DIR]
    else:
        parts = [folder / "text_encoder", folder / "tokenizer"]
    files = []
    for part in parts:
        paths = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
        files.extend(_file_identity(p) for p in paths if p.exists())
    return {"layout": found, "files": files}


def cache_key(prompt: str, *, encoder: dict, text_len: int, dtype: torch.dtype, device_type: str) -> dict:
    """The full key of one prompt's embedding (see the module docstring)."""
    return {"version": FORMAT_VERSION, "prompt": prompt, "text_len": int(text_len), "encoder": encoder,
            "dtype": str(dtype).removeprefix("torch."), "device_type": device_type}


def entry_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return Path(cache_dir) / f"{digest}.safetensors"


def load(cache_dir: str | os.PathLike | None, key: dict) -> torch.Tensor | None:
    """The cached (1, text_len, dim) embedding for ``key``, or None (a miss, or an unreadable entry)."""
    if cache_dir is None:
        return None
    path = entry_path(cache_dir, key)
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored_key = json.loads((handle.metadata() or {}).get("key", "null"))
            rows = handle.get_tensor("embeds")
    except Exception as exc:  # a truncated or foreign file is a miss, recomputed and replaced
        log.warning("prompt cache entry %s unreadable (%s); computing the embedding again", path, exc)
        return None
    if stored_key != json.loads(json.dumps(key)) or rows.ndim != 3 or rows.shape[1] > key["text_len"]:
        log.info("prompt cache entry %s does not match its key; computing the embedding again", path)
        return None
    out = rows.new_zeros(rows.shape[0], key["text_len"], rows.shape[2])
    out[:, : rows.shape[1]] = rows
    return out


def store(cache_dir: str | os.PathLike | None, key: dict, embeds: torch.Tensor) -> Path | None:
    """Write ``embeds`` (1, text_len, dim) for ``key`` atomically; returns the file, or None if the
    cache is off or the folder cannot be written (logged: the run goes on without caching)."""
    if cache_dir is None:
        return None
    from safetensors.torch import save_file

    from ex4d.errors import UserError
    from ex4d.io.files import atomic_path

    embeds = embeds.detach().to("cpu")
    nonzero = embeds.abs().amax(dim=(0, 2)).nonzero()
    length = int(nonzero.max()) + 1 if nonzero.numel() else 0
    path = entry_path(cache_dir, key)
    try:
        with atomic_path(path) as tmp:
            save_file({"embeds": embeds[:, :length].contiguous()}, str(tmp),
                      metadata={"key": json.dumps(key), "format": "ex4d prompt embedding"})
    except (OSError, UserError) as exc:
        log.warning("cannot write the prompt cache entry %s (%s); later runs will encode the prompt again",
                    path, exc)
        return None
    return path


def lookup(cache_dir: Path | None, prompts: dict[str, str], *, encoder: dict, text_len: int, dtype: torch.dtype,
           device_type: str) -> dict[str, torch.Tensor | None]:
    """{name: cached embedding or None} for every ``prompts`` entry (e.g. positive, negative)."""
    return {name: load(cache_dir, cache_key(text, encoder=encoder, text_len=text_len, dtype=dtype,
                                            device_type=device_type))
            for name, text in prompts.items()}
