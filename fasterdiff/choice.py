"""Which plan ``key_steps="auto"`` (and ``"auto-fast"``) runs, and why.

Calibration (:mod:`fasterdiff.calibrate`) measures candidate plans against stock
sampling on a model and records, per sampler and step count, the fastest plan that meets
each *level*: ``auto`` (the library's default) at least DeepCache interval 3's fidelity
and at least :data:`AUTO_MIN_PSNR` pooled PSNR; ``deepcache-3`` and ``deepcache-5`` at
least DeepCache's at that interval. This module reads that choice from the plan file; a
run that was not calibrated gets the paper's key steps (:data:`AUTO_FALLBACK`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .plan import ReusePlan
from .plan_file import entry_key, read_plans
from .samplers import sampler_name

# auto's floor: pooled PSNR against stock's images over the calibration pairs (an RMS
# error under 1.8% of the range), whatever DeepCache reaches on the model
AUTO_MIN_PSNR = 35.0
AUTO_FALLBACK = "paper"  # key_steps for a sampler/step count that was not calibrated
DEEPCACHE = {3: "DeepCache interval 3 (deep, every 3rd step)", 5: "DeepCache interval 5 (deep, every 5th step)"}
# level -> (the reference plan it must match, whether AUTO_MIN_PSNR applies too)
LEVELS = {"auto": (DEEPCACHE[3], True), "deepcache-3": (DEEPCACHE[3], False), "deepcache-5": (DEEPCACHE[5], False)}
# the key_steps values that run a calibrated level: the default, and a faster one
AUTO_KEY_STEPS = {"auto": "auto", "auto-fast": "deepcache-5"}


@dataclass
class AutoChoice:
    key_steps: object  # a ReusePlan, or the fallback's key_steps
    reuse: str
    reason: str
    name: str = ""  # the calibrated plan's name in the plan file

    @property
    def calibrated(self) -> bool:
        """Whether this runs a plan read from the plan file (not the fallback, not stock)."""
        return isinstance(self.key_steps, ReusePlan)

    @property
    def beyond_deepcache(self) -> bool:
        """Whether this runs a calibrated plan other than DeepCache's own (interval 3 or 5)."""
        return self.calibrated and self.name not in DEEPCACHE.values()


def is_auto(key_steps) -> bool:
    return isinstance(key_steps, str) and key_steps in AUTO_KEY_STEPS


def choose(
    plans_file: str | os.PathLike | None, scheduler, num_inference_steps: int, unet, level: str = "auto"
) -> AutoChoice:
    """The plan ``level`` runs for this scheduler and step count, and why."""
    if level not in LEVELS:
        raise ValueError(f"no calibration level {level!r}; the levels are {', '.join(LEVELS)}")
    name = sampler_name(scheduler)
    fallback = AutoChoice(AUTO_FALLBACK, "encoder", "")
    if plans_file is None or not Path(plans_file).is_file():
        fallback.reason = f"auto: no plan file{f' at {plans_file}' if plans_file else ''}; running the paper's key steps"
        return fallback
    entry = read_plans(plans_file)["entries"].get(entry_key(name, num_inference_steps)) if name else None
    if entry is None:
        fallback.reason = (
            f"auto: {plans_file} has no calibration for {name or type(scheduler).__name__} with "
            f"{num_inference_steps} steps; running the paper's key steps"
        )
        return fallback
    bar = entry["levels"].get(level)
    if bar is None:  # its reference was not measured (too few steps for DeepCache's interval)
        fallback.reason = (
            f"{level}: {plans_file} has no {level} level for {entry_key(name, num_inference_steps)}; "
            f"running the paper's key steps"
        )
        return fallback
    if bar["plan"] is None:
        return AutoChoice("off", "encoder", f"{level}: no calibrated plan reaches {bar['psnr_pooled']:.1f} dB; running stock")
    best = next(r for r in entry["plans"] if r["name"] == bar["plan"])
    plan = ReusePlan.from_json(best["plan"])
    plan.check_modules(unet)
    speedup = entry["stock"]["gpu_seconds_1_image"] / best["gpu_seconds_1_image"]
    floor = f" and {bar['floor']:g} dB" if bar["floor"] is not None else ""
    return AutoChoice(
        plan,
        best["reuse"],
        f"{level}: '{best['name']}' from {plans_file}: pooled PSNR {best['psnr_pooled']:.1f} dB against stock in "
        f"calibration (at least {bar['reference']}'s{floor}: {bar['psnr_pooled']:.1f} dB; noise injection "
        f"{entry['calibrated_on']['noise_injection']}), modelled GPU speedup {speedup:.2f}x",
        best["name"],
    )
