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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from . import schedule
from . import unet as unet_layout

PLAN_FORMAT_VERSION = 1
REUSE_KINDS = ("encoder", "deep")


FORECAST_ORDERS = (0, 1, 2)


@dataclass(frozen=True)
class ReusePlan:
    """``replay[i]``: the module names evaluation ``i`` takes from the cache.

    ``forecast[i]`` (default 0 everywhere): how step ``i`` gets a replayed output from
    the last computations of that module: 0 = the last one unchanged (the paper), 1 =
    extrapolated linearly in the timestep through the last two, 2 = quadratically
    through the last three. ``damping[i]`` (default 1) scales the extrapolation's
    departure from the last computed output. Where fewer computations exist than an
    order needs, or two share a timestep, the highest possible order is used.
    """

    replay: tuple[frozenset[str], ...]
    forecast: tuple[int, ...] = ()
    damping: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.replay:
            raise ValueError("a reuse plan needs at least one step")
        if self.replay[0]:
            raise ValueError("step 0 must compute every module (nothing is cached before it)")
        n = len(self.replay)
        if not self.forecast:
            object.__setattr__(self, "forecast", (0,) * n)
        if not self.damping:
            object.__setattr__(self, "damping", (1.0,) * n)
        if len(self.forecast) != n or any(o not in FORECAST_ORDERS or isinstance(o, bool) for o in self.forecast):
            raise ValueError(f"forecast: one order in {FORECAST_ORDERS} per step ({n}), got {self.forecast!r}")
        if len(self.damping) != n or any(not _is_finite_number(d) or d < 0 for d in self.damping):
            raise ValueError(f"damping: one number >= 0 per step ({n}), got {self.damping!r}")

    def with_forecast(self, order: int, damping: float = 1.0) -> ReusePlan:
        """The same plan, every step forecasting with ``order`` (and ``damping``)."""
        if isinstance(order, bool) or order not in FORECAST_ORDERS:
            raise ValueError(f"forecast must be one of {FORECAST_ORDERS}, got {order!r}")
        return ReusePlan(self.replay, (order,) * self.num_steps, (float(damping),) * self.num_steps)

    def last(self, count: int) -> ReusePlan:
        """The plan of the last ``count`` steps, renumbered from 0 (its first step made a key
        step: nothing is cached before it). For a run that starts part-way down the
        schedule (img2img's strength): the steps whose timesteps it evaluates."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= self.num_steps:
            raise ValueError(f"a plan of {self.num_steps} steps has no last {count!r} steps")
        start = self.num_steps - count
        return ReusePlan((frozenset(),) + self.replay[start + 1 :], self.forecast[start:], self.damping[start:])

    @cached_property  # read at every evaluation: worked out once per plan
    def history(self) -> int:
        """How many past computations of a module the plan reads (order + 1)."""
        return 1 + max(o for o, r in zip(self.forecast, self.replay) if r) if self.cached_modules else 1

    @property
    def num_steps(self) -> int:
        return len(self.replay)

    @cached_property
    def key_steps(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.replay) if not r)

    @cached_property
    def cached_modules(self) -> frozenset[str]:
        """Every module some step replays: what a key step must keep."""
        return frozenset().union(*self.replay)

    @cached_property
    def groups(self) -> list[range]:
        """Each key step with the non-key steps that follow it, in order."""
        return schedule.groups(self.key_steps, self.num_steps)

    @cached_property
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
            "forecast": list(self.forecast),
            "damping": list(self.damping),
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
        return cls(
            tuple(frozenset(r) for r in replay),
            tuple(data.get("forecast") or ()),
            tuple(data.get("damping") or ()),
        )

    def check_modules(self, unet) -> None:
        """ValueError naming a module the plan replays that ``unet`` does not have."""
        for name in sorted(self.cached_modules):
            unet_layout.get_module(unet, name)


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def forecast_weights(times: Sequence[float], t: float, order: int, damping: float = 1.0) -> list[float]:
    """Weights of past outputs (oldest first, at ``times``) that forecast the output at ``t``.

    Lagrange extrapolation through the last ``order + 1`` points; the order drops while
    there are too few points or the last ones share a timestep. ``damping`` blends the
    result with the last output: ``last + damping * (forecast - last)``.
    """
    n = min(order + 1, len(times))
    while n > 1 and len({float(x) for x in times[-n:]}) < n:
        n -= 1
    weights = [0.0] * len(times)
    weights[-1] = 1.0 - damping
    points = [float(x) for x in times[-n:]]
    for m, tm in enumerate(points):
        basis = 1.0
        for q, tq in enumerate(points):
            if q != m:
                basis *= (t - tq) / (tm - tq)
        weights[len(times) - n + m] += damping * basis
    return weights


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
        raise ValueError(f"cache_interval must be an int >= 1 (DeepCache's interval), got {interval!r}")
    keys = range(0, num_steps, interval)
    return _plan_from_keys(num_steps, keys, unet_layout.deep_modules(unet, branch))


def deep_plan_from_keys(unet, keys, num_steps: int, branch: int = 0) -> ReusePlan:
    """DeepCache's replayed modules at any key steps (calibrated, not only every k-th)."""
    keys = schedule.custom_key_steps(num_steps, list(keys))
    return _plan_from_keys(num_steps, keys, unet_layout.deep_modules(unet, branch))


def build_plan(
    unet, key_steps, num_steps: int, reuse: str = "encoder", branch: int = 0, forecast: int = 0
) -> ReusePlan:
    """The plan for these settings over ``num_steps`` UNet evaluations.

    ``key_steps`` may also be a :class:`ReusePlan` (used as it is, forecasts included;
    its step count must match).
    """
    if isinstance(key_steps, ReusePlan):
        if key_steps.num_steps != num_steps:
            raise ValueError(f"key_steps: the plan is for {key_steps.num_steps} UNet evaluations, this run makes {num_steps}")
        key_steps.check_modules(unet)
        return key_steps
    if reuse == "encoder":
        return encoder_plan(unet, key_steps, num_steps).with_forecast(forecast)
    if reuse == "deep":
        return deep_plan(unet, key_steps, num_steps, branch).with_forecast(forecast)
    raise ValueError(f"reuse must be one of {', '.join(REUSE_KINDS)}, got {reuse!r}")
