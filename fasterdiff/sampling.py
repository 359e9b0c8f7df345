"""The denoising loop with encoder propagation, parallel decoding and z_T injection.

For each group (a key step and the non-key steps after it) the encoder runs once, on
the key step's latent. The decoders of the group's steps then run in chunks: one
step per decoder call when sequential, the whole group (or ``steps_per_call`` steps)
as one batch when parallel, each sample with its own step's time embedding. A
non-key step's noise prediction does not depend on its own latent, so the scheduler
can step through a chunk after its single decoder call: both modes compute the same
thing, up to batching round-off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import unet as unet_split
from .schedule import KeySteps

log = logging.getLogger("fasterdiff")


@dataclass
class RunStats:
    """What one sampling run did."""

    num_steps: int
    key_steps: tuple[int, ...]
    encoder_calls: int = 0
    decoder_calls: int = 0
    decoder_steps_per_call: list[int] = field(default_factory=list)
    out_of_memory_retries: int = 0
    denoise_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def encoder_calls_saved(self) -> int:
        return self.num_steps - self.encoder_calls

    def as_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "key_steps": list(self.key_steps),
            "encoder_calls": self.encoder_calls,
            "encoder_calls_saved": self.encoder_calls_saved,
            "decoder_calls": self.decoder_calls,
            "decoder_steps_per_call": list(self.decoder_steps_per_call),
            "out_of_memory_retries": self.out_of_memory_retries,
            "denoise_seconds": round(self.denoise_seconds, 4),
            "seconds": round(self.seconds, 4),
        }


@dataclass
class Conditioning:
    """Text conditioning and classifier-free guidance for one run."""

    prompt_embeds: torch.Tensor  # [uncond; cond] when guiding, else cond only
    guidance_scale: float
    cross_attention_kwargs: dict | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents] * 2) if self.guided else latents

    def combine(self, eps: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return eps
        uncond, cond = eps.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _decode_steps(
    unet, features: unet_split.EncoderFeatures, timesteps: torch.Tensor, cond: Conditioning, stats: RunStats
) -> list[torch.Tensor]:
    """One decoder call for several timesteps; the guided eps of each, in order.

    If the batch runs out of memory it is split in halves (and halves again) until it
    fits, down to one step per call; a single step that does not fit re-raises.
    """
    n = len(timesteps)
    try:
        per_step = features.batch_size
        emb = unet_split.time_embedding(unet, timesteps.repeat_interleave(per_step), features.mid.dtype)
        eps = unet_split.decode(
            unet,
            features.repeat(n),
            emb,
            cond.prompt_embeds.repeat(n, 1, 1),
            cond.cross_attention_kwargs,
        )
    except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
        if n == 1 or not is_out_of_memory(err):
            raise
        eps = None  # retry outside the except block, once the failed attempt's tensors are freed
    if eps is None:
        stats.out_of_memory_retries += 1
        half = n // 2
        log.warning("decoder batch of %d steps ran out of memory; retrying as %d + %d steps", n, half, n - half)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _decode_steps(unet, features, timesteps[:half], cond, stats) + _decode_steps(
            unet, features, timesteps[half:], cond, stats
        )
    stats.decoder_calls += 1
    stats.decoder_steps_per_call.append(n)
    return [cond.combine(e) for e in eps.chunk(n)]


def denoise(
    unet,
    scheduler,
    latents: torch.Tensor,
    plan: KeySteps,
    cond: Conditioning,
    *,
    step_kwargs: dict,
    steps_per_call: int | None,
    noise_injection: float,
    noise_injection_start: float,
    on_step: Callable[[], None] = lambda: None,
) -> tuple[torch.Tensor, RunStats]:
    """Run every step of ``scheduler.timesteps`` from ``latents`` (z_T).

    ``steps_per_call``: steps per decoder call; 1 = sequential, None = a whole group.
    ``noise_injection``: alpha of z <- z + alpha * z_T before every step whose
    timestep is below ``noise_injection_start``; 0 disables it.
    """
    timesteps = scheduler.timesteps
    if len(timesteps) != plan.num_steps:
        raise ValueError(f"schedule is for {plan.num_steps} steps, the sampler has {len(timesteps)}")
    stats = RunStats(num_steps=plan.num_steps, key_steps=plan.steps)
    start = time.perf_counter()
    z_T = latents

    def inject(z: torch.Tensor, t) -> torch.Tensor:
        if noise_injection > 0 and t < noise_injection_start:
            return z + noise_injection * z_T
        return z

    for group in plan.groups:
        key = group[0]
        latents = inject(latents, timesteps[key])
        x = scheduler.scale_model_input(cond.model_input(latents), timesteps[key])
        emb = unet_split.time_embedding(unet, timesteps[key].reshape(1).expand(x.shape[0]), x.dtype)
        features = unet_split.encode(unet, x, emb, cond.prompt_embeds, cond.cross_attention_kwargs)
        stats.encoder_calls += 1
        size = len(group) if steps_per_call is None else steps_per_call
        for first in range(0, len(group), size):
            chunk = group[first : first + size]
            eps_list = _decode_steps(unet, features, timesteps[chunk.start : chunk.stop], cond, stats)
            for i, eps in zip(chunk, eps_list, strict=True):
                t = timesteps[i]
                if i != key:
                    latents = inject(latents, t)
                latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
                on_step()
        del features  # the cache lives for one group only
    if not torch.isfinite(latents).all():
        raise FloatingPointError(
            "sampling produced NaN/inf latents (numerical overflow; try fp32, another sampler "
            "or a lower guidance_scale)"
        )
    stats.denoise_seconds = time.perf_counter() - start
    return latents, stats
