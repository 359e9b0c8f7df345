"""Calibrate reuse plans on a model: measure candidates against stock sampling, keep
the frontier, and let ``key_steps="auto"`` pick from it.

Every candidate samples the same calibration prompts from the same noise as stock
(no noise injection: the comparison is the plan alone); its fidelity is the PSNR of its
images against stock's, its cost the UNet FLOPs (counted on this model) and the GPU
time of :mod:`fasterdiff.cost`'s model. Candidates: encoder reuse and DeepCache-style
deep reuse, each with key steps spaced uniformly or denser towards the start of
sampling (where the paper finds the features change most), at 5 to 17 key steps, each
with forecast order 0, 1 and 2 (deep: 0, 1); DeepCache's own interval 3 as a reference.
Then a greedy search on key-step positions: from the plan ``auto`` would take, drop the
key step whose loss hurts least while the plan stays within tolerance (each round screens
every removal on a third of the pairs and judges the best on the other two thirds; a
refined plan's recorded PSNR is on those held-out pairs). Plans run with the noise
injection they will run with by default (``Setting.noise_injection``), against stock
without it: the recorded PSNR is that of what ``auto`` runs.

The plan file (JSON, ``fasterdiff_plans.json`` beside the weights by default) holds one
entry per sampler and step count: what it was calibrated on, and every candidate with
its fidelity and cost, the frontier marked. ``auto`` takes the fastest plan on the
frontier whose mean PSNR is at least :data:`AUTO_MIN_PSNR`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cost
from .plan import ReusePlan, deep_plan, deep_plan_from_keys, encoder_plan
from .samplers import make_scheduler, sampler_name

log = logging.getLogger("fasterdiff")

PLANS_FILE_NAME = "fasterdiff_plans.json"
PLANS_FORMAT_VERSION = 1
# auto: the fastest calibrated plan whose images are at least this close to stock's
# (mean PSNR over the calibration pairs). 40 dB: differences invisible side by side.
AUTO_MIN_PSNR = 40.0
AUTO_FALLBACK = "paper"  # key_steps for a sampler/step count that was not calibrated
KEY_COUNTS = (5, 7, 10, 13, 17)
SPACINGS = {"uniform": 1.0, "early": 1.6}  # exponent of the key-step spacing
REFINE_ROUNDS = 3  # greedy key-step removals tried after the grid
CALIBRATION_PROMPTS = Path(__file__).with_name("calibration_prompts.txt")


def spaced_keys(num_steps: int, count: int, exponent: float) -> tuple[int, ...]:
    """``count`` key steps at ``(N - 1) * (j / count) ** exponent``: 1 = uniform, > 1 denser
    at the start, < 1 denser at the end; always step 0."""
    keys = {0}
    for j in range(1, count):
        keys.add(min(num_steps - 1, round(num_steps * (j / count) ** exponent)))
    return tuple(sorted(keys))


def candidates(unet, num_steps: int) -> list[tuple[str, ReusePlan, str]]:
    """(name, plan, reuse kind) for every plan calibration measures."""
    out, seen = [], set()
    for reuse in ("encoder", "deep"):
        for count in KEY_COUNTS:
            if count >= num_steps:
                continue
            for spacing, exponent in SPACINGS.items():
                keys = spaced_keys(num_steps, count, exponent)
                if (reuse, keys) in seen:
                    continue
                seen.add((reuse, keys))
                if reuse == "encoder":
                    base = encoder_plan(unet, list(keys), num_steps)
                else:
                    base = deep_plan_from_keys(unet, keys, num_steps)
                for order in (0, 1, 2) if reuse == "encoder" else (0, 1):
                    name = f"{reuse} {len(keys)} keys {spacing}, forecast {order}"
                    out.append((name, base.with_forecast(order), reuse))
    if num_steps > 3:
        out.append((DEEPCACHE_3, deep_plan(unet, 3, num_steps), "deep"))
    return out


DEEPCACHE_3 = "DeepCache interval 3 (deep, every 3rd step)"


def _same_family(plan: ReusePlan, reuse: str, unet, keys: tuple[int, ...]) -> ReusePlan:
    """``plan``'s kind of reuse and forecast order at other key steps."""
    num_steps = plan.num_steps
    base = encoder_plan(unet, list(keys), num_steps) if reuse == "encoder" else deep_plan_from_keys(unet, keys, num_steps)
    return base.with_forecast(plan.forecast[-1])


@dataclass
class Setting:
    """What a calibration samples."""

    sampler: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    prompts: list[str]
    seeds: list[int]
    batch: int = 16  # prompt x seed pairs per sampling call
    noise_injection: float | None = None  # what the plans run with (None: the library's default)


def _sample(fast, setting: Setting, **kw) -> torch.Tensor:
    """Images in [0, 1] of every calibration pair, in order."""
    images = []
    pairs = list(zip(setting.prompts, setting.seeds))
    for start in range(0, len(pairs), setting.batch):
        chunk = pairs[start : start + setting.batch]
        out = fast(
            [p for p, _ in chunk],
            height=setting.height,
            width=setting.width,
            num_inference_steps=setting.steps,
            guidance_scale=setting.guidance_scale,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            output_type="pt",
            sampler=setting.sampler,
            **kw,
        )
        images.append(out.images.float().cpu())
    return torch.cat(images)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1.0 / mse)).numpy()


def frontier(rows: list[dict], speed_key: str = "gpu_seconds_1_image") -> list[dict]:
    """Rows no other row beats on both speed and mean PSNR."""
    return [
        r
        for r in rows
        if not any(
            (o[speed_key] <= r[speed_key] and o["psnr_mean"] >= r["psnr_mean"])
            and (o[speed_key] < r[speed_key] or o["psnr_mean"] > r["psnr_mean"])
            for o in rows
        )
    ]


def calibrate(pipe, setting: Setting, weights: str = "", progress: bool = True) -> dict:
    """Measure every candidate plan against stock; the plan-file entry for ``setting``."""
    from .pipeline import Settings, accelerate

    if setting.noise_injection is None:
        setting = dataclasses.replace(setting, noise_injection=Settings().noise_injection)
    stock = accelerate(pipe, key_steps="off", noise_injection=0)
    stock.set_progress_bar_config(disable=True)
    reference = _sample(stock, setting)
    num_steps = len(_scheduler_timesteps(pipe, setting))
    plans = candidates(pipe.unet, num_steps)
    flops = _flops_per_kind(pipe, setting, {p.replay[-1] for _, p, _ in plans} | {frozenset()})
    full = flops[frozenset()]

    def row(name: str, plan: ReusePlan, reuse: str, values: np.ndarray) -> dict:
        return {
            "name": name,
            "reuse": reuse,
            "key_steps": list(plan.key_steps),
            "forecast": plan.forecast[-1],
            "psnr_mean": round(float(np.mean(values)), 3),
            "psnr_min": round(float(np.min(values)), 3),
            "unet_flops": round(cost.flops_fraction(plan, full, flops), 4),
            "unet_calls": len(cost.unet_calls(plan, plan.batchable)),
            "gpu_seconds_1_image": round(cost.gpu_seconds(plan, plan.batchable, 1, deep=reuse == "deep"), 4),
            "gpu_seconds_4_images": round(cost.gpu_seconds(plan, plan.batchable, 4, deep=reuse == "deep"), 4),
            "plan": plan.to_json(),
        }

    def measure(plan: ReusePlan, on: Setting = setting, against: torch.Tensor = reference) -> np.ndarray:
        images = _sample(stock, on, key_steps=plan, parallel=plan.batchable, noise_injection=setting.noise_injection)
        return psnr(images, against)

    rows = []
    with tqdm(total=len(plans), desc="calibrating plans", unit="plan", disable=not progress) as bar:
        for name, plan, reuse in plans:
            rows.append(row(name, plan, reuse, measure(plan)))
            bar.update()
        rows += _refine(rows, pipe.unet, setting, reference, measure, row, bar)
    on_frontier = {id(r) for r in frontier(rows)}
    for r in rows:
        r["frontier"] = id(r) in on_frontier
        if not r["frontier"]:  # only frontier plans can be chosen: the rest keep their key steps
            del r["plan"]
    stock_plan = encoder_plan(pipe.unet, "off", num_steps)
    return {
        "sampler": setting.sampler,
        "steps": setting.steps,
        "unet_evaluations": num_steps,
        "calibrated_on": {
            "weights": weights,
            "guidance_scale": setting.guidance_scale,
            "noise_injection": setting.noise_injection,
            "height": setting.height,
            "width": setting.width,
            "pairs": len(setting.prompts),
            "prompts": sorted(set(setting.prompts)),
            "seeds": sorted(set(setting.seeds)),
            "date": datetime.date.today().isoformat(),
            "gpu_model": cost.GPU_MODEL_SOURCE,
        },
        "stock": {
            "gpu_seconds_1_image": round(cost.gpu_seconds(stock_plan, False, 1), 4),
            "gpu_seconds_4_images": round(cost.gpu_seconds(stock_plan, False, 4), 4),
        },
        "auto_min_psnr": AUTO_MIN_PSNR,
        "plans": sorted(rows, key=lambda r: r["gpu_seconds_1_image"]),
    }


def _refine(rows: list[dict], unet, setting: Setting, reference: torch.Tensor, measure, row, bar) -> list[dict]:
    """Greedy key-step removal from the plan auto would take (see the module doc)."""
    good = [r for r in rows if r["psnr_mean"] >= AUTO_MIN_PSNR]
    if not good:
        return []
    start = min(good, key=lambda r: r["gpu_seconds_1_image"])
    plan, reuse = ReusePlan.from_json(start["plan"]), start["reuse"]
    # removals are screened on a third of the pairs and judged on the other two thirds, so that
    # choosing the best of many removals does not flatter the plan it keeps
    few = list(range(0, len(setting.prompts), 3))
    rest = [i for i in range(len(setting.prompts)) if i not in few]
    screen, held_out = (
        dataclasses.replace(setting, prompts=[setting.prompts[i] for i in idx], seeds=[setting.seeds[i] for i in idx])
        for idx in (few, rest)
    )
    out = []
    for _ in range(REFINE_ROUNDS):
        keys = plan.key_steps
        if len(keys) <= 2:
            break
        trials = [_same_family(plan, reuse, unet, tuple(k for k in keys if k != drop)) for drop in keys[1:]]
        bar.total += len(trials) + 1
        scores = []
        for trial in trials:
            scores.append(float(np.mean(measure(trial, screen, reference[few]))))
            bar.update()
        best = trials[int(np.argmax(scores))]
        values = measure(best, held_out, reference[rest])
        bar.update()
        if float(np.mean(values)) < AUTO_MIN_PSNR:
            break
        plan = best
        name = f"{reuse} {len(plan.key_steps)} keys refined, forecast {plan.forecast[-1]}"
        out.append(row(name, plan, reuse, values))
    return out


def _scheduler_timesteps(pipe, setting: Setting) -> torch.Tensor:
    scheduler = make_scheduler(setting.sampler, pipe.scheduler.config)
    scheduler.set_timesteps(setting.steps)
    return scheduler.timesteps


@torch.no_grad()
def _flops_per_kind(pipe, setting: Setting, kinds: set[frozenset]) -> dict[frozenset, int]:
    """FLOPs of one guided UNet evaluation of each kind, at the calibration size."""
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, setting.height // scale, setting.width // scale, dtype=unet.dtype, device=unet.device)
    text, _ = pipe.encode_prompt(setting.prompts[0], unet.device, 1, False)
    text = text.repeat(2, 1, 1)
    return {k: cost.step_flops(unet, k, sample, 500, text) for k in kinds}


CALIBRATION_SEED = 1000  # calibration pairs use seeds from here on: benchmarks score seeds 0, 1, 2, ...


def standin_pairs(count: int = 32) -> tuple[list[str], list[int]]:
    """The stand-in's calibration pairs: ``count`` prompts spread over every digit, colour
    and thickness, each with its own seed from :data:`CALIBRATION_SEED` (disjoint from the
    fidelity benchmark's seeds)."""
    from .standin import data

    combos = [a for a, _ in data.benchmark_prompts(1)]
    step = len(combos) / count
    prompts = [combos[int(i * step)].prompt for i in range(count)]
    return prompts, [CALIBRATION_SEED + i for i in range(count)]


def sd_pairs(count: int = 32) -> tuple[list[str], list[int]]:
    """SD 1.5's calibration pairs: the prompts of calibration_prompts.txt, one seed each."""
    prompts = [p for p in CALIBRATION_PROMPTS.read_text().splitlines() if p.strip()][:count]
    return prompts, [CALIBRATION_SEED + i for i in range(len(prompts))]


# -- the plan file and auto -------------------------------------------------------------


def entry_key(sampler: str, steps: int) -> str:
    return f"{sampler}-{steps}"


def write_entry(path: str | os.PathLike, entry: dict) -> None:
    """Add (or replace) ``entry`` in the plan file at ``path``."""
    path = Path(path)
    data = read_plans(path) if path.is_file() else {"version": PLANS_FORMAT_VERSION, "entries": {}}
    data["entries"][entry_key(entry["sampler"], entry["steps"])] = entry
    path.write_text(json.dumps(data, indent=1) + "\n")


def read_plans(path: str | os.PathLike) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("version") != PLANS_FORMAT_VERSION or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: not a fasterdiff plan file of version {PLANS_FORMAT_VERSION}")
    return data


def default_plans_file(pipe) -> Path | None:
    """``fasterdiff_plans.json`` beside the weights ``pipe`` was loaded from, if any."""
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if not source or not Path(source).is_dir():
        return None
    return Path(source) / PLANS_FILE_NAME


@dataclass
class AutoChoice:
    key_steps: object  # a ReusePlan, or the fallback's key_steps
    reuse: str
    reason: str


def choose(plans_file: str | os.PathLike | None, scheduler, num_inference_steps: int, unet) -> AutoChoice:
    """The plan ``auto`` runs for this scheduler and step count, and why."""
    name = sampler_name(scheduler)
    fallback = AutoChoice(AUTO_FALLBACK, "encoder", "")
    if plans_file is None or not Path(plans_file).is_file():
        fallback.reason = f"auto: no plan file{f' at {plans_file}' if plans_file else ''}; running the paper's key steps"
        return fallback
    entry = read_plans(plans_file)["entries"].get(entry_key(name, num_inference_steps)) if name else None
    if entry is None:
        fallback.reason = (
            f"auto: {plans_file} has no calibration for {name or type(scheduler).__name__} with "
            f"{num_inference_steps} steps; running the paper's key steps"
        )
        return fallback
    good = [r for r in entry["plans"] if r["frontier"] and r["psnr_mean"] >= entry["auto_min_psnr"]]
    if not good:
        return AutoChoice("off", "encoder", f"auto: no calibrated plan reaches {entry['auto_min_psnr']} dB; running stock")
    best = min(good, key=lambda r: r["gpu_seconds_1_image"])
    plan = ReusePlan.from_json(best["plan"])
    plan.check_modules(unet)
    speedup = entry["stock"]["gpu_seconds_1_image"] / best["gpu_seconds_1_image"]
    return AutoChoice(
        plan,
        best["reuse"],
        f"auto: '{best['name']}' from {plans_file}: {best['psnr_mean']:.1f} dB against stock in calibration "
        f"(at least {entry['auto_min_psnr']:.0f}; noise injection {entry['calibrated_on'].get('noise_injection', 0)}), "
        f"modelled GPU speedup {speedup:.2f}x",
    )



def markdown(entry: dict) -> str:
    """The entry's frontier as a table, fastest first."""
    stock = entry["stock"]["gpu_seconds_1_image"]
    lines = [
        f"Calibration, {entry['sampler']}-{entry['steps']}: {entry['calibrated_on']['pairs']} prompt x seed pairs, "
        f"guidance {entry['calibrated_on']['guidance_scale']}, {entry['calibrated_on']['width']}x{entry['calibrated_on']['height']}, "
        f"plans with noise injection {entry['calibrated_on'].get('noise_injection', 0)}; "
        f"{len(entry['plans'])} plans measured; below, the frontier and DeepCache interval 3 for reference "
        f"(auto: the fastest with mean PSNR >= {entry['auto_min_psnr']} dB; 'refined': found by the greedy key-step search).",
        "",
        "| plan | key steps | PSNR vs stock, mean (min) dB | UNet FLOPs | UNet calls | modelled GPU speedup, 1 / 4 images |",
        "|---|---|---|---|---|---|",
    ]
    for r in entry["plans"]:
        if r["frontier"] or r["name"] == DEEPCACHE_3:
            lines.append(
                f"| {r['name']} | {len(r['key_steps'])} | {r['psnr_mean']:.1f} ({r['psnr_min']:.1f}) | {r['unet_flops']:.2f} "
                f"| {r['unet_calls']} | {stock / r['gpu_seconds_1_image']:.2f}x / "
                f"{entry['stock']['gpu_seconds_4_images'] / r['gpu_seconds_4_images']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(entry: dict, path: str | os.PathLike) -> None:
    """Every measured plan: modelled GPU speedup against PSNR, the frontier joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stock = entry["stock"]["gpu_seconds_1_image"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for reuse, marker in (("encoder", "o"), ("deep", "s")):
        for order, colour in ((0, "tab:blue"), (1, "tab:orange"), (2, "tab:green")):
            rows = [r for r in entry["plans"] if r["reuse"] == reuse and r["forecast"] == order]
            if rows:
                ax.scatter([stock / r["gpu_seconds_1_image"] for r in rows], [r["psnr_mean"] for r in rows],
                           marker=marker, color=colour, alpha=0.7, label=f"{reuse}, forecast {order}")
    front = sorted((r for r in entry["plans"] if r["frontier"]), key=lambda r: r["gpu_seconds_1_image"])
    ax.plot([stock / r["gpu_seconds_1_image"] for r in front], [r["psnr_mean"] for r in front], "k-", lw=1, label="frontier")
    ax.axhline(entry["auto_min_psnr"], color="grey", ls="--", lw=1, label="auto's tolerance")
    ax.set_xlabel("modelled GPU speedup vs stock, one image (calls-and-time model, fasterdiff/cost.py)")
    ax.set_ylabel("PSNR vs stock's images, dB")
    ax.set_title(f"calibration, {entry['sampler']}-{entry['steps']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
