"""Extra Wan2.1 LoRAs merged into the DiT (``--lora FILE[:STRENGTH]``): step/CFG distillation, style, ...

Two on-disk layouts are read, and every key of a file must apply to a parameter of the
``WanTransformer3DModel`` (a key that applies to nothing is an :class:`InputError` naming the first
few, never a silent skip):

* original / ComfyUI / LightX2V: ``diffusion_model.<Wan module>.lora_down.weight`` ``[r, in]`` and
  ``.lora_up.weight`` ``[out, r]`` (optional ``.alpha``), full deltas ``.diff`` (of ``.weight``, norms
  included), ``.diff_b`` (of ``.bias``) and ``blocks.N.diff_m`` / ``head.diff_m`` (of the modulation
  tables). Module names are Wan's (``blocks.0.self_attn.q``) and are mapped onto diffusers' parameter
  names with the same key map that loads the original DiT (:mod:`ex4d.diffusion.weights.keymaps`).
* diffusers / PEFT: ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` (also with
  ``.default`` in the middle, or no prefix), ``.lora_B.bias`` (PEFT's ``lora_bias``).

Scale: ``alpha / rank`` when the file has an ``.alpha`` for the module, else the ``lora_alpha`` / ``r``
of diffusers' ``lora_adapter_metadata`` when the file carries it, else 1 (what LightX2V and diffusers
do for the LightX2V files, which have no alpha). Every delta is multiplied by the strength, computed
in float32, added to the float32 weight and cast back to the weight's dtype. Strength 0 checks the
file and changes nothing.

The merge runs after the EX-4D adapter's LoRA is installed (or merged) and before QKV fusion,
compilation and fp8 (:func:`ex4d.diffusion.pipeline.build_pipeline`). Under ``--no-merge-lora`` the
EX-4D LoRA stays a peft layer and the extra LoRAs are merged into its base weight.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ex4d.errors import InputError

log = logging.getLogger(__name__)

#: Largest |strength| accepted (LightX2V's Wan2.2 users go to 3; far beyond, weights blow up).
MAX_STRENGTH = 10.0
#: Key prefixes: the original/ComfyUI files' and diffusers'/PEFT's.
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("base_model.model.", "transformer.")
#: Key suffix -> role, longest first (``.diff`` is a suffix of nothing else here, but order matters
#: for ``.lora_B.bias`` vs ``.lora_B.weight``).
_ROLES = (("lora_down.weight", "down"), ("lora_up.weight", "up"), ("lora_A.weight", "down"),
          ("lora_B.weight", "up"), ("lora_B.bias", "up_bias"), ("alpha", "alpha"), ("diff_b", "diff_b"),
          ("diff_m", "diff_m"), ("diff", "diff"))
_SHOWN = 5  # keys named in an error message


# ------------------------------------------------------------------------------------------------
# FILE[:STRENGTH]


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora``: a file and its strength (1 = as trained)."""

    path: str
    strength: float = 1.0

    def identity(self) -> dict:
        """Path, size, modification time and strength: what cached pipelines and records compare."""
        path = Path(self.path).expanduser()
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = None
        return {"path": str(path.resolve()), "size": size, "mtime_ns": mtime, "strength": self.strength}


def parse_lora_spec(value, where: str = "--lora") -> LoraSpec:
    """``FILE``, ``FILE:STRENGTH``, a ``(file, strength)`` pair or a :class:`LoraSpec`.

    The strength is taken after the last ``:`` only when that part is a number, so a path with a
    colon in it (``C:\\loras\\x.safetensors``) still works without one.
    """
    if isinstance(value, LoraSpec):
        path, strength = value.path, value.strength
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        path, strength = value
    elif isinstance(value, (str, os.PathLike)):
        path, strength = str(value), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head and not re.fullmatch(r"[\\/].*", tail):
            try:
                path, strength = head, float(tail)
            except ValueError:
                pass
    else:
        raise InputError(f"{where}: {value!r} is not a LoRA file; give FILE or FILE:STRENGTH, e.g. "
                         f"distill.safetensors:1.0")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or abs(strength) > MAX_STRENGTH:
        raise InputError(f"{where} {path}: strength must be a number from {-MAX_STRENGTH:g} to {MAX_STRENGTH:g}, "
                         f"got {strength!r}; e.g. {path}:1.0 (1 = as trained, 0 = off)")
    if not str(path).strip():
        raise InputError(f"{where}: empty file name; give FILE or FILE:STRENGTH, e.g. distill.safetensors:1.0")
    return LoraSpec(str(path), float(strength))


def parse_lora_specs(values, where: str = "--lora") -> tuple[LoraSpec, ...]:
    """Every ``--lora`` of ``values`` (None, one, or a list) as :class:`LoraSpec`s, in order."""
    if values is None:
        return ()
    if isinstance(values, (str, os.PathLike, LoraSpec)):
        values = [values]
    return tuple(parse_lora_spec(v, where) for v in values)


def check_lora_files(specs, where: str = "--lora") -> None:
    """Every file exists and is readable (before any weights load): one-line InputError otherwise."""
    from ex4d.io.files import require_file

    for spec in specs:
        require_file(spec.path, f"LoRA file ({where})")


# ------------------------------------------------------------------------------------------------
# Reading and mapping


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, safetensors metadata) of a LoRA file.

    .safetensors is read with safetensors; .pt/.pth/.ckpt/.bin with ``torch.load(weights_only=True)``
    (no code runs from the file). A file that is neither is an InputError.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"cannot read the LoRA file {path}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                             f"is it a complete .safetensors file?") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle; all mean "not a weights file"
        raise InputError(f"cannot read the LoRA file {path} ({type(exc).__name__}); give a .safetensors file "
                         f"(or a weights-only .pt/.pth)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"the LoRA file {path} holds no flat tensor dictionary; give a .safetensors LoRA")
    return dict(state), {}


@dataclass
class LoraDelta:
    """The change of one transformer parameter from one file.

    kind ``lowrank``: ``scale * up @ down`` (up ``[out, r, ...]``, down ``[r, in, ...]``, flattened
    for convolutions); kind ``full``: ``delta`` itself (``.diff``/``.diff_b``/``.diff_m``/``lora_B.bias``).
    ``keys``: the file's keys that make it.
    """

    target: str
    kind: str
    keys: list[str] = field(default_factory=list)
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    scale: float = 1.0

    def compute(self, shape: torch.Size, device) -> torch.Tensor:
        """The float32 delta, shaped like the parameter, on ``device``."""
        if self.kind == "full":
            return self.delta.to(device=device, dtype=torch.float32).reshape(shape)
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return ((up @ down) * self.scale).reshape(shape)


def _strip_prefix(key: str) -> tuple[str, str | None]:
    """(key without its prefix, the layout the prefix implies or None)."""
    for prefix in ORIGINAL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):], "original"
    for prefix in DIFFUSERS_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):], "diffusers"
    return key, None


def _split_role(key: str) -> tuple[str, str] | None:
    """(module, role) of a prefix-free key, or None for a suffix no layout defines."""
    key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)  # PEFT's adapter name, as PEFT saves it
    for suffix, role in _ROLES:
        if key == suffix and role == "diff_m":  # no module: the head's (never written, but unambiguous)
            return "", role
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return None


def _param_name(module: str, leaf: str, layout: str, params: dict) -> str | None:
    """The transformer parameter that ``module`` + ``leaf`` names in ``layout``, or None."""
    if layout == "diffusers":
        name = f"{module}.{leaf}" if module else leaf
        if leaf == "modulation":
            name = f"{module}.scale_shift_table" if module else "scale_shift_table"
        return name if name in params else None
    from ex4d.diffusion.weights.keymaps import dit_key_to_diffusers

    name = f"{module}.{leaf}" if module else leaf
    try:
        mapped = dit_key_to_diffusers(name)
    except Exception:  # diffusers' converter on a name it has never seen
        return None
    return mapped if mapped in params else None


def _adapter_metadata(metadata: dict) -> tuple[float | None, int | None]:
    """(lora_alpha, r) from diffusers' ``lora_adapter_metadata`` (safetensors metadata), if present."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return None, None
    try:
        info = json.loads(text)
    except ValueError:
        return None, None
    info = info.get("transformer", info) if isinstance(info, dict) else {}
    alpha, rank = info.get("lora_alpha"), info.get("r")
    return (float(alpha) if isinstance(alpha, (int, float)) else None,
            int(rank) if isinstance(rank, int) else None)


def _plan(state: dict, metadata: dict, params: dict[str, tuple], layout: str
          ) -> tuple[list[LoraDelta], list[str], list[str]]:
    """(deltas, keys that apply to nothing, shape errors) of ``state`` read in ``layout``."""
    stray: list[str] = []
    shape_errors: list[str] = []
    pairs: dict[str, dict] = {}
    deltas: list[LoraDelta] = []
    for key in state:
        bare, _ = _strip_prefix(key)
        split = _split_role(bare)
        if split is None:
            stray.append(key)
            continue
        module, role = split
        leaf = {"diff_b": "bias", "diff_m": "modulation", "up_bias": "bias"}.get(role, "weight")
        target = _param_name(module, leaf, layout, params)
        if target is None:
            stray.append(key)
            continue
        if role in ("down", "up", "alpha"):
            pairs.setdefault(target, {})[role] = key
            continue
        delta = state[key]
        if tuple(delta.shape) != tuple(params[target]) and delta.numel() != math.prod(params[target]):
            shape_errors.append(f"{key} {tuple(delta.shape)} vs {target} {tuple(params[target])}")
            continue
        deltas.append(LoraDelta(target=target, kind="full", keys=[key], delta=delta))
    meta_alpha, meta_rank = _adapter_metadata(metadata)
    for target, found in pairs.items():
        if "down" not in found or "up" not in found:
            stray.extend(k for k in found.values())  # half a pair, or an alpha alone, changes nothing
            continue
        down, up = state[found["down"]], state[found["up"]]
        shape = params[target]
        rank = down.shape[0]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != rank or up.shape[0] != shape[0] or \
                math.prod(down.shape[1:]) != math.prod(shape[1:]):
            shape_errors.append(f"{found['up']} {tuple(up.shape)} @ {found['down']} {tuple(down.shape)} vs "
                                f"{target} {tuple(shape)}")
            continue
        scale = 1.0
        if "alpha" in found:
            scale = float(state[found["alpha"]].float().reshape(-1)[0]) / rank
        elif meta_alpha is not None:
            scale = meta_alpha / (meta_rank or rank)
        deltas.append(LoraDelta(target=target, kind="lowrank", keys=sorted(found.values()), up=up, down=down,
                                scale=scale))
    return deltas, stray, shape_errors


def plan_lora(state: dict[str, torch.Tensor], params: dict[str, tuple], source: str = "LoRA",
              metadata: dict | None = None) -> list[LoraDelta]:
    """Map every key of a LoRA ``state`` onto ``params`` (transformer parameter name -> shape).

    The layout comes from the key prefix (``diffusion_model.``: original; ``transformer.``: diffusers);
    a file without a prefix is read both ways and the way where every key applies wins. Raises a
    one-line InputError if any key applies to nothing or has the wrong shape, naming the first few.
    Returns the deltas (each file key used exactly once).
    """
    metadata = metadata or {}
    if not state:
        raise InputError(f"{source} holds no tensors; give a Wan2.1 LoRA file")
    hinted = {_strip_prefix(k)[1] for k in state}
    hinted.discard(None)
    layouts = sorted(hinted) if hinted else ["diffusers", "original"]
    best = None
    for layout in layouts:
        deltas, stray, shape_errors = _plan(state, metadata, params, layout)
        if not stray and not shape_errors:
            used = sum(len(d.keys) for d in deltas)
            if used != len(state):  # a key counted twice or lost: a bug, not the user's file
                raise AssertionError(f"{source}: {used} keys used of {len(state)}")
            log.info("%s: %d keys (%s layout) -> %d parameter deltas", source, len(state), layout, len(deltas))
            return deltas
        if best is None or len(stray) + len(shape_errors) < len(best[0]) + len(best[1]):
            best = (stray, shape_errors, layout)
    stray, shape_errors, layout = best
    if stray:
        shown = ", ".join(stray[:_SHOWN]) + (", ..." if len(stray) > _SHOWN else "")
        raise InputError(f"{source}: {len(stray)} of {len(state)} keys apply to nothing in the Wan2.1-I2V "
                         f"transformer ({layout} layout): {shown}; is it a LoRA for another model (Wan2.2, "
                         f"a 1.3B or T2V model) or another key format?")
    shown = "; ".join(shape_errors[:3]) + ("; ..." if len(shape_errors) > 3 else "")
    raise InputError(f"{source}: {len(shape_errors)} LoRA tensors do not fit the Wan2.1-I2V-14B transformer: "
                     f"{shown}; is it a LoRA for another model size?")


def transformer_param_shapes(transformer: torch.nn.Module) -> dict[str, tuple]:
    """Parameter name -> shape, with peft's ``.base_layer`` folded away and LoRA layers left out."""
    return {name: tuple(p.shape) for name, p in _base_parameters(transformer).items()}


def _base_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, param in transformer.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".lora_magnitude" in name:
            continue
        out[name.replace(".base_layer.", ".")] = param
    return out


@dataclass
class PreparedLora:
    """A LoRA file read and mapped (:func:`prepare_loras`), ready to merge."""

    spec: LoraSpec
    deltas: list[LoraDelta]
    num_keys: int


def prepare_loras(specs, param_shapes: dict[str, tuple]) -> list[PreparedLora]:
    """Read every LoRA of ``specs`` and map it onto ``param_shapes`` (see :func:`transformer_param_shapes`;
    a meta-device model gives them before any weight loads). Raises a one-line InputError for a file
    that cannot be read or has a key that applies to nothing."""
    prepared = []
    for spec in parse_lora_specs(specs):
        state, metadata = read_lora_file(spec.path)
        prepared.append(PreparedLora(spec, plan_lora(state, param_shapes, f"LoRA file {spec.path}", metadata),
                                     len(state)))
    return prepared


def merge_loras(transformer: torch.nn.Module, loras) -> list[dict]:
    """Merge LoRAs into ``transformer`` in order: :class:`PreparedLora`s, or :class:`LoraSpec`s /
    ``FILE[:STRENGTH]`` strings (read and checked here, all before the first weight changes, so a bad
    file leaves the model as it was). Returns one summary per file (path, strength, keys, parameters).
    """
    loras = list(loras or ())
    if not loras:
        return []
    params = _base_parameters(transformer)
    if not all(isinstance(item, PreparedLora) for item in loras):
        loras = prepare_loras(loras, {name: tuple(p.shape) for name, p in params.items()})
    summaries = []
    with torch.no_grad():
        for item in loras:
            strength = item.spec.strength
            if strength != 0.0:
                for delta in item.deltas:
                    param = params[delta.target]
                    change = delta.compute(param.shape, param.device) * strength
                    param.copy_((param.float() + change).to(param.dtype))
            summaries.append({"path": item.spec.path, "strength": strength, "keys": item.num_keys,
                              "parameters": len({d.target for d in item.deltas})})
            log.info("merged LoRA %s at strength %g: %d keys into %d parameters", item.spec.path, strength,
                     item.num_keys, summaries[-1]["parameters"])
    return summaries
