"""Sample grids (numpy + PIL, no torchvision) and training-curve plots (matplotlib, Agg)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path
from .tasks.controls import Control
from .tasks.mnist import NUM_DIGITS


def grid_image(images: torch.Tensor, rows: int, cols: int, scale: int = 3, pad: int = 1) -> np.ndarray:
    """images (rows*cols, C, H, W) in [0, 1], row-major, as one (H', W', C) uint8 array (white padding between
    cells, each pixel repeated `scale` times)."""
    n, ch, h, w = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows}x{cols} grid")
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, ch), 255, np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    return grid.repeat(scale, 0).repeat(scale, 1)


def save_grid(images: torch.Tensor, rows: int, cols: int, path: str | Path, scale: int = 3, pad: int = 1) -> None:
    """The grid of `grid_image` as one PNG."""
    from PIL import Image

    grid = grid_image(images, rows, cols, scale, pad)
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")


def plot_curves(records: list[dict], panels: dict[str, list[str]], path: str | Path, title: str = "") -> None:
    """One panel per entry of `panels` (title -> record keys), x = step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, ks) in zip(axes[0], panels.items()):
        for k in ks:
            pts = [(r["step"], r[k]) for r in records if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_cells(target: list[dict], method: list[dict], name: str, path: str | Path, min_ess: float = 30.0,
               meter: list[dict] | None = None) -> None:
    """Accuracy per request (rows = joint y, columns = c): the target p_gamma, the method, and their difference;
    target cells whose effective sample size is below `min_ess` are marked x (not trustworthy). meter: the
    method's per-request yardstick (`yardstick.yardstick`), a fourth panel of log Z - J in nats (flagged requests,
    whose gap is a lower bound, marked >)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = sorted({tuple(r["y"]) for r in target})
    cols = max(r["c"] for r in target) + 1

    def grid(rows: list[dict]) -> np.ndarray:
        a = np.full((len(ys), cols), np.nan)
        for r in rows:
            a[ys.index(tuple(r["y"])), r["c"]] = r["accuracy"]
        return a

    t, m = grid(target), grid(method)
    panels = [("target p_gamma", t, "viridis", (0, 1), "oracle accuracy"),
              (name, m, "viridis", (0, 1), "oracle accuracy"), (f"{name} - target", m - t, "RdBu", (-1, 1), "difference")]
    if meter:
        gaps = grid([{"c": r["request"][0], "y": r["request"][1:], "accuracy": r["gap"]} for r in meter])
        panels.append((f"{name}: log Z - J", gaps, "magma_r", (0, max(1.0, float(np.nanmax(gaps)))), "nats"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.5, 0.45 * len(ys) + 1.8))
    for ax, (title, a, cmap, (lo, hi), unit) in zip(axes, panels):
        im = ax.imshow(a, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(cols))
        ax.set_yticks(range(len(ys)), [",".join(map(str, y)) for y in ys])
        ax.set_xlabel("c (digit)")
        ax.set_ylabel("requested y")
        ax.set_title(title, fontsize=9)
        for r in target:
            if r["ess"] < min_ess:
                ax.text(r["c"], ys.index(tuple(r["y"])), "x", ha="center", va="center", color="red", fontsize=8)
        if unit == "nats":
            for r in meter:
                if r["flagged"]:
                    ax.text(r["request"][0], ys.index(tuple(r["request"][1:])) + 0.3, ">", ha="center",
                            color="cyan", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, label=unit)
    fig.suptitle(f"oracle accuracy per request (c, y): target vs {name}; x = target ESS < {min_ess:g}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_reliability(curves: dict, path: str | Path, title: str, bins: int = 10) -> None:
    """Reliability diagram: accuracy against confidence per bin (bins with >= 20 samples), one curve per
    name -> (logits, labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .classifier import expected_calibration_error

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfectly calibrated")
    for name, (logits, y) in curves.items():
        conf, pred = logits.softmax(-1).max(-1)
        edges = torch.linspace(0, 1, bins + 1)
        masks = [(conf > lo) & (conf <= hi) for lo, hi in itertools.pairwise(edges)]
        pts = [(conf[m].mean().item(), (pred[m] == y[m]).float().mean().item()) for m in masks if m.sum() >= 20]
        ax.plot(*zip(*pts), marker="o", label=f"{name} (ECE {expected_calibration_error(logits, y):.3f})")
    ax.set_xlabel("confidence (max p̂)")
    ax.set_ylabel("accuracy (oracle label)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def grid_of(images: torch.Tensor, cond, controls: list[Control], num_c: int = NUM_DIGITS):
    """Pick one image per (joint y, c): rows = joint class of y, columns = c (the first ten values at most)."""
    cols = min(num_c, NUM_DIGITS)
    row, rows = torch.zeros(len(images), dtype=torch.long), 1
    for ctl in controls:  # mixed radix, first control fastest (the order of balanced_conditions)
        row += cond.y[ctl.name] * rows
        rows *= ctl.num_classes
    picks = []
    for r in range(rows):
        for c in range(cols):
            idx = torch.nonzero((row == r) & (cond.c == c))
            picks.append(images[idx[0, 0]] if len(idx) else torch.ones_like(images[0]))
    return torch.stack(picks), rows, cols
