"""Calibration and auto: measured against stock, the frontier kept, the chosen plan rerun."""

import json

import numpy as np
import pytest
import torch

import fasterdiff
from fasterdiff import choice, plan_file
from fasterdiff import calibrate
from fasterdiff.tools.standin import data as standin_data
from fasterdiff.samplers import make_scheduler
from fasterdiff.tools.tiny import tiny_pipeline

SETTING = dict(sampler="DDIM", steps=8, guidance_scale=7.5, height=32, width=32)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    pipe = tiny_pipeline()
    setting = calibrate.Setting(prompts=["a cat", "a dog", "a red cat"], seeds=[5, 6, 7], batch=2, **SETTING)
    entry = calibrate.calibrate(pipe, setting, weights="tiny", progress=False)
    path = tmp_path_factory.mktemp("plans") / "plans.json"
    calibrate.write_entry(path, entry)
    return pipe, setting, entry, path


def test_plan_file_holds_every_candidate_with_fidelity_cost_and_the_frontier(calibrated):
    pipe, setting, entry, path = calibrated
    data = json.loads(path.read_text())
    assert data["version"] == plan_file.PLANS_FORMAT_VERSION and list(data["entries"]) == ["DDIM-8"]
    rows = entry["plans"]
    grid = calibrate.candidates(pipe.unet, 8)
    assert sorted(r["name"] for r in rows if "refined" not in r["name"]) == sorted(n for n, _, _ in grid)
    assert set(calibrate.DEEPCACHE.values()) <= {r["name"] for r in rows}
    assert {r["reuse"] for r in rows} == {"encoder", "deep"} and {r["forecast"] for r in rows} == {0, 1}
    assert {r["damping"] for r in rows} == {1.0, 0.5}
    chosen = {level["plan"] for level in entry["levels"].values()}
    for r in rows:
        assert 0 < r["unet_flops"] < 1 and ("plan" in r) == (r["frontier"] or r["name"] in chosen)
        assert r["psnr_min"] <= r["psnr_pooled"] <= r["psnr_mean"]
        if "plan" in r:
            plan = fasterdiff.ReusePlan.from_json(r["plan"])
            assert list(plan.key_steps) == r["key_steps"] and (plan.forecast[-1], plan.damping[-1]) == (r["forecast"], r["damping"])
        assert r["gpu_seconds_1_image"] < entry["stock"]["gpu_seconds_1_image"]
    front = [r for r in rows if r["frontier"]]
    # no row is both faster and more faithful than a frontier row
    for f in front:
        assert not any(o["gpu_seconds_1_image"] < f["gpu_seconds_1_image"] and o["psnr_pooled"] > f["psnr_pooled"] for o in rows)
    # deep non-key steps are cheaper in FLOPs than encoder ones at the same keys
    by = {(r["reuse"], tuple(r["key_steps"]), r["forecast"], r["damping"]): r for r in rows}
    enc, deep = by[("encoder", (0, 2, 3, 5, 6), 0, 1.0)], by[("deep", (0, 2, 3, 5, 6), 0, 1.0)]
    assert deep["unet_flops"] < enc["unet_flops"]


def test_each_level_runs_the_fastest_plan_at_least_as_faithful_as_its_reference(calibrated):
    _, _, entry, _ = calibrated
    rows = {r["name"]: r for r in entry["plans"]}
    dc3, dc5 = rows[calibrate.DEEPCACHE[3]], rows[calibrate.DEEPCACHE[5]]
    bars = entry["levels"]
    assert bars["deepcache-3"]["psnr_pooled"] == pytest.approx(dc3["psnr_pooled"], abs=1e-3)
    assert bars["deepcache-5"]["psnr_pooled"] == pytest.approx(dc5["psnr_pooled"], abs=1e-3)
    assert bars["auto"]["psnr_pooled"] == pytest.approx(max(dc3["psnr_pooled"], calibrate.AUTO_MIN_PSNR), abs=1e-3)
    for level, bar in bars.items():
        meeting = [r for r in rows.values() if level in r["meets"]]
        for r in rows.values():  # meeting a level: reaching its bar in enough resamples of the pairs
            assert (level in r["meets"]) == (r["confidence"][level] >= calibrate.LEVEL_CONFIDENCE)
        reference = rows[bar["reference"]]
        if level != "auto" or reference["psnr_pooled"] >= calibrate.AUTO_MIN_PSNR:
            assert reference["confidence"][level] == 1.0  # equal to itself in every resample
        fastest = min(r["gpu_seconds_1_image"] for r in meeting)
        assert rows[bar["plan"]]["gpu_seconds_1_image"] == fastest


def test_a_level_asks_for_more_than_a_lead_within_the_noise_of_the_pairs():
    levels = calibrate._Levels({calibrate.DEEPCACHE[3]: np.array([40.0, 40.0, 40.0, 40.0, 40.0, 40.0])})
    ahead_everywhere = np.array([41.0] * 6)
    ahead_by_one_pair = np.array([40.0, 40.0, 40.0, 40.0, 40.0, 40.1])
    behind_on_one = np.array([45.0, 45.0, 45.0, 45.0, 45.0, 30.0])  # ahead on mean PSNR, pooled about 37
    assert levels.confidence("deepcache-3", ahead_everywhere) == 1.0
    assert levels.confidence("deepcache-3", ahead_by_one_pair) == 1.0  # never behind: counts as reaching it
    assert levels.confidence("deepcache-3", behind_on_one) < calibrate.LEVEL_CONFIDENCE
    share = levels.confidence("deepcache-3", behind_on_one)
    assert levels.confidences(behind_on_one) == {"auto": round(share, 3), "deepcache-3": round(share, 3)}
    # only the resamples without the bad pair reach the bar: (5/6) ** 6 of them
    assert share == pytest.approx((5 / 6) ** 6, abs=0.03)
    # the floor: auto also needs AUTO_MIN_PSNR in each resample
    low = calibrate._Levels({calibrate.DEEPCACHE[3]: np.array([20.0] * 6)})
    assert low.confidence("deepcache-3", np.array([21.0] * 6)) == 1.0
    assert low.confidence("auto", np.array([21.0] * 6)) == 0.0


def test_pooled_psnr_weighs_the_worst_images():
    assert calibrate.pooled_psnr(np.array([30.0, 30.0])) == pytest.approx(30.0)
    # one image at 15 dB among three at 40 dB: the mean says 33.75, pooled says about 21
    assert calibrate.pooled_psnr(np.array([40.0, 40.0, 40.0, 15.0])) == pytest.approx(21.0, abs=0.1)
    images, reference = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), 0.5)
    images[1] += 0.1
    assert calibrate.pooled_psnr(calibrate.psnr(images, reference)) == pytest.approx(-10 * np.log10(0.01 / 2), abs=1e-3)


def test_greedy_search_drops_key_steps_while_the_level_is_met(monkeypatch):
    pipe = tiny_pipeline()
    setting = calibrate.Setting(prompts=["a cat", "a dog", "a red cat"], seeds=[5, 6, 7], batch=3, **SETTING)
    # random weights: a fixed bar, so that the search starts from a plan with key steps to spare
    monkeypatch.setattr(calibrate._Levels, "bar", lambda self, level, pairs=slice(None): 60.0)
    monkeypatch.setattr(
        calibrate._Levels, "confidence", lambda self, level, values, pairs=slice(None): float(calibrate.pooled_psnr(values) >= 60.0)
    )
    monkeypatch.setattr(calibrate, "LEVELS", {"auto": calibrate.LEVELS["auto"]})
    entry = calibrate.calibrate(pipe, setting, progress=False)
    grid = [r for r in entry["plans"] if "refined" not in r["name"]]
    refined = [r for r in entry["plans"] if "refined" in r["name"]]
    start = min((r for r in grid if r["psnr_pooled"] >= 60.0), key=lambda r: (r["gpu_seconds_1_image"], -r["psnr_pooled"]))
    assert refined, "nothing dropped"
    previous = start
    for r in sorted(refined, key=lambda r: -len(r["key_steps"])):
        # each round drops one key step of the last plan, keeps its family and meets the level
        assert set(r["key_steps"]) < set(previous["key_steps"]) and len(r["key_steps"]) == len(previous["key_steps"]) - 1
        assert (r["reuse"], r["forecast"], r["damping"]) == (start["reuse"], start["forecast"], start["damping"])
        assert r["psnr_pooled"] >= 60.0 and r["meets"] == ["auto"] and r["judged_on"] == "held-out"
        assert r["gpu_seconds_1_image"] < previous["gpu_seconds_1_image"]
        previous = r
    assert entry["levels"]["auto"]["plan"] == previous["name"]


def test_the_recorded_psnr_is_what_the_plan_gives(calibrated):
    pipe, setting, entry, _ = calibrated
    row = [r for r in entry["plans"] if r["frontier"] and "refined" not in r["name"]][-1]
    plan = fasterdiff.ReusePlan.from_json(row["plan"])
    stock = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    reference = calibrate.sample_pairs(stock, setting)
    # with the library's default noise injection, as auto runs the plan
    assert entry["calibrated_on"]["noise_injection"] == 0.003
    images = calibrate.sample_pairs(stock, setting, key_steps=plan, noise_injection=0.003)
    assert calibrate.pooled_psnr(calibrate.psnr(images, reference)) == pytest.approx(row["psnr_pooled"], abs=1e-2)


def test_auto_runs_the_plan_its_level_names(calibrated, tmp_path):
    pipe, _, entry, path = calibrated
    kw = dict(num_inference_steps=8, output_type="latent", height=32, width=32)
    stats = fasterdiff.accelerate(pipe, key_steps="auto", plans=path)("a cat", sampler="DDIM", **kw).stats
    best = next(r for r in entry["plans"] if r["name"] == entry["levels"]["auto"]["plan"])
    assert list(stats.key_steps) == best["key_steps"] and best["name"] in stats.plan and "pooled PSNR" in stats.plan
    # another plan named: that one runs; none: stock
    other = next(r for r in entry["plans"] if r["frontier"] and r["key_steps"] != best["key_steps"])
    for name, keys in ((other["name"], other["key_steps"]), (None, list(range(8)))):
        changed = json.loads(json.dumps(entry))
        changed["levels"]["auto"]["plan"] = name
        calibrate.write_entry(tmp_path / "changed.json", changed)
        stats = fasterdiff.accelerate(pipe, key_steps="auto", plans=tmp_path / "changed.json")("a cat", sampler="DDIM", **kw).stats
        assert list(stats.key_steps) == keys
    assert "running stock" in stats.plan
    # auto-fast: the deepcache-5 level's plan
    fast_row = next(r for r in entry["plans"] if r["name"] == entry["levels"]["deepcache-5"]["plan"])
    stats = fasterdiff.accelerate(pipe, key_steps="auto-fast", plans=path)("a cat", sampler="DDIM", **kw).stats
    assert list(stats.key_steps) == fast_row["key_steps"] and stats.plan.startswith(f"deepcache-5: '{fast_row['name']}'")
    # a plan file without that level (its reference needs more steps): the paper's key steps
    no_level = json.loads(json.dumps(entry))
    del no_level["levels"]["deepcache-5"]
    calibrate.write_entry(tmp_path / "no_level.json", no_level)
    stats = fasterdiff.accelerate(pipe, key_steps="auto-fast", plans=tmp_path / "no_level.json")("a cat", sampler="DDIM", **kw).stats
    assert stats.key_steps == fasterdiff.paper_key_steps(8) and "no deepcache-5 level" in stats.plan
    with pytest.raises(ValueError, match="key_steps='auto-fast'"):
        fasterdiff.accelerate(pipe, key_steps="auto-fast", forecast=1)
    # the benchmark's other levels, by name
    scheduler = make_scheduler("DDIM", pipe.scheduler.config)
    picked = choice.choose(path, scheduler, 8, pipe.unet, level="deepcache-5")
    assert list(picked.key_steps.key_steps) == next(r for r in entry["plans"] if r["name"] == entry["levels"]["deepcache-5"]["plan"])["key_steps"]
    for plans in (path, None):  # a wrong level name is an error, plan file or not
        with pytest.raises(ValueError, match="no calibration level 'fast'"):
            choice.choose(plans, scheduler, 8, pipe.unet, level="fast")


def test_auto_with_parallel_true_runs_a_deep_plan_sequentially(calibrated, tmp_path):
    pipe, _, entry, _ = calibrated
    deep = next(r for r in entry["plans"] if r["frontier"] and r["reuse"] == "deep")
    only_deep = dict(entry, plans=[deep], levels={"auto": dict(entry["levels"]["auto"], plan=deep["name"])})
    path = tmp_path / "deep.json"
    calibrate.write_entry(path, only_deep)
    fast = fasterdiff.accelerate(pipe, key_steps="auto", plans=path, parallel=True)
    stats = fast("a cat", sampler="DDIM", num_inference_steps=8, output_type="latent", height=32, width=32).stats
    assert list(stats.key_steps) == deep["key_steps"] and stats.steps_per_call == [1] * 8


def test_a_plan_file_of_an_older_version_asks_for_calibration(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1, "entries": {}}))
    with pytest.raises(ValueError, match="calibrate again"):
        calibrate.read_plans(path)


def test_auto_falls_back_to_the_paper_plan_where_not_calibrated(calibrated):
    pipe, _, _, path = calibrated
    fast = fasterdiff.accelerate(pipe, key_steps="auto", plans=path)
    stats = fast("a cat", sampler="Euler", num_inference_steps=10, output_type="latent", height=32, width=32).stats
    assert stats.key_steps == fasterdiff.paper_key_steps(10) and "no calibration for Euler with 10 steps" in stats.plan
    stats = fasterdiff.accelerate(pipe, key_steps="auto")("a cat", num_inference_steps=10, output_type="latent").stats
    assert "no plan file" in stats.plan


def test_default_plan_file_is_beside_the_weights(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "w")
    loaded = fasterdiff.load_pipeline(tmp_path / "w", local_files_only=True)
    assert plan_file.default_plans_file(loaded) == tmp_path / "w" / calibrate.PLANS_FILE_NAME
    fast = fasterdiff.accelerate(loaded, key_steps="auto")
    assert fast.settings.plans == str(tmp_path / "w" / calibrate.PLANS_FILE_NAME)


def test_spaced_keys():
    assert calibrate.spaced_keys(50, 10, 1.0) == tuple(range(0, 50, 5))
    early, late = calibrate.spaced_keys(50, 10, 1.6), calibrate.spaced_keys(50, 10, 0.6)
    assert early[1] - early[0] < early[-1] - early[-2] and late[1] - late[0] > late[-1] - late[-2]
    with pytest.raises(ValueError, match="auto"):
        fasterdiff.accelerate(tiny_pipeline(), key_steps="auto", forecast=1)


def test_standin_calibration_pairs_cover_every_attribute_evenly():
    from collections import Counter

    from fasterdiff.tools.standin import data

    prompts, seeds = standin_data.calibration_pairs(24)
    words = [p.split() for p in prompts]
    assert len(set(prompts)) == 24 and seeds == list(range(calibrate.CALIBRATION_SEED, calibrate.CALIBRATION_SEED + 24))
    assert Counter(w[1] for w in words) == {t: 8 for t in data.THICKNESS}
    assert Counter(w[2] for w in words) == {c: 4 for c in data.COLOR_NAMES}
    assert set(w[3] for w in words) == set(data.DIGITS)
    assert len({(w[1], w[2]) for w in words}) == 18  # every colour in every thickness
    assert len(set(standin_data.calibration_pairs(90)[0])) == 90
    with pytest.raises(ValueError, match="90"):
        standin_data.calibration_pairs(91)


def test_fidelity_benchmark_adds_the_other_levels_where_their_plans_differ_from_autos(calibrated, tmp_path):
    from fasterdiff.tools.bench import fidelity

    pipe, _, entry, _ = calibrated
    auto = entry["levels"]["auto"]["plan"]
    other = next(r for r in entry["plans"] if "plan" in r and r["name"] not in (auto, *calibrate.DEEPCACHE.values()))
    changed = json.loads(json.dumps(entry))
    changed["levels"]["deepcache-3"]["plan"] = calibrate.DEEPCACHE[3]  # DeepCache's own: it has its own row
    changed["levels"]["deepcache-5"]["plan"] = other["name"]
    calibrate.write_entry(tmp_path / "plans.json", changed)
    fast = fasterdiff.accelerate(pipe, plans=tmp_path / "plans.json")
    ddim = make_scheduler("DDIM", pipe.scheduler.config)
    rows = fidelity._calibrated_levels(pipe, fast, ddim, 8, lambda name, **kw: (name, kw))
    assert [name for name, _ in rows] == ["fasterdiff calibrated plan, deepcache-5 level"]
    assert list(rows[0][1]["key_steps"].key_steps) == other["key_steps"] and rows[0][1]["reuse"] == other["reuse"]
    changed["levels"]["deepcache-5"]["plan"] = auto  # the same plan as auto's: no row
    calibrate.write_entry(tmp_path / "plans.json", changed)
    assert fidelity._calibrated_levels(pipe, fast, ddim, 8, lambda name, **kw: name) == []
    # no calibration for the run: no rows
    assert fidelity._calibrated_levels(pipe, fast, ddim, 9, lambda name, **kw: name) == []


def test_the_standin_plans_run_on_sd15s_unet_layout():
    """The GPU check times the stand-in's calibrated plans on SD 1.5's UNet: every module they
    replay exists there (built on the meta device: no weights, no memory)."""
    from diffusers import UNet2DConditionModel

    from fasterdiff.tools.standin import PIPELINE_DIR
    from fasterdiff.tools.tiny import SD15_UNET_CONFIG

    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(json.loads(SD15_UNET_CONFIG.read_text()))
    entries = calibrate.read_plans(PIPELINE_DIR / calibrate.PLANS_FILE_NAME)["entries"]
    assert set(entries) >= {"DDIM-50", "DPM-Solver++-20"}  # the GPU check's samplers and step counts
    for entry in entries.values():
        for level in choice.AUTO_KEY_STEPS.values():
            row = next(r for r in entry["plans"] if r["name"] == entry["levels"][level]["plan"])
            plan = fasterdiff.ReusePlan.from_json(row["plan"])
            plan.check_modules(sd15)
            assert plan.cached_modules == frozenset(fasterdiff.unet.deep_modules(sd15, 0))


def test_quick_search_races_the_grid_and_judges_its_picks_on_every_pair(calibrated, monkeypatch):
    pipe, setting, full, _ = calibrated
    monkeypatch.setattr(calibrate, "QUICK_STAGES", (1, 2, 3))
    monkeypatch.setattr(calibrate, "QUICK_CONFIDENT_FROM", 2)
    quick = calibrate.calibrate(pipe, setting, progress=False, mode="quick")
    assert quick["search"]["mode"] == "quick" and full["search"]["mode"] == "full"
    assert 0 < quick["search"]["pair_samples"] < full["search"]["pair_samples"]
    assert quick["search"]["sampled_unet_evaluations"] == quick["search"]["pair_samples"] * 8
    assert "hardest first" in quick["search"]["how"]
    rows = {r["name"]: r for r in quick["plans"]}
    full_rows = {r["name"]: r for r in full["plans"]}
    for name in calibrate.DEEPCACHE.values():  # the references: sampled on every pair first
        assert rows[name]["judged_on"] == "all"
    for r in rows.values():
        judged = r["judged_on"] == "all"
        assert judged == (r["pairs"] == 3) and (r["meets"] == [] or judged)
        if "refined" in r["name"]:  # a removal is kept only where it meets its level on every pair
            level = r["name"].split("refined for ")[1].split(",")[0]
            assert judged and level in r["meets"]
        elif judged:  # the same plan on the same pairs: what the full search measured
            assert r["psnr_pooled"] == pytest.approx(full_rows[r["name"]]["psnr_pooled"], abs=0.05)
    for level, bar in quick["levels"].items():
        assert bar["psnr_pooled"] == pytest.approx(full["levels"][level]["psnr_pooled"], abs=0.05)
        if bar["plan"] is None:
            continue
        pick = rows[bar["plan"]]
        assert pick["judged_on"] == "all" and level in pick["meets"]
        # nothing faster was judged to meet the level: the race stops at its first, removals at their last
        assert not any(level in r["meets"] and r["gpu_seconds_1_image"] < pick["gpu_seconds_1_image"] for r in rows.values())


def test_quick_search_orders_the_pairs_hardest_first():
    levels = calibrate._Levels({"DeepCache interval 3 (deep, every 3rd step)": np.array([40.0, 30.0, 35.0, 30.0]),
                                "DeepCache interval 5 (deep, every 5th step)": np.array([30.0, 28.0, 20.0, 28.0])})
    assert calibrate._hardest_first(levels) == [2, 1, 3, 0]  # mean 27.5, 29, 29 (ties: in order), 35


def test_quick_removals_stop_at_the_first_that_misses_the_level(monkeypatch):
    """_quick_refine keeps the best-screened removal while it meets the level and stops at the first
    that does not: a fake screen that scores removing later key steps higher, a fake race that
    passes plans with at least 3 key steps."""
    from fasterdiff.plan import deep_plan_from_keys

    unet = tiny_pipeline().unet
    plan = deep_plan_from_keys(unet, (0, 2, 4, 6, 7), 8).with_forecast(1, 0.5)
    screened = []

    class Trials:
        def psnr(self, p, pairs):
            screened.append(p.key_steps)
            return np.full(len(pairs), 40.0 - sum(p.key_steps))

    monkeypatch.setattr(calibrate, "_runs_race", lambda p, *a, **k: len(p.key_steps) >= 3)
    out = calibrate._quick_refine("auto", plan, "deep", [0, 1, 2], None, Trials(), unet, None)
    assert [p.key_steps for _, p, _ in out] == [(0, 2, 4, 6), (0, 2, 4)]  # each round keeps its best-screened removal
    assert all(p.forecast[-1] == 1 and p.damping[-1] == 0.5 and "refined for auto" in n for n, p, _ in out)
    assert screened[-2:] == [(0, 4), (0, 2)]  # a third round was screened; its best, (0, 2), missed the level


@pytest.mark.parametrize("ties", [False, True])
def test_quick_race_breaks_ties_of_modelled_speed_by_name_or_by_fidelity(monkeypatch, ties):
    """Of the candidates as fast as the first to meet a level, the race refines the first by name,
    or with QUICK_TIES the most faithful of those that meet it; slower candidates are not raced.
    A fake race passes every candidate from the first tied group of speed on; a fake score rises
    through that group in name order, so the two rules pick its two ends."""
    unet = tiny_pipeline().unet
    plans = calibrate.candidates(unet, 8)
    speed = lambda p: calibrate._gpu_seconds(p[1], p[2], 1)
    ordered = sorted(plans, key=lambda p: (speed(p), p[0]))
    first = next(i for i in range(1, len(ordered) - 1) if speed(ordered[i - 1]) < speed(ordered[i]) == speed(ordered[i + 1]))
    group = [p for p in ordered if speed(p) == speed(ordered[first])]
    assert len(group) >= 2
    score = {id(p[1]): 30.0 + i for i, p in enumerate(group)}
    raced, refined = [], []

    def race(plan, *args, **kw):
        raced.append(plan)
        return id(plan) in score or speed(next(p for p in plans if p[1] is plan)) > speed(group[0])

    class Trials:
        def psnr(self, plan, pairs):
            return np.full(len(pairs), score.get(id(plan), 20.0))

        def measured(self, plan):
            return []

    class Levels:
        def names(self):
            return ["auto"]

        def bar(self, level, pairs):
            return 0.0

    monkeypatch.setattr(calibrate, "QUICK_TIES", ties)
    monkeypatch.setattr(calibrate, "_runs_race", race)
    monkeypatch.setattr(calibrate, "_quick_refine", lambda level, plan, *a: refined.append(plan) or [])
    calibrate._race(plans, Levels(), Trials(), [0, 1, 2], unet, None, None)
    assert refined == [group[-1][1] if ties else group[0][1]]
    assert raced == [p[1] for p in ordered[: first + (len(group) if ties else 1)]]


def test_a_calibration_past_its_deadline_stops(calibrated):
    pipe, setting, _, _ = calibrated
    with pytest.raises(calibrate.OutOfTime, match="stopped after"):
        calibrate.calibrate(pipe, setting, progress=False, mode="quick", deadline=0.0)
    with pytest.raises(ValueError, match="calibration mode 'fast'"):
        calibrate.calibrate(pipe, setting, progress=False, mode="fast")
