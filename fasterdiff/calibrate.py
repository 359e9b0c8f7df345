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

Two searches (``mode``): ``"full"`` samples every candidate on every pair, then the greedy
search above. ``"quick"`` samples stock and the reference plans on every pair first, and orders
the pairs hardest first (those the references reproduce worst: where a plan is likely to fall
behind). Per level, it races the candidates from the fastest up on growing prefixes of that
order (:data:`QUICK_STAGES`), drops each as soon as it falls :data:`QUICK_DROP_DB` behind the
level's bar on the same pairs or, from :data:`QUICK_CONFIDENT_FROM` pairs on, short of meeting it,
and takes the first that meets the level on all of them (candidates of equal modelled speed in name
order, or all of them raced and the most faithful kept: :data:`QUICK_TIES`): slower candidates are
never sampled.
Then greedy removals from that pick: each removal screened on the :data:`QUICK_SCREEN` hardest
pairs, the best raced like a candidate, kept while it meets the level on all pairs. On the
stand-in it samples 1/7 to 1/8.5 of what the full search does
(benchmarks/results/quick-calibration-standin.md).

The plan file (JSON, ``fasterdiff_plans.json`` beside the weights by default) holds one
entry per sampler and step count: what it was calibrated on and how (``search``: the mode,
what it did, the images it sampled), every candidate measured with its fidelity, on how
many pairs it was judged (``pairs``, ``judged_on``) and its confidence per level, its cost,
the frontier marked, and the plan each level runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cost, defaults
from .choice import AUTO_MIN_PSNR, DEEPCACHE, LEVELS
from .metrics import pooled_psnr, psnr
from .pipeline import accelerate
from .plan import ReusePlan, deep_plan, deep_plan_from_keys, encoder_plan
from .plan_file import PLANS_FILE_NAME, entry_key, read_plans, write_entry  # noqa: F401  (the tool's API)
from .samplers import sampler_timesteps

log = logging.getLogger("fasterdiff")

KEY_COUNTS = (5, 7, 10, 13, 17)
SPACINGS = {"uniform": 1.0, "early": 1.6}  # exponent of the key-step spacing
# (order, damping) tried per plan; quadratic forecasts (order 2) never reached a frontier on
# the stand-in (both samplers), so the grid leaves them out
FORECASTS = {"encoder": ((0, 1.0), (1, 1.0), (1, 0.5)), "deep": ((0, 1.0), (1, 1.0), (1, 0.5))}
REFINE_ROUNDS = 3  # greedy key-step removals tried after the grid, per level
# a plan meets a level when it reaches the level's bar in this share of bootstrap resamples
# of the calibration pairs: being ahead of the reference by less than the pairs' noise is not
# enough (the plan chosen would fall behind it on other pairs)
LEVEL_CONFIDENCE = 0.8
BOOTSTRAP_RESAMPLES = 2000
# quick mode: the pairs it samples, the stages of its race, and how far below a level's bar (on
# the same pairs) a plan may fall at a stage before it is dropped
QUICK_STAGES = (1, 2, 4, 8, 12, 24)  # other stages tried: benchmarks/results/quick-calibration-standin.md
QUICK_DROP_DB = 0.5
QUICK_CONFIDENT_FROM = 4  # pairs from which a raced plan must meet the level with LEVEL_CONFIDENCE
QUICK_SCREEN = 1  # pairs each key-step removal is screened on before the best is raced
# race every candidate as fast (modelled) as a level's first to pass and keep the most faithful, the
# full search's tie-break; off, the first in name order wins. Off by default: on the stand-in it
# samples 1.4x as much at DDIM-50 and the one pick it changes is worse on held-out pairs
# (benchmarks/results/quick-calibration-standin.md)
QUICK_TIES = False


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


def _removals(plan: ReusePlan, reuse: str, unet) -> list[ReusePlan]:
    """``plan`` without each of its key steps but the first, in turn: its kind of reuse and forecast."""
    keys, num_steps = plan.key_steps, plan.num_steps
    out = []
    for drop in keys[1:]:
        kept = tuple(k for k in keys if k != drop)
        base = encoder_plan(unet, list(kept), num_steps) if reuse == "encoder" else deep_plan_from_keys(unet, kept, num_steps)
        out.append(base.with_forecast(plan.forecast[-1], plan.damping[-1]))
    return out


def _refined_name(reuse: str, plan: ReusePlan, level: str) -> str:
    return f"{reuse} {len(plan.key_steps)} keys refined for {level}, {_forecast_name(plan.forecast[-1], plan.damping[-1])}"


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


def sample_pairs(fast, setting: Setting, **kw) -> torch.Tensor:
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


class OutOfTime(TimeoutError):
    """Calibration reached its deadline before it was done."""


class _Trials:
    """Plans sampled on calibration pairs against stock's images: each (plan, pair) sampled
    once, whatever asks for it, and the sampling counted."""

    def __init__(self, stock, setting: Setting, deadline: float | None = None):
        self.stock, self.setting, self.deadline = stock, setting, deadline
        self.started = time.monotonic()
        self.reference: dict[int, torch.Tensor] = {}  # stock's image of each pair sampled so far
        self.pair_samples = 0  # stock's and every plan's
        self.values: dict[str, dict[int, float]] = {}

    def _sample(self, pairs: list[int], **kw) -> torch.Tensor:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime(f"stopped after {time.monotonic() - self.started:.0f} s, {self.pair_samples} images sampled")
        self.pair_samples += len(pairs)
        return sample_pairs(self.stock, _subset(self.setting, pairs), **kw)

    def psnr(self, plan: ReusePlan, pairs=None) -> np.ndarray:
        """Per-pair PSNR against stock of ``plan`` on ``pairs`` (default: all)."""
        pairs = list(range(len(self.setting.prompts))) if pairs is None or pairs == slice(None) else list(pairs)
        new = [i for i in pairs if i not in self.reference]
        if new:
            self.reference.update(zip(new, self._sample(new)))
        known = self.values.setdefault(json.dumps(plan.to_json(), sort_keys=True), {})
        missing = [i for i in pairs if i not in known]
        if missing:
            images = self._sample(missing, key_steps=plan, parallel=plan.batchable, noise_injection=self.setting.noise_injection)
            reference = torch.stack([self.reference[i] for i in missing])
            known.update(zip(missing, psnr(images, reference).tolist()))
        return np.array([known[i] for i in pairs])

    def measured(self, plan: ReusePlan) -> list[int]:
        """The pairs ``plan`` was sampled on, in order."""
        return sorted(self.values.get(json.dumps(plan.to_json(), sort_keys=True), {}))


MODES = ("full", "quick")


def calibrate(pipe, setting: Setting, weights: str = "", progress: bool = True, mode: str = "full",
              deadline: float | None = None) -> dict:
    """Measure candidate plans against stock; the plan-file entry for ``setting``.

    ``mode="full"`` samples every candidate on every pair; ``"quick"`` races them on the first
    ``QUICK_STAGES[-1]`` pairs (see :func:`_race`), a fraction of the sampling. ``deadline``
    (``time.monotonic()``): raise :class:`OutOfTime` at the first sampling after it."""
    if mode not in MODES:
        raise ValueError(f"calibration mode {mode!r}: one of {', '.join(MODES)}")
    if setting.noise_injection is None:
        setting = dataclasses.replace(setting, noise_injection=defaults.NOISE_INJECTION)
    if mode == "quick":
        setting = _subset(setting, list(range(min(QUICK_STAGES[-1], len(setting.prompts)))))
    count = len(setting.prompts)
    stock = accelerate(pipe, key_steps="off", noise_injection=0)
    stock.set_progress_bar_config(disable=True)
    trials = _Trials(stock, setting, deadline)
    num_steps = len(sampler_timesteps(setting.sampler, pipe.scheduler.config, setting.steps))
    plans = candidates(pipe.unet, num_steps)
    flops = flops_per_kind(pipe, setting, {p.replay[-1] for _, p, _ in plans} | {frozenset()})
    full = flops[frozenset()]
    references = [(name, plan, reuse) for name, plan, reuse in plans if name in DEEPCACHE.values()]
    levels = _Levels({name: trials.psnr(plan) for name, plan, _ in references})  # stock sampled first, on every pair

    def row(name: str, plan: ReusePlan, reuse: str, values: np.ndarray, pairs: list[int] | None = None, judged_on="all") -> dict:
        pairs = list(range(count)) if pairs is None else pairs
        confidence = levels.confidences(values, pairs)
        judged = judged_on in ("all", "held-out")  # a plan dropped by the race meets no level
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
            "pairs": len(pairs),
            "confidence": confidence,
            "meets": [level for level, c in confidence.items() if judged and c >= LEVEL_CONFIDENCE],
            "unet_flops": round(cost.flops_fraction(plan, full, flops), 4),
            "unet_calls": len(cost.unet_calls(plan, plan.batchable)),
            "gpu_seconds_1_image": round(_gpu_seconds(plan, reuse, 1), 4),
            "gpu_seconds_4_images": round(_gpu_seconds(plan, reuse, 4), 4),
            "plan": plan.to_json(),
        }

    with tqdm(total=len(plans) if mode == "full" else None, desc=f"calibrating plans ({mode})",
              unit="plan" if mode == "full" else "stage", disable=not progress) as bar:
        if mode == "full":
            rows = []
            for name, plan, reuse in plans:
                rows.append(row(name, plan, reuse, trials.psnr(plan)))
                bar.update()
            # removals are screened on a third of the pairs and judged on the other two thirds, so that
            # choosing the best of many removals does not flatter the plan it keeps
            screen = list(range(0, count, 3))
            held_out = [i for i in range(count) if i not in screen]
            searched = set()
            for level in levels.names():
                bars = (levels.bar(level), levels.bar(level, held_out))
                if bars not in searched:  # a level with the same bars as one searched: the same search
                    searched.add(bars)
                    rows += _refine(level, rows, pipe.unet, (screen, held_out), levels, trials, row, bar)
        else:
            rows = _race(plans, levels, trials, _hardest_first(levels), pipe.unet, row, bar)
    chosen = {}
    for level in levels.names():
        good = [r for r in rows if level in r["meets"]]
        if good:
            chosen[level] = min(good, key=lambda r: (r["gpu_seconds_1_image"], -r["psnr_pooled"]))["name"]
    on_frontier = {id(r) for r in frontier([r for r in rows if r["judged_on"] in ("all", "held-out")])}
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
            "pairs": count,
            "prompts": sorted(set(setting.prompts)),
            "seeds": sorted(set(setting.seeds)),
            "date": datetime.date.today().isoformat(),
            "gpu_model": cost.GPU_MODEL_SOURCE,
        },
        "search": {
            "mode": mode,
            "how": _search_note(mode),
            "pair_samples": trials.pair_samples,
            "sampled_unet_evaluations": trials.pair_samples * num_steps,
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


def _search_note(mode: str) -> str:
    """What a search did, for the plan file."""
    if mode == "full":
        return "every candidate sampled on every pair; greedy removals screened on a third of the pairs, judged on the rest"
    return (
        f"pairs ordered hardest first (worst reproduced by the reference plans); candidates raced from the fastest up "
        f"on the first {', '.join(map(str, QUICK_STAGES))} of them: dropped when {QUICK_DROP_DB:g} dB below a level's "
        f"bar on the same pairs or short of meeting it on {QUICK_CONFIDENT_FROM} or more; a level's plan meets it on all "
        f"{QUICK_STAGES[-1]} ({'the most faithful' if QUICK_TIES else 'the first by name'} of equal modelled speed); "
        f"greedy removals from it screened on the {QUICK_SCREEN} hardest, the best raced the same way"
    )


def _gpu_seconds(plan: ReusePlan, reuse: str, images: int) -> float:
    return cost.gpu_seconds(plan, plan.batchable, images, deep=reuse == "deep")


def _subset(setting: Setting, pairs: list[int]) -> Setting:
    return dataclasses.replace(setting, prompts=[setting.prompts[i] for i in pairs], seeds=[setting.seeds[i] for i in pairs])


def _hardest_first(levels: _Levels) -> list[int]:
    """The calibration pairs, those the reference plans reproduce worst (mean PSNR) first: where
    a plan is likely to fall behind, so a race sees it on its first pairs."""
    mean = np.mean([np.asarray(v, dtype=np.float64) for v in levels.reference_values.values()], axis=0)
    return [int(i) for i in np.argsort(mean, kind="stable")]


def _runs_race(plan: ReusePlan, level: str, order: list[int], levels: _Levels, trials: _Trials, bar, start: int = 0) -> bool:
    """Whether ``plan`` meets ``level`` on every pair, sampled on the growing prefixes of ``order``
    of :data:`QUICK_STAGES` (from stage ``start``): False as soon as it falls more than
    :data:`QUICK_DROP_DB` below the level's bar on the same pairs, or, from
    :data:`QUICK_CONFIDENT_FROM` pairs on, short of meeting it with :data:`LEVEL_CONFIDENCE`."""
    count = len(order)
    stages = sorted({min(n, count) for n in QUICK_STAGES})
    for n in stages[start:]:
        pairs = order[:n]
        values = trials.psnr(plan, pairs)
        bar.update()
        if n < count and pooled_psnr(values) < levels.bar(level, pairs) - QUICK_DROP_DB:
            return False
        if n >= min(QUICK_CONFIDENT_FROM, count) and levels.confidence(level, values, pairs) < LEVEL_CONFIDENCE:
            return False
    return True


def _race(plans, levels: _Levels, trials: _Trials, order: list[int], unet, row, bar) -> list[dict]:
    """Quick mode's search: per level, grid candidates from the fastest (modelled GPU time) up,
    each raced (:func:`_runs_race`) on the pairs hardest first (``order``); the first that meets
    the level on all of them (of equal modelled speed: the first by name, or with
    :data:`QUICK_TIES` the most faithful of those that meet it) is refined by
    :func:`_quick_refine`; slower candidates are not sampled. The last stage checks a plan on
    pairs the others did not see: few pairs miss the rare images a plan wrecks, which decide
    pooled PSNR."""
    candidates_ = sorted(plans, key=lambda p: (_gpu_seconds(p[1], p[2], 1), p[0]))
    count = len(order)
    searched = set()
    refined: list[tuple[str, ReusePlan, str]] = []
    for level in levels.names():
        bars = tuple(levels.bar(level, order[:n]) for n in sorted(set(QUICK_STAGES)))  # the same bars: the same race
        if bars in searched:
            continue
        searched.add(bars)
        pick = None  # (modelled seconds, pooled PSNR on all pairs, plan, reuse)
        for name, plan, reuse in candidates_:
            seconds = _gpu_seconds(plan, reuse, 1)
            if pick is not None and (not QUICK_TIES or seconds > pick[0] * (1 + 1e-9)):
                break
            if _runs_race(plan, level, order, levels, trials, bar):
                fidelity = pooled_psnr(trials.psnr(plan, order))
                if pick is None or fidelity > pick[1]:
                    pick = (seconds, fidelity, plan, reuse)
        if pick is not None:
            refined += _quick_refine(level, pick[2], pick[3], order, levels, trials, unet, bar)
    grid = {json.dumps(plan.to_json(), sort_keys=True) for _, plan, _ in plans}
    refined = [r for r in refined if json.dumps(r[1].to_json(), sort_keys=True) not in grid]  # already a row
    rows = []
    for name, plan, reuse in plans + refined:
        measured = set(trials.measured(plan))
        pairs = [i for i in order if i in measured]
        if pairs:
            judged = "all" if len(pairs) == count else f"{len(pairs)} hardest pairs (dropped)"
            rows.append(row(name, plan, reuse, trials.psnr(plan, pairs), pairs, judged_on=judged))
    return rows


def _quick_refine(level: str, plan: ReusePlan, reuse: str, order: list[int], levels: _Levels, trials: _Trials, unet, bar) -> list:
    """Quick mode's key-step removals from a level's pick: every removal screened on the first
    :data:`QUICK_SCREEN` pairs of ``order`` (the hardest), the best raced on all of them like a
    candidate; kept while it meets the level, for up to :data:`REFINE_ROUNDS` rounds."""
    out = []
    screen = min(QUICK_SCREEN, len(order))
    start = sum(1 for n in sorted(set(QUICK_STAGES)) if n <= screen)  # stages the screen covered
    for _ in range(REFINE_ROUNDS):
        if len(plan.key_steps) <= 2:
            break
        removals = _removals(plan, reuse, unet)
        scores = [pooled_psnr(trials.psnr(t, order[:screen])) for t in removals]
        best = removals[int(np.argmax(scores))]
        if not _runs_race(best, level, order, levels, trials, bar, start=start):
            break
        plan = best
        out.append((_refined_name(reuse, plan, level), plan, reuse))
    return out


def _refine(level: str, rows: list[dict], unet, split, levels: _Levels, trials: _Trials, row, bar) -> list[dict]:
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
        if len(plan.key_steps) <= 2:
            break
        trials_ = _removals(plan, reuse, unet)
        bar.total += len(trials_) + 1
        scores = []
        for trial in trials_:
            scores.append(pooled_psnr(trials.psnr(trial, screen)))
            bar.update()
        best = trials_[int(np.argmax(scores))]
        values = trials.psnr(best, held_out)
        bar.update()
        if levels.confidence(level, values, held_out) < LEVEL_CONFIDENCE:
            break
        plan = best
        if (reuse, plan.key_steps, plan.forecast[-1], plan.damping[-1]) not in known:
            out.append(row(_refined_name(reuse, plan, level), plan, reuse, values, held_out, judged_on="held-out"))
    return out


@torch.no_grad()
def flops_per_kind(pipe, setting: Setting, kinds: set[frozenset]) -> dict[frozenset, int]:
    """FLOPs of one guided UNet evaluation of each kind, at the calibration size."""
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, setting.height // scale, setting.width // scale, dtype=unet.dtype, device=unet.device)
    text, _ = pipe.encode_prompt(setting.prompts[0], unet.device, 1, False)
    text = text.repeat(2, 1, 1)
    return {k: cost.step_flops(unet, k, sample, 500, text) for k in kinds}


CALIBRATION_SEED = 1000  # calibration pairs use seeds from here on: benchmarks score seeds 0, 1, 2, ...  (as the stand-in's)
PROMPTS_FILE_NAME = "calibration_prompts.txt"  # beside the weights: the model's own calibration prompts


def sd_pairs(count: int = 32) -> tuple[list[str], list[int]]:
    """SD 1.5's calibration pairs: the prompts of the package's calibration_prompts.txt, one seed each."""
    return _pairs(resources.files(__package__).joinpath(PROMPTS_FILE_NAME).read_text(), count)


def pairs_for(folder, count: int = 32) -> tuple[list[str], list[int]]:
    """The calibration pairs of the weights in ``folder``: the prompts of its own
    calibration_prompts.txt (one per line) where it has one, else SD 1.5's."""
    own = Path(folder) / PROMPTS_FILE_NAME if folder else None
    if own is not None and own.is_file():
        return _pairs(own.read_text(), count)
    return sd_pairs(count)


def _pairs(text: str, count: int) -> tuple[list[str], list[int]]:
    prompts = [p.strip() for p in text.splitlines() if p.strip()][:count]
    return prompts, [CALIBRATION_SEED + i for i in range(len(prompts))]
