"""Evaluation against oracles: the requested y vs the oracle label of the generated image, digit fidelity,
feature-FID, mean path KL to the base and cost; the reward classifiers' own verdict and the independent
monitor's; and the meter's paths (`path_meter`): per request, the objective J and the path weights of the target.
The oracle and the monitor were never optimised against."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score
from tqdm import tqdm

from .classifier import Classifier
from .conditions import balanced_conditions, request_index
from .config import Config
from .contracts import Cond, Denoiser
from .methods import Cost, Method
from .metrics import features, frechet_distance
from .sampling import reference_means
from .tasks.controls import Control
from .yardstick import PathStats, path_stats


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
             progress: bool = True, terms=None) -> tuple[dict, torch.Tensor, Cond]:
    """Metrics of one method on `per_class` samples per joint class of y, c cycling over the digits (prompts).
    oracle: the digit classifier behind digit fidelity and feature-FID; None (SD) reports them as NaN.
    terms: the reward terms: adds the mean reward sum_k gamma_k log p̂_k, and the accuracy as the reward classifiers
    judge it (`classifier_accuracy`) and as their independent monitors do (`monitor_accuracy`, never optimised
    against): a method whose reward-classifier accuracy exceeds its monitor accuracy by more than the target's
    margin has found where the reward classifier is wrong (reward hacking)."""
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
        x = images * 2 - 1
        out["reward"] = sum(t.gamma * t.classifier.log_prob(x, cond.y[t.control.name]) for t in terms).mean().item()
        judges = {"classifier_accuracy": [t.classifier for t in terms]}
        if all(t.monitor is not None for t in terms):
            judges["monitor_accuracy"] = [t.monitor for t in terms]
        for key, clfs in judges.items():  # joint: every control's classifier agrees with the request
            verdicts[key] = torch.stack([clf.predict(x) == cond.y[t.control.name] for clf, t in zip(clfs, terms)]).all(0)
            out[key] = verdicts[key].float().mean().item()
    out["per_cell"] = per_cell(cond, ks, verdicts)
    return out, images, cond


@torch.no_grad()
def path_meter(method: Method, backend, terms, cfg: Config, per_request: int, seed: int = 0,
               progress: bool = True) -> PathStats | None:
    """The meter's paths: `per_request` rollouts of the method for every request (c, y), each with its objective
    J = reward - path KL and its path weight w = exp(reward) dP_pre/dP_theta (`Trajectory.log_ratio`), summarised
    per request (`yardstick.path_stats`). None where the path ratio to the base does not exist: a method that is not
    one Gaussian chain (SMC, SVDD, best-of-N) or whose last, deterministic step is not the base's (guidance
    applied there; a fine-tune with rl.final_step="model")."""
    ks = {t.control.name: t.control.num_classes for t in terms}
    shape = (backend.num_c, *ks.values())
    cond = balanced_conditions(per_request * int(np.prod(shape)), backend.num_c, ks)
    g, bs = torch.Generator().manual_seed(seed), max(1, cfg.eval.batch // method.width)
    reward, kl, log_ratio = [], [], []
    for i in tqdm(range(0, len(cond), bs), desc=f"meter paths {method.name}", disable=not progress,
                  dynamic_ncols=True):
        sub = cond.index(torch.arange(i, min(i + bs, len(cond))))
        x0, traj = method(sub, g)
        if traj is None:
            return None
        traj.ref_means = reference_means(traj, backend.denoiser, backend.schedule, sub)
        if not traj.shares_deterministic_steps():
            return None
        x = backend.classifier_input(x0)
        reward.append(sum(t.gamma * t.classifier.log_prob(x, sub.y[t.control.name]) for t in terms))
        kl.append(traj.path_kl())
        log_ratio.append(traj.log_ratio())
    return path_stats(request_index(cond, ks), shape, torch.cat(reward), torch.cat(kl), torch.cat(log_ratio))


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
