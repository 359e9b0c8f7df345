"""Forecasting replayed outputs: the formula, checked against what the encoder computed."""

import numpy as np
import pytest
import torch
from conftest import gen

import fasterdiff
from fasterdiff.plan import forecast_weights


def mid_block_outputs(pipe, **kw):
    """The mid block's output at every step (computed at key steps, replayed otherwise)."""
    seen = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    try:
        result = fasterdiff.accelerate(pipe, noise_injection=0, parallel=False, **kw)(
            "a cat", num_inference_steps=10, generator=gen(), output_type="latent", height=64, width=64
        )
    finally:
        handle.remove()
    return seen, result


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_extrapolates_the_computed_features_in_the_timestep(pipe, order):
    seen, _ = mid_block_outputs(pipe, key_steps=[0, 3, 6], forecast=order)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    t = [float(x) for x in scheduler.timesteps]
    f0, f3, f6 = seen[0], seen[3], seen[6]
    for step in (7, 8, 9):
        if order == 1:
            expected = f6 + (f6 - f3) * (t[step] - t[6]) / (t[6] - t[3])
        else:  # the parabola through the three key steps
            pts = [(t[0], f0), (t[3], f3), (t[6], f6)]
            expected = sum(
                f * np.prod([(t[step] - tq) / (tm - tq) for q, (tq, _) in enumerate(pts) if q != m])
                for m, (tm, f) in enumerate(pts)
            )
        torch.testing.assert_close(seen[step], expected, rtol=1e-4, atol=1e-5)
    # steps 1, 2: one key step so far, nothing to extrapolate from: replayed unchanged
    assert torch.equal(seen[1], f0) and torch.equal(seen[2], f0)
    if order == 2:  # steps 4, 5: two key steps so far: linear
        torch.testing.assert_close(seen[4], f3 + (f3 - f0) * (t[4] - t[3]) / (t[3] - t[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_keeps_parallel_equal_to_sequential(pipe, order):
    fast = fasterdiff.accelerate(pipe, key_steps="paper", forecast=order)
    kw = dict(num_inference_steps=20, output_type="np", height=64, width=64)
    seq = fast("a cat", generator=gen(), parallel=False, **kw)
    par = fast("a cat", generator=gen(), **kw)
    assert np.abs(seq.images - par.images).max() <= 1e-4
    assert sum(par.stats.steps_per_call) == 20 and par.stats.full_evaluations == len(par.stats.key_steps)
    replay = fast("a cat", generator=gen(), forecast=0, **kw).images
    assert np.abs(replay - par.images).max() > 1e-4  # the forecast changed something


def test_forecast_weights_fall_back_and_damp():
    assert forecast_weights([900.0], 800.0, 2) == [1.0]  # one point: replay
    assert forecast_weights([900.0, 900.0], 800.0, 1) == [0.0, 1.0]  # PNDM's repeated timestep
    assert forecast_weights([900.0, 800.0], 700.0, 1) == pytest.approx([-1.0, 2.0])
    assert forecast_weights([900.0, 800.0], 700.0, 1, damping=0.5) == pytest.approx([-0.5, 1.5])
    assert forecast_weights([950.0, 900.0, 900.0], 800.0, 2) == [0.0, 0.0, 1.0]  # last two equal: order 0
    assert sum(forecast_weights([1000.0, 900.0, 700.0], 600.0, 2)) == pytest.approx(1.0)


def test_forecast_with_pndm_and_a_bad_order(pipe):
    fast = fasterdiff.accelerate(pipe, key_steps=3, forecast=2)
    out = fast("a cat", num_inference_steps=9, generator=gen(), sampler="PNDM", output_type="np", height=64, width=64)
    assert np.isfinite(out.images).all() and out.stats.num_steps == 10
    with pytest.raises(ValueError, match="forecast"):
        fasterdiff.accelerate(pipe, forecast=3)


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_only_outputs_a_computing_module_reads_are_forecast_and_the_image_is_unchanged(pipe, branch, monkeypatch):
    from fasterdiff import reuse, unet

    plan = fasterdiff.deep_plan(pipe.unet, 3, 10, branch=branch).with_forecast(1, 0.5)
    live = unet.live_outputs(pipe.unet, plan.cached_modules)
    assert len(live) == 1 and live < plan.cached_modules  # DeepCache's plans: one replayed output reaches the shallow path
    fast = fasterdiff.accelerate(pipe)
    fast.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=10, height=64, width=64, output_type="latent", key_steps=plan)
    pruned = fast("a cat", generator=gen(0), **kw).images
    forecasts = []
    real = reuse._zip_map
    monkeypatch.setattr(reuse.ReuseExecutor, "_live", lambda self, replay: replay)  # forecast every replayed output
    monkeypatch.setattr(reuse, "_zip_map", lambda fn, s: forecasts.append(1) or real(fn, s))
    every = fast("a cat", generator=gen(0), **kw).images
    assert forecasts and torch.equal(pruned, every)
    encoder = frozenset(unet.encoder_modules(pipe.unet))
    assert unet.live_outputs(pipe.unet, encoder) == encoder  # the decoder reads every encoder output
