"""Prior noise injection, step by step: z <- z + alpha * z_T before every step whose
timestep is below tau, and nowhere else; for samplers on x + sigma * noise (Euler), z_T in
the scale of that step's latents.

The oracle records what the sampler's ``step`` receives and returns at every step: the
latent a step starts from must be the previous step's result (z_T for the first step)
plus the injection exactly when that step's timestep is below tau, and unchanged otherwise.
z_T is computed independently: the seeded Gaussian scaled by the sampler's initial sigma;
so is Euler's scale, 1 / sqrt(alpha_bar_t) from the noise schedule's betas.
"""

import pytest
import torch
from conftest import gen
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

import fasterdiff
from fasterdiff.samplers import make_scheduler

SIZE = dict(height=64, width=64)
ALPHA = 0.5  # large, so an injection is far above float round-off
STEPS = 10
SEED = 4


@pytest.fixture
def recorded(monkeypatch):
    """Every scheduler step: (timestep, sample in, sample out)."""
    steps = []
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler):
        original = cls.step

        def spy(self, model_output, timestep, sample, *args, _original=original, **kwargs):
            out = _original(self, model_output, timestep, sample, *args, **kwargs)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            steps.append((int(timestep), sample.clone(), prev.clone()))
            return out

        monkeypatch.setattr(cls, "step", spy)
    return steps


def initial_noise(pipe, sampler: str) -> torch.Tensor:
    scheduler = make_scheduler(sampler, pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    shape = (1, pipe.unet.config.in_channels, SIZE["height"] // 8, SIZE["width"] // 8)
    return torch.randn(shape, generator=gen(SEED)) * scheduler.init_noise_sigma


def latent_scale(pipe, sampler: str, t: int) -> float:
    """What z_T is multiplied by before a step at timestep ``t``: 1 for variance-preserving
    samplers; for Euler's, whose latents at t are x + sigma_t * noise, sqrt(1 + sigma_t^2) =
    1 / sqrt(alpha_bar_t) over the initial sigma (z_T's own scale)."""
    if not sampler.startswith("Euler"):
        return 1.0
    c = pipe.scheduler.config
    assert c.beta_schedule == "scaled_linear"
    betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    scheduler = make_scheduler(sampler, c)
    scheduler.set_timesteps(STEPS)
    return float(1 / alpha_bar.sqrt()) / float(scheduler.init_noise_sigma)


CASES = [
    dict(sampler="DDIM", key_steps="paper", parallel=True, tau=500),
    dict(sampler="DDIM", key_steps="paper", parallel=False, tau=500),
    dict(sampler="DPM-Solver++", key_steps="paper", parallel=True, tau=1000),  # every step, the first included
    dict(sampler="Euler", key_steps=3, parallel=True, tau=500),
    dict(sampler="Euler", key_steps=3, parallel=True, tau=1000),  # the first step too: z_T at its own scale
    dict(sampler="Euler-Ancestral", key_steps="paper", parallel=False, tau=500),
    dict(sampler="DDIM", key_steps="paper", parallel=True, tau=0),  # no step
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_injection_happens_before_exactly_the_steps_below_tau(pipe, recorded, case):
    fast = fasterdiff.accelerate(pipe)
    fast("a cat", num_inference_steps=STEPS, sampler=case["sampler"], key_steps=case["key_steps"],
         parallel=case["parallel"], noise_injection=ALPHA, noise_injection_start=case["tau"],
         generator=gen(SEED), output_type="latent", **SIZE)
    assert len(recorded) == STEPS
    z_T = initial_noise(pipe, case["sampler"])
    injected = []
    previous = z_T
    for i, (t, sample_in, sample_out) in enumerate(recorded):
        if t < case["tau"]:
            injected.append(i)
            expected = ALPHA * z_T * latent_scale(pipe, case["sampler"], t)
            torch.testing.assert_close(sample_in - previous, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(sample_in, previous), f"step {i} (t={t}) changed without injection"
        previous = sample_out
    expected = [i for i, (t, _, _) in enumerate(recorded) if t < case["tau"]]
    assert injected == expected
    if case["tau"] == 500:
        assert 0 < len(injected) < STEPS  # the second half only
    elif case["tau"] == 1000:
        assert injected == list(range(STEPS))
    else:
        assert injected == []


@pytest.mark.parametrize("alpha", [0.0, ALPHA])
def test_zero_strength_or_a_plan_reusing_nothing_injects_nothing(pipe, recorded, alpha):
    """alpha = 0, or key_steps="off" (stock sampling: there is no reuse to make up for)."""
    key_steps = "paper" if alpha == 0 else "off"
    fast = fasterdiff.accelerate(pipe, key_steps=key_steps)
    fast("a cat", num_inference_steps=STEPS, noise_injection=alpha, noise_injection_start=1000, generator=gen(SEED),
         output_type="latent", **SIZE)
    assert len(recorded) == STEPS
    previous = initial_noise(pipe, "DDIM")
    for t, sample_in, sample_out in recorded:
        assert torch.equal(sample_in, previous), t
        previous = sample_out



def test_only_schedulers_with_one_sigma_per_step_rescale_z_t(pipe):
    """Euler, Euler-Ancestral and LMS hold the latent before step i at sigmas[i]; Heun (sigmas
    between steps) and the variance-preserving samplers get z_T as drawn."""
    from diffusers import HeunDiscreteScheduler  # (LMS needs scipy, which is not installed)

    from fasterdiff.pipeline import injected_noise

    z_T = torch.randn(1, 4, 8, 8, generator=gen(0))
    for cls, rescaled in ((DDIMScheduler, False), (DPMSolverMultistepScheduler, False), (HeunDiscreteScheduler, False),
                          (EulerDiscreteScheduler, True), (EulerAncestralDiscreteScheduler, True)):
        scheduler = cls.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(STEPS)
        got = injected_noise(z_T, scheduler, STEPS - 1)
        if rescaled:
            sigma = float(scheduler.sigmas[STEPS - 1])
            torch.testing.assert_close(got, z_T * (1 + sigma**2) ** 0.5 / float(scheduler.init_noise_sigma))
            assert got.abs().max() < z_T.abs().max() / 5  # late steps: far below z_T's own scale
        else:
            assert got is z_T, cls.__name__
