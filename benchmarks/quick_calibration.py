"""Quick calibration against the full one on the trained stand-in: the plan each level picks,
scored on the same pairs, and what each search sampled.

    python benchmarks/quick_calibration.py [--runs DDIM-50 DPM-Solver++-20] [--pairs 24]
        [--held-out 24] [--out benchmarks/results] [--full-from JSON] [--stages 1,2,4,8,12,24]
        [--drop DB] [--confident-from N] [--screen N] [--natural-order] [--ties]

Per sampler and step count: the full calibration (every candidate on all ``--pairs`` pairs)
and the quick one (:func:`fasterdiff.calibrate.calibrate` with ``mode="quick"``, on the same
pairs; its knobs can be set to measure variants), with the library's default noise injection. Then each level's pick of
both is sampled on the full calibration's pairs and on ``--held-out`` further pairs (other
prompts, other seeds) and scored by pooled PSNR against stock on them; speed is the GPU-time
model's for one image (the one calibration ranks by). Cost: the pairs each search sampled
(stock's included), times the sampler's UNet evaluations per image; every evaluation counts
one, reused or not, at the calibration's size. Writes quick-calibration-standin.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff import calibrate  # noqa: E402
from fasterdiff.metrics import pooled_psnr  # noqa: E402
from fasterdiff.plan import ReusePlan  # noqa: E402
from fasterdiff.tools.standin import PIPELINE_DIR, data, require  # noqa: E402


def picks(entry: dict) -> dict[str, dict | None]:
    rows = {r["name"]: r for r in entry["plans"]}
    return {level: rows.get(bar["plan"]) for level, bar in entry["levels"].items()}


def run(sampler: str, steps: int, pairs: int, held_out: int, full: dict | None = None) -> dict:
    pipe = fasterdiff.load_pipeline(PIPELINE_DIR, device="cpu", local_files_only=True)
    prompts, seeds = data.calibration_pairs(pairs + held_out)
    setting = calibrate.Setting(sampler, steps, 7.5, data.IMAGE_SIZE, data.IMAGE_SIZE, prompts[:pairs], seeds[:pairs], batch=pairs)
    out = {"sampler": sampler, "steps": steps}
    if full is not None:
        out["full"], out["full_seconds"] = full["full"], full["full_seconds"]
    for mode in ("full", "quick"):
        if mode in out:
            continue
        start = time.perf_counter()
        out[mode] = calibrate.calibrate(pipe, setting, weights=str(PIPELINE_DIR), mode=mode)
        out[f"{mode}_seconds"] = round(time.perf_counter() - start, 1)
    stock = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    stock.set_progress_bar_config(disable=True)
    scored = {}
    for name, on in (("calibration pairs", setting),
                     ("held-out pairs", calibrate.Setting(sampler, steps, 7.5, data.IMAGE_SIZE, data.IMAGE_SIZE,
                                                          prompts[pairs:], seeds[pairs:], batch=held_out))):
        if not on.prompts:
            continue
        trials = calibrate._Trials(stock, calibrate.dataclasses.replace(on, noise_injection=out["full"]["calibrated_on"]["noise_injection"]))
        scored[name] = {}
        for mode in ("full", "quick"):
            for level, row in picks(out[mode]).items():
                value = None if row is None else round(pooled_psnr(trials.psnr(ReusePlan.from_json(row["plan"]))), 3)
                scored[name][f"{mode} {level}"] = value
    out["scored"] = scored
    return out


def markdown(results: list[dict], command: str) -> str:
    lines = [
        "Quick calibration against the full one, trained stand-in (32 px), CPU. Command: `" + command + "`.",
        "",
        "Each level's pick, pooled PSNR against stock on the full calibration's pairs and on held-out pairs "
        "(other prompts and seeds), and modelled GPU speedup for one image (what calibration ranks by).",
        "",
    ]
    for r in results:
        full, quick = r["full"], r["quick"]
        evals = {m: r[m]["search"]["sampled_unet_evaluations"] for m in ("full", "quick")}
        lines += [
            f"### {r['sampler']}-{r['steps']}",
            "",
            f"Sampling: full {r['full']['search']['pair_samples']} images ({evals['full']} UNet evaluations, "
            f"{r['full_seconds']:.0f} s here), quick {r['quick']['search']['pair_samples']} images ({evals['quick']} "
            f"evaluations, {r['quick_seconds']:.0f} s): **{evals['quick'] / evals['full']:.3f}** of the full cost "
            f"(1/{evals['full'] / evals['quick']:.1f}).",
            "",
            "| level | full: plan | speedup | PSNR calib / held-out | quick: plan | speedup | PSNR calib / held-out | quick - full, dB (calib / held-out) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        stock = full["stock"]["gpu_seconds_1_image"]
        fp, qp = picks(full), picks(quick)
        for level in full["levels"]:
            cells = []
            values = {}
            for mode, row in (("full", fp[level]), ("quick", qp.get(level))):
                if row is None:
                    cells += ["stock", "1.00x", "-"]
                    continue
                v = [r["scored"][s][f"{mode} {level}"] for s in r["scored"]]
                values[mode] = v
                cells += [row["name"], f"{stock / row['gpu_seconds_1_image']:.2f}x", " / ".join(f"{x:.1f}" for x in v)]
            diff = " / ".join(f"{q - f:+.1f}" for q, f in zip(values.get("quick", []), values.get("full", [])))
            lines.append(f"| {level} | " + " | ".join(cells) + f" | {diff or '-'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["DDIM-50", "DPM-Solver++-20"], help="SAMPLER-STEPS")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=24)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--full-from", help="take the full calibrations from this earlier result JSON (same pairs) instead of running them")
    parser.add_argument("--stages", help="quick mode's race stages, e.g. 2,8,24 (default: fasterdiff.calibrate.QUICK_STAGES)")
    parser.add_argument("--drop", type=float, help="dB below a level's bar that drops a raced plan (default: QUICK_DROP_DB)")
    parser.add_argument("--confident-from", type=int, help="pairs from which a raced plan must meet its level (default: QUICK_CONFIDENT_FROM)")
    parser.add_argument("--screen", type=int, help="hardest pairs each key-step removal is screened on (default: QUICK_SCREEN)")
    parser.add_argument("--natural-order", action="store_true", help="race on the pairs in their order, not hardest first")
    parser.add_argument("--ties", action="store_true", help="race every candidate as fast as a level's first pick, keep the most faithful (QUICK_TIES)")
    args = parser.parse_args()
    require()
    if args.stages:
        calibrate.QUICK_STAGES = tuple(int(n) for n in args.stages.split(","))
    for name, value in (("QUICK_DROP_DB", args.drop), ("QUICK_CONFIDENT_FROM", args.confident_from), ("QUICK_SCREEN", args.screen)):
        if value is not None:
            setattr(calibrate, name, value)
    if args.ties:
        calibrate.QUICK_TIES = True
    if args.natural_order:
        calibrate._hardest_first = lambda levels: list(range(len(next(iter(levels.reference_values.values())))))
    earlier = {}
    if args.full_from:
        earlier = {f"{r['sampler']}-{r['steps']}": r for r in json.loads(Path(args.full_from).read_text())}
    results = []
    for spec in args.runs:
        sampler, steps = spec.rsplit("-", 1)
        results.append(run(sampler, int(steps), args.pairs, args.held_out, earlier.get(spec)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quick-calibration-standin.json").write_text(json.dumps(results, indent=1) + "\n")
    command = "python benchmarks/quick_calibration.py " + " ".join(sys.argv[1:])
    text = markdown(results, command.strip())
    (out / "quick-calibration-standin.md").write_text(text)
    print(text)
    print(f"wrote {out / 'quick-calibration-standin.md'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
