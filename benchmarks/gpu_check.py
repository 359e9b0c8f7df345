"""The GPU check: every method side by side on one GPU, in one process, in 8 to 9 minutes.

    python benchmarks/gpu_check.py --out DIR            # CUDA, SD 1.5's UNet (random weights), fp16, 512 px
    python benchmarks/gpu_check.py --quick --out DIR    # CPU dry run on a tiny pipeline (seconds)

Records, for DDIM-50 and DPM-Solver++-20 at 1 and 4 images per prompt: stock eager, stock
with ``torch.compile(unet)``, fasterdiff's default (``auto``, which runs its fallback, the
paper's key steps: no SD 1.5 plan file exists here; ``max_batch="auto"``), paper unbounded,
uniform-5, auto and auto-fast with the stand-in's plan file (its calibrated plans run on SD's
UNet: their speed, not their fidelity), the compiled path (default, paper unbounded, whose
padded batches show what padding costs, and stand-in auto), and
DeepCache intervals 3 and 5; at DDIM-50 with one image also stock and stand-in auto with CUDA
graphs (``mode="reduce-overhead"``), and stock and the default with a channels-last UNet.
Seconds per call (median and min-max of interleaved rounds after a warm-up), speedup against
stock within each round, and peak CUDA memory. After the first configuration it checks that the
compiled runs give their eager twins' latents and that ``enable_model_cpu_offload()`` works
with an accelerated run.

It keeps to a time budget counted from its start (``--budget``): configurations run in the
order above and those that would not fit are left out, a configuration past the budget stops
after fewer rounds (and one a minute past it before its first timed round), and a method that
fails is recorded with its error and left out of the rest of that configuration.
``gpu-check.json`` and ``gpu-check.md`` are written after every round, on SIGTERM and on any
error, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff.tools.bench.harness import deepcache  # noqa: E402
from fasterdiff.calibrate import PLANS_FILE_NAME  # noqa: E402
from fasterdiff.samplers import make_scheduler  # noqa: E402
from fasterdiff.tools.standin import PIPELINE_DIR  # noqa: E402
from fasterdiff.tools.tiny import sd15_unet, tiny_pipeline  # noqa: E402

STANDIN_PLANS = PIPELINE_DIR / PLANS_FILE_NAME
# (sampler, steps, images per prompt), most important first: a short budget drops the last
CONFIGS = [("DDIM", 50, 1), ("DDIM", 50, 4), ("DPM-Solver++", 20, 1), ("DPM-Solver++", 20, 4)]
QUICK_CONFIGS = [("DDIM", 6, 1), ("DPM-Solver++", 4, 2)]
STOCK = "stock eager"
CUDA_GRAPHS = {"mode": "reduce-overhead"}
# fasterdiff's compiled rows, whose latents are compared with their eager twin's after the first configuration
COMPILED_TWINS = {
    "fasterdiff default, compiled": "fasterdiff default (auto: the paper's key steps without a plan file; max_batch auto)",
    "fasterdiff paper, unbounded, compiled": "fasterdiff paper, unbounded",
    "fasterdiff auto (stand-in's plans), compiled": "fasterdiff auto, the stand-in's calibrated plans",
    "fasterdiff auto (stand-in's plans), compiled, CUDA graphs": "fasterdiff auto, the stand-in's calibrated plans",
}


@dataclass
class TimedPipeline:
    """A pipeline this check times as it is (scheduler set per configuration), under ``context``
    (DeepCache's patch); fasterdiff.tools.bench.harness.Method samples through a function instead."""

    name: str
    pipe: object
    context: Callable = contextlib.nullcontext
    first_config_only: bool = False  # the CUDA-graph rows: their compile costs a minute


def stock_compiled(pipe, options: bool | dict):
    """``pipe`` with ``torch.compile(pipe.unet)`` (``options`` as ``accelerate``'s ``compile``); False: ``pipe``."""
    if options is False:
        return pipe
    unet = torch.compile(pipe.unet, **({} if options is True else options))
    compiled = type(pipe)(**{**pipe.components, "unet": unet}, requires_safety_checker=False)
    compiled.set_progress_bar_config(disable=True)
    return compiled


def channels_last(pipe):
    """``pipe`` with its own copy of the UNet in channels-last memory format."""
    unet = copy.deepcopy(pipe.unet).to(memory_format=torch.channels_last)
    other = type(pipe)(**{**pipe.components, "unet": unet}, requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return other


def methods(pipe, quick: bool) -> list[TimedPipeline]:
    # the CPU dry run compiles nothing (the tests check compiled == eager on their own)
    compiled, graphs = (False, False) if quick else (True, CUDA_GRAPHS)
    standin = dict(key_steps="auto", plans=STANDIN_PLANS)
    out = [
        TimedPipeline(STOCK, pipe),
        TimedPipeline("stock + torch.compile(unet)", stock_compiled(pipe, compiled)),
        TimedPipeline("stock + torch.compile(unet), CUDA graphs", stock_compiled(pipe, graphs), first_config_only=True),
    ]
    last = channels_last(pipe)
    out += [
        TimedPipeline("stock, channels_last UNet", last, first_config_only=True),
        TimedPipeline("fasterdiff default, channels_last UNet", fasterdiff.accelerate(last), first_config_only=True),
    ]
    fast = {
        COMPILED_TWINS["fasterdiff default, compiled"]: fasterdiff.accelerate(pipe),
        "fasterdiff paper, unbounded": fasterdiff.accelerate(pipe, max_batch=None),
        "fasterdiff uniform-5": fasterdiff.accelerate(pipe, key_steps=5, max_batch=None),
        # the stand-in has SD 1.5's block layout, so its calibrated plans run on SD's UNet as they are:
        # their speed here (not their fidelity, which belongs to the stand-in)
        COMPILED_TWINS["fasterdiff auto (stand-in's plans), compiled"]: fasterdiff.accelerate(pipe, **standin),
        "fasterdiff auto-fast, the stand-in's calibrated plans": fasterdiff.accelerate(pipe, key_steps="auto-fast", plans=STANDIN_PLANS),
        "fasterdiff default, compiled": fasterdiff.accelerate(pipe, compile=compiled),
        "fasterdiff auto (stand-in's plans), compiled": fasterdiff.accelerate(pipe, compile=compiled, **standin),
        # the same plan as "paper, unbounded": compiled, its groups of 5, 10 and 15 steps run padded to 8 and 16
        "fasterdiff paper, unbounded, compiled": fasterdiff.accelerate(pipe, max_batch=None, compile=compiled),
    }
    out += [TimedPipeline(name, f) for name, f in fast.items()]
    out.append(
        TimedPipeline(
            "fasterdiff auto (stand-in's plans), compiled, CUDA graphs",
            fasterdiff.accelerate(pipe, compile=graphs, **standin),
            first_config_only=True,
        )
    )
    for m in out:
        m.pipe.set_progress_bar_config(disable=True)
    try:
        import DeepCache  # noqa: F401

        out += [TimedPipeline(f"DeepCache interval {k}", pipe, lambda k=k: deepcache(pipe, interval=k)) for k in (3, 5)]
    except ImportError:
        print("DeepCache not installed: its rows are skipped")
    return out


def call(p, kw, prompt="a photo of a cat"):
    return p(prompt, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def timed_call(p, kw, device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    call(p, kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return time.perf_counter() - start, peak


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:300]


def run_config(result, entries, config, size, rounds, device, deadline, checkpoint) -> float:
    """Time every entry on one configuration, interleaved; returns the seconds of its last round.

    After every round the configuration's rows in ``result`` are updated and ``checkpoint()``
    writes them, so a run killed mid-way keeps its finished rounds."""
    sampler, steps, images = config
    kw = dict(num_inference_steps=steps, num_images_per_prompt=images, height=size, width=size)
    for m in entries:
        m.pipe.scheduler = make_scheduler(sampler, m.pipe.scheduler.config)
    live = list(entries)
    secs = {m.name: [] for m in entries}
    peaks = {m.name: 0 for m in entries}
    round_seconds, done = 0.0, 0
    for r in range(rounds + 1):  # round 0 warms up (and compiles)
        late = time.perf_counter() > deadline + 60 if r == 1 else time.perf_counter() + round_seconds > deadline
        if r >= 1 and late:
            result["notes"].append(f"{sampler}-{steps}, {images} image(s): {done} of {rounds} rounds (time budget)")
            break
        began = time.perf_counter()
        order = live[r % len(live):] + live[: r % len(live)]
        for m in order:
            try:
                with m.context():
                    s, peak = timed_call(m.pipe, kw, device)
            except Exception as err:  # recorded; the rest of the check goes on
                if m.name == STOCK:
                    raise
                result["errors"].append({"sampler": sampler, "steps": steps, "images": images, "method": m.name, "error": short_error(err)})
                print(f"  {m.name} failed: {short_error(err)}", flush=True)
                live.remove(m)
                with contextlib.suppress(Exception):  # a broken CUDA context raises here too
                    torch.cuda.empty_cache()
                continue
            if r:
                secs[m.name].append(s)
                peaks[m.name] = max(peaks[m.name], peak)
        round_seconds = time.perf_counter() - began
        done = r
        print(f"  {sampler}-{steps}, {images} image(s): round {r}/{rounds} done in {round_seconds:.0f} s "
              f"({time.perf_counter() - deadline:+.0f} s from the deadline)", flush=True)
        result["rows"] = [row for row in result["rows"] if (row["sampler"], row["steps"], row["images"]) != config]
        result["rows"] += summary_rows(config, entries, secs, peaks)
        checkpoint()
    return round_seconds


def summary_rows(config, entries, secs, peaks) -> list[dict]:
    sampler, steps, images = config
    rows = []
    for m in entries:
        if not secs[m.name]:
            continue
        # a method that failed has fewer rounds, always the first ones: zip pairs them with stock's
        ratios = [b / a for a, b in zip(secs[m.name], secs[STOCK])]
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "images": images,
                "method": m.name,
                "seconds": list(secs[m.name]),  # a copy: later rounds append to secs
                "seconds_median": statistics.median(secs[m.name]),
                "speedup_median": statistics.median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "peak_mb": round(peaks[m.name] / 2**20),
            }
        )
    return rows


def compiled_equals_eager(entries, config, size) -> list[str]:
    """Max abs latent difference of each compiled row from its eager twin, on the first configuration at one image."""
    by_name = {m.name: m for m in entries}
    kw = dict(num_inference_steps=config[1], height=size, width=size)
    lines = []
    for compiled, eager in COMPILED_TWINS.items():
        if compiled not in by_name or eager not in by_name:
            lines.append(f"{compiled}: not compared (it or its eager twin failed)")
            continue
        try:
            for name in (compiled, eager):
                by_name[name].pipe.scheduler = make_scheduler(config[0], by_name[name].pipe.scheduler.config)
            a, b = call(by_name[compiled].pipe, kw).float().cpu(), call(by_name[eager].pipe, kw).float().cpu()
            lines.append(f"{compiled}: max abs latent difference to eager {(a - b).abs().max().item():.2e} (latents' max {b.abs().max().item():.2f})")
        except Exception as err:
            lines.append(f"{compiled}: {short_error(err)}")
    return lines


def offload_check(pipe, device) -> str:
    if device.type != "cuda":
        return "skipped (needs CUDA)"
    fast = None
    try:
        kw = dict(num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="latent")
        reference = fasterdiff.accelerate(pipe)("a cat", **kw).images
        # copies of the models: offloading moves them and hooks them, and later rows time ``pipe``'s
        copies = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in pipe.components.items()}
        fast = fasterdiff.accelerate(type(pipe)(**copies, requires_safety_checker=False))
        fast.enable_model_cpu_offload()
        kw["generator"] = torch.Generator().manual_seed(0)
        got = fast("a cat", **kw).images
        diff = (got.float().cpu() - reference.float().cpu()).abs().max().item()
        return f"ran; max abs latent difference to the same run without offload {diff:.2e}"
    except Exception as err:
        return f"failed: {short_error(err)}"
    finally:
        del fast
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def compile_counters() -> dict:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": sum(counters["graph_break"].values()),
        "frames": dict(counters["frames"]),
        "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),  # graphs run without CUDA graphs (reason in the log)
    }


def write(out: Path, result: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# GPU check: {result['machine']}, torch {result['torch']}, {result['size']}px, {result['rounds']} rounds, "
        f"{result['seconds_total']} s in all",
        "",
        f"enable_model_cpu_offload() with an accelerated run: {result['offload']}",
        "",
        *[f"- {line}" for line in result["compiled_vs_eager"] + result["notes"]],
        f"- Dynamo: {result['compile']}",
        "",
        "| sampler | images | method | s/call median | speedup median (min-max) | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['sampler']}-{r['steps']} | {r['images']} | {r['method']} | {r['seconds_median']:.3f} | "
            f"{r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['peak_mb']} |"
        )
    if result["errors"]:
        lines += ["", "Failed (left out of the rest of their configuration):", ""]
        lines += [f"- {e['sampler']}-{e['steps']}, {e['images']} image(s), {e['method']}: {e['error']}" for e in result["errors"]]
    text = "\n".join(lines) + "\n"
    (out / "gpu-check.md").write_text(text)
    return text


def seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 3600] seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=None, choices=range(1, 21), metavar="1-20", help="timed rounds (default: 3; 1 with --quick)")
    parser.add_argument(
        "--budget", type=seconds, default=480,
        help="seconds from the start, set-up included, after which no further configuration or timed round starts "
        "(a configuration's first timed round: up to a minute later). Default 480: with the last round's overrun, "
        "about 9 minutes in all; a run stopped from outside (SIGTERM) keeps every finished round",
    )
    parser.add_argument("--quick", action="store_true", help="CPU dry run on a tiny pipeline")
    args = parser.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    device = torch.device("cpu" if quick else "cuda")
    if quick:
        pipe, size, configs = tiny_pipeline(), 64, QUICK_CONFIGS
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        # every compiled row compiles the same UNet code: room for their variants (8 by default)
        torch._dynamo.config.recompile_limit = 64
        pipe = tiny_pipeline(unet=sd15_unet()).to(device, torch.float16)
        size, configs = 512, CONFIGS
    rounds = args.rounds or (1 if quick else 3)
    entries = methods(pipe, quick)
    deadline = started + args.budget
    result = {
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "size": size,
        "rounds": rounds,
        "budget_s": args.budget,
        "seconds_total": 0.0,
        "offload": "not run",
        "compiled_vs_eager": [],
        "notes": [],
        "compile": {},
        "errors": [],
        "rows": [],
    }
    out = Path(args.out)

    def checkpoint():
        result["seconds_total"] = round(time.perf_counter() - started, 1)
        result["compile"] = compile_counters()
        return write(out, result)

    previous = None  # (config, seconds of its last round)
    stop_on_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for i, config in enumerate(configs):
            sampler, steps, images = config
            if previous is not None:
                (_, p_steps, p_images), p_round = previous
                # a warm-up and one timed round, without recompiling: optimistic on purpose, since the
                # checks are done by then and a configuration cut short costs only its own rows
                estimate = 2 * p_round * (steps * images) / (p_steps * p_images)
                if time.perf_counter() + estimate > deadline:
                    result["notes"].append(f"{sampler}-{steps}, {images} image(s): left out (time budget; about {estimate:.0f} s needed)")
                    continue
            chosen = [m for m in entries if i == 0 or not m.first_config_only]
            previous = config, run_config(result, chosen, config, size, rounds, device, deadline, checkpoint)
            if i == 0:  # the checks, while the first configuration's graphs are compiled and its shapes recorded
                failed = {e["method"] for e in result["errors"]}
                result["compiled_vs_eager"] = compiled_equals_eager([m for m in entries if m.name not in failed], config, size)
                result["offload"] = offload_check(pipe, device)
                checkpoint()
    finally:  # whatever happened (SIGTERM included), what was measured is written
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        text = checkpoint()
    print(text)
    return result


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through main's finally, which writes the results


if __name__ == "__main__":
    main()
