"""Speed benchmark: fasterdiff side by side with stock diffusers, in one process.

Every method samples from the same prompt embeddings, the same initial noise and
the same scheduler; methods run interleaved round by round (A B C ... A B C ...)
after a warm-up, and each round's time is divided by the stock time of the same
round, so slow drifts of a shared machine cancel out of the ratios. Sampling is
timed up to the final latent: the VAE decode, identical for every method, is left
out.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import fasterdiff

from ...samplers import make_scheduler
from ...weights import WEIGHTS_ENV, has_weights, load_pipeline
from .. import plots
from ..tiny import sd15_unet, tiny_pipeline
from . import report
from .harness import Method, count_passes, deepcache, installed, tome
from .memory import PeakMemory

PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Config:
    device: str = "cpu"
    size: int = 256
    steps: int = 50
    sampler: str = "DDIM"
    rounds: int = 3
    quick: bool = False
    max_batch: int = 2


def build_pipeline(cfg: Config):
    """SD 1.5 (real weights if $FASTERDIFF_WEIGHTS has them, else its UNet with random
    weights), or the tiny pipeline with ``quick``."""
    device = torch.device(cfg.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    weights = os.environ.get(WEIGHTS_ENV)
    if cfg.quick:
        pipe, source = tiny_pipeline(), "tiny random pipeline (--quick: shows that the benchmark runs; its timings say nothing about SD 1.5)"
    elif weights and has_weights(weights):
        pipe, source = load_pipeline(weights, device=device, dtype=dtype), f"SD 1.5 weights from {weights}"
    else:
        pipe, source = tiny_pipeline(unet=sd15_unet()), "SD 1.5 UNet architecture, random weights"
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, source


def make_methods(pipe, cfg: Config) -> list[Method]:
    """The methods to compare; all share ``inputs``: embeddings and initial noise."""
    size = 64 if cfg.quick else cfg.size
    device = torch.device(cfg.device)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, device, 1, True, "")
    latents = torch.randn(
        (1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32
    ).to(device=device, dtype=cond.dtype)
    common = dict(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=cfg.steps,
        height=size,
        width=size,
        output_type="latent",
    )
    stock_scheduler = make_scheduler(cfg.sampler, pipe.scheduler.config)
    fast = fasterdiff.accelerate(pipe, max_batch=None)  # unbounded unless a method says otherwise

    def stock():
        pipe.scheduler = stock_scheduler
        # The same z_T for every method: prepare_latents scales by init_noise_sigma.
        pipe(latents=latents.clone(), **common)

    def accelerated(**settings):
        return lambda: fast(latents=latents.clone(), sampler=cfg.sampler, **common, **settings)

    methods = [
        Method("stock diffusers", stock),
        Method("fasterdiff paper, sequential", accelerated(key_steps="paper", parallel=False)),
        Method("fasterdiff paper, parallel", accelerated(key_steps="paper", parallel=True)),
        Method(
            f"fasterdiff paper, parallel, max_batch={cfg.max_batch}",
            accelerated(key_steps="paper", parallel=True, max_batch=cfg.max_batch),
        ),
        Method("fasterdiff uniform-5, parallel", accelerated(key_steps=5, parallel=True)),
        Method("fasterdiff default (auto: the paper's key steps without a plan file; max_batch auto)", accelerated(max_batch="auto")),
        Method("fasterdiff deep (interval 3, branch 0)", accelerated(cache_interval=3)),
    ]
    if installed("DeepCache"):
        methods.append(
            Method(
                "DeepCache (interval 3, branch 0)",
                stock,
                lambda: deepcache(pipe),
                note="at cached steps only conv_in and the last up-block layer run",
            )
        )
    if installed("tomesd"):
        methods.append(Method("ToMe (ratio 0.5)", stock, lambda: tome(pipe)))
        methods.append(
            Method(
                "fasterdiff paper, parallel + ToMe (0.5)",
                accelerated(key_steps="paper", parallel=True),
                lambda: tome(pipe),
            )
        )
    return methods


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(cfg: Config) -> dict:
    """Warm up, then time every method ``cfg.rounds`` times, interleaved."""
    device = torch.device(cfg.device)
    pipe, source = build_pipeline(cfg)
    methods = make_methods(pipe, cfg)
    results = {m.name: {"seconds": [], "ratio": []} for m in methods}
    with tqdm(total=len(methods) * (cfg.rounds + 1), desc="speed benchmark", unit="run") as bar:
        for m in methods:  # warm-up, and the encoder / decoder passes of each
            with m.context(), count_passes(pipe.unet) as passes:
                m.run()
            results[m.name].update(
                encoder_calls=passes.encoder_calls,
                decoder_calls=passes.decoder_calls,
                peak_memory_bytes=0,
                added_memory_bytes=0,
            )
            bar.update()
        for _ in range(cfg.rounds):
            times = {}
            for m in methods:
                bar.set_postfix_str(m.name)
                with m.context(), PeakMemory(device) as mem:
                    times[m.name] = _timed(m.run, device)
                r = results[m.name]
                r["peak_memory_bytes"] = max(r["peak_memory_bytes"], mem.peak)
                r["added_memory_bytes"] = max(r["added_memory_bytes"], mem.added)
                bar.update()
            for m in methods:
                results[m.name]["seconds"].append(times[m.name])
                results[m.name]["ratio"].append(times[methods[0].name] / times[m.name])
    rows = []
    for m in methods:
        r = results[m.name]
        rows.append(
            {
                "method": m.name,
                "median_s": statistics.median(r["seconds"]),
                "min_s": min(r["seconds"]),
                "max_s": max(r["seconds"]),
                "speedup_median": statistics.median(r["ratio"]),
                "speedup_min": min(r["ratio"]),
                "speedup_max": max(r["ratio"]),
                "encoder_calls": r["encoder_calls"],
                "decoder_calls": r["decoder_calls"],
                "peak_memory_mb": r["peak_memory_bytes"] / 2**20,
                "added_memory_mb": r["added_memory_bytes"] / 2**20,
                "seconds": r["seconds"],
                "note": m.note,
            }
        )
    return {"config": dataclasses.asdict(cfg), "model": source, "rows": rows}


def markdown_table(result: dict) -> str:
    lines = [
        "| method | s/image median (min-max) | speedup vs stock median (min-max) | encoder calls | decoder calls | peak memory MB | peak above start MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) "
            f"| {r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) "
            f"| {r['encoder_calls']} | {r['decoder_calls']} | {r['peak_memory_mb']:.0f} "
            f"| {r['added_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def markdown_page(result: dict) -> str:
    env, cfg, command = result["environment"], result["config"], result["command"]
    return (
        f"Command: `{command}`\n\n"
        f"Model: {result['model']}; sampler {cfg['sampler']}, {cfg['steps']} steps, "
        f"{'64 (quick)' if cfg['quick'] else cfg['size']}px, {cfg['rounds']} interleaved rounds after a warm-up.\n\n"
        f"Machine: {env.get('gpu') or env['processor']} ({env['cpu_count']} CPUs), {env['machine']}; "
        f"torch {env['torch']}, diffusers {env['diffusers']}; {env['date']}.\n\n" + markdown_table(result) + "\n"
    )


def bar_chart(result: dict, path: Path) -> None:
    plt = plots.pyplot(path)
    if plt is None:
        return

    rows = result["rows"]
    names = [r["method"] for r in rows]
    med = [r["speedup_median"] for r in rows]
    err = [[m - r["speedup_min"] for m, r in zip(med, rows)], [r["speedup_max"] - m for m, r in zip(med, rows)]]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8))
    ax.barh(names[::-1], med[::-1], xerr=[e[::-1] for e in err], color="#4878a8", capsize=3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, r in enumerate(rows[::-1]):
        ax.text(r["speedup_max"] + 0.04, y, f"{r['speedup_median']:.2f}x", va="center", fontsize=8)
    cfg, env = result["config"], result["environment"]
    ax.set_xlabel("speedup vs stock diffusers (median, min-max over rounds)")
    ax.set_title(
        f"{cfg['sampler']}-{cfg['steps']}, {cfg['size']}px, {env.get('gpu') or env['processor']}", fontsize=9
    )
    fig.text(0.01, 0.01, result["command"], fontsize=6, family="monospace")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, prefix: Path, command: str) -> list[Path]:
    """``prefix``.json, .md and .png."""
    return report.write(result, prefix, command, markdown_page, {".png": bar_chart})
