"""cog.yaml, the predictor's API use, weight download errors and the benchmark CLI."""

import json
import os
import subprocess
import sys

import yaml
from cog_server import ROOT

from fasterdiff.schedule import resolve


def test_cog_yaml_uses_current_fields():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    assert config["run"] == "predict.py:Predictor" and "predict" not in config
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert "python_packages" not in build
    requirements = (ROOT / build["python_requirements"]).read_text()
    assert "torch==" in requirements and "diffusers==" in requirements


def test_predictor_loads_without_deprecation_warnings():
    code = (
        "from cog.predictor import load_predictor_from_ref\n"
        "from cog._inspector import create_predictor\n"
        "create_predictor('predict', 'Predictor')\n"
        "load_predictor_from_ref('predict.py:Predictor')\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_download_weights_offline_fails_with_the_command_to_retry(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "fasterdiff", "download-weights", "--dest", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "could not download stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr
    assert "python -m fasterdiff download-weights" in result.stderr


def test_speed_benchmark_quick_runs_every_method(tmp_path):
    out = tmp_path / "speed"
    result = subprocess.run(
        [sys.executable, "-m", "fasterdiff", "benchmark", "speed", "--quick", "--steps", "10", "--rounds", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert len(rows) == 8, list(rows)
    assert rows["stock diffusers"]["encoder_calls"] == rows["stock diffusers"]["decoder_calls"] == 10
    paper = resolve("paper", 10)
    assert rows["fasterdiff paper, sequential"]["encoder_calls"] == len(paper.steps)
    assert rows["fasterdiff paper, sequential"]["decoder_calls"] == 10
    assert rows["fasterdiff paper, parallel"]["decoder_calls"] == len(paper.groups)
    assert rows["fasterdiff paper, parallel + ToMe (0.5)"]["encoder_calls"] == len(paper.steps)
    assert rows["DeepCache (interval 3, branch 0)"]["encoder_calls"] == 4  # steps 0, 3, 6, 9
    assert data["command"].startswith("python -m fasterdiff benchmark speed --quick")
    assert "torch" in data["environment"] and data["environment"]["cpu_count"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| stock diffusers |" in out.with_suffix(".md").read_text()
