"""Wall time on this CPU at the stand-in's size, as the predictor serves: one prompt per
call, 1 and 4 images per prompt, DDIM-50 (or --sampler/--steps), interleaved rounds.

    python benchmarks/standin_speed.py [--rounds 7] [--sampler DDIM] [--steps 50]
        [--pipeline text-to-image|img2img|controlnet]

Compares stock, DeepCache intervals 3 and 5, fasterdiff's paper plan, deep plans with a
forecast, auto and the calibrated plan of the deepcache-5 level (see fasterdiff.calibrate).
``--pipeline img2img``: diffusers' img2img pipeline on the stand-in at strength 0.6 (from a
stock image of another prompt); ``controlnet``: a ControlNet copied from the stand-in's UNet
(diffusers' ``from_unet``; random output convolutions: speed does not need trained weights),
conditioned on that image. Each method runs on the same pipeline, DeepCache's own code
included. Prints a markdown table: seconds per call (median, min-max) and speedup against
stock within each round.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff import choice  # noqa: E402
from fasterdiff.tools.bench.harness import deepcache  # noqa: E402
from fasterdiff.samplers import make_scheduler  # noqa: E402
from fasterdiff.tools.standin import PIPELINE_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, choices=range(1, 51), metavar="1-50")
    parser.add_argument("--sampler", default="DDIM")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pipeline", default="text-to-image", choices=("text-to-image", "img2img", "controlnet"))
    args = parser.parse_args()
    pipe = fasterdiff.load_pipeline(PIPELINE_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    pipe, inputs = _pipeline(pipe, args.pipeline, args.steps)
    auto = fasterdiff.accelerate(pipe, key_steps="auto", noise_injection=0)
    chosen = auto("a bold red seven", num_inference_steps=args.steps, output_type="latent", **inputs).stats.plan
    methods = {
        "stock diffusers": (pipe, None),
        "DeepCache (interval 3)": (pipe, 3),
        "DeepCache (interval 5)": (pipe, 5),
        "fasterdiff deep, interval 3, forecast 1": (fasterdiff.accelerate(pipe, cache_interval=3, forecast=1), None),
        "fasterdiff deep, interval 5, forecast 1": (fasterdiff.accelerate(pipe, cache_interval=5, forecast=1), None),
        "fasterdiff paper (parallel)": (fasterdiff.accelerate(pipe, key_steps="paper", noise_injection=0), None),
        "fasterdiff auto": (auto, None),
    }
    level = choice.choose(auto.settings.plans, pipe.scheduler, args.steps, pipe.unet, level="deepcache-5")
    if level.beyond_deepcache and args.pipeline == "text-to-image":
        fast = fasterdiff.accelerate(pipe, key_steps=level.key_steps, reuse=level.reuse, noise_injection=0)
        methods["fasterdiff calibrated, deepcache-5 level"] = (fast, None)
        chosen += "\n\n" + level.reason
    print(f"pipeline: {type(pipe).__name__}" + (f" {inputs}" if inputs else ""))
    print(chosen)
    print("| images | method | s/call median (min-max) | speedup vs stock median (min-max) |\n|---|---|---|---|")
    for images in (1, 4):
        secs = {name: [] for name in methods}
        for r in range(args.rounds + 1):
            names = list(methods)[r % len(methods):] + list(methods)[: r % len(methods)]
            for name in names:
                p, interval = methods[name]
                kw = dict(num_inference_steps=args.steps, num_images_per_prompt=images, output_type="latent",
                          generator=torch.Generator().manual_seed(r), **inputs)
                with deepcache(pipe, interval) if interval else contextlib.nullcontext():
                    start = time.perf_counter()  # DeepCache's enable/disable is not timed
                    p("a bold red seven", **kw)
                    seconds = time.perf_counter() - start
                if r:  # round 0 warms up
                    secs[name].append(seconds)
        for name, s in secs.items():
            ratios = [a / b for a, b in zip(secs["stock diffusers"], s)]
            print(f"| {images} | {name} | {statistics.median(s):.3f} ({min(s):.3f}-{max(s):.3f}) | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


def _pipeline(pipe, kind: str, steps: int):
    """The pipeline to time and its image inputs (a stock image of another prompt)."""
    if kind == "text-to-image":
        return pipe, {}
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline

    image = pipe("a thin blue two", num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images[0]
    if kind == "img2img":
        out = StableDiffusionImg2ImgPipeline(**pipe.components)
        inputs = {"image": image, "strength": 0.6}
    else:
        from fasterdiff.tools.tiny import tiny_controlnet

        out = StableDiffusionControlNetPipeline(**pipe.components, controlnet=tiny_controlnet(pipe.unet, vae_scale_factor=pipe.vae_scale_factor))
        inputs = {"image": image}
    out.register_to_config(_name_or_path=str(PIPELINE_DIR))  # auto: the stand-in's plan file
    out.set_progress_bar_config(disable=True)
    return out, inputs


if __name__ == "__main__":
    main()
