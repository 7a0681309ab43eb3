"""The one sampler: the base model, CTRL, CFG and the gradient-guidance baselines are rollouts of `sample`;
the particle baselines (SMC, SVDD, best-of-N; `ctrldiff.methods`) are thin loops over the same step maths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .contracts import Cond, Denoiser
from .schedule import Schedule, gaussian_kl, predict_x0, step_mean_std

TRUNCATE_CHOICES = "None (full), an int K (only the last K steps carry gradients) or 'random'"


@dataclass
class Trajectory:
    """x_T .. x_0 plus, per step, the Gaussian the sampler drew from (and the reference's mean at the same x_t)."""

    xs: list[Tensor]  # steps + 1 states, x_T first
    means: list[Tensor]  # per step, mean of pi_theta(x_{t-1} | x_t)
    stds: list[Tensor]  # per step, broadcastable std (shared by policy and reference)
    timesteps: Tensor  # (steps,) descending
    ref_means: list[Tensor] | None = None  # per step, mean of pi_pre(x_{t-1} | x_t) at the same x_t
    nfe: int = 0  # network evaluations of the sampled denoiser
    eta: float = 1.0

    @property
    def x0(self) -> Tensor:
        return self.xs[-1]

    def path_kl(self) -> Tensor:
        """KL(P_theta || P_pre) along this path, summed over dims and steps (CTRL's regulariser), per sample.

        Deterministic steps (std = 0: the last DDIM step, which only rescales x_t by 1/sqrt(abar) and moves
        x_0 by at most sqrt(1 - abar_0) * |d eps| ~ 1e-2) have no density and are left out.
        """
        if self.ref_means is None:
            raise ValueError("this trajectory was sampled without a reference denoiser; pass reference=")
        terms = [gaussian_kl(m, r, s) for m, r, s in zip(self.means, self.ref_means, self.stds) if (s > 0).all()]
        if not terms:
            raise ValueError("the path KL needs stochastic steps (eta > 0); eta = 0 is deterministic DDIM")
        return torch.stack(terms).sum(0)

    def shares_deterministic_steps(self) -> bool:
        """Whether every deterministic step (std = 0) is the reference's own map, so that the path density ratio
        dP_pre / dP_theta exists: true when the frozen base takes the last step (`final=`, rl.final_step="base")."""
        if self.ref_means is None:
            raise ValueError("this trajectory was sampled without a reference denoiser; pass reference=")
        return all(torch.allclose(m, r, rtol=1e-5, atol=1e-6)
                   for m, r, s in zip(self.means, self.ref_means, self.stds) if not (s > 0).all())

    def log_ratio(self) -> Tensor:
        """log dP_pre/dP_theta along this path, per sample: over the stochastic steps,
        log N(x'; mu_pre, s^2) - log N(x'; mu_theta, s^2) = -(||u||^2 / 2 + u.z), u = (mu_theta - mu_pre) / s and
        z = (x' - mu_theta) / s the step's noise. Its mean under P_theta is -path_kl(); with the reward it gives
        the path-space importance weight of the target P* (`target.path_meter`). Undefined (ValueError) where a
        deterministic step is not the reference's (rl.final_step="model": the two chains' last maps differ)."""
        if not self.shares_deterministic_steps():
            raise ValueError("the path ratio to the base is undefined: a deterministic step (the last) is not the "
                             "base's own (final_step='model')")
        out = torch.zeros(self.xs[0].shape[0], dtype=self.xs[0].dtype)
        for i, (m, r, s) in enumerate(zip(self.means, self.ref_means, self.stds)):
            if (s > 0).all():
                u, z = (m - r) / s, (self.xs[i + 1] - m) / s
                out = out - (0.5 * u**2 + u * z).flatten(1).sum(1)
        return out


def step_times(schedule: Schedule, steps: int) -> list[tuple[Tensor, Tensor]]:
    """(t, t_prev) for each step of the chain; t_prev = -1 is the clean end (abar = 1)."""
    ts = schedule.timesteps(steps)
    return [(t, ts[i + 1] if i + 1 < steps else torch.tensor(-1)) for i, t in enumerate(ts)]


def _detach_mask(steps: int, truncate, generator: torch.Generator | None, own: int | None = None) -> list[bool]:
    """Which steps' network outputs are detached from the graph; `own` (default all) is how many steps the sampled
    denoiser takes itself: the rest, the base's last step (`final=`), always keep their graph to x_t.

    'random' is CTRL's randomised truncation: step i of the N own steps is detached with probability
    1 - (i + 1) / N, so early steps rarely carry gradients and the last own step always does (counted over all
    steps instead, the base's last step would take that place and a rollout could carry no gradient at all).
    """
    own = steps if own is None else own
    if truncate is None:
        return [False] * steps
    if truncate == "random":
        if generator is None:  # no graph to truncate: draw nothing, so the samples match grad=True's
            return [False] * steps
        u = torch.rand(own, generator=generator)
        return [bool(u[i] < 1 - (i + 1) / own) for i in range(own)] + [False] * (steps - own)
    if isinstance(truncate, int) and not isinstance(truncate, bool) and truncate >= 0:
        return [i < own - truncate for i in range(steps)]  # the last K of the own steps
    raise ValueError(f"unknown truncate={truncate!r}; choose {TRUNCATE_CHOICES}")


def sample(
    denoiser: Denoiser,
    schedule: Schedule,
    x_T: Tensor,
    cond: Cond,
    *,
    steps: int = 20,
    eta: float = 1.0,
    reference: Denoiser | None = None,
    grad: bool = False,
    truncate: int | str | None = None,
    checkpoint: bool = False,
    generator: torch.Generator | None = None,
    x0_guide: Callable[[Tensor, Tensor, Cond], Tensor] | None = None,
    final: Denoiser | None = None,
) -> Trajectory:
    """Roll out the DDIM(eta) chain from x_T; returns the Trajectory.

    grad: keep the graph (CTRL's direct back-propagation through the chain, Algorithm 2).
    truncate: None, K (steps before the last K run without a graph) or 'random' (see `_detach_mask`).
    checkpoint: recompute each network call in the backward pass (a memory tool; costs ~50% time on CPU).
    reference: the frozen base; if given, its mean at every visited x_t is stored for `Trajectory.path_kl`,
        with a graph through x_t (not through its frozen weights). Stopping that gradient would be cheaper but
        biased: d/dx_t ||mu_theta(x_t) - sg(mu_pre(x_t))||^2 is ~ 2 (mu_theta - mu_pre) d mu / dx_t, not ~ 0;
        on the seeded toy task of tests/test_control_rl.py the path KL then ran away to 6.8e4 nats (2.1 exact).
    x0_guide: (x0_hat, t, cond) -> corrected x0_hat, used in the step instead of Tweedie's estimate (MPGD).
    final: the denoiser of the last, deterministic step (to t = -1; default `denoiser`). The path KL cannot see
        that step (std = 0), so a fine-tuned model left in charge of it can move x_0 by sqrt(1 - abar_t) |d eps|
        at no KL cost (0.17 per unit of eps with 20 trailing steps); the 2-D exactness study measured this
        hack (docs/exactness.md). `final=` the frozen base closes it: `rl.final_step = "base"`.
    """
    ts = schedule.timesteps(steps)
    own = steps - 1 if final is not None else steps  # steps the sampled denoiser takes itself
    detached = _detach_mask(steps, truncate, generator if grad else None, own)
    x = x_T
    traj = Trajectory([x], [], [], ts, [] if reference is not None else None, eta=eta)
    for i, (t, t_prev) in enumerate(step_times(schedule, steps)):
        tb, t_prev = t.expand(x.shape[0]), t_prev.expand(x.shape[0])
        no_graph = not grad or (isinstance(truncate, int) and i < own - truncate)
        with torch.set_grad_enabled(not no_graph):
            use_ckpt = checkpoint and not no_graph and not detached[i]
            net = final if final is not None and i == steps - 1 else denoiser
            eps = _call(net, x, tb, cond, use_ckpt, detached[i])
            x0 = None if x0_guide is None else x0_guide(predict_x0(schedule.abar(tb, x), x, eps), tb, cond)
            mean, std = step_mean_std(schedule, x, eps, tb, t_prev, eta, x0)
            if reference is not None:  # same x_t, same graph: the KL's gradient through the state is exact
                eps_ref = _call(reference, x, tb, cond, use_ckpt, detached[i])
                traj.ref_means.append(step_mean_std(schedule, x, eps_ref, tb, t_prev, eta)[0])
            x = mean + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        traj.nfe += 1
        traj.xs.append(x)
        traj.means.append(mean)
        traj.stds.append(std)
    return traj


def _call(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond, ckpt: bool, detach: bool) -> Tensor:
    """One network evaluation; a detached one builds no graph at all (x_t keeps its own)."""
    if detach:
        with torch.no_grad():
            return denoiser(x, t, cond)
    return grad_checkpoint(denoiser, x, t, cond, use_reentrant=False) if ckpt else denoiser(x, t, cond)


@torch.no_grad()
def reference_means(traj: Trajectory, reference: Denoiser, schedule: Schedule, cond: Cond) -> list[Tensor]:
    """The reference's (frozen base's) step means at the states the trajectory visited.

    Without a graph: the base's parameters are frozen, and the KL's gradient reaches theta through mu_theta.
    """
    n, out = traj.xs[0].shape[0], []
    for i, (t, t_prev) in enumerate(step_times(schedule, len(traj.timesteps))):
        x, t, t_prev = traj.xs[i].detach(), t.expand(n), t_prev.expand(n)
        out.append(step_mean_std(schedule, x, reference(x, t, cond), t, t_prev, traj.eta)[0])
    return out
