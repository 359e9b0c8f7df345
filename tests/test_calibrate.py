"""Calibration and auto: measured against stock, the frontier kept, the chosen plan rerun."""

import json

import numpy as np
import pytest
import torch

import fasterdiff
from fasterdiff import calibrate
from fasterdiff.tiny import tiny_pipeline

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
    assert data["version"] == calibrate.PLANS_FORMAT_VERSION and list(data["entries"]) == ["DDIM-8"]
    rows = entry["plans"]
    grid = calibrate.candidates(pipe.unet, 8)
    assert sorted(r["name"] for r in rows if "refined" not in r["name"]) == sorted(n for n, _, _ in grid)
    assert calibrate.DEEPCACHE_3 in {r["name"] for r in rows}
    assert {r["reuse"] for r in rows} == {"encoder", "deep"} and {r["forecast"] for r in rows} == {0, 1, 2}
    for r in rows:
        assert 0 < r["unet_flops"] < 1 and ("plan" in r) == r["frontier"]
        if r["frontier"]:
            assert list(fasterdiff.ReusePlan.from_json(r["plan"]).key_steps) == r["key_steps"]
        assert r["gpu_seconds_1_image"] < entry["stock"]["gpu_seconds_1_image"]
    front = [r for r in rows if r["frontier"]]
    # no row is both faster and more faithful than a frontier row
    for f in front:
        assert not any(o["gpu_seconds_1_image"] < f["gpu_seconds_1_image"] and o["psnr_mean"] > f["psnr_mean"] for o in rows)
    # deep non-key steps are cheaper in FLOPs than encoder ones at the same keys
    by = {(r["reuse"], tuple(r["key_steps"]), r["forecast"]): r for r in rows}
    enc, deep = by[("encoder", (0, 2, 3, 5, 6), 0)], by[("deep", (0, 2, 3, 5, 6), 0)]
    assert deep["unet_flops"] < enc["unet_flops"]


def test_greedy_search_drops_key_steps_while_within_tolerance(monkeypatch):
    pipe = tiny_pipeline()
    setting = calibrate.Setting(prompts=["a cat", "a dog", "a red cat"], seeds=[5, 6, 7], batch=3, **SETTING)
    # random weights: a low tolerance, so that there is a plan to start from and room to drop keys
    monkeypatch.setattr(calibrate, "AUTO_MIN_PSNR", 12.0)
    entry = calibrate.calibrate(pipe, setting, progress=False)
    grid = [r for r in entry["plans"] if "refined" not in r["name"]]
    refined = [r for r in entry["plans"] if "refined" in r["name"]]
    start = min((r for r in grid if r["psnr_mean"] >= 12.0), key=lambda r: r["gpu_seconds_1_image"])
    assert refined, "nothing dropped"
    previous = start
    for r in sorted(refined, key=lambda r: -len(r["key_steps"])):
        # each round drops one key step of the last plan, keeps its family and the tolerance
        assert set(r["key_steps"]) < set(previous["key_steps"]) and len(r["key_steps"]) == len(previous["key_steps"]) - 1
        assert (r["reuse"], r["forecast"]) == (start["reuse"], start["forecast"])
        assert r["psnr_mean"] >= 12.0 and r["gpu_seconds_1_image"] < previous["gpu_seconds_1_image"]
        previous = r


def test_the_recorded_psnr_is_what_the_plan_gives(calibrated):
    pipe, setting, entry, _ = calibrated
    row = [r for r in entry["plans"] if r["frontier"] and "refined" not in r["name"]][-1]
    plan = fasterdiff.ReusePlan.from_json(row["plan"])
    stock = fasterdiff.accelerate(pipe, key_steps="off", noise_injection=0)
    reference = calibrate._sample(stock, setting)
    # with the library's default noise injection, as auto runs the plan
    assert entry["calibrated_on"]["noise_injection"] == 0.003
    images = calibrate._sample(stock, setting, key_steps=plan, noise_injection=0.003)
    assert np.mean(calibrate.psnr(images, reference)) == pytest.approx(row["psnr_mean"], abs=1e-2)


def test_auto_takes_the_fastest_frontier_plan_within_tolerance(calibrated, monkeypatch):
    pipe, _, entry, path = calibrated
    good = [r for r in entry["plans"] if r["frontier"] and r["psnr_mean"] >= entry["auto_min_psnr"]]
    fast = fasterdiff.accelerate(pipe, key_steps="auto", plans=path)
    kw = dict(num_inference_steps=8, output_type="latent", height=32, width=32)
    stats = fast("a cat", sampler="DDIM", **kw).stats
    if good:
        best = min(good, key=lambda r: r["gpu_seconds_1_image"])
        assert list(stats.key_steps) == best["key_steps"] and best["name"] in stats.plan
    else:
        assert stats.key_steps == tuple(range(8)) and "stock" in stats.plan
    # with a lower tolerance auto goes faster, never slower
    monkeypatch.setitem(entry, "auto_min_psnr", 0.0)
    loose = path.with_name("loose.json")
    calibrate.write_entry(loose, entry)
    loose_stats = fasterdiff.accelerate(pipe, key_steps="auto", plans=loose)("a cat", sampler="DDIM", **kw).stats
    fastest = min((r for r in entry["plans"] if r["frontier"]), key=lambda r: r["gpu_seconds_1_image"])
    assert list(loose_stats.key_steps) == fastest["key_steps"]


def test_auto_with_parallel_true_runs_a_deep_plan_sequentially(calibrated, tmp_path):
    pipe, _, entry, _ = calibrated
    deep = [r for r in entry["plans"] if r["frontier"] and r["reuse"] == "deep"]
    only_deep = dict(entry, plans=deep[:1], auto_min_psnr=0.0)
    path = tmp_path / "deep.json"
    calibrate.write_entry(path, only_deep)
    fast = fasterdiff.accelerate(pipe, key_steps="auto", plans=path, parallel=True)
    stats = fast("a cat", sampler="DDIM", num_inference_steps=8, output_type="latent", height=32, width=32).stats
    assert list(stats.key_steps) == deep[0]["key_steps"] and stats.decoder_steps_per_call == [1] * 8


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
    assert calibrate.default_plans_file(loaded) == tmp_path / "w" / calibrate.PLANS_FILE_NAME
    fast = fasterdiff.accelerate(loaded, key_steps="auto")
    assert fast.settings.plans == str(tmp_path / "w" / calibrate.PLANS_FILE_NAME)


def test_spaced_keys():
    assert calibrate.spaced_keys(50, 10, 1.0) == tuple(range(0, 50, 5))
    early, late = calibrate.spaced_keys(50, 10, 1.6), calibrate.spaced_keys(50, 10, 0.6)
    assert early[1] - early[0] < early[-1] - early[-2] and late[1] - late[0] > late[-1] - late[-2]
    with pytest.raises(ValueError, match="auto"):
        fasterdiff.accelerate(tiny_pipeline(), key_steps="auto", forecast=1)
