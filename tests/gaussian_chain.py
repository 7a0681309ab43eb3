"""A linear-Gaussian case with every answer in closed form: a Gaussian base N(m, s^2 I) in 2-D with its exact
eps-predictor (a one-component mixture), a linear reward r(x) = <a, x>, and the DDIM chain, which is affine in x:
x_{i+1} = A_i x_i + b_i + sigma_i z. Under the base the chain's x_0 is Gaussian with a computable mean and
variance, so log Z = log E[exp r(x_0)] and the optimal control are known exactly, and the tilted kernel is
Gaussian: no discretisation floor (the value function is linear, its gradient a constant per step)."""

from __future__ import annotations

import torch
from torch import nn

from ctrldiff.backends.mixture import Mixture, MixtureBackend, MixtureNet
from ctrldiff.contracts import Cond
from ctrldiff.rl import RewardTerm
from ctrldiff.sampling import step_times
from ctrldiff.schedule import Schedule, step_mean_std
from ctrldiff.tasks.controls import Control

MEAN, STD, A = torch.tensor([0.5, -0.3]), 0.7, torch.tensor([1.5, 1.0])


class LinearReward(nn.Module):
    """log p̂(y | x) := <a, x> (a reward, not a normalised classifier; y is ignored): the tilt exp(<a, x>)."""

    def __init__(self, a: torch.Tensor = A):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x):
        return (x @ self.a)[:, None]

    def log_prob(self, x, y):
        return x @ self.a


def backend() -> MixtureBackend:
    schedule = Schedule.linear()
    return MixtureBackend(MixtureNet(schedule, [Mixture(MEAN[None], STD)], exact=True), schedule)


def term(gamma: float = 1.0) -> RewardTerm:
    return RewardTerm(Control("linear", 1, None), LinearReward(), gamma)


def affine_steps(be: MixtureBackend, steps: int, eta: float = 1.0) -> list[tuple[float, torch.Tensor, float, float]]:
    """Per step i of the base chain: (A_i, b_i, sigma_i, k_i), mean = A_i x + b_i (+ k_i * a shift of eps), read off
    the base's own step maths at x = 0 and x = e_1 (exact: the map is affine)."""
    out, cond = [], Cond(torch.zeros(2, dtype=torch.long))
    for t, t_prev in step_times(be.schedule, steps):
        x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
        tb, pb = t.expand(2), t_prev.expand(2)
        eps = be.denoiser(x, tb, cond)
        mean, std = step_mean_std(be.schedule, x, eps, tb, pb, eta)
        k = step_mean_std(be.schedule, x, eps + 1, tb, pb, eta)[0][0, 0] - mean[0, 0]  # d mean / d eps
        out.append((float(mean[1, 0] - mean[0, 0]), mean[0].clone(), float(std[0, 0]), float(k)))
    return out


def chain_moments(coefs, shifts=None) -> tuple[torch.Tensor, float]:
    """Mean and (per-dimension) variance of x_0 under the chain from x_T ~ N(0, I), each step's eps moved by
    shifts[i] (a constant vector; None = the base)."""
    mean, var = torch.zeros(2), 1.0
    for i, (a, b, s, k) in enumerate(coefs):
        mean = a * mean + b + (0 if shifts is None else k * shifts[i])
        var = a * a * var + s * s
    return mean, var


def log_z(coefs, a: torch.Tensor = A) -> float:
    """log E_base[exp <a, x_0>] of the chain (x_0 Gaussian): <a, m> + ||a||^2 v / 2."""
    mean, var = chain_moments(coefs)
    return float(a @ mean + 0.5 * var * (a @ a))


def optimal_controls(coefs, a: torch.Tensor = A) -> list[torch.Tensor | None]:
    """u*_i = sigma_i grad V_{i+1}, V_{i+1}(x) = log E[exp <a, x_0> | x_{i+1} = x] linear: grad V_{i+1} = (prod_{j > i}
    A_j) a. The soft-optimal kernel N(mu_pre + sigma^2 grad V, sigma^2) is exactly Gaussian. None: deterministic step."""
    out, gain = [None] * len(coefs), 1.0
    for i in reversed(range(len(coefs))):
        a_i, _, s, _ = coefs[i]
        out[i] = s * gain * a if s > 0 else None
        gain *= a_i
    return out
