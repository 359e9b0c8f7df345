"""The reuse core before the rewrite (commit 9b497ee: a copied UNet forward) against today's
(wrappers on the UNet's own modules): paper key steps, parallel, unbounded batch, with stock;
interleaved rounds in one process (SD 1.5's UNet architecture, random weights, CPU fp32).

    git worktree add /tmp/oldcore 9b497ee
    python benchmarks/core_ab.py /tmp/oldcore STEPS SAMPLER SIZE ROUNDS    # e.g. 20 DPM-Solver++ 256 3
"""
import importlib.util, json, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
old_root = Path(sys.argv.pop(1)) / "fasterdiff"
spec = importlib.util.spec_from_file_location(
    "fasterdiff_old", old_root / "__init__.py", submodule_search_locations=[str(old_root)])
old = importlib.util.module_from_spec(spec); sys.modules["fasterdiff_old"] = old; spec.loader.exec_module(old)
import fasterdiff
from fasterdiff.bench.speed import Config, build_pipeline
from fasterdiff.samplers import make_scheduler

steps, sampler, size, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = Config(steps=steps, sampler=sampler, size=size)
pipe, source = build_pipeline(cfg)
with torch.no_grad():
    cond, uncond = pipe.encode_prompt("a photograph of a lighthouse", pipe.device, 1, True, "")
latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(0))
common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, height=size, width=size, output_type="latent")
stock_sched = make_scheduler(sampler, pipe.scheduler.config)
new = fasterdiff.accelerate(pipe, key_steps="paper", parallel=True, max_batch=None)
oldp = old.accelerate(pipe, key_steps="paper", parallel=True, max_batch=None)
new.set_progress_bar_config(disable=True); oldp.set_progress_bar_config(disable=True)

def stock():
    pipe.scheduler = stock_sched
    return pipe(latents=latents.clone(), **common).images
methods = {
    "stock": stock,
    "old core, paper parallel": lambda: oldp(latents=latents.clone(), sampler=sampler, **common).images,
    "new core, paper parallel": lambda: new(latents=latents.clone(), sampler=sampler, **common).images,
}
outs = {k: f() for k, f in methods.items()}  # warm-up
print("max |old - new| latents:", float((outs["old core, paper parallel"] - outs["new core, paper parallel"]).abs().max()), flush=True)
times = {k: [] for k in methods}
names = list(methods)
for r in range(rounds):
    order = names[r % 3:] + names[:r % 3]
    for k in order:
        t = time.perf_counter(); methods[k](); times[k].append(time.perf_counter() - t)
    print(f"round {r}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names), flush=True)
for k in names:
    ratios = [a / b for a, b in zip(times["stock"], times[k])]
    print(f"{k}: s median {statistics.median(times[k]):.2f} ({min(times[k]):.2f}-{max(times[k]):.2f}); speedup vs stock median {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
r = [a / b for a, b in zip(times["old core, paper parallel"], times["new core, paper parallel"])]
print(f"new vs old (old s / new s) per round: {[round(x, 3) for x in r]}")
print(json.dumps({"source": source, "torch": torch.__version__, "threads": torch.get_num_threads(), "times": times}))
