"""cog.yaml, the predictor's API use, weight download errors and the benchmark CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_download_weights_offline_into_a_non_empty_folder_is_not_a_success(tmp_path):
    """Offline, huggingface_hub returns an existing local_dir as it is instead of raising."""
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "README.md").write_text("how the weights get here\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "fasterdiff", "download-weights", "--dest", str(dest)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "downloaded to" not in result.stdout
    assert f"no complete Stable Diffusion 1.5 weights in {dest} (missing: model_index.json)" in result.stderr
    assert f"python -m fasterdiff download-weights --dest {dest}" in result.stderr


def test_download_weights_checks_every_file_the_pipeline_needs(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from fasterdiff import __main__ as cli
    from fasterdiff.tools.tiny import tiny_pipeline

    full = tmp_path / "full"
    tiny_pipeline().save_pretrained(full)
    drop = {"partial": "unet/diffusion_pytorch_model.safetensors", "no-tokenizer": "tokenizer/tokenizer_config.json"}

    def fake_download(repo_id, local_dir, **_kw):  # what a cut-off or offline download leaves behind
        shutil.copytree(full, local_dir, dirs_exist_ok=True)
        name = Path(local_dir).name
        if name in drop:
            (Path(local_dir) / drop[name]).unlink()
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    for name, missing in (("partial", "unet/*.safetensors or *.bin"), ("no-tokenizer", "tokenizer/tokenizer_config.json")):
        assert cli.main(["download-weights", "--dest", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"(missing: {missing})" in err and "python -m fasterdiff download-weights --dest" in err, err
    assert cli.main(["download-weights", "--dest", str(tmp_path / "complete")]) == 0
    assert f"downloaded to {tmp_path / 'complete'}" in capsys.readouterr().out


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
    assert len(rows) == 10, list(rows)
    assert rows["stock diffusers"]["encoder_calls"] == rows["stock diffusers"]["decoder_calls"] == 10
    paper = resolve("paper", 10)
    assert rows["fasterdiff paper, sequential"]["encoder_calls"] == len(paper.steps)
    assert rows["fasterdiff paper, sequential"]["decoder_calls"] == 10
    assert rows["fasterdiff paper, parallel"]["decoder_calls"] == len(paper.groups)
    assert rows["fasterdiff paper, parallel + ToMe (0.5)"]["encoder_calls"] == len(paper.steps)
    assert rows["DeepCache (interval 3, branch 0)"]["encoder_calls"] == 4  # steps 0, 3, 6, 9
    assert rows["fasterdiff deep (interval 3, branch 0)"]["encoder_calls"] == 4
    assert rows["fasterdiff deep (interval 3, branch 0)"]["decoder_calls"] == 4  # the deep up block: key steps only
    assert data["command"].startswith("python -m fasterdiff benchmark speed --quick")
    assert "torch" in data["environment"] and data["environment"]["cpu_count"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| stock diffusers |" in out.with_suffix(".md").read_text()


def test_predictor_inputs_are_literals_cog_build_can_read():
    """`cog build` (0.23) reads predict.py statically: a bound, choice list, default or
    description that is not a plain literal is silently dropped or fails the build."""
    import ast

    source = (ROOT / "predict.py").read_text()
    run = next(
        node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef) and node.name == "run"
    )
    calls = [d for d in run.args.defaults if isinstance(d, ast.Call)]
    assert len(calls) == len(run.args.args) - 1  # every input but self uses Input(...)
    for call in calls:
        for kw in call.keywords:
            segment = ast.get_source_segment(source, kw.value)
            if kw.arg in ("ge", "le", "default"):
                assert isinstance(kw.value, ast.Constant), segment
            elif kw.arg == "description":
                assert isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str), segment
                # one string token: an implicitly concatenated one would reach the schema garbled
                assert segment[0] in "\"'" and segment.count(segment[0]) == 2, segment
            elif kw.arg == "choices":
                assert isinstance(kw.value, ast.List), segment
                assert all(isinstance(e, ast.Constant) for e in kw.value.elts), segment


def test_wheel_holds_every_module_and_data_file_of_the_package(tmp_path):
    """`pip wheel .` must ship the subpackages (bench/, standin/) and configs/sd15_unet.json."""
    import zipfile

    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "fasterdiff", src / "fasterdiff", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", src)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fasterdiff-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package = src / "fasterdiff"
    expected = {f"fasterdiff/{p.relative_to(package).as_posix()}" for p in package.rglob("*") if p.is_file()}
    assert {"fasterdiff/tools/bench/speed.py", "fasterdiff/tools/standin/data.py", "fasterdiff/tools/configs/sd15_unet.json",
            "fasterdiff/calibration_prompts.txt"} <= expected
    assert sorted(expected - shipped) == []


def test_build_outputs_are_git_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("build/lib/fasterdiff/__init__.py", "fasterdiff.egg-info/PKG-INFO"):
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert result.returncode == 0, f"{path} is not git-ignored"
