"""Image fidelity against a reference: PSNR per image and pooled over a set."""

from __future__ import annotations

import numpy as np
import torch

PSNR_CAP = 100.0  # dB, for identical images


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB of pixels spanning ``data_range`` (1 for [0, 1], 2 for [-1, 1])."""
    mse = ((images.float() - reference.float()) / data_range).pow(2).flatten(1).mean(1).cpu().numpy()
    return np.minimum(PSNR_CAP, 10 * np.log10(1.0 / np.maximum(mse, 1e-10)))


def pooled_psnr(values: np.ndarray) -> float:
    """The PSNR of the mean squared error over all images, from their PSNRs: the worst
    images weigh most (one image at 15 dB among 40 dB ones costs several dB)."""
    return float(-10 * np.log10(np.mean(10 ** (-np.asarray(values, dtype=np.float64) / 10))))
