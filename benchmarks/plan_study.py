"""Plan families outside the calibration grid, measured on the stand-in's development pairs.

    python benchmarks/plan_study.py [--sampler DDIM] [--steps 50] [--pairs 90] [--out benchmarks/results]

Calibration (fasterdiff.calibrate) searches key-step positions, replay and linear forecasts
(full and damped by half). This study measures three further ideas against that grid's own
families at DeepCache's key steps (every 3rd and every 5th step), so that a reader can see
why calibration does not search them:

- *branch depth*: DeepCache's replayed deep branch cut lower (``branch`` 1 to 3: the
  shallow path computes more of the UNet at every step);
- *mixed depth*: branch 1 for the first 30% of the steps (where features change most),
  then branch 0;
- *horizon-limited forecast*: forecast 1 only at steps whose extrapolation reaches at most
  half of the gap it extrapolates from, replay beyond (also at key steps spaced denser
  towards the start, where late gaps are long).

Pairs: ``data.calibration_pairs(pairs, first_seed=2000)``: neither the calibration pairs
(seeds 1000 on) nor the fidelity benchmark's scoring pairs (seeds 0, 1, 2). Every plan runs
with the library's default noise injection, against stock without it, as calibration does.
Per plan: UNet FLOPs relative to stock (counted on the model), UNet calls, PSNR against
stock's images (pooled, mean, worst) and prompt accuracy by the stand-in's classifier with
the pairs gained and lost against stock (McNemar's p). GPU time is not modelled here: the
cost model (fasterdiff/cost.py) was measured for branch 0 only. Writes
``plan-study-SAMPLER-STEPS.{md,json}`` to ``--out``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff import calibrate, cost  # noqa: E402
from fasterdiff import unet as unet_layout  # noqa: E402
from fasterdiff.tools.bench.fidelity import paired_comparison  # noqa: E402
from fasterdiff.plan import ReusePlan, deep_plan_from_keys  # noqa: E402
from fasterdiff.samplers import DETERMINISTIC_SAMPLERS, sampler_timesteps  # noqa: E402
from fasterdiff.tools.standin import PIPELINE_DIR, data, score  # noqa: E402

DEVELOPMENT_SEED = 2000
MIXED_SHARE = 0.3  # mixed depth: the deeper branch for this share of the steps
HORIZON = 0.5  # horizon-limited forecast: the longest extrapolation, in gaps


def depth_plan(unet, keys, num_steps: int, branch_at) -> ReusePlan:
    """Deep reuse at ``keys``; a non-key step ``i`` replays the branch ``branch_at(i)`` (one
    branch everywhere: :func:`fasterdiff.plan.deep_plan_from_keys`)."""
    keys = set(keys)
    return ReusePlan(tuple(
        frozenset() if i in keys else frozenset(unet_layout.deep_modules(unet, branch_at(i))) for i in range(num_steps)
    ))


def horizon_limited(plan: ReusePlan, timesteps: list[float], horizon: float = HORIZON) -> ReusePlan:
    """``plan`` forecasting linearly at the steps whose extrapolation from the last two key
    steps (j, k) reaches at most ``horizon`` gaps, |t - t_k| <= horizon * |t_k - t_j|, and
    replaying at the others."""
    keys = plan.key_steps
    orders = []
    for i in range(plan.num_steps):
        before = [k for k in keys if k <= i]
        if i in keys or len(before) < 2:
            orders.append(0)
            continue
        j, k = (timesteps[s] for s in before[-2:])
        orders.append(1 if abs(timesteps[i] - k) <= horizon * abs(k - j) else 0)
    return ReusePlan(plan.replay, tuple(orders))


def plans(unet, timesteps: list[float]) -> list[tuple[str, str, ReusePlan]]:
    """(family, name, plan) for every plan the study measures."""
    n = len(timesteps)
    out = []
    for interval in (3, 5):
        keys = tuple(range(0, n, interval))
        base = deep_plan_from_keys(unet, keys, n)
        grid = f"grid (interval {interval})"
        out += [
            (grid, f"every {interval}, replay (DeepCache)", base),
            (grid, f"every {interval}, forecast 1", base.with_forecast(1)),
            (grid, f"every {interval}, forecast 1 damped 0.5", base.with_forecast(1, 0.5)),
        ]
        for branch in (1, 2, 3):
            plan = deep_plan_from_keys(unet, keys, n, branch)
            out.append((f"branch depth (interval {interval})", f"every {interval}, branch {branch}", plan))
        cut = MIXED_SHARE * n
        plan = depth_plan(unet, keys, n, lambda i: 1 if i < cut else 0)
        out.append((f"mixed depth (interval {interval})", f"every {interval}, branch 1 then 0", plan))
        early = calibrate.spaced_keys(n, len(keys), calibrate.SPACINGS["early"])
        for spacing, k in (("every", keys), ("early", early)):
            spaced = deep_plan_from_keys(unet, k, n)
            label = f"{spacing} {interval}" if spacing == "every" else f"early {len(k)} keys"
            out.append((f"horizon-limited forecast (interval {interval})", f"{label}, forecast 1 within {HORIZON:g} gap",
                        horizon_limited(spaced, timesteps)))
            if spacing == "early":
                out.append((f"horizon-limited forecast (interval {interval})", f"{label}, forecast 1 damped 0.5 (grid)",
                            spaced.with_forecast(1, 0.5)))
    return out


def hits_of(images: torch.Tensor, classifier, wanted) -> np.ndarray:
    """Per image in [0, 1]: digit, colour and thickness all as the prompt asks."""
    return score.all_right(score.classify(classifier, images * 2 - 1), wanted)


def run(sampler: str, steps: int, pairs: int, progress: bool = True) -> dict:
    pipe = fasterdiff.load_pipeline(PIPELINE_DIR, local_files_only=True)
    prompts, seeds = data.calibration_pairs(pairs, first_seed=DEVELOPMENT_SEED)
    noise = fasterdiff.Settings().noise_injection
    setting = calibrate.Setting(sampler, steps, 7.5, data.IMAGE_SIZE, data.IMAGE_SIZE, prompts, seeds, batch=30)
    stock = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    stock.set_progress_bar_config(disable=True)
    reference = calibrate.sample_pairs(stock, setting)
    classifier = score.load_classifier()
    wanted = [data.parse_prompt(p) for p in prompts]
    stock_hits = hits_of(reference, classifier, wanted)
    timesteps = [float(t) for t in sampler_timesteps(setting.sampler, pipe.scheduler.config, setting.steps)]
    measured = plans(pipe.unet, timesteps)
    flops = calibrate.flops_per_kind(pipe, setting, {r for _, _, p in measured for r in p.replay})
    rows = [{"family": "control", "name": "stock", "key_steps": len(timesteps), "unet_flops": 1.0,
             "unet_calls": len(timesteps), "psnr_pooled": None, "psnr_mean": None, "psnr_min": None,
             "accuracy": float(stock_hits.mean()), "gained": 0, "lost": 0, "p": 1.0}]
    for family, name, plan in tqdm(measured, desc="plans", disable=not progress):
        images = calibrate.sample_pairs(stock, setting, key_steps=plan, parallel=plan.batchable, noise_injection=noise)
        values = calibrate.psnr(images, reference)
        hits = hits_of(images, classifier, wanted)
        rows.append({
            "family": family, "name": name, "key_steps": len(plan.key_steps),
            "unet_flops": round(cost.flops_fraction(plan, flops[frozenset()], flops), 4),
            "unet_calls": len(cost.unet_calls(plan, plan.batchable)),
            "psnr_pooled": round(calibrate.pooled_psnr(values), 2), "psnr_mean": round(float(values.mean()), 2),
            "psnr_min": round(float(values.min()), 2), "accuracy": round(float(hits.mean()), 4),
            **paired_comparison(hits.tolist(), stock_hits.tolist()),
            "key_step_list": list(plan.key_steps), "forecast_per_step": list(plan.forecast),
            "damping_per_step": list(plan.damping),
        })
    return {"sampler": sampler, "steps": steps, "pairs": pairs, "first_seed": DEVELOPMENT_SEED,
            "noise_injection": noise, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = [
        f"# Plan families outside the calibration grid: stand-in, {result['sampler']}-{result['steps']}",
        "",
        f"`{command}`; {result['pairs']} development pairs (seeds {result['first_seed']} on), noise injection "
        f"{result['noise_injection']}, {result['date']}. PSNR against stock's images; accuracy: digit, colour and "
        f"thickness all right (stand-in classifier); gained / lost: pairs against stock, McNemar's p.",
        "",
        "| family | plan | key steps | UNet FLOPs | PSNR pooled / mean (min) dB | accuracy | gained / lost (p) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        psnr = "-" if r["psnr_pooled"] is None else f"{r['psnr_pooled']:.1f} / {r['psnr_mean']:.1f} ({r['psnr_min']:.1f})"
        lines.append(f"| {r['family']} | {r['name']} | {r['key_steps']} | {r['unet_flops']:.3f} | {psnr} | "
                     f"{r['accuracy']:.3f} | +{r['gained']} / -{r['lost']} ({r['p']:.2g}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", choices=DETERMINISTIC_SAMPLERS, default="DDIM")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=90, help="development pairs, 1 to 90")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.steps < 6:
        parser.error("--steps must be at least 6 (the study's plans need DeepCache's interval 5)")
    if not 1 <= args.pairs <= 90:
        parser.error("--pairs must be in [1, 90] (the stand-in's balanced prompts)")
    result = run(args.sampler, args.steps, args.pairs)
    command = f"python benchmarks/plan_study.py --sampler {args.sampler} --steps {args.steps} --pairs {args.pairs}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"plan-study-{args.sampler}-{args.steps}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
