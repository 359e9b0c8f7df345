"""Calibration on the spot: auto with calibrate=True and no plan makes one (the quick search),
keeps it where the weights are (or in a cache named by them) and reads it next time."""

import logging
import shutil

import pytest
import torch

import fasterdiff
from fasterdiff import calibrate, on_the_spot, plan_file
from fasterdiff.service import Generator
from fasterdiff.tools.standin import PIPELINE_DIR
from fasterdiff.tools.tiny import tiny_inpaint_unet

STEPS = 6  # a short schedule: the quick search takes 10 s on the stand-in (no plan reaches auto's 35 dB: stock)
PLANNED = 15  # one where auto gets a plan (22 s)


@pytest.fixture
def standin_copy(tmp_path):
    """The stand-in's pipeline without its plan file."""
    folder = tmp_path / "standin"
    shutil.copytree(PIPELINE_DIR, folder, ignore=shutil.ignore_patterns(plan_file.PLANS_FILE_NAME))
    return folder


def _load(folder):
    pipe = fasterdiff.load_pipeline(folder, device="cpu", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(fast, steps=STEPS, **kw):
    return fast("a red seven", num_inference_steps=steps, sampler="DDIM", output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw)


def test_auto_calibrates_once_keeps_the_plan_beside_the_weights_and_reads_it_next_time(standin_copy, monkeypatch, caplog):
    searches = []
    real = calibrate.calibrate
    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: searches.append(k["mode"]) or real(*a, **k))
    fast = fasterdiff.accelerate(_load(standin_copy), calibrate=True)
    fast.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.INFO, logger="fasterdiff"):
        first = _run(fast, PLANNED).stats
    path = standin_copy / plan_file.PLANS_FILE_NAME
    entry = plan_file.read_plans(path)["entries"][f"DDIM-{PLANNED}"]
    assert searches == ["quick"] and entry["search"]["mode"] == "quick"
    assert entry["search"]["pair_samples"] > 0 and entry["search"]["seconds"] > 0
    assert any(f"calibration on the spot: DDIM-{PLANNED} done" in r.getMessage() for r in caplog.records)
    chosen = entry["levels"]["auto"]["plan"]
    assert chosen and f"'{chosen}' from {path}" in first.plan and first.full_evaluations < PLANNED
    # the same pipeline, and a new one on the same weights: the kept plan, no new search
    again = _run(fast, PLANNED).stats
    other = fasterdiff.accelerate(_load(standin_copy), calibrate=True)
    other.set_progress_bar_config(disable=True)
    third = _run(other, PLANNED).stats
    assert searches == ["quick"]
    assert again.plan == first.plan == third.plan and again.key_steps == first.key_steps == third.key_steps
    # without calibrate=True the plan file beside the weights is read as ever
    plain = fasterdiff.accelerate(_load(standin_copy))
    plain.set_progress_bar_config(disable=True)
    assert _run(plain, PLANNED).stats.plan == first.plan


def test_the_kept_entry_is_the_quick_calibration_of_the_command_line(standin_copy, tmp_path):
    from fasterdiff.__main__ import main

    fast = fasterdiff.accelerate(_load(standin_copy), calibrate=True)
    fast.set_progress_bar_config(disable=True)
    _run(fast)
    spot = plan_file.read_plans(standin_copy / plan_file.PLANS_FILE_NAME)["entries"][f"DDIM-{STEPS}"]
    out = tmp_path / "cli.json"
    assert main(["calibrate", "--quick", "--weights", str(standin_copy), "--steps", str(STEPS), "--out", str(out)]) == 0
    cli = plan_file.read_plans(out)["entries"][f"DDIM-{STEPS}"]
    assert {k: v["plan"] for k, v in spot["levels"].items()} == {k: v["plan"] for k, v in cli["levels"].items()}
    assert spot["search"]["pair_samples"] == cli["search"]["pair_samples"]


def test_weights_that_cannot_be_written_to_are_kept_in_a_cache_named_by_the_weights(standin_copy, tmp_path, monkeypatch):
    monkeypatch.setenv(on_the_spot.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(on_the_spot.os, "access", lambda path, mode: False)
    pipe = _load(standin_copy)
    identity = on_the_spot.weights_identity(pipe.unet)
    assert identity == on_the_spot.weights_identity(_load(standin_copy).unet)  # loading again: the same name
    expected = tmp_path / "cache" / "plans" / identity / plan_file.PLANS_FILE_NAME
    assert on_the_spot.plans_file_for(pipe) == expected
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] += 0.5  # other weights: another name
    assert on_the_spot.weights_identity(pipe.unet) != identity


def test_a_budget_that_runs_out_leaves_the_paper_plan(standin_copy, tmp_path, caplog):
    pipe = _load(standin_copy)
    path = tmp_path / "plans.json"
    with caplog.at_level(logging.INFO, logger="fasterdiff"):
        assert on_the_spot.calibrate_here(pipe, pipe.scheduler, STEPS, path, budget_s=1e-9, progress=False) is None
    assert not path.exists()
    assert any("stopped after" in r.getMessage() for r in caplog.records)
    fast = fasterdiff.accelerate(pipe, plans=path, calibrate=True)
    fast.set_progress_bar_config(disable=True)
    fast._spot_tried.add(f"DDIM-{STEPS}")  # as if it had tried and run out: no second try in this pipeline
    assert "paper" in _run(fast).stats.plan


def test_an_inpainting_unet_is_not_calibrated_here(caplog, tmp_path):
    from fasterdiff.tools.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    inpaint = type("P", (), {})()  # only what calibrate_here reads
    inpaint.unet = tiny_inpaint_unet()
    inpaint.scheduler, inpaint.config, inpaint.components = pipe.scheduler, {}, pipe.components
    with caplog.at_level(logging.INFO, logger="fasterdiff"):
        assert on_the_spot.calibrate_here(inpaint, pipe.scheduler, 4, tmp_path / "p.json") is None
    assert any("draws only from an image" in r.getMessage() for r in caplog.records)


def test_calibrate_must_be_a_bool(pipe):
    with pytest.raises(ValueError, match="calibrate must be True or False"):
        fasterdiff.accelerate(pipe, calibrate="yes")


def test_the_service_calibrates_its_default_run_and_all_its_pipelines_read_it(standin_copy):
    generator = Generator(_load(standin_copy))
    assert generator.calibrate(sampler="DDIM", steps=STEPS)
    path = standin_copy / plan_file.PLANS_FILE_NAME
    assert f"DDIM-{STEPS}" in plan_file.read_plans(path)["entries"]
    for fast in [*generator.fast.values(), *generator.editing.values()]:
        assert fast.settings.plans == str(path)
    assert generator.calibrate(sampler="DDIM", steps=STEPS)  # already there: no second search


def test_a_read_only_weights_folder_with_the_entry_is_read_there_and_without_it_the_cache_is_used(standin_copy, tmp_path, monkeypatch):
    monkeypatch.setenv(on_the_spot.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(on_the_spot.os, "access", lambda path, mode: False)  # as a Cog image's weights/ may be
    shutil.copy(PIPELINE_DIR / plan_file.PLANS_FILE_NAME, standin_copy / plan_file.PLANS_FILE_NAME)  # DDIM-50 calibrated
    fast = fasterdiff.accelerate(_load(standin_copy), calibrate=True)
    beside = standin_copy / plan_file.PLANS_FILE_NAME
    assert on_the_spot.plans_file_for(fast, None, "DDIM-50") == beside
    assert on_the_spot.plans_file_for(fast, None, f"DDIM-{STEPS}").parent.parent == tmp_path / "cache" / "plans"
