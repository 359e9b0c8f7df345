"""Fidelity benchmark on the trained stand-in: does "faster" cost quality?

Every method samples the same prompt x seed pairs (every digit x colour x thickness
prompt, ``seeds`` seeds each) from the same prompt embeddings and the same initial
noise. Scores, per method:

* prompt accuracy: the held-out classifier's digit / colour / thickness against the
  prompt, and all three at once (the "CLIP score" analogue),
* Frechet distance between classifier features of generated images and of real digits
  of the same attributes (the "FID" analogue),
* PSNR and SSIM against the stock sampler's images of the same pairs,
* UNet cost relative to stock: FLOPs of the whole sampling loop, counted by torch,
  and the measured wall-time speedup.

Controls a reviewer asks for: stock sampling with fewer steps at each method's cost
(plus a sweep of step counts that traces the plain speed/fidelity trade-off) and the
reuse of the whole noise prediction at the same key steps (is the decoder worth
running at non-key steps?). Costs are counted first; then every method and control
runs once per chunk (one seed for every prompt), in an order rotated per chunk, so
timings are interleaved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import fasterdiff

from ... import calibrate, choice, cost, metrics, schedule
from ...plan import ReusePlan
from ...samplers import DETERMINISTIC_SAMPLERS, make_scheduler
from ..standin import STANDIN_DIR, data, require, score
from .harness import Method, count_passes, deepcache, installed, tome


@dataclass
class Config:
    sampler: str = "DDIM"
    steps: int = 50
    seeds: int = 3  # per prompt; 180 prompts
    guidance_scale: float = 7.5
    standin: str = str(STANDIN_DIR)  # holds pipeline/, classifier.safetensors
    prompts: int | None = None  # first n prompts only (quick runs)
    sweep: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@contextlib.contextmanager
def reuse_noise_prediction(unet, key_steps: set[int]):
    """Run the whole UNet only at ``key_steps`` (0-based); other steps reuse its last output."""
    original = unet.forward
    state = {"step": 0, "cached": None}

    def forward(*args, **kwargs):
        if state["step"] in key_steps or state["cached"] is None:
            state["cached"] = original(*args, **kwargs)
        state["step"] += 1
        return state["cached"]

    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward


def stock_sampler(pipe, cfg: Config, base_config, steps: int):
    """Stock diffusers sampling of a chunk's inputs with ``steps`` steps (fresh scheduler)."""

    def run(inp):
        pipe.scheduler = make_scheduler(cfg.sampler, base_config)
        return pipe(
            latents=inp["latents"].clone(),
            prompt_embeds=inp["cond"],
            negative_prompt_embeds=inp["uncond"],
            num_inference_steps=steps,
            guidance_scale=cfg.guidance_scale,
            output_type="latent",
        ).images

    return run


def build_methods(pipe, cfg: Config, base_config) -> list[Method]:
    n = cfg.steps
    fast = fasterdiff.accelerate(pipe)
    common = dict(guidance_scale=cfg.guidance_scale, output_type="latent")

    def stock(steps):
        return stock_sampler(pipe, cfg, base_config, steps)

    def accelerated(**settings):
        def run(inp):
            out = fast(
                latents=inp["latents"].clone(),
                prompt_embeds=inp["cond"],
                negative_prompt_embeds=inp["uncond"],
                num_inference_steps=n,
                sampler=cfg.sampler,
                **common,
                **settings,
            )
            return out.images

        return run

    scheduler = make_scheduler(cfg.sampler, base_config)

    def modelled(**settings) -> float:
        """Modelled GPU seconds of one image (fasterdiff.cost) with these settings."""
        s, _ = dataclasses.replace(fast.settings, **settings).without_auto(scheduler, n, pipe.unet, n)
        plan = s.plan(pipe.unet, n)
        return cost.gpu_seconds(plan, plan.batchable if s.parallel is None else s.parallel, deep=s.reuse == "deep")

    def acc(name: str, **settings) -> Method:
        return Method(name, accelerated(**settings), steps=n, gpu_seconds=modelled(**settings))

    methods = [
        Method("stock diffusers", stock(n), kind="stock", steps=n, gpu_seconds=modelled(key_steps="off")),
        acc("fasterdiff paper, sequential", key_steps="paper", parallel=False),
        acc("fasterdiff paper, parallel", key_steps="paper", parallel=True),
        acc("fasterdiff paper, no noise injection", key_steps="paper", noise_injection=0.0),
        acc("fasterdiff uniform-5, parallel", key_steps=5),
        acc("fasterdiff paper, forecast 1", key_steps="paper", forecast=1),
        acc("fasterdiff uniform-5, forecast 1", key_steps=5, forecast=1),
        acc("fasterdiff uniform-3, forecast 1", key_steps=3, forecast=1),
        acc("fasterdiff deep (interval 3, branch 0)", cache_interval=3),
        acc("fasterdiff deep interval 3, forecast 1", cache_interval=3, forecast=1),
        acc("fasterdiff deep interval 5, forecast 1", cache_interval=5, forecast=1),
        acc("fasterdiff auto (calibrated plan)", key_steps="auto"),
    ]
    methods += _calibrated_levels(pipe, fast, scheduler, n, acc)
    if installed("DeepCache"):
        for interval in (3, 5):
            methods.append(
                Method(
                    f"DeepCache (interval {interval}, branch 0)", stock(n),
                    lambda interval=interval: deepcache(pipe, interval), steps=n,
                    gpu_seconds=modelled(cache_interval=interval),
                )
            )
    if installed("tomesd"):
        methods.append(Method("ToMe (ratio 0.5)", stock(n), lambda: tome(pipe), steps=n))
        methods.append(
            Method("fasterdiff paper, parallel + ToMe (0.5)", accelerated(key_steps="paper"), lambda: tome(pipe), steps=n)
        )
    for spec, label in (("paper", "paper"), (5, "uniform-5")):
        keys = set(schedule.resolve(spec, n).steps)
        methods.append(
            Method(
                f"control: reuse whole noise prediction, {label} key steps",
                stock(n),
                lambda keys=keys: reuse_noise_prediction(pipe.unet, keys),
                kind="eps reuse",
                steps=n,
                gpu_seconds=len(keys) * cost.GPU_SECONDS[1]["full"],
            )
        )
    return methods


def _calibrated_levels(pipe, fast, scheduler, n: int, acc) -> list[Method]:
    """Rows for the plan file's other levels (the plans matching DeepCache at intervals 3
    and 5), where they run a plan other than auto's and DeepCache's own (which has its row)."""
    auto = choice.choose(fast.settings.plans, scheduler, n, pipe.unet)
    if not isinstance(auto.key_steps, ReusePlan):
        return []  # no calibration for this sampler and step count
    out = []
    for level in ("deepcache-3", "deepcache-5"):
        picked = choice.choose(fast.settings.plans, scheduler, n, pipe.unet, level=level)
        if picked.beyond_deepcache and picked.name != auto.name:
            out.append(acc(f"fasterdiff calibrated plan, {level} level", key_steps=picked.key_steps, reuse=picked.reuse))
    return out


def fewer_steps_controls(pipe, cfg: Config, base_config, costs: dict[str, float]) -> list[Method]:
    """Stock at the step count of each method's cost, and at the sweep's fractions."""
    n = cfg.steps
    wanted: dict[int, list[str]] = {}
    for name, flops in costs.items():
        wanted.setdefault(max(1, round(n * flops)), []).append(name)
    for frac in cfg.sweep:
        wanted.setdefault(max(2, round(n * frac)), [])
    methods = []
    for steps in sorted(wanted):
        if steps >= n:
            continue
        run = stock_sampler(pipe, cfg, base_config, steps)
        methods.append(
            Method(
                f"control: stock, {steps} steps", run, kind="fewer steps", steps=steps, matches=wanted[steps],
                gpu_seconds=steps * cost.GPU_SECONDS[1]["full"],
            )
        )
    return methods


def count_flops(pipe, method: Method, inputs: dict) -> int:
    with method.context(), cost.countable_attention(pipe.unet), FlopCounterMode(display=False) as counter:
        method.run(inputs)
    return counter.get_total_flops()


def _inputs(pipe, pairs, start: int) -> dict:
    prompts = [a.prompt for a, _ in pairs]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True, [""] * len(prompts))
    size = pipe.unet.config.sample_size
    latents = torch.cat(
        [
            torch.randn(
                (1, pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(start + j)
            )
            for j in range(len(pairs))
        ]
    )
    return {"cond": cond, "uncond": uncond, "latents": latents}


def _run_all(pipe, methods, chunks, bar) -> dict[str, dict]:
    out = {m.name: {"latents": [], "seconds": [], "calls": None} for m in methods}
    warmup = {k: v[:2] for k, v in chunks[0].items()}
    for m in methods:  # untimed: first-call allocations and lazy initialisation
        with m.context():
            m.run(warmup)
    for c, inp in enumerate(chunks):
        shift = c * len(methods) // len(chunks)  # rotate the order per chunk
        for m in methods[shift:] + methods[:shift]:
            bar.set_postfix_str(m.name[:40])
            with m.context(), count_passes(pipe.unet) as passes:
                t0 = time.perf_counter()
                latents = m.run(inp)
                out[m.name]["seconds"].append(time.perf_counter() - t0)
            out[m.name]["latents"].append((c, latents))
            out[m.name]["calls"] = {"encoder": passes.encoder_calls, "decoder_steps": passes.decoder_steps}
            bar.update()
    for r in out.values():  # back to chunk order
        r["latents"] = torch.cat([z for _, z in sorted(r["latents"], key=lambda item: item[0])])
    return out


@torch.no_grad()
def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    images = [pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample for z in latents.split(256)]
    return torch.cat(images).clamp(-1, 1)


@torch.no_grad()
def _vae_round_trip(pipe, images: torch.Tensor) -> torch.Tensor:
    return _decode(
        pipe,
        torch.cat([pipe.vae.encode(x).latent_dist.mean for x in images.split(256)]) * pipe.vae.config.scaling_factor,
    )


def _scores(s: score.Scores, wanted, real_features, chunk: int, images=None, stock_images=None) -> dict:
    """Accuracy (with a bootstrap interval over pairs), Frechet distance (on all pairs, and
    per seed chunk for its spread: bootstrap resampling would bias it upwards), PSNR, SSIM."""
    acc = score.accuracy(s, wanted)
    hits = score.all_right(s, wanted)
    per_chunk = [
        score.frechet_distance(s.features[i : i + chunk], real_features[i : i + chunk])
        for i in range(0, len(wanted), chunk)
    ]
    row = {
        "accuracy": acc,
        "accuracy_all_ci95": score.bootstrap(hits.astype(float), np.mean),
        "hits": hits.astype(int).tolist(),  # per pair: every attribute right
        "frechet_distance": score.frechet_distance(s.features, real_features),
        "frechet_distance_per_seed": per_chunk,
    }
    if images is not None:
        p = metrics.psnr(images, stock_images, data_range=2)
        row["psnr_vs_stock"] = float(np.mean(p))
        row["psnr_vs_stock_pooled"] = calibrate.pooled_psnr(p)
        row["psnr_vs_stock_ci95"] = score.bootstrap(p, np.mean)
        row["ssim_vs_stock"] = float(np.mean(score.ssim(images, stock_images)))
    return row


def paired_comparison(hits, stock_hits) -> dict:
    """Pairs a method gets right where stock is wrong (gained) and the reverse (lost), with
    McNemar's exact two-sided p-value: how likely so uneven a split is if the method and
    stock were equally accurate. Accuracies a few pairs apart are not a difference."""
    gained = sum(1 for a, b in zip(hits, stock_hits) if a and not b)
    lost = sum(1 for a, b in zip(hits, stock_hits) if b and not a)
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return {"gained": gained, "lost": lost, "p": min(1.0, 2 * tail)}


def run(cfg: Config) -> dict:
    if cfg.sampler not in DETERMINISTIC_SAMPLERS:
        raise ValueError(
            f"the fidelity benchmark needs a deterministic sampler, one of {', '.join(DETERMINISTIC_SAMPLERS)}; got {cfg.sampler!r}"
        )
    folder = Path(cfg.standin)
    require(folder)
    pipe = fasterdiff.load_pipeline(folder / "pipeline", device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    classifier = score.load_classifier(folder / "classifier.safetensors")
    pairs = data.benchmark_prompts(cfg.seeds)
    by_seed = [[(a, s) for a, s in pairs if s == seed] for seed in range(cfg.seeds)]
    if cfg.prompts:
        by_seed = [chunk[: cfg.prompts] for chunk in by_seed]
    chunks, wanted, start = [], [], 0
    for chunk in by_seed:
        chunks.append(_inputs(pipe, chunk, start))
        wanted += [a for a, _ in chunk]
        start += len(chunk)

    # Costs first (FLOPs of one small batch), so controls can be timed with the methods.
    probe = {k: v[:2] for k, v in chunks[0].items()}
    methods = build_methods(pipe, cfg, base_config)
    flops = {m.name: count_flops(pipe, m, probe) for m in tqdm(methods, desc="counting FLOPs", unit="method")}
    for m in methods:
        m.unet_cost = flops[m.name] / flops[methods[0].name]
    controls = fewer_steps_controls(pipe, cfg, base_config, {m.name: m.unet_cost for m in methods if m.kind != "stock"})
    for m in controls:
        m.unet_cost = count_flops(pipe, m, probe) / flops[methods[0].name]
    methods += controls
    with tqdm(total=len(methods) * len(chunks), desc=f"fidelity {cfg.sampler}-{cfg.steps}", unit="run") as bar:
        results = _run_all(pipe, methods, chunks, bar)

    pool = data.generator_digits()
    real, real_distinct = score.real_reference(wanted, 0, pool)
    real_b, real_b_distinct = score.real_reference(wanted, 1, pool)
    real_scores = score.classify(classifier, real)
    images = {m.name: _decode(pipe, results[m.name]["latents"]) for m in methods}
    chunk = len(by_seed[0])
    stock_images = images[methods[0].name]
    stock_seconds = results[methods[0].name]["seconds"]
    rows = []
    for m in methods:
        r = results[m.name]
        ratios = [a / b for a, b in zip(stock_seconds, r["seconds"])]
        rows.append(
            {
                "method": m.name,
                "kind": m.kind,
                "steps": m.steps,
                "encoder_calls": r["calls"]["encoder"],
                "decoder_steps": round(r["calls"]["decoder_steps"], 2),
                "unet_cost": m.unet_cost,
                "gpu_seconds_modelled": m.gpu_seconds,
                "speedup_median": statistics.median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "seconds": r["seconds"],
                "matches": m.matches,
                **_scores(
                    score.classify(classifier, images[m.name]),
                    wanted,
                    real_scores.features,
                    chunk,
                    images[m.name],
                    stock_images,
                ),
            }
        )
    for r in rows:
        r["paired_vs_stock"] = paired_comparison(r["hits"], rows[0]["hits"])
    held = np.load(folder / "heldout.npz")
    _, val = data.classifier_split(held["labels"])
    val_wanted = [
        data.Attributes(int(held["labels"][i]), c, int(held["thickness"][i]))
        for c in range(len(data.COLORS))
        for i in val
    ]
    val_images = data.render(
        held["digits"][[w for _ in range(len(data.COLORS)) for w in val]], np.array([w.color for w in val_wanted])
    )
    return {
        "config": dataclasses.asdict(cfg),
        "pairs": len(wanted),
        "batch_per_call": chunk,
        "real": {
            "classifier_validation_accuracy": score.accuracy(score.classify(classifier, val_images), val_wanted),
            "reference": {
                **_scores(real_scores, wanted, real_scores.features, chunk),
                "distinct_digits": real_distinct,
            },
            "second_real_set": {
                **_scores(score.classify(classifier, real_b), wanted, real_scores.features, chunk),
                "distinct_digits": real_b_distinct,
            },
            "reference_through_vae": _scores(
                score.classify(classifier, _vae_round_trip(pipe, real)), wanted, real_scores.features, chunk
            ),
        },
        "rows": rows,
        "_images": images,
        "_wanted": wanted,
    }
