"""Scoring images of the stand-in: prompt accuracy, Frechet distance, PSNR, SSIM.

Images are (N, 3, 32, 32) tensors in [-1, 1] (the VAE's output range).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from . import CLASSIFIER_FILE, data
from .models import Classifier

ATTRIBUTES = ("digit", "color", "thickness")


def load_classifier(path: str | Path = CLASSIFIER_FILE) -> Classifier:
    net = Classifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@dataclass
class Scores:
    predictions: dict[str, np.ndarray]  # attribute -> (N,) predicted class
    features: np.ndarray  # (N, 128)


@torch.no_grad()
def classify(classifier: Classifier, images: torch.Tensor, batch: int = 512) -> Scores:
    preds = {a: [] for a in ATTRIBUTES}
    feats = []
    for chunk in images.float().split(batch):
        out = classifier(chunk.clamp(-1, 1))
        for a in ATTRIBUTES:
            preds[a].append(out[a].argmax(1).numpy())
        feats.append(out["features"].numpy())
    return Scores({a: np.concatenate(p) for a, p in preds.items()}, np.concatenate(feats).astype(np.float64))


def hits(scores: Scores, wanted: list[data.Attributes]) -> dict[str, np.ndarray]:
    """Per attribute, per image: whether the predicted attribute matches the prompt."""
    return {a: scores.predictions[a] == np.array([getattr(w, a) for w in wanted]) for a in ATTRIBUTES}


def all_right(scores: Scores, wanted: list[data.Attributes]) -> np.ndarray:
    """Per image: whether every predicted attribute matches the prompt."""
    return np.logical_and.reduce(list(hits(scores, wanted).values()))


def accuracy(scores: Scores, wanted: list[data.Attributes]) -> dict[str, float]:
    """Fraction of images whose predicted attribute matches the prompt, per attribute and all three."""
    result = {a: float(h.mean()) for a, h in hits(scores, wanted).items()}
    result["all"] = float(all_right(scores, wanted).mean())
    return result


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr(sqrt(cov_a cov_b)) from the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a), which is symmetric PSD.
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def ssim(images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per-image SSIM on [0, 1] pixels: 11x11 Gaussian window (sigma 1.5), channels averaged."""
    x, y = (images.float() + 1) / 2, (reference.float() + 1) / 2
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11).contiguous()

    def blur(t):
        return F.conv2d(t, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).numpy()


def real_reference(wanted: list[data.Attributes], half: int, pool=None) -> tuple[torch.Tensor, int]:
    """Real digits matching each wanted attribute set, in the wanted colour, and how many
    distinct digits that took.

    The digits are the generator's training digits (the classifier never saw them). Each
    (digit, thickness) pool is split into two disjoint halves (``half`` 0 or 1), so the two
    real sets share no image; within a half, images are used in turn (repeating only if a
    half runs out).
    """
    digits, labels, thick = pool if pool is not None else data.generator_digits()
    halves = {(d, t): np.flatnonzero((labels == d) & (thick == t))[half::2] for d in range(10) for t in range(3)}
    used: dict[tuple[int, int], int] = {}
    chosen = []
    for w in wanted:
        members = halves[(w.digit, w.thickness)]
        k = used.get((w.digit, w.thickness), 0)
        used[(w.digit, w.thickness)] = k + 1
        chosen.append(members[k % len(members)])
    return data.render(digits[chosen], np.array([w.color for w in wanted])), len(set(chosen))


def bootstrap(values: np.ndarray, statistic, rounds: int = 200, seed: int = 0) -> tuple[float, float]:
    """95% interval of ``statistic`` over resamples of ``values``' rows."""
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(rounds)]
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)
