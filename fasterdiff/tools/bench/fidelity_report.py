"""Writing the fidelity benchmark's results: JSON, markdown, frontier plot, image grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..standin import data
from .. import plots
from . import report

MARKERS = {
    "stock": ("*", "black"),
    "method": ("o", "tab:blue"),
    "eps reuse": ("s", "tab:red"),
    "fewer steps": ("^", "tab:gray"),
}


def _ci(values) -> str:
    return f"{values[0]:.3g}-{values[1]:.3g}"


def _spread(values) -> str:
    return f"{min(values):.3g}-{max(values):.3g}"


def _gpu(row: dict, stock_seconds: float | None) -> str:
    seconds = row.get("gpu_seconds_modelled")
    return "-" if not seconds or not stock_seconds else f"{stock_seconds / seconds:.2f}x"


def _paired(row: dict) -> str:
    p = row.get("paired_vs_stock")
    if p is None or row["kind"] == "stock":
        return "-"
    return f"+{p['gained']} / -{p['lost']} ({p['p']:.2g})"


def markdown_table(result: dict) -> str:
    lines = [
        "| method | steps | enc / dec steps | UNet FLOPs vs stock | modelled GPU speedup, 1 image | CPU speedup median (min-max) | accuracy all (95% CI) | vs stock: pairs gained / lost (McNemar p) | digit / colour / thickness | Frechet distance (per seed min-max) | PSNR vs stock dB: mean / pooled | SSIM vs stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stock_gpu = result["rows"][0].get("gpu_seconds_modelled")
    for r in result["rows"]:
        a = r["accuracy"]
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['encoder_calls']} / {r['decoder_steps']:g} | {r['unet_cost']:.2f} "
            f"| {_gpu(r, stock_gpu)} | {r['speedup_median']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) "
            f"| {a['all']:.3f} ({_ci(r['accuracy_all_ci95'])}) | {_paired(r)} | {a['digit']:.3f} / {a['color']:.3f} / {a['thickness']:.3f} "
            f"| {r['frechet_distance']:.2f} ({_spread(r['frechet_distance_per_seed'])}) | {min(r['psnr_vs_stock'], 99.99):.2f} / {_pooled(r)} | {r['ssim_vs_stock']:.4f} |"
        )
    real = result["real"]
    for label, key in (
        ("real digits, second set (noise floor)", "second_real_set"),
        ("real digits through the VAE (VAE floor)", "reference_through_vae"),
    ):
        r = real[key]
        a = r["accuracy"]
        lines.append(
            f"| {label} | - | - | - | - | - | {a['all']:.3f} ({_ci(r['accuracy_all_ci95'])}) | - | {a['digit']:.3f} / {a['color']:.3f} / {a['thickness']:.3f} "
            f"| {r['frechet_distance']:.2f} ({_spread(r['frechet_distance_per_seed'])}) | - | - |"
        )
    a = real["reference"]["accuracy"]
    v = real["classifier_validation_accuracy"]
    lines += [
        "",
        f"Reference set: {result['pairs']} real digits ({real['reference']['distinct_digits']} distinct) with the prompts' "
        f"attributes, classified all / digit / colour / thickness {a['all']:.3f} / {a['digit']:.3f} / {a['color']:.3f} / {a['thickness']:.3f}; "
        f"the classifier on its own validation digits: {v['all']:.3f} / {v['digit']:.3f} / {v['color']:.3f} / {v['thickness']:.3f}.",
    ]
    return "\n".join(lines)


def _flops_x(rows: list[dict]):
    """Speedup in UNet FLOPs. Wall-time speedups (in the table) depend on the hardware and
    batch; on a CPU, parallel decoding of a large batch gains no time."""
    return lambda row: 1.0 / row["unet_cost"]


def _gpu_x(rows: list[dict]):
    """Speedup in modelled GPU time, one image (fasterdiff.cost: calls and batched steps
    timed on an H200); None where a method has no model (ToMe)."""
    stock = rows[0].get("gpu_seconds_modelled")
    return lambda row: stock / row["gpu_seconds_modelled"] if stock and row.get("gpu_seconds_modelled") else None


AXES = (
    (_flops_x, "speedup vs stock in UNet FLOPs (1 / FLOPs ratio)"),
    (_gpu_x, "modelled GPU speedup vs stock, one image (fasterdiff/cost.py, H200 timings)"),
)


def _pooled(r: dict) -> str:
    """The PSNR of the mean squared error over all pairs (results before it was recorded: -)."""
    return f"{min(r['psnr_vs_stock_pooled'], 99.99):.2f}" if "psnr_vs_stock_pooled" in r else "-"


def frontier_plot(result: dict, path: Path) -> None:
    plt = plots.pyplot(path)
    if plt is None:
        return

    rows = result["rows"]
    fig, grid_axes = plt.subplots(2, 3, figsize=(16, 9.5))
    metrics = (
        ("frechet_distance", "Frechet distance to real (lower is better)"),
        ("psnr_vs_stock_pooled", "pooled PSNR vs stock, dB (higher is better)"),
        ("accuracy", "prompt accuracy, all attributes"),
    )
    for axes, (make_x, xlabel) in zip(grid_axes, AXES):
        x = make_x(rows)
        for ax, (key, label) in zip(axes, metrics):
            _panel(ax, result, [r for r in rows if x(r) is not None], x, key)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_title(label, fontsize=10)
    cfg = result["config"]
    fig.suptitle(
        f"Speed vs fidelity on the stand-in: {cfg['sampler']}-{cfg['steps']}, {result['pairs']} prompt x seed pairs "
        "(grey numbers: stock step counts; PSNR of stock itself capped at 60)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax, result: dict, rows: list[dict], x, key: str) -> None:
    def value(r):
        v = r[key]["all"] if key == "accuracy" else r[key]
        return min(v, 60) if key.startswith("psnr") else v

    sweep = sorted((r for r in rows if r["kind"] in ("fewer steps", "stock")), key=x)
    ax.plot([x(r) for r in sweep], [value(r) for r in sweep], "-", color="tab:gray", alpha=0.6, label="stock, fewer steps")
    if key == "frechet_distance":
        floor = result["real"]["second_real_set"]["frechet_distance"]
        ax.axhline(floor, color="tab:green", ls=":", lw=1, label="two real sets")
    for r in rows:
        marker, colour = MARKERS[r["kind"]]
        ax.plot(x(r), value(r), marker, color=colour, markersize=8 if r["kind"] != "fewer steps" else 5)
        if r["kind"] in ("method", "eps reuse"):
            short = r["method"].replace("fasterdiff ", "").replace("control: reuse whole noise prediction, ", "eps reuse ")
            ax.annotate(short, (x(r), value(r)), fontsize=6, xytext=(3, 3), textcoords="offset points")
        elif r["kind"] == "fewer steps":
            ax.annotate(str(r["steps"]), (x(r), value(r)), fontsize=6, xytext=(2, -8), textcoords="offset points", color="tab:gray")
    ax.grid(alpha=0.3)


def grid_rows(result: dict) -> list[str]:
    """Every method and control, except fewer-steps controls that match no method's cost."""
    return [r["method"] for r in result["rows"] if r["kind"] != "fewer steps" or r["matches"]]


def grid(result: dict, path: Path, columns: int = 10) -> None:
    """One row per method, one column per prompt (digits 0-9, first seed), 4x upscaled."""
    plt = plots.pyplot(path)
    if plt is None:
        return

    wanted = result["_wanted"]
    picks, seen = [], set()
    for j, a in enumerate(wanted):
        if a.digit not in seen:
            seen.add(a.digit)
            picks.append(j)
        if len(picks) == columns:
            break
    # Spread colours and thicknesses over the columns while keeping one digit each.
    picks = [
        next(
            (
                j
                for j, a in enumerate(wanted)
                if a.digit == wanted[p].digit and a.color == k % len(data.COLORS) and a.thickness == k % 3
            ),
            p,
        )
        for k, p in enumerate(picks)
    ]
    names = grid_rows(result)
    fig, axes = plt.subplots(len(names), 1, figsize=(columns * 0.9 + 3.5, len(names) * 0.95))
    for ax, name in zip(np.atleast_1d(axes), names):
        strip = torch.cat([result["_images"][name][j] for j in picks], dim=2)
        ax.imshow(((strip.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(
            name.replace("control: ", "").replace("fasterdiff ", ""), rotation=0, ha="right", va="center", fontsize=7
        )
    np.atleast_1d(axes)[0].set_title(" | ".join(wanted[j].prompt.removeprefix("a ") for j in picks), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_page(result: dict) -> str:
    env, cfg, command = result["environment"], result["config"], result["command"]
    return (
        f"# Fidelity on the stand-in: {cfg['sampler']}-{cfg['steps']}\n\n`{command}`\n\n"
        f"{env['processor']}, {env['torch_threads']} threads, torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}.\n\n"
        f"{result['pairs']} prompt x seed pairs, guidance {cfg['guidance_scale']}, {result['batch_per_call']} images per "
        "sampling call (speedups are for that batch on this CPU). UNet FLOPs: the whole sampling loop counted by "
        "torch.utils.flop_counter on two images, relative to stock. Accuracy interval: 95% bootstrap over pairs; "
        "Frechet distance: on all pairs, and min-max over the seeds (one set of 180 pairs each) as its spread.\n\n"
        + markdown_table(result)
        + "\n"
    )


def write(result: dict, prefix: Path, command: str) -> list[Path]:
    """``prefix``.json, .md, -frontier.png and -grid.png."""
    return report.write(result, prefix, command, markdown_page, {"-frontier.png": frontier_plot, "-grid.png": grid})
