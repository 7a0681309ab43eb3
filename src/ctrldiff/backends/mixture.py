"""A 2-D backend with a known answer (docs/exactness.md): for each c a Gaussian mixture, the exact pre-trained
eps-predictor from the closed-form noisy mixture score, an analytic logistic p̂(y|x), and the exact CTRL target
p_gamma(x | c, y) ∝ p̂(y|x)^gamma p_pre(x|c) on a grid.

The network is `exact eps + a residual MLP` whose output layer starts at zero: the pre-trained model is exact
(no training error), and the MLP gives CTRL's adapters (control embedding + LoRA) somewhere to act. With
`exact=False` the MLP is the whole network, trained by denoising score matching (the realistic case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..contracts import Cond
from ..models.unet import timestep_embedding
from ..schedule import Schedule


@dataclass(frozen=True)
class Mixture:
    """Isotropic Gaussian mixture: equal weights, one std."""

    means: Tensor  # (M, 2)
    std: float

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        k = torch.randint(0, len(self.means), (n,), generator=g)
        return self.means[k] + self.std * torch.randn((n, 2), generator=g)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.noisy_log_prob(x, torch.ones(()))

    def noisy_log_prob(self, x: Tensor, abar: Tensor) -> Tensor:
        """log p_t(x) for x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps: each mode N(sqrt(abar) mu, abar s^2 + 1 - abar)."""
        var = abar * self.std**2 + 1 - abar  # (N, 1) or scalar
        d2 = ((x[:, None, :] - abar.sqrt().reshape(-1, 1, 1) * self.means[None]) ** 2).sum(-1)  # (N, M)
        return torch.logsumexp(-d2 / (2 * var.reshape(-1, 1)), 1) - math.log(len(self.means)) - torch.log(
            2 * math.pi * var.reshape(-1))

    def posterior(self, x_t: Tensor, abar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """p(x_0 | x_t) in closed form, a mixture again: (log weights (N, M), means (N, M, 2), variance (N, 1)).
        Mode k's prior N(mu_k, s^2 I) times the likelihood N(x_t; sqrt(abar) x_0, (1 - abar) I)."""
        s2, noise = self.std**2, 1 - abar  # abar: (N, 1)
        var = s2 * noise / (noise + abar * s2)
        diff = x_t[:, None, :] - abar.sqrt()[:, :, None] * self.means[None]  # (N, M, 2)
        log_w = torch.log_softmax(-(diff**2).sum(-1) / (2 * (abar * s2 + noise)), 1)
        means = var[:, :, None] * (self.means[None] / s2 + abar.sqrt()[:, :, None] * x_t[:, None, :] / noise[:, :, None])
        return log_w, means, var

    def eps(self, x_t: Tensor, abar: Tensor) -> Tensor:
        """The exact eps-prediction -sqrt(1 - abar) grad log p_t(x_t) (abar: (N, 1))."""
        var = abar * self.std**2 + 1 - abar
        diff = x_t[:, None, :] - abar.sqrt()[:, :, None] * self.means[None]  # (N, M, 2)
        r = torch.softmax(-(diff**2).sum(-1) / (2 * var), 1)  # responsibilities (N, M)
        score = -(r[:, :, None] * diff).sum(1) / var
        return -(1 - abar).sqrt() * score


def ring(modes: int = 8, radius: float = 2.0, std: float = 0.25) -> Mixture:
    a = torch.arange(modes) * 2 * math.pi / modes
    return Mixture(radius * torch.stack([a.cos(), a.sin()], 1), std)


def grid(side: int = 3, spacing: float = 1.5, std: float = 0.25) -> Mixture:
    u = (torch.arange(side) - (side - 1) / 2) * spacing
    return Mixture(torch.cartesian_prod(u, u), std)


MIXTURES = [ring(), grid()]  # c = 0: a ring of 8 modes; c = 1: a 3x3 grid


def sample_data(c: Tensor, g: torch.Generator, mixtures: list[Mixture] | None = None) -> Tensor:
    """x_0 ~ p_pre(x | c) = mixtures[c] (default `MIXTURES`) for each entry of c: a learned denoiser's data."""
    out = torch.empty((len(c), 2))
    for k, mix in enumerate(mixtures or MIXTURES):
        m = c == k
        out[m] = mix.sample(int(m.sum()), g)
    return out


class MixtureNet(nn.Module):
    """eps(x_t, t, c, emb) = [exact mixture eps] + MLP(x_t, time/c embedding + emb)."""

    def __init__(self, schedule: Schedule, mixtures: list[Mixture] | None = None, exact: bool = True,
                 hidden: int = 128, emb_dim: int = 64):
        super().__init__()
        self.mixtures, self.exact, self.emb_dim = mixtures or MIXTURES, exact, emb_dim
        self.register_buffer("abar", schedule.alphas_cumprod.float())
        self.class_emb = nn.Embedding(len(self.mixtures) + 1, emb_dim)
        self.fc1 = nn.Linear(2 + emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)
        if exact:  # the residual starts at zero: the network is the exact pre-trained model
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None, emb: Tensor | None = None) -> Tensor:
        if c is None:
            c = torch.full((len(x),), len(self.mixtures), dtype=torch.long)
        e = timestep_embedding(t, self.emb_dim) + self.class_emb(c)
        if emb is not None:
            e = e + emb
        h = F.silu(self.fc1(torch.cat([x, e], 1)))
        r = self.out(F.silu(self.fc3(F.silu(self.fc2(h)))))
        return r + self.exact_eps(x, t, c) if self.exact else r

    def exact_eps(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        abar = self.abar[t][:, None]
        out = torch.zeros_like(x)
        for k, mix in enumerate(self.mixtures):
            m = c == k
            if m.any():
                out[m] = mix.eps(x[m], abar[m])
        return out


@dataclass
class MixtureBackend:
    """The Backend contract (like `PixelBackend`) in 2-D: latents are points, decode is the identity."""

    net: MixtureNet
    schedule: Schedule
    lora_targets: tuple[str, ...] = ("fc1", "fc2", "fc3", "out")

    def __post_init__(self):
        self.net.eval().requires_grad_(False)

    shape = (2,)

    @property
    def emb_dim(self) -> int:
        return self.net.emb_dim

    @property
    def num_c(self) -> int:
        return len(self.net.mixtures)

    def call(self, net, x_t: Tensor, t: Tensor, c: Tensor | None, emb: Tensor | None = None) -> Tensor:
        return net(x_t, t, c, emb)

    def denoiser(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.net(x_t, t, cond.c)

    def decode(self, x: Tensor) -> Tensor:
        return x

    def classifier_input(self, x0: Tensor) -> Tensor:
        return x0


class LogisticNet(nn.Module):
    """p̂(y | x) = softmax(scale * <u_k, x> + b_k): K classes along K directions (analytic, or fitted from pairs)."""

    def __init__(self, num_classes: int = 3, scale: float = 1.5):
        super().__init__()
        a = torch.arange(num_classes) * 2 * math.pi / num_classes
        self.head = nn.Linear(2, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(scale * torch.stack([a.cos(), a.sin()], 1))
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, steps: int = 200) -> LogisticNet:
    """Maximum-likelihood logistic regression on pairs (L-BFGS), for a p̂(y|x) learned from data."""
    net = LogisticNet(num_classes, scale=0.0)
    opt = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return net.requires_grad_(False)


def mixture_backend(exact: bool = True, seed: int = 0, mixtures: list[Mixture] | None = None) -> MixtureBackend:
    """p_pre(x | c) = mixtures[c] (default `MIXTURES`): exact, or the residual MLP to learn it (`exact=False`)."""
    torch.manual_seed(seed)
    schedule = Schedule.linear()
    return MixtureBackend(MixtureNet(schedule, mixtures, exact=exact), schedule)


# --- the exact target and distances --------------------------------------------------------------------------

def target_log_density(mix: Mixture, log_p_y: Tensor, gamma: float, x: Tensor) -> Tensor:
    """Unnormalised log p_gamma(x) = gamma log p̂(y|x) + log p_pre(x); log_p_y = log p̂(y|x) at x."""
    return gamma * log_p_y + mix.log_prob(x)


@dataclass
class Grid:
    """Square histogram bins over [-half, half]^2, with `sub` x `sub` evaluation points per bin."""

    half: float = 4.0
    bins: int = 48
    sub: int = 6

    @property
    def point_area(self) -> float:
        """The area each evaluation point stands for (a sub-bin)."""
        return (2 * self.half / (self.bins * self.sub)) ** 2

    def points(self) -> Tensor:
        n = self.bins * self.sub
        u = -self.half + (torch.arange(n) + 0.5) * (2 * self.half / n)
        return torch.cartesian_prod(u, u)  # row-major: x first

    def masses(self, log_density: Tensor) -> Tensor:
        """Bin masses (bins, bins) of a density given at `points()` (normalised over the square)."""
        n = self.bins * self.sub
        p = (log_density - log_density.max()).exp().reshape(n, n)
        p = p.reshape(self.bins, self.sub, self.bins, self.sub).sum((1, 3))
        return p / p.sum()

    def histogram(self, x: Tensor) -> Tensor:
        """Bin frequencies of samples (those outside the square count as lost mass)."""
        idx = ((x + self.half) / (2 * self.half) * self.bins).floor().long()
        inside = ((idx >= 0) & (idx < self.bins)).all(1)
        flat = idx[inside, 0] * self.bins + idx[inside, 1]
        return torch.bincount(flat, minlength=self.bins**2).reshape(self.bins, self.bins).float() / len(x)


def total_variation(p: Tensor, q: Tensor) -> float:
    """TV = 1/2 sum |p - q| over bins (mass outside the square counts as disagreement)."""
    return 0.5 * float((p - q).abs().sum() + abs(float(p.sum() - q.sum())))


def mode_masses(mix: Mixture, x: Tensor) -> Tensor:
    """Fraction of samples nearest to each mode."""
    nearest = torch.cdist(x, mix.means).argmin(1)
    return torch.bincount(nearest, minlength=len(mix.means)).float() / len(x)


def exact_samples(mix: Mixture, clf: nn.Module, y: int, gamma: float, n: int, g: torch.Generator) -> Tensor:
    """Exact draws from p_gamma by rejection: x ~ p_pre, accepted with probability p̂(y|x)^gamma (<= 1)."""
    out, have = [], 0
    while have < n:
        x = mix.sample(4 * n, g)
        with torch.no_grad():
            accept = torch.rand(len(x), generator=g) < clf(x).log_softmax(-1)[:, y].mul(gamma).exp()
        out.append(x[accept])
        have += int(accept.sum())
    return torch.cat(out)[:n]
