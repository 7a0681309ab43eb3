"""Step 1 of CTRL: fit p̂(y | x) on pairs (x, y) by maximum likelihood, then calibrate it.

Calibration is one temperature T (logits / T) fitted by L-BFGS on held-back cross-entropy (Guo et al. 2017),
as in the official code: the reward is log p̂(y|x), so its scale matters.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from .checkpoint import Checkpointer, check_finite, grad_norm
from .config import ClassifierConfig
from .io import CtrlDiffError, load_state, load_weights, save_weights
from .models import SmallCNN
from .schedule import Schedule, add_noise


class Classifier(nn.Module):
    """A calibrated classifier on images in [-1, 1]: `forward` returns logits / T."""

    def __init__(self, net: SmallCNN, name: str = ""):
        super().__init__()
        self.net, self.name = net, name
        self.register_buffer("temperature", torch.ones(()))

    @property
    def num_classes(self) -> int:
        return self.net.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) / self.temperature

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """log p̂(y | x), one value per image: the CTRL reward (before gamma)."""
        return self(x).log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    @torch.no_grad()
    def predict(self, x: Tensor, batch: int = 1024) -> Tensor:
        return torch.cat([self(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])

    def save(self, path, extra: dict | None = None) -> None:
        save_weights(path, self.state_dict(), {"kind": "classifier", "name": self.name,
                                               "model": self.net.config, **(extra or {})})

    @classmethod
    def load(cls, path, name: str | None = None, num_classes: int | None = None) -> Classifier:
        state, meta = _checked(path, "classifier", "a classifier checkpoint", name, num_classes)
        clf = cls(SmallCNN(**meta["model"]), meta.get("name", ""))
        load_state(clf, state, path)
        return clf.eval().requires_grad_(False)


def _checked(path, kind: str, what: str, name: str | None, num_classes: int | None = None) -> tuple[dict, dict]:
    """A classifier file's tensors and metadata, after checking its kind and (if given) its control's name and
    number of classes (an edited control definition must not meet classifiers of another K)."""
    state, meta = load_weights(path)
    if meta.get("kind") != kind:
        raise CtrlDiffError(f"{path} is not {what} (kind={meta.get('kind')!r})")
    if name is not None and meta.get("name") != name:
        raise CtrlDiffError(f"{path} is a classifier for {meta.get('name')!r}, not {name!r}")
    k = (meta.get("model") or {}).get("num_classes")
    if num_classes is not None and k != num_classes:
        raise CtrlDiffError(f"{path} has {k} classes, but control {name!r} is defined with {num_classes}: the "
                            "control's definition (controls.json) and its classifiers disagree")
    return state, meta


def expected_calibration_error(logits: Tensor, y: Tensor, bins: int = 15) -> float:
    """ECE: the bin-weighted |accuracy - confidence| over equal-width confidence bins."""
    conf, pred = logits.softmax(-1).max(-1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return ece.item()


def augment(x: Tensor, noise: float, shift: int, g: torch.Generator) -> Tensor:
    """Random integer translation (border-padded) plus Gaussian pixel noise."""
    if shift:
        n, _, h, w = x.shape
        d = torch.randint(-shift, shift + 1, (n, 2), generator=g).float()
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2], theta[:, 1, 2] = 2 * d[:, 0] / w, 2 * d[:, 1] / h
        x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                          padding_mode="border", align_corners=False)
    return x + noise * torch.randn(x.shape, generator=g) if noise else x


def fit_temperature(logits: Tensor, y: Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """T minimising the cross-entropy of logits / T (optimised in log T, L-BFGS), kept within `bounds`:
    a separable calibration split drives T -> 0, which would scale the reward log p̂ without limit."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = log_t.detach().exp()
    if not torch.isfinite(t):  # L-BFGS can diverge on a badly fitted classifier: a grid in log T instead
        grid = torch.linspace(math.log(bounds[0]), math.log(bounds[1]), 401).exp()
        t = grid[torch.stack([F.cross_entropy(logits / g, y) for g in grid]).argmin()]
    return float(t.clamp(*bounds))


def evaluate_classifier(clf: Classifier, x: Tensor, y: Tensor) -> dict:
    """Accuracy, NLL and ECE of the raw (T = 1) and the calibrated logits on (x, y)."""
    with torch.no_grad():
        raw = clf.net(x)
    cal = raw / clf.temperature
    return {"accuracy": (raw.argmax(-1) == y).float().mean().item(),
            "nll_raw": F.cross_entropy(raw, y).item(), "nll_calibrated": F.cross_entropy(cal, y).item(),
            "ece_raw": expected_calibration_error(raw, y), "ece_calibrated": expected_calibration_error(cal, y)}


def held_back(n: int, cfg: ClassifierConfig) -> int:
    """Of n pairs, those held back for temperature calibration (cfg.val_frac, at least one)."""
    return max(1, int(cfg.val_frac * n))


def classifier_steps(n: int, cfg: ClassifierConfig) -> int:
    """Optimiser steps of `fit_net` on n training pairs: cfg.epochs epochs, at least cfg.min_steps."""
    return max(cfg.epochs * max(1, n // cfg.batch), cfg.min_steps)


def fit_net(net: nn.Module, x: Tensor, y: Tensor, cfg: ClassifierConfig, g: torch.Generator, inputs,
            name: str = "", log=None, progress: bool = True, ckpt: Checkpointer | None = None) -> None:
    """Maximum likelihood with AdamW and a one-cycle schedule; `inputs(x_batch)` builds what the net sees.
    It takes cfg.epochs epochs, or more where that is fewer than cfg.min_steps optimiser steps (few pairs).
    ckpt: resume from / save to (the epoch's shuffle is saved with it, so a resume mid-epoch is exact)."""
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(x) // cfg.batch)
    total = classifier_steps(len(x), cfg)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total)
    ckpt = ckpt or Checkpointer(None, {}, cfg.checkpoint_every)
    start, extra = ckpt.start(total, {"net": net, "opt": opt, "sched": sched}, {"g": g})
    order, loss = extra.get("order"), extra.get("loss")
    bar = tqdm(total=-(-total // steps_per_epoch), initial=start // steps_per_epoch, desc=f"classifier {name}",
               disable=not progress, dynamic_ncols=True)
    for step in range(start, total):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            order = torch.randperm(len(x), generator=g)
        b = order[i * cfg.batch:(i + 1) * cfg.batch]
        loss = F.cross_entropy(net(inputs(x[b])), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(step, loss.item(), grad_norm(net.parameters()), ckpt)
        opt.step()
        sched.step()
        if i == steps_per_epoch - 1:
            bar.update()
            if log is not None:
                log({"classifier": name, "epoch": epoch, "loss": loss.item()})
        ckpt.step(step + 1, {"order": order, "loss": loss.detach()})
    bar.close()


def fit_classifier(x: Tensor, y: Tensor, num_classes: int, cfg: ClassifierConfig, seed: int = 0,
                   name: str = "", log=None, progress: bool = True,
                   ckpt: Checkpointer | None = None) -> tuple[Classifier, dict]:
    """Fit p̂(y|x) on pairs (x in [-1, 1], y in 0..K-1), calibrate T on a held-back fraction; returns it + a report."""
    if len(x) != len(y):
        raise CtrlDiffError(f"{len(x)} images but {len(y)} labels")
    if len(x) < 10:
        raise CtrlDiffError(f"{len(x)} labelled pairs are too few to fit and calibrate a classifier (need >= 10)")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise CtrlDiffError(f"label {int(y.max()) if y.max() >= num_classes else int(y.min())} "
                            f"is outside 0..{num_classes - 1}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = held_back(len(x), cfg)
    val, tr = perm[:n_val], perm[n_val:]
    clf = Classifier(SmallCNN(num_classes, in_channels=x.shape[1], width=cfg.width, feat_dim=2 * cfg.width), name)
    t0 = time.time()
    fit_net(clf.net, x[tr], y[tr], cfg, g, lambda xb: augment(xb, cfg.noise, cfg.shift, g), name, log, progress,
            ckpt)
    # --- calibration: one temperature on the held-back pairs
    clf.eval()
    with torch.no_grad():
        clf.temperature.fill_(fit_temperature(clf.net(x[val]), y[val]))
    clf.requires_grad_(False)
    report = {"name": name, "pairs": len(x), "temperature": clf.temperature.item(), "seconds": time.time() - t0,
              "calibration_split": evaluate_classifier(clf, x[val], y[val])}
    return clf, report


class NoisyClassifier(nn.Module):
    """p̂(y | x_t, t) on noisy latents, for classifier guidance (Dhariwal & Nichol 2021): the same small CNN
    with one extra input channel holding t / T, so no new architecture is needed for the time input."""

    def __init__(self, net: SmallCNN, num_train_timesteps: int = 1000, name: str = ""):
        super().__init__()
        self.net, self.name, self.num_train_timesteps = net, name, num_train_timesteps

    def inputs(self, x_t: Tensor, t: Tensor) -> Tensor:
        level = (t.float() / self.num_train_timesteps).view(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:])
        return torch.cat([x_t, level.to(x_t.dtype)], 1)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net(self.inputs(x_t, t))

    def log_prob(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self(x_t, t).log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    def save(self, path, extra: dict | None = None) -> None:
        save_weights(path, self.state_dict(), {"kind": "noisy_classifier", "name": self.name, "model": self.net.config,
                                               "num_train_timesteps": self.num_train_timesteps, **(extra or {})})

    @classmethod
    def load(cls, path, name: str | None = None, num_classes: int | None = None) -> NoisyClassifier:
        state, meta = _checked(path, "noisy_classifier", "a noise-aware classifier", name, num_classes)
        clf = cls(SmallCNN(**meta["model"]), meta["num_train_timesteps"], meta.get("name", ""))
        load_state(clf, state, path)
        return clf.eval().requires_grad_(False)


def fit_noisy_classifier(x: Tensor, y: Tensor, num_classes: int, cfg: ClassifierConfig, schedule: Schedule,
                         seed: int = 0, name: str = "", progress: bool = True,
                         ckpt: Checkpointer | None = None) -> NoisyClassifier:
    """Fit p̂(y | x_t, t) on the same pairs as p̂(y|x), each batch noised by q(x_t | x_0) at t ~ U{0..T-1}."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = NoisyClassifier(SmallCNN(num_classes, in_channels=x.shape[1] + 1), schedule.num_train_timesteps, name)

    def noised(xb: Tensor) -> Tensor:
        t = torch.randint(0, schedule.num_train_timesteps, (len(xb),), generator=g)
        x0 = augment(xb, 0.0, cfg.shift, g)
        return clf.inputs(add_noise(schedule, x0, torch.randn(x0.shape, generator=g), t), t)

    fit_net(clf.net, x, y, cfg, g, noised, f"{name} (noise-aware)", progress=progress, ckpt=ckpt)
    return clf.eval().requires_grad_(False)
