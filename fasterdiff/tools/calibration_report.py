"""A calibration entry as a markdown table and a picture (speed against fidelity)."""

from __future__ import annotations

import os

from ..choice import DEEPCACHE
from . import plots


def markdown(entry: dict) -> str:
    """The entry's levels, then its frontier, the references and the chosen plans as a table, fastest first."""
    stock = entry["stock"]["gpu_seconds_1_image"]
    on = entry["calibrated_on"]
    lines = [
        f"Calibration, {entry['sampler']}-{entry['steps']}: {on['pairs']} prompt x seed pairs, guidance "
        f"{on['guidance_scale']}, {on['width']}x{on['height']}, plans with noise injection {on['noise_injection']}; "
        f"{len(entry['plans'])} plans measured. Fidelity: PSNR against stock's images, pooled (that of the mean "
        f"squared error over the pairs), with the mean and the worst image's. 'refined': found by the greedy "
        f"key-step search, judged on the held-out two thirds of the pairs.",
        *([f"Search: {search['mode']} ({search['how']}); {search['pair_samples']} images sampled."] if (search := entry.get("search")) else []),
        "",
        "| level | must reach (pooled dB) | runs |",
        "|---|---|---|",
    ]
    for level, bar in entry["levels"].items():
        floor = f" and {bar['floor']:g}" if bar["floor"] is not None else ""
        lines.append(f"| {level} | {bar['reference']}'s{floor}: {bar['psnr_pooled']:.1f} | {bar['plan'] or 'stock'} |")
    lines += [
        "",
        "| plan | key steps | PSNR vs stock: pooled, mean (min) dB | UNet FLOPs | UNet calls | modelled GPU speedup, 1 / 4 images |",
        "|---|---|---|---|---|---|",
    ]
    chosen = {bar["plan"] for bar in entry["levels"].values()}
    for r in entry["plans"]:
        if r["frontier"] or r["name"] in DEEPCACHE.values() or r["name"] in chosen:
            lines.append(
                f"| {r['name']} | {len(r['key_steps'])} | {r['psnr_pooled']:.1f}, {r['psnr_mean']:.1f} ({r['psnr_min']:.1f}) "
                f"| {r['unet_flops']:.2f} | {r['unet_calls']} | {stock / r['gpu_seconds_1_image']:.2f}x / "
                f"{entry['stock']['gpu_seconds_4_images'] / r['gpu_seconds_4_images']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(entry: dict, path: str | os.PathLike) -> bool:
    """Every measured plan: modelled GPU speedup against pooled PSNR, the frontier joined.
    Whether it was drawn (not without matplotlib)."""
    plt = plots.pyplot(path)
    if plt is None:
        return False

    stock = entry["stock"]["gpu_seconds_1_image"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for reuse, marker in (("encoder", "o"), ("deep", "s")):
        for order, colour in ((0, "tab:blue"), (1, "tab:orange"), (2, "tab:green")):
            rows = [r for r in entry["plans"] if r["reuse"] == reuse and r["forecast"] == order]
            if rows:
                ax.scatter([stock / r["gpu_seconds_1_image"] for r in rows], [r["psnr_pooled"] for r in rows],
                           marker=marker, color=colour, alpha=0.7, label=f"{reuse}, forecast {order}")
    front = sorted((r for r in entry["plans"] if r["frontier"]), key=lambda r: r["gpu_seconds_1_image"])
    ax.plot([stock / r["gpu_seconds_1_image"] for r in front], [r["psnr_pooled"] for r in front], "k-", lw=1, label="frontier")
    for r in entry["plans"]:
        if r["name"] in DEEPCACHE.values():
            ax.annotate(r["name"].split(" (")[0], (stock / r["gpu_seconds_1_image"], r["psnr_pooled"]), fontsize=7)
    auto = entry["levels"].get("auto")
    if auto:
        ax.axhline(auto["psnr_pooled"], color="grey", ls="--", lw=1, label="auto's bar")
    ax.set_xlabel("modelled GPU speedup vs stock, one image (calls-and-time model, fasterdiff/cost.py)")
    ax.set_ylabel("pooled PSNR vs stock's images, dB")
    ax.set_title(f"calibration, {entry['sampler']}-{entry['steps']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
