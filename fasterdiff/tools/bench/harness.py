"""What the speed and fidelity benchmarks share: a method to compare, the other
accelerations (DeepCache, ToMe) as context managers, and the probes that count UNet
encoder and decoder passes."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Method:
    """One way of sampling, run on a benchmark's shared inputs."""

    name: str
    run: Callable  # samples once; the benchmark decides the arguments
    # Patches the pipeline for this method while active (DeepCache, ToMe); untimed.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""
    kind: str = "method"  # "stock", "method", "fewer steps", "eps reuse"
    steps: int = 0
    unet_cost: float | None = None  # FLOPs relative to stock
    gpu_seconds: float | None = None  # fasterdiff.cost's GPU model, one image (None: not modelled)
    matches: list[str] = field(default_factory=list)  # fewer steps: the methods whose cost it matches


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def deepcache(pipe, interval: int = 3, branch: int = 0):
    from DeepCache import DeepCacheSDHelper

    modules = list(pipe.unet.modules())
    had_own = [("forward" in vars(m)) for m in modules]
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()
        # disable() leaves each module's original bound forward set on the instance; drop those, so
        # the UNet is as it was (torch.compile's guards, for one, check that no instance forward is set)
        for m, own in zip(modules, had_own):
            if not own:
                vars(m).pop("forward", None)


@contextlib.contextmanager
def tome(pipe, ratio: float = 0.5):
    import tomesd

    tomesd.apply_patch(pipe, ratio=ratio)
    try:
        yield
    finally:
        tomesd.remove_patch(pipe)


@contextlib.contextmanager
def batch_sizes(module: torch.nn.Module) -> Iterator[list[int]]:
    """The batch size of every forward call of ``module`` while active."""
    calls: list[int] = []

    def hook(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        calls.append(x.shape[0])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@dataclass
class Passes:
    """Batch sizes of the UNet's encoder and decoder passes during a run."""

    encoder: list[int] = field(default_factory=list)
    decoder: list[int] = field(default_factory=list)

    @property
    def encoder_calls(self) -> int:
        return len(self.encoder)

    @property
    def decoder_calls(self) -> int:
        return len(self.decoder)

    @property
    def decoder_steps(self) -> float:
        """Decoder work in steps: parallel decoding stacks steps along the batch, so a call
        counts its batch divided by the encoder's."""
        return sum(self.decoder) / self.encoder[0] if self.encoder else float(len(self.decoder))


@contextlib.contextmanager
def count_passes(unet) -> Iterator[Passes]:
    """Count the encoder and decoder passes of ``unet`` while active.

    The probes are the first conv of the first down block and of the deepest up block:
    they run only when that half of the UNet really computes. Hooks on whole blocks
    would count a block whose output is replayed (DeepCache skips blocks through
    wrapped forwards).
    """
    with (
        batch_sizes(unet.down_blocks[0].resnets[0].conv1) as encoder,
        batch_sizes(unet.up_blocks[0].resnets[0].conv1) as decoder,
    ):
        yield Passes(encoder, decoder)
