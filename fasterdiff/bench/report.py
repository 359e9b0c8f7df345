"""Benchmark output: JSON, a markdown table and a PNG bar chart, each stamped with
the machine, the library versions and the exact command."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch


def environment() -> dict:
    import diffusers
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write(result: dict, prefix: Path, command: str) -> list[Path]:
    """Write ``prefix``.json, .md and .png; return their paths."""
    from .speed import markdown_table

    prefix.parent.mkdir(parents=True, exist_ok=True)
    result = dict(result, environment=environment(), command=command)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    cfg = result["config"]
    header = (
        f"Command: `{command}`\n\n"
        f"Model: {result['model']}; sampler {cfg['sampler']}, {cfg['steps']} steps, "
        f"{'64 (quick)' if cfg['quick'] else cfg['size']}px, {cfg['rounds']} interleaved rounds after a warm-up.\n\n"
        f"Machine: {env.get('gpu') or env['processor']} ({env['cpu_count']} CPUs), {env['machine']}; "
        f"torch {env['torch']}, diffusers {env['diffusers']}; {env['date']}.\n\n"
    )
    md_path = prefix.with_suffix(".md")
    md_path.write_text(header + markdown_table(result) + "\n")
    png_path = prefix.with_suffix(".png")
    _bar_chart(result, png_path, command)
    return [json_path, md_path, png_path]


def _bar_chart(result: dict, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"] for r in rows]
    med = [r["speedup_median"] for r in rows]
    err = [[m - r["speedup_min"] for m, r in zip(med, rows)], [r["speedup_max"] - m for m, r in zip(med, rows)]]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8))
    ax.barh(names[::-1], med[::-1], xerr=[e[::-1] for e in err], color="#4878a8", capsize=3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, r in enumerate(rows[::-1]):
        ax.text(r["speedup_max"] + 0.04, y, f"{r['speedup_median']:.2f}x", va="center", fontsize=8)
    cfg, env = result["config"], result["environment"]
    ax.set_xlabel("speedup vs stock diffusers (median, min-max over rounds)")
    ax.set_title(
        f"{cfg['sampler']}-{cfg['steps']}, {cfg['size']}px, {env.get('gpu') or env['processor']}", fontsize=9
    )
    fig.text(0.01, 0.01, command, fontsize=6, family="monospace")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
