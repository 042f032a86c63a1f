"""``ex4d convert``: original Wan files + ``ex4d.ckpt`` -> diffusers layout + ``adapter.safetensors``.

The converted folders load with plain ``from_pretrained`` (safetensors, memory-mapped, no key
renaming), so later runs start faster. The DiT is converted shard by shard (pure renames, one
tensor in memory at a time), so converting the 65 GB fp32 release needs no more RAM than its
largest tensor; T5/CLIP/VAE are memory-mapped and saved with ``save_pretrained``.

Output (``-o OUT``, default ``MODELS_DIR/converted``)::

    OUT/Wan2.1-I2V-14B-480P-Diffusers/{model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
                                       image_encoder/, image_processor/}
    OUT/EX-4D/{adapter.safetensors, adapter_config.json, ex4d.ckpt}

Everything is written into a temporary folder beside the target and renamed at the end, so an
interrupted conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ex4d.diffusion.weights import models_dir as md
from ex4d.diffusion.weights import keymaps as km
from ex4d.diffusion.weights.wan import (
    check_keys,
    dit_config_from_original,
    iter_safetensors,
    load_clip_original,
    load_t5_original,
    load_tokenizer,
    load_vae_original,
    make_image_processor,
    safetensors_shapes,
)
from ex4d.errors import InputError

log = logging.getLogger(__name__)

MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def _model_index() -> dict:
    import diffusers

    return dict(MODEL_INDEX, _diffusers_version=diffusers.__version__)


def save_diffusers_layout(components: dict, folder: str | Path, *, max_shard_size: str = "5GB") -> Path:
    """Save loaded components (``load_wan_components``'s dict) in the diffusers repository layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "image_encoder"):
        if name in components:
            components[name].save_pretrained(str(folder / name), safe_serialization=True,
                                             max_shard_size=max_shard_size)
    for name in ("tokenizer", "image_processor"):
        if name in components:
            components[name].save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
    return folder


def convert_dit_shards(src: Path, dst: Path, *, dtype: torch.dtype | None = torch.bfloat16,
                       progress: Callable | None = None) -> int:
    """Stream the original DiT shards into ``dst`` as a diffusers ``transformer/`` folder.

    One output shard per input shard, keys renamed with diffusers' converter, cast to ``dtype``
    (None keeps the stored dtype). The full key set is checked against the model (meta device)
    before any data is read. Returns the number of tensors written.
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    shards = md.dit_shards(src)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(safetensors_shapes(shard))
    hub = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    config = dit_config_from_original(shapes, hub)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, {km.dit_key_to_diffusers(k): s for k, s in shapes.items()}, f"DiT shards in {src}",
               km.dit_key_to_original)
    dst.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(progress(shards) if progress else shards):
        name = f"{_DIFFUSERS_WEIGHTS}-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else f"{_DIFFUSERS_WEIGHTS}.safetensors"
        part = {km.dit_key_to_diffusers(k): t.contiguous() for k, t in iter_safetensors(shard, dtype=dtype)}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total_size += sum(t.numel() * t.element_size() for t in part.values())
        del part
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / f"{_DIFFUSERS_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.save_config(str(dst))  # config.json exactly as save_pretrained writes it
    return len(weight_map)


def _dit_config_near(folder: Path) -> dict | None:
    """The DiT config of an original folder (to check the adapter against), or None = the 14B default."""
    if md.missing_original(folder) is not None:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in md.dit_shards(folder):
        shapes.update(safetensors_shapes(shard))
    hub = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    return dit_config_from_original(shapes, hub)


def convert_models_dir(models_dir: str | Path, out: str | Path | None = None, *,
                       dtype: torch.dtype | None = torch.bfloat16, adapter: bool = True, wan: bool = True,
                       progress: Callable | None = None) -> dict[str, Path]:
    """Convert the original files under ``models_dir`` (see :mod:`ex4d.diffusion.weights.models_dir`).

    ``dtype`` applies to the DiT, T5 and CLIP (the VAE is kept in float32; it is small and the
    loaders cast at load time); None keeps stored dtypes. Refuses to overwrite existing outputs.
    Returns ``{"wan": folder, "adapter": folder}`` for what was written.
    """
    from ex4d.diffusion.weights.adapter import load_ex4d_adapter, save_ex4d_adapter

    models_dir = Path(models_dir).expanduser()
    out = Path(out).expanduser() if out is not None else models_dir / md.CONVERTED_DIR
    targets = {}
    if wan:
        targets["wan"] = out / md.CONVERTED_WAN
    if adapter:
        targets["adapter"] = out / md.CONVERTED_ADAPTER
    for target in targets.values():
        if target.exists():
            raise InputError(f"output already exists: {target} (delete it or choose another -o)")
    # Resolve every input first, so a missing file fails before hours of work (exit 2).
    src_wan = md.resolve_repo(md.WAN_REPO, models_dir, md.missing_original) if wan else None
    src_adapter = md.resolve_adapter(models_dir) if adapter else None

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ex4d-convert-", dir=out))
    written: dict[str, Path] = {}
    try:
        if src_wan is not None:
            staged = tmp / md.CONVERTED_WAN
            log.info("converting DiT shards from %s", src_wan)
            convert_dit_shards(src_wan, staged / "transformer", dtype=dtype, progress=progress)
            for name, loader, path in (("text_encoder", load_t5_original, md.T5_FILE),
                                       ("image_encoder", load_clip_original, md.CLIP_FILE),
                                       ("vae", load_vae_original, md.VAE_FILE)):
                log.info("converting %s", path)
                model = loader(src_wan / path, torch_dtype=torch.float32 if name == "vae" else dtype)
                model.save_pretrained(str(staged / name), safe_serialization=True, max_shard_size="5GB")
                if name == "image_encoder":
                    make_image_processor(model.config.image_size).save_pretrained(str(staged / "image_processor"))
                del model
            load_tokenizer(src_wan / md.TOKENIZER_DIR).save_pretrained(str(staged / "tokenizer"))
            (staged / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
            (staged / "ex4d_converted_from.json").write_text(json.dumps(
                {"source": str(src_wan), "repo": md.WAN_REPO, "dtype": str(dtype)}, indent=2))
        if src_adapter is not None:
            config = _dit_config_near(src_wan or models_dir / md.WAN_REPO)
            weights = load_ex4d_adapter(src_adapter, transformer_config=config)
            save_ex4d_adapter(tmp / md.CONVERTED_ADAPTER, weights, transformer_config=config)
        for key, target in targets.items():
            staged = tmp / target.name
            os.replace(staged, target)
            written[key] = target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
