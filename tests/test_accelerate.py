"""Oracles for the library: stock equivalence, parallel == sequential, call counts."""

import numpy as np
import pytest
import torch
from conftest import count_calls, gen

import fasterdiff
from fasterdiff.samplers import SAMPLER_NAMES, make_scheduler
from fasterdiff.schedule import paper_key_steps

SIZE = dict(height=64, width=64)


def run(fast, prompt="a cat", steps=10, seed=0, **kw):
    return fast(prompt, num_inference_steps=steps, generator=gen(seed), output_type="np", **SIZE, **kw)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_off_equals_stock_for_every_sampler(pipe, sampler):
    stock = fasterdiff.tools.tiny.tiny_pipeline()  # own copy: its scheduler gets replaced
    stock.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    expected = stock("a cat", num_inference_steps=8, generator=gen(3), output_type="np", **SIZE).images
    fast = fasterdiff.accelerate(pipe, key_steps="off")  # default noise injection: not applied without reuse
    got = run(fast, steps=8, seed=3, sampler=sampler).images
    assert np.abs(got - expected).max() <= 1e-5


def test_off_equals_stock_latents_with_cfg_off_and_negative_prompt(pipe):
    fast = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    for kw in (dict(guidance_scale=1.0), dict(negative_prompt="a dog", num_images_per_prompt=2)):
        expected = pipe("a cat", num_inference_steps=6, generator=gen(1), output_type="latent", **SIZE, **kw).images
        got = fast("a cat", num_inference_steps=6, generator=gen(1), output_type="latent", **SIZE, **kw).images
        assert torch.abs(got - expected).max() <= 1e-5


def test_accelerated_output_differs_from_stock(pipe):
    """Guard against a loop that silently ignores the schedule."""
    fast = fasterdiff.accelerate(pipe, noise_injection=0)
    a = run(fast, key_steps="off").images
    b = run(fast, key_steps="paper").images
    assert np.abs(a - b).max() > 1e-4


PARALLEL_CASES = [
    dict(key_steps="paper"),
    dict(key_steps=3),
    dict(key_steps=[0, 4, 5, 9]),
    dict(key_steps="paper", guidance_scale=1.0),
    dict(key_steps=4, num_images_per_prompt=2, negative_prompt="blurry"),
    dict(key_steps="paper", max_batch=2, num_images_per_prompt=2),
    dict(key_steps="paper", sampler="DPM-Solver++", noise_injection=0.01, noise_injection_start=800),
    dict(key_steps=4, sampler="Euler-Ancestral"),
]


@pytest.mark.parametrize("case", PARALLEL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_parallel_equals_sequential(pipe, case):
    fast = fasterdiff.accelerate(pipe)
    seq = run(fast, steps=12, parallel=False, **case).images
    par = run(fast, steps=12, parallel=True, **case).images
    assert seq.shape == par.shape
    assert np.abs(seq - par).max() <= 1e-4


@pytest.mark.parametrize("key_steps", ["paper", 5, [0, 2, 3, 11], "off"])
@pytest.mark.parametrize("parallel", [False, True])
def test_encoder_runs_once_per_key_step_and_decoder_once_per_step_or_group(pipe, key_steps, parallel):
    fast = fasterdiff.accelerate(pipe, key_steps=key_steps, parallel=parallel, max_batch=None)
    # probes inside modules: a replayed block's own forward hooks fire on replays too
    with count_calls(pipe.unet.down_blocks[0].resnets[0]) as enc, count_calls(pipe.unet.up_blocks[0]) as dec:
        result = run(fast, steps=20)
    plan = fasterdiff.schedule.resolve(key_steps, 20)
    assert len(enc) == len(plan.steps) == result.stats.full_evaluations
    assert enc == [2] * len(plan.steps)  # the encoder sees the key step's guided rows only
    expected_decoder_calls = len(plan.groups) if parallel else 20
    assert len(dec) == expected_decoder_calls == result.stats.unet_calls
    # CFG doubles the batch; parallel stacks a group's steps in one call
    assert dec == [2 * len(g) for g in plan.groups] if parallel else dec == [2] * 20


def test_max_batch_splits_groups_into_chunks(pipe):
    fast = fasterdiff.accelerate(pipe, key_steps="paper", max_batch=6)
    with count_calls(pipe.unet.up_blocks[0]) as dec:
        result = run(fast, steps=20, num_images_per_prompt=2)
    # 2 images per step -> at most 3 steps (6 images, 12 UNet samples with CFG) per call
    groups = [len(g) for g in fasterdiff.schedule.resolve("paper", 20).groups]
    expected = [min(3, n - i) for n in groups for i in range(0, n, 3)]
    assert result.stats.steps_per_call == expected
    assert dec == [12 * n // 3 for n in expected]


def test_default_is_auto_which_falls_back_to_the_paper_schedule_without_a_plan_file(pipe):
    result = run(fasterdiff.accelerate(pipe), steps=50)
    assert result.stats.key_steps == paper_key_steps(50) and "no plan file" in result.stats.plan
    assert result.stats.reused_evaluations == 41


def test_noise_injection_zero_is_a_no_op_and_alpha_touches_steps_below_tau(pipe):
    fast = fasterdiff.accelerate(pipe, key_steps="paper", parallel=False)
    base = run(fast, noise_injection=0).images
    # tau=0: no timestep is below it, so alpha>0 changes nothing
    assert np.array_equal(run(fast, noise_injection=0.05, noise_injection_start=0).images, base)
    assert not np.array_equal(run(fast, noise_injection=0.05, noise_injection_start=500).images, base)


def test_stock_pipeline_unchanged_by_accelerate(pipe):
    before = pipe("a cat", num_inference_steps=5, generator=gen(), output_type="np", **SIZE).images
    scheduler_config = dict(pipe.scheduler.config)
    fast = fasterdiff.accelerate(pipe, key_steps=2)
    run(fast, sampler="Euler")
    after = pipe("a cat", num_inference_steps=5, generator=gen(), output_type="np", **SIZE).images
    assert np.array_equal(before, after)
    assert dict(pipe.scheduler.config) == scheduler_config
    assert type(pipe) is not type(fast) and fast.unet is pipe.unet and fast.vae is pipe.vae


def test_same_call_twice_gives_the_same_image(pipe):
    fast = fasterdiff.accelerate(pipe)
    assert np.array_equal(run(fast).images, run(fast).images)


@pytest.mark.parametrize("hw", [(72, 64), (64, 88), (40, 56)])
def test_sizes_that_are_multiples_of_8(pipe, hw):
    fast = fasterdiff.accelerate(pipe, noise_injection=0)
    kw = dict(height=hw[0], width=hw[1], num_inference_steps=6, output_type="np")
    par = fast("a cat", generator=gen(), **kw).images
    seq = fast("a cat", generator=gen(), parallel=False, **kw).images
    stock = fast("a cat", generator=gen(), key_steps="off", **kw).images
    ref = pipe("a cat", generator=gen(), **kw).images
    assert par.shape == (1, hw[0], hw[1], 3)
    assert np.abs(par - seq).max() <= 1e-4 and np.abs(stock - ref).max() <= 1e-5


def test_pil_output_and_progress_bar(pipe, capsys):
    fast = fasterdiff.accelerate(pipe)
    fast.set_progress_bar_config(disable=False)
    result = fast("a cat", num_inference_steps=4, generator=gen(), **SIZE)
    assert result.images[0].size == (64, 64)
    assert "4/4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(key_steps="bad"), "key_steps"),
        (dict(key_steps=1), "key_steps"),
        (dict(parallel="yes"), "parallel"),
        (dict(max_batch=0), "max_batch"),
        (dict(noise_injection=-0.1), "noise_injection"),
        (dict(noise_injection=float("nan")), "noise_injection"),
        (dict(noise_injection_start=2000), "noise_injection_start"),
    ],
)
def test_bad_accelerate_arguments(pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fasterdiff.accelerate(pipe, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(sampler="LMS"), "sampler"),
        (dict(height=60), "height"),
        (dict(width=0), "width"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(output_type="gif"), "output_type"),
        (dict(key_steps=[0, 30], num_inference_steps=10), "key_steps"),
    ],
)
def test_bad_call_arguments(pipe, kwargs, name):
    fast = fasterdiff.accelerate(pipe)
    kwargs = {"num_inference_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        fast("a cat", **kwargs)


def test_unsupported_pipelines_and_unets_are_refused(pipe):
    from diffusers import DDIMPipeline, UNet2DModel

    from fasterdiff.unet import check_supported

    unconditional = DDIMPipeline(unet=UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4
    ), scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        fasterdiff.accelerate(unconditional)
    with pytest.raises(ValueError, match="down_blocks"):
        check_supported(torch.nn.Conv2d(4, 4, 1))


def test_load_pipeline_from_saved_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "sd")
    loaded = fasterdiff.load_pipeline(tmp_path / "sd", local_files_only=True)
    assert loaded.unet.dtype == torch.float32 and loaded.device.type == "cpu"
    loaded.set_progress_bar_config(disable=True)
    a = pipe("a cat", num_inference_steps=3, generator=gen(), output_type="np", **SIZE).images
    b = loaded("a cat", num_inference_steps=3, generator=gen(), output_type="np", **SIZE).images
    assert np.abs(a - b).max() <= 1e-6


def test_load_pipeline_missing_folder_names_the_download_command(tmp_path):
    with pytest.raises(fasterdiff.weights.WeightsUnavailable, match="download-weights"):
        fasterdiff.load_pipeline(tmp_path)


@pytest.mark.parametrize("where", ["./no-such-weights", "/no/such/weights", "~/no-such-weights", "a/b/c", "file", "here/sd15"])
def test_load_pipeline_refuses_a_missing_local_path_without_asking_the_hub(tmp_path, where, monkeypatch):
    """A mistyped folder is not a Hub repo id: its error says no folder is there (the Hub is
    never asked: this machine has no network, and from_pretrained would say something else).
    "here/sd15" looks like owner/name, but here/ is a folder of this machine."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "here").mkdir()
    with pytest.raises(FileNotFoundError, match="no pipeline folder at"):
        fasterdiff.load_pipeline(where)


def test_a_plan_file_named_but_missing_is_an_error(pipe, tmp_path):
    with pytest.raises(ValueError, match="plans: no plan file at .*missing.json"):
        fasterdiff.accelerate(pipe, plans=tmp_path / "missing.json")
    fast = fasterdiff.accelerate(pipe)  # no plan file beside these weights: auto runs the paper's key steps
    with pytest.raises(ValueError, match="plans: no plan file at .*missing.json"):
        run(fast, plans=str(tmp_path / "missing.json"))


def test_cli_says_which_weights_folder_is_missing(capsys):
    from fasterdiff.__main__ import main

    assert main(["generate", "a cat", "--weights", "./no-such-weights"]) == 2
    assert "error: no pipeline folder at no-such-weights" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_works_with_every_key_step_mode(pipe, sampler):
    fast = fasterdiff.accelerate(pipe)
    for key_steps in ("paper", 3, [0, 1, 4], "off"):
        seq = run(fast, steps=9, sampler=sampler, key_steps=key_steps, parallel=False)
        par = run(fast, steps=9, sampler=sampler, key_steps=key_steps, parallel=True)
        assert np.isfinite(par.images).all() and par.images.std() > 0
        assert np.abs(seq.images - par.images).max() <= 1e-4, key_steps
        assert par.stats.full_evaluations == len(par.stats.key_steps)


def test_load_pipeline_from_a_folder_of_fp16_files(pipe, tmp_path):
    """download-weights fetches only the *.fp16.safetensors files; they must load as such."""
    pipe.save_pretrained(tmp_path / "sd", variant="fp16")
    assert not list((tmp_path / "sd" / "unet").glob("diffusion_pytorch_model.safetensors"))
    loaded = fasterdiff.load_pipeline(tmp_path / "sd", local_files_only=True)
    assert loaded.unet.dtype == torch.float32  # fp32 on CPU, whatever the files hold
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_max_batch_auto_bounds_steps_per_call(pipe, monkeypatch):
    from fasterdiff import reuse

    fast = fasterdiff.accelerate(pipe, key_steps="paper")  # max_batch="auto" by default
    stats = run(fast, steps=50).stats
    groups = fasterdiff.schedule.resolve("paper", 50).groups
    assert max(stats.steps_per_call) == min(16, max(len(g) for g in groups))  # 8x8 latents: up to 16 steps
    assert sum(stats.steps_per_call) == 50
    # on the CPU, by the call's latent pixels: four guided steps of SD 1.5 at 512 px
    assert reuse.cpu_steps((2, 4, 64, 64)) == 4 and reuse.cpu_steps((2, 4, 32, 32)) == 16
    assert reuse.cpu_steps((8, 4, 64, 64)) == 1 and reuse.cpu_steps((2, 4, 48, 48)) == 4
    # the memory rule: the largest size whose batched call stays within 1.5x stock's peak
    assert reuse.steps_within_memory(resident=1000, per_step=100, free=10**9) == 4  # 1.5*1100-1000=650 -> 4*100
    assert reuse.steps_within_memory(resident=1000, per_step=10, free=10**9) == 16
    assert reuse.steps_within_memory(resident=1000, per_step=100, free=150) == 2  # free memory binds
    assert reuse.steps_within_memory(resident=0, per_step=100, free=10**9) == 1


def test_max_batch_auto_measures_the_first_call_of_each_shape_once(pipe, monkeypatch):
    """With CUDA, the first call of a run of a new shape runs alone and measures what a step adds
    at its peak; later runs of that shape keep the answer (a CUDA graph's replay allocates nothing
    new, so measuring it again would see no cost). CUDA's memory counters are faked here."""
    from fasterdiff import reuse

    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1000)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(1))
    # the first measurement sees 100 bytes per step (-> 4 steps per call); any later one would see 0 (-> 16)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1100 if len(resets) == 1 else 1000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10**9, 10**9))
    fast = fasterdiff.accelerate(pipe, key_steps=5)  # groups of 5 steps
    # samples on the CPU: the CPU's rule (8x8 latents: whole groups of 5), nothing measured, whatever CUDA reports
    assert run(fast, steps=20).stats.steps_per_call == [5] * 4 and not resets
    monkeypatch.setattr(reuse, "_cuda_memory", lambda device: True)  # as if the samples were on the GPU
    fast = fasterdiff.accelerate(pipe, key_steps=5)
    first = run(fast, steps=20).stats.steps_per_call
    second = run(fast, steps=20).stats.steps_per_call
    assert first == [1, 4] + [4, 1] * 3  # measured alone, then at most 4 per call
    assert second == [4, 1] * 4 and len(resets) == 1
    other = fast("a cat", num_inference_steps=20, height=32, width=32, output_type="latent", generator=gen())
    assert other.stats.steps_per_call[0] == 1 and len(resets) == 2  # another shape is measured
