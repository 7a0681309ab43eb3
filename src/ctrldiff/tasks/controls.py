"""Controls: the new conditions y. Each has a name, a number of classes and (optionally) a labeller.

The labeller is the oracle: it computes y from pixels, so `y ⟂ c | x` holds and pairs (x, y) suffice
(METHOD.md §1). Labellers take images in [0, 1], shape (N, 1, H, W), and may be non-differentiable; they
are used to label pairs and to evaluate, never as a reward.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..io import CtrlDiffError


@dataclass(frozen=True)
class Control:
    name: str
    num_classes: int
    labeller: Callable[[torch.Tensor], torch.Tensor] | None = None  # images in [0,1] -> labels 0..K-1
    class_names: tuple[str, ...] = ()

    @property
    def null(self) -> int:
        """The label value meaning 'no control' (the augmented model's null row)."""
        return self.num_classes

    def label(self, images: torch.Tensor) -> torch.Tensor:
        if self.labeller is None:
            raise CtrlDiffError(f"control {self.name!r} has no labeller (oracle); it was defined from pairs only")
        return self.labeller(images)

    def check_labels(self, y: torch.Tensor, allow_null: bool = False) -> torch.Tensor:
        """Raise a one-line error if any label is outside 0..K-1 (or K, the null, when allowed)."""
        y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise CtrlDiffError(f"labels for control {self.name!r} must be integers, got {y.dtype}")
        hi = self.num_classes if allow_null else self.num_classes - 1
        bad = y[(y < 0) | (y > hi)]
        if bad.numel():
            raise CtrlDiffError(f"label {int(bad[0])} for control {self.name!r} is outside 0..{hi}")
        return y.long()


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()[:, 0]


def jpeg_size(images: torch.Tensor, size: int = 64, quality: int = 95) -> torch.Tensor:
    """Bytes of the JPEG (quality 95) of each image bicubically upsampled to size x size."""
    out = []
    for im in _uint8(images):
        buf = io.BytesIO()
        Image.fromarray(im).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=quality)
        out.append(buf.tell())
    return torch.tensor(out, dtype=torch.float64)


def stroke_thickness(images: torch.Tensor) -> torch.Tensor:
    """Ink area / skeleton length of the binarised (> 0.5) digit: the mean stroke width in pixels."""
    from skimage.morphology import skeletonize

    out = []
    for im in _uint8(images):
        ink = im > 127
        out.append(ink.sum() / max(int(skeletonize(ink).sum()), 1))
    return torch.tensor(out, dtype=torch.float64)


def binned(feature: Callable[[torch.Tensor], torch.Tensor], thresholds: dict[int, list[float]]):
    """A labeller: class = number of resolution-specific thresholds the feature exceeds."""

    def label(images: torch.Tensor) -> torch.Tensor:
        res = images.shape[-1]
        if res not in thresholds:
            raise CtrlDiffError(f"no frozen thresholds for resolution {res}; choose from {sorted(thresholds)}")
        return torch.bucketize(feature(images), torch.tensor(thresholds[res], dtype=torch.float64), right=True)

    return label


# Thresholds frozen from the training split (4,000 digits, split seed 0) by `thresholds_from_data`:
# quartiles / medians of the feature at each resolution. Frozen so that labels never drift with the data.
COMPRESS4 = {16: [1174.0, 1288.0, 1391.0], 28: [1187.75, 1317.0, 1430.0]}
COMPRESS2 = {r: [v[1]] for r, v in COMPRESS4.items()}
THICKNESS2 = {16: [1.8125], 28: [2.85]}

CONTROLS: dict[str, Control] = {}


def register(control: Control) -> Control:
    """Make a control known by name (to the CLI and configs). Returns it."""
    CONTROLS[control.name] = control
    return control


register(Control("compress4", 4, binned(jpeg_size, COMPRESS4), ("smallest", "small", "large", "largest")))
register(Control("compress2", 2, binned(jpeg_size, COMPRESS2), ("compressible", "incompressible")))
register(Control("thickness2", 2, binned(stroke_thickness, THICKNESS2), ("thin", "thick")))


def get_control(name: str) -> Control:
    if name not in CONTROLS:
        raise CtrlDiffError(f"unknown control {name!r}; choose from {sorted(CONTROLS)}")
    return CONTROLS[name]


def thresholds_from_data(images: torch.Tensor) -> dict[str, list[float]]:
    """Recompute the frozen thresholds (for the record; labels use the constants above)."""
    size, thick = jpeg_size(images), stroke_thickness(images)
    return {"compress4": torch.quantile(size, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist(),
            "thickness2": [torch.quantile(thick, 0.5).item()]}
