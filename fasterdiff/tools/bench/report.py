"""Writing a benchmark's or an analysis' result: JSON, a markdown page and figures, each
stamped with the machine, the library versions and the exact command."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Callable
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


def write(
    result: dict,
    prefix: Path,
    command: str,
    markdown: Callable[[dict], str],
    figures: dict[str, Callable[[dict, Path], None]],
) -> list[Path]:
    """Write ``prefix``.json, ``prefix``.md and one file per figure; return their paths.

    ``result`` is stamped with ``environment`` and ``command`` first; ``markdown`` and
    the figures (file suffix -> drawing function) get the stamped result. Keys starting
    with "_" (images, say) reach them but stay out of the JSON.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    stamped = dict(result, environment=environment(), command=command)
    json_path, md_path = prefix.with_suffix(".json"), prefix.with_suffix(".md")
    public = {k: v for k, v in stamped.items() if not k.startswith("_")}
    json_path.write_text(json.dumps(public, indent=1) + "\n")
    md_path.write_text(markdown(stamped))
    paths = [json_path, md_path]
    for suffix, draw in figures.items():
        path = Path(f"{prefix}{suffix}")
        path.unlink(missing_ok=True)  # an earlier run's picture is not this one's
        draw(stamped, path)
        if path.is_file():  # not drawn without matplotlib (plots.pyplot says so)
            paths.append(path)
    return paths
