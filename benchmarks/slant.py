"""A control of our own, as a user would bring one: the slant of a digit in 3 classes (leaning left, upright,
leaning right), from image moments. Not a built-in control: `benchmarks/convergence.py own` writes pairs labelled
by it as a folder of PNGs and hands `label` to ctrldiff as the user's oracle (`--oracle slant3=slant:label`)."""

from __future__ import annotations

import torch

# tertiles of the slant of the 4,000 training digits at 16 px (split seed 0): 1,334 / 1,333 / 1,333 digits
THRESHOLDS = (0.015, 0.26)
CLASSES = ("1-left", "2-upright", "3-right")  # the folder names; sorted, they are the class indices 0, 1, 2


def slant(images: torch.Tensor) -> torch.Tensor:
    """-mu11 / mu02 of the ink (images in [0, 1], (N, 1, H, W)): the horizontal shift of the ink per row down."""
    x = images[:, 0].float()
    h, w = x.shape[1:]
    ys, xs = torch.arange(h).float()[None, :, None], torch.arange(w).float()[None, None, :]
    mass = x.sum((1, 2)).clamp(min=1e-6)
    cy, cx = (x * ys).sum((1, 2)) / mass, (x * xs).sum((1, 2)) / mass
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    return -(x * dy * dx).sum((1, 2)) / (x * dy**2).sum((1, 2)).clamp(min=1e-6)


def label(images: torch.Tensor) -> torch.Tensor:
    """0 = leaning left, 1 = upright, 2 = leaning right (the classes in sorted folder-name order)."""
    s = slant(images)
    return (s > THRESHOLDS[0]).long() + (s > THRESHOLDS[1]).long()
