"""Key-step schedules: at which sampling steps the UNet encoder runs.

Steps are 0-based indices into the sampler's timesteps; step 0 is the noisiest and
is always a key step. At a key step the encoder runs on the current latent; every
following non-key step reuses that key step's encoder features.

A schedule is a plain value (:class:`KeySteps`) that the sampling loop consumes, so
any two schedules can be compared on the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The paper's key steps as 0-based step indices: DDIM-50 uses
# {0,1,2,3,5,10,15,25,35} (t_key = {50,49,48,47,45,40,35,25,15}) and DPM-Solver-20
# uses {0,1,2,3,5,10,15}. Both are prefixes of one ladder: dense while the latent
# changes fast, then every 5, then every 10 steps.
_PAPER_LADDER_HEAD = (0, 1, 2, 3, 5, 10, 15)
_PAPER_LADDER_STRIDE = 10
# ... cut off after three quarters of the run: the last quarter reuses features.
_PAPER_LAST_FRACTION = 0.75


def paper_key_steps(num_steps: int) -> tuple[int, ...]:
    """The paper's non-uniform schedule, generalised to any number of steps.

    Rule: take the ladder 0, 1, 2, 3, 5, 10, 15, 25, 35, 45, ... (then every 10)
    and keep the steps ``i <= 0.75 * num_steps``. This gives exactly
    {0,1,2,3,5,10,15,25,35} for 50 steps and {0,1,2,3,5,10,15} for 20 steps, as in
    the paper; e.g. 10 steps -> {0,1,2,3,5}, 100 steps -> {0,...,15,25,...,75}.
    """
    _check_num_steps(num_steps)
    limit = _PAPER_LAST_FRACTION * num_steps
    steps = [i for i in _PAPER_LADDER_HEAD if i <= limit]
    nxt = _PAPER_LADDER_HEAD[-1] + _PAPER_LADDER_STRIDE
    while nxt <= limit:
        steps.append(nxt)
        nxt += _PAPER_LADDER_STRIDE
    return tuple(i for i in steps if i < num_steps)


def uniform_key_steps(num_steps: int, interval: int) -> tuple[int, ...]:
    """Every ``interval``-th step: {0, k, 2k, ...}."""
    _check_num_steps(num_steps)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 2:
        raise ValueError(f"key_steps: a uniform interval must be an int >= 2, got {interval!r}")
    return tuple(range(0, num_steps, interval))


def custom_key_steps(num_steps: int, steps: Sequence[int]) -> tuple[int, ...]:
    """A user-given set of 0-based step indices; must contain 0, sorted, no repeats."""
    _check_num_steps(num_steps)
    steps = list(steps)
    if not steps:
        raise ValueError("key_steps: a custom schedule needs at least step 0")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"key_steps: custom steps must be ints, got {s!r}")
        if not 0 <= s < num_steps:
            raise ValueError(
                f"key_steps: custom step {s} is outside 0..{num_steps - 1}: the run makes {num_steps} UNet "
                "evaluations (num_inference_steps; PNDM one more)"
            )
    if steps[0] != 0:
        raise ValueError(f"key_steps: custom steps must start with step 0, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"key_steps: custom steps must be strictly increasing, got {steps}")
    return tuple(steps)


def parse_step_list(text: str) -> list[int]:
    """Parse ``"0, 1, 5"`` into ``[0, 1, 5]``; ValueError on anything malformed."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"custom_key_steps: expected comma-separated step indices like '0,1,2,5', got {text!r}")
    out = []
    for p in parts:
        if not p.isdigit():
            raise ValueError(f"custom_key_steps: {p!r} is not a non-negative integer (in {text!r})")
        out.append(int(p))
    return out


def groups(key_steps: Sequence[int], num_steps: int) -> list[range]:
    """Each key step with the non-key steps that follow it, in order."""
    bounds = list(key_steps) + [num_steps]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class KeySteps:
    """Which of ``num_steps`` steps run the encoder, and the groups that share features."""

    num_steps: int
    steps: tuple[int, ...]

    @property
    def groups(self) -> list[range]:
        """Each key step with the non-key steps that follow it, in order."""
        return groups(self.steps, self.num_steps)


def resolve(key_steps, num_steps: int) -> KeySteps:
    """Turn the user-facing ``key_steps`` argument into a :class:`KeySteps`.

    ``"paper"`` (non-uniform, the paper's), ``"off"`` (every step is a key step:
    plain sampling), an int k >= 2 (every k-th step), or a sequence of 0-based step
    indices (custom, must contain 0).
    """
    _check_num_steps(num_steps)
    if isinstance(key_steps, str):
        if key_steps == "paper":
            steps = paper_key_steps(num_steps)
        elif key_steps == "off":
            steps = tuple(range(num_steps))
        else:
            raise ValueError(
                f"key_steps: unknown schedule {key_steps!r}; use 'paper', 'off', "
                "an int >= 2 or a sequence of step indices"
            )
    elif isinstance(key_steps, int) and not isinstance(key_steps, bool):
        steps = uniform_key_steps(num_steps, key_steps)
    elif isinstance(key_steps, Sequence):
        steps = custom_key_steps(num_steps, key_steps)
    else:
        raise ValueError(
            f"key_steps: expected 'paper', 'off', an int >= 2 or a sequence of ints, got {key_steps!r}"
        )
    return KeySteps(num_steps=num_steps, steps=steps)


def validate_spec(key_steps) -> None:
    """Check ``key_steps`` as far as possible before the step count is known."""
    if isinstance(key_steps, Sequence) and not isinstance(key_steps, str):
        ints = [s for s in key_steps if isinstance(s, int) and not isinstance(s, bool)]
        custom_key_steps(max(ints + [0]) + 1, key_steps)
    else:
        resolve(key_steps, 1000)


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_steps!r}")
