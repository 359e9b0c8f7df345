"""Does ``max_batch="auto"`` batch as well as the best fixed choice? Wall time on this CPU of
fasterdiff's paper plan (parallel) with max_batch "auto", None (a whole group per call) and
fixed 2, 4, 8 and 16 steps per call, at several image sizes, interleaved rounds.

    python benchmarks/auto_batching.py [--sizes 32 128 256] [--rounds 3] [--steps 50] [--choices ...] [--out FILE]

SD 1.5's UNet (its config, random weights: speed does not need trained ones) in a tiny
pipeline, DDIM, one image with guidance. Prints, per size, seconds per call (median, min-max)
and each choice's time relative to the fastest (ratio of medians). Writes
benchmarks/results/auto-batching-cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import fasterdiff  # noqa: E402
from fasterdiff.tools.tiny import sd15_unet, tiny_pipeline  # noqa: E402

CHOICES = {"auto": "auto", "None (whole group)": None, "2 steps": 2, "4 steps": 4, "8 steps": 8, "16 steps": 16}


def run(sizes, rounds: int, steps: int, choices=tuple(CHOICES)) -> list[str]:
    pipe = tiny_pipeline(unet=sd15_unet())
    pipe.set_progress_bar_config(disable=True)
    lines = []
    for size in sizes:
        fast = {name: fasterdiff.accelerate(pipe, key_steps="paper", max_batch=CHOICES[name]) for name in choices}
        seconds = {name: [] for name in fast}
        per_call = {}
        for r in range(rounds + 1):  # round 0 warms up
            names = list(fast)[r % len(fast):] + list(fast)[: r % len(fast)]
            for name in names:
                kw = dict(height=size, width=size, num_inference_steps=steps, output_type="latent",
                          generator=torch.Generator().manual_seed(0))
                start = time.perf_counter()
                out = fast[name]("a cat", **kw)
                if r:
                    seconds[name].append(time.perf_counter() - start)
                per_call[name] = out.stats.steps_per_call
        best = min(statistics.median(s) for s in seconds.values())
        lines += [f"\n{size}x{size} px (latents {size // 8}x{size // 8}), DDIM-{steps}, paper key steps, parallel, 1 image:\n",
                  "| max_batch | steps per call | s/call median (min-max) | median / fastest median |", "|---|---|---|---|"]
        for name, s in seconds.items():
            m = statistics.median(s)
            lines.append(f"| {name} | {max(per_call[name])} at most | {m:.2f} ({min(s):.2f}-{max(s):.2f}) | {m / best:.3f} |")
        print("\n".join(lines[-len(seconds) - 3:]), flush=True)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 21), metavar="1-20")
    parser.add_argument("--steps", type=int, default=50, choices=range(2, 101), metavar="2-100")
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES), metavar="CHOICE",
                        help=f"max_batch rows to time (default: all of {', '.join(CHOICES)})")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "auto-batching-cpu.md"))
    args = parser.parse_args(argv)
    lines = run(args.sizes, args.rounds, args.steps, args.choices)
    command = "python benchmarks/auto_batching.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.write_text(f"# max_batch choices on this CPU\n\n`{command.strip()}` ({torch.get_num_threads()} threads, "
                   f"{args.rounds} interleaved rounds after a warm-up)\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
