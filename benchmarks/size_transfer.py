"""Does a calibration at a smaller image size rank the plans as one at the size they will run at?
The trained stand-in (trained at 32 px) calibrated in full at its own size and at twice it, on
the same pairs: rank agreement of the candidates' fidelity, and what each level's pick at the
small size gives at the large one against the large size's own pick.

    python benchmarks/size_transfer.py [--runs DDIM-50 DPM-Solver++-20] [--pairs 12]
        [--sizes 32 64] [--out benchmarks/results]

Fidelity is pooled PSNR against stock at each size (the calibration's own measure). Rank
agreement: Spearman's rho over the grid's candidates (the greedy removals differ between the
sizes, so they are left out), and over the candidates that meet DeepCache interval 5 at the
large size, where the picks are made. A small-size pick that is not a grid plan is sampled at
the large size on the same pairs. Cost: a calibration's sampling grows with the pixels (4x
from 32 to 64 px). The 32 px stand-in cannot go below its size (its latent is 8x8 and its UNet
halves it three times), so the larger size here is off the size it was trained at: a caveat on
what carries to a model sampled at both sizes. Writes size-transfer-standin.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff import calibrate  # noqa: E402
from fasterdiff.metrics import pooled_psnr  # noqa: E402
from fasterdiff.plan import ReusePlan  # noqa: E402
from fasterdiff.tools.standin import PIPELINE_DIR, data, require  # noqa: E402


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):
            same = x == value
            r[same] = r[same].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def run(sampler: str, steps: int, pairs: int, sizes: tuple[int, int]) -> dict:
    pipe = fasterdiff.load_pipeline(PIPELINE_DIR, device="cpu", local_files_only=True)
    prompts, seeds = data.calibration_pairs(pairs)
    settings = {size: calibrate.Setting(sampler, steps, 7.5, size, size, prompts, seeds, batch=pairs) for size in sizes}
    out = {"sampler": sampler, "steps": steps, "pairs": pairs, "sizes": list(sizes), "entries": {}, "seconds": {}}
    for size in sizes:
        start = time.perf_counter()
        out["entries"][str(size)] = calibrate.calibrate(pipe, settings[size], weights=str(PIPELINE_DIR), mode="full")
        out["seconds"][str(size)] = round(time.perf_counter() - start, 1)
    small, large = (out["entries"][str(s)] for s in sizes)
    grid = {name for name, _, _ in calibrate.candidates(pipe.unet, small["unet_evaluations"])}
    rows = [{r["name"]: r for r in e["plans"] if r["name"] in grid} for e in (small, large)]
    names = sorted(rows[0])
    out["grid_plans"] = len(names)
    out["spearman_grid"] = round(spearman([rows[0][n]["psnr_pooled"] for n in names], [rows[1][n]["psnr_pooled"] for n in names]), 3)
    good = [n for n in names if "deepcache-5" in rows[1][n]["meets"]]
    out["spearman_meeting_deepcache_5"] = round(spearman([rows[0][n]["psnr_pooled"] for n in good], [rows[1][n]["psnr_pooled"] for n in good]), 3) if len(good) > 2 else None
    out["meeting_deepcache_5"] = len(good)
    # each level's small-size pick, at the large size
    stock = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    stock.set_progress_bar_config(disable=True)
    trials = calibrate._Trials(stock, calibrate.dataclasses.replace(settings[sizes[1]], noise_injection=large["calibrated_on"]["noise_injection"]))
    large_rows = {r["name"]: r for r in large["plans"]}
    small_rows = {r["name"]: r for r in small["plans"]}
    levels = {}
    for level in large["levels"]:
        mine, theirs = small["levels"][level]["plan"], large["levels"][level]["plan"]
        cell = {"small_pick": mine, "large_pick": theirs}
        for key, name, source in (("small_pick", mine, small_rows), ("large_pick", theirs, large_rows)):
            if name is None:
                continue
            row = source[name]
            value = large_rows[name]["psnr_pooled"] if name in large_rows and name in grid else round(pooled_psnr(trials.psnr(ReusePlan.from_json(row["plan"]))), 3)
            cell[f"{key}_psnr_at_large"] = value
            cell[f"{key}_speedup"] = round(large["stock"]["gpu_seconds_1_image"] / row["gpu_seconds_1_image"], 2)
        cell["bar_at_large"] = large["levels"][level]["psnr_pooled"]
        levels[level] = cell
    out["levels"] = levels
    return out


def markdown(results: list[dict], command: str) -> str:
    lines = [
        f"Calibration at a smaller size against the size a plan runs at, trained stand-in, CPU ({torch.get_num_threads()} "
        f"threads), {datetime.date.today().isoformat()}. Command: `{command}`.",
        "",
    ]
    for r in results:
        small, large = r["sizes"]
        lines += [
            f"### {r['sampler']}-{r['steps']}, {r['pairs']} pairs",
            "",
            f"Full calibrations: {small} px {r['seconds'][str(small)]:.0f} s, {large} px {r['seconds'][str(large)]:.0f} s here. "
            f"Spearman's rho of the grid's fidelity between the sizes: **{r['spearman_grid']:.2f}** "
            f"({r['grid_plans']} plans); over the {r['meeting_deepcache_5']} candidates that meet "
            f"DeepCache interval 5 at {large} px: {r['spearman_meeting_deepcache_5'] if r['spearman_meeting_deepcache_5'] is not None else '-'}.",
            "",
            f"| level | bar at {large} px | pick at {small} px | speedup | PSNR at {large} px | pick at {large} px | speedup | PSNR at {large} px |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for level, c in r["levels"].items():
            cells = []
            for key in ("small_pick", "large_pick"):
                if c.get(key) is None:
                    cells += ["stock", "1.00x", "-"]
                else:
                    cells += [c[key], f"{c[f'{key}_speedup']:.2f}x", f"{c[f'{key}_psnr_at_large']:.1f}"]
            lines.append(f"| {level} | {c['bar_at_large']:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["DDIM-50", "DPM-Solver++-20"], help="SAMPLER-STEPS")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--sizes", type=int, nargs=2, default=[data.IMAGE_SIZE, 2 * data.IMAGE_SIZE], metavar=("SMALL", "LARGE"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.pairs < 3:
        parser.error("--pairs: at least 3")
    if not 0 < args.sizes[0] < args.sizes[1] or any(s % 32 for s in args.sizes):
        parser.error("--sizes: two multiples of 32, the smaller first")
    require()
    results = []
    for spec in args.runs:
        sampler, steps = spec.rsplit("-", 1)
        results.append(run(sampler, int(steps), args.pairs, tuple(args.sizes)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "size-transfer-standin.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results, ("python benchmarks/size_transfer.py " + " ".join(sys.argv[1:])).strip())
    (out / "size-transfer-standin.md").write_text(text)
    print(text)
    print(f"wrote {out / 'size-transfer-standin.md'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
