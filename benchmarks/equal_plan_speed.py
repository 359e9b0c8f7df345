"""fasterdiff against DeepCache's own code running the same plan, on the trained stand-in at
its native size (32 px), CPU, one image: where fasterdiff's per-step time goes.

    python benchmarks/equal_plan_speed.py [--sampler DDIM] [--steps 50] [--rounds 7] [--profile]

Rows, interleaved round by round (each round starting one method later), the same prompt and seed: stock; DeepCache interval 3
(DeepCacheSDHelper, branch 0); fasterdiff ``cache_interval=3`` (the same plan, replayed
features); the same key steps with fasterdiff's damped linear forecast (what calibrated deep
plans run). Reports the median seconds per call, min-max, and the ratio of medians against
DeepCache. ``--profile``: under cProfile, the Python time each method's own code adds per
UNet evaluation. Writes equal-plan-speed-cpu-<sampler>-<steps>.md.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff.plan import deep_plan  # noqa: E402
from fasterdiff.samplers import make_scheduler  # noqa: E402
from fasterdiff.tools.bench.harness import deepcache  # noqa: E402
from fasterdiff.tools.standin import PIPELINE_DIR, require  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampler", default="DDIM")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    require()
    pipe = fasterdiff.load_pipeline(PIPELINE_DIR, device="cpu", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    forecast = deep_plan(pipe.unet, 3, args.steps).with_forecast(1, 0.5)
    fast = fasterdiff.accelerate(pipe)
    fast.set_progress_bar_config(disable=True)
    methods = {
        "stock diffusers": (pipe, {}, False),
        "DeepCache (interval 3)": (pipe, {}, True),
        "fasterdiff cache_interval=3": (fast, {"cache_interval": 3}, False),
        "fasterdiff interval 3, forecast 1 damped 0.5": (fast, {"key_steps": forecast}, False),
    }
    prompt = "a red seven"

    def once(target, kw, use_deepcache) -> float:
        with deepcache(pipe, 3) if use_deepcache else contextlib.nullcontext():
            start = time.perf_counter()
            target(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
            return time.perf_counter() - start

    for name, m in methods.items():  # warm-up
        once(*m)
    times = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.rounds):  # each round starts with the next method: no method always follows the same one
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(once(*methods[name]))
    dc = statistics.median(times["DeepCache (interval 3)"])
    lines = [
        f"Equal plan, fasterdiff against DeepCache's own code: stand-in (32 px), {args.sampler}-{args.steps}, one image, "
        f"CPU ({torch.get_num_threads()} threads), {args.rounds} interleaved rounds. Command: "
        f"`python benchmarks/equal_plan_speed.py {' '.join(sys.argv[1:])}`.",
        "",
        "| method | s/call median (min-max) | DeepCache's median / this median |",
        "|---|---|---|",
    ]
    for name, t in times.items():
        med = statistics.median(t)
        lines.append(f"| {name} | {med:.3f} ({min(t):.3f}-{max(t):.3f}) | {dc / med:.3f} |")
    if args.profile:
        lines += ["", "Own Python time per UNet evaluation under cProfile (3 runs each; the profiler inflates it): the "
                  "method's own functions (fasterdiff/ outside tools, or DeepCache/), summed.", "",
                  "| method | own time per evaluation (ms) | share of the run |", "|---|---|---|"]
        for name, marker in (("DeepCache (interval 3)", "/DeepCache/"), ("fasterdiff cache_interval=3", "/fasterdiff/"),
                             ("fasterdiff interval 3, forecast 1 damped 0.5", "/fasterdiff/")):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(3):
                once(*methods[name])
            profile.disable()
            stats = pstats.Stats(profile).stats
            own = sum(tt for (path, _, _), (_, _, tt, _, _) in stats.items() if marker in path and "/tools/" not in path)
            total = sum(tt for (_, _, tt, _, _) in stats.values())
            lines.append(f"| {name} | {1000 * own / (3 * args.steps):.3f} | {own / total:.1%} |")
    report = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"equal-plan-speed-cpu-{args.sampler}-{args.steps}.md"
    path.write_text(report)
    print(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
