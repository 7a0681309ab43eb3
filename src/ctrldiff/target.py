"""The target itself, measured: p_gamma(x | c, y) ∝ prod_k p̂_k(y_k | x)^gamma_k p_pre(x | c) on any backend.

CTRL's objective is maximised by a chain that samples p_gamma (METHOD.md §2), so p_gamma's own scores are the
yardstick a fine-tune is judged against: what the objective can reach with these classifiers and this base.
They are estimated by self-normalised importance sampling over a bank of base samples per condition c, each
weighted by prod_k p̂_k(y_k | x)^gamma_k. The same weights give log Z(c, y) = log E_pre[prod_k p̂_k^gamma_k],
the optimum of the objective, so log Z - J = KL(P_theta || P*) >= 0 says in nats how far a fine-tune is from
done (P* the soft-optimal chain; exact when the last, deterministic step is the base's, `rl.final_step="base"`).

The bank is cached on disk, keyed by a hash of the base network's weights and the sampler settings, and reused
across gamma, controls and runs.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .contracts import Cond
from .io import CtrlDiffError, build_once
from .sampling import sample

MIN_ESS = 30.0  # cells whose effective sample size is below this are flagged as not trustworthy


# --- the bank of base samples ---------------------------------------------------------------------------

def base_hash(backend) -> str:
    """sha256 of the frozen base network's parameters and buffers (names, shapes and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for name, t in itertools.chain(backend.net.named_parameters(), backend.net.named_buffers()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def bank_key(backend, per_c: int, steps: int, eta: float, seed: int) -> dict:
    """What a bank depends on; a cached bank is used only if its key is this one."""
    return {"kind": "bank", "base": base_hash(backend), "per_c": per_c, "steps": steps, "eta": eta, "seed": seed,
            "num_c": backend.num_c, "shape": list(backend.shape)}


def bank_path(folder: Path, key: dict) -> Path:
    return Path(folder) / f"bank-{key['base']}-{key['per_c']}x{key['num_c']}-s{key['steps']}-e{key['eta']}-{key['seed']}.safetensors"


@torch.no_grad()
def build_bank(backend, per_c: int, steps: int, eta: float, seed: int = 0, batch: int = 500,
               progress: bool = True) -> Tensor:
    """(num_c, per_c, *shape) samples x_0 of the base chain (DDIM `steps`, `eta`), per condition c."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((backend.num_c, per_c, *backend.shape))
    bar = tqdm(total=backend.num_c * per_c, desc="base-sample bank", disable=not progress, dynamic_ncols=True)
    for c in range(backend.num_c):
        for i in range(0, per_c, batch):
            n = min(batch, per_c - i)
            x_T = torch.randn((n, *backend.shape), generator=g)
            out[c, i:i + n] = sample(backend.denoiser, backend.schedule, x_T, Cond(torch.full((n,), c)), steps=steps,
                                     eta=eta, generator=g).x0
            bar.update(n)
    bar.close()
    return out


def load_bank(backend, per_c: int, steps: int, eta: float, seed: int = 0, folder: Path | None = None,
              path: Path | None = None, progress: bool = True) -> Tensor:
    """The cached bank for this base and sampler (built and written atomically on first use). A file at `path`
    whose key differs (another base, sampler or size) is refused in one line, never silently used."""
    key = bank_key(backend, per_c, steps, eta, seed)
    if path is None:
        from .tasks.mnist import cache_dir

        path = bank_path(folder or cache_dir() / "banks", key)
    path = Path(path)
    tensors, meta = build_once(path, lambda: {"x0": build_bank(backend, per_c, steps, eta, seed, progress=progress)},
                               key)  # one process builds, parallel runs wait for it (io.build_once)
    if meta != key:
        diff = next(k for k in key if meta.get(k) != key[k])
        raise CtrlDiffError(f"bank {path} was built with {diff}={meta.get(diff)!r}, this run needs "
                            f"{key[diff]!r}; delete it or pass another bank path")
    return tensors["x0"]


# --- importance weights and log Z -----------------------------------------------------------------------

@torch.no_grad()
def bank_log_probs(backend, bank: Tensor, classifiers: dict, batch: int = 2048) -> dict[str, Tensor]:
    """log p̂_k(· | x) of every bank sample, (num_c, n, K_k) per control, read as the reward reads it."""
    flat = bank.flatten(0, 1)
    out = {}
    for name, clf in classifiers.items():
        lp = torch.cat([clf(backend.classifier_input(flat[i:i + batch])).log_softmax(-1)
                        for i in range(0, len(flat), batch)])
        out[name] = lp.view(*bank.shape[:2], -1)
    return out


def cells(num_c: int, ks: dict[str, int]) -> list[tuple[int, tuple[int, ...]]]:
    """Every request (c, joint y), y in the order of `ks`."""
    return [(c, ys) for c in range(num_c) for ys in itertools.product(*[range(k) for k in ks.values()])]


def log_weights(log_probs: dict[str, Tensor], gammas: dict[str, float], c: int, ys: tuple[int, ...]) -> Tensor:
    """sum_k gamma_k log p̂_k(y_k | x) over the bank samples of condition c: log of the importance weights."""
    return sum(gammas[name] * log_probs[name][c, :, y] for name, y in zip(gammas, ys))


def log_z_table(log_probs: dict[str, Tensor], gammas: dict[str, float], min_ess: float = 0.0) -> Tensor:
    """log Z(c, y) = log mean_bank prod_k p̂_k(y_k | x)^gamma_k, shape (num_c, K_1, ..., K_m): the optimum of
    CTRL's objective for the request (c, y). Cells whose effective sample size is below `min_ess` are NaN: there
    a few base samples carry all the weight and the log of their mean is biased low (Jensen), so a meter that
    counted them would read a gap smaller than the true one (measured: docs/tuning.md, section ctrl-tuning)."""
    num_c, n = next(iter(log_probs.values())).shape[:2]
    ks = {k: log_probs[k].shape[-1] for k in gammas}
    table = torch.empty((num_c, *ks.values()))
    for c, ys in cells(num_c, ks):
        lw = log_weights(log_probs, gammas, c, ys)
        ess = 1 / torch.softmax(lw.double(), 0).pow(2).sum()
        table[(c, *ys)] = torch.logsumexp(lw, 0) - math.log(n) if ess >= min_ess else math.nan
    return table


def meter(log_z: Tensor, objective: Tensor) -> float:
    """log Z - J in nats over the requests whose log Z is trusted (finite): KL(P_theta || P*) >= 0 on path space
    up to Monte-Carlo error, how far a fine-tune is from its optimum. NaN if no request is trusted."""
    ok = torch.isfinite(log_z)
    return (log_z[ok] - objective[ok]).mean().item() if ok.any() else math.nan


def on_trusted(cells: list[dict], target_cells: list[dict], min_ess: float) -> dict:
    """Mean accuracy (and digit fidelity, the reward classifiers' accuracy where known) over the requests (c, y)
    the target is trusted on: the
    like-for-like comparison with the target, whose other cells rest on a handful of base samples."""
    ok = {(r["c"], tuple(r["y"])) for r in target_cells if r["ess"] >= min_ess}
    rows = [r for r in cells if (r["c"], tuple(r["y"])) in ok]
    out = {"cells": len(rows)}
    for key in ("accuracy", "digit_fidelity", "classifier_accuracy"):
        vals = [r[key] for r in rows if key in r]
        out[key] = float(np.mean(vals)) if vals else math.nan
    return out


def lookup(table: Tensor, cond: Cond, names) -> Tensor:
    """table[c_i, y_1i, ..., y_mi] for each row of cond."""
    return table[(cond.c, *[cond.y[k] for k in names])]


# --- the target's metrics -------------------------------------------------------------------------------

@dataclass
class TargetEstimate:
    """Per request (c, y): normalised weights over the bank of c, ESS and log Z."""

    weights: dict[tuple[int, tuple[int, ...]], Tensor]
    ess: dict[tuple[int, tuple[int, ...]], float]
    log_z: Tensor  # (num_c, K_1, ..., K_m)


def estimate(log_probs: dict[str, Tensor], gammas: dict[str, float]) -> TargetEstimate:
    num_c = next(iter(log_probs.values())).shape[0]
    ks = {k: log_probs[k].shape[-1] for k in gammas}
    weights, ess = {}, {}
    for cell in cells(num_c, ks):
        w = log_weights(log_probs, gammas, *cell).double().softmax(0)
        weights[cell], ess[cell] = w.float(), float(1 / (w**2).sum())
    return TargetEstimate(weights, ess, log_z_table(log_probs, gammas))


@torch.no_grad()
def target_metrics(backend, bank: Tensor, terms, controls, per_class: int, oracle=None, real_features=None,
                   seed: int = 0, min_ess: float = MIN_ESS) -> tuple[dict, Tensor, Cond]:
    """The target p_gamma's scores in `evaluate`'s format (one row beside base and CTRL), from the bank.

    Accuracy, macro-F1 (from the expected confusion) and digit fidelity are weighted means over the bank
    (every request (c, y) weighted equally, as the balanced evaluation asks them); feature-FID and the images come
    from resampling the same number of samples as `evaluate` draws. Each cell's ESS is reported; cells below
    `min_ess` are counted and flagged (their numbers rest on a handful of base samples)."""
    from .evaluate import features, frechet_distance
    from .rl.finetune import balanced_conditions

    gammas = {t.control.name: t.gamma for t in terms}
    log_probs = bank_log_probs(backend, bank, {t.control.name: t.classifier for t in terms})
    est = estimate(log_probs, gammas)
    images = backend.decode(bank.flatten(0, 1))
    images = images.view(*bank.shape[:2], *images.shape[1:])  # (num_c, n, C, H, W) in [0, 1]
    labels = {ctl.name: ctl.label(images.flatten(0, 1)).view(bank.shape[:2]) for ctl in controls}
    digit_ok = None
    if oracle is not None:
        digit_ok = (oracle.predict(images.flatten(0, 1) * 2 - 1).view(bank.shape[:2])
                    == torch.arange(bank.shape[0])[:, None]).float()
    ks = {ctl.name: ctl.num_classes for ctl in controls}
    n = per_class * int(np.prod(list(ks.values())))  # as many requests as `evaluate` makes
    conf = {k: np.zeros((K, K)) for k, K in ks.items()}
    rows = []
    for (c, ys), w in est.weights.items():
        ok, clf_ok = torch.ones_like(w, dtype=torch.bool), torch.ones_like(w, dtype=torch.bool)
        for name, y in zip(ks, ys):
            conf[name][y] += np.bincount(labels[name][c].numpy(), weights=w.double().numpy(), minlength=ks[name])
            ok &= labels[name][c] == y
            clf_ok &= log_probs[name][c].argmax(-1) == y
        rows.append({"c": c, "y": list(ys), "ess": est.ess[(c, ys)], "log_z": est.log_z[(c, *ys)].item(),
                     "accuracy": float((w * ok).sum()), "classifier_accuracy": float((w * clf_ok).sum()),
                     "digit_fidelity": float((w * digit_ok[c]).sum()) if digit_ok is not None else math.nan})
    out: dict = {"method": "target", "knobs": {"gamma": gammas}, "samples": int(bank.shape[0] * bank.shape[1]),
                 "seconds_per_sample": math.nan, "cost_per_sample": {}, "cells": rows,
                 "min_ess": min(est.ess.values()), "untrusted_cells": sum(r["ess"] < min_ess for r in rows),
                 "log_z": float(np.mean([r["log_z"] for r in rows]))}
    for name in ks:  # the expected confusion matrix over equally weighted requests
        cm = conf[name] / len(rows)
        tp = np.diag(cm)
        f1 = 2 * tp / np.maximum(cm.sum(0) + cm.sum(1), 1e-12)
        out[name] = {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1.mean()),
                     "confusion": (cm * n).round(2).tolist()}  # expected counts at evaluate's size
    joint = np.array([r["accuracy"] for r in rows])
    if len(ks) > 1:
        out["joint_accuracy"] = float(joint.mean())
        out["per_corner"] = {",".join(f"{k}={v}" for k, v in zip(ks, ys)): float(np.mean(
            [r["accuracy"] for r in rows if tuple(r["y"]) == ys])) for ys in itertools.product(*map(range, ks.values()))}
    out["digit_fidelity"] = float(np.mean([r["digit_fidelity"] for r in rows]))
    out["classifier_accuracy"] = float(np.mean([r["classifier_accuracy"] for r in rows]))
    # --- resampling: as many draws as `evaluate` makes, for feature-FID and the sample grid
    cond = balanced_conditions(n, backend.num_c, ks)
    g, idx = torch.Generator().manual_seed(seed), torch.empty(n, dtype=torch.long)
    for (c, ys), w in est.weights.items():
        m = cond.c == c
        for name, y in zip(ks, ys):
            m &= cond.y[name] == y
        if m.any():
            idx[m] = torch.multinomial(w, int(m.sum()), replacement=True, generator=g)
    drawn = images[cond.c, idx]
    out["feature_fid"] = math.nan
    if oracle is not None and real_features is not None:
        out["feature_fid"] = frechet_distance(features(oracle, drawn), real_features)
    # the target's KL from the base on x_0: E_p*[sum gamma log p̂] - log Z (what its path costs at the optimum)
    reward = np.mean([float((w * log_weights(log_probs, gammas, c, ys)).sum()) for (c, ys), w in est.weights.items()])
    out["mean_kl"] = float(reward - out["log_z"])
    out["reward"], out["objective"] = float(reward), out["log_z"]
    return out, drawn, cond

