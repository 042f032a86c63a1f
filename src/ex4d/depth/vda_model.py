"""The Video Depth Anything network (vda-spec.md section 3), with the official checkpoints' key names.

``VideoDepthAnythingNet(config)`` builds the module whose ``state_dict()`` has exactly the keys and
shapes of ``video_depth_anything_{vits,vitb,vitl}.pth`` (and of the metric files, which share them):
a DINOv2 ViT (``pretrained.*``) and a DPT head with four temporal attention modules (``head.*``),
including the eight persistent sinusoidal ``pos_encoder.pe`` tables.

The backbone is written here rather than taken from transformers' ``Dinov2Model``: that model names
and splits its tensors differently (separate query/key/value) and resamples the position table to a
target *size*, while the checkpoints were trained with DINOv2's resampling by a *scale factor* of
(n + 0.1) / 37 (tests/test_vda.py shows the two differ).

Shapes: B batch, T frames (T <= 32), H, W input size (multiples of 14), h = H/14, w = W/14.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VDAConfig:
    """One model size. ``num_params`` / ``num_tensors``: what the official file must hold (None: unchecked)."""

    embed_dim: int
    depth: int
    num_heads: int
    layer_idx: tuple[int, int, int, int]
    features: int
    out_channels: tuple[int, int, int, int]
    num_params: int | None = None
    num_tensors: int | None = None
    patch_size: int = 14
    grid: int = 37  # the position table's grid (trained at 518 px)
    num_frames: int = 32
    motion_heads: int = 8
    head_features_2: int = 32

    @property
    def motion_channels(self) -> tuple[int, int, int, int]:
        """Channels of the temporal modules mm0..mm3: on layer_3, layer_4, path_4 and path_3."""
        return (self.out_channels[2], self.out_channels[3], self.features, self.features)


#: The released sizes (vda-spec.md section 2; counts from the checkpoint manifests, not the README).
CONFIGS = {
    "vits": VDAConfig(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384), num_params=29_035_137, num_tensors=351),
    "vitb": VDAConfig(768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768), num_params=114_441_409,
                      num_tensors=351),
    "vitl": VDAConfig(1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024), num_params=384_390_337,
                      num_tensors=519),
}


# --- DINOv2 backbone -------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, h*w, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, D) -> (N, L, D), global self-attention over the tokens of one frame."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-LN ViT block with LayerScale on both branches (drop-path 0 at inference)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int, grid: int = 37) -> torch.Tensor:
    """DINOv2's resampling of the position table to an h x w patch grid (vda-spec.md 3.1, ⚠ 7).

    pos_embed: (1, 1 + grid*grid, D) -> float32 (1, 1 + h*w, D). Bicubic, no antialias, by the scale
    factor ((h + 0.1)/grid, (w + 0.1)/grid) (the 0.1 keeps floor() in interpolate from losing a row);
    the table is returned as is for h = w = grid.
    """
    if h == grid and w == grid:
        return pos_embed.float()
    table = pos_embed.float()
    cls, patches = table[:, :1], table[:, 1:]
    dim = table.shape[-1]
    patches = patches.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid), mode="bicubic",
                            antialias=False)
    if tuple(patches.shape[-2:]) != (h, w):  # the reference asserts this too
        raise RuntimeError(f"position table resampled to {tuple(patches.shape[-2:])}, expected {(h, w)}")
    return torch.cat((cls, patches.permute(0, 2, 3, 1).reshape(1, h * w, dim)), dim=1)


class DinoV2(nn.Module):
    def __init__(self, config: VDAConfig):
        super().__init__()
        d = config.embed_dim
        self.config = config
        self.patch_embed = PatchEmbed(d, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid * config.grid + 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # stored in the checkpoints, unused at inference
        self.blocks = nn.ModuleList(Block(d, config.num_heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> the 4 tapped blocks' patch tokens, each through the final norm: 4 x (N, h*w, D)."""
        h, w = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
        tokens = self.patch_embed(x)
        # under autocast the fp16 patch tokens meet the fp32 cls token and cat promotes them to fp32, as in
        # DINOv2; the table is resampled in fp32 and cast to the tokens' dtype
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, h, w, self.config.grid).to(tokens.dtype)
        taps = set(self.config.layer_idx)
        out = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in taps:
                out.append(self.norm(tokens)[:, 1:])
        return out


# --- temporal modules ------------------------------------------------------------------------------

def sinusoid_table(length: int, channels: int) -> torch.Tensor:
    """pe[0, t, 2i] = sin(t 10000^(-2i/C)), pe[0, t, 2i+1] = cos(...): (1, length, channels) float32."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
    pe = torch.zeros(1, length, channels)
    pe[0, :, 0::2] = torch.sin(position * div)
    pe[0, :, 1::2] = torch.cos(position * div)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, channels: int, length: int):
        super().__init__()
        # persistent: the official files hold these tables, so a strict load needs the keys
        self.register_buffer("pe", sinusoid_table(length, channels), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, C) + pe[:, :T]; T > length fails, as in the reference."""
        return x + self.pe[:, :x.shape[1]].to(x.dtype)


class TemporalAttention(nn.Module):
    """Self-attention over time at each spatial position; the position code enters q, k and v."""

    def __init__(self, channels: int, heads: int, length: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.pos_encoder = PositionalEncoding(channels, length)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: (B*T, L, C) tokens of T frames -> (B*T, L, C)."""
        bt, length, channels = x.shape
        b = bt // frames
        x = x.reshape(b, frames, length, channels).transpose(1, 2).reshape(b * length, frames, channels)
        x = self.pos_encoder(x)

        def split(t):
            return t.reshape(b * length, frames, self.heads, channels // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        out = self.to_out[0](out.transpose(1, 2).reshape(b * length, frames, channels))
        return out.reshape(b, length, frames, channels).transpose(1, 2).reshape(bt, length, channels)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # value first, then gate (⚠ 4)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TemporalBlock(nn.Module):
    def __init__(self, channels: int, heads: int, length: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(channels, heads, length) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(2))
        self.ff = FeedForward(channels)
        self.ff_norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = x + attention(norm(x), frames)
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, length: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalBlock(channels, heads, length)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: (B*T, C, h, w), frames in order within each batch item -> (B*T, C, h, w)."""
        residual = x  # the residual is the input before the GroupNorm (⚠ 5)
        bt, c, h, w = x.shape
        x = self.norm(x).permute(0, 2, 3, 1).reshape(bt, h * w, c)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, frames)
        x = self.proj_out(x).reshape(bt, h, w, c).permute(0, 3, 1, 2)
        return x + residual


class TemporalModule(nn.Module):
    def __init__(self, channels: int, heads: int, length: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, length)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, frames)


# --- DPT head --------------------------------------------------------------------------------------

class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))  # not in place: x is the residual


class FusionBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)  # stored but unused in refinenet4 (no skip input)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    def __init__(self, config: VDAConfig):
        super().__init__()
        f = config.features
        for i, c in enumerate(config.out_channels, 1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FusionBlock(f))
        self.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(nn.Conv2d(f // 2, config.head_features_2, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(config.head_features_2, 1, 1), nn.ReLU())


class DPTHeadTemporal(nn.Module):
    #: frames per chunk from refinenet2 on (memory only; the frames are independent there)
    chunk = 4

    def __init__(self, config: VDAConfig):
        super().__init__()
        d, oc = config.embed_dim, config.out_channels
        self.projects = nn.ModuleList(nn.Conv2d(d, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
        ])
        self.scratch = Scratch(config)
        self.motion_modules = nn.ModuleList(
            TemporalModule(c, config.motion_heads, config.num_frames) for c in config.motion_channels)

    def forward(self, features: list[torch.Tensor], h: int, w: int, frames: int) -> torch.Tensor:
        """4 x (B*T, h*w, D) -> depth (B*T, 1, 14h, 14w) (ReLU'd, in the autocast dtype)."""
        layers = []
        for i, tokens in enumerate(features):
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)
            layers.append(self.resize_layers[i](self.projects[i](x)))
        layer_1, layer_2, layer_3, layer_4 = layers
        mm = self.motion_modules
        layer_3 = mm[0](layer_3, frames)  # temporal modules before the scratch convs (⚠ 3)
        layer_4 = mm[1](layer_4, frames)
        s = self.scratch
        layer_1_rn, layer_2_rn = s.layer1_rn(layer_1), s.layer2_rn(layer_2)
        layer_3_rn, layer_4_rn = s.layer3_rn(layer_3), s.layer4_rn(layer_4)
        path_4 = mm[2](s.refinenet4(layer_4_rn, size=layer_3_rn.shape[2:]), frames)
        path_3 = mm[3](s.refinenet3(path_4, layer_3_rn, size=layer_2_rn.shape[2:]), frames)
        out = []
        for a in range(0, path_3.shape[0], self.chunk):
            b = a + self.chunk
            path_2 = s.refinenet2(path_3[a:b], layer_2_rn[a:b], size=layer_1_rn.shape[2:])
            path_1 = s.refinenet1(path_2, layer_1_rn[a:b])
            x = s.output_conv1(path_1)
            x = F.interpolate(x, size=(h * 14, w * 14), mode="bilinear", align_corners=True)
            dtype = x.dtype
            # the last convs run in fp32 with autocast off, as in the reference (⚠ 13)
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = s.output_conv2(x.float())
            out.append(x.to(dtype))
        return torch.cat(out)


class VideoDepthAnythingNet(nn.Module):
    """``pretrained`` (DINOv2) + ``head`` (DPT with temporal modules); the official files' keys."""

    def __init__(self, config: VDAConfig):
        super().__init__()
        self.config = config
        self.pretrained = DinoV2(config)
        self.head = DPTHeadTemporal(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, 3, H, W) ImageNet-normalised, T <= 32, H and W multiples of 14 -> (B, T, H, W) >= 0."""
        b, t, _, height, width = x.shape
        if t > self.config.num_frames:
            raise ValueError(f"Video Depth Anything takes at most {self.config.num_frames} frames per call, got {t}")
        p = self.config.patch_size
        h, w = height // p, width // p
        features = self.pretrained(x.flatten(0, 1))
        depth = self.head(features, h, w, t)
        depth = F.relu(F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=True))
        return depth[:, 0].unflatten(0, (b, t))
