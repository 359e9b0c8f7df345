"""The stand-in: a small trained SD-format pipeline for measuring fidelity offline.

SD 1.5's weights cannot be used everywhere (tests, CI, machines without the hub),
and random weights say nothing about image quality. The stand-in has SD 1.5's
structure (CLIP text encoder, 4-channel AutoencoderKL, a cross-attention UNet with
4 resolution levels and 2 layers per block, SD 1.5's noise schedule) at a size
trained in under an hour on a CPU: 32x32 coloured MNIST digits described by prompts
such as "a bold red seven". A classifier trained on held-out real digits scores
what it draws. See ``standin/README.md`` for data, configs and training time.
"""

import os
from pathlib import Path

STANDIN_ENV = "FASTERDIFF_STANDIN"
# The stand-in's folder: $FASTERDIFF_STANDIN, else standin/ in the working directory (the
# checkout's); commands that use it also take its path as an argument.
STANDIN_DIR = Path(os.environ.get(STANDIN_ENV) or "standin").resolve()
PIPELINE_DIR = STANDIN_DIR / "pipeline"
CLASSIFIER_FILE = STANDIN_DIR / "classifier.safetensors"
HELDOUT_FILE = STANDIN_DIR / "heldout.npz"

TRAIN_COMMAND = "python -m fasterdiff.tools.standin.train"


def is_standin(folder: str | Path) -> bool:
    """Whether ``folder`` is a stand-in's pipeline/ (its classifier and training record beside it)."""
    parent = Path(folder).resolve().parent
    return (parent / "training.json").is_file() and (parent / "classifier.safetensors").is_file()


def require(folder: str | Path = STANDIN_DIR) -> Path:
    """``folder`` if it holds a trained stand-in, else a clear FileNotFoundError."""
    folder = Path(folder)
    missing = [
        name
        for name in ("pipeline/model_index.json", "classifier.safetensors", "heldout.npz")
        if not (folder / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"no trained stand-in at {folder} (missing {', '.join(missing)}); train it with: {TRAIN_COMMAND} --out {folder}"
        )
    return folder
