"""Inference-time guidance baselines (METHOD.md §6) as wrappers around a Denoiser or Tweedie's x0-hat.

Every one follows the same score as CTRL's reward without gamma: the sum over controls of log p̂_k(y_k | x),
read by the same calibrated classifiers on the same decoded (clamped) image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..classifier import Classifier, NoisyClassifier
from ..contracts import Cond, Denoiser
from ..schedule import Schedule, predict_x0


@dataclass
class Likelihood:
    """log p̂(y | x0) = sum_k log p̂_k(y_k | decode(x0)), one value per sample (several controls compose)."""

    backend: object
    classifiers: dict[str, Classifier]

    def __call__(self, x0: Tensor, cond: Cond) -> Tensor:
        x = self.backend.classifier_input(x0)
        return sum(clf.log_prob(x, cond.y[name]) for name, clf in self.classifiers.items())


def loglik_and_grad(denoiser: Denoiser, schedule: Schedule, likelihood: Likelihood, x_t: Tensor, t: Tensor,
                    cond: Cond) -> tuple[Tensor, Tensor, Tensor]:
    """eps(x_t), log p̂(y | x0_hat(x_t)) and its gradient w.r.t. x_t, back-propagated through the denoiser."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        eps = denoiser(x, t, cond)
        ll = likelihood(predict_x0(schedule.abar(t, x), x, eps), cond)
        (grad,) = torch.autograd.grad(ll.sum(), x)
    return eps.detach(), ll.detach(), grad


def reconstruction_guidance(denoiser: Denoiser, schedule: Schedule, likelihood: Likelihood, w: float) -> Denoiser:
    """DPS-style: eps - w sqrt(1 - abar_t) grad_{x_t} log p̂(y | x0_hat(x_t)); w = 0 is the denoiser itself."""
    if w == 0:
        return denoiser

    def guided(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        eps, _, grad = loglik_and_grad(denoiser, schedule, likelihood, x_t, t, cond)
        return eps - w * (1 - schedule.abar(t, x_t)).sqrt() * grad

    return guided


def classifier_guidance(denoiser: Denoiser, schedule: Schedule, classifiers: dict[str, NoisyClassifier],
                        w: float) -> Denoiser:
    """eps - w sqrt(1 - abar_t) grad_{x_t} sum_k log p̂_k(y_k | x_t, t), noise-aware classifiers (no denoiser
    gradient); w = 0 is the denoiser itself."""
    if w == 0:
        return denoiser

    def guided(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            ll = sum(clf.log_prob(x, t, cond.y[name]) for name, clf in classifiers.items())
            (grad,) = torch.autograd.grad(ll.sum(), x)
        return denoiser(x_t, t, cond) - w * (1 - schedule.abar(t, x_t)).sqrt() * grad

    return guided


def mpgd_guide(schedule: Schedule, likelihood: Likelihood, w: float):
    """MPGD (He et al. 2024): a gradient step on x0_hat itself, x0_hat + w (1 - abar_t) grad_{x0} log p̂(y | x0),
    with no back-propagation through the denoiser; the sampler then steps from the corrected x0_hat.
    (1 - abar_t) is the posterior variance of x0 given x_t for unit-variance data: large steps while x0_hat
    is uncertain, none at the clean end. Returns None at w = 0 (the plain sampler)."""
    if w == 0:
        return None

    def guide(x0: Tensor, t: Tensor, cond: Cond) -> Tensor:
        with torch.enable_grad():
            x = x0.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(likelihood(x, cond).sum(), x)
        return x0 + w * (1 - schedule.abar(t, x0)) * grad

    return guide
