"""``EX4DPipeline``: Wan2.1-I2V-14B + the EX-4D adapter, in diffusers' pipeline idiom.

Inputs are the scaled geometry condition of :mod:`ex4d.diffusion.conditioning` (cond and mask'
videos, (1, 3, T, H, W)) and the first frame. The pipeline reproduces the reference's sampling
(spec 7.3-7.10):

* text: umT5 on the fixed prompt / negative prompt, cut to the true length and zero-padded to 512
  (diffusers' Wan attention takes the last 512 context tokens as the text's, a constant: a DiT config
  asking for another text length is refused when it loads, and embeddings of another length here);
* image: CLIP ViT-H/14 on frame 0 (bicubic 224x224 resize of the [-1, 1] image, as the
  reference does, then CLIP normalisation), penultimate hidden state -> (1, 257, 1280);
* y: VAE([I0; zeros]) normalised (16 ch) after the 4-channel "frame known" map -> (1, 20, T', h, w);
* camera tokens: CamVidEncoder(VAE(cond), VAE(2 * mask' - 1)) -> (1, 5120, T', h/2, w/2), added
  after the patch embedding through a forward hook, in both CFG branches;
* flow-matching Euler, shift 5, sigmas 5s/(1+4s) for s = linspace(1, 0, 26)[:25], t = 1000 sigma,
  CFG on the text only: v = v_neg + g (v_pos - v_neg); noise N(0, 1) float32 from a CPU generator
  (steps, guidance and shift are settable: :data:`SAMPLER_PRESETS`);
* untiled VAE decode, clamp to [-1, 1], uint8 frames (rounded).

Shapes: latents (B, 16, T', h, w) with T' = (T - 1) / 4 + 1, h = H / 8, w = W / 8.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import re
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput

from ex4d.diffusion.adapter import CamVidEncoder, PatchEmbeddingInjector
from ex4d.diffusion.conditioning import (encoder_mask_input, first_frame_latent_mask, first_frame_uint8,
                                         image_to_model_range)
from ex4d.diffusion.weights.wan import TEXT_LENGTH, check_text_length
from ex4d.errors import InputError

logger = logging.getLogger(__name__)

#: The reference's fixed positive prompt (spec 7.8).
DEFAULT_PROMPT = ("4K ultra HD, surround motion, realistic tone, panoramic shot, wide-angle view, "
                  "cinematic quality")
#: Wan's standard negative prompt, English form (spec 7.8).
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards")
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0
FLOW_SHIFT = 5.0
#: Sampler presets (``--preset``): steps, guidance scale and flow shift. ``full`` is the reference's
#: sampling. ``fast`` is the step/CFG-distillation LoRAs' (LightX2V's 4-step Wan2.1-I2V LoRA): 4 steps,
#: no CFG (one forward per step), shift 5; with the reference's sigma rule below, 4 steps at shift 5
#: give exactly the sigmas they were trained on, [1, 0.9375, 0.8333, 0.625] (t = 1000 sigma), with
#: the same deterministic Euler update. Needs such a LoRA (``--lora``) to give a usable video.
SAMPLER_PRESETS = {
    "full": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "shift": FLOW_SHIFT},
    "fast": {"steps": 4, "guidance": 1.0, "shift": 5.0},
}
#: CLIP ViT-H/14 input size and normalisation (open-clip / OpenAI constants).
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_sigmas(num_steps: int = DEFAULT_STEPS) -> np.ndarray:
    """The reference's *unshifted* sigmas linspace(1, 0, n + 1)[:n]; the scheduler applies shift 5."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:num_steps]


def make_scheduler(shift: float = FLOW_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler with ``shift`` (the reference's 5); pass ``reference_sigmas`` to set_timesteps.

    The scheduler maps each sigma s to shift * s / (1 + (shift - 1) * s).
    """
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def sampler_sigmas(num_steps: int = DEFAULT_STEPS, shift: float = FLOW_SHIFT) -> list[float]:
    """The shifted sigmas the sampler visits (num_steps of them, then 0), as the pipeline sets them."""
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(sigmas=reference_sigmas(num_steps).tolist())
    return [float(s) for s in scheduler.sigmas]


def _prompt_clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unaffected
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def encode_text(tokenizer, text_encoder, prompt: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """umT5 embeddings (1, 512, 4096) of ``prompt``: true-length tokens then zeros, as the reference pads
    them (the pipeline's text encoding; also used to fill the prompt cache without a pipeline)."""
    inputs = tokenizer([_prompt_clean(prompt)], padding="max_length", max_length=TEXT_LENGTH,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, attention = inputs.input_ids, inputs.attention_mask
    length = int(attention.gt(0).sum())
    encoder_device = _module_device(text_encoder)
    hidden = text_encoder(ids.to(encoder_device), attention.to(encoder_device)).last_hidden_state
    hidden = hidden.to(device=device, dtype=dtype)
    hidden[:, length:] = 0
    return hidden


@dataclass
class EX4DPipelineOutput(BaseOutput):
    """frames: uint8 (B, T, H, W, 3) ndarray ("np"), uint8 tensor ("pt"), or latents (B, 16, T', h, w)."""

    frames: Any


@dataclass
class FirstFrameContext:
    """What the sampler derives from frame 0 alone, computed ahead (:meth:`EX4DPipeline.first_frame_context`).

    image: (H, W, 3) uint8, the frame 0 it was computed from; num_frames: the clip's T.
    image_embeds: CLIP features (1, 257, 1280); y: (1, 20, T', h, w), the known-frame map and the
    first-frame latent. The sampler takes it only for the same image and T.
    """

    image: np.ndarray
    num_frames: int
    image_embeds: torch.Tensor
    y: torch.Tensor

    def matches(self, image: np.ndarray, num_frames: int) -> bool:
        return int(num_frames) == self.num_frames and np.array_equal(np.asarray(image), self.image)


@dataclass
class ConditionContext:
    """The camera tokens of a condition, computed ahead (:class:`ConditionEncodeStream`), with the scaled
    condition they were computed from: cond (1, 3, T, H, W) in [-1, 1], mask (1, 3, T, H, W) in
    {-1, +1}; tokens (1, C, T', h/2, w/2). The sampler takes them only for an equal cond and mask."""

    cond: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor

    def matches(self, cond: torch.Tensor, mask: torch.Tensor) -> bool:
        if cond is self.cond and mask is self.mask:  # (run_generate hands over the tensors it compared)
            return True
        return tuple(cond.shape) == tuple(self.cond.shape) and tuple(mask.shape) == tuple(self.mask.shape) and \
            torch.equal(cond.to(self.cond.device), self.cond) and torch.equal(mask.to(self.mask.device), self.mask)


class ConditionEncodeStream:
    """The condition's two VAE encodes and the camera encoder, fed one frame at a time as frames arrive.

    stream = pipe.condition_encode_stream(); stream.add(cond_frame, mask_frame) for each frame in
    order (each (1, 3, 1, H, W), scaled as :func:`ex4d.diffusion.conditioning.scale_condition`
    gives them); context = stream.finish().

    Each encode runs the VAE's encoder on the same time chunks as ``AutoencoderKLWan.encode`` of the
    whole video (frame 0, then 4 frames at a time, its causal cache carried over), with a cache of
    its own, so the latents, and the tokens, are those of :meth:`EX4DPipeline.prepare_condition`.
    Only for a VAE without patching or tiling (Wan2.1's); ``supported`` says whether it applies.
    """

    def __init__(self, pipe: "EX4DPipeline"):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.pipe, vae = pipe, pipe.vae
        self.supported = getattr(vae.config, "patch_size", None) is None and not getattr(vae, "use_tiling", False)
        convs = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        self._caches = {"cond": [None] * convs, "mask": [None] * convs}
        self._pending: dict[str, list] = {"cond": [], "mask": []}
        self._chunks: dict[str, list] = {"cond": [], "mask": []}
        self._frames: dict[str, list] = {"cond": [], "mask": []}

    def add(self, cond_frame: torch.Tensor, mask_frame: torch.Tensor) -> None:
        """Take the next frame; encode a chunk once it is complete."""
        self._frames["cond"].append(cond_frame)
        self._frames["mask"].append(mask_frame)
        for name, frame in (("cond", cond_frame), ("mask", encoder_mask_input(mask_frame))):  # {-3, +1} (R)
            pending = self._pending[name]
            pending.append(frame)
            if len(pending) == (1 if not self._chunks[name] else self.pipe.vae_scale_factor_temporal):
                self._encode_chunk(name, torch.cat(pending, dim=2))
                pending.clear()

    @torch.no_grad()
    def _encode_chunk(self, name: str, chunk: torch.Tensor) -> None:
        vae = self.pipe.vae
        chunk = chunk.to(device=_module_device(vae), dtype=vae.dtype)
        self._chunks[name].append(vae.encoder(chunk, feat_cache=self._caches[name], feat_idx=[0]))

    @torch.no_grad()
    def finish(self) -> ConditionContext:
        """The tokens, once every frame (4k + 1 of them) went in."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if any(self._pending.values()) or not self._chunks["cond"]:
            raise ValueError(f"{len(self._frames['cond'])} frames went in; the VAE needs 4k+1")
        latents = {}
        for name in ("cond", "mask"):
            moments = self.pipe.vae.quant_conv(torch.cat(self._chunks[name], dim=2))
            latents[name] = self.pipe._normalised_latent(DiagonalGaussianDistribution(moments).mode())
        self._caches = self._chunks = None  # the encoder's activations go now
        tokens = self.pipe._camera_tokens(latents["cond"], latents["mask"], self.pipe._execution_device)
        return ConditionContext(cond=torch.cat(self._frames["cond"], dim=2), mask=torch.cat(self._frames["mask"], dim=2),
                                tokens=tokens)


class EX4DPipeline(DiffusionPipeline):
    """Re-film a video from its rendered geometry condition with Wan2.1-I2V + the EX-4D adapter.

    Components: tokenizer + text_encoder (umT5-XXL), image_encoder (CLIPVisionModel, ViT-H/14),
    vae (AutoencoderKLWan), transformer (WanTransformer3DModel, LoRA installed), camera_encoder
    (:class:`CamVidEncoder`), scheduler (flow-match Euler, shift 5).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->camera_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "image_encoder"]

    def __init__(self, tokenizer, text_encoder, image_encoder, vae: AutoencoderKLWan,
                 transformer: WanTransformer3DModel, camera_encoder: CamVidEncoder,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        if transformer is not None:  # a config asking for another text length cannot run (weights.wan.TEXT_LENGTH)
            check_text_length(dict(transformer.config), "the transformer config")
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder, vae=vae,
                              transformer=transformer, camera_encoder=camera_encoder, scheduler=scheduler)
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.batch_cfg = False  # set by apply_performance (batched only when offloading)
        self._injector: PatchEmbeddingInjector | None = None

    # -----------------------------------------------------------------------------------------
    # Checks and encoders

    @property
    def injector(self) -> PatchEmbeddingInjector:
        if self._injector is None:
            self._injector = PatchEmbeddingInjector(self.transformer)
        return self._injector

    def check_inputs(self, cond: torch.Tensor, mask: torch.Tensor, image, guidance_scale: float,
                     num_inference_steps: int, prompt, prompt_embeds, negative_prompt_embeds) -> None:
        """Raise :class:`InputError` (a ValueError) for inputs the model cannot take."""
        for name, x in (("cond", cond), ("mask", mask)):
            if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[:2] != (1, 3):
                raise InputError(f"{name} must be a (1, 3, T, H, W) tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if cond.shape != mask.shape:
            raise InputError(f"cond {tuple(cond.shape)} and mask {tuple(mask.shape)} differ in shape")
        num_frames, height, width = cond.shape[2:]
        if (num_frames - 1) % self.vae_scale_factor_temporal:
            raise InputError(f"the condition has {num_frames} frames; the generator needs 4k+1 (e.g. 49)")
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % multiple or width % multiple:
            raise InputError(f"the condition is {height}x{width}; both sides must be multiples of {multiple}")
        if cond.min() < -1.0 - 1e-4 or cond.max() > 1.0 + 1e-4:
            raise InputError("cond must lie in [-1, 1] (scale with ex4d.diffusion.conditioning.scale_condition)")
        if not torch.all((mask == 1.0) | (mask == -1.0)):
            raise InputError("mask must hold only -1 and +1 (mask' = 2m - 1)")
        if image is not None and tuple(np.asarray(image).shape[:2]) != (height, width):
            raise InputError(f"first frame is {np.asarray(image).shape[:2]}, the condition {height}x{width}")
        if num_inference_steps < 1:
            raise InputError("num_inference_steps must be >= 1")
        if guidance_scale < 0:
            raise InputError("guidance_scale must be >= 0")
        if prompt_embeds is None and (self.text_encoder is None or self.tokenizer is None):
            raise InputError("no text encoder loaded: pass prompt_embeds (and negative_prompt_embeds)")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError("prompt must be a string")
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3
                                       or embeds.shape[1] != TEXT_LENGTH):
                shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise InputError(f"{name} must be (B, {TEXT_LENGTH}, text_dim), got {shape}: diffusers' Wan attention "
                                 f"takes the last {TEXT_LENGTH} context tokens as the text's, so other lengths would "
                                 f"mix image and text tokens; zero-pad to {TEXT_LENGTH} as encode_prompt does")

    def _encode_text(self, prompt: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """umT5 embeddings (1, 512, 4096): true-length tokens then zeros, as the reference pads them."""
        return encode_text(self.tokenizer, self.text_encoder, prompt, device, dtype)

    def context_dtype(self) -> torch.dtype:
        """The dtype of the DiT's inputs (text and image context, latents): bf16 under fp8 storage."""
        return self.transformer.dtype if not _has_layerwise_casting(self.transformer) else torch.bfloat16

    def encode_prompt(self, prompt: str, negative_prompt: str | None, do_classifier_free_guidance: bool,
                      device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(positive, negative) text embeddings, each (1, 512, 4096); negative is None without CFG."""
        positive = self._encode_text(prompt, device, dtype)
        negative = None
        if do_classifier_free_guidance:
            negative = self._encode_text(negative_prompt if negative_prompt is not None else "", device, dtype)
        return positive, negative

    def encode_image(self, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        """CLIP features (1, 257, 1280) of frame 0, image (1, 3, H, W) in [-1, 1].

        Like the reference (not the PIL processor of diffusers' Wan pipeline): torch bicubic resize
        to 224x224 without antialiasing, [0, 1], CLIP mean/std; output of the penultimate layer.
        """
        encoder_device = _module_device(self.image_encoder)
        dtype = self.image_encoder.dtype
        x = F.interpolate(image.float().to(encoder_device), size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic",
                          align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=encoder_device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=encoder_device).view(1, 3, 1, 1)
        x = ((x * 0.5 + 0.5) - mean) / std
        out = self.image_encoder(pixel_values=x.to(dtype), output_hidden_states=True)
        return out.hidden_states[-2].to(device)

    def _vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latent mean (B, 16, T', h, w) of a [-1, 1]-scaled video (B, 3, T, H, W)."""
        vae_device = _module_device(self.vae)
        return self._normalised_latent(self.vae.encode(video.to(device=vae_device, dtype=self.vae.dtype)).latent_dist.mode())

    def _normalised_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """(latent - the VAE's latents_mean) / latents_std, in float32."""
        mean = torch.tensor(self.vae.config.latents_mean, device=latent.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=latent.device).view(1, -1, 1, 1, 1)
        return (latent.float() - mean) / std

    def condition_encode_stream(self) -> ConditionEncodeStream:
        """A :class:`ConditionEncodeStream`: the condition's encodes fed frame by frame (e.g. while recon renders)."""
        return ConditionEncodeStream(self)

    def _camera_tokens(self, cond_latent: torch.Tensor, mask_latent: torch.Tensor, device: torch.device) -> torch.Tensor:
        encoder_device = _module_device(self.camera_encoder)
        return self.camera_encoder(cond_latent.to(encoder_device), mask_latent.to(encoder_device)).to(device)

    def prepare_latents(self, shape: tuple[int, ...], generator: torch.Generator | None,
                        device: torch.device, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Initial noise N(0, 1) float32 drawn on the CPU (device-independent, like the reference)."""
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise InputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=torch.float32)
        if generator is not None and generator.device.type != "cpu":
            raise InputError("pass a CPU torch.Generator: the noise is drawn on the CPU for reproducibility")
        return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu").to(device)

    def first_frame_condition(self, image: torch.Tensor, num_frames: int, device: torch.device) -> torch.Tensor:
        """y (1, 20, T', h, w): Wan I2V's known-frame map and the latent of frame 0 followed by T - 1
        black frames. image: (1, 3, H, W) in [-1, 1]."""
        first = image.unsqueeze(2)  # (1, 3, 1, H, W)
        height, width = first.shape[3:]
        video = torch.cat([first, first.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        y_latent = self._vae_encode(video)
        known = first_frame_latent_mask(num_frames, y_latent.shape[3], y_latent.shape[4],
                                        self.vae_scale_factor_temporal).to(y_latent.device)
        return torch.cat([known, y_latent], dim=1).to(device)

    @torch.no_grad()
    def first_frame_context(self, image: np.ndarray, num_frames: int) -> FirstFrameContext:
        """CLIP features and y of frame 0, ahead of the call (e.g. while the rest of the condition loads).

        image: (H, W, 3) uint8, as ``__call__`` takes it; num_frames: the condition's T. Pass the result
        as ``__call__(..., first_frame_context=)``: the same numbers as computing them in the call.
        Gradients are off here, not only in ``__call__``: grad mode is per thread, and this runs on a
        helper thread, where autograd would otherwise keep every VAE activation (out of memory on a
        full-size model)."""
        device = self._execution_device
        image = np.ascontiguousarray(image)
        model_range = image_to_model_range(torch.from_numpy(image).permute(2, 0, 1).float())
        embeds = self.encode_image(model_range, device)
        return FirstFrameContext(image=image.copy(), num_frames=int(num_frames), image_embeds=embeds,
                                 y=self.first_frame_condition(model_range, int(num_frames), device))

    def prepare_condition(self, cond: torch.Tensor, mask: torch.Tensor, image: torch.Tensor,
                          device: torch.device, y: torch.Tensor | None = None,
                          tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (1, 20, T', h, w), camera tokens (1, C, T', h/2, w/2)) from the scaled condition.

        y: computed ahead by :meth:`first_frame_condition` (then ``image`` is not encoded again);
        tokens: computed ahead by a :class:`ConditionEncodeStream` (then cond and mask are not)."""
        if y is None:
            y = self.first_frame_condition(image, cond.shape[2], device)
        if tokens is None:
            cond_latent = self._vae_encode(cond)
            mask_latent = self._vae_encode(encoder_mask_input(mask))  # {-3, +1}: the double scaling (R)
            tokens = self._camera_tokens(cond_latent, mask_latent, device)
        return y, tokens.to(device)

    # -----------------------------------------------------------------------------------------
    # Sampling

    def _predict(self, latent_input, timestep, positive, negative, image_embeds, guidance_scale, batch_cfg):
        """Velocity (float32) with text-only CFG; batched CFG runs one forward of batch 2."""
        transformer = self.transformer
        if negative is None:
            return transformer(hidden_states=latent_input, timestep=timestep, encoder_hidden_states=positive,
                               encoder_hidden_states_image=image_embeds, return_dict=False)[0].float()
        if batch_cfg:
            out = transformer(hidden_states=latent_input.repeat(2, 1, 1, 1, 1), timestep=timestep.repeat(2),
                              encoder_hidden_states=torch.cat([positive, negative]),
                              encoder_hidden_states_image=image_embeds.repeat(2, 1, 1), return_dict=False)[0]
            v_pos, v_neg = out.float().chunk(2)
        else:
            v_pos = transformer(hidden_states=latent_input, timestep=timestep, encoder_hidden_states=positive,
                                encoder_hidden_states_image=image_embeds, return_dict=False)[0].float()
            v_neg = transformer(hidden_states=latent_input, timestep=timestep, encoder_hidden_states=negative,
                                encoder_hidden_states_image=image_embeds, return_dict=False)[0].float()
        return v_neg + guidance_scale * (v_pos - v_neg)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, mask: torch.Tensor, image: np.ndarray | torch.Tensor | None = None,
                 prompt: str | None = DEFAULT_PROMPT, negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, batch_cfg: bool | None = None,
                 shift: float | None = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict | None] | None = None,
                 frame_sink: Callable[[np.ndarray], None] | None = None,
                 first_frame_context: FirstFrameContext | None = None,
                 condition_context: ConditionContext | None = None):
        """Generate the video.

        cond, mask: (1, 3, T, H, W) from :func:`ex4d.diffusion.conditioning.load_condition` (cond in
        [-1, 1], mask' in {-1, +1}). image: frame 0 as uint8 (H, W, 3); default: derived from
        cond[:, :, 0] the reference's way. output_type: "np" | "pt" (uint8 (B, T, H, W, 3)) or
        "latent". callback_on_step_end(pipe, step, t, {"latents": ...}) may return new latents.
        shift: the flow shift of this call (default: the scheduler's, 5 as the reference). guidance_scale
        1 runs one forward per step (no CFG: the negative prompt is neither encoded nor used).
        frame_sink: with output_type "np", called with each decoded uint8 frame (H, W, 3), in order, while
        the VAE goes on decoding the next ones (e.g. a background video writer's ``write``); see
        :meth:`decode_latents_streamed`. first_frame_context: from :meth:`first_frame_context`, used when
        it was computed from this call's ``image`` (uint8 (H, W, 3)) and frame count, else ignored.
        condition_context: from a :class:`ConditionEncodeStream`, used when computed from an equal
        ``cond`` and ``mask``, else ignored.
        """
        if output_type not in ("np", "pt", "latent"):
            raise InputError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        self.check_inputs(cond, mask, image, guidance_scale, num_inference_steps, prompt, prompt_embeds,
                          negative_prompt_embeds)
        device = self._execution_device
        dtype = self.context_dtype()
        do_cfg = guidance_scale != 1.0
        batch_cfg = self.batch_cfg if batch_cfg is None else batch_cfg

        # 1. Text and image context.
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, negative_prompt, do_cfg, device, dtype)
        elif do_cfg and negative_prompt_embeds is None:
            raise InputError("pass negative_prompt_embeds together with prompt_embeds when guidance_scale != 1")
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype) if do_cfg else None
        ahead = None
        if first_frame_context is not None and image is not None and \
                first_frame_context.matches(image, cond.shape[2]):
            ahead = first_frame_context
        elif first_frame_context is not None:
            logger.warning("the first-frame context given is for another frame 0 or length; computing it again")
        if image is None:
            image = first_frame_uint8(cond)
        else:
            image = torch.as_tensor(np.asarray(image)).permute(2, 0, 1).float()
        image = image_to_model_range(image)  # (1, 3, H, W) in [-1, 1]
        if image_embeds is None:
            image_embeds = ahead.image_embeds if ahead is not None else self.encode_image(image, device)
        image_embeds = image_embeds.to(device=device, dtype=dtype)

        # 2. Geometry condition and first-frame latent.
        tokens = None
        if condition_context is not None and condition_context.matches(cond, mask):
            tokens = condition_context.tokens
        elif condition_context is not None:
            logger.warning("the condition context given is for another condition; encoding the condition again")
        y, tokens = self.prepare_condition(cond.float(), mask.float(), image, device,
                                           y=ahead.y.to(device) if ahead is not None else None, tokens=tokens)
        num_frames, height, width = cond.shape[2:]
        shape = (1, self.vae.config.z_dim, (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        latents = self.prepare_latents(shape, generator, device, latents)
        y = y.to(dtype)

        # 3. Denoising: flow-match Euler on the reference's sigma rule (25 steps, shift 5 by default).
        scheduler = self.scheduler
        if shift is not None and float(shift) != float(scheduler.config.shift):
            # A scheduler of this call only: the pipeline's own keeps its shift for the next call.
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=float(shift))
        scheduler.set_timesteps(sigmas=reference_sigmas(num_inference_steps).tolist(), device=device)
        timesteps = scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.injector.active(tokens), self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_input = torch.cat([latents, y], dim=1).to(dtype)
                timestep = t.expand(latents.shape[0])
                velocity = self._predict(latent_input, timestep, prompt_embeds, negative_prompt_embeds,
                                         image_embeds, guidance_scale, batch_cfg)
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    result = callback_on_step_end(self, i, t, {"latents": latents})
                    if result and "latents" in result:
                        latents = result["latents"]
                progress_bar.update()

        # 4. Decode.
        if output_type == "latent":
            frames = latents
        else:
            if frame_sink is not None and output_type == "np":
                frames = self.decode_latents_streamed(latents, frame_sink)
            else:
                frames = self.decode_latents(latents)
                if output_type == "np":
                    frames = frames.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return EX4DPipelineOutput(frames=frames)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, T', h, w) -> uint8 frames (B, T, H, W, 3), rounded."""
        return _to_uint8_frames(self._decode_video(latents))

    def _decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, T', h, w) -> the VAE's video (B, 3, T, H, W) in [-1, 1]."""
        vae_device = _module_device(self.vae)
        mean = torch.tensor(self.vae.config.latents_mean, device=vae_device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=vae_device).view(1, -1, 1, 1, 1)
        z = latents.to(device=vae_device, dtype=torch.float32) * std + mean
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]

    def decode_latents_streamed(self, latents: torch.Tensor, frame_sink: Callable[[np.ndarray], None]) -> np.ndarray:
        """:meth:`decode_latents` to host memory, handing each frame to ``frame_sink`` as soon as its chunk
        is decoded; returns the same uint8 frames (B, T, H, W, 3) as a numpy array.

        The Wan decoder runs once per latent frame (1 video frame, then 4 at a time); a forward hook
        turns each chunk into uint8 on the GPU (the same elementwise clamp and rounding as
        :meth:`decode_latents`, so the same values), copies it to pinned host memory without waiting,
        and a helper thread waits for the copy and calls ``frame_sink``. So a video encoder fed by the
        sink works while the decoder computes the later chunks. Falls back to a whole decode, then
        the sink, where chunks cannot be seen: a tiled VAE or a batch of several videos.
        """
        from concurrent.futures import ThreadPoolExecutor

        vae = self.vae
        if getattr(vae, "use_tiling", False) or latents.shape[0] != 1 or vae.config.patch_size is not None:
            return self.decode_latents_then_hand_over(latents, frame_sink)
        cuda = _module_device(vae).type == "cuda"
        chunks: list[torch.Tensor] = []
        pending: list = []

        def deliver(chunk: torch.Tensor, copied) -> None:
            if copied is not None:
                copied.synchronize()
            for frame in chunk[0].numpy():
                frame_sink(frame)

        def on_chunk(module, args, output) -> None:
            # (1, 3, t, H, W) in [-1, 1] (unclamped) -> uint8 (1, t, H, W, 3) on the host.
            frames = _to_uint8_frames(output)
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=cuda)
            host.copy_(frames, non_blocking=cuda)
            copied = None
            if cuda:
                copied = torch.cuda.Event()
                copied.record()
            chunks.append(host)
            pending.append(sink_thread.submit(deliver, host, copied))

        with ThreadPoolExecutor(1, thread_name_prefix="decoded frames") as sink_thread:
            handle = vae.decoder.register_forward_hook(on_chunk)
            try:
                self._decode_video(latents)  # the chunks are taken by the hook
            finally:
                handle.remove()
        for future in pending:  # all ran (the pool's exit waits); the first failure is raised
            future.result()
        return torch.cat(chunks, dim=1).numpy()

    def decode_latents_then_hand_over(self, latents: torch.Tensor,
                                      frame_sink: Callable[[np.ndarray], None]) -> np.ndarray:
        """:meth:`decode_latents` of the whole video to host memory, then every frame of video 0 to
        ``frame_sink``: the unstreamed form of :meth:`decode_latents_streamed` (same result)."""
        frames = self.decode_latents(latents).cpu().numpy()
        for frame in frames[0]:
            frame_sink(frame)
        return frames


def _to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) decoded video in [-1, 1] -> uint8 (B, T, H, W, 3), rounded (float32 arithmetic)."""
    video = video.float().clamp(-1.0, 1.0)
    frames = torch.round((video + 1.0) * 127.5).to(torch.uint8)
    return frames.permute(0, 2, 3, 4, 1).contiguous()


def _module_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes, also under diffusers' offload hooks (which keep weights on the CPU)."""
    from diffusers.utils.torch_utils import get_module_execution_device

    explicit = getattr(module, "_ex4d_execution_device", None)  # set by performance.PinnedSwap
    if explicit is not None:
        return torch.device(explicit)
    return torch.device(get_module_execution_device(module))


def _has_layerwise_casting(module: torch.nn.Module) -> bool:
    return any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in module.parameters())


def build_pipeline(components: dict, adapter_weights: Any | None = None, options: Any | None = None,
                   device: torch.device | str = "cpu", loras=()) -> EX4DPipeline:
    """Assemble an :class:`EX4DPipeline` from ``load_wan_components``' dict and the adapter weights.

    adapter_weights: ``load_ex4d_adapter``'s result, or None for a fresh (no-op) adapter, as used
    by training and by benchmarks with random weights. options: a
    :class:`ex4d.diffusion.performance.PerformanceOptions` (default: merged LoRA, fused QKV,
    batched CFG, everything on ``device``). loras: extra Wan LoRAs (``FILE[:STRENGTH]`` strings,
    :class:`~ex4d.diffusion.weights.lora.LoraSpec`s or prepared ones), merged after the adapter's
    LoRA and before QKV fusion, compilation and fp8. ``components`` may lack the text encoder and
    tokenizer when the prompt embeddings come from the cache (:mod:`ex4d.diffusion.prompt_cache`).
    """
    from ex4d.diffusion.adapter import apply_adapter
    from ex4d.diffusion.performance import PerformanceOptions, apply_performance
    from ex4d.diffusion.weights.lora import merge_loras

    options = options or PerformanceOptions()
    options.validate()
    transformer = components["transformer"]
    encoder, injector = apply_adapter(transformer, adapter_weights, merge=options.merge_lora)
    merge_loras(transformer, loras)
    pipe = EX4DPipeline(tokenizer=components.get("tokenizer"), text_encoder=components.get("text_encoder"),
                        image_encoder=components.get("image_encoder"), vae=components["vae"],
                        transformer=transformer, camera_encoder=encoder, scheduler=make_scheduler())
    pipe._injector = injector
    apply_performance(pipe, options, device)
    return pipe
