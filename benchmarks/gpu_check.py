"""The GPU check: every method side by side on one GPU, in one process, in about 8 minutes.

    python benchmarks/gpu_check.py --out DIR            # CUDA, SD 1.5's UNet (random weights), fp16, 512 px
    python benchmarks/gpu_check.py --quick --out DIR    # CPU dry run on a tiny pipeline (seconds)

Records, for DDIM-50 and DPM-Solver++-20 at 1 and 4 images per prompt: stock eager, stock
with ``torch.compile(unet)``, fasterdiff's default, paper (unbounded and auto-bounded),
uniform-5, auto (which measures its fallback: no SD 1.5 plan file exists here), auto and
auto-fast with the stand-in's plan file (its calibrated plans run on SD's UNet: their speed,
not their fidelity), the compiled path, DeepCache intervals 3 and 5 and fasterdiff's own deep plan; seconds per
call (median and min-max of interleaved rounds after a warm-up), speedup against stock
within each round, and peak CUDA memory. Then checks that ``enable_model_cpu_offload()``
works with an accelerated run. Writes ``gpu-check.json`` and ``gpu-check.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff.calibrate import PLANS_FILE_NAME  # noqa: E402
from fasterdiff.samplers import make_scheduler  # noqa: E402
from fasterdiff.standin import PIPELINE_DIR  # noqa: E402
from fasterdiff.tiny import sd15_unet, tiny_pipeline  # noqa: E402

STANDIN_PLANS = PIPELINE_DIR / PLANS_FILE_NAME


@contextlib.contextmanager
def deepcache(pipe, interval):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()


def methods(pipe, compiled_stock, quick: bool):
    fast = {
        "fasterdiff default (auto: the paper's key steps without a plan file; max_batch auto)": fasterdiff.accelerate(pipe),
        "fasterdiff paper, unbounded": fasterdiff.accelerate(pipe, max_batch=None),
        "fasterdiff uniform-5": fasterdiff.accelerate(pipe, key_steps=5, max_batch=None),
        "fasterdiff uniform-5, forecast 1": fasterdiff.accelerate(pipe, key_steps=5, forecast=1, max_batch=None),
        "fasterdiff auto (fallback: no plan file)": fasterdiff.accelerate(pipe, key_steps="auto"),
        # the stand-in has SD 1.5's block layout, so its calibrated plans run on SD's UNet as they are:
        # their speed here (not their fidelity, which belongs to the stand-in)
        "fasterdiff auto, the stand-in's calibrated plans": fasterdiff.accelerate(pipe, key_steps="auto", plans=STANDIN_PLANS),
        "fasterdiff auto-fast, the stand-in's calibrated plans": fasterdiff.accelerate(pipe, key_steps="auto-fast", plans=STANDIN_PLANS),
        "fasterdiff deep, interval 3": fasterdiff.accelerate(pipe, key_steps=3, reuse="deep"),
        "fasterdiff deep, interval 5": fasterdiff.accelerate(pipe, key_steps=5, reuse="deep"),
        "fasterdiff uniform-5, compiled": fasterdiff.accelerate(pipe, key_steps=5, max_batch=None, compile=not quick),
    }
    out = [("stock eager", pipe, contextlib.nullcontext), ("stock + torch.compile(unet)", compiled_stock, contextlib.nullcontext)]
    out += [(name, f, contextlib.nullcontext) for name, f in fast.items()]
    try:
        import DeepCache  # noqa: F401

        out += [(f"DeepCache interval {k}", pipe, lambda k=k: deepcache(pipe, k)) for k in (3, 5)]
    except ImportError:
        print("DeepCache not installed: its rows are skipped")
    return out


def timed_call(p, kw, sampler, device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    p("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return time.perf_counter() - start, peak


def run_config(rows_out, entries, sampler, steps, images, size, rounds, device):
    kw = dict(num_inference_steps=steps, num_images_per_prompt=images, height=size, width=size)
    for name, p, _ in entries:
        p.scheduler = make_scheduler(sampler, p.scheduler.config)
    secs = {name: [] for name, _, _ in entries}
    peaks = {}
    for r in range(rounds + 1):  # round 0 warms up (and compiles)
        order = entries[r % len(entries):] + entries[: r % len(entries)]
        for name, p, ctx in order:
            with ctx():
                s, peak = timed_call(p, kw, sampler, device)
            if r:
                secs[name].append(s)
                peaks[name] = max(peaks.get(name, 0), peak)
        print(f"  {sampler}-{steps}, {images} image(s): round {r}/{rounds} done", flush=True)
    stock = secs["stock eager"]
    for name, _, _ in entries:
        ratios = [b / a for a, b in zip(secs[name], stock)]
        rows_out.append(
            {
                "sampler": sampler,
                "steps": steps,
                "images": images,
                "method": name,
                "seconds": secs[name],
                "seconds_median": statistics.median(secs[name]),
                "speedup_median": statistics.median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "peak_mb": round(peaks[name] / 2**20),
            }
        )


def offload_check(pipe, device) -> str:
    if device.type != "cuda":
        return "skipped (needs CUDA)"
    reference = fasterdiff.accelerate(pipe)("a cat", num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="latent").images
    other = type(pipe)(**pipe.components, requires_safety_checker=False)
    fast = fasterdiff.accelerate(other)
    fast.enable_model_cpu_offload()
    got = fast("a cat", num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="latent").images
    diff = (got.float().cpu() - reference.float().cpu()).abs().max().item()
    return f"ran; max abs latent difference to the same run without offload {diff:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU dry run on a tiny pipeline")
    args = parser.parse_args()
    quick = args.quick or not torch.cuda.is_available()
    device = torch.device("cpu" if quick else "cuda")
    if quick:
        pipe, size, configs, rounds = tiny_pipeline(), 64, [("DDIM", 6, 1), ("DPM-Solver++", 4, 2)], 1
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        pipe = tiny_pipeline(unet=sd15_unet()).to(device, torch.float16)
        size, rounds = 512, args.rounds
        configs = [("DDIM", 50, 1), ("DDIM", 50, 4), ("DPM-Solver++", 20, 1), ("DPM-Solver++", 20, 4)]
    pipe.set_progress_bar_config(disable=True)
    compiled_stock = type(pipe)(**{**pipe.components, "unet": pipe.unet if quick else torch.compile(pipe.unet)}, requires_safety_checker=False)
    compiled_stock.set_progress_bar_config(disable=True)
    entries = methods(pipe, compiled_stock, quick)
    started = time.perf_counter()
    rows = []
    for sampler, steps, images in configs:
        run_config(rows, entries, sampler, steps, images, size, rounds, device)
    offload = offload_check(pipe, device)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "machine": machine,
        "torch": torch.__version__,
        "size": size,
        "rounds": rounds,
        "seconds_total": round(time.perf_counter() - started, 1),
        "offload": offload,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# GPU check: {machine}, torch {torch.__version__}, {size}px, {rounds} rounds, {result['seconds_total']} s in all",
        "",
        f"enable_model_cpu_offload() with an accelerated run: {offload}",
        "",
        "| sampler | images | method | s/call median | speedup median (min-max) | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']}-{r['steps']} | {r['images']} | {r['method']} | {r['seconds_median']:.3f} | "
            f"{r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['peak_mb']} |"
        )
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
