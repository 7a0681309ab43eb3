"""VP noise schedule and the pure Gaussian-transition maths every sampler and loss shares.

A reverse step is written as the Gaussian `pi(x_{t'} | x_t) = N(mean, std^2 I)` (DDIM, Song et al. 2021,
eq. 12; eta = 1 gives the DDPM posterior variance). CTRL's KL term (METHOD.md §2) compares two such
Gaussians with the same std, so everything here returns means and stds rather than samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Schedule:
    """Discrete variance-preserving schedule: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`."""

    alphas_cumprod: Tensor  # (T,) float64, abar_t for t = 0..T-1

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """The DDPM linear-beta schedule (same as diffusers' `beta_schedule="linear"`)."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_betas(cls, betas: Tensor):
        """abar_t in float64 from a diffusers scheduler's own betas (its `beta_schedule`, `trained_betas`)."""
        return cls(torch.cumprod(1.0 - torch.as_tensor(betas).double(), dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def timesteps(self, steps: int) -> Tensor:
        """Descending sampling timesteps T-1, ..., T/steps - 1 (diffusers' "trailing" spacing).

        Trailing, not diffusers' DDIM default "leading" (950, ..., 0): the chain starts from pure noise
        (t = T-1), and no stochastic step jumps to abar_0 ~ 1. With leading spacing the step 50 -> 0 has
        std ~ 1e-2, so its KL weight per unit of eps change is 154 (20 steps; 2617 for 5 steps) against
        <= 1.4 (<= 8.2) for every other step. On the seeded toy fine-tune of tests/test_control_rl.py, leading
        spacing went 0.45 -> 0.25 in oracle accuracy with a path KL of 325 nats; trailing 0.47 -> 0.95 with 2.1.
        Here the last step (to t = -1) is the deterministic Tweedie step.
        """
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps={steps} must be in 1..{self.num_train_timesteps}")
        T = self.num_train_timesteps
        return (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1).long()

    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar_t broadcast to `like`'s shape; t = -1 means the clean end of the chain (abar = 1)."""
        t = torch.as_tensor(t).long()
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return a.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1))).expand(like.shape[0], *like.shape[1:])


def add_noise(schedule: Schedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Forward process q(x_t | x_0)."""
    a = schedule.abar(t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_x0(abar_t: Tensor, x_t: Tensor, eps: Tensor) -> Tensor:
    """Tweedie's estimate of x_0 from an eps-prediction (no clamping: it would kill gradients)."""
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def step_mean_std(
    schedule: Schedule, x_t: Tensor, eps: Tensor, t: Tensor, t_prev: Tensor, eta: float, x0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and std of the DDIM transition x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

    std = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev); eta = 0 is
    deterministic DDIM, eta = 1 is DDPM's posterior variance. x0 replaces Tweedie's estimate where a method
    corrects it (MPGD); the noise direction stays eps.
    """
    a_t, a_prev = schedule.abar(t, x_t), schedule.abar(t_prev, x_t)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x0 = predict_x0(a_t, x_t, eps) if x0 is None else x0
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = ||mean_p - mean_q||^2 / (2 std^2), summed over dims.

    Returns one value per batch element. This is the per-step term of CTRL's path KL (METHOD.md §2); it is
    summed, not averaged, over dimensions (the official code's per-dimension mean hides gamma, §3).
    """
    if bool((std <= 0).any()):
        raise ValueError("the KL between Gaussian steps needs std > 0; eta = 0 (deterministic DDIM) has none")
    return ((mean_p - mean_q) ** 2 / (2 * std**2)).flatten(1).sum(1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2 I), summed over dims, one value per batch element."""
    var = std**2
    return (-((x - mean) ** 2) / (2 * var) - 0.5 * torch.log(2 * torch.pi * var)).flatten(1).sum(1)
