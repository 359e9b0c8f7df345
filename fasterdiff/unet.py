"""Which modules of a diffusers UNet a reuse plan can cache: the one place that knows
the UNet's structure.

Modules are named as ``unet.named_modules()`` names them (``"conv_in"``,
``"down_blocks.1"``, ``"up_blocks.3.resnets.0"``), so a plan is plain data.

- The *encoder* (FasterDiffusion's E and B): ``conv_in``, every down block and the
  mid block. Replaying all of them means a step reads no latent of its own.
- The *deep* branch (DeepCache): everything below branch ``b`` of the skip
  connections; only the shallow path down to ``b`` and its matching up path run.
"""

from __future__ import annotations

import torch

# DeepCache numbers its branches block * 3 + layer (SD 1.5 has three layers per up block).
LAYERS_PER_BRANCH_BLOCK = 3


def check_supported(unet) -> None:
    """Raise ValueError unless ``unet`` has the UNet2DConditionModel layout plans address."""
    missing = [name for name in ("conv_in", "down_blocks", "up_blocks") if getattr(unet, name, None) is None]
    if missing:
        raise ValueError(
            f"fasterdiff needs a UNet2DConditionModel-style UNet (conv_in, down_blocks, up_blocks); "
            f"{type(unet).__name__} has no {', '.join(missing)}"
        )


def encoder_modules(unet) -> tuple[str, ...]:
    """``conv_in``, the down blocks and the mid block (if any), in execution order."""
    names = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return tuple(names)


def deep_modules(unet, branch: int) -> tuple[str, ...]:
    """What DeepCache replays at its cached steps with ``cache_branch_id=branch``.

    Branch ``b`` is block ``b // 3``, layer ``b % 3``: down blocks deeper than that
    block, that block's layers from ``layer`` on (its downsampler too), the mid block,
    and on the way up the mirror image (the up block of the same depth keeps its last
    ``layer + 1`` layers). A block replayed whole is named once, not its layers.
    """
    max_branch = LAYERS_PER_BRANCH_BLOCK * len(unet.down_blocks) - 1
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= max_branch:
        raise ValueError(f"branch must be an int in [0, {max_branch}] for this UNet, got {branch!r}")
    block_id, layer_id = divmod(branch, LAYERS_PER_BRANCH_BLOCK)
    names: list[str] = []
    for i, block in enumerate(unet.down_blocks):
        if i > block_id or (i == block_id and layer_id == 0):
            names.append(f"down_blocks.{i}")
        elif i == block_id:
            n_layers = len(block.resnets)
            names += [f"down_blocks.{i}.resnets.{j}" for j in range(layer_id, n_layers)]
            names += [f"down_blocks.{i}.attentions.{j}" for j in range(layer_id, len(getattr(block, "attentions", None) or []))]
            names += [f"down_blocks.{i}.downsamplers.{j}" for j in range(len(block.downsamplers or []))]
    if unet.mid_block is not None:
        names.append("mid_block")
    depth = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        mirror = depth - 1 - i  # the down block this up block pairs with
        if mirror > block_id:
            names.append(f"up_blocks.{i}")
        elif mirror == block_id:
            n_layers = len(block.resnets)
            for j in range(n_layers):
                if n_layers - 1 - j > layer_id:  # DeepCache counts an up block's layers from its end
                    names.append(f"up_blocks.{i}.resnets.{j}")
                    if j < len(getattr(block, "attentions", None) or []):
                        names.append(f"up_blocks.{i}.attentions.{j}")
    return tuple(names)


def reads_latent(replayed: frozenset[str] | set[str]) -> bool:
    """Whether a step that replays these modules still reads its own latent."""
    return "conv_in" not in replayed


def get_module(unet, name: str) -> torch.nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise ValueError(f"this UNet has no module {name!r}") from None
