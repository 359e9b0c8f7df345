"""ControlNet under a reuse plan: the ControlNet computes where the UNet's encoder does.

diffusers' ControlNet pipelines call ``controlnet(...)`` before each ``unet(...)`` and pass
its residuals, which the UNet adds to the encoder's skip features and to the mid block's
output. At a step where a plan replays the encoder, those features are a key step's, and so
are the residuals: the ControlNet (an encoder-sized network) does not run, and the step
gets the residuals kept from the last ControlNet computation. This is where the paper's
ControlNet speed-up comes from. A batched group (parallel decoding) passes the key step's
residuals to every step of the batch, the same residuals the sequential run replays.

The conditioning scale is the step's own: kept residuals are rescaled by the ratio of the
step's scale to the one they were computed with (the residuals are linear in it, guess
mode included); where that scale was 0, the ControlNet computes. When a step's scale
differs from the one a batched group was computed with (``control_guidance_start`` /
``control_guidance_end`` switching inside a group), the group's later answers are dropped
and those steps run on their own, so parallel decoding gives the sequential images.

Replays are order 0 (the last computed residuals) whatever the plan's forecast.

Plans that keep the shallow path computing (DeepCache-style ``reuse="deep"``) read each
step's own latent there, and the ControlNet's shallow residuals join it: the ControlNet runs
every step, but its own deep blocks (the down and mid blocks the plan replays in the UNet)
replay their last computed outputs too. The residuals they lead to join only skip
connections of UNet blocks that replay at that step, which do not read them: the images
are those of a ControlNet computed whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import unet as unet_layout
from .reuse import restore_forwards


def controlnets(controlnet) -> list[torch.nn.Module]:
    """The ControlNetModel instances behind a pipeline's ``controlnet`` (one, or a Multi's nets)."""
    base = getattr(controlnet, "_orig_mod", controlnet)
    nets = getattr(base, "nets", None)
    return [getattr(n, "_orig_mod", n) for n in nets] if nets is not None else [base]


def replays_encoder(replayed: frozenset[str], encoder: frozenset[str]) -> bool:
    """Whether a step replaying these modules takes every encoder feature from the cache."""
    return bool(replayed) and encoder <= replayed


class ControlNetReplay:
    """Context manager: each ControlNet's ``forward`` computes or replays as the run's plan
    says, for one pipeline call; removed after it."""

    def __init__(self, executor, controlnet, unet):
        self.executor = executor
        self.nets = controlnets(controlnet)
        self.encoder = frozenset(unet_layout.encoder_modules(getattr(unet, "_orig_mod", unet)))
        self.saved: list[tuple[torch.nn.Module, Callable | None]] = []

    def __enter__(self):
        run = self.executor.run
        encoder_replays = any(replays_encoder(r, self.encoder) for r in run.plan.replay)
        deep = deep_replayed(run.plan, self.encoder)
        try:
            for index, net in enumerate(self.nets):
                self._install(net, self._wrapper(index, net.forward, keep=encoder_replays))
                for name in sorted(deep):
                    module = _submodule(net, name)
                    if module is not None:
                        self._install(module, self._module_wrapper(index, name, module.forward))
        except BaseException:
            restore_forwards(self.saved)
            raise
        return self

    def _install(self, module: torch.nn.Module, forward: Callable) -> None:
        self.saved.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def __exit__(self, *exc):
        restore_forwards(self.saved)
        return False

    def _module_wrapper(self, index: int, name: str, original: Callable) -> Callable:
        """One of the ControlNet's deep blocks under a deep plan: replayed where the UNet's is."""
        executor = self.executor

        @torch.compiler.disable(recursive=False)
        def forward(*args, **kwargs):
            run = executor.run
            step, key = run.next_step, (index, name)
            if step < run.plan.num_steps and name in run.plan.replay[step] and key in run.control_blocks:
                return run.control_blocks[key]
            out = original(*args, **kwargs)
            run.control_blocks[key] = out
            return out

        return forward

    def _wrapper(self, index: int, original: Callable, keep: bool) -> Callable:
        """The ControlNet's forward: counted; replayed where the encoder replays (``keep``: the
        plan replays it somewhere, so computed residuals are kept)."""
        executor, encoder = self.executor, self.encoder

        @torch.compiler.disable(recursive=False)
        def forward(*args, conditioning_scale=1.0, return_dict=True, **kwargs):
            run = executor.run
            step = run.next_step
            kept = run.control.get(index)
            replay = step < run.plan.num_steps and replays_encoder(run.plan.replay[step], encoder)
            if replay and kept is not None and (kept[0] != 0 or conditioning_scale == 0):
                scale, down, mid = kept
                ratio = conditioning_scale / scale if conditioning_scale != scale else 1.0
                if ratio != 1.0:
                    _drop_batched_from(run, step)
                # new tensors: MultiControlNetModel sums its nets' residuals in place
                return _output(tuple(d * ratio for d in down), mid * ratio, return_dict)
            down, mid = original(*args, conditioning_scale=conditioning_scale, return_dict=False, **kwargs)
            run.stats.controlnet_evaluations += 1
            if replay:  # new residuals where the encoder replays: none of a batch computed before
                _drop_batched_from(run, step)
            if keep:  # as copies: the caller may change what it gets in place (MultiControlNetModel does)
                run.control[index] = (conditioning_scale, tuple(d.clone() for d in down), mid.clone())
            return _output(down, mid, return_dict)

        return forward


def deep_replayed(plan, encoder: frozenset[str]) -> frozenset[str]:
    """The down and mid blocks a plan replays at steps that still read their own latent (deep
    plans): the same names address the ControlNet's copies of those blocks."""
    return frozenset(
        name
        for replayed in plan.replay
        if replayed and not replays_encoder(replayed, encoder)
        for name in replayed
        if name.startswith(("down_blocks.", "mid_block"))
    )


def _submodule(net, name: str):
    try:
        return net.get_submodule(name)
    except AttributeError:
        return None


def _drop_batched_from(run, step: int) -> None:
    """Forget the answers a batched call computed for ``step`` and later: they were computed
    with other residuals than this step's; those steps then run on their own."""
    for later in [s for s in run.stash if s >= step]:
        del run.stash[later]


def _output(down, mid, return_dict: bool):
    if not return_dict:
        return down, mid
    from diffusers.models.controlnets.controlnet import ControlNetOutput

    return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)
