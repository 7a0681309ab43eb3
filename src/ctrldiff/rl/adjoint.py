"""Adjoint Matching (Domingo-Enrich et al., arXiv 2409.08861): CTRL's objective solved by regression instead of
back-propagation through the chain (`rl.estimator = "adjoint"`; derivation in docs/method.md).

The chain's step i maps x_i -> x_{i+1} = mu_pre,i(x_i) + sigma_i u_i(x_i) + sigma_i z_i, with the control
u_i = (mu_theta,i - mu_pre,i) / sigma_i and CTRL's objective J = E[r(x_N) - sum_i ||u_i||^2 / 2]. Its gradient in
u_i is sigma_i a_{i+1} - u_i, a_{i+1} the adjoint d(cost-to-go)/dx_{i+1}. The lean adjoint drops every term
through u's own Jacobian, whose conditional mean vanishes at the optimum:

    a_N = grad r(x_N),    a_i = (d mu_pre,i / d x_i)^T a_{i+1}     (the frozen base's step means only)

and the loss sum_i ||u_i(x_i) - sigma_i sg(a_{i+1})||^2 / 2 has the optimal control as its only critical point
(DDIM with eta = 1 is memoryless, the condition the method needs). The rollout keeps no graph: memory does not
grow with the chain's length. The last, deterministic step (the base's, rl.final_step = "base") has no control;
the adjoint passes through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..contracts import Cond
from ..sampling import Trajectory, sample, step_times
from ..schedule import step_mean_std


def lean_adjoints(backend, traj: Trajectory, cond: Cond, reward: Callable[[Tensor], Tensor]) -> list[Tensor | None]:
    """a_i for i = 1..N (index 0 unused: x_T has no control before it), by vector-Jacobian products of the frozen
    base's step means at the visited states, backwards from a_N = grad reward(x_N). As a by-product, fills
    `traj.ref_means` with the base's means at every state (what the KL and the regression compare against)."""
    n, steps = traj.xs[0].shape[0], len(traj.timesteps)
    times = step_times(backend.schedule, steps)
    adj: list[Tensor | None] = [None] * (steps + 1)
    ref: list[Tensor | None] = [None] * steps
    with torch.enable_grad():
        x = traj.x0.detach().requires_grad_()
        adj[steps] = torch.autograd.grad(reward(x).sum(), x)[0]
        for i in reversed(range(steps)):
            t, t_prev = (v.expand(n) for v in times[i])
            x = traj.xs[i].detach().requires_grad_(i > 0)
            mean, _ = step_mean_std(backend.schedule, x, backend.denoiser(x, t, cond), t, t_prev, traj.eta)
            if i > 0:
                adj[i] = torch.autograd.grad(mean, x, adj[i + 1])[0]
            ref[i] = mean.detach()
    traj.ref_means = ref
    return adj


def matching_loss(model, backend, traj: Trajectory, cond: Cond, adj: list[Tensor | None], steps: list[int],
                  scale: float = 1.0) -> Tensor:
    """scale * sum over the regressed steps of ||u_i(x_i) - sigma_i a_{i+1}||^2 / 2 (summed over dimensions, mean over
    the batch): its gradient in theta is minus the objective's, with the lean adjoint for the full one (scale: the
    stochastic steps over the regressed ones, so that a subset is an unbiased estimate of the whole sum)."""
    n, times = traj.xs[0].shape[0], step_times(backend.schedule, len(traj.timesteps))
    loss = traj.xs[0].new_zeros(())
    for i in steps:
        t, t_prev = (v.expand(n) for v in times[i])
        x, std = traj.xs[i].detach(), traj.stds[i]
        mean, _ = step_mean_std(backend.schedule, x, model(x, t, cond), t, t_prev, traj.eta)
        u = (mean - traj.ref_means[i]) / std
        loss = loss + 0.5 * ((u - std * adj[i + 1]) ** 2).flatten(1).sum(1).mean()
    return scale * loss


def rollout(model, backend, x_T: Tensor, cond: Cond, steps: int, eta: float, g: torch.Generator,
            reward: Callable[[Tensor], Tensor]) -> tuple[Trajectory, list[Tensor | None]]:
    """The fine-tuned chain without a graph (the base takes the last step), then its lean adjoints."""
    with torch.no_grad():
        traj = sample(model, backend.schedule, x_T, cond, steps=steps, eta=eta, generator=g, final=model.final(backend))
    return traj, lean_adjoints(backend, traj, cond, reward)


def regressed_steps(traj: Trajectory, count: int | None, g: torch.Generator, groups: int = 1) -> list[list[int]]:
    """The stochastic steps whose control is regressed this rollout (all, or `count` drawn uniformly), split at
    random into `groups` parts: one optimiser update each (a few updates per rollout, the rollout being the cost)."""
    stochastic = [i for i, s in enumerate(traj.stds) if bool((s > 0).all())]
    order = [stochastic[int(k)] for k in torch.randperm(len(stochastic), generator=g)]
    picked = order[: len(stochastic) if count is None else min(count, len(stochastic))]
    parts = min(groups, len(picked))
    return [sorted(picked[k::parts]) for k in range(parts)]
