"""Does CTRL sample p_gamma(x | c, y) ∝ p̂(y|x)^gamma p_pre(x|c)? Measured on 2-D mixtures with a known answer.

The pieces the study (benchmarks/exactness.py, docs/exactness.md) and its test share: the setup, CTRL through
the same `rl.finetune` as the images, sampling with or without a start tilted by the value function, SMC as an
asymptotically exact reference, and the distances (TV on a histogram, per-mode mass error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .backends.mixture import (
    MIXTURES,
    Grid,
    LogisticNet,
    MixtureBackend,
    exact_samples,
    mixture_backend,
    mode_masses,
    target_log_density,
    total_variation,
)
from .classifier import Classifier
from .config import Config
from .contracts import Cond
from .methods.guidance import Likelihood
from .methods.particles import smc
from .rl import RewardTerm, finetune
from .sampling import sample
from .tasks.controls import Control

CONTROL = Control("direction3", 3, None)  # y: which of 3 directions x points along (analytic logistic p̂)


@dataclass
class Setup:
    backend: MixtureBackend
    classifier: Classifier
    grid: Grid = field(default_factory=Grid)
    steps: int = 100  # DDIM steps: enough that the exact base itself samples p_pre closely (see the study)

    def conditions(self) -> list[tuple[int, int]]:
        return [(c, y) for c in range(self.backend.num_c) for y in range(CONTROL.num_classes)]


def make_setup(exact: bool = True, steps: int = 100, grid: Grid | None = None) -> Setup:
    return Setup(mixture_backend(exact), Classifier(LogisticNet(CONTROL.num_classes)).eval(), grid or Grid(), steps)


def rl_config(setup: Setup, gamma: float, eta: float, steps: int = 400, batch: int = 256,
              kl: str = "sum", seed: int = 0, final_step: str = "base") -> Config:
    cfg = Config(name="exactness", seed=seed)
    cfg.sampler.steps, cfg.sampler.eta = setup.steps, eta
    cfg.rl.controls = {CONTROL.name: gamma}
    cfg.rl.steps, cfg.rl.batch, cfg.rl.kl, cfg.rl.final_step = steps, batch, kl, final_step
    cfg.rl.lora_rank, cfg.rl.lr_lora, cfg.rl.lr_emb, cfg.rl.weight_decay = 8, 3e-3, 3e-2, 0.0
    cfg.rl.truncate, cfg.rl.monitor_every = None, 10**9  # full back-propagation: 2-D is cheap
    return cfg


def train_ctrl(setup: Setup, cfg: Config, start=None, progress: bool = False):
    """CTRL through the same `rl.finetune` as the images; returns the augmented model and the training log."""
    records: list[dict] = []
    term = RewardTerm(CONTROL, setup.classifier, cfg.rl.controls[CONTROL.name])
    model, _ = finetune(setup.backend, [term], cfg, log=records.append, progress=progress, start=start)
    return model, records


def requests(n: int, c: int, y: int) -> Cond:
    return Cond(torch.full((n,), c), {CONTROL.name: torch.full((n,), y)})


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
        self.pools = {}
        for c in range(setup.backend.num_c):
            x_T, x0 = base_rollouts(setup, c, pool, eta, g)
            logp = setup.classifier(x0).log_softmax(-1)  # (pool, K)
            self.pools[c] = (x_T, (gamma * logp).softmax(0))  # per y: normalised weights over the pool

    def __call__(self, cond: Cond, g: torch.Generator) -> Tensor:
        out = torch.empty((len(cond), 2))
        y = cond.y[CONTROL.name]
        for c, (x_T, w) in self.pools.items():
            for k in range(w.shape[1]):
                m = (cond.c == c) & (y == k)
                if m.any():
                    out[m] = x_T[torch.multinomial(w[:, k], int(m.sum()), replacement=True, generator=g)]
        return out


@torch.no_grad()
def ctrl_samples(setup: Setup, model, c: int, y: int, n: int, eta: float, g: torch.Generator, start=None,
                 batch: int = 50_000) -> Tensor:
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        cond = requests(m, c, y)
        x_T = torch.randn((m, 2), generator=g) if start is None else start(cond, g)
        out.append(sample(model, setup.backend.schedule, x_T, cond, steps=setup.steps, eta=eta, generator=g,
                          final=model.final(setup.backend)).x0)
    return torch.cat(out)


def smc_samples(setup: Setup, c: int, y: int, n: int, eta: float, gamma: float, particles: int,
                g: torch.Generator, batch: int = 20_000) -> Tensor:
    """TDS on the exact base (twist p̂(y|x0_hat)^gamma, proposal scale w = gamma): exact as K grows."""
    lik = Likelihood(setup.backend, {CONTROL.name: setup.classifier})
    out, per = [], max(1, batch // particles)
    for i in range(0, n, per):
        m = min(per, n - i)
        cond = requests(m, c, y)
        out.append(smc(setup.backend.denoiser, setup.backend.schedule, lik, cond, (2,), g, steps=setup.steps,
                       eta=eta, particles=particles, gamma=gamma, w=gamma, ess=0.5).detach())
    return torch.cat(out)


def target_masses(setup: Setup, c: int, y: int, gamma: float) -> Tensor:
    pts = setup.grid.points()
    with torch.no_grad():
        logp_y = setup.classifier(pts).log_softmax(-1)[:, y]
    return setup.grid.masses(target_log_density(MIXTURES[c], logp_y, gamma, pts))


def distances(setup: Setup, x: Tensor, c: int, y: int, gamma: float, g: torch.Generator,
              reference: int = 400_000) -> dict:
    """TV to the exact p_gamma on the grid's histogram and the per-mode mass error (max over modes, absolute,
    against `reference` exact draws), each beside the same number for as many exact draws as `x` has (the
    sampling-noise floor)."""
    mix, target = MIXTURES[c], target_masses(setup, c, y, gamma)
    modes = mode_masses(mix, exact_samples(mix, setup.classifier, y, gamma, reference, g))
    exact = exact_samples(mix, setup.classifier, y, gamma, len(x), g)
    return {"tv": total_variation(setup.grid.histogram(x), target),
            "tv_floor": total_variation(setup.grid.histogram(exact), target),
            "mode_error": float((mode_masses(mix, x) - modes).abs().max()),
            "mode_error_floor": float((mode_masses(mix, exact) - modes).abs().max()),
            "samples": len(x)}
