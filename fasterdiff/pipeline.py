"""``accelerate(pipe)``: a pipeline sharing ``pipe``'s components that samples with
encoder propagation, parallel decoding and prior noise injection."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from . import schedule
from .samplers import check_sampler, make_scheduler
from .sampling import Conditioning, RunStats, denoise
from .unet import check_supported

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class Settings:
    """How to accelerate.

    Important:
      key_steps: "paper" (the paper's non-uniform schedule, recommended), "off" (plain
        sampling), an int k >= 2 (every k-th step), or a sequence of 0-based steps.
      parallel: run the decoders of a key step and its non-key steps as one batch
        (faster; more memory).
      noise_injection: alpha of the prior noise injection z <- z + alpha * z_T
        (paper: 0.003; 0 disables).
    To tinker with:
      max_batch: at most this many images per decoder call in parallel mode (None =
        a whole group); bounds memory. A call holds at least one step.
      noise_injection_start: inject before steps whose timestep is below this
        (paper: 500 of 1000, i.e. the second half).
    """

    key_steps: object = "paper"
    parallel: bool = True
    max_batch: int | None = None
    noise_injection: float = 0.003
    noise_injection_start: float = 500

    def __post_init__(self):
        schedule.validate_spec(self.key_steps)
        if not isinstance(self.parallel, bool):
            raise ValueError(f"parallel must be True or False, got {self.parallel!r}")
        if self.max_batch is not None and (
            isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1
        ):
            raise ValueError(f"max_batch must be None or an int >= 1, got {self.max_batch!r}")
        if not _is_real(self.noise_injection) or not 0 <= self.noise_injection <= 1:
            raise ValueError(f"noise_injection must be a number in [0, 1], got {self.noise_injection!r}")
        if not _is_real(self.noise_injection_start) or not 0 <= self.noise_injection_start <= 1000:
            raise ValueError(
                f"noise_injection_start must be a timestep in [0, 1000], got {self.noise_injection_start!r}"
            )

    def steps_per_call(self, images: int) -> int | None:
        if not self.parallel:
            return 1
        if self.max_batch is None:
            return None
        return max(1, self.max_batch // images)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class FasterDiffusionOutput(StableDiffusionPipelineOutput):
    """``StableDiffusionPipelineOutput`` plus what the run did."""

    stats: RunStats | None = None


class FasterDiffusionPipeline(StableDiffusionPipeline):
    """A StableDiffusionPipeline whose ``__call__`` samples with FasterDiffusion.

    Made by :func:`accelerate`; shares the UNet, VAE, text encoder, tokenizer and
    safety checker of the pipeline it came from. Every sampler gets a fresh scheduler
    per call, so nothing carries over between calls.
    """

    settings: Settings
    base_scheduler_config: dict  # the noise schedule every sampler is built from

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampler: str = "DDIM",
        output_type: str = "pil",
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        return_dict: bool = True,
        **overrides,
    ) -> FasterDiffusionOutput:
        """Generate images; arguments as ``StableDiffusionPipeline.__call__``.

        ``sampler`` is one of :data:`fasterdiff.SAMPLER_NAMES`, built from this
        pipeline's scheduler config. Keyword arguments named like the fields of
        :class:`Settings` override this pipeline's settings for one call.
        """
        started = time.perf_counter()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        settings = dataclasses.replace(self.settings, **overrides) if overrides else self.settings
        _check_int("num_inference_steps", num_inference_steps, 1, 1000)
        _check_int("num_images_per_prompt", num_images_per_prompt, 1, 64)
        if not _is_real(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        check_sampler(sampler)
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        _check_int("height", height, 8, 4096)
        _check_int("width", width, 8, 4096)
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)

        device = self._execution_device
        self._guidance_scale = guidance_scale  # read by do_classifier_free_guidance
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        images = batch_size * num_images_per_prompt

        cond_embeds, uncond_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
        )
        if self.do_classifier_free_guidance:
            cond_embeds = torch.cat([uncond_embeds, cond_embeds])
        cond = Conditioning(cond_embeds, guidance_scale, cross_attention_kwargs)

        self.scheduler = make_scheduler(sampler, self.base_scheduler_config)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        plan = schedule.resolve(settings.key_steps, len(self.scheduler.timesteps))
        z_T = self.prepare_latents(
            images,
            self.unet.config.in_channels,
            height,
            width,
            cond_embeds.dtype,
            device,
            generator,
            latents,
        )
        with self.progress_bar(total=plan.num_steps) as bar:
            latents, stats = denoise(
                self.unet,
                self.scheduler,
                z_T,
                plan,
                cond,
                step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
                steps_per_call=settings.steps_per_call(images),
                noise_injection=settings.noise_injection,
                noise_injection_start=settings.noise_injection_start,
                on_step=bar.update,
            )
        image, nsfw = self._to_output(latents, output_type, generator, device, cond_embeds.dtype)
        self.maybe_free_model_hooks()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds = time.perf_counter() - started
        if not return_dict:
            return image, nsfw
        return FasterDiffusionOutput(images=image, nsfw_content_detected=nsfw, stats=stats)

    def _to_output(self, latents, output_type, generator, device, dtype):
        """VAE decode, safety check and post-processing, as StableDiffusionPipeline does."""
        if output_type == "latent":
            return latents, None
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        if not torch.isfinite(image).all():
            raise FloatingPointError("the VAE decoder produced NaN/inf pixels (numerical overflow; try fp32)")
        image, nsfw = self.run_safety_checker(image, device, dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def accelerate(
    pipe: StableDiffusionPipeline,
    key_steps="paper",
    parallel: bool = True,
    max_batch: int | None = None,
    noise_injection: float = 0.003,
    noise_injection_start: float = 500,
) -> FasterDiffusionPipeline:
    """A FasterDiffusion pipeline sharing ``pipe``'s components; ``pipe`` is left as it was.

    See :class:`Settings` for the arguments. ``pipe`` keeps giving stock output.
    """
    settings = Settings(key_steps, parallel, max_batch, noise_injection, noise_injection_start)
    check_supported(pipe.unet)
    components = dict(pipe.components)
    components["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config)
    fast = FasterDiffusionPipeline(**components, requires_safety_checker=pipe.config.requires_safety_checker)
    fast.settings = settings
    fast.base_scheduler_config = pipe.scheduler.config
    fast.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return fast
