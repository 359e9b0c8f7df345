"""The request path shared by predict.py and the CLI: conversion to library arguments,
one bound per input everywhere, sizes from the model."""

import ast
import json
import math

import numpy as np
import pytest
import torch
from cog_server import ROOT
from PIL import Image

import fasterdiff
from fasterdiff import service
from fasterdiff.__main__ import build_parser
from fasterdiff.service import BOUNDS, Generator, Request


def predictor_literals(name: str) -> dict:
    """The keyword literals of predict.py's Input(...) for ``name``."""
    source = (ROOT / "predict.py").read_text()
    run = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "run")
    args = run.args.args[1:]
    call = run.args.defaults[[a.arg for a in args].index(name)]
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def cli_accepts(flag: str, value) -> bool:
    try:
        build_parser().parse_args(["generate", "a cat", flag, repr(value)])
    except SystemExit:
        return False
    return True


def test_noise_injection_strength_has_one_bound_in_every_input():
    low, high = BOUNDS["noise_injection_strength"]
    literals = predictor_literals("noise_injection_strength")
    assert (literals["ge"], literals["le"]) == (low, high)
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    prop = schema["components"]["schemas"]["Input"]["properties"]["noise_injection_strength"]
    assert (prop["minimum"], prop["maximum"]) == (low, high)
    above, below = math.nextafter(high, math.inf), math.nextafter(low, -math.inf)
    flag = "--noise-injection-strength"
    assert cli_accepts(flag, low) and cli_accepts(flag, high)
    assert not cli_accepts(flag, above) and not cli_accepts(flag, below)
    # the library's noise_injection takes the inputs' range and more (a research knob: [0, 1])
    for value in (low, high, 1.0):
        fasterdiff.Settings(noise_injection=value)
    for outside in (math.nextafter(1.0, math.inf), below):
        with pytest.raises(ValueError, match="noise_injection"):
            fasterdiff.Settings(noise_injection=outside)
    for value, ok in ((high, True), (above, False)):
        try:
            Request(prompt="a cat", noise_injection_strength=value).validate()
            assert ok
        except ValueError as err:
            assert not ok and "noise_injection_strength" in str(err)


def test_a_request_is_converted_once_and_the_library_judges_the_key_steps(pipe, tmp_path, monkeypatch):
    parsed = []
    original = service.parse_step_list
    monkeypatch.setattr(service, "parse_step_list", lambda text: parsed.append(text) or original(text))
    generator = Generator(pipe)
    ok = Request(prompt="a cat", num_inference_steps=4, key_step_mode="custom", custom_key_steps="0,2", seed=1,
                 width=64, height=64)
    result = generator(ok, tmp_path)
    assert parsed == ["0,2"] and result.stats.key_steps == (0, 2)
    bad = Request(prompt="a cat", num_inference_steps=4, key_step_mode="custom", custom_key_steps="0,2,4", seed=1,
                  width=64, height=64)
    with pytest.raises(ValueError) as info:
        generator(bad, tmp_path)
    # the library's own reason, and the request inputs it came from
    assert isinstance(info.value.__cause__, ValueError) and str(info.value.__cause__) in str(info.value)
    assert "4" in str(info.value.__cause__)
    assert "key_step_mode='custom', custom_key_steps='0,2,4', num_inference_steps=4" in str(info.value)


def test_library_arguments_are_what_the_pipeline_takes(pipe):
    args = Request(prompt="a cat", negative_prompt="a dog", key_step_mode="uniform", uniform_interval=3,
                   noise_injection_strength=0.01, parallel=False).library_arguments()
    assert args["key_steps"] == 3 and args["noise_injection"] == 0.01 and args["parallel"] is False
    assert args["num_images_per_prompt"] == 1 and args["negative_prompt"] == "a dog"
    fast = fasterdiff.accelerate(pipe)
    out = fast(**dict(args, num_inference_steps=3, width=64, height=64), output_type="latent")
    assert out.stats.key_steps == (0,)
    stock_args = {k: v for k, v in args.items() if k not in service.ACCELERATION_ARGUMENTS}
    pipe(**dict(stock_args, num_inference_steps=1, width=64, height=64), output_type="latent")


def test_sizes_default_to_the_models_native_size_with_a_warning_above_twice_it(pipe, tmp_path):
    from PIL import Image

    generator = Generator(pipe)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor  # 64 for the tiny pipeline
    result = generator(Request(prompt="a cat", num_inference_steps=4, seed=1, output_format="png"), tmp_path / "a")
    assert Image.open(result.paths[0]).size == (native, native)
    assert not any("warning" in m for m in result.messages)
    wide = generator(Request(prompt="a cat", num_inference_steps=4, seed=1, width=2 * native + 8, output_format="png"),
                     tmp_path / "b")
    assert Image.open(wide.paths[0]).size == (2 * native + 8, native)
    assert any(f"more than twice this model's native {native}x{native}" in m for m in wide.messages), wide.messages
    at_twice = generator(Request(prompt="a cat", num_inference_steps=4, seed=1, width=2 * native), tmp_path / "c")
    assert not any("warning" in m for m in at_twice.messages)


def test_a_long_prompts_cut_text_is_logged_once(pipe, tmp_path, capfd):
    prompt = "a cat " * 20 + "zebra " * 600 + "lastword"  # about 4,000 characters
    result = Generator(pipe)(Request(prompt=prompt, num_inference_steps=1, seed=1, compare_with_baseline=True),
                             tmp_path)
    captured = capfd.readouterr()
    logs = captured.out + captured.err + "\n".join(result.messages)
    assert logs.count("lastword") == 1, logs[-2000:]
    (warning,) = [m for m in result.messages if "CLIP reads only the first 77" in m]
    assert warning.endswith("lastword'") and "a cat" not in warning and len(warning) < 250
    assert "Token indices sequence length" not in logs


class FlagEvery:
    """A stand-in safety checker: flags images by position (pipelines call it with these arguments)."""

    def __init__(self, flags):
        self.flags = flags

    def __call__(self, images, clip_input):
        return images, [self.flags[i % len(self.flags)] for i in range(len(images))]


def test_flagged_images_are_left_out_as_the_predictor_says(tmp_path):
    from transformers import CLIPImageProcessor

    base = fasterdiff.tools.tiny.tiny_pipeline()
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    req = dict(prompt="a cat", num_inference_steps=1, seed=1, num_outputs=3)
    for flags, kept in (([True, False, False], 2), ([True], 0)):
        pipe = service.view(base, feature_extractor=extractor, safety_checker=None)
        pipe.safety_checker = FlagEvery(flags)  # not a torch module: set after construction
        generator = Generator(pipe)
        if kept:
            result = generator(Request(**req), tmp_path / str(kept))
            assert [p.name for p in result.paths] == ["out-1.webp", "out-2.webp"]  # named by their index
            assert "NSFW content detected in 1 image(s) (out-0); they were left out" in result.messages
            # with the baseline: its images are stock-<i>, whatever was left out before them
            both = generator(Request(**req, compare_with_baseline=True), tmp_path / "both")
            assert [p.name for p in both.paths] == ["out-1.webp", "out-2.webp", "stock-1.webp", "stock-2.webp"]
            assert "NSFW content detected in 2 image(s) (out-0, stock-0); they were left out" in both.messages
        else:
            with pytest.raises(RuntimeError, match="NSFW content detected in every image"):
                generator(Request(**req), tmp_path / "none")
        unchecked = generator(Request(**req, disable_safety_checker=True), tmp_path / f"unchecked-{kept}")
        assert len(unchecked.paths) == 3
    description = predictor_literals("disable_safety_checker")["description"]
    assert "left out" in description and "blank" not in description
    readme_row = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| disable_safety_checker"))
    assert "left out" in readme_row


def test_off_with_the_baseline_gives_the_baseline_s_images(pipe, tmp_path):
    """key_step_mode="off" is stock sampling (no noise injection either) at the default inputs."""
    gen = Generator(pipe)
    req = Request(prompt="a cat", width=64, height=64, num_inference_steps=10, seed=3, num_outputs=2,
                  output_format="png", key_step_mode="off", compare_with_baseline=True)
    result = gen(req, tmp_path)
    files = {p.name: p.read_bytes() for p in result.paths}
    assert sorted(files) == ["out-0.png", "out-1.png", "stock-0.png", "stock-1.png"]
    assert files["out-0.png"] == files["stock-0.png"] and files["out-1.png"] == files["stock-1.png"]
    assert files["out-0.png"] != files["out-1.png"]
    assert "stock diffusers seconds" in "\n".join(result.messages) and "eager UNet" not in "\n".join(result.messages)


def test_too_few_steps_to_start_from_noise_are_warned_about(pipe, tmp_path):
    """SD 1.5's schedulers space DDIM and PNDM steps "leading": one step starts at timestep 1 of
    1000 (the image is its initial noise, decoded), three at 667."""
    gen = Generator(pipe)
    base = dict(prompt="a cat", width=64, height=64, seed=3)
    for sampler, steps, warned in (("DDIM", 1, True), ("DDIM", 3, True), ("DDIM", 4, False), ("PNDM", 2, True),
                                   ("DPM-Solver++", 1, False), ("Euler", 1, True), ("Euler", 2, False)):
        messages = gen(Request(**base, sampler=sampler, num_inference_steps=steps), tmp_path).messages
        warning = [m for m in messages if "far from pure noise" in m]
        assert bool(warning) == warned, (sampler, steps, messages)
    assert warning == [] and "DDIM with 1 step(s) starts at timestep 1 of 1000" in "\n".join(
        gen(Request(**base, num_inference_steps=1), tmp_path).messages)


def test_a_negative_prompt_without_guidance_is_warned_about(pipe, tmp_path):
    gen = Generator(pipe)
    base = dict(prompt="a cat", width=64, height=64, seed=3, num_inference_steps=4, negative_prompt="a dog")
    said = "warning: negative_prompt is not used with guidance_scale=1 (no classifier-free guidance)"
    assert said in gen(Request(**base, guidance_scale=1.0), tmp_path).messages
    assert said not in gen(Request(**base, guidance_scale=1.5), tmp_path).messages


def test_forecast_and_auto_reach_the_library_and_pndm_counts_its_extra_evaluation(pipe, tmp_path):
    gen = Generator(pipe)
    base = dict(prompt="a cat", width=64, height=64, num_inference_steps=10, seed=3, output_format="png")
    forecast = gen(Request(**base, key_step_mode="uniform", uniform_interval=3, forecast=1), tmp_path / "f")
    replay = gen(Request(**base, key_step_mode="uniform", uniform_interval=3), tmp_path / "r")
    assert forecast.paths[0].read_bytes() != replay.paths[0].read_bytes()
    auto = gen(Request(**base, key_step_mode="auto"), tmp_path / "a")
    assert any(m.startswith("auto: no plan file") for m in auto.messages)
    for mode in ("auto", "auto-fast"):  # refused before sampling, in the predictor's own names
        with pytest.raises(ValueError, match="forecast: .* use forecast=0, or key_step_mode non-uniform, uniform or custom"):
            Request(**base, key_step_mode=mode, forecast=1).validate()
    assert Request(**base, key_step_mode="auto-fast").library_arguments()["key_steps"] == "auto-fast"
    fast = gen(Request(**base, key_step_mode="auto-fast"), tmp_path / "af")
    assert any(m.startswith("auto: no plan file") for m in fast.messages)
    # PNDM with 10 steps makes 11 UNet evaluations: key steps index those, and the logs say so
    pndm = gen(Request(**base, sampler="PNDM", key_step_mode="custom", custom_key_steps="0,5,10"), tmp_path / "p")
    assert pndm.stats.num_steps == 11 and pndm.stats.key_steps == (0, 5, 10)
    assert any("of 11 UNet evaluations" in m and "PNDM" in m for m in pndm.messages)
    with pytest.raises(ValueError, match="custom_key_steps"):
        gen(Request(**base, key_step_mode="custom", custom_key_steps="0,5,10"), tmp_path / "d")  # DDIM: 10 evaluations


def test_forecast_has_one_bound_everywhere():
    literals = predictor_literals("forecast")
    assert (literals["ge"], literals["le"]) == BOUNDS["forecast"] == (0, max(fasterdiff.plan.FORECAST_ORDERS))
    assert cli_accepts("--forecast", 2) and not cli_accepts("--forecast", 3)


def test_warm_up_compiles_what_a_default_request_needs(pipe, tmp_path):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    generator = Generator(pipe, compile={"backend": counter})
    assert generator.fast[True].unet is generator.fast[False].unet  # one compiled UNet
    assert generator.warm_up() > 0
    frames = counter.frame_count
    assert frames > 0
    for checked in (False, True):
        result = generator(Request(prompt="a dog", seed=5, disable_safety_checker=checked), tmp_path)
        assert result.stats.full_evaluations < result.stats.num_steps
    assert counter.frame_count == frames  # the first real requests compile nothing new
    # a baseline is stock as users run it, eager: the logs say so
    result = generator(Request(prompt="a dog", seed=5, compare_with_baseline=True), tmp_path)
    assert "(eager UNet; the accelerated run's is compiled)" in next(m for m in result.messages if m.startswith("stock diffusers seconds"))


def test_both_pipelines_share_what_max_batch_auto_measured(pipe, tmp_path, monkeypatch):
    """The warm-up measures (on the pipeline without safety checker); a request on the other
    pipeline uses that answer, measuring nothing again (after CUDA graphs are recorded a second
    measurement would see a replay's zero cost). CUDA's counters are faked, as in test_accelerate."""
    from fasterdiff import reuse

    resets = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1000)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1100 if len(resets) == 1 else 1000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10**9, 10**9))
    monkeypatch.setattr(reuse, "_cuda_memory", lambda device: True)
    generator = Generator(pipe)
    generator.warm_up()
    assert len(resets) == 1
    req = Request(prompt="a dog", seed=5, key_step_mode="uniform", uniform_interval=5, num_inference_steps=20)
    result = generator(req, tmp_path)  # the safety-checked pipeline
    assert len(resets) == 1 and result.stats.steps_per_call == [4, 1] * 4


def test_compile_setting_from_the_environment(monkeypatch):
    from fasterdiff.service import env_compile

    monkeypatch.delenv("FASTERDIFF_COMPILE", raising=False)
    assert env_compile() is False
    for value, expected in (("1", True), ("off", False), ("Default", True), (" reduce-overhead ", {"mode": "reduce-overhead"}),
                            ("max-autotune", {"mode": "max-autotune"})):
        monkeypatch.setenv("FASTERDIFF_COMPILE", value)
        assert env_compile() == expected, value
    monkeypatch.setenv("FASTERDIFF_COMPILE", "fast")
    with pytest.raises(ValueError, match=r"FASTERDIFF_COMPILE must be .* a torch.compile mode \(default, reduce-overhead"):
        env_compile()


# -- img2img and inpainting requests ----------------------------------------------------


def _picture(path, size, mode="RGB", value=None):
    w, h = size
    if value is None:
        pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
    else:
        image = Image.new(mode, size, value)
    image.save(path)
    return path


def test_an_image_request_is_checked_naming_the_input(tmp_path):
    from fasterdiff.inputs import open_image

    good = _picture(tmp_path / "a.png", (64, 64))
    for req, message in [
        (Request(prompt="a cat", mask=str(good)), "mask: needs an image"),
        (Request(prompt="a cat", image=str(good), prompt_strength=0.01), "prompt_strength: 0.01 with num_inference_steps=50 runs no step"),
        (Request(prompt="a cat", image=3), "image must be a path"),
        (Request(prompt="a cat", image=str(good), prompt_strength=1.5), "prompt_strength must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            req.validate()
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(ValueError, match="image: not a picture PIL can read"):
        open_image(tmp_path / "text.png", "image")
    with pytest.raises(ValueError, match="mask: the file could not be read|mask: not a picture"):
        open_image(tmp_path / "missing.png", "mask")
    deep = _picture(tmp_path / "deep.png", (16, 16), "I;16", 300)
    with pytest.raises(ValueError, match="image: mode I;16"):
        open_image(deep, "image")
    huge = _picture(tmp_path / "huge.png", (2100, 2100), "L", 0)
    with pytest.raises(ValueError, match="image: 2100x2100 is larger than"):
        open_image(huge, "image")
    clear = _picture(tmp_path / "clear.png", (8, 8), "RGBA", (0, 0, 0, 0))
    assert open_image(clear, "image").getpixel((0, 0)) == (255, 255, 255)  # transparency over white


def test_image_sizes_fit_the_service_s_bounds(tmp_path):
    from fasterdiff.inputs import init_and_mask

    wide = _picture(tmp_path / "wide.png", (2000, 300))
    mask = _picture(tmp_path / "mask.png", (10, 10), "L", 255)
    image, resized_mask, notes = init_and_mask(wide, mask, 32, 1024)
    assert image.size == resized_mask.size == (1024, 152)  # 1024 x 153.6, cut to a multiple of 8
    assert any("2000x300 resized to 1024x152" in n for n in notes) and any("mask: 10x10" in n for n in notes)
    with pytest.raises(ValueError, match="image: 2000x40 is too small"):
        init_and_mask(_picture(tmp_path / "thin.png", (2000, 40)), None, 32, 1024)


def test_text_to_image_requests_run_as_before_and_images_pick_their_pipeline(pipe, tmp_path):
    generator = Generator(pipe)
    init = _picture(tmp_path / "init.png", (72, 64))
    mask = _picture(tmp_path / "mask.png", (72, 64), "L", 255)
    common = dict(prompt="a cat", seed=2, num_inference_steps=10, output_format="png")
    cases = {
        "text-to-image": Request(**common),
        "img2img": Request(**common, image=str(init), prompt_strength=0.6),
        "inpainting": Request(**common, image=str(init), mask=str(mask)),
    }
    for mode, req in cases.items():
        assert req.mode == mode
        result = generator(req, tmp_path / mode)
        runs = 10 if mode == "text-to-image" else int(10 * req.prompt_strength)
        assert result.stats.num_steps == runs, mode
        assert Image.open(result.paths[0]).size == ((64, 64) if mode == "text-to-image" else (72, 64))
    # text-to-image: the same image as the library gives for these arguments
    fast = fasterdiff.accelerate(pipe)
    expected = fast(**cases["text-to-image"].library_arguments(64), generator=torch.Generator().manual_seed(2)).images[0]
    got = Image.open(generator(cases["text-to-image"], tmp_path / "again").paths[0])
    assert np.asarray(got).tobytes() == np.asarray(expected).tobytes()
