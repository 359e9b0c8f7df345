"""The encoder / decoder split of diffusers' ``UNet2DConditionModel``.

``eps = decode(unet, encode(unet, z_t, emb, c), emb', c)`` computes what
``unet(z_t, t, c)`` computes when ``emb' == emb``. The encoder is ``conv_in`` +
``down_blocks`` + ``mid_block`` (the paper's E and B); the decoder is ``up_blocks`` +
the output head. Both use the UNet's own submodules, so weights, attention
processors, LoRA and ToMe patches all apply unchanged. The time embedding is
computed separately, per sample, so one decoder call can serve several timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel


@dataclass
class EncoderFeatures:
    """What the decoder needs from an encoder pass.

    ``skips`` are the skip connections in the order the UNet produces them
    (``conv_in`` output first, then every down-block residual); ``mid`` is the
    mid-block output.
    """

    skips: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.mid.shape[0]

    def repeat(self, times: int) -> EncoderFeatures:
        """The same features for ``times`` timesteps, stacked along the batch."""
        if times == 1:
            return self
        return EncoderFeatures(
            skips=tuple(s.repeat(times, 1, 1, 1) for s in self.skips),
            mid=self.mid.repeat(times, 1, 1, 1),
        )


def check_supported(unet: UNet2DConditionModel) -> None:
    """Raise ValueError for UNet features outside the SD 1.5 family."""
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type,
        "addition_embed_type": cfg.addition_embed_type,
        "encoder_hid_dim_type": cfg.encoder_hid_dim_type,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
    }
    found = {k: v for k, v in unsupported.items() if v is not None}
    if found or unet.mid_block is None:
        raise ValueError(
            "fasterdiff supports SD 1.5-family UNets (no class/addition embeddings, "
            f"a mid block); this UNet has {found or 'no mid block'}"
        )


def time_embedding(unet: UNet2DConditionModel, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample time embedding for a 1-D tensor of timesteps."""
    # get_time_embed reads only the batch size, dtype and device of `sample`.
    probe = torch.empty(len(timesteps), dtype=dtype, device=timesteps.device)
    t_emb = unet.get_time_embed(sample=probe, timestep=timesteps)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def encode(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    emb: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    cross_attention_kwargs: dict | None = None,
) -> EncoderFeatures:
    """``conv_in``, the down blocks and the mid block on ``sample``."""
    if hasattr(unet, "_tome_info"):
        # ToMe (tomesd) reads the latent size from a hook on unet.forward, which the
        # split never calls; record it as that hook would (decode sees the same size).
        unet._tome_info["size"] = tuple(sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    h = unet.conv_in(sample)
    skips = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(
                hidden_states=h,
                temb=emb,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cross_attention_kwargs,
            )
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(
            h, emb, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs
        )
    else:
        h = unet.mid_block(h, emb)
    return EncoderFeatures(skips=skips, mid=h)


def decode(
    unet: UNet2DConditionModel,
    features: EncoderFeatures,
    emb: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """The up blocks and the output head on cached (or fresh) encoder features."""
    # Odd latent sizes need explicit upsample sizes, as in UNet2DConditionModel.forward.
    factor = 2**unet.num_upsamplers
    explicit_sizes = any(d % factor for d in features.skips[0].shape[-2:])
    skips = features.skips
    h = features.mid
    for i, block in enumerate(unet.up_blocks):
        res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        is_last = i == len(unet.up_blocks) - 1
        upsample_size = skips[-1].shape[2:] if explicit_sizes and not is_last else None
        if getattr(block, "has_cross_attention", False):
            h = block(
                hidden_states=h,
                temb=emb,
                res_hidden_states_tuple=res,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cross_attention_kwargs,
                upsample_size=upsample_size,
            )
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
