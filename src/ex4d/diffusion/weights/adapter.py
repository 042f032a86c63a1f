"""The EX-4D adapter weights: LoRA on the DiT + the CamVidEncoder, read and written strictly.

The released ``ex4d.ckpt`` is one flat ``{name: tensor}`` dict (``torch.load(weights_only=True)``)
that the reference loads twice with ``strict=False``, silently ignoring whatever does not match
(spec §7.7, quirk 20). Here every key must be accounted for:

* LoRA: ``blocks.{i}.{self_attn|cross_attn}.{q|k|v|o}.lora_{A|B}[.default].weight`` and
  ``blocks.{i}.ffn.{0|2}.lora_{A|B}[.default].weight`` (EX-4D / DiffSynth naming, with or without
  PEFT's adapter name, optionally prefixed ``diffusion_model.``/``model.``/``dit.``), or the
  diffusers naming ``blocks.{i}.attn1.to_q.lora_A.weight`` that :func:`save_ex4d_adapter` writes
  (optionally prefixed ``transformer.`` or PEFT's ``base_model.model.``).
  10 layers per block (400 / 800 tensors for the 14B model), one rank throughout.
* CamVidEncoder: exactly ``latent_encoder.{0,2,4}.{weight,bias}`` and ``latent_patch_embedding.{weight,bias}``.

Anything else, a missing tensor, an inconsistent rank or a wrong shape raises :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ex4d.diffusion.weights import keymaps as km
from ex4d.errors import CheckpointError
from ex4d.io.files import atomic_path
from ex4d.weights_common import check_tensor_values, first_line

log = logging.getLogger(__name__)

#: Original (WanModel) LoRA'd linear -> diffusers WanTransformer3DModel module (per block).
LORA_MODULES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_LORA_MODULES_INVERSE = {v: k for k, v in LORA_MODULES.items()}
#: PEFT ``target_modules`` for the diffusers model: matches exactly the 10 linears per block
#: (suffix match; ``add_k_proj``/``add_v_proj`` = Wan's k_img/v_img are not matched, as in EX-4D).
LORA_TARGET_MODULES = tuple(LORA_MODULES.values())
ENCODER_KEYS = ("latent_encoder.0.weight", "latent_encoder.0.bias", "latent_encoder.2.weight",
                "latent_encoder.2.bias", "latent_encoder.4.weight", "latent_encoder.4.bias",
                "latent_patch_embedding.weight", "latent_patch_embedding.bias")

_ORIGINAL_RE = re.compile(r"(?:(?:diffusion_model|model|dit)\.)?blocks\.(\d+)\."
                          r"(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])\.lora_([AB])(?:\.default)?\.weight")
_DIFFUSERS_RE = re.compile(r"(?:transformer\.|base_model\.model\.)?blocks\.(\d+)\.(attn[12]\.to_[qkv]|attn[12]\.to_out\.0|"
                           r"ffn\.net\.0\.proj|ffn\.net\.2)\.lora_([AB])(?:\.default)?\.weight")

CONFIG_FORMAT = "ex4d-adapter"


@dataclass
class AdapterWeights:
    """A validated EX-4D adapter.

    lora: diffusers PEFT names (``blocks.{i}.attn1.to_q.lora_A.weight`` (r, in) / ``lora_B`` (out, r)).
    encoder: the 8 CamVidEncoder tensors, unprefixed. rank, alpha: LoRA scale = alpha / rank.
    """

    lora: dict[str, torch.Tensor]
    encoder: dict[str, torch.Tensor]
    rank: int
    alpha: float
    num_layers: int = -1  # -1: counted from the LoRA keys

    def __post_init__(self):
        if self.num_layers < 0:
            self.num_layers = 1 + max((int(k.split(".")[1]) for k in self.lora), default=-1)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lora_config(self):
        """``peft.LoraConfig`` that recreates the injected layers on ``WanTransformer3DModel``."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(LORA_TARGET_MODULES),
                          init_lora_weights=True)

    def encoder_config(self) -> dict:
        """CamVidEncoder sizes from the tensors: in (= 2 x VAE z), hidden, out (= DiT width), patch."""
        w0 = self.encoder["latent_encoder.0.weight"]
        wp = self.encoder["latent_patch_embedding.weight"]
        return dict(in_channels=w0.shape[1] // 2, hidden_channels=w0.shape[0], out_channels=wp.shape[0],
                    patch_size=tuple(wp.shape[2:]))


def lora_key_to_diffusers(key: str) -> str:
    """Any accepted LoRA key -> ``blocks.{i}.<diffusers module>.lora_{A|B}.weight``; KeyError if not LoRA."""
    m = _ORIGINAL_RE.fullmatch(key)
    if m:
        return f"blocks.{m.group(1)}.{LORA_MODULES[m.group(2)]}.lora_{m.group(3)}.weight"
    m = _DIFFUSERS_RE.fullmatch(key)
    if m:
        return f"blocks.{m.group(1)}.{m.group(2)}.lora_{m.group(3)}.weight"
    raise KeyError(key)


def lora_key_to_original(key: str, adapter_name: str | None = "default") -> str:
    """Diffusers LoRA key -> EX-4D's ``blocks.{i}.self_attn.q.lora_A.default.weight`` (``adapter_name`` None drops it)."""
    m = _DIFFUSERS_RE.fullmatch(key)
    if not m:
        raise KeyError(key)
    tag = f".{adapter_name}" if adapter_name else ""
    return f"blocks.{m.group(1)}.{_LORA_MODULES_INVERSE[m.group(2)]}.lora_{m.group(3)}{tag}.weight"


def convert_lora_to_original(lora: dict[str, torch.Tensor], adapter_name: str | None = "default") -> dict:
    """Diffusers-named LoRA tensors -> EX-4D naming (what ``generate.py``'s ``strict=False`` load matches)."""
    return {lora_key_to_original(k, adapter_name): v for k, v in lora.items()}


def _expected_shapes(config: dict, rank: int) -> dict[str, tuple[int, ...]]:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config["ffn_dim"]
    io = {m: (dim, dim) for m in LORA_MODULES.values()}
    io["ffn.net.0.proj"] = (dim, ffn)
    io["ffn.net.2"] = (ffn, dim)
    shapes = {}
    for i in range(config["num_layers"]):
        for mod, (fan_in, fan_out) in io.items():
            shapes[f"blocks.{i}.{mod}.lora_A.weight"] = (rank, fan_in)
            shapes[f"blocks.{i}.{mod}.lora_B.weight"] = (fan_out, rank)
    return shapes


def validate_adapter(lora: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor], config: dict | None,
                     source: str) -> tuple[int, int]:
    """Check counts, rank and shapes against a transformer config; returns ``(rank, num_layers)``."""
    from ex4d.diffusion.weights.wan import check_keys

    config = dict(config or km.TRANSFORMER_CONFIG_I2V_14B)
    ranks = {v.shape[0] for k, v in lora.items() if ".lora_A." in k} | \
            {v.shape[1] for k, v in lora.items() if ".lora_B." in k and v.ndim == 2}
    if len(ranks) != 1:
        raise CheckpointError(f"{source}: LoRA ranks are inconsistent ({sorted(ranks) or 'no LoRA tensors'})")
    rank = ranks.pop()
    check_keys(_expected_shapes(config, rank), {k: tuple(v.shape) for k, v in lora.items()}, f"{source} (LoRA)")
    missing = [k for k in ENCODER_KEYS if k not in encoder]
    if missing:
        raise CheckpointError(f"{source}: CamVidEncoder tensors missing: {missing} "
                              f"(expected exactly {len(ENCODER_KEYS)}: latent_encoder.{{0,2,4}}.*, latent_patch_embedding.*)")
    w0, wp = encoder["latent_encoder.0.weight"], encoder["latent_patch_embedding.weight"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    hidden = w0.shape[0]
    enc_expected = {
        "latent_encoder.0.weight": (hidden, 2 * config["out_channels"], 1, 1, 1), "latent_encoder.0.bias": (hidden,),
        "latent_encoder.2.weight": (hidden, hidden, 1, 1, 1), "latent_encoder.2.bias": (hidden,),
        "latent_encoder.4.weight": (hidden, hidden, 1, 1, 1), "latent_encoder.4.bias": (hidden,),
        "latent_patch_embedding.weight": (dim, hidden, *config["patch_size"]), "latent_patch_embedding.bias": (dim,),
    }
    if wp.ndim != 5:
        raise CheckpointError(f"{source}: latent_patch_embedding.weight has shape {list(wp.shape)}, expected 5-D")
    check_keys(enc_expected, {k: tuple(v.shape) for k, v in encoder.items()}, f"{source} (CamVidEncoder)")
    return rank, config["num_layers"]


def _read_config(path: Path) -> dict:
    """``adapter_config.json`` beside an ``adapter.safetensors``: a JSON object with an integer ``r``
    and a finite positive ``lora_alpha``; anything else is a one-line :class:`CheckpointError`."""
    fix = "rewrite it with `ex4d convert --only adapter`, or delete it to use alpha = rank"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {first_line(exc)} ({fix})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(config).__name__} ({fix})")
    missing = [k for k in ("r", "lora_alpha") if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} ({fix})")
    r = config["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{path}: r must be a positive integer, not {r!r} ({fix})")
    config["lora_alpha"] = check_alpha(config["lora_alpha"], f"{path}: lora_alpha", fix)
    return config


def check_alpha(alpha, what: str = "lora_alpha", fix: str = "give a positive number such as the rank") -> float:
    """``alpha`` as a float if it is a finite positive number; else :class:`CheckpointError`.

    A NaN alpha would make every LoRA delta NaN (a black video), 0 or a negative one silently
    switches the adapter off or inverts it, inf overflows.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{what} must be a number, not {alpha!r} ({fix})")
    value = float(alpha)
    if not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{what} is {alpha!r}; it must be a finite positive number ({fix})")
    return value


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Flat tensor dict of a ``.ckpt``/``.pth``/``.safetensors`` file + its config (if any)."""
    from ex4d.diffusion.weights.wan import read_pth

    if path.stat().st_size == 0:
        raise CheckpointError(f"adapter file {path} is empty (0 bytes; an interrupted download?); delete it "
                              f"and download it again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file "
                                  f"({first_line(exc)}); delete it and download it again") from None
        cfg_path = path.with_name("adapter_config.json")
        cfg = _read_config(cfg_path) if cfg_path.is_file() else {}
        return state, cfg
    return read_pth(path), {}


def load_ex4d_adapter(path: str | Path, *, transformer_config: dict | None = None,
                      alpha: float | None = None) -> AdapterWeights:
    """Read and validate an EX-4D adapter (``ex4d.ckpt`` or our ``adapter.safetensors``).

    ``transformer_config``: the DiT config the adapter must fit (default: Wan2.1-I2V-14B, i.e.
    exactly 40 blocks x 10 LoRA'd linears = 800 tensors + 8 encoder tensors). ``alpha``: LoRA
    alpha; default from ``adapter_config.json`` if present, else alpha = rank (EX-4D's r=16,
    alpha=16, scale 1.0). Raises :class:`CheckpointError` on any unaccounted-for key.
    """
    path = Path(path)
    if not path.is_file():
        from ex4d.errors import MissingWeightsError
        from ex4d.diffusion.weights.models_dir import ADAPTER_CKPT, EX4D_REPO, download_command

        raise MissingWeightsError(f"missing adapter weights: {path}; download with: "
                                  f"{download_command(EX4D_REPO, None, ADAPTER_CKPT)}")
    state, cfg = _read(path)
    # before anything else: integer/bool tensors and NaN/inf values, each named
    check_tensor_values(state, f"adapter {path}")
    lora: dict[str, torch.Tensor] = {}
    encoder: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key in ENCODER_KEYS:
            encoder[key] = value
            continue
        try:
            name = lora_key_to_diffusers(key)
        except KeyError:
            unexpected.append(key)
            continue
        if name in lora:
            raise CheckpointError(f"{path}: LoRA tensor {name} appears twice (under two namings)")
        lora[name] = value
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected key(s), e.g. {sorted(unexpected)[:3]}; an EX-4D "
                              f"adapter holds only LoRA tensors and {len(ENCODER_KEYS)} CamVidEncoder tensors")
    rank, num_layers = validate_adapter(lora, encoder, transformer_config, str(path))
    if cfg and cfg["r"] != rank:
        raise CheckpointError(f"{path.with_name('adapter_config.json')} says r={cfg['r']} but the LoRA tensors "
                              f"of {path.name} have rank {rank}; the two files do not belong together")
    if alpha is None:
        alpha = cfg.get("lora_alpha", rank)
    alpha = check_alpha(alpha, f"lora_alpha for {path}")
    log.info("loaded EX-4D adapter %s: %d LoRA tensors (rank %d, alpha %g) + %d encoder tensors",
             path, len(lora), rank, alpha, len(encoder))
    return AdapterWeights(lora=lora, encoder=encoder, rank=rank, alpha=float(alpha), num_layers=num_layers)


def save_ex4d_adapter(folder: str | Path, lora: dict[str, torch.Tensor] | AdapterWeights,
                      encoder: dict[str, torch.Tensor] | None = None, *, alpha: float | None = None,
                      transformer_config: dict | None = None, write_ckpt: bool = True,
                      dtype: torch.dtype | None = None) -> dict[str, Path]:
    """Write an adapter as ``adapter.safetensors`` + ``adapter_config.json`` (+ ``ex4d.ckpt``).

    ``lora`` in any accepted naming (e.g. ``peft.get_peft_model_state_dict(transformer)``) or an
    :class:`AdapterWeights`; ``encoder`` the 8 CamVidEncoder tensors (``state_dict()`` of the module).
    The ``ex4d.ckpt`` uses EX-4D's naming (``...lora_A.default.weight``) so the reference
    ``generate.py`` can load it. Validated first with :func:`validate_adapter`; each file is
    written atomically. Returns the written paths.
    """
    from safetensors.torch import save_file

    if isinstance(lora, AdapterWeights):
        encoder = lora.encoder if encoder is None else encoder
        alpha = lora.alpha if alpha is None else alpha
        lora = lora.lora
    if encoder is None:
        raise ValueError("save_ex4d_adapter needs the CamVidEncoder tensors")
    names = {}
    for k in lora:
        try:
            names[k] = lora_key_to_diffusers(k)
        except KeyError:
            raise ValueError(f"not a LoRA key of the EX-4D targets: {k}") from None
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())  # noqa: E731
    lora_d = {names[k]: cast(v).contiguous().cpu() for k, v in lora.items()}
    enc = {k.removeprefix("camera_encoder."): cast(v).contiguous().cpu() for k, v in encoder.items()}
    rank, num_layers = validate_adapter(lora_d, enc, transformer_config, "adapter to save")
    alpha = float(rank if alpha is None else alpha)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CONFIG_FORMAT, "version": 1, "r": rank, "lora_alpha": alpha, "num_layers": num_layers,
        "target_modules": list(LORA_TARGET_MODULES),
        "camera_encoder": AdapterWeights(lora_d, enc, rank, alpha, num_layers).encoder_config(),
        "base_model": "Wan-AI/Wan2.1-I2V-14B-480P",
    }
    written = {}
    with atomic_path(folder / "adapter.safetensors") as tmp:
        save_file({**lora_d, **enc}, str(tmp), metadata={"format": "pt", "r": str(rank), "lora_alpha": str(alpha)})
    written["safetensors"] = folder / "adapter.safetensors"
    with atomic_path(folder / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=list))
    written["config"] = folder / "adapter_config.json"
    if write_ckpt:
        with atomic_path(folder / "ex4d.ckpt") as tmp:
            torch.save({**convert_lora_to_original(lora_d), **enc}, tmp)
        written["ckpt"] = folder / "ex4d.ckpt"
    return written
