"""Load Wan2.1-I2V-14B-480P into diffusers/transformers classes, from either on-disk layout.

* Original Wan layout (``Wan-AI/Wan2.1-I2V-14B-480P``): DiT shards -> ``WanTransformer3DModel``,
  T5 ``.pth`` -> ``UMT5EncoderModel``, CLIP ``.pth`` -> ``CLIPVisionModel``, VAE ``.pth`` ->
  ``AutoencoderKLWan``, ``google/umt5-xxl/`` -> tokenizer. Configs are read from the tensor shapes
  (and the DiT's ``config.json`` for the head count), so the same code loads the 14B model and the
  tiny test models. Models are built with empty (meta) parameters and the mapped tensors are
  assigned, so the peak memory is one copy of the weights in the target dtype.
* Diffusers layout (``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` or ``ex4d convert`` output):
  ``from_pretrained(subfolder=...)`` with ``local_files_only`` and the loading info checked.

Every load is strict or counted: a missing, unexpected or wrongly shaped key raises
:class:`CheckpointError` naming the key and the file; a corrupt/truncated file raises it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ex4d.diffusion.weights import models_dir as md
from ex4d.diffusion.weights import keymaps as km
from ex4d.errors import CheckpointError, MissingWeightsError, key_mismatch_error
from ex4d.weights_common import check_tensor_values, first_line

log = logging.getLogger(__name__)

# Unexpected keys that a diffusers-layout component may carry and we deliberately drop (counted):
# the image encoder may be saved as CLIPVisionModelWithProjection.
_ALLOWED_UNEXPECTED = {"image_encoder": ("visual_projection.",), "text_encoder": ("decoder.", "lm_head.")}


# ------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------

def _redownload_hint(path: Path) -> str:
    return f"delete {path.name} and download it again (docs/models.md)"


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a flat ``{name: tensor}`` file, memory-mapped when possible.

    Raises :class:`CheckpointError` for a truncated/corrupt file or one that is not a flat tensor dict.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MissingWeightsError(f"cannot open weight file {path}: {exc.strerror or first_line(exc)}; "
                                  f"{_redownload_hint(path)}") from None
    if size == 0:
        raise CheckpointError(f"weight file {path} is empty (0 bytes; an interrupted download?); "
                              f"{_redownload_hint(path)}")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors of truncated files come in many types
        raise CheckpointError(f"cannot read {path}: corrupt or truncated ({type(exc).__name__}: "
                              f"{first_line(exc)}); {_redownload_hint(path)}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} is not a flat {{name: tensor}} state dict "
                              f"(found {type(state).__name__}); is it the right file?")
    return state


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors header only (no tensor data read)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file "
                              f"({first_line(exc)}); {_redownload_hint(path)}") from None


def iter_safetensors(path: str | Path, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time (cast to ``dtype``), so peak memory stays one tensor."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                yield key, tensor
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file "
                              f"({first_line(exc)}); {_redownload_hint(path)}") from None


def fp32_modules(cls, dtype: torch.dtype | None) -> tuple[str, ...]:
    """Module names that ``cls.from_pretrained(torch_dtype=dtype)`` keeps in float32.

    Mirrors diffusers (``_keep_in_fp32_modules`` for any reduced dtype; Wan's time embedder,
    modulation tables and norms) and transformers (``_keep_in_fp32_modules`` only for fp16, the
    ``_strict`` list for fp16 and bf16), so both layouts give the same per-parameter dtypes.
    """
    if dtype is None or dtype == torch.float32:
        return ()
    names = list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    keep = list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    is_transformers = cls.__module__.startswith("transformers.")
    if not is_transformers or dtype == torch.float16:
        names += keep
    return tuple(names)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None, keep_fp32: tuple[str, ...] = ()) -> dict:
    """Cast floating tensors to ``dtype``, except those under a ``keep_fp32`` module (kept float32)."""
    if dtype is None:
        return state
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            v = v.to(torch.float32 if keep_fp32 and any(m in k.split(".") for m in keep_fp32) else dtype)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------
# Strict assignment into an empty model
# ------------------------------------------------------------------------------------------

def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str,
               file_name: Callable[[str], str | None] | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``found`` has exactly the ``expected`` keys and shapes.

    ``file_name`` maps a model key back to the key as stored in the file, so that messages name
    what the user can find in the file (e.g. ``blocks.1.ffn.fc2.weight (= encoder.block.1...wo.weight)``).
    """
    def show(keys: list[str]) -> list[str]:
        out = []
        for k in keys[:3]:
            try:
                original = file_name(k) if file_name else None
            except KeyError:
                original = None
            out.append(f"{original} (= {k})" if original and original != k else k)
        return out

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {show(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {show(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatch(es), e.g. {show([k])[0]}: file {list(found[k])} "
                        f"vs model {list(expected[k])}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems)
                              + " (wrong or damaged file? see docs/models.md)")


def _file_key(key: str, file_name: Callable[[str], str | None] | None) -> str:
    """``key`` as the file stores it (``file (= model)`` when the names differ), for messages."""
    try:
        original = file_name(key) if file_name else None
    except KeyError:
        original = None
    return f"{original} (= {key})" if original and original != key else key


@contextlib.contextmanager
def _empty_weights() -> Iterator[None]:
    """Build modules with meta parameters but real buffers (e.g. the RoPE tables, which are not saved)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def assign_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                      file_name: Callable[[str], str | None] | None = None) -> torch.nn.Module:
    """Strictly assign ``state`` into ``model`` (built with empty weights); raise on any mismatch.

    Integer/bool tensors where the model holds floats, and NaN/inf values, are errors naming the
    tensor (as stored in the file, via ``file_name``).
    """
    model_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, source, file_name)
    check_tensor_values(((_file_key(k, file_name), v) for k, v in state.items()), source,
                        {_file_key(k, file_name): v.dtype for k, v in model_state.items()})
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen after a strict load; guards against random-weight fallbacks
        raise CheckpointError(f"{source}: parameters left uninitialised: {left[:3]}")
    return model


# ------------------------------------------------------------------------------------------
# Configs read from tensor shapes
# ------------------------------------------------------------------------------------------

def _count_blocks(keys: Iterable[str], pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


#: Text tokens per prompt. diffusers' Wan attention takes the first ``len - 512`` context tokens as
#: the image's and the rest as the text's (a constant in ``WanAttnProcessor``), and the pipeline pads
#: every prompt to this length, so a DiT whose config asks for another length cannot be run correctly.
TEXT_LENGTH = 512


def check_text_length(config: dict | None, source) -> None:
    """Refuse a DiT config whose text length (Wan's ``text_len``) is not :data:`TEXT_LENGTH`."""
    if not config:
        return
    for key in ("text_len", "text_length", "max_text_len"):
        if key in config and config[key] is not None:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value != TEXT_LENGTH:
                raise CheckpointError(
                    f"{source}: {key} is {value!r}, but diffusers' Wan attention splits image from text tokens "
                    f"at a fixed {TEXT_LENGTH} and ex4d pads prompts to {TEXT_LENGTH}; only {key} {TEXT_LENGTH} "
                    f"(Wan2.1-I2V-14B-480P's) is supported; is it the right model?")


def dit_config_from_original(shapes: dict[str, tuple[int, ...]], hub_config: dict | None = None,
                             source: str = "the DiT config.json") -> dict:
    """``WanTransformer3DModel`` config from original DiT key shapes (+ Wan's ``config.json`` for heads)."""
    hub_config = hub_config or {}
    if not isinstance(hub_config, dict):
        raise CheckpointError(f"{source} is not a JSON object; download it again")
    check_text_length(hub_config, source)
    try:
        dim, in_ch, *patch = shapes["patch_embedding.weight"]
        heads = hub_config.get("num_heads") or (dim // 128 if dim % 128 == 0 else None)
        if not heads:
            raise CheckpointError("the DiT folder has no config.json with num_heads; cannot infer the head count")
        cfg = dict(
            patch_size=tuple(patch), num_attention_heads=int(heads), attention_head_dim=dim // int(heads),
            in_channels=in_ch, out_channels=shapes["head.head.weight"][0] // math.prod(patch),
            text_dim=shapes["text_embedding.0.weight"][1], freq_dim=shapes["time_embedding.0.weight"][1],
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_layers=_count_blocks(shapes, r"blocks\.(\d+)\."),
            cross_attn_norm="blocks.0.norm3.weight" in shapes, qk_norm="rms_norm_across_heads",
            eps=float(hub_config.get("eps", 1e-6)),
            image_dim=shapes["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in shapes else None,
            added_kv_proj_dim=dim if "blocks.0.cross_attn.k_img.weight" in shapes else None,
            rope_max_seq_len=1024, pos_embed_seq_len=None,
        )
    except KeyError as exc:
        raise CheckpointError(f"the DiT shards lack {exc.args[0]}: not a Wan2.1 WanModel checkpoint") from None
    return cfg


def vae_config_from_original(shapes: dict[str, tuple[int, ...]]) -> dict:
    try:
        return dict(km.VAE_CONFIG, base_dim=shapes["encoder.conv1.weight"][0], z_dim=shapes["conv2.weight"][0])
    except KeyError as exc:
        raise CheckpointError(f"the VAE file lacks {exc.args[0]}: not a Wan2.1 VAE checkpoint") from None


def t5_config_from_original(shapes: dict[str, tuple[int, ...]]) -> dict:
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        n = _count_blocks(shapes, r"blocks\.(\d+)\.")
        return dict(km.T5_CONFIG, vocab_size=vocab, d_model=d_model, num_heads=heads, num_layers=n,
                    num_decoder_layers=n, d_kv=shapes["blocks.0.attn.q.weight"][0] // heads,
                    d_ff=shapes["blocks.0.ffn.fc1.weight"][0], relative_attention_num_buckets=buckets)
    except KeyError as exc:
        raise CheckpointError(f"the T5 file lacks {exc.args[0]}: not a Wan2.1 umT5 encoder checkpoint") from None


def clip_config_from_original(shapes: dict[str, tuple[int, ...]]) -> dict:
    """CLIP vision config; heads = width / 80 (ViT-H/14's head width; not stored in the file)."""
    try:
        width, _, patch, _ = shapes["visual.patch_embedding.weight"]
        grid = math.isqrt(shapes["visual.pos_embedding"][1] - 1)
        return dict(km.CLIP_VISION_CONFIG, hidden_size=width, num_attention_heads=max(1, width // 80),
                    intermediate_size=shapes["visual.transformer.0.mlp.0.weight"][0], patch_size=patch,
                    image_size=grid * patch, num_hidden_layers=_count_blocks(shapes, r"visual\.transformer\.(\d+)\."),
                    projection_dim=shapes["visual.head"][1] if "visual.head" in shapes else width)
    except KeyError as exc:
        raise CheckpointError(f"the CLIP file lacks {exc.args[0]}: not Wan2.1's open-clip XLM-RoBERTa ViT-H/14") from None


# ------------------------------------------------------------------------------------------
# Original-layout loaders
# ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {first_line(exc)} "
                              f"(damaged? delete it and download it again)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object (found {type(data).__name__}); download it again")
    return data


def original_dit_config(folder: str | Path) -> dict:
    """The ``WanTransformer3DModel`` config of an original Wan folder from the shard headers and
    ``config.json`` alone (no tensor read): what the adapter is validated against before loading."""
    folder = Path(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in md.dit_shards(folder):
        shapes.update(safetensors_shapes(shard))
    hub_config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    return dit_config_from_original(shapes, hub_config, str(folder / "config.json"))


def wan_transformer_config(models_dir: str | Path | None = None, layout: str = "auto") -> dict:
    """The DiT config that :func:`load_wan_components` would build, read without loading any weight."""
    found, folder = md.resolve_wan(models_dir, layout, download=False)
    if found == "original":
        return original_dit_config(folder)
    config = _read_json(folder / "transformer" / "config.json")
    check_text_length(config, str(folder / "transformer" / "config.json"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_dit_original(folder: str | Path, *, torch_dtype: torch.dtype | None = torch.bfloat16,
                      device: str | torch.device = "cpu"):
    """The DiT shards of an original Wan folder -> ``WanTransformer3DModel`` (strict: all keys, equal shapes)."""
    from diffusers import WanTransformer3DModel

    folder = Path(folder)
    shards = md.dit_shards(folder)
    for shard in shards:
        if not shard.is_file():
            raise MissingWeightsError(f"missing DiT shard {shard}; download with: "
                                      f"{md.download_command(md.WAN_REPO, folder.parent.parent)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(safetensors_shapes(shard))
    hub_config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    config = dit_config_from_original(shapes, hub_config, str(folder / "config.json"))
    keep = fp32_modules(WanTransformer3DModel, torch_dtype)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        for key, tensor in iter_safetensors(shard, device=device):
            name = km.dit_key_to_diffusers(key)
            state.update(_cast({name: tensor}, torch_dtype, keep))
    with _empty_weights():
        model = WanTransformer3DModel.from_config(config)
    assign_state_dict(model, state, f"DiT shards in {folder}", km.dit_key_to_original)
    log.info("loaded Wan DiT from %d shard(s) in %s (%d tensors)", len(shards), folder, len(state))
    return model.to(device).eval()


def load_vae_original(path: str | Path, *, torch_dtype: torch.dtype | None = torch.bfloat16,
                      device: str | torch.device = "cpu"):
    """``Wan2.1_VAE.pth`` -> ``AutoencoderKLWan`` via diffusers' converter (strict)."""
    from diffusers import AutoencoderKLWan

    raw = read_pth(path)
    config = vae_config_from_original({k: tuple(v.shape) for k, v in raw.items()})
    state = {km.vae_key_to_diffusers(k): v for k, v in raw.items()}
    if len(state) != len(raw):
        raise CheckpointError(f"{path}: two VAE keys map to the same diffusers name; not a Wan2.1 VAE file")
    with _empty_weights():
        model = AutoencoderKLWan.from_config(config)
    assign_state_dict(model, _cast(state, torch_dtype, fp32_modules(AutoencoderKLWan, torch_dtype)), str(path),
                      lambda k: km.vae_key_to_original(k, config["num_res_blocks"]))
    return model.to(device).eval()


def load_t5_original(path: str | Path, *, torch_dtype: torch.dtype | None = torch.bfloat16,
                     device: str | torch.device = "cpu"):
    """``models_t5_umt5-xxl-enc-bf16.pth`` -> ``UMT5EncoderModel`` (strict; the embedding is tied)."""
    from transformers import UMT5Config, UMT5EncoderModel

    raw = read_pth(path)
    config = UMT5Config(**t5_config_from_original({k: tuple(v.shape) for k, v in raw.items()}))
    state = {}
    for key, value in raw.items():
        try:
            names = km.t5_key_to_hf(key)
        except KeyError:
            raise CheckpointError(f"{path}: unexpected key {key!r}; not a Wan2.1 umT5 encoder file") from None
        for name in names:
            state[name] = value
    state = _cast(state, torch_dtype, fp32_modules(UMT5EncoderModel, torch_dtype))
    with _empty_weights():
        model = UMT5EncoderModel(config)
    assign_state_dict(model, state, str(path), km.t5_key_to_original)
    model.encoder.embed_tokens = model.shared  # one tensor, as in transformers' own loading
    return model.to(device).eval()


def load_clip_original(path: str | Path, *, torch_dtype: torch.dtype | None = torch.bfloat16,
                       device: str | torch.device = "cpu"):
    """Wan's open-clip XLM-RoBERTa ViT-H/14 ``.pth`` -> ``CLIPVisionModel`` (visual tower only).

    ``textual.*``, ``log_scale`` and ``visual.head`` are expected, counted and dropped (Wan I2V
    uses the hidden states of the first 31 blocks, i.e. ``hidden_states[-2]``).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    raw = read_pth(path)
    config = CLIPVisionConfig(**clip_config_from_original({k: tuple(v.shape) for k, v in raw.items()}))
    with _empty_weights():
        model = CLIPVisionModel(config)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
    try:
        state, ignored = km.clip_state_dict_to_hf(raw, prefix)
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc.args[0]}; not Wan2.1's CLIP file") from None
    state = _cast(state, torch_dtype, fp32_modules(CLIPVisionModel, torch_dtype))
    # Contiguous copies: the q/k/v chunks are views into the fused to_qkv tensor.
    state = {k: v.contiguous() for k, v in state.items()}
    assign_state_dict(model, state, str(path), km.clip_key_to_original)
    log.info("loaded CLIP visual tower from %s (%d tensors; %d unused textual/head tensors ignored)",
             path, len(raw) - len(ignored), len(ignored))
    return model.to(device).eval()


def load_tokenizer(folder: str | Path):
    """The umT5 tokenizer folder (``google/umt5-xxl`` in the original layout, ``tokenizer/`` in diffusers')."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {first_line(exc)}") from None


def make_image_processor(image_size: int = 224):
    """CLIP preprocessing as Wan does it: bicubic resize to ``image_size``² (no crop), OpenAI mean/std."""
    from transformers import CLIPImageProcessor

    config = dict(km.CLIP_IMAGE_PROCESSOR_CONFIG, size={"height": image_size, "width": image_size})
    return CLIPImageProcessor(**config)


def load_original_layout(folder: str | Path, *, torch_dtype: torch.dtype = torch.bfloat16,
                         device: str | torch.device = "cpu", dtypes: dict | None = None,
                         components: Iterable[str] | None = None) -> dict:
    """All components from an original Wan folder (see :func:`load_wan_components`)."""
    folder = Path(folder)
    dtypes = dtypes or {}
    want = set(components or md.DIFFUSERS_COMPONENTS)
    dt = lambda name: dtypes.get(name, torch_dtype)  # noqa: E731
    out = {}
    if "transformer" in want:
        out["transformer"] = load_dit_original(folder, torch_dtype=dt("transformer"), device=device)
    if "vae" in want:
        out["vae"] = load_vae_original(folder / md.VAE_FILE, torch_dtype=dt("vae"), device=device)
    if "text_encoder" in want:
        out["text_encoder"] = load_t5_original(folder / md.T5_FILE, torch_dtype=dt("text_encoder"), device=device)
    if "tokenizer" in want:
        out["tokenizer"] = load_tokenizer(folder / md.TOKENIZER_DIR)
    if "image_encoder" in want:
        out["image_encoder"] = load_clip_original(folder / md.CLIP_FILE, torch_dtype=dt("image_encoder"), device=device)
    if "image_processor" in want:
        if "image_encoder" in out:
            size = out["image_encoder"].config.image_size
        else:  # header-free guess would need the whole CLIP file; the released model uses 224
            size = km.CLIP_VISION_CONFIG["image_size"]
        out["image_processor"] = make_image_processor(size)
    return out


# ------------------------------------------------------------------------------------------
# Diffusers layout
# ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence diffusers'/transformers' own load reports; we check the loading info and raise instead."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    before = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(before[0])
        tlog.set_verbosity(before[1])


def _shape_diagnosis(cls, source: Path) -> str | None:
    """After a failed load, name the first tensor whose stored shape differs from the model's (or None)."""
    try:
        with _quiet_libraries():
            if hasattr(cls, "load_config"):  # diffusers
                with torch.device("meta"):
                    model = cls.from_config(cls.load_config(str(source)))
            else:  # transformers
                from transformers import AutoConfig

                with torch.device("meta"):
                    model = cls(AutoConfig.from_pretrained(str(source)))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        prefix = getattr(model, "base_model_prefix", "") or ""
        for file in sorted(source.glob("*.safetensors")):
            for key, shape in safetensors_shapes(file).items():
                name = key if key in expected else key.removeprefix(prefix + ".")
                if name in expected and expected[name] != shape:
                    return f"{file.name}: {key} has shape {list(shape)}, the model expects {list(expected[name])}"
    except Exception:  # the diagnosis is best effort; the caller reports the original error
        return None
    return None


#: Integer tensors that diffusers/transformers files may legitimately hold (older CLIP saves).
_INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")


def _check_stored_dtypes(source: Path) -> None:
    """Integer/bool tensors in a component's safetensors files are errors naming the tensor
    (read from the headers: after loading they would already be cast to the model's dtype)."""
    from safetensors import safe_open

    for file in sorted(source.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    if not dtype.startswith(("F", "BF")) and not key.endswith(_INTEGER_BUFFERS):
                        raise CheckpointError(f"{file}: tensor {key} has dtype {dtype}; weights must be floating "
                                              f"point (damaged or wrong file? download it again)")
        except CheckpointError:
            raise
        except Exception:  # unreadable header: the load below reports it with its diagnosis
            return


def _checked_from_pretrained(cls, folder: Path, subfolder: str, **kwargs):
    """``cls.from_pretrained`` with the loading info checked: missing or mis-shaped keys are errors,
    and so are integer/bool weights and NaN/inf values (named)."""
    source = folder / subfolder
    if subfolder == "transformer" and (source / "config.json").is_file():
        check_text_length(_read_json(source / "config.json"), str(source / "config.json"))
    _check_stored_dtypes(source)
    try:
        with _quiet_libraries():
            model, info = cls.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True,
                                              output_loading_info=True, **kwargs)
    except CheckpointError:
        raise
    except Exception as exc:
        detail = _shape_diagnosis(cls, source) or f"{type(exc).__name__}: {first_line(exc, 300)}"
        raise CheckpointError(f"cannot load {source}: {detail} (corrupt or incomplete? see docs/models.md)") from None
    allowed = _ALLOWED_UNEXPECTED.get(subfolder, ())
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(allowed)]
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise key_mismatch_error(str(source), sorted(missing), sorted(unexpected), mismatched,
                                 hint="is it the right file? (docs/models.md)")
    check_tensor_values(model.named_parameters(), str(source))
    return model


def _transformers_has_dtype() -> bool:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return (major, minor) >= (4, 56)


def load_diffusers_layout(folder: str | Path, *, torch_dtype: torch.dtype = torch.bfloat16,
                          device: str | torch.device = "cpu", dtypes: dict | None = None,
                          components: Iterable[str] | None = None) -> dict:
    """All components from a diffusers-layout folder (``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    folder = Path(folder)
    dtypes = dtypes or {}
    want = set(components or md.DIFFUSERS_COMPONENTS)
    classes = {"transformer": WanTransformer3DModel, "vae": AutoencoderKLWan,
               "text_encoder": UMT5EncoderModel, "image_encoder": CLIPVisionModel}
    out = {}
    for name, cls in classes.items():
        if name in want:
            # transformers >= 4.56 names the argument dtype; diffusers and older transformers torch_dtype
            dtype_kw = "dtype" if name in ("text_encoder", "image_encoder") and _transformers_has_dtype() else "torch_dtype"
            model = _checked_from_pretrained(cls, folder, name, **{dtype_kw: dtypes.get(name, torch_dtype)})
            out[name] = model.to(device).eval()
    if "tokenizer" in want:
        out["tokenizer"] = load_tokenizer(folder / "tokenizer")
    if "image_processor" in want:
        try:
            out["image_processor"] = CLIPImageProcessor.from_pretrained(str(folder / "image_processor"))
        except Exception as exc:
            raise CheckpointError(f"cannot load {folder / 'image_processor'}: {exc}") from None
    return out


def load_wan_components(models_dir: str | Path | None = None, *, layout: str = "auto",
                        torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                        dtypes: dict | None = None, components: Iterable[str] | None = None,
                        download: bool = False) -> dict:
    """Load Wan2.1-I2V-14B-480P as ``dict(transformer, vae, text_encoder, tokenizer, image_encoder,
    image_processor)``.

    ``models_dir``: the ``--models-dir`` folder (see :mod:`ex4d.diffusion.weights.models_dir`) or a layout
    folder itself; None = Hugging Face cache only. ``layout``: auto | original | diffusers.
    ``dtypes`` overrides ``torch_dtype`` per component (e.g. ``{"vae": torch.float32}``).
    ``components`` loads a subset. ``download`` allows fetching missing weights when online.
    Raises :class:`MissingWeightsError` (exit 2) or :class:`CheckpointError` (exit 2).
    """
    found, folder = md.resolve_wan(models_dir, layout, download=download)
    log.info("loading Wan2.1 I2V (%s layout) from %s", found, folder)
    loader = load_original_layout if found == "original" else load_diffusers_layout
    return loader(folder, torch_dtype=torch_dtype, device=device, dtypes=dtypes, components=components)
