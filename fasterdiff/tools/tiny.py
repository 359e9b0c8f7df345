"""Tiny Stable-Diffusion-format pipelines built offline from small configs.

They have SD 1.5's structure (CLIP text encoder, 4-channel AutoencoderKL with a
down-sampling factor of 8, a UNet2DConditionModel with cross-attention down, mid
and up blocks) at a size that runs in milliseconds on a CPU. Tests and the
``--quick`` benchmarks use them; nothing here is downloaded.
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# SD 1.5's noise schedule (scheduler/scheduler_config.json of the real model).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE maps bytes to (as in GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer(merges: list[tuple[str, str]]) -> CLIPTokenizer:
    """CLIP's byte-level BPE over single characters, with these ``merges`` (in order) as
    the only multi-character tokens; 77 tokens, as SD's."""
    alphabet = byte_level_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every byte is a token, plus a few merges."""
    return clip_tokenizer([("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>")])


SD15_UNET_CONFIG = resources.files(__package__).joinpath("configs", "sd15_unet.json")


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's UNet architecture (860M parameters, from its own config), random weights."""
    torch.manual_seed(seed)
    config = json.loads(SD15_UNET_CONFIG.read_text())
    return UNet2DConditionModel.from_config(config).eval()


def tiny_pipeline(seed: int = 0, unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    """A random-weight SD-format pipeline (fp32, CPU, no safety checker).

    ``unet`` replaces the tiny UNet (e.g. :func:`sd15_unet`); the text encoder then
    gets the UNet's cross-attention width.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_width = unet.config.cross_attention_dim if unet is not None else 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=1 if unet is not None else 2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = unet or tiny_unet()
    vae = tiny_vae()
    pipe = assemble(tokenizer, text_encoder, vae, unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae() -> AutoencoderKL:
    """A 4-channel AutoencoderKL down-sampling by 8, as SD 1.5's, a few thousand weights."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def assemble(tokenizer, text_encoder, vae, unet) -> StableDiffusionPipeline:
    """An SD-format pipeline of these components: SD 1.5's DDIM schedule, no safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_xl_pipeline(seed: int = 0):
    """A random-weight SDXL-format pipeline (two text encoders, text_time conditioning), fp32 CPU."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids + pooled text
    )
    vae = tiny_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0, vae_scale_factor: int = 8):
    """A ControlNetModel copied from ``unet`` (as diffusers' ``from_unet``), its zero-initialised
    output convolutions given small random weights so that its residuals are not zero. Its
    control image is in pixels: its embedding downsamples by ``vae_scale_factor`` (a power of 2)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    levels = vae_scale_factor.bit_length()  # 8 -> 4 levels: three stride-2 convolutions
    channels = (8,) * (levels - 2) + (16, 16)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.05)
    return net.eval()


def tiny_unet(in_channels: int = 4) -> UNet2DConditionModel:
    """The tiny pipeline's UNet: three levels, cross-attention on two, a few thousand weights.
    ``in_channels=9``: SD's inpainting input (latent, mask and masked image)."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )


def tiny_inpaint_unet(seed: int = 0) -> UNet2DConditionModel:
    """:func:`tiny_unet` with SD's inpainting input (9 channels)."""
    torch.manual_seed(seed)
    return tiny_unet(in_channels=9)
