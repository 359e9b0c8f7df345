"""How much does batching a group's decoders save? Decoder seconds per step, one step per
call vs ten steps in one call, for SD 1.5's UNet (random weights) at two latent sizes.

    python benchmarks/decoder_batching.py [--rounds 2] [--device cpu] [--profile]

Each round times, interleaved: the encoder, the decoder for 1 step and for 10 steps
(guided batch of 2 per step), at 16x16 and 32x32 latents (128 and 256 px).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from fasterdiff import unet as unet_split  # noqa: E402
from fasterdiff.tiny import sd15_unet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also profile one 5-step decoder call at 32x32")
    args = parser.parse_args()
    unet = sd15_unet().to(args.device)
    text = torch.randn(2, 77, 768, device=args.device)
    emb = unet_split.time_embedding(unet, torch.tensor([500, 500], device=args.device), torch.float32)
    rows = {}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for size in (16, 32):
                latents = torch.randn(2, 4, size, size, device=args.device)
                start = time.perf_counter()
                features = unet_split.encode(unet, latents, emb, text)
                rows.setdefault((size, "encoder"), []).append(time.perf_counter() - start)
                for steps in (1, 10):
                    start = time.perf_counter()
                    unet_split.decode(unet, features.repeat(steps), emb.repeat(steps, 1), text.repeat(steps, 1, 1))
                    rows.setdefault((size, f"decoder per step, {steps} per call"), []).append(
                        (time.perf_counter() - start) / steps
                    )
    if args.profile:
        with torch.no_grad(), torch.profiler.profile() as prof:
            unet_split.decode(unet, features.repeat(5), emb.repeat(5, 1), text.repeat(5, 1, 1))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    print("| latent | part | seconds, one per round |\n|---|---|---|")
    for (size, part), secs in rows.items():
        print(f"| {size}x{size} | {part} | {', '.join(f'{s:.2f}' for s in secs[1:])} |")


if __name__ == "__main__":
    main()
