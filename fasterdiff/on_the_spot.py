"""Calibration on the spot: where ``key_steps="auto"`` finds no plan for a run's sampler and
step count, make one now (the quick calibration of :mod:`fasterdiff.calibrate`), keep it,
and run it, this time and every time after.

Asked for explicitly (``accelerate(pipe, calibrate=True)``; the Cog predictor does it at
setup on a GPU): it samples a few hundred images at the model's native size once, which on
SD 1.5 at 512 px takes minutes. Where the entry goes (and is read from next time): the plan
file the pipeline was given, else ``fasterdiff_plans.json`` beside the weights it was loaded
from where that folder is writable, else a cache folder (``$FASTERDIFF_CACHE``, by default
``~/.cache/fasterdiff``) under a name drawn from the weights themselves (:func:`weights_identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from . import calibrate
from .pipeline import set_plan_maker
from .plan_file import PLANS_FILE_NAME, default_plans_file, entry_key, read_plans, write_entry
from .samplers import DETERMINISTIC_SAMPLERS, make_scheduler, sampler_name

log = logging.getLogger("fasterdiff")

CACHE_ENV = "FASTERDIFF_CACHE"
PAIRS = 24  # the calibration pairs on-the-spot calibration draws from (the quick search's last stage uses all)


def cache_dir() -> Path:
    """``$FASTERDIFF_CACHE``, else ``~/.cache/fasterdiff``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fasterdiff")


@torch.no_grad()
def weights_identity(unet) -> str:
    """A name for the UNet's weights: a hash of its config and of every parameter's name, shape
    and a strided sample of its values (a fine-tune changes them; loading the same weights
    again does not)."""
    digest = hashlib.sha256(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    for name, param in unet.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def plans_file_for(pipe, given: str | os.PathLike | None = None, key: str | None = None) -> Path:
    """Where on-the-spot calibration keeps ``pipe``'s plans (see the module doc): ``given``;
    else the plan file beside the weights where it has an entry ``key`` already, or where that
    folder is writable; else the cache folder."""
    if given is not None:
        return Path(given)
    beside = default_plans_file(pipe)
    if beside is not None and (has_entry(beside, key) or os.access(beside.parent, os.W_OK)):
        return beside
    return cache_dir() / "plans" / weights_identity(pipe.unet) / PLANS_FILE_NAME


def has_entry(path: Path, key: str | None) -> bool:
    """Whether the plan file at ``path`` exists and has an entry ``key``."""
    return key is not None and path.is_file() and key in read_plans(path)["entries"]


def text_to_image_view(pipe):
    """A text-to-image pipeline on ``pipe``'s components (calibration samples from prompts), or
    None where its UNet cannot draw from noise alone (an inpainting UNet)."""
    if pipe.unet.config.in_channels != 4:
        return None
    xl = "text_encoder_2" in pipe.components
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet") if xl else (
        "vae", "text_encoder", "tokenizer", "unet")
    parts = {name: pipe.components[name] for name in names}
    if not xl:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    view = cls(**parts, scheduler=pipe.scheduler)
    view.set_progress_bar_config(disable=True)
    return view


def calibrate_here(pipe, scheduler, num_inference_steps: int, path: str | os.PathLike, guidance_scale: float = 7.5,
                   budget_s: float | None = None, progress: bool = True) -> dict | None:
    """Quick-calibrate ``pipe`` for ``scheduler``'s sampler at ``num_inference_steps`` and add the
    entry to the plan file at ``path``; the entry, or None where this cannot calibrate (a sampler
    calibration does not know, an inpainting UNet) or ``budget_s`` seconds ran out first."""
    name = sampler_name(scheduler)
    view = text_to_image_view(pipe)
    if name is None or name not in DETERMINISTIC_SAMPLERS or view is None:
        why = "its UNet draws only from an image" if view is None else f"sampler {name or type(scheduler).__name__}"
        log.info("calibration on the spot: not possible here (%s); auto runs the paper's key steps", why)
        return None
    view.scheduler = make_scheduler(name, scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    source = pipe.config.get("_name_or_path") or ""
    prompts, seeds = calibrate.pairs_for(source if Path(source).is_dir() else None, PAIRS)
    batch = len(prompts) if pipe.device.type == "cpu" else 4
    setting = calibrate.Setting(name, num_inference_steps, guidance_scale, size, size, prompts, seeds, batch)
    key = entry_key(name, num_inference_steps)
    log.info("calibration on the spot: %s on %s at %dx%d (quick search)%s", key, source or "these weights", size, size,
             f", budget {budget_s:g} s" if budget_s else "")
    start = time.monotonic()
    try:
        entry = calibrate.calibrate(view, setting, weights=source, progress=progress, mode="quick",
                                    deadline=None if budget_s is None else start + budget_s)
    except calibrate.OutOfTime as err:
        log.info("calibration on the spot: %s; auto runs the paper's key steps for %s", err, key)
        return None
    entry["calibrated_on"]["weights_identity"] = weights_identity(pipe.unet)
    entry["search"]["seconds"] = round(time.monotonic() - start, 1)
    write_entry(path, entry)
    log.info(
        "calibration on the spot: %s done in %.0f s (%d images sampled); auto runs '%s'; wrote %s",
        key, entry["search"]["seconds"], entry["search"]["pair_samples"], entry["levels"].get("auto", {}).get("plan") or "stock", path,
    )
    return entry


def plan_file_for_run(pipe, plans, scheduler, num_inference_steps: int, guidance_scale: float,
                      budget_s: float | None = None) -> Path:
    """The plan file a ``calibrate=True`` run of the accelerated ``pipe`` reads (``plans``: the one
    it was given, else None), after calibrating its sampler and step count there where it has no
    entry for them: once per pipeline and kind of run (where that cannot be done, auto runs the
    paper's key steps and says so once)."""
    key = entry_key(sampler_name(scheduler) or type(scheduler).__name__, num_inference_steps)
    path = pipe._spot_files.get(key)
    if path is None:
        path = pipe._spot_files[key] = plans_file_for(pipe, plans, key)
    if key not in pipe._spot_tried and not has_entry(path, key):
        pipe._spot_tried.add(key)
        calibrate_here(pipe, scheduler, num_inference_steps, path, guidance_scale, budget_s)
    return path


set_plan_maker(plan_file_for_run)
