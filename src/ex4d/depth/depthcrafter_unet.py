"""DepthCrafter's denoiser: diffusers' SVD UNet with one CLIP embedding per frame.

The weights and the module tree are exactly those of
:class:`diffusers.UNetSpatioTemporalConditionModel`; only ``forward`` differs
(depthcrafter-spec.md section 1.3):

1. ``encoder_hidden_states`` is (B, F, C): frame i cross-attends to its own embedding, reshaped to
   (B*F, 1, C). The stock forward would ``repeat_interleave`` it to (B*F, F, C), which runs and is
   silently wrong.
2. ``sample`` and the sinusoidal time embedding are cast to the dtype of ``conv_in.weight`` (the
   pipeline feeds fp32 because its conditioning latents are fp32).

The temporal transformer blocks then see the first frame's embedding of the window, and the
temporal position embedding is indexed within the window: both come from the diffusers blocks.

Optional exact speed-up (``single_token_cross_attention``): with one context token, softmax over
it is 1, so spatial cross-attention equals ``to_out(to_v(e))`` broadcast over the queries; the
query/key projections and the attention kernel can be skipped (rounding-level differences only).
"""

from __future__ import annotations

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput


class DepthCrafterUNet(UNetSpatioTemporalConditionModel):
    """SVD UNet with per-frame image embeddings (DepthCrafter). Same config and state dict as the base."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                added_time_ids: torch.Tensor, return_dict: bool = True):
        """sample: (B, F, 8, h, w); timestep: 0-d or (B,) continuous c_noise; encoder_hidden_states:
        (B, F, C) one embedding per frame; added_time_ids: (B, 3). Returns (B, F, 4, h, w)."""
        dtype = self.conv_in.weight.dtype
        batch_size, num_frames = sample.shape[:2]
        if encoder_hidden_states.shape[:2] != (batch_size, num_frames):
            raise ValueError(f"encoder_hidden_states must be (B, F, C) = ({batch_size}, {num_frames}, C), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        sample = sample.to(dtype)

        # time: one embedding per video, shared by its frames
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.float32, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(batch_size)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        time_embeds = self.add_time_proj(added_time_ids.flatten()).reshape(batch_size, -1).to(emb.dtype)
        emb = emb + self.add_embedding(time_embeds)

        sample = sample.flatten(0, 1)
        emb = emb.repeat_interleave(num_frames, dim=0)
        # DepthCrafter's difference: frame i gets its own single context token
        encoder_hidden_states = encoder_hidden_states.reshape(batch_size * num_frames, 1, -1)
        image_only_indicator = torch.zeros(batch_size, num_frames, dtype=dtype, device=sample.device)

        factor = 2 ** self.num_upsamplers
        forward_upsample_size = any(s % factor != 0 for s in sample.shape[-2:])
        upsample_size = None

        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            kwargs = dict(hidden_states=sample, temb=emb, image_only_indicator=image_only_indicator)
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = encoder_hidden_states
            sample, res = block(**kwargs)
            skips += res

        sample = self.mid_block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                image_only_indicator=image_only_indicator)

        for i, block in enumerate(self.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            kwargs = dict(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size,
                          image_only_indicator=image_only_indicator)
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = encoder_hidden_states
            sample = block(**kwargs)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        sample = sample.reshape(batch_size, num_frames, *sample.shape[1:])
        if not return_dict:
            return (sample,)
        return UNetSpatioTemporalConditionOutput(sample=sample)


class SingleTokenCrossAttnProcessor:
    """Attention processor for cross-attention over exactly one context token per query batch.

    softmax over a single key is 1, so the output is ``to_out(to_v(context))`` for every query:
    (B*F, 1, C) context -> broadcast to (B*F, N, D). Falls back to ``fallback`` for anything else
    (self-attention, several tokens).
    """

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if (encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1 or attention_mask is not None
                or hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
                or getattr(attn, "norm_cross", None) or attn.residual_connection):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        value = attn.to_v(encoder_hidden_states)  # (B*F, 1, D)
        out = attn.to_out[1](attn.to_out[0](value))
        out = out / attn.rescale_output_factor
        return out.expand(-1, hidden_states.shape[1], -1).to(hidden_states.dtype)


def enable_single_token_cross_attention(unet: UNetSpatioTemporalConditionModel) -> int:
    """Install :class:`SingleTokenCrossAttnProcessor` on the spatial cross-attentions (``attn2``).

    Only the spatial transformer blocks are changed; their temporal twins also have one context
    token (the window's first frame), so they are included too. Returns the number of modules changed.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    count = 0
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "set_processor"):
            module.set_processor(SingleTokenCrossAttnProcessor(AttnProcessor2_0()))
            count += 1
    return count
