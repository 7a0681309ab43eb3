"""The pure measures every evaluation shares: the digit oracle's features and the Fréchet distance between them."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def weighted_moments(f: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features f (N, D) under sample weights w (None: equal). The covariance divides by
    1 - sum w^2 (w normalised): unbiased for reliability weights, and N - 1 (numpy's np.cov) when w is equal."""
    w = np.full(len(f), 1.0 / len(f)) if w is None else np.asarray(w, dtype=np.float64) / np.sum(w)
    mu = w @ f
    d = f - mu
    return mu, (d * w[:, None]).T @ d / (1 - np.sum(w**2))


def frechet_distance(f1: np.ndarray, f2: np.ndarray, w1: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between Gaussian fits of two feature sets (FID's formula).
    w1: weights of f1's rows (a distribution known by importance weights, the target p_gamma): weighted moments
    instead of resampling, which repeats the few heavy samples and shrinks the covariance."""
    (mu1, s1), (mu2, s2) = weighted_moments(f1, w1), weighted_moments(f2)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


@torch.no_grad()
def features(oracle, images: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Penultimate features of the digit oracle (images in [0, 1]) — the feature space of feature-FID."""
    return torch.cat([oracle.net.features(images[i:i + batch] * 2 - 1) for i in range(0, len(images), batch)]).numpy()
