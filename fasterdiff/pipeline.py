"""``accelerate(pipe)``: a pipeline sharing ``pipe``'s components whose ``__call__`` is
diffusers' own, run with a reuse plan carried out on the UNet and prior noise injection
as a step-end callback.

The accelerated pipeline takes every argument the stock pipeline takes, in the same
order, plus the settings of :class:`Settings` as keywords (each overrides the
pipeline's setting for one call) and ``sampler=`` to sample with another scheduler
for one call. The Stable Diffusion 1.5-family and SDXL pipelines of :data:`SUPPORTED`
are supported: text-to-image, img2img, inpainting and ControlNet, each through its own
stock ``__call__``.

Steps are the UNet evaluations that actually run: img2img and inpainting with
``strength`` s start part-way down the schedule and evaluate about s x N steps; key
steps, groups, noise injection and the stats index those (step 0 is the first that runs).
``key_steps="auto"`` reads the plan calibrated for the sampler and ``num_inference_steps``
and runs its last steps, the ones whose timesteps run (:meth:`ReusePlan.last`).
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
import inspect
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from . import defaults, schedule
from .choice import AUTO_KEY_STEPS, choose, is_auto
from .controlnet import ControlNetReplay
from .plan_file import check_plans_file, default_plans_file
from .plan import FORECAST_ORDERS, REUSE_KINDS, ReusePlan, build_plan
from .reuse import AUTO_CHUNK_SIZES, ReuseExecutor, Run, RunStats, UNetView
from .samplers import check_sampler, make_scheduler
from .unet import check_supported


log = logging.getLogger("fasterdiff")


@dataclass(frozen=True)
class Settings:
    """How to accelerate.

    Important:
      key_steps: "auto" (the fastest plan calibrated on this model whose images are at
        least as close to stock's as DeepCache interval 3's and within the floor; see
        :mod:`fasterdiff.calibrate`), "auto-fast" (the same at DeepCache interval 5's
        level), "paper" (the paper's non-uniform schedule), "off" (plain sampling), an
        int k >= 2 (every k-th step) or a sequence of 0-based steps starting with 0: the
        steps where the encoder computes. A :class:`fasterdiff.plan.ReusePlan` is used
        as it is.
      cache_interval: DeepCache instead (``reuse="deep"``): the whole UNet every k-th
        step, everything below ``branch`` replayed at the others; leave key_steps out.
      reuse: "encoder" (FasterDiffusion: conv_in, down and mid blocks replay at non-key
        steps) or "deep" (DeepCache, set by ``cache_interval``).
      parallel: run a key step and its non-key steps as one batched UNet call (faster,
        more memory). None = whenever the plan allows it (encoder reuse, not deep).
      noise_injection: alpha of the prior noise injection z <- z + alpha * z_T
        (paper: 0.003; 0 disables; Euler-type samplers: z_T in the scale of the step's
        latents, see :func:`injected_noise`). It makes up for the texture reuse loses, so
        a run whose plan reuses nothing (key_steps="off") samples as stock, without it.
      forecast: how a non-key step gets a replayed module's output: 0 = the last
        computed one (the paper), 1 = extrapolated linearly in the timestep through
        the last two key steps, 2 = quadratically through the last three. Costs no
        UNet work and keeps parallel decoding; whether it helps depends on the model.
    To tinker with:
      branch: DeepCache's cache_branch_id (0 = the shallowest path, fastest).
      max_batch: how many images one batched UNet call may hold (a group's steps times
        the images of a step; a call holds at least one step). "auto" (default): chosen
        by memory, in whole steps of 1, 2, 4, 8 or 16, so that the peak stays within 1.5x
        stock's and within free CUDA memory (measured once per latent shape on a CUDA
        device, on the first call of the first run; lowered when a batch of that size runs
        out of memory); latents on the CPU: as many steps as keep a call within four guided
        steps of SD 1.5 at 512 px in latent pixels (16 at 256 px and below). None: a whole group per call
        (fastest, most memory).
      noise_injection_start: inject before steps whose timestep is below this
        (paper: 500 of 1000, i.e. the second half).
      plans: the plan file "auto" reads (default: fasterdiff_plans.json beside the
        weights the pipeline was loaded from).
      calibrate: where "auto" finds no plan for a run's sampler and step count, calibrate
        one on the spot (the quick search of :mod:`fasterdiff.calibrate`) and keep it: a
        one-time cost of some hundreds of sampled images at the model's native size
        (minutes for SD 1.5 on a GPU; 46 s for DDIM-50 on the 32 px stand-in on 2 CPU
        cores), then every run with that sampler and step count reads it. Kept in
        ``plans``, else beside the weights where writable, else in a cache folder named
        by the weights (see :mod:`fasterdiff.on_the_spot`).
    """

    key_steps: object = defaults.KEY_STEPS
    parallel: bool | None = defaults.PARALLEL
    max_batch: int | str | None = defaults.MAX_BATCH
    noise_injection: float = defaults.NOISE_INJECTION
    noise_injection_start: float = defaults.NOISE_INJECTION_START
    reuse: str = defaults.REUSE
    branch: int = defaults.BRANCH
    forecast: int = defaults.FORECAST
    plans: str | None = None  # the plan file "auto" reads
    cache_interval: int | None = None
    calibrate: bool = False

    def __post_init__(self):
        self._spell_deep()
        auto = is_auto(self.key_steps)
        if auto and (self.reuse != "encoder" or self.forecast):
            raise ValueError(
                f"reuse and forecast need explicit key_steps (e.g. key_steps='paper'); key_steps={self.key_steps!r} "
                "picks them from the plan file"
            )
        if isinstance(self.forecast, bool) or self.forecast not in FORECAST_ORDERS:
            raise ValueError(f"forecast must be one of {FORECAST_ORDERS}, got {self.forecast!r}")
        if self.reuse not in REUSE_KINDS:
            raise ValueError(f"reuse must be one of {', '.join(REUSE_KINDS)}, got {self.reuse!r}")
        if self.reuse == "deep":
            if self.cache_interval is None and not isinstance(self.key_steps, ReusePlan):
                raise ValueError(
                    f"reuse='deep' needs cache_interval=k (DeepCache's interval) or a ReusePlan as key_steps, "
                    f"got key_steps={self.key_steps!r}"
                )
            if self.parallel:
                raise ValueError("parallel=True is not possible with reuse='deep': its steps read their own latents")
        elif not auto and not isinstance(self.key_steps, ReusePlan):
            schedule.validate_spec(self.key_steps)
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"branch must be an int >= 0, got {self.branch!r}")
        if self.parallel is not None and not isinstance(self.parallel, bool):
            raise ValueError(f"parallel must be True, False or None, got {self.parallel!r}")
        if self.max_batch not in (None, "auto") and (
            isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1
        ):
            raise ValueError(f"max_batch must be 'auto', None or an int >= 1, got {self.max_batch!r}")
        if not _is_real(self.noise_injection) or not 0 <= self.noise_injection <= 1:
            raise ValueError(f"noise_injection must be a number in [0, 1], got {self.noise_injection!r}")
        if not _is_real(self.noise_injection_start) or not 0 <= self.noise_injection_start <= 1000:
            raise ValueError(
                f"noise_injection_start must be a timestep in [0, 1000], got {self.noise_injection_start!r}"
            )
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate must be True or False, got {self.calibrate!r}")

    def _spell_deep(self) -> None:
        """``cache_interval=k`` means DeepCache (reuse="deep"); the old spelling, an int
        key_steps with reuse="deep", still works for one release, with a warning."""
        k = self.key_steps
        if self.reuse == "deep" and self.cache_interval is None and isinstance(k, int) and not isinstance(k, bool):
            warnings.warn(
                f"key_steps={k} with reuse='deep' is now cache_interval={k} (an int key_steps is the uniform "
                "interval of encoder reuse); the old spelling goes in the next release",
                DeprecationWarning,
                stacklevel=5,
            )
            object.__setattr__(self, "cache_interval", k)
            k = None
        if self.cache_interval is None:
            return
        c = self.cache_interval
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"cache_interval must be an int >= 1 (DeepCache's interval), got {c!r}")
        if k not in (None, defaults.KEY_STEPS):
            raise ValueError(f"cache_interval sets DeepCache's key steps; leave key_steps out (got key_steps={k!r})")
        object.__setattr__(self, "key_steps", None)
        object.__setattr__(self, "reuse", "deep")

    def plan(self, unet, num_steps: int) -> ReusePlan:
        key_steps = self.key_steps if self.cache_interval is None else self.cache_interval
        return build_plan(unet, key_steps, num_steps, self.reuse, self.branch, self.forecast)

    def without_auto(self, scheduler, num_inference_steps: int, unet, evaluations: int) -> tuple[Settings, str]:
        """With key_steps="auto" or "auto-fast": the settings of the plan it picks, and why; else these.

        ``evaluations``: the UNet evaluations that run; fewer than the calibrated plan's where
        img2img's strength starts part-way: the plan's last ``evaluations`` steps run.
        """
        if not is_auto(self.key_steps):
            return self, ""
        choice = choose(self.plans, scheduler, num_inference_steps, unet, level=AUTO_KEY_STEPS[self.key_steps])
        key_steps, reason = choice.key_steps, choice.reason
        if isinstance(key_steps, ReusePlan) and key_steps.num_steps > evaluations:
            key_steps = key_steps.last(evaluations)
            reason += f"; its last {evaluations} of {choice.key_steps.num_steps} steps (the ones strength runs)"
        # parallel=True asks to batch where the plan allows; a deep plan does not
        parallel = None if self.parallel and choice.reuse == "deep" else self.parallel
        return dataclasses.replace(self, key_steps=key_steps, reuse=choice.reuse, parallel=parallel), reason

    def steps_per_call(self, images: int) -> int | str | None:
        if self.max_batch is None or self.max_batch == "auto":
            return self.max_batch
        return max(1, self.max_batch // images)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(Settings))

# What ``calibrate=True`` calls: fasterdiff.on_the_spot sets it when imported (fasterdiff's
# __init__ imports it). It builds on this module (calibration samples with accelerated
# pipelines), so this module does not import it.
_plan_maker = None


def set_plan_maker(maker) -> None:
    """``maker(pipe, plans, scheduler, num_inference_steps, guidance_scale)`` returns the plan
    file a ``calibrate=True`` run reads, after making its entry where missing."""
    global _plan_maker
    _plan_maker = maker


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# What accelerate() takes: each with the same settings and the same core.
SUPPORTED = (
    StableDiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionXLPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)


@dataclass
class FasterDiffusionOutput(StableDiffusionPipelineOutput):
    """``StableDiffusionPipelineOutput`` plus what the run did."""

    stats: RunStats | None = None


@dataclass
class FasterDiffusionXLOutput(StableDiffusionXLPipelineOutput):
    """``StableDiffusionXLPipelineOutput`` plus what the run did."""

    stats: RunStats | None = None


class _Accelerated:
    """``__call__`` = the stock pipeline's, with the plan carried out on the UNet.

    Mixed into a diffusers pipeline class; :func:`accelerate` makes the instances.
    """

    settings: Settings
    _executor: ReuseExecutor

    def __call__(self, *args, sampler: str | None = None, **kwargs):
        """Stock's ``__call__`` with the reuse plan carried out on the UNet.

        Takes every argument stock takes, in stock's order; ``sampler`` (one of
        :data:`fasterdiff.SAMPLER_NAMES`) replaces the pipeline's scheduler for this call,
        and :class:`Settings` names override this pipeline's settings for this call.
        """
        started = time.perf_counter()
        if self.unet is None:
            raise ValueError("this pipeline has no UNet to sample with (it was made from one with unet=None)")
        settings = self._settings_for_call(kwargs)
        stock_call = super().__call__
        bound = inspect.signature(stock_call).bind(*args, **kwargs)
        call_args = {**_defaults(stock_call), **bound.arguments}
        _check_call(call_args, self.vae_scale_factor)
        if sampler is not None:
            check_sampler(sampler)
        scheduler = self.scheduler if sampler is None else make_scheduler(sampler, self.scheduler.config)
        if settings.calibrate and is_auto(settings.key_steps):
            settings = self._calibrated_here(settings, scheduler, call_args)
            started = time.perf_counter()  # the run's time, not the calibration's
        run, state = self._prepare_run(settings, scheduler, call_args)

        kwargs = dict(bound.arguments)
        kwargs.pop("self", None)
        kwargs.update(self._step_end(call_args, run, state, started))
        real_unet, real_scheduler = self.unet, self.scheduler
        self.__dict__["unet"] = UNetView(real_unet, self._executor)  # not __setattr__: the config stays
        self.__dict__["scheduler"] = scheduler
        self._fasterdiff_state = state
        controlnet = getattr(self, "controlnet", None)
        try:
            with self._executor.running(real_unet, run), (
                ControlNetReplay(self._executor, controlnet, real_unet) if controlnet is not None else nullcontext()
            ):
                out = stock_call(**kwargs)
        finally:
            self.__dict__["unet"], self.__dict__["scheduler"] = real_unet, real_scheduler
            self._fasterdiff_state = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        run.stats.seconds = time.perf_counter() - started
        if not call_args["return_dict"]:
            return out
        return _with_stats(type(out))(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)}, stats=run.stats)

    def _settings_for_call(self, kwargs: dict) -> Settings:
        """This pipeline's settings with the call's :class:`Settings` keywords (taken out of ``kwargs``)."""
        overrides = {k: kwargs.pop(k) for k in SETTING_NAMES if k in kwargs}
        if overrides.get("plans") is not None and not overrides.get("calibrate", self.settings.calibrate):
            check_plans_file(overrides["plans"])
        if "plans" in overrides or "calibrate" in overrides:
            self._spot_files = {}  # where on-the-spot calibration keeps its plans: found again
        if "key_steps" in overrides and "cache_interval" not in overrides:  # one of the two says the key steps
            overrides.update(cache_interval=None, reuse=overrides.get("reuse", defaults.REUSE))
        elif "cache_interval" in overrides and "key_steps" not in overrides:
            overrides["key_steps"] = None
        return dataclasses.replace(self.settings, **overrides)

    def _calibrated_here(self, settings: Settings, scheduler, call_args: dict) -> Settings:
        """``calibrate=True``: the settings reading the plan file on-the-spot calibration keeps
        (see :func:`fasterdiff.on_the_spot.plan_file_for_run`, which may calibrate first)."""
        default = str(default_plans_file(self))
        given = settings.plans if settings.plans != default else None  # the default: not given
        path = _plan_maker(self, given, scheduler, call_args["num_inference_steps"], call_args["guidance_scale"])
        return dataclasses.replace(settings, plans=str(path))

    def _prepare_run(self, settings: Settings, scheduler, call_args: dict) -> tuple[Run, _CallState]:
        """The plan for the evaluations this call will make, as a :class:`Run`, and the call's state."""
        evaluations = self._evaluations(scheduler, call_args)
        settings, chosen = settings.without_auto(scheduler, call_args["num_inference_steps"], self.unet, evaluations)
        if chosen and chosen not in self._said:  # once per pipeline: not at every call
            self._said.add(chosen)
            log.info(chosen)
        plan = settings.plan(self.unet, evaluations)
        if not any(plan.replay) and settings.noise_injection:  # nothing reused ("off", or auto running stock):
            log.info("no step reuses anything: stock sampling, without noise injection")  # nothing to make up for
            settings = dataclasses.replace(settings, noise_injection=0)
        parallel = plan.batchable if settings.parallel is None else settings.parallel

        def timesteps():  # those of the evaluations that run (img2img: the schedule's last ones)
            return self.scheduler.timesteps[len(self.scheduler.timesteps) - evaluations :]

        # a compiled UNet (ours, or one the user compiled) may run CUDA graphs, which reuse output memory
        compiled = hasattr(self.unet, "_orig_mod")
        run = Run(plan, parallel, None, timesteps, pad_sizes=self._pad_sizes, keep_copies=compiled)
        run.stats.plan = chosen
        state = _CallState(settings)
        state.run = run
        return run, state

    def _step_end(self, call_args: dict, run: Run, state: _CallState, started: float) -> dict:
        """The stock call's step-end callback arguments: the user's callback, then noise injection
        before the next step (or, after the last, a check that the latents are finite)."""
        user_callback = call_args["callback_on_step_end"]
        user_inputs = list(call_args["callback_on_step_end_tensor_inputs"] or [])
        if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
            user_inputs = list(user_callback.tensor_inputs)

        def on_step_end(pipe, i, t, tensors):
            outputs = {}
            if user_callback is not None:
                outputs = user_callback(pipe, i, t, {k: tensors[k] for k in user_inputs}) or {}
            latents = outputs.get("latents", tensors["latents"])
            if i + 1 < len(run.timesteps()):
                latents = state.inject(latents, self.scheduler, i + 1, run.timesteps)
            elif not torch.isfinite(latents).all():
                raise FloatingPointError(
                    "sampling produced NaN/inf latents (numerical overflow; try fp32, another sampler "
                    "or a lower guidance_scale)"
                )
            else:
                state.final_latents = latents  # what the VAE decodes
            run.stats.denoise_seconds = time.perf_counter() - started
            return {**outputs, "latents": latents}

        return {
            "callback_on_step_end": on_step_end,
            "callback_on_step_end_tensor_inputs": sorted(set(user_inputs) | {"latents"}),
        }

    def prepare_latents(self, *args, **kwargs):
        """Stock ``prepare_latents``; keeps z_T (the starting latent it returns: pure noise for
        text-to-image, the noised image for img2img and inpainting) and injects it before
        step 0 if due."""
        out = super().prepare_latents(*args, **kwargs)
        state = getattr(self, "_fasterdiff_state", None)
        if state is None:
            return out
        latents = out[0] if isinstance(out, tuple) else out  # inpainting: (latents, noise, ...)
        state.start(latents, latents.shape[0])
        latents = state.inject(latents, self.scheduler, 0, state.run.timesteps)
        return (latents, *out[1:]) if isinstance(out, tuple) else latents

    def _evaluations(self, scheduler, call_args: dict) -> int:
        """How many UNet evaluations the stock loop will make: the schedule's (PNDM: one more
        than steps), then, for img2img and inpainting, the ones ``strength`` leaves, as the
        pipeline's own ``get_timesteps`` cuts them (run on a copy of the scheduler)."""
        probe = copy.deepcopy(scheduler)
        timesteps, steps = retrieve_timesteps(
            probe, call_args["num_inference_steps"], "cpu", call_args.get("timesteps"), call_args.get("sigmas")
        )
        if "strength" in call_args and hasattr(type(self), "get_timesteps"):
            holder = copy.copy(self)  # get_timesteps reads (and sets the begin index of) self.scheduler
            holder.__dict__["scheduler"] = probe
            options = {}
            if "denoising_start" in inspect.signature(self.get_timesteps).parameters:
                options["denoising_start"] = call_args.get("denoising_start")
            timesteps, _ = type(self).get_timesteps(holder, steps, call_args["strength"], "cpu", **options)
        return len(timesteps)


    def share_batch_sizes(self, other) -> None:
        """Use ``other``'s max_batch="auto" measurements (another accelerated pipeline on the
        same UNet): one measurement serves both. After CUDA graphs are recorded a replay
        allocates nothing new, so a second pipeline measuring then would pick too large a batch."""
        self._executor.auto_steps = other._executor.auto_steps

    def run_safety_checker(self, image, device, dtype):
        """Stock's, after decoding again in float32 where the VAE overflowed in half precision."""
        state = self._fasterdiff_state
        if not torch.isfinite(image).all() and self.vae.dtype != torch.float32 and state is not None:
            log.warning("the VAE decoder overflowed in %s; decoding again in float32", self.vae.dtype)
            image = self._decode_in_float32(state.final_latents)
            state.run.stats.decoded_in_float32 = True
        if not torch.isfinite(image).all():
            raise FloatingPointError("the VAE decoder produced NaN/inf pixels (numerical overflow; try fp32)")
        return super().run_safety_checker(image, device, dtype)

    @torch.no_grad()
    def _decode_in_float32(self, latents: torch.Tensor) -> torch.Tensor:
        """Stock's decode of the final latents with a float32 copy of the VAE (freed after)."""
        vae = copy.deepcopy(self.vae).to(torch.float32)
        return vae.decode(latents.to(torch.float32) / vae.config.scaling_factor, return_dict=False)[0]


class _CallState:
    """Noise injection and batch sizing for one call."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.z_T: torch.Tensor | None = None
        self.final_latents: torch.Tensor | None = None
        self.run: Run | None = None

    def start(self, z_T: torch.Tensor, images: int) -> None:
        self.z_T = z_T
        self.run.steps_per_call = self.settings.steps_per_call(images)

    def inject(self, latents: torch.Tensor, scheduler, index: int, timesteps) -> torch.Tensor:
        """``latents`` before step ``index`` (of ``timesteps()``, those that run), with the prior
        noise injected if that step's timestep is due."""
        s = self.settings
        if s.noise_injection > 0 and self.z_T is not None and timesteps()[index] < s.noise_injection_start:
            offset = len(scheduler.timesteps) - len(timesteps())
            return latents + s.noise_injection * injected_noise(self.z_T, scheduler, offset + index)
        return latents


def injected_noise(z_T: torch.Tensor, scheduler, index: int) -> torch.Tensor:
    """What ``alpha`` multiplies before step ``index``: z_T in the scale of that step's latents.

    Variance-preserving samplers (DDIM, DPM-Solver, UniPC, PNDM: initial sigma 1) keep latents
    at unit scale: z_T itself, as the paper writes it. Samplers that work on x + sigma * noise
    (Euler, Euler-Ancestral, LMS: initial sigma 14.6 for SD 1.5's config) hold z_T at the first sigma and
    later latents at sqrt(1 + sigma^2) of theirs: z_T rescaled to that, so that alpha means the
    same for every sampler (measured: with z_T as it is, Euler's 0.003 cost the stand-in's prompt
    accuracy 0.52 -> 0.36 and 0.01 drew no prompt right; docs/noise-injection.md).
    """
    if not isinstance(scheduler, SIGMA_STEP_SCHEDULERS) or index >= len(scheduler.sigmas):
        return z_T
    sigma = float(scheduler.sigmas[index])
    return z_T * ((1 + sigma**2) ** 0.5 / float(scheduler.init_noise_sigma))


# Schedulers whose latent before step i is x + sigmas[i] * noise (one sigma per step). Others on
# x + sigma * noise with sigmas between steps (Heun, KDPM2) get z_T as drawn.
SIGMA_STEP_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _check_call(a: dict, size_multiple: int) -> None:
    """The checks stock leaves to a crash deep inside, as ValueErrors naming the argument."""
    if a.get("timesteps") is None and a.get("sigmas") is None:
        _check_int("num_inference_steps", a["num_inference_steps"], 1, 1000)
    _check_int("num_images_per_prompt", a["num_images_per_prompt"], 1, 64)
    for name in ("height", "width"):
        if a.get(name) is not None:
            _check_int(name, a[name], 8, 4096)
            if a[name] % size_multiple:
                raise ValueError(f"{name} must be a multiple of {size_multiple} (the VAE's scale factor), got {a[name]}")
    if not _is_real(a["guidance_scale"]) or a["guidance_scale"] < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {a['guidance_scale']!r}")
    if a["output_type"] not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {a['output_type']!r}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def _defaults(fn) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _stock_signature(stock_cls):
    """``_Accelerated.__call__`` as seen by ``inspect``: stock's parameters, then ``sampler``
    (keyword-only) before stock's ``**kwargs``, which also takes the :class:`Settings` names."""

    def __call__(self, *args, **kwargs):
        return _Accelerated.__call__(self, *args, **kwargs)

    params = list(inspect.signature(stock_cls.__call__).parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    sampler = inspect.Parameter("sampler", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None)
    tail = tail or [inspect.Parameter("settings", inspect.Parameter.VAR_KEYWORD)]
    __call__.__signature__ = inspect.Signature(head + [sampler] + tail)
    __call__.__doc__ = _Accelerated.__call__.__doc__
    return __call__


_OUTPUTS: dict[type, type] = {
    StableDiffusionPipelineOutput: FasterDiffusionOutput,
    StableDiffusionXLPipelineOutput: FasterDiffusionXLOutput,
}


def _with_stats(output_cls: type) -> type:
    """``output_cls`` (a stock pipeline's output dataclass) with a ``stats`` field added."""
    if output_cls not in _OUTPUTS:
        namespace = {"__annotations__": {"stats": RunStats | None}, "stats": None, "__module__": __name__,
                     "__doc__": f"``{output_cls.__name__}`` plus what the run did."}
        _OUTPUTS[output_cls] = dataclass(type(f"FasterDiffusion{output_cls.__name__}", (output_cls,), namespace))
    return _OUTPUTS[output_cls]


def _accelerated_class(stock: type) -> type:
    """``stock`` with :class:`_Accelerated` mixed in: ``__call__`` is stock's, under a plan."""
    name = "FasterDiffusion" + stock.__name__.removeprefix("StableDiffusion")
    return type(name, (_Accelerated, stock), {
        "__call__": _stock_signature(stock),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"A {stock.__name__} that samples with a reuse plan; made by :func:`accelerate`.",
    })


_CLASSES = {stock: _accelerated_class(stock) for stock in SUPPORTED}
FasterDiffusionPipeline = _CLASSES[StableDiffusionPipeline]
FasterDiffusionXLPipeline = _CLASSES[StableDiffusionXLPipeline]


def accelerate(
    pipe,
    key_steps=defaults.KEY_STEPS,
    parallel: bool | None = defaults.PARALLEL,
    max_batch: int | str | None = defaults.MAX_BATCH,
    noise_injection: float = defaults.NOISE_INJECTION,
    noise_injection_start: float = defaults.NOISE_INJECTION_START,
    reuse: str = defaults.REUSE,
    branch: int = defaults.BRANCH,
    forecast: int = defaults.FORECAST,
    plans: str | os.PathLike | None = None,
    compile: bool | dict = False,
    cache_interval: int | None = None,
    calibrate: bool = False,
):
    """An accelerated pipeline sharing ``pipe``'s components; ``pipe`` is left as it was.

    See :class:`Settings` for the arguments. The new pipeline gets its own copy of
    ``pipe``'s scheduler; set ``fast.scheduler`` to sample with another one, or pass
    ``sampler=`` (one of :data:`fasterdiff.SAMPLER_NAMES`) to a call.

    ``compile``: True (or a dict of ``torch.compile`` options) gives the new pipeline
    its own compiled view of the UNet (``pipe.unet`` stays eager; the weights are
    shared) and pads batched calls to 2, 4, 8 or 16 steps so that few shapes are
    compiled. Kept features are copied, so ``mode="reduce-overhead"`` (CUDA graphs,
    which reuse their output memory on the next replay) replays them intact. The first
    calls compile; warm up before timing.
    """
    if plans is None:
        plans = None if calibrate else default_plans_file(pipe)  # may not exist: auto then runs the paper's key steps
    elif not calibrate:  # a plan file calibration on the spot will write may not exist yet
        check_plans_file(plans)
    settings = Settings(
        key_steps, parallel, max_batch, noise_injection, noise_injection_start, reuse, branch, forecast,
        None if plans is None else str(plans), cache_interval, calibrate,
    )
    if pipe.unet is not None:  # a text-encoder-only pipeline still encodes prompts
        check_supported(pipe.unet)
    stock = next((c for c in SUPPORTED if isinstance(pipe, c)), None)
    if stock is None:
        raise ValueError(
            f"accelerate() takes one of {', '.join(c.__name__ for c in SUPPORTED)}; got {type(pipe).__name__}"
        )
    cls = _CLASSES[stock]
    init = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in init}
    components["scheduler"] = copy.deepcopy(pipe.scheduler)
    options = {k: v for k, v in pipe.config.items() if k in init and k not in components}
    if "add_watermarker" in init:
        options["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    with warnings.catch_warnings():  # __init__'s warning about an outdated scheduler config:
        warnings.simplefilter("ignore", FutureWarning)  # stock gave it, or runs that scheduler as it is
        fast = cls(**components, **options)
    # __init__ fixes outdated scheduler configs in place; stock did that (or not) when it was
    # built, and a scheduler set on it later is used as it is: so here too
    fast.scheduler = copy.deepcopy(pipe.scheduler)
    if pipe.config.get("_name_or_path"):
        fast.register_to_config(_name_or_path=pipe.config["_name_or_path"])
    fast.settings = settings
    fast._executor = ReuseExecutor()
    fast._pad_sizes = None
    if compile:
        options = compile if isinstance(compile, dict) else {}
        fast.unet = torch.compile(pipe.unet, **options)
        fast._pad_sizes = AUTO_CHUNK_SIZES[1:]
    fast._fasterdiff_state = None
    fast._said = set()  # auto's reasons already logged
    fast._spot_files, fast._spot_tried = {}, set()  # calibrate=True: its plan file per kind of run, and what it tried (fasterdiff.on_the_spot)
    fast.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return fast
