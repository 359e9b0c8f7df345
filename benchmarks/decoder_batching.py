"""How much does batching a group's steps save? Seconds per step of SD 1.5's UNet (random
weights) at two latent sizes, through the same reuse machinery sampling uses.

    python benchmarks/decoder_batching.py [--rounds 2] [--device cpu] [--profile]

Each round times, interleaved, for a guided batch of 2 rows per step at 16x16 and 32x32
latents (128 and 256 px): a full UNet call (a key step), a non-key step on its own (the
encoder replayed: decoder only), and a key step with ten non-key steps in ONE batched
call (per step).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from fasterdiff.plan import encoder_plan  # noqa: E402
from fasterdiff.reuse import ReuseExecutor, Run, UNetView  # noqa: E402
from fasterdiff.tiny import sd15_unet  # noqa: E402

GROUP = 11  # a key step and ten non-key steps


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(unet, latents, text, parallel: bool) -> list[float]:
    """Seconds of each UNet call over one group, sequential or batched."""
    timesteps = torch.linspace(900, 500, GROUP).round().long().to(latents.device)
    executor = ReuseExecutor()
    view = UNetView(unet, executor)
    run = Run(encoder_plan(unet, [0], GROUP), parallel, None, lambda: timesteps)
    with executor.running(unet, run):
        return [timed(lambda t=t: view(latents, t, encoder_hidden_states=text)) for t in timesteps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also profile one batched group call at 32x32")
    args = parser.parse_args()
    unet = sd15_unet().to(args.device)
    text = torch.randn(2, 77, 768, device=args.device)
    rows = {}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for size in (16, 32):
                latents = torch.randn(2, 4, size, size, device=args.device)
                seq = measure(unet, latents, text, parallel=False)
                par = measure(unet, latents, text, parallel=True)
                rows.setdefault((size, "full UNet call (key step)"), []).append(seq[0])
                rows.setdefault((size, "non-key step alone (decoder)"), []).append(sum(seq[1:]) / (GROUP - 1))
                rows.setdefault((size, f"per step, {GROUP} steps in one call"), []).append(sum(par) / GROUP)
        if args.profile:
            with torch.profiler.profile() as prof:
                measure(unet, torch.randn(2, 4, 32, 32, device=args.device), text, parallel=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    print("| latent | part | seconds, one per round |\n|---|---|---|")
    for (size, part), secs in rows.items():
        print(f"| {size}x{size} | {part} | {', '.join(f'{s:.2f}' for s in secs[1:])} |")


if __name__ == "__main__":
    main()
