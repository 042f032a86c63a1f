"""DepthCrafter video depth, as EX-4D runs it (depthcrafter-spec.md).

Pipeline for frames (T, H, W, 3) in [0, 1], H and W multiples of 64 (h = H/8, w = W/8):

1. x = 2v - 1 in the model dtype. CLIP branch: clean frames -> anti-aliased squash to 224x224 ->
   CLIP mean/std -> one ``image_embeds`` per frame, E (1, T, 1024).
2. VAE branch: x + 0.02 * eps_aug (random draw no. 1) encoded in fp32, posterior mode, *unscaled*:
   C (1, T, 4, h, w).
3. Windows of 110 frames overlapping by 25 (one window when T <= 110). Unit noise of frame f is
   eps_init[f mod 110] (draw no. 2); overlap frames restart from the stitched result + noise at
   sigma_max. 5 Euler steps (EDM, v-prediction, Karras sigmas), guidance 1 = one UNet call per step.
   Windows are blended on the final latents with weights linspace(0, 1, overlap).
4. Decode latents / 0.18215 with the temporal VAE decoder in chunks of 8 frames from frame 0,
   clamp(x/2 + 0.5, 0, 1), mean over RGB -> relative disparity d (T, H, W).
5. Clip-level min-max and the reference conversion to z (:mod:`ex4d.depth.normalize`).

:meth:`DepthCrafterPipeline.__call__` runs these stages over the whole clip at once.
:meth:`DepthCrafterPipeline.stream` (what :meth:`DepthCrafter.estimate` uses) gives the same numbers
reading the clip window by window and yielding disparity as soon as the blend of the overlap makes it
final, so host memory does not grow with T; the whole-clip min-max then takes a second pass over a
temporary spill of the raw disparity.

Speed options that keep the numbers (up to kernel rounding): ``decode_batch`` (several 8-frame
chunks per decoder call; each chunk is still its own temporal batch), the single-token
cross-attention shortcut, ``channels_last``, and ``fused_group_norm`` (the VAE's GroupNorm+SiLU as
one channels-last Triton op: the temporal decode at 576x1024 goes from 4.7 s to 1.5 s eager).
:data:`FAST_KERNELS` groups the useful ones. Options that change numbers slightly, off by default:
``encode_dtype="model"`` (fp16 VAE encode, -0.2 s and -5 GiB at 576x1024) and ``compile``
(torch.compile of UNet, VAE encoder and decoder; with the fast kernels 2.5x faster than the
reference after 2-3 minutes of compilation; bench/bench_depth.py).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from ex4d.depth.normalize import disparity_stream_to_depth
from ex4d.devices import resolve_device
from ex4d.depth.weights import (DEPTHCRAFTER_UNET, SVD_IMAGE_ENCODER, SVD_VAE, assign_weights, read_config,
                                read_safetensors, resolve)
from ex4d.errors import InputError
from ex4d.types import DepthVideo

log = logging.getLogger(__name__)

#: EulerDiscreteScheduler config of SVD-xt (scheduler/scheduler_config.json, depthcrafter-spec.md 3.1).
SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "interpolation_type": "linear", "use_karras_sigmas": True,
    "sigma_min": 0.002, "sigma_max": 700.0, "timestep_spacing": "leading", "timestep_type": "continuous",
    "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
    "trained_betas": None,
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


@dataclass
class DepthCrafterSettings:
    """Inference settings. Defaults are EX-4D's call (recon.py); the speed options keep the output."""

    num_inference_steps: int = 5
    guidance_scale: float = 1.0
    window_size: int = 110
    overlap: int = 25
    seed: int = 42
    noise_aug_strength: float = 0.02
    fps_id: int = 7  # passed as is (SVD would pass fps - 1)
    motion_bucket_id: int = 127
    decode_chunk_size: int = 8  # frames per temporal decode: changes the output, keep 8
    encode_chunk_size: int = 8  # no effect on values (the encoder is per image)
    decode_batch: int = 1  # 8-frame chunks decoded per call (same values, fewer launches)
    encode_dtype: str = "float32"  # "float32" (reference) or "model" (faster, slightly different)
    single_token_attention: bool = False  # exact shortcut, but no faster in fp16 on an H100 (measured)
    channels_last: bool = False
    fused_group_norm: bool = False  # the VAE's GroupNorm(+SiLU) as one channels-last op (fused_groupnorm.py)
    compile: bool = False


#: the speed-ups that keep the numbers up to fp16 rounding (``ex4d depth --fast-kernels``; bench variant
#: ``fast_fgn`` with fp16 encode), and the same with torch.compile (``--compile``; ``fast_compile_fgn``).
FAST_KERNELS = {"channels_last": True, "single_token_attention": True, "fused_group_norm": True}
COMPILE_PRESET = {**FAST_KERNELS, "compile": True}


def speed_options(*, compile: bool = False, fast_kernels: bool = False, fp16_encode: bool = False,
                  offload: bool = False) -> dict:
    """DepthCrafter options for the speed/memory switches of the CLI and batch jobs (docs/depth.md)."""
    options = {}
    if fast_kernels:
        options.update(FAST_KERNELS)
    if compile:
        options.update(COMPILE_PRESET)
    if fp16_encode:
        options["encode_dtype"] = "model"
    if offload:
        options["offload"] = True
    return options


def window_plan(num_frames: int, window_size: int = 110, overlap: int = 25) -> tuple[list[tuple[int, int]], int]:
    """Windows [a, b) and the effective overlap (depthcrafter-spec.md 4.1).

    T <= window: one window and overlap 0. Otherwise starts a_k = k*(W - o) while a_k < T - o.
    """
    if num_frames < 1:
        raise InputError(f"need at least 1 frame, got {num_frames}")
    if num_frames <= window_size:
        return [(0, num_frames)], 0
    if not 0 < overlap < window_size:
        raise InputError(f"overlap must be in [1, window_size - 1] for clips longer than one window "
                         f"(got overlap={overlap}, window_size={window_size})")
    stride = window_size - overlap
    starts = range(0, num_frames - overlap, stride)
    return [(a, min(a + window_size, num_frames)) for a in starts], overlap


def decode_calls(num_frames: int, settings: DepthCrafterSettings) -> list[tuple[int, int]]:
    """Frames [a, b) of each decoder call: chunks of ``decode_chunk_size`` from frame 0 (the last one
    shorter), ``decode_batch`` full chunks per call (each still its own temporal batch)."""
    n = settings.decode_chunk_size
    full = (num_frames // n) * n
    per_call = n * max(1, settings.decode_batch)
    calls = [(i, min(i + per_call, full)) for i in range(0, full, per_call)]
    if full < num_frames:
        calls.append((full, num_frames))
    return calls


def blend_weights(overlap: int, device=None) -> torch.Tensor:
    """Weight of the newer window on each shared frame: linspace(0, 1, overlap), fp32 (overlap,)."""
    return torch.linspace(0, 1, overlap, dtype=torch.float32, device=device)


def stitch(acc: torch.Tensor | None, latents: torch.Tensor, overlap: int) -> torch.Tensor:
    """Append window ``latents`` (1, F, ...) to ``acc`` (1, A, ...), blending the last ``overlap`` frames.

    Mixed in fp32, stored in ``acc``'s dtype (the reference's order of operations).
    """
    if acc is None:
        return latents
    if overlap == 0:
        return torch.cat([acc, latents], dim=1)
    w = blend_weights(overlap, latents.device).view(1, overlap, *([1] * (latents.ndim - 2)))
    mixed = w * latents[:, :overlap] + (1 - w) * acc[:, -overlap:]
    return torch.cat([acc[:, :-overlap], mixed.to(acc.dtype), latents[:, overlap:]], dim=1)


def clip_pixels(x: torch.Tensor) -> torch.Tensor:
    """CLIP input from frames in [-1, 1]: (T, 3, H, W) -> fp32 (T, 3, 224, 224).

    Anti-aliased squash (no crop, no aspect ratio), back to [0, 1] without clamping, CLIP mean/std.
    """
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import \
        _resize_with_antialiasing

    y = _resize_with_antialiasing(x.float(), (CLIP_SIZE, CLIP_SIZE))
    y = (y + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, device=y.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=y.device).view(1, 3, 1, 1)
    return (y - mean) / std


def set_channels_last(module: torch.nn.Module, enable: bool = True, conv3d: bool = False) -> None:
    """Store convolution weights channels-last, which cuDNN runs faster in half precision.

    ``Conv2d`` weights go NHWC. With ``conv3d`` the temporal ``Conv3d`` weights go NDHWC too: their
    input is already NDHWC in memory (a channels-last (B*T, C, H, W) tensor viewed as (B, C, T, H, W)),
    so cuDNN's layout conversions disappear (compiled temporal VAE decode at 576x1024: 1.74 s ->
    1.63 s on an H100). Linear layers keep their layout.
    """
    fmt2d = torch.channels_last if enable else torch.contiguous_format
    fmt3d = torch.channels_last_3d if enable and conv3d else torch.contiguous_format
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=fmt2d)
        elif isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=fmt3d)


def check_unit_frames(frames: np.ndarray) -> None:
    """Raise InputError unless frames is (T, H, W, 3) float in [0, 1] (not uint8 0..255)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InputError(f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}")
    if not np.issubdtype(frames.dtype, np.floating):
        raise InputError(f"frames must be float in [0, 1], got {frames.dtype} (use ex4d.io.video.to_float01)")
    lo, hi = float(frames.min()), float(frames.max())
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):
        raise InputError(f"frames must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")


def _wrap(progress, iterable, desc: str, total: int | None = None):
    if progress is None:
        return iterable
    try:
        return progress(iterable, desc=desc, total=total)
    except TypeError:  # a plain callable(iterable)
        return progress(iterable)


class DepthCrafterPipeline:
    """The DepthCrafter sampler over loaded modules (no file access here).

    unet: :class:`DepthCrafterUNet`; vae: ``AutoencoderKLTemporalDecoder``; image_encoder:
    ``CLIPVisionModelWithProjection``. All in ``dtype`` on ``device`` (or on the CPU with
    ``offload=True``, moved to the device one model at a time).
    """

    def __init__(self, unet, vae, image_encoder, *, device, dtype=torch.float16,
                 settings: DepthCrafterSettings | None = None, offload: bool = False):
        from diffusers import EulerDiscreteScheduler

        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.settings = settings or DepthCrafterSettings()
        self.offload = offload
        self.fused_norms = []
        self.scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = self.vae_scale * 2 ** unet.num_upsamplers
        s = self.settings
        if s.single_token_attention:
            from ex4d.depth.depthcrafter_unet import enable_single_token_cross_attention

            enable_single_token_cross_attention(unet)
        if s.channels_last:
            # 3-D convs too only when compiling (measured there; eager keeps the 2-D-only layout).
            set_channels_last(unet, conv3d=s.compile)
            set_channels_last(vae, conv3d=s.compile)
        # The reference upcasts the whole VAE to fp32 around encoding; an fp32 copy of the encoder
        # (34M parameters) gives the same numbers without moving the decoder back and forth.
        if s.encode_dtype == "float32" and dtype != torch.float32:
            self.encoder = copy.deepcopy(vae.encoder).float()
            self.quant_conv = copy.deepcopy(vae.quant_conv).float()
            self.encode_dtype = torch.float32
        elif s.encode_dtype in ("float32", "model"):
            self.encoder, self.quant_conv, self.encode_dtype = vae.encoder, vae.quant_conv, dtype
        else:
            raise InputError(f"encode_dtype must be 'float32' or 'model', got {s.encode_dtype!r}")
        if s.fused_group_norm:
            # after the fp32 encoder copy, which has its own norms. Not the UNet: fusing its norms too
            # was measured no faster (compiled, 576x1024: UNet 2.15 s either way).
            from ex4d.depth.fused_groupnorm import fuse_group_norms

            targets = [vae] + ([self.encoder] if self.encoder is not vae.encoder else [])
            #: the module swaps, so that a caller sharing the modules can undo them (bench/bench_depth.py)
            self.fused_norms = [fuse_group_norms(m) for m in targets]
        # torch.compile: specialised graphs (dynamic=False): one per window length, and two for the
        # decoder (8-frame chunks and the last, shorter one). First call pays minutes of compilation.
        self._unet_call, self._encoder_call, self._decoder_call = unet, self.encoder, vae.decoder
        if s.compile:
            self._unet_call = torch.compile(unet, dynamic=False)
            self._encoder_call = torch.compile(self.encoder, dynamic=False)
            self._decoder_call = torch.compile(vae.decoder, dynamic=False)
        if not offload:
            for m in (unet, vae, image_encoder, self.encoder, self.quant_conv):
                m.to(self.device)

    # ---- helpers -----------------------------------------------------------------------------
    def _use(self, *modules):
        """Context that moves ``modules`` to the device for the block when offloading."""
        pipe = self

        class _Ctx:
            def __enter__(self):
                if pipe.offload:
                    for m in modules:
                        m.to(pipe.device)

            def __exit__(self, *exc):
                if pipe.offload:
                    for m in modules:
                        m.to("cpu")
                    if pipe.device.type == "cuda":
                        torch.cuda.empty_cache()

        return _Ctx()

    def check_frames(self, frames: np.ndarray) -> None:
        check_unit_frames(frames)
        _, H, W, _ = frames.shape
        if H % self.multiple or W % self.multiple:
            raise InputError(f"DepthCrafter needs H and W divisible by {self.multiple}, got {H}x{W} "
                             f"(use --resize reference)")

    # ---- stages ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_frames(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, 3, H, W) in [-1, 1] -> E (1, T, C_clip) in the model dtype."""
        pixels = clip_pixels(x).to(self.dtype)
        step = self.settings.encode_chunk_size
        with self._use(self.image_encoder):
            out = [self.image_encoder(pixel_values=pixels[i:i + step]).image_embeds
                   for i in range(0, len(pixels), step)]
        return torch.cat(out)[None]

    @torch.no_grad()
    def encode_video(self, x_aug: torch.Tensor) -> torch.Tensor:
        """x_aug: (T, 3, H, W) -> C (1, T, 4, h, w) posterior mode, unscaled, in the encode dtype."""
        step = self.settings.encode_chunk_size
        out = []
        with self._use(self.encoder, self.quant_conv):
            for i in range(0, len(x_aug), step):
                chunk = x_aug[i:i + step].to(self.encode_dtype)
                if self.settings.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                moments = self.quant_conv(self._encoder_call(chunk))
                out.append(moments[:, : moments.shape[1] // 2])
        return torch.cat(out)[None]

    @torch.no_grad()
    def denoise(self, cond: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator,
                progress=None) -> torch.Tensor:
        """cond C (1, T, 4, h, w), embeds E (1, T, C) -> final latents A (1, T, 4, h, w) in the model dtype."""
        s = self.settings
        T = cond.shape[1]
        windows, overlap = window_plan(T, s.window_size, s.overlap)
        window = min(T, s.window_size)
        sched = self.scheduler
        sched.set_timesteps(s.num_inference_steps, device=self.device)
        shape = (1, window, 4, *cond.shape[-2:])
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        noise = noise * sched.init_noise_sigma  # eps_init * sigma_init, fp16 as in the reference
        ids = torch.tensor([[s.fps_id, s.motion_bucket_id, s.noise_aug_strength]], dtype=self.dtype,
                           device=self.device)
        acc = None
        with self._use(self.unet):
            for k, (a, b) in enumerate(_wrap(progress, windows, "depth windows", len(windows))):
                sched.set_timesteps(s.num_inference_steps, device=self.device)
                index = torch.arange(a, b, device=self.device) % window
                x = noise[:, index]
                if k > 0 and overlap:
                    restart = x[:, :overlap] / sched.init_noise_sigma * sched.sigmas[0]
                    x = torch.cat([acc[:, a:a + overlap] + restart, x[:, overlap:]], dim=1)
                c_win, e_win = cond[:, a:b], embeds[:, a:b]
                x = self._denoise_window(x, c_win, e_win, ids, progress, f"window {k + 1}/{len(windows)} steps")
                acc = stitch(acc, x, overlap if k > 0 else 0)
        return acc

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress=None) -> torch.Tensor:
        """latents (1, T, 4, h, w) -> relative disparity d (T, H, W) fp32 on the device.

        Chunks of ``decode_chunk_size`` frames from frame 0 (the temporal decoder mixes frames
        within a chunk); ``decode_batch`` full chunks go through one call as separate videos.
        """
        calls = decode_calls(latents.shape[1], self.settings)
        out = []
        with self._use(self.vae.decoder):
            for a, b in _wrap(progress, calls, "depth decode", len(calls)):
                out.append(self._decode_call(latents[0, a:b]))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, progress=None, output: str = "disparity", timings: dict | None = None):
        """frames (T, H, W, 3) float [0, 1] -> relative disparity (T, H, W) float32 numpy (``output="latent"``:
        the stitched latents (1, T, 4, h, w) as a tensor). ``timings``: if a dict, filled with seconds per
        stage (synchronising the device, so only for measurements)."""
        import time

        frames = np.asarray(frames)
        self.check_frames(frames)
        s = self.settings
        clock = [time.perf_counter()]

        def mark(name):
            if timings is not None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                timings[name] = now - clock[0]
                clock[0] = now

        generator = torch.Generator(device=self.device).manual_seed(s.seed)
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).permute(0, 3, 1, 2)
        x = x.to(self.device).to(self.dtype) * 2 - 1
        mark("upload")
        embeds = self.embed_frames(x)
        mark("clip")
        eps_aug = torch.randn(x.shape, generator=generator, device=self.device, dtype=self.dtype)
        cond = self.encode_video(x + s.noise_aug_strength * eps_aug)
        del eps_aug, x
        mark("vae_encode")
        latents = self.denoise(cond, embeds, generator, progress)
        mark("unet")
        if output == "latent":
            return latents
        disparity = self.decode(latents, progress).cpu().numpy()
        mark("vae_decode")
        return disparity


    # ---- streaming ---------------------------------------------------------------------------
    def check_size(self, num_frames: int, height: int, width: int) -> None:
        if num_frames < 1:
            raise InputError(f"need at least 1 frame, got {num_frames}")
        if height % self.multiple or width % self.multiple:
            raise InputError(f"DepthCrafter needs H and W divisible by {self.multiple}, got {height}x{width} "
                             f"(use --resize reference)")

    @torch.no_grad()
    def stream(self, frames: Iterable[np.ndarray], num_frames: int, size: tuple[int, int],
               progress=None) -> Iterator[np.ndarray]:
        """Relative disparity of ``num_frames`` frames (H, W, 3) float [0, 1] read one at a time from
        ``frames``, yielded as float32 numpy chunks (n, H, W) in frame order; values identical to
        :meth:`__call__` on the whole clip.

        The clip is consumed window by window. Before window k = [a, b) runs, frames up to b are read,
        in the global chunks of ``encode_chunk_size`` frames that :meth:`__call__` uses, and reduced to
        their CLIP embedding and VAE latent at once, so at most one chunk of pixels is held (all of a
        window's new chunks with ``offload``, to move each model once per window). The window is then
        denoised and blended into the stitched latents; latent frames before the next window's start
        are final, and each decode call of :meth:`decode`'s plan (same chunk boundaries, from frame 0)
        runs as soon as its frames are final, its disparity is yielded, and its latents are dropped.
        What is held besides the models is therefore bounded by the window: its conditioning and
        embeddings, the stitched latents not yet decoded, one encode chunk of pixels and one decode call.

        Random numbers: the reference draws the augmentation noise for the whole clip, then the window
        noise, from one generator. On the CPU, where a draw of n frames gives the same numbers as n
        draws of one frame, the augmentation noise is drawn chunk by chunk as frames arrive, and a second
        generator skips past it to draw the window noise. Elsewhere (CUDA's Philox layout depends on the
        size of the draw) the whole (T, 3, H, W) augmentation noise is drawn at once as before and kept
        on the device, 2 bytes per pixel per frame in fp16: device memory, not host memory.
        """
        s = self.settings
        T, (H, W) = int(num_frames), (int(size[0]), int(size[1]))
        self.check_size(T, H, W)
        windows, overlap = window_plan(T, s.window_size, s.overlap)
        window = min(T, s.window_size)
        frame_numel = 3 * H * W
        step = s.encode_chunk_size
        sched = self.scheduler

        # random draws, in the reference's order (see the docstring)
        generator = torch.Generator(device=self.device).manual_seed(s.seed)
        if self.device.type == "cpu" and frame_numel % 16 == 0:
            skip = torch.Generator(device=self.device).manual_seed(s.seed)
            for i in range(0, T, step):
                torch.randn((min(step, T - i), 3, H, W), generator=skip, device=self.device, dtype=self.dtype)
            noise_generator, eps_all = skip, None
        else:
            eps_all = torch.randn((T, 3, H, W), generator=generator, device=self.device, dtype=self.dtype)
            noise_generator = generator
        sched.set_timesteps(s.num_inference_steps, device=self.device)
        noise = torch.randn((1, window, 4, H // self.vae_scale, W // self.vae_scale), generator=noise_generator,
                            device=self.device, dtype=self.dtype)
        noise = noise * sched.init_noise_sigma
        ids = torch.tensor([[s.fps_id, s.motion_bucket_id, s.noise_aug_strength]], dtype=self.dtype,
                           device=self.device)

        source = iter(frames)
        chunks = [(i, min(i + step, T)) for i in range(0, T, step)]
        next_chunk = 0
        cond = embeds = None  # conditioning of frames [buf_start, encoded)
        buf_start = encoded = 0

        def read(a: int, b: int) -> torch.Tensor:
            got = [np.asarray(f) for f in itertools.islice(source, b - a)]
            if len(got) != b - a:
                raise InputError(f"the clip ended after {a + len(got)} of {T} frames")
            chunk = np.stack(got)
            check_unit_frames(chunk)
            if chunk.shape[1:3] != (H, W):
                raise InputError(f"frame {a} is {chunk.shape[1]}x{chunk.shape[2]}, expected {H}x{W}")
            x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).permute(0, 3, 1, 2)
            return x.to(self.device).to(self.dtype) * 2 - 1

        def aug_noise(a: int, b: int) -> torch.Tensor:
            if eps_all is not None:
                return eps_all[a:b]
            return torch.randn((b - a, 3, H, W), generator=generator, device=self.device, dtype=self.dtype)

        def encode_until(b: int) -> None:
            nonlocal next_chunk, cond, embeds, encoded
            todo = []
            while encoded + sum(cb - ca for ca, cb in todo) < b:
                todo.append(chunks[next_chunk])
                next_chunk += 1
            groups = [todo] if self.offload else [[c] for c in todo]
            for group in groups:
                if not group:
                    continue
                xs = [read(a, b_) for a, b_ in group]
                with self._use(self.image_encoder):
                    e_new = [self.image_encoder(pixel_values=clip_pixels(x).to(self.dtype)).image_embeds for x in xs]
                with self._use(self.encoder, self.quant_conv):
                    c_new = []
                    for (a, b_), x in zip(group, xs):
                        chunk = (x + s.noise_aug_strength * aug_noise(a, b_)).to(self.encode_dtype)
                        if s.channels_last:
                            chunk = chunk.contiguous(memory_format=torch.channels_last)
                        moments = self.quant_conv(self._encoder_call(chunk))
                        c_new.append(moments[:, : moments.shape[1] // 2])
                del xs
                e_new = torch.cat(e_new)[None]
                c_new = torch.cat(c_new)[None]
                embeds = e_new if embeds is None else torch.cat([embeds, e_new], dim=1)
                cond = c_new if cond is None else torch.cat([cond, c_new], dim=1)
                encoded = group[-1][1]

        calls = decode_calls(T, s)
        next_call = 0
        acc, acc_start = None, 0  # stitched latents of frames [acc_start, acc_start + acc.shape[1])

        for k, (a, b) in enumerate(_wrap(progress, windows, "depth windows", len(windows))):
            encode_until(b)
            c_win, e_win = cond[:, a - buf_start:b - buf_start], embeds[:, a - buf_start:b - buf_start]
            sched.set_timesteps(s.num_inference_steps, device=self.device)
            index = torch.arange(a, b, device=self.device) % window
            x = noise[:, index]
            if k > 0 and overlap:
                restart = x[:, :overlap] / sched.init_noise_sigma * sched.sigmas[0]
                x = torch.cat([acc[:, a - acc_start:a - acc_start + overlap] + restart, x[:, overlap:]], dim=1)
            x = self._denoise_window(x, c_win, e_win, ids, progress, f"window {k + 1}/{len(windows)} steps")
            acc = stitch(acc, x, overlap if k > 0 else 0)
            del x, c_win, e_win
            final = windows[k + 1][0] if k + 1 < len(windows) else T
            with self._use(self.vae.decoder):
                while next_call < len(calls) and calls[next_call][1] <= final:
                    ca, cb = calls[next_call]
                    yield self._decode_call(acc[0, ca - acc_start:cb - acc_start]).cpu().numpy()
                    next_call += 1
            # keep only what the next window and the pending decode calls still need
            keep = min(final, calls[next_call][0] if next_call < len(calls) else T)
            acc, acc_start = acc[:, keep - acc_start:], keep
            if k + 1 < len(windows):
                drop = windows[k + 1][0] - buf_start
                cond, embeds, buf_start = cond[:, drop:], embeds[:, drop:], windows[k + 1][0]

    def _denoise_window(self, x: torch.Tensor, c_win: torch.Tensor, e_win: torch.Tensor, ids: torch.Tensor,
                        progress, desc: str) -> torch.Tensor:
        """The Euler steps of one window (after ``set_timesteps``): x (1, F, 4, h, w) -> final latents."""
        s, sched = self.settings, self.scheduler
        for t in _wrap(progress, sched.timesteps, desc, len(sched.timesteps)):
            x_in = sched.scale_model_input(x, t)
            v = self._unet_call(torch.cat([x_in, c_win], dim=2), t, e_win, ids).sample
            if s.guidance_scale > 1.0:
                v_u = self._unet_call(torch.cat([x_in, torch.zeros_like(c_win)], dim=2), t,
                                      torch.zeros_like(e_win), ids).sample
                v = v_u + s.guidance_scale * (v - v_u)
            x = sched.step(v, t, x).prev_sample
        return x

    def _decode_call(self, latents: torch.Tensor) -> torch.Tensor:
        """One decoder call of :meth:`decode`: latents (F, 4, h, w) (F one chunk, or several full chunks of
        ``decode_chunk_size``) -> disparity (F, H, W) fp32 on the device."""
        s = self.settings
        chunk = (latents / self.vae.config.scaling_factor).to(self.dtype)
        if s.channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        frames_per_video = min(s.decode_chunk_size, len(chunk))
        # what AutoencoderKLTemporalDecoder.decode does, through the (maybe compiled) decoder
        indicator = torch.zeros(len(chunk) // frames_per_video, frames_per_video, dtype=chunk.dtype,
                                device=chunk.device)
        frames = self._decoder_call(chunk, num_frames=frames_per_video, image_only_indicator=indicator)
        return ((frames.float() / 2 + 0.5).clamp(0, 1)).mean(dim=1)


class DepthCrafter:
    """DepthCrafter estimator (``--depth depthcrafter``): the paper's choice, ~4.7 GB of fp16 weights."""

    name = "depthcrafter"
    #: :meth:`estimate` takes a lazy :class:`~ex4d.types.Clip` and works window by window
    streams = True

    def __init__(self, pipeline: DepthCrafterPipeline, *, progress=None, sources: dict | None = None):
        self.pipeline = pipeline
        self.progress = progress
        self.sources = sources or {}

    @classmethod
    def from_pretrained(cls, *, models_dir: str | os.PathLike | None = None, device: str = "auto",
                        dtype: str | torch.dtype | None = None, offload: bool = False, progress=None,
                        allow_download: bool = True, **settings) -> "DepthCrafter":
        """Resolve and strictly load the three models (weights.py), build the pipeline.

        dtype: default fp16 on CUDA (as the reference), fp32 on CPU. offload: keep models on the CPU
        and move each to the GPU only while it runs (less memory, slower).
        settings: fields of :class:`DepthCrafterSettings`.
        """
        device = resolve_device(device)
        dtype = _dtype(dtype, device)
        unknown = set(settings) - set(DepthCrafterSettings.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown DepthCrafter option(s): {', '.join(sorted(unknown))}")
        # resolve everything first so that one message names the first missing file
        paths = {name: resolve(spec, models_dir, allow_download=allow_download)
                 for name, spec in (("unet", DEPTHCRAFTER_UNET), ("vae", SVD_VAE),
                                    ("image_encoder", SVD_IMAGE_ENCODER))}
        load_device = torch.device("cpu") if offload else device
        unet = load_unet(*paths["unet"], dtype=dtype, device=load_device)
        vae = load_vae(*paths["vae"], dtype=dtype, device=load_device)
        image_encoder = load_image_encoder(*paths["image_encoder"], dtype=dtype, device=load_device)
        pipe = DepthCrafterPipeline(unet, vae, image_encoder, device=device, dtype=dtype,
                                    settings=DepthCrafterSettings(**settings), offload=offload)
        return cls(pipe, progress=progress, sources={k: str(v[1]) for k, v in paths.items()})

    def estimate(self, frames, *, spill_dir: str | os.PathLike | None = None) -> DepthVideo:
        """frames -> DepthVideo with reference z (T, H, W) in [2.5641, 10000].

        ``frames``: a (T, H, W, 3) float array in [0, 1] (depth and valid come back as arrays), or a
        :class:`~ex4d.types.Clip`, read one frame at a time and processed window by window
        (:meth:`DepthCrafterPipeline.stream`): depth and valid then come back as
        :class:`~ex4d.io.arrays.FrameSequence` objects and host memory does not grow with T. Both give
        the values of the whole-clip pipeline exactly. The reference's min-max normalisation is over the
        whole clip, so it takes two passes: the raw disparity is spilled to a temporary ``.npy`` in
        ``spill_dir`` (T*H*W*4 bytes; the system's temporary folder if None) while its min/max are kept,
        and each frame is normalised when read (:func:`ex4d.depth.normalize.disparity_stream_to_depth`).
        Call ``release()`` on the returned depth to delete that file early.
        """
        from ex4d.io.arrays import MappedFrames
        from ex4d.types import Clip

        pipe = self.pipeline
        if isinstance(frames, Clip):
            num_frames, size, source, in_memory = frames.num_frames, frames.size, frames.iter_frames(), False
        else:
            frames = np.asarray(frames)
            pipe.check_frames(frames)
            num_frames, size, source, in_memory = len(frames), frames.shape[1:3], frames, True
        chunks = pipe.stream(source, num_frames, size, progress=self.progress)
        depth = disparity_stream_to_depth(chunks, num_frames, size, where="DepthCrafter output", spill_dir=spill_dir,
                                          in_memory=in_memory)
        settings = {"estimator": self.name, **asdict(pipe.settings), "dtype": str(pipe.dtype).replace("torch.", ""),
                    "device": str(pipe.device), "offload": pipe.offload, "weights": self.sources}
        if in_memory:
            valid = np.ones(depth.shape, dtype=bool)
        else:
            valid = MappedFrames(num_frames, size, bool, lambda k: np.ones(size, dtype=bool))
        return DepthVideo(depth=depth, valid=valid, K=None, estimator=self.name, settings=settings)


# ---- loading ----------------------------------------------------------------------------------
def load_unet(config_path, weights_path, *, dtype, device):
    from ex4d.depth.depthcrafter_unet import DepthCrafterUNet

    config = read_config(config_path)
    with torch.device("meta"):
        unet = DepthCrafterUNet.from_config(config)
    return assign_weights(unet, read_safetensors(weights_path), weights_path, dtype=dtype, device=device)


def load_vae(config_path, weights_path, *, dtype, device):
    from diffusers import AutoencoderKLTemporalDecoder

    config = read_config(config_path)
    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder.from_config(config)
    return assign_weights(vae, read_safetensors(weights_path), weights_path, dtype=dtype, device=device)


def load_image_encoder(config_path, weights_path, *, dtype, device):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig.from_dict({k: v for k, v in read_config(config_path).items()
                                         if k not in ("architectures", "torch_dtype", "dtype")})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    emb = model.vision_model.embeddings
    # non-persistent buffer, absent from the file
    emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device)[None], persistent=False)
    ignore = ("vision_model.embeddings.position_ids",)
    return assign_weights(model, read_safetensors(weights_path), weights_path, dtype=dtype, device=device,
                          ignore=ignore)


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
    return table[dtype]
