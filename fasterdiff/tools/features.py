"""The paper's Fig. 2a on any SD-format pipeline: how much UNet features change per step.

Stock sampling runs with forward hooks that record, at every UNet call,

* the encoder features E_s: each down block's output at its own resolution (before
  its down-sampler),
* the bottleneck B: the mid block's output,
* the decoder features D_s: each up block's output at its own resolution (before
  its up-sampler),

and reports, for each feature and each step i >= 1, the change from step i-1:

* ``relative``: ||F_i - F_{i-1}||^2 / ||F_{i-1}||^2 (scale-free, comparable across layers),
* ``mse``: the paper's Eq. 2, ||F_i - F_{i-1}||^2 / (d * s^2),

averaged over the prompts. Encoder propagation relies on the encoder's change being
small next to the decoder's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..samplers import DETERMINISTIC_SAMPLERS, make_scheduler
from . import plots


def feature_names(unet) -> list[str]:
    size = unet.config.sample_size
    names = []
    for i, block in enumerate(unet.down_blocks):
        names.append(f"E{i} ({size}px)")
        if getattr(block, "downsamplers", None):
            size //= 2
    names.append(f"B ({size}px)")
    for i, block in enumerate(unet.up_blocks):
        names.append(f"D{i} ({size}px)")
        if getattr(block, "upsamplers", None):
            size *= 2
    return names


@contextlib.contextmanager
def recording(unet, on_call=None):
    """Records, per UNet call, the list of features (CPU float32) named by :func:`feature_names`.

    Yields the list of calls' features, or passes each call's list to ``on_call``
    instead (then nothing is kept: SD 1.5's features are ~40 MB per call).
    """
    calls: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    handles = []

    def keep(t):
        current.append(t.detach().float().cpu())

    def down_hook(block, _args, output):
        _, residuals = output
        keep(residuals[-2] if getattr(block, "downsamplers", None) else residuals[-1])

    def up_pre_hook(_sampler, args, kwargs=None):
        keep(args[0])

    def up_hook(block, _args, output):
        if not getattr(block, "upsamplers", None):
            keep(output)

    def start(*_):
        current.clear()

    def finish(*_):
        (on_call or calls.append)(list(current))

    handles.append(unet.register_forward_pre_hook(start))
    for block in unet.down_blocks:
        handles.append(block.register_forward_hook(down_hook))
    handles.append(unet.mid_block.register_forward_hook(lambda _m, _a, out: keep(out)))
    for block in unet.up_blocks:
        if getattr(block, "upsamplers", None):
            handles.append(block.upsamplers[0].register_forward_pre_hook(up_pre_hook))
        handles.append(block.register_forward_hook(up_hook))
    handles.append(unet.register_forward_hook(finish))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def change(prev: list[torch.Tensor], cur: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per feature: relative change and MSE from ``prev`` to ``cur``."""
    rel = [float((c - p).pow(2).sum() / p.pow(2).sum().clamp_min(1e-20)) for p, c in zip(prev, cur)]
    mse = [float((c - p).pow(2).mean()) for p, c in zip(prev, cur)]
    return rel, mse


class _Changes:
    """Collects the change between consecutive calls, keeping only the previous call."""

    def __init__(self):
        self.prev = None
        self.relative, self.mse = [], []

    def __call__(self, features: list[torch.Tensor]) -> None:
        if self.prev is not None:
            rel, mse = change(self.prev, features)
            self.relative.append(rel)
            self.mse.append(mse)
        self.prev = features


@torch.no_grad()
def analyze(
    pipe, prompts: list[str], sampler: str = "DDIM", steps: int = 50, seed: int = 0, guidance_scale: float = 7.5
) -> dict:
    """Stock sampling of every prompt; the per-step feature changes averaged over prompts."""
    if sampler not in DETERMINISTIC_SAMPLERS:
        raise ValueError(
            f"sampler: one UNet call per step is needed; choose one of {', '.join(DETERMINISTIC_SAMPLERS)}"
        )
    names = feature_names(pipe.unet)
    per_prompt = {"relative": [], "mse": []}
    original = pipe.scheduler
    try:
        for k, prompt in enumerate(prompts):
            pipe.scheduler = make_scheduler(sampler, original.config)
            collected = _Changes()
            with recording(pipe.unet, on_call=collected):
                pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed + k),
                    output_type="latent",
                )
            if len(collected.relative) != steps - 1 or len(collected.prev) != len(names):
                raise RuntimeError(
                    f"recorded {len(collected.relative) + 1} UNet calls of {len(collected.prev)} features; "
                    f"expected {steps} of {len(names)} (one call per step: use a deterministic sampler)"
                )
            per_prompt["relative"].append(np.array(collected.relative))
            per_prompt["mse"].append(np.array(collected.mse))
    finally:
        pipe.scheduler = original
    result = {
        "features": names,
        "sampler": sampler,
        "steps": steps,
        "prompts": prompts,
        "guidance_scale": guidance_scale,
    }
    for key, values in per_prompt.items():
        result[key] = np.mean(values, axis=0).tolist()  # [step-1][feature]
    rel = np.array(result["relative"])
    enc = [i for i, n in enumerate(names) if n.startswith("E")]
    dec = [i for i, n in enumerate(names) if n.startswith("D")]
    result["summary"] = {
        "encoder_mean_relative_change": float(rel[:, enc].mean()),
        "bottleneck_mean_relative_change": float(
            rel[:, names.index(next(n for n in names if n.startswith("B")))].mean()
        ),
        "decoder_mean_relative_change": float(rel[:, dec].mean()),
    }
    s = result["summary"]
    s["decoder_over_encoder"] = s["decoder_mean_relative_change"] / max(s["encoder_mean_relative_change"], 1e-20)
    return result


def markdown_table(result: dict, every: int = 5) -> str:
    names = result["features"]
    rel = np.array(result["relative"])
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(0, len(rel), every):
        lines.append(f"| {i + 1} | " + " | ".join(f"{v:.3f}" for v in rel[i]) + " |")
    lines.append("| mean | " + " | ".join(f"{v:.3f}" for v in rel.mean(0)) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = plots.pyplot(path)
    if plt is None:
        return

    names = result["features"]
    rel = np.array(result["relative"])
    steps = np.arange(1, len(rel) + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    enc = [n for n in names if n.startswith("E")]
    dec = [n for n in names if n.startswith("D")]
    for group, cmap, style in ((enc, plt.cm.Blues, "-"), (dec, plt.cm.Reds, "-")):
        for j, n in enumerate(group):
            colour = cmap(0.45 + 0.5 * j / max(1, len(group) - 1))
            ax.plot(steps, rel[:, names.index(n)], style, color=colour, label=n)
    b = next(n for n in names if n.startswith("B"))
    ax.plot(steps, rel[:, names.index(b)], "--", color="black", label=b)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step i (change from step i-1)")
    ax.set_ylabel("relative change ||F_i - F_{i-1}||^2 / ||F_{i-1}||^2")
    ax.set_title(
        f"UNet feature change per step ({result['sampler']}, {result['steps']} steps, {len(result['prompts'])} prompts)"
    )
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_page(result: dict) -> str:
    s = result["summary"]
    return (
        f"# UNet feature change per step\n\n`{result['command']}`\n\n"
        f"Mean relative change: encoder {s['encoder_mean_relative_change']:.4f}, bottleneck "
        f"{s['bottleneck_mean_relative_change']:.4f}, decoder {s['decoder_mean_relative_change']:.4f} "
        f"(decoder / encoder = {s['decoder_over_encoder']:.2f}).\n\n" + markdown_table(result) + "\n"
    )


def write(result: dict, prefix: Path, command: str) -> list[Path]:
    """``prefix``.json, .md and .png."""
    from .bench import report

    return report.write(result, prefix, command, markdown_page, {".png": plot})
