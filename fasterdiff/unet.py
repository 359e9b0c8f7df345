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


def live_outputs(unet, replayed: frozenset[str]) -> frozenset[str]:
    """The replayed modules whose output a module that computes reads, at a step that replays
    ``replayed``. The others' outputs only feed other replayed modules (under DeepCache-style
    plans, everything but the last replayed layer on the way up): their values never reach
    the noise prediction, so they need not be forecast.

    Follows the data of a UNet2DConditionModel: the main path through ``conv_in``, each down
    block's layers (resnet, then attention) and downsampler, the mid block, each up block's
    layers and upsampler; and the skip connections, each down layer's (and ``conv_in``'s and
    each downsampler's) output read by the up block resnet that mirrors it."""
    path, skips = [], []  # atoms in execution order; the atoms whose outputs the skip connections carry
    path.append("conv_in")
    skips.append("conv_in")
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(block.resnets)):
            path.append(f"down_blocks.{i}.resnets.{j}")
            if j < len(attentions):
                path.append(f"down_blocks.{i}.attentions.{j}")
            skips.append(path[-1])
        for j in range(len(block.downsamplers or [])):
            path.append(f"down_blocks.{i}.downsamplers.{j}")
            skips.append(path[-1])
    if unet.mid_block is not None:
        path.append("mid_block")
    readers = {}  # skip producer -> the up resnet that reads it
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(block.resnets)):
            path.append(f"up_blocks.{i}.resnets.{j}")
            if skips:
                readers[skips.pop()] = path[-1]
            if j < len(attentions):
                path.append(f"up_blocks.{i}.attentions.{j}")
        for j in range(len(block.upsamplers or [])):
            path.append(f"up_blocks.{i}.upsamplers.{j}")
    path.append("conv_norm_out")  # computes at every step

    def owner(atom: str) -> str | None:
        return next((r for r in replayed if atom == r or atom.startswith(r + ".")), None)

    live = set()
    for here, after in zip(path, path[1:]):
        r = owner(here)
        if r is not None and owner(after) is None:
            live.add(r)  # the main path leaves r into a module that computes
    for producer, reader in readers.items():
        r = owner(producer)
        if r is not None and owner(reader) is None:
            live.add(r)
    unknown = {r for r in replayed if not any(a == r or a.startswith(r + ".") for a in path)}
    return frozenset(live | unknown)  # a module this map does not know: treated as read


def reads_latent(replayed: frozenset[str] | set[str]) -> bool:
    """Whether a step that replays these modules still reads its own latent."""
    return "conv_in" not in replayed


def get_module(unet, name: str) -> torch.nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise ValueError(f"this UNet has no module {name!r}") from None
