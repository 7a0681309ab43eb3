"""Does CTRL sample p_gamma(x | c, y) ∝ p̂(y|x)^gamma p_pre(x|c)? Measured on 2-D mixtures with a known answer.

The pieces the study (benchmarks/exactness.py, docs/exactness.md) and its test share: the setup, CTRL through
the same `rl.finetune` as the images, sampling with or without a start tilted by the value function, SMC as an
asymptotically exact reference, and the distances (TV on a histogram, per-mode mass error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .backends.mixture import (
    Grid,
    LogisticNet,
    Mixture,
    MixtureBackend,
    exact_samples,
    mixture_backend,
    mode_masses,
    target_log_density,
    total_variation,
)
from .classifier import Classifier
from .config import Config
from .contracts import Cond, Denoiser
from .control import ControlledDenoiser
from .methods.guidance import Likelihood
from .methods.particles import smc
from .rl import RewardTerm, finetune
from .rl.finetune import set_lr
from .sampling import sample
from .schedule import add_noise
from .tasks.controls import Control

CONTROL = Control("direction3", 3, None)  # y: which of 3 directions x points along (analytic logistic p̂)


@dataclass
class Setup:
    """One 2-D problem: the base (a mixture per c), the control and its p̂(y | x), the grid distances are measured
    on, and the DDIM steps of every chain."""

    backend: MixtureBackend
    classifier: Classifier
    grid: Grid = field(default_factory=Grid)
    steps: int = 100  # DDIM steps (the study: the exact base at 100 steps is at TV 0.035 (eta 0.5) from p_pre)
    control: Control = field(default_factory=lambda: CONTROL)

    @property
    def mixtures(self) -> list[Mixture]:
        return self.backend.net.mixtures

    def conditions(self) -> list[tuple[int, int]]:
        return [(c, y) for c in range(self.backend.num_c) for y in range(self.control.num_classes)]


def make_setup(exact: bool = True, steps: int = 100, grid: Grid | None = None, mixtures: list[Mixture] | None = None,
               control: Control = CONTROL, classifier: nn.Module | None = None) -> Setup:
    """The study's problem (`MIXTURES`, `CONTROL`, the analytic logistic p̂ along K directions), or another:
    p_pre(x | c) = mixtures[c], a control with its p̂(y | x) (default: the analytic one for its K classes)."""
    net = classifier if classifier is not None else LogisticNet(control.num_classes)
    return Setup(mixture_backend(exact, mixtures=mixtures), Classifier(net).eval(), grid or Grid(), steps, control)


def rl_config(setup: Setup, gamma: float, eta: float, steps: int = 400, batch: int = 256,
              kl: str = "sum", seed: int = 0, final_step: str = "base") -> Config:
    """CTRL's settings here. Rank 32 and rates 5x the old (rank 8, 3e-3 / 3e-2) with a cosine decay: at 50 DDIM
    steps and 500 optimiser steps (gamma 1, eta 1) they close the objective's gap to log Z from 0.13 to 0.06 nats;
    rank 32 at 10x diverged, rank 8 at 30x too (docs/exactness.md)."""
    cfg = Config(name="exactness", seed=seed)
    cfg.sampler.steps, cfg.sampler.eta = setup.steps, eta
    cfg.rl.controls = {setup.control.name: gamma}
    cfg.rl.steps, cfg.rl.batch, cfg.rl.kl, cfg.rl.final_step = steps, batch, kl, final_step
    cfg.rl.lora_rank, cfg.rl.lr_lora, cfg.rl.lr_emb, cfg.rl.weight_decay = 32, 1.5e-2, 0.15, 0.0
    cfg.rl.lr_schedule = "cosine"
    cfg.rl.truncate, cfg.rl.monitor_every = None, 10**9  # full back-propagation: 2-D is cheap
    return cfg


def train_ctrl(setup: Setup, cfg: Config, start=None, progress: bool = False, init=None):
    """CTRL through the same `rl.finetune` as the images; returns the augmented model and the training log."""
    records: list[dict] = []
    term = RewardTerm(setup.control, setup.classifier, cfg.rl.controls[setup.control.name])
    model, _ = finetune(setup.backend, [term], cfg, log=records.append, progress=progress, start=start, init=init)
    return model, records


def requests(setup: Setup, n: int, c: int, y: int) -> Cond:
    return Cond(torch.full((n,), c), {setup.control.name: torch.full((n,), y)})


@torch.no_grad()
def base_rollouts(setup: Setup, c: int, n: int, eta: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x_T, x_0) pairs from the pre-trained chain for digit-less condition c."""
    x_T = torch.randn((n, 2), generator=g)
    cond = Cond(torch.full((n,), c))
    return x_T, sample(setup.backend.denoiser, setup.backend.schedule, x_T, cond, steps=setup.steps, eta=eta,
                       generator=g).x0


class TiltedStart:
    """x_T ~ nu*(x_T) ∝ N(x_T; 0, I) E_pre[p̂(y|x_0)^gamma | x_T], the start the soft-optimal policy needs
    (METHOD.md §4), by sampling-importance-resampling from a pool of base rollouts: each pool member's x_T is
    weighted by p̂(y | its own x_0)^gamma, an unbiased one-sample estimate of exp(v(x_T)). Exact as the pool
    grows; no training, no learned value function."""

    def __init__(self, setup: Setup, gamma: float, eta: float, pool: int, g: torch.Generator):
        self.name, self.pools = setup.control.name, {}
        for c in range(setup.backend.num_c):
            x_T, x0 = base_rollouts(setup, c, pool, eta, g)
            logp = setup.classifier(x0).log_softmax(-1)  # (pool, K)
            self.pools[c] = (x_T, (gamma * logp).softmax(0))  # per y: normalised weights over the pool

    def __call__(self, cond: Cond, g: torch.Generator) -> Tensor:
        out = torch.empty((len(cond), 2))
        y = cond.y[self.name]
        for c, (x_T, w) in self.pools.items():
            for k in range(w.shape[1]):
                m = (cond.c == c) & (y == k)
                if m.any():
                    out[m] = x_T[torch.multinomial(w[:, k], int(m.sum()), replacement=True, generator=g)]
        return out


class TargetDenoiser:
    """The exact eps-predictor of the target p_gamma (noised by the forward process), computed, not learned:
    eps*(x_t) = eps_pre(x_t) - sqrt(1 - abar_t) grad log h_t(x_t), h_t(x_t) = E_pre[p̂(y|x_0)^gamma | x_t], since
    the noised target is p_t h_t / Z. h_t comes from the closed-form mixture posterior p(x_0 | x_t) and a
    Gauss-Hermite product rule per mode (`nodes`^2 points). A DDIM chain with it samples p_gamma up to the sampler's
    own discretisation error, at any eta; at eta = 1 (DDPM, whose chain forgets x_T) it is also the policy CTRL's
    objective is maximised by. So it separates the method's bias from the fine-tune's. Like CTRL with
    `final_step="base"`, the last deterministic step is the base's."""

    def __init__(self, setup: Setup, gamma: float, nodes: int = 4):
        self.setup, self.gamma = setup, gamma
        z, w = np.polynomial.hermite_e.hermegauss(nodes)  # E_N(0,1)[f] ~ sum_i w_i f(z_i) / sum_i w_i
        z, w = torch.tensor(z, dtype=torch.float32), torch.tensor(w / w.sum(), dtype=torch.float32)
        self.z = torch.cartesian_prod(z, z)  # (P, 2)
        self.log_w = torch.cartesian_prod(w, w).prod(1).log()  # (P,)

    def final(self, backend) -> Denoiser:
        return backend.denoiser

    def log_h(self, x_t: Tensor, abar: Tensor, c: int, y: Tensor) -> Tensor:
        log_w, means, var = self.setup.mixtures[c].posterior(x_t, abar)  # (N, M), (N, M, 2), (N, 1)
        pts = means[:, :, None, :] + var.sqrt()[:, :, None, None] * self.z  # (N, M, P, 2)
        log_p = self.setup.classifier(pts).log_softmax(-1)  # (N, M, P, K)
        log_p = log_p.gather(-1, y[:, None, None, None].expand(*log_p.shape[:3], 1)).squeeze(-1)
        return torch.logsumexp(log_w[:, :, None] + self.log_w + self.gamma * log_p, (1, 2))

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        abar = self.setup.backend.net.abar[t][:, None]
        y, grad = cond.y[self.setup.control.name], torch.zeros_like(x_t)
        with torch.enable_grad():
            for c in range(self.setup.backend.num_c):
                m = cond.c == c
                if m.any():
                    x = x_t[m].detach().requires_grad_()
                    grad[m] = torch.autograd.grad(self.log_h(x, abar[m], c, y[m]).sum(), x)[0]
        return self.setup.backend.denoiser(x_t, t, cond) - (1 - abar).sqrt() * grad


def fit_adapter(setup: Setup, teacher: TargetDenoiser, cfg: Config, steps: int = 3000, batch: int = 512,
                pool: int = 50_000) -> ControlledDenoiser:
    """CTRL's adapter (same embedding, LoRA rank, learning rates and schedule) regressed on the exact target eps at noised
    exact draws of p_gamma: not a method, a capacity check. If it samples p_gamma as well as the teacher, the
    adapter can represent the optimum and what CTRL misses is its optimisation's."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    pools = torch.stack([exact_samples(setup.mixtures[c], setup.classifier, y, teacher.gamma, pool, g)
                         for c, y in setup.conditions()])  # (pairs, pool, 2)
    model = ControlledDenoiser(setup.backend, {setup.control.name: setup.control.num_classes}, cfg.rl.lora_rank,
                               final_step=cfg.rl.final_step)
    opt = torch.optim.AdamW([{"params": model.embedding_parameters(), "lr": cfg.rl.lr_emb},
                             {"params": model.lora_parameters(), "lr": cfg.rl.lr_lora}], weight_decay=0.0)
    pairs, base_lrs = torch.tensor(setup.conditions()), [grp["lr"] for grp in opt.param_groups]
    for step in range(steps):
        k = torch.randint(0, len(pairs), (batch,), generator=g)
        x0 = pools[k, torch.randint(0, pool, (batch,), generator=g)]
        t = torch.randint(0, setup.backend.schedule.num_train_timesteps, (batch,), generator=g)
        x_t = add_noise(setup.backend.schedule, x0, torch.randn(x0.shape, generator=g), t)
        cond = Cond(pairs[k, 0], {setup.control.name: pairs[k, 1]})
        loss = ((model(x_t, t, cond) - teacher(x_t, t, cond).detach()) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(opt, base_lrs, cfg.rl.lr_schedule, step, steps)
        opt.step()
    return model.eval()


@torch.no_grad()
def ctrl_samples(setup: Setup, model, c: int, y: int, n: int, eta: float, g: torch.Generator, start=None,
                 batch: int = 50_000) -> Tensor:
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        cond = requests(setup, m, c, y)
        x_T = torch.randn((m, 2), generator=g) if start is None else start(cond, g)
        out.append(sample(model, setup.backend.schedule, x_T, cond, steps=setup.steps, eta=eta, generator=g,
                          final=model.final(setup.backend)).x0)
    return torch.cat(out)


def smc_samples(setup: Setup, c: int, y: int, n: int, eta: float, gamma: float, particles: int,
                g: torch.Generator, batch: int = 20_000) -> Tensor:
    """TDS on the exact base (twist p̂(y|x0_hat)^gamma, proposal scale w = gamma): exact as K grows."""
    lik = Likelihood(setup.backend, {setup.control.name: setup.classifier})
    out, per = [], max(1, batch // particles)
    for i in range(0, n, per):
        m = min(per, n - i)
        cond = requests(setup, m, c, y)
        out.append(smc(setup.backend.denoiser, setup.backend.schedule, lik, cond, (2,), g, steps=setup.steps,
                       eta=eta, particles=particles, gamma=gamma, w=gamma, ess=0.5).detach())
    return torch.cat(out)


@torch.no_grad()
def on_grid(setup: Setup, c: int, y: int, gamma: float) -> tuple[Tensor, Tensor]:
    """log p̂(y|x) and the unnormalised log p_gamma(x | c, y) at the grid's evaluation points."""
    pts = setup.grid.points()
    log_p = setup.classifier(pts).log_softmax(-1)[:, y]
    return log_p, target_log_density(setup.mixtures[c], log_p, gamma, pts)


def optimum(setup: Setup, gamma: float) -> dict:
    """What the KL-regularised objective J = E[gamma log p̂(y|x_0)] - KL(P || P_pre) is worth at its optimum, from
    the grid, averaged over the (c, y): J* = log Z with Z = E_pre[p̂(y|x)^gamma], reached with reward
    E_p_gamma[gamma log p̂] and KL(p_gamma || p_pre) = reward - log Z. A policy's gap J* - J says how far its
    optimisation is from the optimum, separately from any distance on samples."""
    rows = []
    for c, y in setup.conditions():
        log_p, log_d = on_grid(setup, c, y, gamma)
        log_z = torch.logsumexp(log_d, 0) + math.log(setup.grid.point_area)
        reward = float((log_d - torch.logsumexp(log_d, 0)).exp() @ (gamma * log_p))
        rows.append((float(log_z), reward, reward - float(log_z)))
    log_z, reward, kl = (float(np.mean(v)) for v in zip(*rows))
    return {"log_z": log_z, "reward": reward, "kl": kl}


@torch.no_grad()
def start_bias(setup: Setup, c: int, eta: float, gammas: list[float], g: torch.Generator, starts: int = 100,
               rollouts: int = 2000) -> dict:
    """How far the start the soft-optimal policy needs, nu*(x_T) ∝ N(x_T; 0, I) h(x_T) with h(x_T) =
    E[p̂(y|x_0)^gamma | x_T] under this DDIM(eta) chain, is from N(0, I): TV(nu*, N) = E_N|h / E_N h - 1| / 2, by
    nested Monte Carlo (`rollouts` chains from each of `starts` x_T). It bounds the x_0 error of a fine-tune that
    starts from N(0, I) (data processing). Also returned: the TV an exactly flat h would show from the
    Monte-Carlo noise alone, so a value at that level means no measurable bias. Per (gamma, y)."""
    x_T = torch.randn((starts, 2), generator=g).repeat_interleave(rollouts, 0)
    x0 = sample(setup.backend.denoiser, setup.backend.schedule, x_T, Cond(torch.full((len(x_T),), c)),
                steps=setup.steps, eta=eta, generator=g).x0
    log_p = setup.classifier(x0).log_softmax(-1)
    out = {}
    for gamma in gammas:
        for y in range(setup.control.num_classes):
            p = (gamma * log_p[:, y]).exp().reshape(starts, rollouts)
            h, mean = p.mean(1), p.mean()
            out[(gamma, y)] = {"tv": float(0.5 * (h / mean - 1).abs().mean()),
                               "noise": float(0.5 * (p.std(1) / rollouts**0.5 / mean).mean() * math.sqrt(2 / math.pi))}
    return out


def target_masses(setup: Setup, c: int, y: int, gamma: float) -> Tensor:
    return setup.grid.masses(on_grid(setup, c, y, gamma)[1])


def distances(setup: Setup, x: Tensor, c: int, y: int, gamma: float, g: torch.Generator,
              reference: int = 400_000) -> dict:
    """TV to the exact p_gamma on the grid's histogram and the per-mode mass error (max over modes, absolute,
    against `reference` exact draws), each beside the same number for as many exact draws as `x` has (the
    sampling-noise floor)."""
    mix, target = setup.mixtures[c], target_masses(setup, c, y, gamma)
    modes = mode_masses(mix, exact_samples(mix, setup.classifier, y, gamma, reference, g))
    exact = exact_samples(mix, setup.classifier, y, gamma, len(x), g)
    return {"tv": total_variation(setup.grid.histogram(x), target),
            "tv_floor": total_variation(setup.grid.histogram(exact), target),
            "mode_error": float((mode_masses(mix, x) - modes).abs().max()),
            "mode_error_floor": float((mode_masses(mix, exact) - modes).abs().max()),
            "samples": len(x)}
