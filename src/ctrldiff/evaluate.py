"""Evaluation against oracles: the requested y vs the oracle label of the generated image, digit fidelity,
feature-FID, mean path KL to the base and cost. Never uses the classifier that was optimised."""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
from scipy import linalg
from sklearn.metrics import confusion_matrix, f1_score
from tqdm import tqdm

from .classifier import Classifier
from .config import Config
from .contracts import Cond, Denoiser
from .rl.finetune import balanced_conditions
from .sampling import reference_means, sample
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
def generate(denoiser: Denoiser, backend, cond: Cond, cfg: Config, seed: int = 0, reference: Denoiser | None = None,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Sample one image per row of cond, in batches; returns images in [0, 1], path KLs (if reference) and seconds."""
    g = torch.Generator().manual_seed(seed)
    n, bs = len(cond), cfg.eval.batch
    images, kls, seconds = [], [], 0.0
    for i in tqdm(range(0, n, bs), desc="sampling", disable=not progress, dynamic_ncols=True):
        sub = cond.index(torch.arange(i, min(i + bs, n)))
        x_T = torch.randn((len(sub), *backend.shape), generator=g)
        t0 = time.perf_counter()
        traj = sample(denoiser, backend.schedule, x_T, sub, steps=cfg.sampler.steps, eta=cfg.sampler.eta, generator=g)
        seconds += time.perf_counter() - t0
        images.append(backend.decode(traj.x0))
        if reference is not None:  # the KL is measured on the same trajectories, outside the timed sampling
            traj.ref_means = reference_means(traj, reference, backend.schedule, sub)
            kls.append(traj.path_kl())
    return torch.cat(images), (torch.cat(kls) if kls else None), seconds


def evaluate(denoiser: Denoiser, backend, controls: list[Control], cfg: Config, oracle: Classifier,
             real_features: np.ndarray, reference: Denoiser | None = None, seed: int = 0,
             progress: bool = True) -> tuple[dict, torch.Tensor, Cond]:
    """Metrics of one method on `per_class` samples per joint class of y, c cycling over the digits."""
    ks = {c.name: c.num_classes for c in controls}
    n = cfg.eval.per_class * int(np.prod(list(ks.values())))
    cond = balanced_conditions(n, backend.num_c, ks)
    images, kl, seconds = generate(denoiser, backend, cond, cfg, seed, reference, progress)
    out: dict = {"samples": n, "seconds_per_sample": seconds / n}
    correct = torch.ones(n, dtype=torch.bool)
    for ctl in controls:
        want, got = cond.y[ctl.name].numpy(), ctl.label(images).numpy()
        correct &= torch.from_numpy(want == got)
        out[ctl.name] = {"accuracy": float((want == got).mean()),
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
    out["digit_fidelity"] = (oracle.predict(images * 2 - 1) == cond.c).float().mean().item()
    out["feature_fid"] = frechet_distance(features(oracle, images), real_features)
    if kl is not None:
        out["mean_kl"] = kl.mean().item()
    return out, images, cond
