"""The yardstick over every request: log Z from the fine-tuned chain's own path weights where the bank cannot
see the target, and J, log Z, KL and log Z - J of every sampler over the same requests (issue 25).

A path weight w = exp(reward) dP_pre/dP_theta is unbiased for Z(c, y) whichever chain drew it, so a sampler's
own paths estimate log Z where the bank of base samples (`target`) has too few effective samples; log-mean-exp
of finitely many is low in expectation, so per request the larger of the two estimates is the nearer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .conditions import request_index
from .contracts import Cond
from .target import LogZ


class PathLogZ:
    """Per request, the log-mean-exp of the path weights w = exp(reward) dP_pre/dP_theta of every rollout so far
    (`Trajectory.log_ratio`): each weight is unbiased for Z(c, y) whichever chain drew it, so the running mean over
    a fine-tune's changing chain estimates Z, and sharpens as the chain nears P*. Where the bank cannot see the
    target (its untrusted requests), this is what the all-request meter of a fine-tune reads log Z from."""

    def __init__(self, shape):
        self.lse = torch.full(tuple(shape), -math.inf, dtype=torch.float64)
        self.n = torch.zeros(tuple(shape), dtype=torch.float64)

    def add(self, idx: tuple[Tensor, ...], log_w: Tensor) -> None:
        for row, lw in zip(zip(*idx), log_w.double()):
            self.lse[row] = torch.logaddexp(self.lse[row], lw)
            self.n[row] += 1

    def log_z(self) -> Tensor:
        seen = self.n > 0
        return torch.where(seen, self.lse - self.n.clamp(min=1).log(), -math.inf).float()  # -inf: no path seen yet

    def state_dict(self) -> dict:
        return {"lse": self.lse, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.lse, self.n = state["lse"].clone(), state["n"].clone()


def all_request_meter(bank: LogZ, paths: PathLogZ, cond: Cond, names, objective: Tensor) -> float:
    """log Z - J over every row of a batch, log Z per request the larger of the bank's and the paths' estimate
    (both are low in expectation: the larger is the nearer)."""
    idx = request_index(cond, names)
    return (torch.maximum(bank.table[idx], paths.log_z()[idx]) - objective).mean().item()


@dataclass
class PathStats:
    """A sampler's meter paths, per request (num_c, K_1, ..., K_m): how many, the mean objective J = reward - path
    KL and its std, the mean KL and reward; and from the path weights w = exp(reward) dP_pre/dP_theta, log mean w
    (an estimate of log Z), their ESS and the w-weighted mean reward (an estimate of E_p*[reward])."""

    n: Tensor
    j: Tensor
    j_std: Tensor
    kl: Tensor
    reward: Tensor
    log_z: Tensor
    ess: Tensor
    tilted_reward: Tensor


def path_stats(idx: tuple[Tensor, ...], shape, reward: Tensor, kl: Tensor, log_ratio: Tensor) -> PathStats:
    """Per-request statistics of paths at request indices `idx` (`conditions.request_index`)."""
    keys = ("n", "j", "j_std", "kl", "reward", "log_z", "ess", "tilted_reward")
    out = {k: torch.full(tuple(shape), math.nan, dtype=torch.float64) for k in keys}
    out["n"].zero_()
    flat = torch.from_numpy(np.ravel_multi_index([i.numpy() for i in idx], tuple(shape)))
    j, log_w = (reward - kl).double(), (reward + log_ratio).double()
    for cell in flat.unique():
        m, where = flat == cell, np.unravel_index(int(cell), tuple(shape))
        w = torch.softmax(log_w[m], 0)
        vals = {"n": m.sum(), "j": j[m].mean(), "j_std": j[m].std() if m.sum() > 1 else torch.tensor(0.0),
                "kl": kl[m].double().mean(), "reward": reward[m].double().mean(),
                "log_z": torch.logsumexp(log_w[m], 0) - math.log(int(m.sum())), "ess": 1 / w.pow(2).sum(),
                "tilted_reward": (w * reward[m].double()).sum()}
        for k, v in vals.items():
            out[k][where] = v
    return PathStats(**{k: v.float() for k, v in out.items()})


def _log_z_se(ess: Tensor, n: Tensor) -> Tensor:
    """Monte-Carlo error of a log-mean-exp estimate of log Z with this ESS of n samples (delta method)."""
    return (1 / ess - 1 / n).clamp(min=0).sqrt()


def _summary(keep: Tensor, log_z: Tensor, log_z_se: Tensor, j: Tensor, j_se: Tensor, kl: Tensor) -> dict:
    """Means over the requests `keep`: J, log Z, KL and the gap log Z - J with its Monte-Carlo error."""
    n = int(keep.sum())
    if n == 0:
        return {"requests": 0, "J": math.nan, "log_z": math.nan, "kl": math.nan, "gap": math.nan, "gap_se": math.nan}
    se = (log_z_se[keep] ** 2 + j_se[keep] ** 2).sum().sqrt() / n
    return {"requests": n, "J": j[keep].mean().item(), "log_z": log_z[keep].mean().item(), "kl": kl[keep].mean().item(),
            "gap": (log_z[keep] - j[keep]).mean().item(), "gap_se": se.item()}


def yardstick(bank: LogZ, bank_reward: Tensor, paths: dict[str, PathStats], min_path_ess: float) -> dict:
    """J, log Z, KL and log Z - J (KL(P_theta || P*) >= 0, nats) of each sampler with meter paths, and of the
    target, over two sets of the same requests:
    - "trusted": the requests the bank's ESS >= min_ess; log Z from the bank (the classic meter). "gap_paths" is
      the same with log Z from the sampler's own path weights: the two agree within their errors where the
      paths' ESS is high (a small ESS biases log-mean-exp low; docs/method.md).
    - "all": every request; log Z per request the larger of the bank's and every sampler's path estimate (both
      are low in expectation, so the larger is the nearer). A request where every estimate's ESS is small (bank <
      min_ess, paths < min_path_ess) is counted in "flagged": there log Z, and so the gap, is a lower bound.
    The target's J is log Z itself (the optimum; its gap is 0 by definition, so none is reported) and its KL is
    E_p*[reward] - log Z, from the estimate that gave log Z. bank_reward: E_p*[reward] from the bank's weights."""
    best, ess, size = bank.table.clone(), bank.ess.clone(), torch.full_like(bank.ess, float(bank.samples or 1))
    tilted, source = bank_reward.clone(), torch.zeros(bank.table.shape, dtype=torch.long)
    for i, s in enumerate(paths.values(), 1):
        better = s.log_z > best
        best[better], ess[better], size[better] = s.log_z[better], s.ess[better], s.n[better]
        tilted[better], source[better] = s.tilted_reward[better], i
    flagged = ~bank.trusted
    for s in paths.values():
        flagged &= ~(s.ess >= min_path_ess)
    every = torch.ones_like(bank.trusted)
    bank_se, best_se = _log_z_se(bank.ess, torch.full_like(bank.ess, float(bank.samples or 1))), _log_z_se(ess, size)
    out = {}
    for name, s in paths.items():
        j_se = s.j_std / s.n.clamp(min=1).sqrt()
        trusted = _summary(bank.trusted, bank.table, bank_se, s.j, j_se, s.kl)
        own = _summary(bank.trusted, s.log_z, _log_z_se(s.ess, s.n), s.j, j_se, s.kl)
        trusted.update(gap_paths=own["gap"], gap_paths_se=own["gap_se"])
        out[name] = {"trusted": trusted, "all": _summary(every, best, best_se, s.j, j_se, s.kl) | {
            "flagged": int(flagged.sum()), "median_path_ess": float(s.ess.median())},
            "requests": [{"request": [int(i) for i in r], "n": int(s.n[r]), "J": float(s.j[r]), "kl": float(s.kl[r]),
                          "log_z_bank": float(bank.table[r]), "ess_bank": float(bank.ess[r]),
                          "log_z_paths": float(s.log_z[r]), "ess_paths": float(s.ess[r]), "log_z": float(best[r]),
                          "gap": float(best[r] - s.j[r]), "flagged": bool(flagged[r])}
                         for r in itertools.product(*map(range, best.shape))]}
    zero = torch.zeros_like(best)
    target = {"trusted": _summary(bank.trusted, bank.table, bank_se, bank.table, zero, bank_reward - bank.table),
              "all": _summary(every, best, best_se, best, zero, tilted - best) | {"flagged": int(flagged.sum())}}
    for part in target.values():
        part["gap"] = part["gap_se"] = math.nan  # J* = log Z: the optimum's gap is 0 by definition, not measured
    out["target"] = target
    names = ["bank", *paths]
    out["log_z_source"] = {names[i]: int((source == i).sum()) for i in range(len(names))}
    return out
