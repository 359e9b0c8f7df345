"""Sampler names -> diffusers schedulers, built from a pipeline's scheduler config."""

from __future__ import annotations

import warnings

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (scheduler class, config overrides)
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "DDIM": (DDIMScheduler, {}),
    # diffusers supports only final_sigmas_type="sigma_min" for the non-++ solver.
    "DPM-Solver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "DPM-Solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler-Ancestral": (EulerAncestralDiscreteScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}

SAMPLER_NAMES = tuple(SAMPLERS)
# One UNet evaluation per step, images determined by z_T alone (Euler-Ancestral draws
# noise each step; PNDM makes N+1 evaluations): what step-by-step analyses need.
DETERMINISTIC_SAMPLERS = ("DDIM", "DPM-Solver", "DPM-Solver++", "Euler", "UniPC")


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")


def make_scheduler(name: str, config) -> SchedulerMixin:
    """A fresh scheduler for ``name`` with the noise schedule of ``config``."""
    check_sampler(name)
    cls, overrides = SAMPLERS[name]
    with warnings.catch_warnings():
        # diffusers marks algorithm_type="dpmsolver" as deprecated; it still works and
        # is one of the paper's samplers, so the warning would only be noise per call.
        warnings.filterwarnings("ignore", message=".*dpmsolver.*", category=FutureWarning)
        return cls.from_config(config, **overrides)


def sampler_timesteps(name: str, config, steps: int):
    """The timesteps ``name`` evaluates with ``steps`` steps on ``config``'s noise schedule."""
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def sampler_name(scheduler) -> str | None:
    """The name in :data:`SAMPLERS` a scheduler object is an instance of, if any."""
    for name, (cls, overrides) in SAMPLERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in overrides.items() if k == "algorithm_type"):
            return name
    return None
