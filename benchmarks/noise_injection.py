"""Prior noise injection's strength on the trained stand-in: prompt accuracy and PSNR
against stock, per strength, for the paper's key steps and the calibrated auto plan.

    python benchmarks/noise_injection.py [--sampler DDIM] [--steps 50] [--prompts-every 1]
        [--z-t-as-drawn] [--img2img STRENGTH] [--out benchmarks/results]

Every (digit, colour, thickness) prompt once (or every n-th), seed = its index, the same seeds
for every row; stock (no reuse, no injection) is the reference. Accuracy comes with a
bootstrap 95% interval over prompts. ``--z-t-as-drawn``: the control that adds z_T as the
sampler drew it, without the rescaling Euler-type samplers get (fasterdiff.pipeline.
injected_noise). ``--img2img s``: the same for img2img at strength s, each prompt drawn from
stock's text-to-image image of the next prompt (another digit, colour or thickness: the
edit must change it), the injected z_T being the starting latent (the noised image).
Writes noise-injection-<sampler>-<steps>[-as-drawn][-img2img-<s>].{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff.samplers import SAMPLER_NAMES, make_scheduler  # noqa: E402
from fasterdiff import metrics  # noqa: E402
from fasterdiff.tools.standin import PIPELINE_DIR, data, require, score  # noqa: E402

STRENGTHS = (0.0, 0.003, 0.01, 0.02, 0.05, 0.1)
PLANS = ("paper", "auto")


def sample(pipe, prompts: list[str], steps: int, inputs: dict | None = None, **settings) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W); prompt i drawn with seed i."""
    fast = fasterdiff.accelerate(pipe, **settings)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = fast(prompts, num_inference_steps=steps, generator=generators, output_type="np", **(inputs or {})).images
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


def run(sampler: str, steps: int, prompts_every: int = 1, strengths=STRENGTHS, plans=PLANS, as_drawn: bool = False,
        img2img: float | None = None) -> dict:
    require()
    pipe = fasterdiff.load_pipeline(PIPELINE_DIR, device="cpu", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    wanted = [a for a, _ in data.benchmark_prompts(1)][::prompts_every]
    prompts = [a.prompt for a in wanted]
    classifier = score.load_classifier()

    def row(plan: str, strength, images: torch.Tensor, stock: torch.Tensor) -> dict:
        right = score.all_right(score.classify(classifier, images), wanted).astype(float)
        low, high = score.bootstrap(right, np.mean)
        psnr = metrics.psnr(images, stock, data_range=2)
        return {"plan": plan, "strength": strength, "accuracy": float(right.mean()), "accuracy_95": [low, high],
                "psnr_mean": float(psnr.mean()), "psnr_min": float(psnr.min())}

    inputs = None
    if img2img is not None:  # edit stock's image of the next prompt into this one
        from diffusers import StableDiffusionImg2ImgPipeline
        from PIL import Image

        drawn = sample(pipe, prompts, steps, key_steps="off")
        images = [Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for x in drawn]
        inputs = {"image": images[1:] + images[:1], "strength": img2img}
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
        pipe.register_to_config(_name_or_path=str(PIPELINE_DIR))  # auto: the stand-in's plan file
        pipe.set_progress_bar_config(disable=True)
    stock = sample(pipe, prompts, steps, inputs, key_steps="off")
    rows = [row("stock", None, stock, stock)]
    with _z_t_as_drawn() if as_drawn else contextlib.nullcontext():
        for plan in plans:
            for strength in strengths:
                images = sample(pipe, prompts, steps, inputs, key_steps=plan, noise_injection=strength)
                rows.append(row(plan, strength, images, stock))
    z_t = "as drawn" if as_drawn else "in the step's scale"
    return {"sampler": sampler, "steps": steps, "prompts": len(prompts), "rows": rows, "z_t": z_t, "img2img": img2img}


@contextlib.contextmanager
def _z_t_as_drawn():
    """z_T added as the sampler drew it (the control for the rescaling Euler-type samplers get)."""
    from fasterdiff import pipeline

    rescaled = pipeline.injected_noise
    pipeline.injected_noise = lambda z_T, scheduler, index: z_T
    try:
        yield
    finally:
        pipeline.injected_noise = rescaled


def markdown(result: dict, command: str) -> str:
    z_t = result.get("z_t", "in the step's scale")  # results written before the control existed
    task = f"img2img at strength {result['img2img']:g} (z_T: the starting latent), " if result.get("img2img") else ""
    lines = [
        f"# Noise injection strength, stand-in, {task}{result['sampler']}-{result['steps']}, {result['prompts']} prompts, "
        f"z_T {z_t}",
        "",
        f"`{command}`",
        "",
        "| plan | strength | prompt accuracy (95% interval) | PSNR vs stock, mean / min (dB) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        strength = "-" if r["strength"] is None else f"{r['strength']:g}"
        low, high = r["accuracy_95"]
        lines.append(
            f"| {r['plan']} | {strength} | {r['accuracy']:.3f} ({low:.3f}-{high:.3f}) | "
            f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", default="DDIM", choices=SAMPLER_NAMES)
    parser.add_argument("--steps", type=int, default=50, choices=range(2, 101), metavar="2-100")
    parser.add_argument("--prompts-every", type=int, default=1, choices=range(1, 181), metavar="1-180",
                        help="every n-th prompt only (quick runs)")
    parser.add_argument("--z-t-as-drawn", action="store_true",
                        help="control: add z_T as the sampler drew it (no rescaling for Euler-type samplers)")
    parser.add_argument("--img2img", type=float, default=None, metavar="STRENGTH",
                        help="measure img2img at this strength (0-1) instead of text-to-image")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.img2img is not None and not 0 < args.img2img <= 1:
        parser.error(f"--img2img must be in (0, 1], got {args.img2img}")
    result = run(args.sampler, args.steps, args.prompts_every, as_drawn=args.z_t_as_drawn, img2img=args.img2img)
    command = "python benchmarks/noise_injection.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(result, command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    task = f"-img2img-{args.img2img:g}" if args.img2img is not None else ""
    stem = args.out / f"noise-injection-{args.sampler}-{args.steps}{'-as-drawn' if args.z_t_as_drawn else ''}{task}"
    stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=1) + "\n")  # not with_suffix: "0.6"
    stem.with_name(stem.name + ".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
