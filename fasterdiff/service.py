"""What predict.py and the command line share: a validated generation request, run
on a loaded pipeline, images written to files.

The Cog predictor and ``python -m fasterdiff generate`` are thin shells over
:class:`Generator`. Inputs that only a request has (bounds of the predictor's schema,
output format, seed, prompt length) are checked here, with messages naming the input;
:meth:`Request.library_arguments` converts a request into the library's call arguments
once, and the library checks those (key steps against its sampler's step count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from . import defaults, on_the_spot
from .choice import AUTO_KEY_STEPS
from .defaults import BOUNDS, KEY_STEP_MODES, MAX_PROMPT_CHARS, MAX_SEED, OUTPUT_FORMATS  # noqa: F401  (the service's API)
from .inputs import init_and_mask
from .pipeline import accelerate
from .plan_file import entry_key
from .samplers import SAMPLER_NAMES, make_scheduler, sampler_timesteps
from .reuse import RunStats, is_out_of_memory
from .schedule import parse_step_list

# Call arguments of an accelerated pipeline that stock diffusers does not take.
ACCELERATION_ARGUMENTS = ("sampler", "key_steps", "forecast", "parallel", "noise_injection")


@dataclass
class Request:
    """One generation request, as the predictor's inputs name it."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the model's native size (512 for SD 1.5)
    height: int | None = None
    num_outputs: int = defaults.NUM_OUTPUTS
    sampler: str = defaults.SAMPLER
    num_inference_steps: int = defaults.NUM_INFERENCE_STEPS
    key_step_mode: str = defaults.KEY_STEP_MODE
    uniform_interval: int = defaults.UNIFORM_INTERVAL
    forecast: int = defaults.FORECAST
    custom_key_steps: str = ""
    parallel: bool = True
    noise_injection_strength: float = defaults.NOISE_INJECTION
    guidance_scale: float = defaults.GUIDANCE_SCALE
    seed: int | None = None
    output_format: str = defaults.OUTPUT_FORMAT
    output_quality: int = defaults.OUTPUT_QUALITY
    disable_safety_checker: bool = False
    compare_with_baseline: bool = False
    image: str | os.PathLike | None = None  # img2img / inpainting: the picture to start from
    mask: str | os.PathLike | None = None  # inpainting: white = repaint
    prompt_strength: float = defaults.PROMPT_STRENGTH  # with an image: how far from it (1 = all the way)

    @property
    def mode(self) -> str:
        """What the request asks for: "text-to-image", "img2img" or "inpainting"."""
        if self.image is None:
            return "text-to-image"
        return "inpainting" if self.mask is not None else "img2img"

    def validate(self) -> None:
        """Raise ValueError naming the first bad input."""
        for name in ("prompt", "negative_prompt", "custom_key_steps"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name} is longer than {MAX_PROMPT_CHARS} characters")
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if name in ("seed", "width", "height") and value is None:
                continue
            is_int = isinstance(value, int) and not isinstance(value, bool)
            is_num = is_int or (isinstance(value, float) and math.isfinite(value))
            if not (is_int if isinstance(low, int) else is_num):
                kind = "an integer" if isinstance(low, int) else "a number"
                raise ValueError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
        for name in ("width", "height"):
            if getattr(self, name) is not None and getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {getattr(self, name)}")
        for name, choices in (
            ("sampler", SAMPLER_NAMES),
            ("key_step_mode", KEY_STEP_MODES),
            ("output_format", OUTPUT_FORMATS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("parallel", "disable_safety_checker", "compare_with_baseline"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.forecast and self.key_step_mode in AUTO_KEY_STEPS:
            raise ValueError(
                f"forecast: key_step_mode={self.key_step_mode!r} takes it from the plan file; use forecast=0, "
                "or key_step_mode non-uniform, uniform or custom"
            )
        if self.key_step_mode != "custom" and self.custom_key_steps.strip():
            raise ValueError("custom_key_steps is only used with key_step_mode='custom'")
        if self.key_step_mode == "custom" and not self.custom_key_steps.strip():
            raise ValueError("custom_key_steps: required with key_step_mode='custom', e.g. '0,1,2,3,5,10,15,25,35'")
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path to a picture file, got {type(value).__name__}")
        if self.mask is not None and self.image is None:
            raise ValueError("mask: needs an image (the picture to inpaint); give image too")
        if self.image is not None and int(self.num_inference_steps * self.prompt_strength) < 1:
            raise ValueError(
                f"prompt_strength: {self.prompt_strength!r} with num_inference_steps={self.num_inference_steps} runs "
                f"no step (diffusers runs int(steps x strength)); raise either"
            )

    def library_arguments(self, native_size: int | None = None, image=None, mask=None) -> dict:
        """This request as keyword arguments of an accelerated pipeline's call (validated
        first): the one place a request is converted. The library checks the result.

        A width or height not given is ``native_size`` (None leaves it to the pipeline,
        which uses the same). ``image`` and ``mask``: the opened pictures
        (:func:`fasterdiff.inputs.init_and_mask`); the output then takes the image's size.
        """
        self.validate()
        key_steps = {"non-uniform": "paper", "off": "off", "uniform": self.uniform_interval, **{m: m for m in AUTO_KEY_STEPS}}.get(
            self.key_step_mode
        )
        if self.key_step_mode == "custom":
            key_steps = parse_step_list(self.custom_key_steps)
        return dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or None,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=native_size if self.height is None else self.height,
            width=native_size if self.width is None else self.width,
            num_images_per_prompt=self.num_outputs,
            sampler=self.sampler,
            key_steps=key_steps,
            forecast=self.forecast,
            parallel=self.parallel,
            noise_injection=self.noise_injection_strength,
        ) | self._image_arguments(image, mask)

    def _image_arguments(self, image, mask) -> dict:
        if image is None:
            return {}
        size = {"width": image.size[0], "height": image.size[1]}
        if mask is not None:
            return {"image": image, "mask_image": mask, "strength": self.prompt_strength, **size}
        return {"image": image, "strength": self.prompt_strength, **size}  # height/width: dropped by the caller

    def key_step_inputs(self) -> str:
        """The inputs the library's ``key_steps`` comes from, for its error messages."""
        names = {"uniform": ["uniform_interval"], "custom": ["custom_key_steps", "num_inference_steps"]}
        extra = ["forecast"] if self.forecast else []
        return ", ".join(
            f"{n}={getattr(self, n)!r}" for n in ["key_step_mode", *names.get(self.key_step_mode, []), *extra]
        )


@dataclass
class Result:
    paths: list[Path]
    seed: int
    stats: RunStats  # what the accelerated run did
    baseline_seconds: float | None = None
    messages: list[str] = field(default_factory=list)


def view(pipe: StableDiffusionPipeline, cls: type = StableDiffusionPipeline, **replace):
    """A stock ``cls`` pipeline of ``pipe``'s components with some replaced (nothing is
    copied; ``pipe`` is left as it was)."""
    parts = dict(pipe.components, **replace)
    requires = pipe.config.requires_safety_checker and parts["safety_checker"] is not None
    out = cls(**parts, requires_safety_checker=requires)
    if pipe.config.get("_name_or_path"):  # where the weights (and their plan file) came from
        out.register_to_config(_name_or_path=pipe.config["_name_or_path"])
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out


def without_safety_checker(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """The same components, no safety checker."""
    return view(pipe, safety_checker=None)


# the stock pipeline class of each kind of request (Request.mode)
PIPELINES = {
    "text-to-image": StableDiffusionPipeline,
    "img2img": StableDiffusionImg2ImgPipeline,
    "inpainting": StableDiffusionInpaintPipeline,
}


class Generator:
    """Holds the stock and accelerated pipelines: text-to-image, img2img and inpainting,
    each with and without safety checker, all sharing one set of components."""

    def __init__(self, pipe: StableDiffusionPipeline, compile: bool | dict = False):
        self.device = pipe.device
        unchecked = without_safety_checker(pipe) if pipe.safety_checker is not None else pipe
        self.stock = {False: pipe, True: unchecked}  # keyed by disable_safety_checker
        self.fast = {False: accelerate(pipe, compile=compile), True: accelerate(unchecked, compile=compile)}
        # img2img and inpainting: keyed by (mode, disable_safety_checker)
        self.editing = {
            (mode, unsafe): accelerate(view(base, cls), compile=compile)
            for mode, cls in PIPELINES.items() if mode != "text-to-image"
            for unsafe, base in self.stock.items()
        }
        # one compiled UNet for all, so that one warm-up serves all; and one max_batch="auto"
        # measurement: the warm-up runs one of them, and after it has recorded CUDA graphs the
        # others would measure a replay, which allocates nothing new
        for fast in [self.fast[True], *self.editing.values()]:
            if compile:
                fast.unet = self.fast[False].unet
            fast.share_batch_sizes(self.fast[False])
        self.base_scheduler_config = pipe.scheduler.config
        # The size a model was trained at (512 for SD 1.5, 32 for the stand-in): the default.
        # Below half of it a model draws broken images (refused); above twice it, repeated
        # or stretched shapes (a warning).
        self.native_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.min_size = max(BOUNDS["width"][0], self.native_size // 2)
        self.max_size = 2 * self.native_size

    def pipeline(self, req: Request):
        """The accelerated pipeline a request runs on."""
        if req.mode == "text-to-image":
            return self.fast[req.disable_safety_checker]
        return self.editing[req.mode, req.disable_safety_checker]

    def __call__(self, req: Request, out_dir: str | os.PathLike) -> Result:
        req.validate()
        image = mask = None
        messages = []
        if req.image is not None:
            image, mask, messages = init_and_mask(req.image, req.mask, self.min_size, BOUNDS["width"][1])
        args = req.library_arguments(self.native_size, image, mask)
        self._check_size(args)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "big")
        messages = [f"seed: {seed}", *messages, *self._warnings(req, args)]
        fast = self.pipeline(req)
        call = _accepted(fast, args)
        with _explain_out_of_memory(args), _naming_inputs(req), _truncation_said_once():
            out = fast(**call, generator=torch.Generator("cpu").manual_seed(seed))
        stats = out.stats
        # (file name, image, flagged): accelerated images are out-<i>, the baseline's stock-<i>
        named = _named("out", out)
        messages += _stats_messages(req, stats)
        baseline_seconds = None
        if req.compare_with_baseline:
            base, baseline_seconds = self._baseline(req, args, seed)
            named += _named("stock", base)
            # the baseline is stock as users run it (eager); a compiled UNet's gain is in the speedup
            compiled = hasattr(fast.unet, "_orig_mod")  # as the pipeline tells a compiled UNet
            eager = " (eager UNet; the accelerated run's is compiled)" if compiled else ""
            messages += [
                f"stock diffusers seconds: {baseline_seconds:.2f}{eager}",
                f"speedup: {baseline_seconds / stats.seconds:.2f}x",
            ]
        left_out = [name for name, _, bad in named if bad]
        if left_out:
            messages.append(f"NSFW content detected in {len(left_out)} image(s) ({', '.join(left_out)}); they were left out")
        if len(left_out) == len(named):
            raise RuntimeError("NSFW content detected in every image. Try another prompt or seed.")
        kept = {name: image for name, image, bad in named if not bad}
        paths = save_images(kept, Path(out_dir), req.output_format, req.output_quality)
        return Result(paths, seed, stats, baseline_seconds, messages)

    def _check_size(self, args: dict) -> None:
        for name in ("width", "height"):
            if args[name] < self.min_size:
                raise ValueError(
                    f"{name} must be at least {self.min_size} for this model (half its native "
                    f"{self.native_size}x{self.native_size}), got {args[name]}"
                )

    def _warnings(self, req: Request, args: dict) -> list[str]:
        """What the request will get that the user may not expect."""
        messages = []
        if max(args["width"], args["height"]) > self.max_size:
            messages.append(
                f"warning: {args['width']}x{args['height']} is more than twice this model's native "
                f"{self.native_size}x{self.native_size}; expect repeated or stretched shapes"
            )
        first = int(sampler_timesteps(req.sampler, self.base_scheduler_config, req.num_inference_steps)[0])
        total = self.base_scheduler_config.num_train_timesteps
        if req.image is None and first < 0.75 * total:  # e.g. DDIM and PNDM ("leading" spacing) below 4 steps
            messages.append(
                f"warning: {req.sampler} with {req.num_inference_steps} step(s) starts at timestep {first} of {total}, "
                "far from pure noise: expect a noisy or washed-out image; use more steps"
            )
        if req.negative_prompt.strip() and req.guidance_scale <= 1:
            messages.append("warning: negative_prompt is not used with guidance_scale=1 (no classifier-free guidance)")
        if req.image is None and req.prompt_strength != defaults.PROMPT_STRENGTH:
            messages.append("warning: prompt_strength is only used with an image (img2img or inpainting)")
        tokenizer = self.stock[False].tokenizer
        limit = tokenizer.model_max_length
        for name in ("prompt", "negative_prompt"):
            ids = tokenizer(getattr(req, name), verbose=False).input_ids
            if len(ids) > limit:
                ignored = tokenizer.decode(ids[limit - 1 : -1])  # as diffusers cuts: keep limit - 1, then the end token
                if len(ignored) > 120:  # its start and its end, not pages of it
                    ignored = f"{ignored[:70]} ... {ignored[-40:]}"
                messages.append(
                    f"warning: {name} is {len(ids)} tokens; CLIP reads only the first {limit}, "
                    f"the rest is ignored: {ignored!r}"
                )
        return messages

    def _baseline(self, req: Request, args: dict, seed: int):
        """Stock diffusers on the same request and seed: its output and seconds."""
        # a view with the request's sampler: the held pipeline keeps its own scheduler
        stock = view(
            self.stock[req.disable_safety_checker],
            PIPELINES[req.mode],
            scheduler=make_scheduler(req.sampler, self.base_scheduler_config),
        )
        start = time.perf_counter()
        common = _accepted(stock, {k: v for k, v in args.items() if k not in ACCELERATION_ARGUMENTS})
        with _explain_out_of_memory(args), _truncation_said_once():
            base = stock(**common, generator=torch.Generator("cpu").manual_seed(seed))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return base, time.perf_counter() - start

    def calibrate(self, sampler: str = defaults.SAMPLER, steps: int = defaults.NUM_INFERENCE_STEPS,
                  budget_s: float | None = None) -> bool:
        """Calibrate auto's plan for ``sampler`` at ``steps`` on the spot where no plan file has
        one (:mod:`fasterdiff.on_the_spot`), and have every pipeline read the file it went to.
        Whether a calibrated entry is there now."""
        fast = self.fast[True]
        scheduler = make_scheduler(sampler, self.base_scheduler_config)
        path = on_the_spot.plan_file_for_run(fast, None, scheduler, steps, defaults.GUIDANCE_SCALE, budget_s)
        there = on_the_spot.has_entry(path, entry_key(sampler, steps))
        if there:
            for pipe in [*self.fast.values(), *self.editing.values()]:
                pipe.settings = dataclasses.replace(pipe.settings, plans=str(path))
        return there

    def warm_up(self) -> float:
        """One default request at the native size, thrown away: the first real prediction
        does not pay for CUDA start-up or compiling. Returns its seconds."""
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            self(Request(prompt="a lighthouse on a cliff at dusk", seed=0, disable_safety_checker=True), tmp)
        return time.perf_counter() - start


def _accepted(pipe, args: dict) -> dict:
    """``args`` without the size arguments a pipeline does not take (img2img: the image's size)."""
    if isinstance(pipe, StableDiffusionImg2ImgPipeline):
        return {k: v for k, v in args.items() if k not in ("width", "height")}
    return args


def _stats_messages(req: Request, stats: RunStats) -> list[str]:
    """What the accelerated run did, for the logs."""
    pndm = "; PNDM makes one more than num_inference_steps" if stats.num_steps > req.num_inference_steps else ""
    strength = f"; prompt_strength {req.prompt_strength:g} runs {stats.num_steps}" if req.image is not None else ""
    messages = [
        f"key steps: {list(stats.key_steps)} ({stats.full_evaluations} of {stats.num_steps} UNet evaluations "
        f"compute the whole UNet{pndm}{strength})",
        *([stats.plan] if stats.plan else []),
        f"evaluations reusing cached features: {stats.reused_evaluations}",
        f"UNet calls: {stats.unet_calls} (steps per call: {stats.steps_per_call})",
        f"fasterdiff seconds: {stats.seconds:.2f}",
    ]
    if stats.decoded_in_float32:
        messages.append("warning: the VAE overflowed in half precision; the images were decoded again in float32")
    if stats.out_of_memory_retries:
        messages.append(f"warning: {stats.out_of_memory_retries} decoder batches ran out of memory and were split")
    return messages


def env_flag(name: str, default: bool) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (any case); unset: ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {os.environ[name]!r}")


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment; unset: ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {os.environ[name]!r}")
    return seconds


# torch.compile modes FASTERDIFF_COMPILE may name; "reduce-overhead" and "max-autotune" use CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def env_compile(name: str = "FASTERDIFF_COMPILE") -> bool | dict:
    """``accelerate``'s ``compile`` from the environment: a yes/no flag (yes: torch.compile's
    default mode) or one of :data:`COMPILE_MODES`; unset: False."""
    value = os.environ.get(name, "").strip().lower()
    if value in COMPILE_MODES:
        return True if value == "default" else {"mode": value}
    try:
        return env_flag(name, False)
    except ValueError:
        raise ValueError(
            f"{name} must be 1/true/yes/on, 0/false/no/off or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
            f"got {os.environ[name]!r}"
        ) from None


# diffusers logs the cut text of a long prompt at every encode_prompt; the messages above say it once.
_ENCODE_PROMPT_LOGGER = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"


def _not_truncation(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("The following part of your input was truncated")


@contextlib.contextmanager
def _truncation_said_once():
    logger = logging.getLogger(_ENCODE_PROMPT_LOGGER)
    logger.addFilter(_not_truncation)
    try:
        yield
    finally:
        logger.removeFilter(_not_truncation)


@contextlib.contextmanager
def _naming_inputs(req: Request):
    """The library names its own arguments; add the request inputs its key steps came from."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{err} (from {req.key_step_inputs()})") from err


@contextlib.contextmanager
def _explain_out_of_memory(args: dict):
    """Out of memory even one step at a time: say what to lower instead of a trace."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise RuntimeError(
            f"out of memory generating {args['num_images_per_prompt']} image(s) of {args['width']}x{args['height']}; "
            "lower num_outputs, width or height"
        ) from err
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _named(stem: str, out) -> list[tuple[str, object, bool]]:
    """A pipeline output's images as (``stem-<index>``, image, flagged by the safety checker)."""
    flagged = out.nsfw_content_detected or [False] * len(out.images)
    return [(f"{stem}-{i}", image, bool(bad)) for i, (image, bad) in enumerate(zip(out.images, flagged))]


def save_images(images: dict, out_dir: Path, fmt: str, quality: int) -> list[Path]:
    """Each image as ``<name>.<fmt>`` in ``out_dir``, in the dict's order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images.items():
        path = out_dir / f"{name}.{fmt}"
        if fmt == "png":
            image.save(path, format="PNG")
        else:
            image.convert("RGB").save(path, format="JPEG" if fmt == "jpg" else "WEBP", quality=quality)
        paths.append(path)
    return paths
