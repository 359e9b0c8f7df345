"""The accelerated pipeline as a drop-in for diffusers: stock's own __call__ runs, every
argument stock takes works, every computing UNet evaluation goes through ``pipe.unet``,
and the pipeline is left exactly as it was."""

import numpy as np
import pytest
import torch
from conftest import gen

import fasterdiff
from fasterdiff.tools.tiny import tiny_pipeline, tiny_xl_pipeline

SIZE = dict(height=64, width=64)


def np_images(p, steps=6, seed=0, **kw):
    return p("a cat", num_inference_steps=steps, generator=gen(seed), output_type="np", **SIZE, **kw).images


def instance_forwards(module):
    """Modules whose ``forward`` is overridden on the instance (what a wrapper leaves behind)."""
    return [name for name, m in module.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("parallel", [False, True])
def test_a_hook_on_pipe_unet_sees_every_computing_evaluation(pipe, parallel):
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        result = fasterdiff.accelerate(pipe, key_steps="paper", max_batch=None)(
            "a cat", num_inference_steps=20, generator=gen(), output_type="np", parallel=parallel, **SIZE
        )
    finally:
        handle.remove()
    groups = [len(g) for g in fasterdiff.plan.encoder_plan(pipe.unet, "paper", 20).groups]
    # guided: 2 rows per step; parallel: one call per group holding all of its steps
    assert batches == ([2 * n for n in groups] if parallel else [2] * 20)
    assert result.stats.unet_calls == len(batches)


@pytest.mark.parametrize("branch", [0, 2, 4])
def test_deep_plan_reproduces_deepcache(pipe, branch):
    from fasterdiff.tools.bench.harness import deepcache

    other = tiny_pipeline()
    with deepcache(other, interval=3, branch=branch):
        expected = np_images(other, steps=10)
    # the UNet is left as it was: no module keeps an instance-level forward (DeepCache's own
    # disable() leaves one on each module it wrapped)
    assert not any("forward" in vars(m) for m in other.unet.modules())
    fast = fasterdiff.accelerate(pipe, cache_interval=3, branch=branch, parallel=False, noise_injection=0)
    result = fast("a cat", num_inference_steps=10, generator=gen(), output_type="np", **SIZE)
    assert np.abs(result.images - expected).max() <= 1e-4
    assert result.stats.key_steps == (0, 3, 6, 9) and result.stats.full_evaluations == 4
    assert np.abs(result.images - np_images(pipe, steps=10)).max() > 1e-3  # it did reuse


def test_deep_plan_settings_are_checked(pipe):
    with pytest.raises(ValueError, match="needs cache_interval"):
        fasterdiff.accelerate(pipe, key_steps="paper", reuse="deep")
    with pytest.raises(ValueError, match="leave key_steps out"):
        fasterdiff.accelerate(pipe, key_steps="paper", cache_interval=3)
    with pytest.raises(ValueError, match="cache_interval must be an int >= 1"):
        fasterdiff.accelerate(pipe, cache_interval=0)
    with pytest.raises(ValueError, match="parallel"):
        fasterdiff.accelerate(pipe, cache_interval=3, parallel=True)
    with pytest.raises(ValueError, match="branch"):
        fasterdiff.accelerate(pipe, cache_interval=3, branch=99)("a cat", num_inference_steps=3)
    with pytest.raises(ValueError, match="reuse"):
        fasterdiff.accelerate(pipe, reuse="everything")
    # deep's steps read their own latents: sequential by default
    stats = fasterdiff.accelerate(pipe, cache_interval=2)("a cat", num_inference_steps=6, output_type="latent").stats
    assert stats.steps_per_call == [1] * 6


def test_the_old_spelling_of_deepcache_still_works_with_a_warning(pipe):
    kw = dict(num_inference_steps=6, output_type="latent", generator=gen())
    new = fasterdiff.accelerate(pipe, cache_interval=2)("a cat", **kw)
    with pytest.warns(DeprecationWarning, match="cache_interval=2"):
        old = fasterdiff.accelerate(pipe, key_steps=2, reuse="deep")
    kw["generator"] = gen()
    got = old("a cat", **kw)
    assert got.stats.key_steps == new.stats.key_steps == (0, 2, 4) and torch.equal(got.images, new.images)
    with pytest.warns(DeprecationWarning, match="RunStats.encoder_calls is now RunStats.full_evaluations"):
        assert got.stats.encoder_calls == 3


def test_one_call_switches_between_key_steps_and_cache_interval(pipe):
    fast = fasterdiff.accelerate(pipe, cache_interval=3)
    kw = dict(num_inference_steps=6, output_type="latent")
    assert fast("a cat", key_steps="paper", **kw).stats.key_steps == fasterdiff.paper_key_steps(6)
    assert fast("a cat", **kw).stats.key_steps == (0, 3)
    assert fasterdiff.accelerate(pipe, key_steps="paper")("a cat", cache_interval=2, **kw).stats.key_steps == (0, 2, 4)


def test_lora_scale_reaches_unet_and_text_encoder():
    from peft import LoraConfig, inject_adapter_in_model

    lora = tiny_pipeline()
    torch.manual_seed(5)
    lora.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    text_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(text_config, lora.text_encoder)
    kw = dict(cross_attention_kwargs={"scale": 0.5})
    expected = np_images(lora, **kw)
    assert np.abs(expected - np_images(lora)).max() > 1e-3  # the scale matters
    got = np_images(fasterdiff.accelerate(lora, key_steps="off", noise_injection=0), **kw)
    assert np.abs(got - expected).max() <= 1e-5


def test_torch_compile_of_pipe_unet_is_used():
    from torch._dynamo.testing import CompileCounter

    eager = fasterdiff.accelerate(tiny_pipeline(), key_steps="paper")
    expected = eager("a cat", num_inference_steps=50, generator=gen(), output_type="np", height=32, width=32).images
    compiled = tiny_pipeline()
    probe = compiled.unet.down_blocks[0].resnets[0]
    counter = CompileCounter()
    compiled.unet = torch.compile(compiled.unet, backend=counter, dynamic=True)
    encoder_runs = torch.zeros(())  # a tensor count: no Python state for Dynamo to guard on

    def count(_module, _args):
        encoder_runs.add_(1)

    probe.register_forward_pre_hook(count)
    fast = fasterdiff.accelerate(compiled, key_steps="paper")
    result = fast("a cat", num_inference_steps=50, generator=gen(), output_type="np", height=32, width=32)
    assert counter.frame_count > 0
    assert int(encoder_runs) == 9 == result.stats.full_evaluations
    assert np.abs(result.images - expected).max() <= 1e-3
    frames = counter.frame_count
    fast("a cat", num_inference_steps=50, generator=gen(), output_type="np", height=32, width=32)
    assert counter.frame_count == frames  # the second run compiles nothing new


def test_sdxl_off_equals_stock_and_parallel_equals_sequential():
    xl = tiny_xl_pipeline()
    expected = np_images(xl, steps=8)
    off = fasterdiff.accelerate(xl, key_steps="off", noise_injection=0)
    assert isinstance(off, fasterdiff.FasterDiffusionXLPipeline)
    assert np.abs(np_images(off, steps=8) - expected).max() <= 1e-5
    fast = fasterdiff.accelerate(xl, key_steps=3)
    seq, par = (fast("a cat", num_inference_steps=12, generator=gen(), output_type="np", parallel=p, **SIZE) for p in (False, True))
    assert np.abs(seq.images - par.images).max() <= 1e-4
    assert par.stats.steps_per_call == [3, 3, 3, 3]


def test_the_scheduler_set_on_the_pipeline_is_used(pipe):
    from diffusers import EulerDiscreteScheduler

    stock = tiny_pipeline()
    stock.scheduler = EulerDiscreteScheduler.from_config(stock.scheduler.config)
    fast = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    fast.scheduler = EulerDiscreteScheduler.from_config(fast.scheduler.config)
    assert np.abs(np_images(fast) - np_images(stock)).max() <= 1e-5
    assert isinstance(fast.scheduler, EulerDiscreteScheduler) and type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_outdated_scheduler_config_gets_stocks_fix_up():
    """StableDiffusionPipeline.__init__ corrects steps_offset/clip_sample of old DDIM configs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    base = tiny_pipeline()
    outdated = DDIMScheduler(**{**base.scheduler.config, "steps_offset": 0, "clip_sample": True})
    with pytest.warns(FutureWarning):
        stock = StableDiffusionPipeline(**{**base.components, "scheduler": outdated}, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    fast = fasterdiff.accelerate(stock, key_steps="off", noise_injection=0)
    assert np.abs(np_images(fast) - np_images(stock)).max() <= 1e-5


def test_a_scheduler_set_after_construction_is_used_as_it_is():
    """Stock samples with a scheduler set later as it is (no fix-up); so does the accelerated copy."""
    from diffusers import DDIMScheduler, PNDMScheduler

    for scheduler in (
        lambda config: DDIMScheduler.from_config(config, clip_sample=True),
        lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True, steps_offset=0),
    ):
        stock = tiny_pipeline()
        stock.scheduler = scheduler(stock.scheduler.config)
        fast = fasterdiff.accelerate(stock, key_steps="off", noise_injection=0)
        assert dict(fast.scheduler.config) == dict(stock.scheduler.config)
        assert np.abs(np_images(fast, steps=3) - np_images(stock, steps=3)).max() <= 1e-5


def test_call_signature_is_stocks_plus_sampler(pipe):
    import inspect

    stock = list(inspect.signature(pipe.__call__).parameters)
    fast = list(inspect.signature(fasterdiff.accelerate(pipe).__call__).parameters)
    assert stock[-1] == "kwargs" and fast == stock[:-1] + ["sampler", "kwargs"]
    xl = tiny_xl_pipeline()
    stock_xl = list(inspect.signature(xl.__call__).parameters)
    assert list(inspect.signature(fasterdiff.accelerate(xl).__call__).parameters) == stock_xl[:-1] + ["sampler", "kwargs"]


def test_a_pipeline_without_a_unet_still_encodes_prompts(pipe):
    from diffusers import StableDiffusionPipeline

    text_only = StableDiffusionPipeline(**{**pipe.components, "unet": None}, requires_safety_checker=False)
    fast = fasterdiff.accelerate(text_only)
    got, expected = (p.encode_prompt("a cat", "cpu", 1, False)[0] for p in (fast, text_only))
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="no UNet"):
        fast("a cat")


def test_callback_on_step_end_runs_and_its_latents_are_used(pipe):
    def halve_at_step_2(p, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5} if i == 2 else {}

    seen = []
    expected = np_images(pipe, callback_on_step_end=halve_at_step_2, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    stock_seen, seen = seen, []
    fast = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    got = np_images(fast, callback_on_step_end=halve_at_step_2, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == stock_seen == [(i, ["latents", "prompt_embeds"]) for i in range(6)]
    assert np.abs(got - expected).max() <= 1e-5
    # the callback's latents are used with noise injection too, in parallel mode
    par = np_images(fasterdiff.accelerate(pipe, key_steps=3), callback_on_step_end=halve_at_step_2)
    seq = np_images(fasterdiff.accelerate(pipe, key_steps=3, parallel=False), callback_on_step_end=halve_at_step_2)
    assert np.abs(par - seq).max() <= 1e-4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(guidance_rescale=0.7),
        dict(negative_prompt="a dog", num_images_per_prompt=2, eta=0.5),
        dict(guidance_scale=1.0),
    ],
    ids=["guidance_rescale", "negative+images+eta", "no-cfg"],
)
def test_stock_arguments_work(pipe, kwargs):
    fast = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    assert np.abs(np_images(fast, **kwargs) - np_images(pipe, **kwargs)).max() <= 1e-5


def test_custom_timesteps_and_sigmas(pipe):
    from diffusers import EulerDiscreteScheduler

    stock = tiny_pipeline()
    stock.scheduler = EulerDiscreteScheduler.from_config(stock.scheduler.config)
    fast = fasterdiff.accelerate(stock, key_steps="off", noise_injection=0)
    for kw in (dict(timesteps=[999, 800, 500, 300, 100]), dict(sigmas=[14.0, 5.0, 2.0, 1.0, 0.3])):
        expected = stock("a cat", generator=gen(), output_type="np", **SIZE, **kw).images
        got = fast("a cat", generator=gen(), output_type="np", **SIZE, **kw)
        assert np.abs(got.images - expected).max() <= 1e-5
        assert got.stats.num_steps == len(stock.scheduler.timesteps) == got.stats.unet_calls
    # a plan over custom timesteps is resolved against their count
    fast = fasterdiff.accelerate(stock, key_steps=[0, 2])
    stats = fast("a cat", timesteps=[999, 800, 500, 300, 100], output_type="latent", **SIZE).stats
    assert stats.key_steps == (0, 2) and stats.steps_per_call == [2, 3]


def test_positional_arguments_in_stocks_order(pipe):
    fast = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    # prompt, height, width, num_inference_steps
    a = fast("a cat", 64, 64, 4, generator=gen(), output_type="np").images
    b = pipe("a cat", 64, 64, 4, generator=gen(), output_type="np").images
    assert np.abs(a - b).max() <= 1e-5


def test_lcm_style_unet_with_time_cond_proj_dim():
    from diffusers import LCMScheduler, UNet2DConditionModel

    base = tiny_pipeline()
    config = dict(base.unet.config, time_cond_proj_dim=8)
    torch.manual_seed(0)
    lcm = tiny_pipeline(unet=UNet2DConditionModel.from_config(config))
    lcm.scheduler = LCMScheduler.from_config(lcm.scheduler.config)
    expected = np_images(lcm, steps=4)
    fast = fasterdiff.accelerate(lcm, key_steps="off", noise_injection=0)
    assert np.abs(np_images(fast, steps=4) - expected).max() <= 1e-5
    seq = np_images(fasterdiff.accelerate(lcm, key_steps=2, parallel=False), steps=4)
    par = np_images(fasterdiff.accelerate(lcm, key_steps=2, parallel=True), steps=4)
    assert np.abs(seq - par).max() <= 1e-4


def test_pipeline_left_exactly_as_it_was_even_when_a_call_raises(pipe):
    fast = fasterdiff.accelerate(pipe, key_steps=3)
    unet, scheduler = fast.unet, fast.scheduler

    def boom(p, i, t, tensors):
        if i == 4:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        np_images(fast, steps=8, callback_on_step_end=boom, sampler="Euler")
    assert fast.unet is unet is pipe.unet and fast.scheduler is scheduler
    assert instance_forwards(pipe.unet) == []
    assert fast._executor.run is None
    # and the next call works and matches a fresh pipeline's
    assert np.array_equal(np_images(fast, steps=8), np_images(fasterdiff.accelerate(pipe, key_steps=3), steps=8))


def test_plan_as_json_value(pipe):
    plan = fasterdiff.encoder_plan(pipe.unet, "paper", 20)
    again = fasterdiff.ReusePlan.from_json(plan.to_json())
    assert again == plan and again.key_steps == fasterdiff.paper_key_steps(20)
    by_keys = np_images(fasterdiff.accelerate(pipe, key_steps="paper"), steps=20)
    by_plan = np_images(fasterdiff.accelerate(pipe, key_steps=again), steps=20)
    assert np.array_equal(by_keys, by_plan)
    deep = fasterdiff.deep_plan(pipe.unet, 3, 20)
    assert not deep.batchable and plan.batchable
    with pytest.raises(ValueError, match="no module"):
        bad = fasterdiff.ReusePlan.from_json({**plan.to_json(), "replay": [[]] + [["nope"]] * 19})
        fasterdiff.accelerate(pipe, key_steps=bad)("a cat", num_inference_steps=20)
    with pytest.raises(ValueError, match="20 UNet evaluations"):
        fasterdiff.accelerate(pipe, key_steps=plan)("a cat", num_inference_steps=10)


def test_compile_option_pads_batches_so_few_graphs_are_compiled():
    from torch._dynamo.testing import CompileCounter

    pipe = tiny_pipeline()
    counter = CompileCounter()
    fast = fasterdiff.accelerate(pipe, compile={"backend": counter}, max_batch=None)
    eager = fasterdiff.accelerate(pipe, max_batch=None)
    kw = dict(num_inference_steps=20, output_type="np", height=32, width=32)
    frames = []
    for key_steps in ("paper", 3, 7, [0, 5, 6, 19], "paper"):
        got = fast("a cat", generator=gen(), key_steps=key_steps, **kw)
        expected = eager("a cat", generator=gen(), key_steps=key_steps, **kw)
        assert np.abs(got.images - expected.images).max() <= 1e-3
        assert got.stats.steps_per_call == expected.stats.steps_per_call
        frames.append(counter.frame_count)
    # groups of 1..14 steps run as batches of 1, 2, 4, 8 or 16: the graphs stop growing
    assert frames[-1] == frames[-2] == frames[-3]
    assert pipe.unet is not fast.unet and fast.unet._orig_mod is pipe.unet


def test_a_compiled_run_keeps_copies_of_the_features_it_reuses():
    """CUDA graphs (``mode="reduce-overhead"``) write every replay's output into the same memory, so a
    feature kept from one key step would change at the next. Here the UNet's first convolution does the same."""

    def conv_in_reusing_its_output_memory(p):
        conv_in = p.unet.conv_in
        compute, buffers = conv_in.forward, {}

        def forward(*args, **kwargs):
            out = compute(*args, **kwargs)
            if out.shape not in buffers:
                buffers[out.shape] = torch.empty_like(out)
            return buffers[out.shape].copy_(out)

        conv_in.forward = forward
        return p

    kw = dict(num_inference_steps=10, key_steps=5, forecast=1, output_type="np", height=32, width=32)
    expected = fasterdiff.accelerate(tiny_pipeline(), max_batch=None)("a cat", generator=gen(), **kw).images
    pipe = conv_in_reusing_its_output_memory(tiny_pipeline())
    eager = fasterdiff.accelerate(pipe, max_batch=None)("a cat", generator=gen(), **kw).images
    assert np.abs(eager - expected).max() > 1e-3  # the forecast read one feature twice: the aliasing bites
    compiled = fasterdiff.accelerate(pipe, max_batch=None, compile={"backend": "eager"})
    got = compiled("a cat", generator=gen(), **kw).images
    assert np.abs(got - expected).max() <= 1e-4
    pipe.unet = torch.compile(pipe.unet, backend="eager")  # compiled by the user: copies kept too
    got = fasterdiff.accelerate(pipe, max_batch=None)("a cat", generator=gen(), **kw).images
    assert np.abs(got - expected).max() <= 1e-4


def _with_ip_adapter(p, embed_dim=12):
    """Random IP-Adapter weights (image projection + per cross-attention k/v) loaded into ``p.unet``."""
    unet, torch_gen = p.unet, torch.Generator().manual_seed(3)
    cad = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cad, embed_dim, generator=torch_gen) * 0.1,
        "proj.bias": torch.zeros(4 * cad),
        "norm.weight": torch.ones(cad),
        "norm.bias": torch.zeros(cad),
    }
    ip_layers, key_id = {}, 1
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            for kv in ("to_k_ip", "to_v_ip"):
                ip_layers[f"{key_id}.{kv}.weight"] = torch.randn(hidden, cad, generator=torch_gen) * 0.1
            key_id += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}])
    return p


def test_ip_adapter_image_embeds():
    p = _with_ip_adapter(tiny_pipeline())
    embeds = [torch.randn(2, 1, 12, generator=torch.Generator().manual_seed(4))]  # negative, positive
    expected = np_images(p, ip_adapter_image_embeds=embeds)
    other = np_images(p, ip_adapter_image_embeds=[-e for e in embeds])
    assert np.abs(expected - other).max() > 1e-3  # the embeddings reach the image
    fast = fasterdiff.accelerate(p, key_steps="off", noise_injection=0)
    assert np.abs(np_images(fast, ip_adapter_image_embeds=embeds) - expected).max() <= 1e-5
    # the image embeddings follow every step of a batched group
    seq = np_images(fasterdiff.accelerate(p, key_steps=3, parallel=False), ip_adapter_image_embeds=embeds)
    par = fasterdiff.accelerate(p, key_steps=3, parallel=True)(
        "a cat", num_inference_steps=6, generator=gen(), output_type="np", ip_adapter_image_embeds=embeds, **SIZE
    )
    assert max(par.stats.steps_per_call) > 1
    assert np.abs(par.images - seq).max() <= 1e-4
