"""Particle baselines (METHOD.md §6) as thin loops over the sampler's step maths: SMC with twisting (TDS),
SVDD-PM and best-of-N. Each draws x_T itself from the generator in the same order as `sample`, so at its
neutral setting (K = 1 and w = 0, M = 1, N = 1) it reproduces the base sampler draw for draw."""

from __future__ import annotations

import torch
from torch import Tensor

from ..contracts import Cond, Denoiser
from ..sampling import sample, step_times
from ..schedule import Schedule, gaussian_log_prob, predict_x0, step_mean_std
from .guidance import Likelihood, loglik_and_grad


def _repeat(cond: Cond, k: int) -> Cond:
    """Each request k times in a row (request-major), the layout of every particle batch here."""
    return cond.index(torch.arange(len(cond)).repeat_interleave(k))


def _pick(scores: Tensor, alpha: float, generator: torch.Generator | None) -> Tensor:
    """Per row of (B, K) scores: a column drawn with probability softmax(scores / alpha); alpha = 0 is argmax."""
    if alpha == 0:
        return scores.argmax(1)
    return torch.multinomial((scores / alpha).softmax(1), 1, generator=generator).squeeze(1)


def _gather(x: Tensor, b: int, k: int, idx: Tensor) -> Tensor:
    """Row idx[i] of request i's k particles, for each of the b requests."""
    return x.view(b, k, *x.shape[1:])[torch.arange(b), idx]


def best_of_n(denoiser: Denoiser, schedule: Schedule, likelihood: Likelihood, cond: Cond, shape, generator, *,
              steps: int, eta: float, n: int) -> Tensor:
    """n base samples per request; keep the one the classifier scores highest."""
    b, rep = len(cond), _repeat(cond, n)
    x_T = torch.randn((b * n, *shape), generator=generator)
    x0 = sample(denoiser, schedule, x_T, rep, steps=steps, eta=eta, generator=generator).x0
    return x0 if n == 1 else _gather(x0, b, n, likelihood(x0, rep).view(b, n).argmax(1))


def svdd(denoiser: Denoiser, schedule: Schedule, likelihood: Likelihood, cond: Cond, shape, generator, *,
         steps: int, eta: float, candidates: int, alpha: float) -> Tensor:
    """SVDD-PM (Li et al. 2024): at each step, M candidates from the pre-trained kernel; one kept with
    probability proportional to exp(log p̂(y | x0_hat(candidate)) / alpha). Derivative-free. The kept
    candidate's eps is reused at the next step, so a step costs M denoiser passes."""
    b, m, rep = len(cond), candidates, _repeat(cond, candidates)
    x = torch.randn((b, *shape), generator=generator)
    times = step_times(schedule, steps)
    eps = denoiser(x, times[0][0].expand(b), cond)
    for i, (t, t_prev) in enumerate(times):
        mean, std = step_mean_std(schedule, x, eps, t.expand(b), t_prev.expand(b), eta)
        last, deterministic = i + 1 == steps, bool((std == 0).all())
        if m == 1 or deterministic:  # nothing to choose between
            x = mean + std * torch.randn(x.shape, generator=generator)
            eps = None if last else denoiser(x, t_prev.expand(b), cond)
            continue
        noise = torch.randn((b, m, *shape), generator=generator).flatten(0, 1)
        cand = mean.repeat_interleave(m, 0) + std.repeat_interleave(m, 0) * noise
        if last:
            value, eps_c = likelihood(cand, rep), None
        else:
            eps_c = denoiser(cand, t_prev.expand(b * m), rep)
            value = likelihood(predict_x0(schedule.abar(t_prev.expand(b * m), cand), cand, eps_c), rep)
        idx = _pick(value.view(b, m), alpha, generator)
        x, eps = _gather(cand, b, m, idx), (None if last else _gather(eps_c, b, m, idx))
    return x


def smc(denoiser: Denoiser, schedule: Schedule, likelihood: Likelihood, cond: Cond, shape, generator, *,
        steps: int, eta: float, particles: int, gamma: float, w: float, ess: float,
        proposal: Denoiser | None = None, return_all: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Twisted SMC (TDS, Wu et al. 2023) towards p̂(y|x)^gamma p_pre(x|c), K particles per request.

    Twist: p̂(y | x0_hat(x_t))^gamma. Proposal: the base step with its mean moved by w std^2 grad_{x_t} log p̂
    (TDS uses w = gamma), or with `proposal` (a denoiser, e.g. CTRL's fine-tuned model) that denoiser's own step.
    Incremental weight: p_pre(x'|x) twist(x') / (q(x'|x) twist(x)); multinomial resampling within a request when
    its effective sample size falls below ess * K (ess = 0: importance resampling at the end only). The last,
    deterministic step is the base's. Returns one particle per request drawn by the final weights (or, with
    return_all, all K request-major and their log weights (B, K)). K = 1, w = 0 is the base sampler.
    """
    b, k, rep = len(cond), particles, _repeat(cond, particles)
    guided = w != 0 and proposal is None

    def evaluate(x: Tensor, t: Tensor, proposal_follows: bool = True):  # eps, log p̂(y|x0_hat), its gradient
        if guided and proposal_follows:
            return loglik_and_grad(denoiser, schedule, likelihood, x, t.expand(b * k), rep)
        eps = denoiser(x, t.expand(b * k), rep)
        ll = likelihood(predict_x0(schedule.abar(t.expand(b * k), x), x, eps), rep) if k > 1 else None
        return eps, ll, None

    x = torch.randn((b * k, *shape), generator=generator)
    times = step_times(schedule, steps)
    eps, ll, grad = evaluate(x, times[0][0], steps > 1)
    log_w = gamma * ll.view(b, k) if k > 1 else None  # the twist at x_T: x_T ~ N(0, I) is the first proposal
    for i, (t, t_prev) in enumerate(times):
        tb, pb = t.expand(b * k), t_prev.expand(b * k)
        mean, std = step_mean_std(schedule, x, eps, tb, pb, eta)
        stochastic = bool((std > 0).all())
        if proposal is not None and stochastic:
            q_mean = step_mean_std(schedule, x, proposal(x, tb, rep), tb, pb, eta)[0]
        else:
            q_mean = mean + w * std**2 * grad if guided and stochastic else mean
        x_new = q_mean + std * torch.randn(x.shape, generator=generator)
        if i + 1 < steps:
            eps, ll_new, grad = evaluate(x_new, t_prev, i + 2 < steps)  # the last step (to t = -1) has std 0
        else:  # the clean end: x0_hat is x0 itself
            ll_new = likelihood(x_new, rep) if k > 1 else None
        if k > 1:
            inc = gamma * (ll_new - ll)
            if q_mean is not mean:  # the proposal's kernel differs from the base's
                inc = inc + gaussian_log_prob(x_new, mean, std) - gaussian_log_prob(x_new, q_mean, std)
            log_w = log_w + inc.view(b, k)
            x_new, eps, ll_new, grad, log_w = _resample(x_new, eps, ll_new, grad, log_w, ess, generator)
        x, ll = x_new, ll_new
    if return_all:
        return x, (torch.zeros((b, k)) if log_w is None else log_w)
    if k == 1:
        return x
    return _gather(x, b, k, _pick(log_w, 1.0, generator))


def _resample(x, eps, ll, grad, log_w: Tensor, ess: float, generator):
    """Multinomial resampling of the requests whose effective sample size is below ess * K."""
    b, k = log_w.shape
    wn = log_w.softmax(1)
    low = 1.0 / (wn**2).sum(1) < ess * k
    if not low.any():
        return x, eps, ll, grad, log_w
    idx = torch.arange(k).repeat(b, 1)
    idx[low] = torch.multinomial(wn[low], k, replacement=True, generator=generator)
    flat = (torch.arange(b)[:, None] * k + idx).flatten()
    log_w = torch.where(low[:, None], torch.zeros_like(log_w), log_w)
    return tuple(None if v is None else v[flat] for v in (x, eps, ll, grad)) + (log_w,)
