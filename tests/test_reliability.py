"""Reliability of the library and the shared request path: memory faults, NaN,
isolation between runs, determinism, no outside access."""

import contextlib
import copy
import gc
import logging
import os
import sys
import weakref

import numpy as np
import pytest
import torch
from conftest import gen

import fasterdiff
from fasterdiff.samplers import make_scheduler
from fasterdiff.service import Generator, Request

SIZE = dict(height=64, width=64)


@pytest.fixture
def oom_above(pipe):
    """Make every decoder call with more than ``limit`` samples raise OutOfMemoryError."""
    handles = []

    def install(limit: int):
        def hook(_mod, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden.shape[0] > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected above batch {limit})")

        handles.append(pipe.unet.up_blocks[0].register_forward_pre_hook(hook, with_kwargs=True))

    yield install
    for h in handles:
        h.remove()


def test_out_of_memory_in_a_decoder_batch_falls_back_to_smaller_chunks(pipe, oom_above, caplog):
    fast = fasterdiff.accelerate(pipe, key_steps="paper")
    kw = dict(num_inference_steps=20, output_type="np", **SIZE)
    sequential = fast("a cat", parallel=False, generator=gen(), **kw).images
    oom_above(2 * 3)  # CFG doubles the batch: at most 3 steps fit
    with caplog.at_level(logging.WARNING, logger="fasterdiff"):
        result = fast("a cat", parallel=True, generator=gen(), **kw)
    assert np.abs(result.images - sequential).max() <= 1e-4
    # 4 steps per call (the CPU's auto size) ran out once; the rest of the run kept to 2
    assert result.stats.out_of_memory_retries == 1
    assert max(result.stats.steps_per_call) <= 3
    assert "ran out of memory" in caplog.text
    again = fast("a cat", parallel=True, generator=gen(), **kw)  # the next run of this shape starts at 2
    assert again.stats.out_of_memory_retries == 0 and max(again.stats.steps_per_call) == 2


def test_out_of_memory_down_to_single_steps_still_gives_the_sequential_image(pipe, oom_above):
    fast = fasterdiff.accelerate(pipe, key_steps=10)
    kw = dict(num_inference_steps=20, output_type="np", **SIZE)
    sequential = fast("a cat", parallel=False, generator=gen(), **kw).images
    oom_above(2)
    result = fast("a cat", generator=gen(), **kw)
    assert result.stats.steps_per_call == [1] * 20
    assert np.abs(result.images - sequential).max() <= 1e-4


def test_out_of_memory_for_a_single_step_is_a_clear_error(pipe, oom_above):
    generator = Generator(pipe)
    oom_above(0)
    with pytest.raises(RuntimeError, match="out of memory generating 1 image.*lower num_outputs"):
        generator(Request(prompt="a cat", num_inference_steps=2, width=256, height=256), "/tmp/unused")


@pytest.mark.parametrize(
    "where, match",
    [(lambda p: p.unet.conv_out, "NaN/inf latents"), (lambda p: p.vae.decoder, "VAE decoder produced NaN")],
    ids=["latents", "vae"],
)
def test_nan_ends_with_a_clear_error_not_a_black_image(pipe, where, match):
    handle = where(pipe).register_forward_hook(lambda _m, _a, out: out * float("nan"))
    try:
        with pytest.raises(FloatingPointError, match=match):
            fasterdiff.accelerate(pipe)("a cat", num_inference_steps=3, generator=gen(), **SIZE)
    finally:
        handle.remove()


def test_cached_features_are_released_after_each_run(pipe):
    alive = []

    def keep_refs(_module, _args, out):
        alive.extend(weakref.ref(t) for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))

    handle = pipe.unet.mid_block.register_forward_hook(keep_refs)
    try:
        fast = fasterdiff.accelerate(pipe)
        result = fast("a cat", num_inference_steps=10, generator=gen(), **SIZE)
    finally:
        handle.remove()
    assert result.stats.full_evaluations == 5 and fast._executor.run is None
    gc.collect()
    assert alive and all(ref() is None for ref in alive)


def test_runs_do_not_affect_each_other(pipe):
    fast = fasterdiff.accelerate(pipe)
    a = dict(prompt="a cat", num_inference_steps=8, sampler="Euler-Ancestral", key_steps=3, generator=gen(1))
    b = dict(prompt="a dog", num_inference_steps=12, sampler="DPM-Solver++", num_images_per_prompt=2, generator=gen(2))

    def run(kw):
        kw = dict(kw, generator=gen(kw["generator"].initial_seed()))
        return fast(output_type="np", **SIZE, **kw).images

    alone_a, alone_b = run(a), run(b)
    for _ in range(2):
        assert np.array_equal(run(a), alone_a)
        assert np.array_equal(run(b), alone_b)


def test_compare_with_baseline_returns_true_stock_images(pipe, tmp_path):
    scheduler = pipe.scheduler
    generator = Generator(pipe)
    req = Request(prompt="a cat", num_inference_steps=8, width=256, height=256, seed=3,  # 8: paper plan reuses
                  sampler="UniPC", output_format="png", compare_with_baseline=True)
    result = generator(req, tmp_path / "out")
    assert pipe.scheduler is scheduler  # the session-wide fixture is left as it was
    assert len(result.paths) == 2 and result.baseline_seconds > 0
    stock = fasterdiff.tools.tiny.tiny_pipeline()
    stock.scheduler = make_scheduler("UniPC", pipe.scheduler.config)
    expected = stock("a cat", num_inference_steps=8, width=256, height=256, generator=gen(3)).images[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(result.paths[1])), np.asarray(expected))
    assert not np.array_equal(np.asarray(Image.open(result.paths[0])), np.asarray(expected))


def test_compare_with_baseline_leaves_the_held_pipelines_schedulers_alone(tmp_path):
    from diffusers import DDIMScheduler

    own = fasterdiff.tools.tiny.tiny_pipeline()
    generator = Generator(own)
    held = {key: p.scheduler for key, p in generator.stock.items()}
    config = dict(own.scheduler.config)
    for sampler in ("Euler", "UniPC"):
        for unchecked in (False, True):
            generator(Request(prompt="a cat", num_inference_steps=2, width=64, height=64, seed=1, sampler=sampler,
                              compare_with_baseline=True, disable_safety_checker=unchecked), tmp_path / "out")
    assert all(generator.stock[key].scheduler is scheduler for key, scheduler in held.items())
    assert type(own.scheduler) is DDIMScheduler and dict(own.scheduler.config) == config


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_same_inputs_and_seed_give_byte_identical_files(pipe, tmp_path, fmt):
    generator = Generator(pipe)
    req = dict(prompt="a cat", num_inference_steps=4, width=256, height=256, seed=11, output_format=fmt, num_outputs=2)
    first = generator(Request(**req), tmp_path / "a").paths
    second = generator(Request(**req), tmp_path / "b").paths
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


# Audit hooks cannot be removed: this one records only inside `audited()`.
_AUDITED: list | None = None
WATCHED = ("open", "os.mkdir", "os.remove", "os.rename", "shutil.rmtree", "subprocess.Popen", "os.system",
           "os.exec", "socket.connect", "socket.getaddrinfo", "urllib.Request")


def _audit(event, args):
    if _AUDITED is not None and event in WATCHED:
        _AUDITED.append((event, args))


sys.addaudithook(_audit)


@contextlib.contextmanager
def audited():
    global _AUDITED
    _AUDITED = events = []
    try:
        yield events
    finally:
        _AUDITED = None


def _writes(event, args) -> bool:
    if event != "open":
        return True  # every other watched event changes the file system or reaches out
    _path, mode, flags = args
    return bool(mode and set(mode) & set("wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def test_prompts_reach_no_file_command_or_network(pipe, tmp_path):
    """Whatever the prompt says, a prediction writes its image files and nothing else, opens
    no path named in a prompt, runs no command and opens no connection."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read\n")
    generator = Generator(pipe)
    generator(Request(prompt="warm up", num_inference_steps=1, width=64, height=64, seed=1), tmp_path / "warm")
    out = tmp_path / "out"
    prompts = [str(secret), f"file://{secret}", "../../../etc/passwd", "http://example.com/cat.png",
               "$(touch /tmp/pwned) `id`", "{{7*7}}", "%s%s%n"]
    for i, prompt in enumerate(prompts):
        folder = out / str(i)
        with audited() as events:
            result = generator(Request(prompt=prompt, negative_prompt=str(secret), num_inference_steps=2, width=64,
                                       height=64, seed=1, output_format="png"), folder)
        assert [p.name for p in result.paths] == ["out-0.png"]
        changes = [(e, str(a[0])) for e, a in events if _writes(e, a)]
        # the recorder sees the image being written; nothing else is written, run or reached
        assert [c for c in changes if c[0] != "os.mkdir"] == [("open", str(folder / "out-0.png"))], changes
        assert {path for e, path in changes if e == "os.mkdir"} <= {str(out), str(folder)}, changes
        opened = [str(a[0]) for e, a in events if e == "open"]
        for needle in (str(secret), "passwd", "example.com", "pwned"):
            assert not any(needle in p for p in opened), (needle, opened)


def test_prompt_beyond_77_tokens_is_truncated_with_a_warning(pipe, tmp_path):
    long_prompt = " ".join(["a red cat"] * 60)
    result = Generator(pipe)(Request(prompt=long_prompt, num_inference_steps=2, width=256, height=256, seed=1),
                             tmp_path)
    assert any("tokens; CLIP reads only the first 77" in m for m in result.messages)


def test_half_precision_vae_overflow_is_decoded_again_in_float32():
    half = fasterdiff.tools.tiny.tiny_pipeline().to(torch.bfloat16)  # the CPU's half precision
    # the decoder overflows in half precision only (as SD VAEs can in float16)
    half.vae.decoder.register_forward_hook(lambda _m, _a, out: out * float("nan") if out.dtype != torch.float32 else out)
    fast = fasterdiff.accelerate(half, key_steps="off", noise_injection=0)
    result = fast("a cat", num_inference_steps=3, generator=gen(), output_type="np", **SIZE)
    assert result.stats.decoded_in_float32 and np.isfinite(result.images).all()
    latents = half("a cat", num_inference_steps=3, generator=gen(), output_type="latent", **SIZE).images
    vae = copy.deepcopy(half.vae).float()
    with torch.no_grad():
        pixels = vae.decode(latents.float() / vae.config.scaling_factor).sample
    expected = half.image_processor.postprocess(pixels, output_type="np")
    assert np.abs(result.images - expected).max() <= 1e-6
    assert half.vae.dtype == torch.bfloat16  # the pipeline's own VAE is left as it was
