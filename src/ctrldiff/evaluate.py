"""Evaluation against oracles: the requested y vs the oracle label of the generated image, digit fidelity,
feature-FID, mean path KL to the base and cost. Never uses the classifier that was optimised."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy import linalg
from sklearn.metrics import confusion_matrix, f1_score
from tqdm import tqdm

from .classifier import Classifier
from .config import Config
from .contracts import Cond, Denoiser
from .methods import Cost, Method
from .rl.finetune import balanced_conditions
from .sampling import reference_means
from .tasks.controls import Control


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between Gaussian fits of two feature sets (FID's formula)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


@torch.no_grad()
def features(oracle: Classifier, images: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Penultimate features of the digit oracle (images in [0, 1]) — the feature space of feature-FID."""
    return torch.cat([oracle.net.features(images[i:i + batch] * 2 - 1) for i in range(0, len(images), batch)]).numpy()


@torch.no_grad()
def generate(method: Method, backend, cond: Cond, cfg: Config, seed: int = 0, reference: Denoiser | None = None,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Sample one image per row of cond, in batches of `eval.batch` network rows; returns images in [0, 1], the
    path KLs to `reference` (methods that are one Gaussian chain) and the cost per sample."""
    g = torch.Generator().manual_seed(seed)
    n, bs = len(cond), max(1, cfg.eval.batch // method.width)
    images, kls, cost = [], [], Cost()
    for i in tqdm(range(0, n, bs), desc=f"sampling {method.name}", disable=not progress, dynamic_ncols=True):
        sub = cond.index(torch.arange(i, min(i + bs, n)))
        x0, traj = method(sub, g, cost)
        images.append(backend.decode(x0))
        if reference is not None and traj is not None:  # on the same trajectories, outside the counted sampling
            traj.ref_means = reference_means(traj, reference, backend.schedule, sub)
            kls.append(traj.path_kl())
    return torch.cat(images), (torch.cat(kls) if kls else None), cost.per_sample(n)


def evaluate(method: Method, backend, controls: list[Control], cfg: Config, oracle: Classifier | None,
             real_features: np.ndarray | None, reference: Denoiser | None = None, seed: int = 0,
             progress: bool = True, terms=None, log_z: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, Cond]:
    """Metrics of one method on `per_class` samples per joint class of y, c cycling over the digits (prompts).
    oracle: the digit classifier behind digit fidelity and feature-FID; None (SD) reports them as NaN.
    terms: the reward terms (classifier, gamma): adds CTRL's objective J = E[sum_k gamma_k log p̂_k - path KL] on
    these samples; log_z: log Z(c, y) (`target.log_z_table`), adds log Z and the gap log Z - J in nats."""
    ks = {c.name: c.num_classes for c in controls}
    n = cfg.eval.per_class * int(np.prod(list(ks.values())))
    cond = balanced_conditions(n, backend.num_c, ks)
    images, kl, cost = generate(method, backend, cond, cfg, seed, reference, progress)
    out: dict = {"method": method.name, "knobs": method.knobs, "samples": n, "seconds_per_sample": cost["seconds"],
                 "cost_per_sample": cost}
    correct = torch.ones(n, dtype=torch.bool)
    for ctl in controls:
        want, got = cond.y[ctl.name].numpy(), ctl.label(images).numpy()
        correct &= torch.from_numpy(want == got)
        out[ctl.name] = {"accuracy": float((want == got).mean()), "judge": ctl.judge,
                         "macro_f1": float(f1_score(want, got, average="macro", labels=range(ctl.num_classes))),
                         "confusion": confusion_matrix(want, got, labels=range(ctl.num_classes)).tolist()}
    if len(controls) > 1:
        out["joint_accuracy"] = correct.float().mean().item()
        out["per_corner"] = {}
        for combo in itertools.product(*[range(k) for k in ks.values()]):
            m = torch.ones(n, dtype=torch.bool)
            for name, v in zip(ks, combo):
                m &= cond.y[name] == v
            out["per_corner"][",".join(f"{k}={v}" for k, v in zip(ks, combo))] = correct[m].float().mean().item()
    out["digit_fidelity"], out["feature_fid"] = math.nan, math.nan  # n/a without the digit oracle (SD)
    digit_ok = None
    if oracle is not None:
        digit_ok = oracle.predict(images * 2 - 1) == cond.c
        out["digit_fidelity"] = digit_ok.float().mean().item()
        out["feature_fid"] = frechet_distance(features(oracle, images), real_features)
    verdicts = {"accuracy": correct, "digit_fidelity": digit_ok}
    if kl is not None:
        out["mean_kl"] = kl.mean().item()
    if terms:  # images in [0, 1] -> [-1, 1]: what `classifier_input` gives the classifiers on image backends
        reward = sum(t.gamma * t.classifier.log_prob(images * 2 - 1, cond.y[t.control.name]) for t in terms)
        out["reward"] = reward.mean().item()
        # the reward classifiers' own verdict: above the oracle's where the fine-tune found where they are wrong
        verdicts["classifier_accuracy"] = torch.stack([t.classifier(images * 2 - 1).argmax(-1) == cond.y[t.control.name]
                                                       for t in terms]).all(0)
        out["classifier_accuracy"] = verdicts["classifier_accuracy"].float().mean().item()
        if kl is not None:
            out["objective"] = out["reward"] - out["mean_kl"]
            if log_z is not None:  # over the requests whose log Z is trusted (finite)
                from .target import lookup, meter

                rows = lookup(log_z, cond, [t.control.name for t in terms])
                out["log_z"] = rows[torch.isfinite(rows)].mean().item()
                out["gap"] = meter(rows, reward - kl)
    out["per_cell"] = per_cell(cond, ks, verdicts)
    return out, images, cond


def per_cell(cond: Cond, ks: dict[str, int], verdicts: dict[str, torch.Tensor | None]) -> list[dict]:
    """The mean of each per-sample verdict (joint accuracy, digit fidelity, ...; None = not available) per
    request (c, y): the rows of the target-vs-method heat map."""
    out = []
    for c in range(int(cond.c.max()) + 1):
        for ys in itertools.product(*[range(k) for k in ks.values()]):
            m = cond.c == c
            for name, y in zip(ks, ys):
                m &= cond.y[name] == y
            if m.any():
                out.append({"c": c, "y": list(ys), "n": int(m.sum())} | {
                    k: v[m].float().mean().item() for k, v in verdicts.items() if v is not None})
    return out
