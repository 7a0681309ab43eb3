"""Sample grids (numpy + PIL, no torchvision) and training-curve plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import atomic_path


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
