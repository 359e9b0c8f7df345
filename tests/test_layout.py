"""The house: the runtime imports no tool, one source for defaults, the plan file read
once, resources found without the source tree, plots optional."""

import dataclasses
import inspect
import json
import logging
import os
import subprocess
import sys

import pytest
from cog_server import ROOT

import fasterdiff
from fasterdiff import defaults, plan_file, service
from fasterdiff.tools.standin import PIPELINE_DIR


def test_an_auto_run_loads_no_tool_and_no_plotting():
    # a fresh interpreter: the stand-in has a plan file, so "auto" reads it and picks a calibrated plan
    code = (
        "import sys, torch, fasterdiff\n"
        f"pipe = fasterdiff.load_pipeline({str(PIPELINE_DIR)!r}, device='cpu', local_files_only=True)\n"
        "fast = fasterdiff.accelerate(pipe)\n"
        "fast.set_progress_bar_config(disable=True)\n"
        "out = fast('a red seven', num_inference_steps=20, sampler='DPM-Solver++', output_type='latent',\n"
        "           generator=torch.Generator().manual_seed(0))\n"
        "assert 'from' in out.stats.plan, out.stats.plan\n"
        "bad = [m for m in sys.modules if m.startswith(('fasterdiff.tools', 'matplotlib', 'DeepCache', 'tomesd'))]\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_runtime_modules_import_no_tool():
    runtime = [p for p in (ROOT / "fasterdiff").glob("*.py")]
    assert len(runtime) >= 10
    for path in runtime:
        text = path.read_text()
        assert ".tools" not in text.replace("``", "") or path.name == "__main__.py", path
        assert "import matplotlib" not in text, path


def test_defaults_have_one_source():
    settings = fasterdiff.Settings()
    for name, value in {"key_steps": defaults.KEY_STEPS, "parallel": defaults.PARALLEL, "max_batch": defaults.MAX_BATCH,
                        "noise_injection": defaults.NOISE_INJECTION, "reuse": defaults.REUSE, "branch": defaults.BRANCH,
                        "noise_injection_start": defaults.NOISE_INJECTION_START, "forecast": defaults.FORECAST}.items():
        assert getattr(settings, name) == value, name
        assert inspect.signature(fasterdiff.accelerate).parameters[name].default == value, name
    request = {f.name: f.default for f in dataclasses.fields(service.Request)}
    assert request["noise_injection_strength"] == defaults.NOISE_INJECTION
    assert request["key_step_mode"] == defaults.KEY_STEP_MODE and request["sampler"] == defaults.SAMPLER
    assert request["num_inference_steps"] == defaults.NUM_INFERENCE_STEPS and request["guidance_scale"] == defaults.GUIDANCE_SCALE
    assert service.BOUNDS is defaults.BOUNDS


def test_the_plan_file_is_read_once_and_again_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / plan_file.PLANS_FILE_NAME
    plan_file.write_entry(path, {"sampler": "DDIM", "steps": 8, "levels": {}, "plans": []})
    parses = []
    real = json.loads
    monkeypatch.setattr(plan_file.json, "loads", lambda text: parses.append(1) or real(text))
    first = plan_file.read_plans(path)
    assert plan_file.read_plans(path) is first and len(parses) == 1
    plan_file.write_entry(path, {"sampler": "DDIM", "steps": 20, "levels": {}, "plans": []})
    os.utime(path, ns=(1, 1))  # whatever the clock's resolution: another stamp
    again = plan_file.read_plans(path)
    assert set(again["entries"]) == {"DDIM-8", "DDIM-20"} and len(parses) >= 2


def test_no_plan_file_is_said_once_per_pipeline(pipe, caplog):
    fast = fasterdiff.accelerate(pipe)
    fast.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.INFO, logger="fasterdiff"):
        for _ in range(3):
            stats = fast("a cat", num_inference_steps=4, height=64, width=64, output_type="latent").stats
            assert "no plan file" in stats.plan  # each run's stats still say it
    said = [r for r in caplog.records if "no plan file" in r.getMessage()]
    assert len(said) == 1


def test_weights_folder_comes_from_the_environment_or_the_working_directory(tmp_path, monkeypatch):
    from fasterdiff.weights import WEIGHTS_ENV, weights_dir

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert weights_dir() == tmp_path / "weights"
    assert weights_dir(tmp_path / "here") == tmp_path / "here"
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env"))
    assert weights_dir(tmp_path / "here") == tmp_path / "env"
    assert "__file__" not in (ROOT / "fasterdiff" / "weights.py").read_text()


def test_every_picture_is_optional(tmp_path, monkeypatch, capsys):
    """Without matplotlib each plotting function writes nothing and says how to get it."""
    from fasterdiff.tools import calibration_report, features, plots
    from fasterdiff.tools.bench import fidelity_report, speed

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plots.pyplot(tmp_path / "x.png") is None
    entry = json.loads((PIPELINE_DIR / plan_file.PLANS_FILE_NAME).read_text())["entries"]["DDIM-50"]
    drawn = [
        (calibration_report.plot, entry),
        (features.plot, {}),
        (speed.bar_chart, {"rows": []}),
        (fidelity_report.frontier_plot, {}),
        (fidelity_report.grid, {}),
    ]
    for i, (draw, data) in enumerate(drawn):
        draw(data, tmp_path / f"p{i}.png")
    out = capsys.readouterr().out
    assert out.count(plots.INSTALL_HINT) == len(drawn) + 1
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("module", ["fasterdiff", "fasterdiff.service", "fasterdiff.pipeline", "fasterdiff.choice"])
def test_no_import_cycle_through_tools(module):
    result = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('fasterdiff.tools')))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_a_command_without_matplotlib_writes_its_tables_and_names_only_them(weights, tmp_path, monkeypatch, capsys):
    from fasterdiff.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    prefix = tmp_path / "feat"
    assert main(["analyze", "features", "--weights", str(weights), "--steps", "3", "--prompt", "a cat", "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert prefix.with_suffix(".json").is_file() and prefix.with_suffix(".md").is_file()
    assert not prefix.with_suffix(".png").exists() and "feat.png" not in out.split("wrote ")[-1]
    assert "pip install 'fasterdiff[plots]'" in out
