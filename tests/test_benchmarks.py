"""`analyze features` and `benchmark fidelity`: what they record and compute."""

import json
import subprocess
import sys

import pytest
import torch
from cog_server import ROOT
from conftest import gen

import fasterdiff
from fasterdiff.tools import features
from fasterdiff.tools.bench.fidelity import reuse_noise_prediction
from fasterdiff.tools.tiny import tiny_pipeline


def test_recorded_bottleneck_is_the_mid_block_output_of_each_call(pipe):
    inputs = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs: inputs.append((args, kwargs)), with_kwargs=True)
    try:
        with features.recording(pipe.unet) as calls:
            pipe("a cat", num_inference_steps=3, height=64, width=64, generator=gen(0), output_type="latent")
    finally:
        handle.remove()
    names = features.feature_names(pipe.unet)
    assert len(calls) == 3 and all(len(c) == len(names) for c in calls)
    b = names.index(next(n for n in names if n.startswith("B")))
    for (args, kwargs), recorded in zip(inputs, calls):
        sample, t = args[0], args[1]
        cond = kwargs["encoder_hidden_states"]
        mids = []
        hook = pipe.unet.mid_block.register_forward_hook(lambda _m, _a, out: mids.append(out))
        with torch.no_grad():
            pipe.unet(sample, t, encoder_hidden_states=cond)
        hook.remove()
        mid = mids[0]
        torch.testing.assert_close(recorded[b], mid)
    # Every feature has the spatial size its name says, and the channels of its block.
    for name, tensor in zip(names, recorded):
        assert f"({tensor.shape[-1]}px)" in name, (name, tuple(tensor.shape))
    # The last decoder feature is what the output head reads.
    heads = []
    hook = pipe.unet.conv_norm_out.register_forward_pre_hook(lambda _m, args: heads.append(args[0]))
    try:
        with features.recording(pipe.unet) as calls:
            pipe("a cat", num_inference_steps=2, height=64, width=64, generator=gen(0), output_type="latent")
    finally:
        hook.remove()
    for head, recorded in zip(heads, calls):
        torch.testing.assert_close(recorded[-1], head)


def test_changes_are_relative_and_mse():
    f0 = [torch.ones(1, 2, 4, 4), torch.full((1, 2, 2, 2), 3.0)]
    f1 = [2 * f0[0], f0[1]]
    assert features.change(f0, f1) == ([1.0, 0.0], [1.0, 0.0])
    f2 = [f1[0], torch.zeros(1, 2, 2, 2)]
    assert features.change(f1, f2) == ([0.0, 1.0], [0.0, 9.0])


def test_reusing_the_noise_prediction_runs_the_unet_only_at_key_steps(pipe):
    kw = dict(num_inference_steps=6, height=64, width=64, output_type="np")
    plain = pipe("a cat", generator=gen(1), **kw).images
    with reuse_noise_prediction(pipe.unet, set(range(6))):
        same = pipe("a cat", generator=gen(1), **kw).images
    assert (plain == same).all()
    seen = []  # the timestep of every real UNet pass
    spy = pipe.unet.time_proj.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0][0])))
    try:
        with reuse_noise_prediction(pipe.unet, {0, 3}):
            reused = pipe("a cat", generator=gen(1), **kw).images
    finally:
        spy.remove()
    # The UNet ran exactly at steps 0 and 3 (0-based), at their timesteps.
    assert seen == [int(pipe.scheduler.timesteps[0]), int(pipe.scheduler.timesteps[3])]
    assert not (reused == plain).all()
    assert "forward" not in vars(pipe.unet)  # patch removed


def test_analyze_features_cli_writes_plot_table_and_json(weights, tmp_path):
    from fasterdiff.__main__ import main

    prefix = tmp_path / "feat"
    assert main(["analyze", "features", "--weights", str(weights), "--steps", "4",
                 "--prompt", "a cat", "--prompt", "a dog", "--out", str(prefix)]) == 0
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert data["environment"]["torch"] and data["command"].startswith("python -m fasterdiff analyze features")
    assert len(data["relative"]) == 3 and len(data["relative"][0]) == len(data["features"])
    assert prefix.with_suffix(".png").stat().st_size > 0 and "decoder / encoder" in prefix.with_suffix(".md").read_text()


def test_fidelity_benchmark_quick_run(tmp_path):
    from fasterdiff.tools.bench import fidelity, fidelity_report

    cfg = fidelity.Config(steps=6, seeds=2, prompts=3)
    result = fidelity.run(cfg)
    rows = {r["method"]: r for r in result["rows"]}
    images = result["_images"]
    assert result["pairs"] == 6 and result["batch_per_call"] == 3
    stock = rows["stock diffusers"]
    assert stock["encoder_calls"] == 6 and stock["decoder_steps"] == 6 and stock["unet_cost"] == 1.0
    # Sequential and parallel decoding make the same images; the paper's key steps for 6 are 0-3.
    seq, par = "fasterdiff paper, sequential", "fasterdiff paper, parallel"
    assert (images[seq] - images[par]).abs().max() < 1e-3
    assert rows[seq]["encoder_calls"] == 4 and rows[seq]["decoder_steps"] == 6 and rows[par]["decoder_steps"] == 6
    gpu = {k: rows[k]["gpu_seconds_modelled"] for k in (par, seq, "stock diffusers")}
    assert gpu[par] < gpu[seq] < gpu["stock diffusers"] == pytest.approx(6 * fasterdiff.cost.GPU_SECONDS[1]["full"])
    assert 0.5 < rows[seq]["unet_cost"] < 1.0 and rows[seq]["unet_cost"] == pytest.approx(rows[par]["unet_cost"], rel=1e-6)
    reuse = rows["control: reuse whole noise prediction, paper key steps"]
    assert reuse["encoder_calls"] == 4 and reuse["decoder_steps"] == 4
    assert reuse["unet_cost"] == pytest.approx(4 / 6, rel=1e-3)  # FLOPs scale with UNet passes
    fewer = [r for r in result["rows"] if r["kind"] == "fewer steps"]
    assert fewer and all(r["encoder_calls"] == r["steps"] and r["unet_cost"] == pytest.approx(r["steps"] / 6, rel=1e-3) for r in fewer)
    # Every method's cost has a fewer-steps control at round(6 * cost) steps (when below 6).
    for r in result["rows"]:
        if r["kind"] in ("method", "eps reuse") and round(6 * r["unet_cost"]) < 6:
            assert any(r["method"] in f["matches"] for f in fewer if f["steps"] == round(6 * r["unet_cost"])), r["method"]
    # Stock against itself, and the metrics against an independent computation.
    assert stock["psnr_vs_stock"] == 100.0 and stock["ssim_vs_stock"] == pytest.approx(1.0, abs=1e-6)
    other = images["control: stock, 3 steps"]
    mse = ((other - images["stock diffusers"]) / 2).pow(2).flatten(1).mean(1)
    assert rows["control: stock, 3 steps"]["psnr_vs_stock"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-4)
    assert rows["control: stock, 3 steps"]["psnr_vs_stock_pooled"] == pytest.approx(float(10 * torch.log10(1 / mse.mean())), rel=1e-4)
    assert result["real"]["reference"]["distinct_digits"] == 6
    for r in result["rows"]:  # the paired counts account for the accuracy difference
        p = r["paired_vs_stock"]
        assert round((r["accuracy"]["all"] - stock["accuracy"]["all"]) * 6) == p["gained"] - p["lost"]
    rows_in_grid = fidelity_report.grid_rows(result)
    assert "stock diffusers" in rows_in_grid and any(f["method"] in rows_in_grid for f in fewer if f["matches"])
    paths = fidelity_report.write(result, tmp_path / "fid", command="test")
    assert all(p.stat().st_size > 0 for p in paths) and len(paths) == 4
    written = json.loads(paths[0].read_text())
    assert written["command"] == "test" and written["environment"]["torch"] and "_images" not in written
    assert "| stock diffusers | 6 | 6 / 6 | 1.00 |" in paths[1].read_text()


def test_fidelity_cli_refuses_a_stochastic_sampler_and_a_missing_standin(tmp_path, capsys):
    from fasterdiff.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["benchmark", "fidelity", "--sampler", "PNDM"])
    assert done.value.code == 2 and "--sampler" in capsys.readouterr().err
    assert main(["benchmark", "fidelity", "--standin", str(tmp_path)]) == 2
    assert "python -m fasterdiff.tools.standin.train" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, flag, message",
    [
        (["benchmark", "speed", "--rounds", "0"], "--rounds", "must be in [1, 20], got 0"),
        (["benchmark", "speed", "--steps", "0"], "--steps", "must be in [2, 100], got 0"),
        (["benchmark", "speed", "--size", "100"], "--size", "must be a multiple of 8, got 100"),
        (["benchmark", "speed", "--max-batch", "0"], "--max-batch", "must be in [1, 64], got 0"),
        (["benchmark", "fidelity", "--guidance-scale", "nan"], "--guidance-scale", "got nan"),
        (["calibrate", "--size", "33"], "--size", "must be a multiple of 8, got 33"),
    ],
)
def test_benchmark_and_calibrate_arguments_are_bounded(argv, flag, message, capsys):
    from fasterdiff.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and flag in err and message in err, err


def test_fractional_values_pass_the_cli_bounds():
    from fasterdiff.__main__ import _bounded, _in_range

    assert _bounded("guidance_scale", float)("7.5") == 7.5
    assert _bounded("noise_injection_strength", float)("0.003") == 0.003
    assert _in_range(32, 1024, multiple=8)("264") == 264


PACKAGE = ROOT / "fasterdiff"


def _modules():
    import ast

    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def test_harness_code_is_shared_not_copied():
    """One Method, one pass-counting probe, one result writer; no private helper imported across modules."""
    import ast

    methods, probes, writers, private = [], [], [], []
    for name, tree in _modules():
        source = (ROOT / name).read_text()
        methods += [name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == "Method"]
        if "resnets[0].conv1" in source:
            probes.append(name)
        if "environment()" in source and "json.dumps" in source:
            writers.append(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert methods == ["fasterdiff/tools/bench/harness.py"]
    assert probes == ["fasterdiff/tools/bench/harness.py"]
    assert writers == ["fasterdiff/tools/bench/report.py"]
    assert private == []


def test_pass_counts_follow_the_plan(pipe):
    import fasterdiff
    from fasterdiff.tools.bench.harness import count_passes

    fast = fasterdiff.accelerate(pipe, max_batch=None)  # whole groups per call
    plan = fasterdiff.schedule.resolve("paper", 12)
    for parallel, decoder_calls in ((False, 12), (True, len(plan.groups))):
        with count_passes(pipe.unet) as passes:
            fast("a cat", num_inference_steps=12, height=64, width=64, parallel=parallel, num_images_per_prompt=2,
                 generator=gen(0), output_type="latent")
        assert passes.encoder_calls == len(plan.steps) and passes.encoder == [4] * len(plan.steps)  # CFG x 2 images
        assert passes.decoder_calls == decoder_calls and passes.decoder_steps == 12


def test_docs_speed_tables_are_the_generated_ones():
    from fasterdiff.tools.bench import speed

    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    header = speed.markdown_table({"rows": []}).splitlines()[0]
    for name in ("DDIM-50", "DPM-Solver++-20"):
        generated = (ROOT / "benchmarks" / "results" / f"speed-cpu-{name}.md").read_text()
        table = "\n".join(line for line in generated.splitlines() if line.startswith("|"))
        assert table.startswith(header + "\n")
        assert table in docs, name


def test_quick_speed_benchmark_says_tiny_and_leaves_no_untracked_files(capsys):
    from fasterdiff.__main__ import main

    assert main(["benchmark", "speed", "--quick", "--steps", "2", "--rounds", "1"]) == 0
    stdout = capsys.readouterr().out
    wrote = next(line for line in stdout.splitlines() if line.startswith("wrote "))
    paths = [ROOT / p for p in wrote.removeprefix("wrote ").split(", ")]
    try:
        assert "model: tiny random pipeline" in stdout
        assert paths and all(p.is_file() for p in paths)
        if (ROOT / ".git").exists():
            ignored = subprocess.run(["git", "check-ignore", "--no-index", *map(str, paths)], cwd=ROOT,
                                     capture_output=True, text=True)
            assert sorted(ignored.stdout.split()) == sorted(str(p) for p in paths), ignored
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def test_paired_comparison_counts_discordant_pairs_with_mcnemars_exact_p():
    from fasterdiff.tools.bench.fidelity import paired_comparison

    stock = [1, 1, 1, 1, 1, 1, 0, 0, 1]
    worse = [0, 0, 0, 0, 0, 0, 0, 0, 1]  # six lost, none gained: p = 2 / 2**6
    assert paired_comparison(worse, stock) == {"gained": 0, "lost": 6, "p": 2 / 64}
    mixed = [0, 0, 1, 1, 1, 1, 1, 1, 1]  # two lost, two gained
    assert paired_comparison(mixed, stock) == {"gained": 2, "lost": 2, "p": 1.0}
    assert paired_comparison(stock, stock)["p"] == 1.0


def _script(name: str):
    """A script in benchmarks/, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _plan_study():
    return _script("plan_study")


def test_plan_study_horizon_limited_forecast_only_where_the_extrapolation_is_short(pipe):
    study = _plan_study()
    timesteps = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0]
    plan = study.depth_plan(pipe.unet, (0, 3, 6), 9, lambda i: 0)
    assert plan == fasterdiff.plan.deep_plan(pipe.unet, 3, 9)  # branch 0 everywhere: DeepCache's own
    # Steps 1, 2 have one key step before them (no slope); 4 and 7 extrapolate 100 from a gap of
    # 300 (within half of it); 5 and 8 extrapolate 200 (beyond).
    assert study.horizon_limited(plan, timesteps, 0.5).forecast == (0, 0, 0, 0, 1, 0, 0, 1, 0)
    assert study.horizon_limited(plan, timesteps, 1.0).forecast == (0, 0, 0, 0, 1, 1, 0, 1, 1)
    mixed = study.depth_plan(pipe.unet, (0, 3, 6), 9, lambda i: 1 if i < 3 else 0)
    branch_1 = frozenset(fasterdiff.unet.deep_modules(pipe.unet, 1))
    assert mixed.replay[1] == mixed.replay[2] == branch_1 and mixed.replay[4] == plan.replay[4] != branch_1


def test_plan_study_quick_run_on_the_standin():
    study = _plan_study()
    result = study.run("DDIM", 6, 2, progress=False)
    rows = {r["name"]: r for r in result["rows"]}
    assert result["rows"][0]["name"] == "stock" and rows["stock"]["family"] == "control"
    families = {r["family"].split(" (")[0] for r in result["rows"]}
    assert families == {"control", "grid", "branch depth", "mixed depth", "horizon-limited forecast"}
    # FLOPs grow as the replayed branch shrinks; every plan is scored against stock's accuracy
    flops = [rows[f"every 3, branch {b}"]["unet_flops"] for b in (1, 2, 3)]
    assert rows["every 3, replay (DeepCache)"]["unet_flops"] < flops[0] < flops[1] < flops[2] < 1
    for r in result["rows"][1:]:
        assert r["gained"] - r["lost"] == round((r["accuracy"] - rows["stock"]["accuracy"]) * 2)
        assert r["psnr_min"] <= r["psnr_pooled"] <= r["psnr_mean"]
    assert "| control | stock |" in study.markdown(result, "cmd")


def test_size_transfer_quick_run_on_the_standin():
    study = _script("size_transfer")
    assert study.spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert study.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.866, abs=1e-3)  # tied ranks averaged
    result = study.run("DDIM", 6, 3, (32, 64))
    small, large = (result["entries"][s] for s in ("32", "64"))
    assert (small["calibrated_on"]["height"], large["calibrated_on"]["height"]) == (32, 64)
    assert -1 <= result["spearman_grid"] <= 1 and result["grid_plans"] >= 6
    large_rows = {r["name"]: r for r in large["plans"]}
    for level, cell in result["levels"].items():
        assert cell["bar_at_large"] == large["levels"][level]["psnr_pooled"]
        if cell["large_pick"] is not None and "refined" not in cell["large_pick"]:  # a grid plan: its own row
            assert cell["large_pick_psnr_at_large"] == large_rows[cell["large_pick"]]["psnr_pooled"]
        if cell["small_pick"] is not None:
            assert cell["small_pick_psnr_at_large"] > 0
    assert "| auto |" in study.markdown([result], "cmd")


def test_noise_injection_sweep_quick_run_on_the_standin():
    sweep = _script("noise_injection")
    result = sweep.run("DDIM", 8, prompts_every=30, strengths=(0.0, 0.3), plans=("paper",))
    rows = result["rows"]
    assert result["prompts"] == 6 and [(r["plan"], r["strength"]) for r in rows] == [
        ("stock", None), ("paper", 0.0), ("paper", 0.3)]
    assert rows[0]["psnr_mean"] == 100.0  # stock against itself
    for r in rows:
        low, high = r["accuracy_95"]
        assert 0 <= low <= r["accuracy"] <= high <= 1
    # injection moves the images away from stock's; 0.3 far more than reuse alone
    assert rows[2]["psnr_mean"] < rows[1]["psnr_mean"] < 100
    assert "| paper | 0.3 |" in sweep.markdown(result, "cmd")
    # the control: with Euler, z_T as drawn is far more noise than z_T in the step's scale
    euler = {d: sweep.run("Euler", 8, prompts_every=30, strengths=(0.05,), plans=("paper",), as_drawn=d) for d in (False, True)}
    assert euler[True]["z_t"] == "as drawn" and fasterdiff.pipeline.injected_noise.__name__ == "injected_noise"
    assert euler[True]["rows"][1]["psnr_mean"] < euler[False]["rows"][1]["psnr_mean"] - 3


def test_noise_injection_sweep_img2img_quick_run_on_the_standin():
    sweep = _script("noise_injection")
    result = sweep.run("DDIM", 10, prompts_every=30, strengths=(0.0,), plans=("paper", "auto"), img2img=0.6)
    stock, paper, auto = result["rows"]
    assert result["img2img"] == 0.6 and stock["psnr_mean"] == 100.0
    # auto ran the stand-in's calibrated plan (no DDIM-10 entry: the paper's key steps), not stock
    assert paper["psnr_mean"] < 100 and auto["psnr_mean"] < 100
    assert "img2img at strength 0.6" in sweep.markdown(result, "cmd")


def test_gpu_check_dry_run_times_every_method_and_compiled_equals_eager(tmp_path):
    check = _script("gpu_check")
    result = check.main(["--quick", "--out", str(tmp_path)])
    assert result["errors"] == [] and result["notes"] == []
    methods = check.methods(tiny_pipeline(), quick=True)
    assert any(m.first_config_only for m in methods)
    assert [m.name for m in check.methods(tiny_pipeline(), quick=False)] == [m.name for m in methods]  # the GPU's rows
    for config in check.QUICK_CONFIGS:
        rows = [r for r in result["rows"] if (r["sampler"], r["steps"], r["images"]) == config]
        expected = [m.name for m in methods if config == check.QUICK_CONFIGS[0] or not m.first_config_only]
        assert sorted(r["method"] for r in rows) == sorted(expected)
        assert all(r["speedup_median"] > 0 and len(r["seconds"]) == 1 for r in rows)
    assert next(r for r in result["rows"] if r["method"] == "stock eager")["speedup_median"] == 1.0
    # the dry run compiles nothing, so each "compiled" row is its eager twin's pipeline: the
    # comparison (same seed, same plan) must find no difference at all
    assert len(result["compiled_vs_eager"]) == len(check.COMPILED_TWINS)
    for line in result["compiled_vs_eager"]:
        assert float(line.split("difference to eager ")[1].split()[0]) == 0.0, line
    assert set(result["compile"]) == {"unique_graphs", "graph_breaks", "frames", "cudagraph_skips"}
    assert json.loads((tmp_path / "gpu-check.json").read_text()) == result
    assert "| DPM-Solver++-4 | 2 | stock eager |" in (tmp_path / "gpu-check.md").read_text()


def test_gpu_check_keeps_to_its_budget_and_records_a_failing_method(tmp_path, monkeypatch):
    check = _script("gpu_check")

    class Broken:
        scheduler = tiny_pipeline().scheduler

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, *args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    real = check.methods
    monkeypatch.setattr(check, "methods", lambda pipe, quick: [real(pipe, quick)[0], check.TimedPipeline("broken", Broken())])
    result = check.main(["--quick", "--out", str(tmp_path), "--budget", "0", "--rounds", "3"])
    first, second = check.QUICK_CONFIGS
    assert [r["method"] for r in result["rows"]] == ["stock eager"]  # the first configuration only
    assert len(result["rows"][0]["seconds"]) == 1  # the warm-up and one timed round, then out of time
    assert result["errors"] == [
        {"sampler": first[0], "steps": first[1], "images": first[2], "method": "broken",
         "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    ]
    assert result["notes"][:2] == [
        f"{first[0]}-{first[1]}, {first[2]} image(s): 1 of 3 rounds (time budget)",
        f"{second[0]}-{second[1]}, {second[2]} image(s): left out (time budget; about "
        + result["notes"][1].split("about ")[1],
    ]
    text = (tmp_path / "gpu-check.md").read_text()
    assert "broken: RuntimeError: CUDA error" in text and "left out (time budget" in text
    # without a baseline nothing can be compared: the check stops, with what it has written
    monkeypatch.setattr(check, "methods", lambda pipe, quick: [check.TimedPipeline(check.STOCK, Broken())])
    with pytest.raises(RuntimeError, match="illegal memory access"):
        check.main(["--quick", "--out", str(tmp_path / "stock")])
    assert json.loads((tmp_path / "stock" / "gpu-check.json").read_text())["rows"] == []
    with pytest.raises(SystemExit):
        check.main(["--quick", "--out", str(tmp_path), "--budget", "nan"])
    # stopped from outside (as a time limit stops it) after one round: that round is written
    import os
    import signal
    import types

    calls = []

    class Stopped(Broken):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # in round 2
                os.kill(os.getpid(), signal.SIGTERM)
            return types.SimpleNamespace(images=None)

    monkeypatch.setattr(check, "methods", lambda pipe, quick: [real(pipe, quick)[0], check.TimedPipeline("stopped", Stopped())])
    with pytest.raises(SystemExit) as stopped:
        check.main(["--quick", "--out", str(tmp_path / "term"), "--rounds", "3"])
    assert stopped.value.code == 128 + signal.SIGTERM
    written = json.loads((tmp_path / "term" / "gpu-check.json").read_text())
    assert sorted((r["method"], len(r["seconds"])) for r in written["rows"]) == [("stock eager", 1), ("stopped", 1)]
    assert signal.getsignal(signal.SIGTERM) is not check._exit_on_sigterm  # the handler is put back
