"""The stand-in's components (SD 1.5's structure, small) and its classifier."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..tiny import clip_tokenizer
from .data import COLORS, IMAGE_SIZE, THICKNESS, vocabulary


def tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with a whole-word token for every prompt word.

    Each word is built by merging from its end ("n", "e", "v", "e", "n</w>" ->
    "en</w>" -> "ven</w>" -> ...); such suffix merges never conflict. Other text
    falls back to single characters.
    """
    merges: list[tuple[str, str]] = []
    for word in vocabulary():
        suffix = word[-1] + "</w>"
        for ch in reversed(word[:-1]):
            merge = (ch, suffix)
            suffix = ch + suffix
            if merge not in merges:
                merges.append(merge)
    return clip_tokenizer(merges)


def text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            projection_dim=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def vae() -> AutoencoderKL:
    """4 latent channels, down-sampling by 4: 32x32x3 images <-> 8x8x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def unet() -> UNet2DConditionModel:
    """SD 1.5's block types and depth: 4 levels (8, 4, 2, 1 latent pixels), cross-attention
    in the first three down blocks, the mid block and the last three up blocks, 2 layers per block."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=4,
    )


class Classifier(nn.Module):
    """A small CNN with one head per attribute: digit, colour, thickness.

    ``features`` (the 128-d penultimate layer) is what the Frechet distance compares.
    """

    def __init__(self) -> None:
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(128, 128), nn.ReLU())
        self.digit = nn.Linear(128, 10)
        self.color = nn.Linear(128, len(COLORS))
        self.thickness = nn.Linear(128, len(THICKNESS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {"digit": self.digit(f), "color": self.color(f), "thickness": self.thickness(f), "features": f}
