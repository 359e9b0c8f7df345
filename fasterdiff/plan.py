"""A reuse plan: for each UNet evaluation of a sampling run, which UNet modules do not
compute and replay their output from the last evaluation that computed them.

A plan is a value: JSON-serialisable, comparable, independent of any model object.
Steps are 0-based UNet evaluations (``scheduler.timesteps`` order; PNDM makes one more
evaluation than ``num_inference_steps``). A *key step* replays nothing, so it refreshes
every cached output. Two constructors cover the methods this package implements:

- :func:`encoder_plan` (FasterDiffusion's encoder propagation): the encoder replays at
  non-key steps; such a step reads no latent of its own, so a key step and the
  non-key steps after it (a *group*) can run as one batch.
- :func:`deep_plan` (DeepCache): the deep branch replays every step but every k-th;
  the shallow path reads each step's latent, so steps stay sequential.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from . import schedule
from . import unet as unet_layout

PLAN_FORMAT_VERSION = 1
REUSE_KINDS = ("encoder", "deep")


@dataclass(frozen=True)
class ReusePlan:
    """``replay[i]``: the module names evaluation ``i`` takes from the cache."""

    replay: tuple[frozenset[str], ...]

    def __post_init__(self):
        if not self.replay:
            raise ValueError("a reuse plan needs at least one step")
        if self.replay[0]:
            raise ValueError("step 0 must compute every module (nothing is cached before it)")

    @property
    def num_steps(self) -> int:
        return len(self.replay)

    @property
    def key_steps(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.replay) if not r)

    @property
    def cached_modules(self) -> frozenset[str]:
        """Every module some step replays: what a key step must keep."""
        return frozenset().union(*self.replay)

    @property
    def groups(self) -> list[range]:
        """Each key step with the non-key steps that follow it, in order."""
        bounds = list(self.key_steps) + [self.num_steps]
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]

    @property
    def batchable(self) -> bool:
        """Whether every group can run as one batch: its non-key steps read no latent
        and replay the same modules (a batched module computes on the key rows only)."""
        for group in self.groups:
            sets = {self.replay[i] for i in group[1:]}
            if len(sets) > 1 or any(unet_layout.reads_latent(s) for s in sets):
                return False
        return True

    def to_json(self) -> dict:
        return {
            "version": PLAN_FORMAT_VERSION,
            "num_steps": self.num_steps,
            "replay": [sorted(r) for r in self.replay],
        }

    @classmethod
    def from_json(cls, data: dict | str) -> ReusePlan:
        if isinstance(data, str):
            data = json.loads(data)
        if data.get("version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"reuse plan: unsupported version {data.get('version')!r}, expected {PLAN_FORMAT_VERSION}")
        replay = data.get("replay")
        if not isinstance(replay, list) or not all(isinstance(r, list) for r in replay):
            raise ValueError("reuse plan: 'replay' must be a list (one per step) of lists of module names")
        if data.get("num_steps") != len(replay):
            raise ValueError(f"reuse plan: num_steps is {data.get('num_steps')!r} but 'replay' has {len(replay)} steps")
        return cls(tuple(frozenset(r) for r in replay))

    def check_modules(self, unet) -> None:
        """ValueError naming a module the plan replays that ``unet`` does not have."""
        for name in sorted(self.cached_modules):
            unet_layout.get_module(unet, name)


def _plan_from_keys(num_steps: int, keys: Sequence[int], modules: Sequence[str]) -> ReusePlan:
    keys = set(keys)
    replayed = frozenset(modules)
    return ReusePlan(tuple(frozenset() if i in keys else replayed for i in range(num_steps)))


def encoder_plan(unet, key_steps, num_steps: int) -> ReusePlan:
    """FasterDiffusion: the encoder runs at the key steps (see :func:`schedule.resolve`)."""
    keys = schedule.resolve(key_steps, num_steps).steps
    return _plan_from_keys(num_steps, keys, unet_layout.encoder_modules(unet))


def deep_plan(unet, interval: int, num_steps: int, branch: int = 0) -> ReusePlan:
    """DeepCache: the whole UNet every ``interval`` steps, the shallow path to ``branch`` otherwise."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"key_steps: with reuse='deep' it must be an int >= 1 (DeepCache's cache_interval), got {interval!r}")
    keys = range(0, num_steps, interval)
    return _plan_from_keys(num_steps, keys, unet_layout.deep_modules(unet, branch))


def build_plan(unet, key_steps, num_steps: int, reuse: str = "encoder", branch: int = 0) -> ReusePlan:
    """The plan for these settings over ``num_steps`` UNet evaluations.

    ``key_steps`` may also be a :class:`ReusePlan` (used as it is; its step count must match).
    """
    if isinstance(key_steps, ReusePlan):
        if key_steps.num_steps != num_steps:
            raise ValueError(f"key_steps: the plan is for {key_steps.num_steps} UNet evaluations, this run makes {num_steps}")
        key_steps.check_modules(unet)
        return key_steps
    if reuse == "encoder":
        return encoder_plan(unet, key_steps, num_steps)
    if reuse == "deep":
        return deep_plan(unet, key_steps, num_steps, branch)
    raise ValueError(f"reuse must be one of {', '.join(REUSE_KINDS)}, got {reuse!r}")
