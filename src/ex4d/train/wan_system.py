"""The EX-4D training system: Wan2.1-I2V + LoRA + CamVidEncoder, inputs built exactly as at inference.

Trainable: the LoRA on the ten linears per block (rank/alpha configurable, default 16/16, A Kaiming
and B zero) and the CamVidEncoder (zero-initialised last layer), so training starts from the base
model's exact behaviour. Everything else (DiT, VAE, umT5, CLIP) is frozen.

Every model input comes from the generation stage's own code, not a copy of it:
``ex4d.diffusion.conditioning`` (seeded erosion sizes, cv2-style erosion, the reference's scalings,
the double mask scaling) and ``ex4d.diffusion.pipeline.EX4DPipeline`` (CLIP features of frame 0,
the 20-channel y latent, the camera tokens, VAE latent normalisation, text embeddings); the tokens
reach the DiT through the same :class:`~ex4d.diffusion.adapter.PatchEmbeddingInjector` hook.

Per training sample (all randomness from the sample's seed, see :mod:`ex4d.train.trainer`):
erode the simulated mask with fresh kernel sizes, scale, encode; draw sigma (and its weight) and the
noise; x_t = (1 - sigma) x0 + sigma eps; the DiT predicts v at t = 1000 sigma; loss = w * MSE(v, eps - x0).

Shapes: video (B, T, H, W, 3) in [0, 1]; mask (B, T, H, W) bool; latents (B, 16, T', h, w).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ex4d.errors import InputError
from ex4d.train.objective import FlowMatchingObjective
from ex4d.train.trainer import TrainSystem, derive_seed

log = logging.getLogger(__name__)

#: The reference's LoRA targets, in its naming (see ex4d.diffusion.weights.adapter.LORA_MODULES).
REFERENCE_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


@dataclass
class ModelConfig:
    """Model-side training settings (saved in every checkpoint's state.json)."""

    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = REFERENCE_TARGETS  # reference names: q, k, v, o (both attentions), ffn.0, ffn.2
    encoder_hidden: int = 1024        # CamVidEncoder width (1024 in the released adapter)
    init_adapter: str | None = None   # start from an adapter file (e.g. the released ex4d.ckpt)
    prompt: str | None = None         # None: the inference prompt (EX-4D's fixed positive prompt)
    shift: float = 5.0
    timestep_sampling: str = "uniform"
    timestep_weighting: str = "diffsynth"
    gradient_checkpointing: bool = True
    autocast: str = "auto"            # "auto": bf16 autocast on CUDA, none on CPU; "bf16"; "none"
    erode: bool = True                # per-frame random erosion k in [2, 8] as at inference
    cache_encodings: bool = False     # memoise VAE encodes and CLIP(frame 0) per clip in memory (LRU)
    cache_size: int = 2048            # most VAE latents kept when caching
    validation_steps: int = 10
    validation_guidance: float = 5.0

    def describe(self) -> dict:
        values = asdict(self)
        values["lora_targets"] = list(self.lora_targets)
        return values


#: Model settings a resumed run must share with its checkpoint (they decide the trainable tensors'
#: names and shapes, or, for lora_alpha, what the saved LoRA weights mean), with their CLI option.
RESUME_SETTINGS = {"lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
                   "encoder_hidden": "--encoder-hidden"}


def model_mismatches(config: ModelConfig, saved_system: dict) -> list[str]:
    """The :data:`RESUME_SETTINGS` in which ``config`` differs from a checkpoint's saved system description
    (``state.json["system"]``), e.g. ``["--lora-rank was 16, now 8"]``."""
    before, now = (saved_system or {}).get("model") or {}, config.describe()
    return [f"{option} was {_show(before[key])}, now {_show(now[key])}"
            for key, option in RESUME_SETTINGS.items() if key in before and before[key] != now[key]]


def _show(value) -> str:
    """A setting as the command line spells it (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _lora_target_regex(targets: tuple[str, ...]) -> tuple[str, int]:
    """(peft full-match regex over the diffusers module names, adapted linears per block)."""
    from ex4d.diffusion.weights.adapter import LORA_MODULES

    names = []
    for target in targets:
        if target in ("q", "k", "v", "o"):
            names += [LORA_MODULES[f"self_attn.{target}"], LORA_MODULES[f"cross_attn.{target}"]]
        elif target in LORA_MODULES:
            names.append(LORA_MODULES[target])
        else:
            raise InputError(f"unknown LoRA target {target!r}; use some of q, k, v, o, ffn.0, ffn.2 "
                             f"(or self_attn.q, cross_attn.o, ...)")
    names = sorted(set(names))
    pattern = r"blocks\.\d+\.(" + "|".join(n.replace(".", r"\.") for n in names) + ")"
    return pattern, len(names)


def encode_prompts(components: dict, prompt: str | None = None, negative_prompt: str | None = None, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) umT5 embeddings (1, 512, text_dim) with the pipeline's own text encoding.

    Computing them once up front lets the caller drop the text encoder (11 GB in bf16 for umT5-XXL)
    before training. Defaults: EX-4D's fixed prompt and Wan's negative prompt.
    """
    from ex4d.diffusion.pipeline import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, EX4DPipeline, make_scheduler

    if components.get("text_encoder") is None or components.get("tokenizer") is None:
        raise InputError("the text encoder and tokenizer are needed to encode the training prompt")
    pipe = EX4DPipeline(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                        image_encoder=None, vae=components["vae"], transformer=components["transformer"],
                        camera_encoder=None, scheduler=make_scheduler())
    dtype = dtype or components["transformer"].dtype
    with torch.no_grad():
        positive = pipe._encode_text(prompt if prompt is not None else DEFAULT_PROMPT, torch.device(device), dtype)
        negative = pipe._encode_text(negative_prompt if negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
                                     torch.device(device), dtype)
    return positive, negative


class EX4DTrainSystem(TrainSystem):
    """Wraps the Wan components for training. ``forward(batch)`` returns ``{"loss", "sigma"}``.

    components: ``load_wan_components``' dict (transformer, vae, image_encoder and, unless
    ``text_embeds`` is given, text_encoder + tokenizer). text_embeds: fixed prompt embeddings
    (1, L, text_dim) to use instead of the text encoder (precomputed or for tests).
    validation: optional list of (video (T, H, W, 3) float [0, 1], mask (T, H, W) bool) pairs that
    :meth:`validate` generates from and scores (PSNR of the generated against the true video).
    """

    def __init__(self, components: dict, config: ModelConfig | None = None, *,
                 text_embeds: torch.Tensor | None = None, negative_text_embeds: torch.Tensor | None = None,
                 validation: list | None = None, base_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from ex4d.diffusion.adapter import CamVidEncoder, PatchEmbeddingInjector
        from ex4d.diffusion.pipeline import EX4DPipeline, make_scheduler

        self.config = config or ModelConfig()
        cfg = self.config
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.image_encoder = components["image_encoder"]
        self.text_encoder = components.get("text_encoder") if text_embeds is None else None
        for module in (self.transformer, self.vae, self.image_encoder, self.text_encoder):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
                if module.dtype != base_dtype:
                    module.to(base_dtype)

        self._inject_lora()
        tconf = self.transformer.config
        self.camera_encoder = CamVidEncoder(in_channels=tconf.out_channels, hidden_channels=cfg.encoder_hidden,
                                            out_channels=tconf.num_attention_heads * tconf.attention_head_dim,
                                            patch_size=tuple(tconf.patch_size))
        if cfg.init_adapter:
            self._load_adapter(cfg.init_adapter)
        # nn.Module.to: ModelMixin.to warns about keep-in-fp32 modules even when there are none.
        torch.nn.Module.to(self.camera_encoder, device=self.transformer.patch_embedding.weight.device,
                           dtype=torch.float32)
        self.injector = PatchEmbeddingInjector(self.transformer)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        # The pipeline object is only a holder of the shared encode/condition code; it is not a
        # submodule (its models are registered above) and it never samples during training.
        self.__dict__["pipe"] = EX4DPipeline(
            tokenizer=components.get("tokenizer"), text_encoder=self.text_encoder, image_encoder=self.image_encoder,
            vae=self.vae, transformer=self.transformer, camera_encoder=self.camera_encoder,
            scheduler=make_scheduler())
        self.pipe._injector = self.injector
        self.pipe.set_progress_bar_config(disable=True)  # validation sampling; the trainer has its own bar
        if cfg.cache_encodings:
            # Memoise the pipeline's VAE encodes by input content: the target latent and y of a clip
            # never change, and the cond/mask latents repeat whenever the erosion draw does (always
            # with erode=False). Exact: equal inputs give the identical cached latent.
            self.pipe._vae_encode = self._cached_vae_encode
        self.objective = FlowMatchingObjective(shift=cfg.shift, sampling=cfg.timestep_sampling,
                                               weighting=cfg.timestep_weighting)
        self.register_buffer("text_embeds", text_embeds.detach().clone() if text_embeds is not None else None,
                             persistent=False)
        self.register_buffer("negative_text_embeds", negative_text_embeds.detach().clone()
                             if negative_text_embeds is not None else None, persistent=False)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._vae_cache: dict[str, torch.Tensor] = {}
        self.validation_items = list(validation or [])

    # -- setup --------------------------------------------------------------------------------
    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        from ex4d.diffusion.adapter import ADAPTER_NAME, inject_lora

        cfg = self.config
        if tuple(cfg.lora_targets) == REFERENCE_TARGETS:
            inject_lora(self.transformer, rank=cfg.lora_rank, alpha=cfg.lora_alpha)  # the inference injection
        else:
            pattern, per_block = _lora_target_regex(tuple(cfg.lora_targets))
            config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights=True,
                                target_modules=pattern)
            inject_adapter_in_model(config, self.transformer, adapter_name=ADAPTER_NAME)
            log.warning("LoRA on %d linears per block instead of the reference's 10: the result is saved as "
                        "trainable.safetensors but not as an ex4d.ckpt that `ex4d generate` can load", per_block)
        # fp32 master weights for the trainables, whatever the base dtype (bf16 on GPU).
        for name, param in self.transformer.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
                param.requires_grad_(True)

    def _load_adapter(self, path: str) -> None:
        from ex4d.diffusion.adapter import load_lora_weights
        from ex4d.diffusion.weights.adapter import load_ex4d_adapter

        weights = load_ex4d_adapter(path, transformer_config=dict(self.transformer.config))
        if weights.rank != self.config.lora_rank:
            raise InputError(f"{path} has LoRA rank {weights.rank} but --lora-rank is {self.config.lora_rank}")
        load_lora_weights(self.transformer, weights.lora)
        if weights.encoder_config()["hidden_channels"] != self.config.encoder_hidden:
            raise InputError(f"{path} has a CamVidEncoder of width {weights.encoder_config()['hidden_channels']}; "
                             f"set the encoder width to match")
        self.camera_encoder.load_weights(weights.encoder)

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    def _autocast(self):
        mode = self.config.autocast
        if mode == "none" or (mode == "auto" and self.device.type != "cuda"):
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- inputs, exactly as at inference ---------------------------------------------------------
    def _text(self) -> torch.Tensor:
        if self.text_embeds is None:
            from ex4d.diffusion.pipeline import DEFAULT_PROMPT

            prompt = self.config.prompt if self.config.prompt is not None else DEFAULT_PROMPT
            with torch.no_grad():
                embeds = self.pipe._encode_text(prompt, self.device, self.transformer.dtype)
            self.register_buffer("text_embeds", embeds, persistent=False)
        return self.text_embeds

    def condition(self, video: torch.Tensor, mask: torch.Tensor, seed: int) -> dict:
        """Inference-identical inputs for one clip: video (T, H, W, 3) [0, 1], mask (T, H, W) bool.

        Returns cond/mask' (1, 3, T, H, W), the first-frame image (1, 3, H, W) in [-1, 1] and the
        erosion sizes drawn from ``seed``.
        """
        from ex4d.diffusion.conditioning import (erode_masks, first_frame_uint8, image_to_model_range,
                                                 sample_erosion_sizes, scale_condition)

        num_frames = video.shape[0]
        sizes = sample_erosion_sizes(num_frames, seed) if self.config.erode else [0] * num_frames
        # On the mask's own device: max-pool erosion of a 0/1 mask is exact anywhere (no rounding),
        # and a CPU round trip costs seconds per 49x512x512 clip.
        eroded = erode_masks(mask, sizes).to(video.device)
        cond, mask_scaled = scale_condition(video, eroded)
        # What the pipeline hands CLIP and the y latent when no image is given (EX4DPipeline.__call__).
        image = image_to_model_range(first_frame_uint8(cond))
        return {"cond": cond, "mask": mask_scaled, "image": image, "kernel_sizes": sizes}

    def _cached_vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        import hashlib

        from ex4d.diffusion.pipeline import EX4DPipeline

        data = video.detach().float().cpu().contiguous().numpy()
        key = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest() + str(data.shape)
        if key in self._vae_cache:
            self._vae_cache[key] = self._vae_cache.pop(key)  # most recently used last
            return self._vae_cache[key].to(self.device)
        latent = EX4DPipeline._vae_encode(self.pipe, video)
        self._vae_cache[key] = latent.detach().cpu()
        while len(self._vae_cache) > self.config.cache_size:
            self._vae_cache.pop(next(iter(self._vae_cache)))
        return latent

    def _clip_encodings(self, index: int, video: torch.Tensor, image: torch.Tensor):
        """(x0 (1, 16, T', h, w) normalised VAE latent, CLIP features (1, 257, C)) of one clip, no grad."""
        if self.config.cache_encodings and index in self._cache:
            return tuple(t.to(self.device) for t in self._cache[index])
        with torch.no_grad():
            target = video.permute(3, 0, 1, 2).unsqueeze(0) * 2.0 - 1.0  # (1, 3, T, H, W) in [-1, 1]
            x0 = self.pipe._vae_encode(target.to(self.device))
            image_embeds = self.pipe.encode_image(image.to(self.device), self.device)
        if self.config.cache_encodings:
            self._cache[index] = (x0.cpu(), image_embeds.cpu())
        return x0, image_embeds

    def prepare(self, batch: dict) -> dict:
        """Per-sample inputs for a collated batch (see module doc)."""
        videos, masks, seeds = batch["video"], batch["mask"], batch["seed"]
        indices = batch.get("index", torch.arange(len(videos)))
        rows = {k: [] for k in ("x0", "image_embeds", "y", "tokens", "noise", "sigma", "weight")}
        for b in range(len(videos)):
            seed = int(seeds[b])
            generator = torch.Generator().manual_seed(derive_seed(seed, 0))
            inputs = self.condition(videos[b].float(), masks[b].bool(), derive_seed(seed, 1))
            x0, image_embeds = self._clip_encodings(int(indices[b]), videos[b].float(), inputs["image"])
            # y and the camera tokens from the pipeline's own code; the VAE and everything before the
            # encoder are frozen, so only the encoder records a graph here.
            y, tokens = self.pipe.prepare_condition(inputs["cond"].to(self.device), inputs["mask"].to(self.device),
                                                    inputs["image"].to(self.device), self.device)
            sigma, weight = self.objective.sample(generator)
            rows["noise"].append(torch.randn(x0.shape, generator=generator, dtype=torch.float32))
            for key, value in (("x0", x0), ("image_embeds", image_embeds), ("y", y), ("tokens", tokens)):
                rows[key].append(value)
            rows["sigma"].append(sigma)
            rows["weight"].append(weight)
        out = {k: torch.cat([t.to(self.device) for t in rows[k]]) for k in ("x0", "image_embeds", "y", "tokens",
                                                                           "noise")}
        out["sigma"] = torch.tensor(rows["sigma"], dtype=torch.float32, device=self.device)
        out["weight"] = torch.tensor(rows["weight"], dtype=torch.float32, device=self.device)
        return out

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, image_embeds: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        """Velocity (B, 16, T', h, w) float32 for noisy latents, as the sampler's transformer call makes it."""
        dtype = self.transformer.dtype
        text = self._text().to(self.device, dtype).expand(len(x_t), -1, -1)
        latent_input = torch.cat([x_t, y], dim=1).to(dtype)
        with self._autocast(), self.injector.active(tokens):
            out = self.transformer(hidden_states=latent_input, timestep=sigma * 1000.0, encoder_hidden_states=text,
                                   encoder_hidden_states_image=image_embeds.to(dtype), return_dict=False)[0]
        return out.float()

    def forward(self, batch: dict) -> dict:
        inputs = self.prepare(batch)
        x_t, target = self.objective.noisy(inputs["x0"], inputs["noise"], inputs["sigma"])
        prediction = self.predict(x_t, inputs["sigma"], inputs["y"], inputs["image_embeds"], inputs["tokens"])
        loss = self.objective.loss(prediction, target, inputs["weight"])
        return {"loss": loss, "sigma": inputs["sigma"]}

    # -- outputs ------------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA tensors in PEFT naming without the adapter name (``blocks.0.attn1.to_q.lora_A.weight``)."""
        from peft import get_peft_model_state_dict

        from ex4d.diffusion.adapter import ADAPTER_NAME

        return get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER_NAME)

    @staticmethod
    def split_trainable(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(LoRA as :meth:`lora_state_dict` names it, CamVidEncoder state dict) from trainable tensors.

        Works on tensors gathered from FSDP shards, where the module's own state dicts would
        hold DTensors. Names: ``transformer.blocks.0.attn1.to_q.lora_A.<adapter>.weight`` ->
        ``blocks.0.attn1.to_q.lora_A.weight``; ``camera_encoder.<name>`` -> ``<name>``.
        """
        from ex4d.diffusion.adapter import ADAPTER_NAME

        lora, encoder = {}, {}
        for name, value in state.items():
            if name.startswith("transformer.") and "lora_" in name:
                key = name[len("transformer."):]
                for part in ("lora_A", "lora_B"):
                    key = key.replace(f".{part}.{ADAPTER_NAME}.", f".{part}.")
                lora[key] = value
            elif name.startswith("camera_encoder."):
                encoder[name[len("camera_encoder."):]] = value
            else:
                raise InputError(f"unexpected trainable tensor {name!r}: neither LoRA nor CamVidEncoder")
        return lora, encoder

    def export_adapter(self, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> dict[str, Path]:
        """``adapter.safetensors`` + ``adapter_config.json`` + ``ex4d.ckpt`` (what ``ex4d generate`` loads).

        state: full trainable tensors (see :meth:`TrainSystem.export_adapter`); None reads the module.
        """
        from ex4d.diffusion.weights.adapter import save_ex4d_adapter

        if tuple(self.config.lora_targets) != REFERENCE_TARGETS:
            return {}  # not loadable by the generation stage; the checkpoint keeps trainable.safetensors
        if state is None:
            lora, encoder = self.lora_state_dict(), self.camera_encoder.state_dict()
        else:
            lora, encoder = self.split_trainable(state)
        return save_ex4d_adapter(out_dir, lora, encoder,
                                 alpha=self.config.lora_alpha, transformer_config=dict(self.transformer.config),
                                 dtype=torch.float32)

    def describe(self) -> dict:
        return {"model": self.config.describe(),
                "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad)}

    def resume_mismatches(self, saved: dict) -> list[str]:
        return model_mismatches(self.config, saved)

    @torch.no_grad()
    def validate(self, out_dir: Path, step: int) -> dict[str, float]:
        """Sample every validation pair with the pipeline; write generated/condition videos; PSNR."""
        from ex4d.io.video import to_uint8, write_video

        if not self.validation_items:
            return {}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = self._text()
        negative = self.negative_text_embeds
        if negative is None and self.text_encoder is not None:
            from ex4d.diffusion.pipeline import DEFAULT_NEGATIVE_PROMPT

            negative = self.pipe._encode_text(DEFAULT_NEGATIVE_PROMPT, self.device, self.transformer.dtype)
        # Without a negative prompt embedding there is no CFG branch to guide with.
        guidance = self.config.validation_guidance if negative is not None else 1.0
        scores = []
        for i, (video, mask) in enumerate(self.validation_items):
            video_t = torch.as_tensor(video, dtype=torch.float32)
            inputs = self.condition(video_t, torch.as_tensor(mask, dtype=torch.bool), seed=i)
            with self._autocast():
                frames = self.pipe(inputs["cond"], inputs["mask"], prompt_embeds=text, negative_prompt_embeds=negative,
                                   num_inference_steps=self.config.validation_steps, guidance_scale=guidance,
                                   generator=torch.Generator().manual_seed(i), output_type="np").frames[0]
            truth = to_uint8(np.asarray(video))
            mse = np.mean((frames.astype(np.float64) - truth.astype(np.float64)) ** 2)
            scores.append(10.0 * np.log10(255.0 ** 2 / max(mse, 1e-10)))
            write_video(out_dir / f"sample_{i:02d}.mp4", frames, 15.0)
            cond01 = (inputs["cond"][0].permute(1, 2, 3, 0).cpu().numpy() + 1.0) * 0.5
            write_video(out_dir / f"condition_{i:02d}.mp4", to_uint8(cond01), 15.0)
        return {"psnr": float(np.mean(scores))}
