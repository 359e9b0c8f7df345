"""img2img, inpainting and ControlNet through the same reuse core: stock equivalence,
parallel == sequential, what computes where, and plans on the evaluations that run."""

import numpy as np
import pytest
from conftest import count_calls, gen
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

import fasterdiff
from fasterdiff.schedule import paper_key_steps
from fasterdiff.tools.tiny import tiny_controlnet, tiny_inpaint_unet, tiny_pipeline, tiny_xl_pipeline

SIZE = dict(height=64, width=64)
INIT = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
MASK = Image.fromarray(np.where(np.arange(64)[None, :] >= 32, 255, 0).astype(np.uint8).repeat(64, 0))  # right half


def _kinds():
    """name -> (stock pipeline, call arguments); tiny models built offline."""
    base = tiny_pipeline()
    parts = base.components
    xl = tiny_xl_pipeline()
    xl_parts = {k: v for k, v in xl.components.items() if k not in ("image_encoder", "feature_extractor")}
    inpaint9 = dict(parts, unet=tiny_inpaint_unet())
    multi = MultiControlNetModel([tiny_controlnet(base.unet, 1), tiny_controlnet(base.unet, 2)])
    return {
        "img2img": (StableDiffusionImg2ImgPipeline(**parts), dict(image=INIT, strength=0.6)),
        "inpaint (4-channel UNet)": (StableDiffusionInpaintPipeline(**parts), dict(image=INIT, mask_image=MASK, strength=0.8, **SIZE)),
        "inpaint (9-channel UNet)": (StableDiffusionInpaintPipeline(**inpaint9), dict(image=INIT, mask_image=MASK, **SIZE)),
        "controlnet": (StableDiffusionControlNetPipeline(**parts, controlnet=tiny_controlnet(base.unet)), dict(image=INIT, **SIZE)),
        "multi-controlnet": (
            StableDiffusionControlNetPipeline(**parts, controlnet=multi),
            dict(image=[INIT, INIT], controlnet_conditioning_scale=[0.5, 1.0], **SIZE),
        ),
        "controlnet img2img": (
            StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=tiny_controlnet(base.unet, 3)),
            dict(image=INIT, control_image=INIT, strength=0.6, **SIZE),
        ),
        "sdxl img2img": (StableDiffusionXLImg2ImgPipeline(**xl_parts), dict(image=INIT, strength=0.6)),
        "sdxl inpaint": (StableDiffusionXLInpaintPipeline(**xl_parts), dict(image=INIT, mask_image=MASK, strength=0.8, **SIZE)),
        "sdxl controlnet": (
            StableDiffusionXLControlNetPipeline(**xl_parts, controlnet=tiny_controlnet(xl.unet)), dict(image=INIT, **SIZE)
        ),
    }


@pytest.fixture(scope="module")
def kinds():
    out = _kinds()
    for stock, _ in out.values():
        stock.set_progress_bar_config(disable=True)
    return out


NAMES = [
    "img2img", "inpaint (4-channel UNet)", "inpaint (9-channel UNet)", "controlnet", "multi-controlnet",
    "controlnet img2img", "sdxl img2img", "sdxl inpaint", "sdxl controlnet",
]


def sample(pipe, kw, seed=0, **extra):
    extra.setdefault("num_inference_steps", 10)
    return pipe("a cat", generator=gen(seed), output_type="np", **kw, **extra)


@pytest.mark.parametrize("name", NAMES)
def test_off_equals_stock(kinds, name):
    stock, kw = kinds[name]
    expected = sample(stock, kw).images
    got = sample(fasterdiff.accelerate(stock, key_steps="off", noise_injection=0), kw)
    assert np.abs(got.images - expected).max() <= 1e-5
    assert got.stats.full_evaluations == got.stats.num_steps and got.stats.reused_evaluations == 0


@pytest.mark.parametrize("name", NAMES)
def test_parallel_equals_sequential(kinds, name):
    stock, kw = kinds[name]
    fast = fasterdiff.accelerate(stock, key_steps="paper")
    seq = sample(fast, kw, parallel=False)
    par = sample(fast, kw, parallel=True)
    assert np.abs(seq.images - par.images).max() <= 1e-4
    assert max(par.stats.steps_per_call) > 1 and seq.stats.steps_per_call == [1] * seq.stats.num_steps
    assert np.abs(par.images - sample(stock, kw).images).max() > 1e-4  # it did reuse


def test_unsupported_pipelines_are_refused_by_name():
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    ddpm = DDPMPipeline(unet, tiny_pipeline().scheduler)
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline.*StableDiffusionControlNetPipeline.*got DDPMPipeline"):
        fasterdiff.accelerate(ddpm)


@pytest.mark.parametrize("strength", [0.6, 0.35, 1.0])
def test_img2img_plans_the_evaluations_that_run(kinds, strength):
    stock, kw = kinds["img2img"]
    fast = fasterdiff.accelerate(stock, key_steps="paper", max_batch=None)
    kw = dict(kw, strength=strength)
    with count_calls(stock.unet.down_blocks[0].resnets[0]) as enc, count_calls(stock.unet.up_blocks[0]) as dec:
        out = fast("a cat", num_inference_steps=20, generator=gen(), output_type="latent", **kw)
    runs = int(20 * strength)  # diffusers: init_timestep = min(int(N * strength), N)
    stats = out.stats
    assert stats.num_steps == runs and stats.key_steps == paper_key_steps(runs)
    assert len(enc) == stats.full_evaluations == len(stats.key_steps)
    assert len(dec) == stats.unet_calls and sum(stats.steps_per_call) == runs


def test_img2img_auto_runs_the_calibrated_plan_s_last_steps(kinds, tmp_path):
    from fasterdiff.plan_file import write_entry

    stock, kw = kinds["img2img"]
    plan = fasterdiff.encoder_plan(stock.unet, [0, 1, 2, 4, 7, 12, 16], 20).with_forecast(1, 0.5)
    entry = {
        "sampler": "DDIM", "steps": 20, "calibrated_on": {"noise_injection": 0.003},
        "stock": {"gpu_seconds_1_image": 1.0},
        "levels": {"auto": {"reference": "x", "floor": None, "psnr_pooled": 40.0, "plan": "p"}},
        "plans": [{"name": "p", "reuse": "encoder", "psnr_pooled": 41.0, "gpu_seconds_1_image": 0.5, "plan": plan.to_json()}],
    }
    write_entry(tmp_path / "plans.json", entry)
    out = fasterdiff.accelerate(stock, plans=tmp_path / "plans.json")(
        "a cat", num_inference_steps=20, generator=gen(), output_type="latent", **dict(kw, strength=0.6)
    )
    # the last 12 of 20 steps (8..19): their key steps 12 and 16, renumbered, after a first key step
    assert out.stats.key_steps == (0, 4, 8) and "its last 12 of 20 steps" in out.stats.plan
    assert plan.last(12).forecast == (1,) * 12 and plan.last(20) == plan


@pytest.mark.parametrize("name", ["inpaint (4-channel UNet)", "inpaint (9-channel UNet)"])
def test_inpainting_keeps_the_unmasked_pixels_as_stock_does(kinds, name):
    stock, kw = kinds[name]
    expected = sample(stock, kw).images
    got = sample(fasterdiff.accelerate(stock, key_steps="paper"), kw).images
    keep = slice(0, 24)  # columns well inside the unmasked (black) half; the VAE blurs the edge
    assert np.abs(got[:, :, keep] - expected[:, :, keep]).max() <= np.abs(got - expected).max()
    inside, outside = (np.abs(got - expected)[:, :, s].mean() for s in (slice(40, 64), keep))
    # stock repaints the white half and keeps the rest: so does the accelerated run, and its
    # differences from stock are where it repaints (4-channel: the blend keeps the rest exactly)
    assert outside <= inside


def test_controlnet_computes_at_key_steps_only_and_counts_match(kinds):
    stock, kw = kinds["controlnet"]
    for parallel in (False, True):
        fast = fasterdiff.accelerate(stock, key_steps="paper", parallel=parallel, max_batch=None)
        with count_calls(stock.controlnet.down_blocks[0].resnets[0]) as control:
            out = fast("a cat", num_inference_steps=20, generator=gen(), output_type="latent", **kw)
        assert out.stats.key_steps == paper_key_steps(20)
        assert len(control) == out.stats.controlnet_evaluations == len(out.stats.key_steps)
    # stock sampling runs it every step; plans that keep each step's latent (deep) run its shallow path every step
    for settings, probe in ((dict(key_steps="off"), stock.controlnet.down_blocks[0].resnets[0]),
                            (dict(cache_interval=3), stock.controlnet.conv_in)):
        fast = fasterdiff.accelerate(stock, **settings)
        with count_calls(probe) as control:
            out = fast("a cat", num_inference_steps=12, generator=gen(), output_type="latent", **kw)
        assert len(control) == 12 == out.stats.controlnet_evaluations


@pytest.mark.parametrize(
    "control",
    [
        dict(guess_mode=True),
        dict(control_guidance_end=0.5),
        dict(control_guidance_start=0.3, controlnet_conditioning_scale=0.7),
        dict(guidance_scale=1.0),
    ],
    ids=lambda c: ",".join(c),
)
def test_controlnet_options_keep_parallel_equal_to_sequential(kinds, control):
    stock, kw = kinds["controlnet"]
    fast = fasterdiff.accelerate(stock, key_steps="paper", max_batch=None)
    seq = sample(fast, kw, parallel=False, **control)
    par = sample(fast, kw, parallel=True, **control)
    assert np.abs(seq.images - par.images).max() <= 1e-4
    off = sample(fasterdiff.accelerate(stock, key_steps="off"), kw, **control).images
    assert np.abs(off - sample(stock, kw, **control).images).max() <= 1e-5


def test_multi_controlnet_with_their_own_schedules(kinds):
    stock, kw = kinds["multi-controlnet"]
    control = dict(control_guidance_start=[0.0, 0.3], control_guidance_end=[0.8, 1.0])
    fast = fasterdiff.accelerate(stock, key_steps="paper", max_batch=None)
    seq = sample(fast, kw, parallel=False, **dict(control, num_inference_steps=20))
    par = sample(fast, kw, parallel=True, **dict(control, num_inference_steps=20))
    assert np.abs(seq.images - par.images).max() <= 1e-4
    # each net computes at the 7 key steps, and the second once more where it switches on inside
    # a group (step 6); the first switches off at step 16, inside a group too: scaled to 0, not computed
    assert seq.stats.key_steps == paper_key_steps(20)
    assert seq.stats.controlnet_evaluations == par.stats.controlnet_evaluations == 2 * len(seq.stats.key_steps) + 1


def test_the_controlnet_is_left_as_it_was(kinds):
    stock, kw = kinds["multi-controlnet"]
    sample(fasterdiff.accelerate(stock, key_steps="paper"), kw)
    assert not any("forward" in vars(m) for net in stock.controlnet.nets for m in net.modules())


@pytest.mark.parametrize("branch", [0, 4])
def test_under_deep_plans_the_controlnet_s_deep_blocks_replay_and_the_images_are_unchanged(kinds, monkeypatch, branch):
    from fasterdiff import controlnet

    stock, kw = kinds["controlnet"]
    net = stock.controlnet
    fast = fasterdiff.accelerate(stock, cache_interval=3, branch=branch)
    deep = net.down_blocks[2].resnets[0]  # replayed with the UNet's deep blocks at either branch
    with count_calls(net.conv_in) as shallow, count_calls(deep) as replayed:
        got = sample(fast, kw, num_inference_steps=12)
    assert len(shallow) == 12 and len(replayed) == 4 == len(got.stats.key_steps)
    monkeypatch.setattr(controlnet, "deep_replayed", lambda plan, encoder: frozenset())  # the ControlNet computed whole
    with count_calls(deep) as whole:
        expected = sample(fast, kw, num_inference_steps=12)
    assert len(whole) == 12
    assert np.abs(got.images - expected.images).max() <= 1e-6
