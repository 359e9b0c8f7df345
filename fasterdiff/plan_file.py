"""The plan file: what calibration measured on a model, one entry per sampler and step
count (``fasterdiff_plans.json`` beside the weights by default).

Read once per file and kept while the file is unchanged (its modification time and size),
so ``key_steps="auto"`` costs no parsing per call; written by ``python -m fasterdiff
calibrate`` (:mod:`fasterdiff.calibrate`).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

PLANS_FILE_NAME = "fasterdiff_plans.json"
PLANS_FORMAT_VERSION = 2

_cache: dict[Path, tuple[tuple[int, int], dict]] = {}
_lock = threading.Lock()


def entry_key(sampler: str, steps: int) -> str:
    return f"{sampler}-{steps}"


def read_plans(path: str | os.PathLike) -> dict:
    """The plan file at ``path``, parsed once and reread only when the file changes."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _lock:
        cached = _cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    data = json.loads(path.read_text())
    if data.get("version") != PLANS_FORMAT_VERSION or not isinstance(data.get("entries"), dict):
        raise ValueError(
            f"{path}: not a fasterdiff plan file of version {PLANS_FORMAT_VERSION} (files of an older version: "
            f"calibrate again, python -m fasterdiff calibrate)"
        )
    with _lock:
        _cache[path] = (stamp, data)
    return data


def write_entry(path: str | os.PathLike, entry: dict) -> None:
    """Add (or replace) ``entry`` in the plan file at ``path``."""
    path = Path(path)
    data = json.loads(json.dumps(read_plans(path))) if path.is_file() else {"version": PLANS_FORMAT_VERSION, "entries": {}}
    data["entries"][entry_key(entry["sampler"], entry["steps"])] = entry
    path.write_text(json.dumps(data, indent=1) + "\n")


def default_plans_file(pipe) -> Path | None:
    """``fasterdiff_plans.json`` beside the weights ``pipe`` was loaded from, if any."""
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if not source or not Path(source).is_dir():
        return None
    return Path(source) / PLANS_FILE_NAME


def check_plans_file(plans) -> None:
    """A plan file given by name must exist (only the default one, beside the weights, may not)."""
    if not Path(plans).is_file():
        raise ValueError(f"plans: no plan file at {plans} (calibrate one with: python -m fasterdiff calibrate)")
