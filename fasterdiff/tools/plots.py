"""Plots are optional (``pip install 'fasterdiff[plots]'``): every command that draws one
also writes its JSON and markdown, and without matplotlib says in one line how to get the
picture."""

from __future__ import annotations

import os
from pathlib import Path

INSTALL_HINT = "pip install 'fasterdiff[plots]'"


def pyplot(path: str | os.PathLike):
    """matplotlib.pyplot (headless), or None after saying why ``path`` is not drawn."""
    try:
        import matplotlib
    except ImportError:
        print(f"no picture {Path(path).name}: matplotlib is not installed (to draw it: {INSTALL_HINT})")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
