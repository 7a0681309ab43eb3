"""Controls: the new conditions y. Each has a name, a number of classes and (optionally) a labeller.

The labeller is the oracle: it computes y from pixels, so `y ⟂ c | x` holds and pairs (x, y) suffice
(METHOD.md §1). Labellers take images in [0, 1], shape (N, 1, H, W), and may be non-differentiable; they
are used to label pairs and to evaluate, never as a reward. The SD controls (jpeg4, jpeg2) take RGB images.
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
    judge: str = "oracle"  # who labels samples in evaluation: the labeller is the oracle, or (a control defined
    # by pairs alone, `pairs.monitor_judged`) the independent monitor classifier

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


# --- Stable Diffusion (RGB images, docs/sd.md): the paper's thresholds in kB (1 kB = 1000 bytes) at 512 px
SD_COMPRESS4_KB = [60.0, 85.0, 110.0]  # <= 60 / <= 85 / <= 110 / > 110 kB
SD_COMPRESS2_KB = [70.0]  # compressible <= 70 kB (the multi-task split)


def _jpeg_bytes(im: np.ndarray, quality: int) -> int:
    buf = io.BytesIO()
    Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def jpeg_kb_512(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """kB of the JPEG (quality 95) of each image (N, 1 or 3, H, W) in [0, 1], as if it were 512 x 512.

    At 512 px it is the plain size. At other sizes the entropy-coded part is scaled by the pixel count
    512^2 / (H W) and the fixed header (tables; measured as the JPEG of an 8x8 flat image, ~0.63 kB) is not:
    scaling the whole size would turn a flat 64-px image's header alone into ~40 kB. A rule of thumb (within
    a few % on flat and on noise images, 64 vs 512 px); exact only at 512 px."""
    arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    header = _jpeg_bytes(np.zeros((8, 8, arr.shape[-1]), np.uint8), quality)
    h, w = images.shape[-2:]
    scale = (512 * 512) / (h * w)
    return torch.tensor([(_jpeg_bytes(im, quality) - header) * scale + header for im in arr],
                        dtype=torch.float64) / 1000


def kb_classes(thresholds: list[float]):
    """A labeller: class k = the first threshold the size is <= to (the paper's "<= 60 kB" is class 0)."""
    return lambda images: torch.bucketize(jpeg_kb_512(images), torch.tensor(thresholds, dtype=torch.float64))


register(Control("jpeg4", 4, kb_classes(SD_COMPRESS4_KB), ("<=60kB", "<=85kB", "<=110kB", ">110kB")))
register(Control("jpeg2", 2, kb_classes(SD_COMPRESS2_KB), ("compressible", "incompressible")))
# LAION score >= 5.7 needs CLIP and predictor weights from the user: the SD pipeline replaces this
# labeller-less entry with a labelled one when `sd.clip` and `sd.aesthetic_predictor` are set
register(Control("aesthetic2", 2, None, ("below 5.7", "aesthetic >= 5.7")))


BUILTIN = frozenset(CONTROLS)  # a control defined by pairs may not take these names


def get_control(name: str) -> Control:
    if name not in CONTROLS:
        raise CtrlDiffError(f"unknown control {name!r}; choose from {sorted(CONTROLS)}")
    return CONTROLS[name]


def controls_of(cfg) -> list[Control]:
    """The controls `cfg.rl.controls` names, in order."""
    if not cfg.rl.controls:
        raise CtrlDiffError("rl.controls is empty; name at least one control")
    return [get_control(name) for name in cfg.rl.controls]


def thresholds_from_data(images: torch.Tensor) -> dict[str, list[float]]:
    """Recompute the frozen thresholds (for the record; labels use the constants above)."""
    size, thick = jpeg_size(images), stroke_thickness(images)
    return {"compress4": torch.quantile(size, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist(),
            "thickness2": [torch.quantile(thick, 0.5).item()]}
