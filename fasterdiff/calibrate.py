"""Calibrate reuse plans on a model: measure candidates against stock sampling, keep
the frontier, and let ``key_steps="auto"`` pick from it.

Every candidate samples the same calibration prompts from the same noise as stock; its
fidelity is the PSNR of its images against stock's, its cost the UNet FLOPs (counted on
this model) and the GPU time of :mod:`fasterdiff.cost`'s model. Plans run with the noise
injection they will run with by default (``Setting.noise_injection``), against stock
without it: the recorded PSNR is that of what ``auto`` runs.

Fidelity is the *pooled* PSNR: that of the mean squared error over all pairs. A plan that
is close on most images but wrecks a few (a forecast over a long gap can) scores low,
where the mean of per-image PSNRs would hide it; such plans lose prompt accuracy.

Candidates: encoder reuse and DeepCache-style deep reuse, each with key steps spaced
uniformly or denser towards the start of sampling (where the paper finds the features
change most), at 5 to 17 key steps, each replaying (forecast 0) or forecasting linearly
(1, also damped by half); and DeepCache itself at intervals 3 and 5 as references. Then a
greedy search on key-step positions: from the fastest plan that meets a level (below),
drop the key step whose loss hurts least while the plan still meets it (each round screens every removal on a third of the pairs and
judges the best on the other two thirds, against the reference on those same pairs; a
refined plan's recorded PSNR is on those held-out pairs).

Levels: what a plan must match to be chosen, measured on this model and sampler.
``auto`` (the library's default): at least DeepCache interval 3's fidelity and at least
:data:`AUTO_MIN_PSNR`; ``deepcache-3`` and ``deepcache-5``: at least DeepCache's at that
interval. A plan meets a level when it does so in :data:`LEVEL_CONFIDENCE` of bootstrap
resamples of the pairs (paired: plan and reference resampled together). Each level runs the
fastest plan that meets it (the plan file names it): ``key_steps="auto"`` the ``auto``
level's, ``key_steps="auto-fast"`` the ``deepcache-5`` level's.

The plan file (JSON, ``fasterdiff_plans.json`` beside the weights by default) holds one
entry per sampler and step count: what it was calibrated on, every candidate with its
fidelity and cost, the frontier marked, and the plan each level runs.
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
PLANS_FORMAT_VERSION = 2
# auto's floor: pooled PSNR against stock's images over the calibration pairs (an RMS
# error under 1.8% of the range), whatever DeepCache reaches on the model
AUTO_MIN_PSNR = 35.0
AUTO_FALLBACK = "paper"  # key_steps for a sampler/step count that was not calibrated
KEY_COUNTS = (5, 7, 10, 13, 17)
SPACINGS = {"uniform": 1.0, "early": 1.6}  # exponent of the key-step spacing
# (order, damping) tried per plan; quadratic forecasts (order 2) never reached a frontier on
# the stand-in (both samplers), so the grid leaves them out
FORECASTS = {"encoder": ((0, 1.0), (1, 1.0), (1, 0.5)), "deep": ((0, 1.0), (1, 1.0), (1, 0.5))}
REFINE_ROUNDS = 3  # greedy key-step removals tried after the grid, per level
CALIBRATION_PROMPTS = Path(__file__).with_name("calibration_prompts.txt")
# a plan meets a level when it reaches the level's bar in this share of bootstrap resamples
# of the calibration pairs: being ahead of the reference by less than the pairs' noise is not
# enough (the plan chosen would fall behind it on other pairs)
LEVEL_CONFIDENCE = 0.8
BOOTSTRAP_RESAMPLES = 2000
DEEPCACHE = {3: "DeepCache interval 3 (deep, every 3rd step)", 5: "DeepCache interval 5 (deep, every 5th step)"}
DEEPCACHE_3 = DEEPCACHE[3]
# level -> (the reference plan it must match, whether AUTO_MIN_PSNR applies too)
LEVELS = {"auto": (DEEPCACHE[3], True), "deepcache-3": (DEEPCACHE[3], False), "deepcache-5": (DEEPCACHE[5], False)}
# the key_steps values that run a calibrated level: the default, and a faster one
AUTO_KEY_STEPS = {"auto": "auto", "auto-fast": "deepcache-5"}


def spaced_keys(num_steps: int, count: int, exponent: float) -> tuple[int, ...]:
    """``count`` key steps at ``(N - 1) * (j / count) ** exponent``: 1 = uniform, > 1 denser
    at the start, < 1 denser at the end; always step 0."""
    keys = {0}
    for j in range(1, count):
        keys.add(min(num_steps - 1, round(num_steps * (j / count) ** exponent)))
    return tuple(sorted(keys))


def _forecast_name(order: int, damping: float) -> str:
    return f"forecast {order}" + ("" if damping == 1.0 else f" damped {damping:g}")


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
                for order, damping in FORECASTS[reuse]:
                    name = f"{reuse} {len(keys)} keys {spacing}, {_forecast_name(order, damping)}"
                    out.append((name, base.with_forecast(order, damping), reuse))
    for interval, name in DEEPCACHE.items():
        if num_steps > interval:
            out.append((name, deep_plan(unet, interval, num_steps), "deep"))
    return out


def _same_family(plan: ReusePlan, reuse: str, unet, keys: tuple[int, ...]) -> ReusePlan:
    """``plan``'s kind of reuse and forecast at other key steps."""
    num_steps = plan.num_steps
    base = encoder_plan(unet, list(keys), num_steps) if reuse == "encoder" else deep_plan_from_keys(unet, keys, num_steps)
    return base.with_forecast(plan.forecast[-1], plan.damping[-1])


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
    """Per image, in dB (images in [0, 1])."""
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1.0 / mse)).numpy()


def pooled_psnr(values: np.ndarray) -> float:
    """The PSNR of the mean squared error over all images, from their PSNRs: the worst
    images weigh most (one image at 15 dB among 40 dB ones costs several dB)."""
    return float(-10 * np.log10(np.mean(10 ** (-np.asarray(values, dtype=np.float64) / 10))))


def frontier(rows: list[dict], speed_key: str = "gpu_seconds_1_image") -> list[dict]:
    """Rows no other row beats on both speed and pooled PSNR."""
    return [
        r
        for r in rows
        if not any(
            (o[speed_key] <= r[speed_key] and o["psnr_pooled"] >= r["psnr_pooled"])
            and (o[speed_key] < r[speed_key] or o["psnr_pooled"] > r["psnr_pooled"])
            for o in rows
        )
    ]


class _Levels:
    """Each level's bar on any subset of the calibration pairs (see the module doc)."""

    def __init__(self, reference_values: dict[str, np.ndarray]):
        self.reference_values = reference_values  # reference plan name -> per-pair PSNR

    def names(self) -> list[str]:
        return [level for level, (ref, _) in LEVELS.items() if ref in self.reference_values]

    def bar(self, level: str, pairs=slice(None)) -> float:
        reference, floored = LEVELS[level]
        value = pooled_psnr(self.reference_values[reference][pairs])
        return max(value, AUTO_MIN_PSNR) if floored else value

    def confidence(self, level: str, values: np.ndarray, pairs=slice(None)) -> float:
        """The share of bootstrap resamples of the pairs in which a plan with these per-pair
        PSNRs reaches the level's bar (the reference resampled with it, pair for pair)."""
        reference, floored = LEVELS[level]
        ref = np.asarray(self.reference_values[reference][pairs], dtype=np.float64)
        index = np.random.default_rng(0).integers(0, len(ref), size=(BOOTSTRAP_RESAMPLES, len(ref)))
        plan_mse, ref_mse = (10 ** (-np.asarray(v, dtype=np.float64) / 10) for v in (values, ref))
        plan_db, ref_db = (-10 * np.log10(m[index].mean(1)) for m in (plan_mse, ref_mse))
        bar = np.maximum(ref_db, AUTO_MIN_PSNR) if floored else ref_db
        return float(np.mean(plan_db >= bar - 1e-9))

    def confidences(self, values: np.ndarray, pairs=slice(None)) -> dict[str, float]:
        """Each level's confidence (see :meth:`confidence`)."""
        return {level: round(self.confidence(level, values, pairs), 3) for level in self.names()}


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
    levels = _Levels({})

    def row(name: str, plan: ReusePlan, reuse: str, values: np.ndarray, pairs=slice(None), judged_on="all") -> dict:
        confidence = levels.confidences(values, pairs)
        return {
            "name": name,
            "reuse": reuse,
            "key_steps": list(plan.key_steps),
            "forecast": plan.forecast[-1],
            "damping": plan.damping[-1],
            "psnr_pooled": round(pooled_psnr(values), 3),
            "psnr_mean": round(float(np.mean(values)), 3),
            "psnr_min": round(float(np.min(values)), 3),
            "judged_on": judged_on,
            "confidence": confidence,
            "meets": [level for level, c in confidence.items() if c >= LEVEL_CONFIDENCE],
            "unet_flops": round(cost.flops_fraction(plan, full, flops), 4),
            "unet_calls": len(cost.unet_calls(plan, plan.batchable)),
            "gpu_seconds_1_image": round(cost.gpu_seconds(plan, plan.batchable, 1, deep=reuse == "deep"), 4),
            "gpu_seconds_4_images": round(cost.gpu_seconds(plan, plan.batchable, 4, deep=reuse == "deep"), 4),
            "plan": plan.to_json(),
        }

    def measure(plan: ReusePlan, pairs: list[int] | None = None) -> np.ndarray:
        on = setting if pairs is None else _subset(setting, pairs)
        images = _sample(stock, on, key_steps=plan, parallel=plan.batchable, noise_injection=setting.noise_injection)
        return psnr(images, reference if pairs is None else reference[pairs])

    measured = []
    with tqdm(total=len(plans), desc="calibrating plans", unit="plan", disable=not progress) as bar:
        for name, plan, reuse in plans:
            measured.append((name, plan, reuse, measure(plan)))
            bar.update()
        levels.reference_values.update({name: v for name, _, _, v in measured if name in DEEPCACHE.values()})
        rows = [row(*m) for m in measured]
        # removals are screened on a third of the pairs and judged on the other two thirds, so that
        # choosing the best of many removals does not flatter the plan it keeps
        screen = list(range(0, len(setting.prompts), 3))
        held_out = [i for i in range(len(setting.prompts)) if i not in screen]
        searched = set()
        for level in levels.names():
            bars = (levels.bar(level), levels.bar(level, held_out))
            if bars not in searched:  # a level with the same bars as one searched: the same search
                searched.add(bars)
                rows += _refine(level, rows, pipe.unet, (screen, held_out), levels, measure, row, bar)
    chosen = {}
    for level in levels.names():
        good = [r for r in rows if level in r["meets"]]
        if good:
            chosen[level] = min(good, key=lambda r: (r["gpu_seconds_1_image"], -r["psnr_pooled"]))["name"]
    on_frontier = {id(r) for r in frontier(rows)}
    for r in rows:
        r["frontier"] = id(r) in on_frontier
        if not r["frontier"] and r["name"] not in chosen.values():
            del r["plan"]  # only these can run: the rest keep their key steps
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
        "levels": {
            level: {"reference": LEVELS[level][0], "floor": AUTO_MIN_PSNR if LEVELS[level][1] else None,
                    "psnr_pooled": round(levels.bar(level), 3), "plan": chosen.get(level)}
            for level in levels.names()
        },
        "plans": sorted(rows, key=lambda r: r["gpu_seconds_1_image"]),
    }


def _subset(setting: Setting, pairs: list[int]) -> Setting:
    return dataclasses.replace(setting, prompts=[setting.prompts[i] for i in pairs], seeds=[setting.seeds[i] for i in pairs])


def _refine(level: str, rows: list[dict], unet, split, levels: _Levels, measure, row, bar) -> list[dict]:
    """Greedy key-step removal from the fastest plan that meets ``level`` (see the module doc)."""
    good = [r for r in rows if level in r["meets"] and r["judged_on"] == "all"]
    if not good:
        return []
    start = min(good, key=lambda r: (r["gpu_seconds_1_image"], -r["psnr_pooled"]))
    plan, reuse = ReusePlan.from_json(start["plan"]), start["reuse"]
    screen, held_out = split
    known = {(r["reuse"], tuple(r["key_steps"]), r["forecast"], r["damping"]) for r in rows}
    out = []
    for _ in range(REFINE_ROUNDS):
        keys = plan.key_steps
        if len(keys) <= 2:
            break
        trials = [_same_family(plan, reuse, unet, tuple(k for k in keys if k != drop)) for drop in keys[1:]]
        bar.total += len(trials) + 1
        scores = []
        for trial in trials:
            scores.append(pooled_psnr(measure(trial, screen)))
            bar.update()
        best = trials[int(np.argmax(scores))]
        values = measure(best, held_out)
        bar.update()
        if levels.confidence(level, values, held_out) < LEVEL_CONFIDENCE:
            break
        plan = best
        if (reuse, plan.key_steps, plan.forecast[-1], plan.damping[-1]) not in known:
            name = f"{reuse} {len(plan.key_steps)} keys refined for {level}, {_forecast_name(plan.forecast[-1], plan.damping[-1])}"
            out.append(row(name, plan, reuse, values, held_out, judged_on="held-out"))
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


def standin_pairs(count: int = 24, first_seed: int = CALIBRATION_SEED) -> tuple[list[str], list[int]]:
    """The stand-in's calibration pairs: ``count`` distinct prompts (up to 90) that cycle
    through the colours, each colour through the thicknesses, and the digits, each
    with its own seed from ``first_seed`` (by default :data:`CALIBRATION_SEED`, disjoint
    from the fidelity benchmark's seeds)."""
    from .standin import data

    if not 1 <= count <= 90:
        raise ValueError(f"the stand-in has 90 balanced calibration prompts, asked for {count}")
    colours = len(data.COLORS)
    combos = [data.Attributes(i % 10, i % colours, (i + i // colours) % 3) for i in range(count)]
    return [c.prompt for c in combos], [first_seed + i for i in range(count)]


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
        raise ValueError(
            f"{path}: not a fasterdiff plan file of version {PLANS_FORMAT_VERSION} (files of an older version: "
            f"calibrate again, python -m fasterdiff calibrate)"
        )
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
    name: str = ""  # the calibrated plan's name in the plan file

    @property
    def beyond_deepcache(self) -> bool:
        """Whether this runs a calibrated plan other than DeepCache's own (interval 3 or 5)."""
        return isinstance(self.key_steps, ReusePlan) and self.name not in DEEPCACHE.values()


def choose(
    plans_file: str | os.PathLike | None, scheduler, num_inference_steps: int, unet, level: str = "auto"
) -> AutoChoice:
    """The plan ``level`` (``auto`` by default, see the module doc) runs for this scheduler
    and step count, and why."""
    if level not in LEVELS:
        raise ValueError(f"no calibration level {level!r}; the levels are {', '.join(LEVELS)}")
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
    bar = entry["levels"].get(level)
    if bar is None:  # its reference was not measured (too few steps for DeepCache's interval)
        fallback.reason = (
            f"{level}: {plans_file} has no {level} level for {entry_key(name, num_inference_steps)}; "
            f"running the paper's key steps"
        )
        return fallback
    if bar["plan"] is None:
        return AutoChoice("off", "encoder", f"{level}: no calibrated plan reaches {bar['psnr_pooled']:.1f} dB; running stock")
    best = next(r for r in entry["plans"] if r["name"] == bar["plan"])
    plan = ReusePlan.from_json(best["plan"])
    plan.check_modules(unet)
    speedup = entry["stock"]["gpu_seconds_1_image"] / best["gpu_seconds_1_image"]
    floor = f" and {bar['floor']:g} dB" if bar["floor"] is not None else ""
    return AutoChoice(
        plan,
        best["reuse"],
        f"{level}: '{best['name']}' from {plans_file}: pooled PSNR {best['psnr_pooled']:.1f} dB against stock in "
        f"calibration (at least {bar['reference']}'s{floor}: {bar['psnr_pooled']:.1f} dB; noise injection "
        f"{entry['calibrated_on']['noise_injection']}), modelled GPU speedup {speedup:.2f}x",
        best["name"],
    )


def markdown(entry: dict) -> str:
    """The entry's levels, then its frontier, the references and the chosen plans as a table, fastest first."""
    stock = entry["stock"]["gpu_seconds_1_image"]
    on = entry["calibrated_on"]
    lines = [
        f"Calibration, {entry['sampler']}-{entry['steps']}: {on['pairs']} prompt x seed pairs, guidance "
        f"{on['guidance_scale']}, {on['width']}x{on['height']}, plans with noise injection {on['noise_injection']}; "
        f"{len(entry['plans'])} plans measured. Fidelity: PSNR against stock's images, pooled (that of the mean "
        f"squared error over the pairs), with the mean and the worst image's. 'refined': found by the greedy "
        f"key-step search, judged on the held-out two thirds of the pairs.",
        "",
        "| level | must reach (pooled dB) | runs |",
        "|---|---|---|",
    ]
    for level, bar in entry["levels"].items():
        floor = f" and {bar['floor']:g}" if bar["floor"] is not None else ""
        lines.append(f"| {level} | {bar['reference']}'s{floor}: {bar['psnr_pooled']:.1f} | {bar['plan'] or 'stock'} |")
    lines += [
        "",
        "| plan | key steps | PSNR vs stock: pooled, mean (min) dB | UNet FLOPs | UNet calls | modelled GPU speedup, 1 / 4 images |",
        "|---|---|---|---|---|---|",
    ]
    chosen = {bar["plan"] for bar in entry["levels"].values()}
    for r in entry["plans"]:
        if r["frontier"] or r["name"] in DEEPCACHE.values() or r["name"] in chosen:
            lines.append(
                f"| {r['name']} | {len(r['key_steps'])} | {r['psnr_pooled']:.1f}, {r['psnr_mean']:.1f} ({r['psnr_min']:.1f}) "
                f"| {r['unet_flops']:.2f} | {r['unet_calls']} | {stock / r['gpu_seconds_1_image']:.2f}x / "
                f"{entry['stock']['gpu_seconds_4_images'] / r['gpu_seconds_4_images']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(entry: dict, path: str | os.PathLike) -> None:
    """Every measured plan: modelled GPU speedup against pooled PSNR, the frontier joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stock = entry["stock"]["gpu_seconds_1_image"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for reuse, marker in (("encoder", "o"), ("deep", "s")):
        for order, colour in ((0, "tab:blue"), (1, "tab:orange"), (2, "tab:green")):
            rows = [r for r in entry["plans"] if r["reuse"] == reuse and r["forecast"] == order]
            if rows:
                ax.scatter([stock / r["gpu_seconds_1_image"] for r in rows], [r["psnr_pooled"] for r in rows],
                           marker=marker, color=colour, alpha=0.7, label=f"{reuse}, forecast {order}")
    front = sorted((r for r in entry["plans"] if r["frontier"]), key=lambda r: r["gpu_seconds_1_image"])
    ax.plot([stock / r["gpu_seconds_1_image"] for r in front], [r["psnr_pooled"] for r in front], "k-", lw=1, label="frontier")
    for r in entry["plans"]:
        if r["name"] in DEEPCACHE.values():
            ax.annotate(r["name"].split(" (")[0], (stock / r["gpu_seconds_1_image"], r["psnr_pooled"]), fontsize=7)
    auto = entry["levels"].get("auto")
    if auto:
        ax.axhline(auto["psnr_pooled"], color="grey", ls="--", lw=1, label="auto's bar")
    ax.set_xlabel("modelled GPU speedup vs stock, one image (calls-and-time model, fasterdiff/cost.py)")
    ax.set_ylabel("pooled PSNR vs stock's images, dB")
    ax.set_title(f"calibration, {entry['sampler']}-{entry['steps']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
