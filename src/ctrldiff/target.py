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
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .conditions import balanced_conditions, request_index, requests
from .contracts import Cond
from .io import CtrlDiffError, build_once
from .metrics import features, frechet_distance
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


def shipped_bank(key: dict) -> Tensor | None:
    """The bank shipped in the package for this key, if any (the shipped digit base's, so that a first run builds
    none): 8-bit images of decode(x_0), returned as x_0 = 2 image - 1, which decodes to the same image; every use of
    a bank (the classifiers' input, the target's images) reads decode(x_0). None where no file matches the key."""
    from .backends.pixels import asset_path

    path = asset_path(bank_path(Path(), key).with_suffix(".npz").name)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        if json.loads(str(f["key"])) != key:
            return None
        return torch.from_numpy(f["images"]).float() / 255 * 2 - 1


def save_shipped_bank(bank: Tensor, key: dict, folder: Path) -> Path:
    """Write a bank as `shipped_bank` reads it (compressed 8-bit images, ~3 MB for 20,000 digits)."""
    from .io import atomic_path

    path = Path(folder) / bank_path(Path(), key).with_suffix(".npz").name
    images = ((bank.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images, key=np.array(json.dumps(key)))
    return path


def load_bank(backend, per_c: int, steps: int, eta: float, seed: int = 0, folder: Path | None = None,
              path: Path | None = None, progress: bool = True) -> Tensor:
    """The bank for this base and sampler: shipped with the package (`shipped_bank`), else cached (built and
    written atomically on first use). A file at `path` whose key differs (another base, sampler or size) is refused
    in one line, never silently used."""
    key = bank_key(backend, per_c, steps, eta, seed)
    if path is None and folder is None and (shipped := shipped_bank(key)) is not None:
        return shipped
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


def log_weights(log_probs: dict[str, Tensor], gammas: dict[str, float], c: int, ys: tuple[int, ...]) -> Tensor:
    """sum_k gamma_k log p̂_k(y_k | x) over the bank samples of condition c: log of the importance weights."""
    return sum(gammas[name] * log_probs[name][c, :, y] for name, y in zip(gammas, ys))


@dataclass
class LogZ:
    """log Z(c, y) = log E_pre[prod_k p̂_k(y_k | x)^gamma_k] per request (num_c, K_1, ..., K_m) from the bank: the
    optimum of CTRL's objective for that request, with the effective sample size of its estimate. A request whose
    ESS is below `min_ess` is not trusted: a few samples carry all the weight there, and the log of their mean is
    biased low (Jensen), so a meter that counted it would read a gap smaller than the true one (docs/tuning.md)."""

    table: Tensor
    ess: Tensor
    min_ess: float = MIN_ESS
    samples: int = 0  # bank samples per c

    @property
    def trusted(self) -> Tensor:
        return self.ess >= self.min_ess


def bank_log_z(log_probs: dict[str, Tensor], gammas: dict[str, float], min_ess: float = MIN_ESS) -> LogZ:
    """log Z and its ESS for every request, from the bank's log-probabilities (`bank_log_probs`)."""
    num_c, n = next(iter(log_probs.values())).shape[:2]
    ks = {k: log_probs[k].shape[-1] for k in gammas}
    table, ess = torch.empty((num_c, *ks.values())), torch.empty((num_c, *ks.values()))
    for c, ys in requests(num_c, ks):
        lw = log_weights(log_probs, gammas, c, ys).double()
        table[(c, *ys)] = torch.logsumexp(lw, 0) - math.log(n)
        ess[(c, *ys)] = 1 / torch.softmax(lw, 0).pow(2).sum()
    return LogZ(table, ess, min_ess, n)


def meter(log_z: LogZ, cond: Cond, names, objective: Tensor) -> float:
    """log Z - J in nats over the rows of a batch whose request the bank is trusted on: KL(P_theta || P*) >= 0 on
    path space up to Monte-Carlo error, how far a fine-tune is from its optimum. NaN if no row is trusted."""
    idx = request_index(cond, names)
    ok = log_z.trusted[idx]
    return (log_z.table[idx][ok] - objective[ok]).mean().item() if ok.any() else math.nan


# --- the target's metrics -------------------------------------------------------------------------------

@dataclass
class TargetEstimate:
    """Per request (c, y): normalised weights over the bank of c, ESS and log Z."""

    weights: dict[tuple[int, tuple[int, ...]], Tensor]
    ess: dict[tuple[int, tuple[int, ...]], float]
    log_z: LogZ


def estimate(log_probs: dict[str, Tensor], gammas: dict[str, float], min_ess: float = MIN_ESS) -> TargetEstimate:
    num_c = next(iter(log_probs.values())).shape[0]
    ks = {k: log_probs[k].shape[-1] for k in gammas}
    weights, ess = {}, {}
    for cell in requests(num_c, ks):
        w = log_weights(log_probs, gammas, *cell).double().softmax(0)
        weights[cell], ess[cell] = w.float(), float(1 / (w**2).sum())
    return TargetEstimate(weights, ess, bank_log_z(log_probs, gammas, min_ess))


def on_trusted(cells: list[dict], target_cells: list[dict], min_ess: float) -> dict:
    """Mean accuracy (and digit fidelity, the reward and monitor classifiers' accuracy where known) over the
    requests (c, y) the target is trusted on: the like-for-like comparison with the target, whose other cells rest
    on a handful of base samples."""
    ok = {(r["c"], tuple(r["y"])) for r in target_cells if r["ess"] >= min_ess}
    rows = [r for r in cells if (r["c"], tuple(r["y"])) in ok]
    out = {"cells": len(rows)}
    for key in ("accuracy", "digit_fidelity", "classifier_accuracy", "monitor_accuracy"):
        vals = [r[key] for r in rows if key in r]
        out[key] = float(np.mean(vals)) if vals else math.nan
    return out


@torch.no_grad()
def target_metrics(backend, bank: Tensor, terms, controls, per_class: int, oracle=None, real_features=None,
                   seed: int = 0, min_ess: float = MIN_ESS) -> tuple[dict, Tensor, Cond]:
    """The target p_gamma's scores in `evaluate`'s format (one row beside base and CTRL), from the bank.

    Accuracy, macro-F1 (from the expected confusion), digit fidelity and the reward and monitor classifiers'
    accuracy are weighted means over the bank (every request (c, y) weighted equally, as the balanced evaluation
    asks them); feature-FID uses the weighted feature moments of the whole bank (`metrics.frechet_distance`). The
    images come from resampling as many draws as `evaluate` makes (a picture, not a measure). Each request's ESS,
    log Z and E_p*[reward] are reported; requests below `min_ess` are counted and flagged."""
    gammas = {t.control.name: t.gamma for t in terms}
    log_probs = bank_log_probs(backend, bank, {t.control.name: t.classifier for t in terms})
    monitors = bank_log_probs(backend, bank, {t.control.name: t.monitor for t in terms if t.monitor is not None})
    est = estimate(log_probs, gammas, min_ess)
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
    rows, mixture = [], torch.zeros(bank.shape[:2], dtype=torch.float64)  # the target's weight on each bank sample
    for (c, ys), w in est.weights.items():
        ok, clf_ok, mon_ok = (torch.ones_like(w, dtype=torch.bool) for _ in range(3))
        for name, y in zip(ks, ys):
            conf[name][y] += np.bincount(labels[name][c].numpy(), weights=w.double().numpy(), minlength=ks[name])
            ok &= labels[name][c] == y
            clf_ok &= log_probs[name][c].argmax(-1) == y
            if name in monitors:
                mon_ok &= monitors[name][c].argmax(-1) == y
        rows.append({"c": c, "y": list(ys), "ess": est.ess[(c, ys)], "log_z": est.log_z.table[(c, *ys)].item(),
                     "reward": float((w * log_weights(log_probs, gammas, c, ys)).sum()),
                     "accuracy": float((w * ok).sum()), "classifier_accuracy": float((w * clf_ok).sum()),
                     "digit_fidelity": float((w * digit_ok[c]).sum()) if digit_ok is not None else math.nan}
                    | ({"monitor_accuracy": float((w * mon_ok).sum())} if monitors else {}))
        mixture[c] += w.double() / len(est.weights)
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
    if len(ks) > 1:
        out["joint_accuracy"] = float(np.mean([r["accuracy"] for r in rows]))
        out["per_corner"] = {",".join(f"{k}={v}" for k, v in zip(ks, ys)): float(np.mean(
            [r["accuracy"] for r in rows if tuple(r["y"]) == ys])) for ys in itertools.product(*map(range, ks.values()))}
    for key in ("digit_fidelity", "classifier_accuracy", "monitor_accuracy"):
        if key in rows[0]:
            out[key] = float(np.mean([r[key] for r in rows]))
    out["feature_fid"] = math.nan
    if oracle is not None and real_features is not None:
        out["feature_fid"] = frechet_distance(features(oracle, images.flatten(0, 1)), real_features,
                                              mixture.flatten().numpy())
    # --- resampling: as many draws as `evaluate` makes, for the sample grid
    cond = balanced_conditions(n, backend.num_c, ks)
    g, idx = torch.Generator().manual_seed(seed), torch.empty(n, dtype=torch.long)
    for (c, ys), w in est.weights.items():
        m = cond.c == c
        for name, y in zip(ks, ys):
            m &= cond.y[name] == y
        if m.any():
            idx[m] = torch.multinomial(w, int(m.sum()), replacement=True, generator=g)
    # the target's KL from the base on x_0: E_p*[sum gamma log p̂] - log Z (what its path costs at the optimum)
    out["reward"] = float(np.mean([r["reward"] for r in rows]))
    out["mean_kl"], out["objective"] = out["reward"] - out["log_z"], out["log_z"]
    return out, images[cond.c, idx], cond


def bank_reward_table(target: dict, shape) -> Tensor:
    """E_p*[reward] per request (the target's rows) as a (num_c, K_1, ...) table, for `yardstick`."""
    table = torch.full(tuple(shape), math.nan)
    for r in target["cells"]:
        table[(r["c"], *r["y"])] = r["reward"]
    return table
