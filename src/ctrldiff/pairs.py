"""Labelled pairs (x, y) from disk, and the control they define.

Three layouts: a folder with one sub-folder per class (ImageFolder; class names from the folder names), a CSV
`file,label` (the CSV itself, or a folder holding `labels.csv`; files relative to the CSV), or an `.npz` /
`.safetensors` file with `x` (uint8 images) and `y` (labels). Every image goes through one conversion: PIL mode
"L" (1 channel) or "RGB" (3), then a Lanczos (antialiased) resize to the base's size, stretching a non-square
image to the base's aspect. Before it: 16-bit grey keeps its high byte (as PIL reads 16-bit colour PNGs), what
is transparent is composited onto black, an animation gives its first frame, CMYK is PIL's plain conversion;
32-bit integer and float images (no fixed range) are refused, and so is an image over PIL's pixel limit (a
decompression bomb), which PIL alone only warns about below twice the limit. All of it is read and checked
before anything is written; a damaged or hostile file is a one-line error naming it.

The control pairs define: `ctrldiff.definitions`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .io import CtrlDiffError, atomic_dir, reason, refuse_existing
from .tasks.controls import Control

CSV_NAME = "labels.csv"
HELDOUT_SHARE = 0.2  # of each class, held out to fit the independent monitor (the evaluation's judge)
MIN_PAIRS = 10  # per fit (fit_classifier's own minimum), so the held-out share needs >= 10 too


@dataclass
class Pairs:
    x: Tensor  # (N, C, H, W) in [-1, 1]
    y: Tensor  # (N,) int64 in 0..K-1
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)

    def index(self, idx: Tensor) -> Pairs:
        return Pairs(self.x[idx], self.y[idx], self.class_names)

    def digest(self) -> str:
        """sha256 of what was read (images after conversion, labels, class names): a resumed run checks that
        its pairs are still the ones it started from."""
        h = hashlib.sha256(repr(self.class_names).encode())
        for t in (self.x, self.y):
            h.update(str(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes())
        return h.hexdigest()


def to_model(image: Image.Image, shape: tuple[int, int, int]) -> Tensor:
    """One PIL image -> (C, H, W) in [-1, 1] at the base's channels and size."""
    c, h, w = shape
    if c not in (1, 3):
        raise CtrlDiffError(f"the base makes {c}-channel images; pairs from image files need 1 or 3 channels")
    image = _eight_bit(image).convert("L" if c == 1 else "RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32).reshape(h, w, c)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _eight_bit(image: Image.Image) -> Image.Image:
    """The conversions PIL's own to L / RGB gets wrong or leaves open (module docstring)."""
    if image.mode.startswith("I;16"):  # PIL would clip 16-bit grey at 255, not scale it
        return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if image.mode in ("I", "F"):
        raise ValueError(f"mode {image.mode}: 32-bit pixels have no fixed range; save 8 or 16 bits per channel")
    if image.has_transparency_data:  # PIL would drop alpha and show whatever colour the transparent pixels hold
        return Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
    return image


def read_image(path: Path, shape: tuple[int, int, int]) -> Tensor:
    if not path.is_file():  # opening a named pipe would block; a link loop or a socket cannot be read
        raise CtrlDiffError(f"{path} is not a regular file (a broken link or link loop, a pipe or a socket)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below 2x its limit
            with Image.open(path) as im:
                return to_model(im, shape)
    except CtrlDiffError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever PIL raises on a damaged or hostile file is the file's problem
        raise CtrlDiffError(f"{path} is not a readable image ({reason(e)})") from None


def _classes(labels: list, class_names: list[str] | None, where: str) -> tuple[list[int], tuple[str, ...]]:
    """Labels (ints, or text) -> indices 0..K-1 and the class names; every class must have pairs."""
    kinds = {type(v) for v in labels}
    if len(kinds) > 1:
        text = next(v for v in labels if isinstance(v, str))
        num = next(v for v in labels if not isinstance(v, str))
        raise CtrlDiffError(f"mixed label types in {where}: {text!r} (text) and {num!r} (integer); use one kind")
    if kinds == {str}:
        if any(not v.strip() for v in labels):
            raise CtrlDiffError(f"an empty label in {where}; give every pair a class")
        names = list(class_names) if class_names else sorted(set(labels))
        index = {n: i for i, n in enumerate(names)}
        bad = next((v for v in labels if v not in index), None)
        if bad is not None:
            raise CtrlDiffError(f"label {bad!r} in {where} is not one of the classes {names}")
        ys, k = [index[v] for v in labels], len(names)
    else:
        ys = [int(v) for v in labels]
        k = len(class_names) if class_names else max(ys) + 1
        bad = next((v for v in ys if not 0 <= v < k), None)
        if bad is not None:
            raise CtrlDiffError(f"label {bad} in {where} is outside the classes 0..{k - 1}")
        names = list(class_names) if class_names else None  # "0".."k-1" once k is known to be sane
    present = set(ys)
    empty = next(i for i in range(len(present) + 1) if i not in present)  # so a label like 10**12 costs nothing
    if empty < k:
        raise CtrlDiffError(f"class {names[empty] if names else str(empty)!r} has no pairs in {where}")
    return ys, tuple(names or (str(i) for i in range(k)))


def _parse_label(v: str) -> int | str:
    v = v.strip()
    try:
        return int(v)
    except ValueError:
        return v


def _image_folder(root: Path, shape, class_names) -> Pairs:
    if class_names:
        raise CtrlDiffError(f"{root} has one sub-folder per class: the class names are the folder names "
                            "(drop --classes)")
    xs, ys, names = [], [], []
    for k, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))):
        files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if not files:
            raise CtrlDiffError(f"class folder {folder} is empty")
        for f in files:
            if f.is_dir():
                raise CtrlDiffError(f"{f} is a folder inside class folder {folder}; expected images only")
            xs.append(read_image(f, shape))
            ys.append(k)
        names.append(folder.name)
    return Pairs(torch.stack(xs), torch.tensor(ys), tuple(names))


def _csv(path: Path, shape, class_names) -> Pairs:
    """UTF-8 (a BOM, as Excel writes, is dropped), any line ending, quoted fields; surrounding spaces of a field
    are ignored. A row repeated exactly is read once; a file listed again with another label is refused."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CtrlDiffError(f"cannot read {path} as a UTF-8 CSV ({reason(e)})") from None
    if not rows or [c.strip() for c in rows[0]] != ["file", "label"]:
        raise CtrlDiffError(f"{path}: the first row must be the header file,label")
    files, labels, seen = [], [], {}
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise CtrlDiffError(f"{path} row {i}: expected file,label, got {len(row)} fields")
        name, label = row[0].strip(), _parse_label(row[1])
        file = path.parent / name
        if not os.path.lexists(file):
            raise CtrlDiffError(f"{path} row {i} names a missing file {name!r}")
        first, was = seen.setdefault(os.path.normpath(name), (i, label))
        if first != i and was != label:
            raise CtrlDiffError(f"{path} row {i} labels {name!r} {label!r}, row {first} labels it {was!r}; "
                                "give each file one label")
        if first == i:
            files.append(file)
            labels.append(label)
    if not files:
        raise CtrlDiffError(f"{path} lists no pairs")
    ys, names = _classes(labels, class_names, str(path))
    return Pairs(torch.stack([read_image(f, shape) for f in files]), torch.tensor(ys), names)


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        if path.suffix == ".npz":
            d = np.load(path, allow_pickle=False)  # an object (pickled) array raises: never unpickled
            if not isinstance(d, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive (a single .npy array?)")
            with d:
                arrays = {k: d[k] for k in ("x", "y") if k in d.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - whatever numpy, zipfile or safetensors raise: a damaged file
        raise CtrlDiffError(f"cannot read {path}: {reason(e)}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise CtrlDiffError(f"{path} lacks the array(s) {missing}; it needs x (uint8 images) and y (labels)")
    return arrays["x"], arrays["y"]


def _array_file(path: Path, shape, class_names) -> Pairs:
    x, y = _arrays(path)
    if x.dtype != np.uint8:
        raise CtrlDiffError(f"{path}: x is {x.dtype}; store uint8 pixels 0..255 like an image file "
                            "(e.g. (x * 255).round().astype(np.uint8))")
    if x.ndim == 4 and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # channels first -> last, as PIL reads arrays
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))):
        raise CtrlDiffError(f"{path}: x has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C), C 1 or 3")
    if y.ndim != 1 or len(y) != len(x):
        raise CtrlDiffError(f"{path}: y has shape {y.shape}; expected ({len(x)},), one label per image")
    if len(x) == 0:
        raise CtrlDiffError(f"{path} holds no pairs")
    if 0 in x.shape[1:3]:
        raise CtrlDiffError(f"{path}: x has shape {x.shape}; its images are empty")
    if y.dtype.kind not in "iuU":
        raise CtrlDiffError(f"{path}: y is {y.dtype}; labels must be integers or text")
    labels = [str(v) for v in y] if y.dtype.kind == "U" else [int(v) for v in y]
    ys, names = _classes(labels, class_names, str(path))
    images = [to_model(Image.fromarray(im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im), shape) for im in x]
    return Pairs(torch.stack(images), torch.tensor(ys), names)


def load_pairs(path: str | Path, shape: tuple[int, int, int], class_names: list[str] | None = None) -> Pairs:
    """Pairs from any of the three layouts, images at `shape` (the base's (C, H, W)). class_names: for integer
    labels, the names of classes 0..K-1 (fixing K); for text labels, the classes and their order."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".csv":
            return _csv(path, shape, class_names)
        if path.suffix in (".npz", ".safetensors"):
            return _array_file(path, shape, class_names)
        raise CtrlDiffError(f"--pairs {path}: choose a folder, a .csv, an .npz or a .safetensors file")
    if not path.is_dir():
        raise CtrlDiffError(f"--pairs {path}: no such file or folder")
    if (path / CSV_NAME).is_file():
        return _csv(path / CSV_NAME, shape, class_names)
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise CtrlDiffError(f"--pairs {path}: the folder is empty")
    if not any(p.is_dir() for p in entries):
        raise CtrlDiffError(f"--pairs {path} has files but no labels: put them in one sub-folder per class or "
                            f"list them in {CSV_NAME} (file,label)")
    return _image_folder(path, shape, class_names)


def split_pairs(pairs: Pairs, share: float = HELDOUT_SHARE, seed: int = 0) -> tuple[Pairs, Pairs]:
    """(train, held-out): `share` of each class (seeded) held out for the monitor classifier."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(pairs), generator=g)
    held = []
    for k in range(len(pairs.class_names)):
        idx = perm[pairs.y[perm] == k]
        held.append(idx[: round(share * len(idx))])
    held = torch.cat(held)
    mask = torch.ones(len(pairs), dtype=torch.bool)
    mask[held] = False
    train, heldout = pairs.index(torch.nonzero(mask)[:, 0]), pairs.index(held.sort().values)
    if min(len(train), len(heldout)) < MIN_PAIRS:
        need = int(np.ceil(MIN_PAIRS / share))
        raise CtrlDiffError(f"{len(pairs)} pairs are too few: {len(heldout)} held out for the monitor, "
                            f"{len(train)} to train (need >= {MIN_PAIRS} each, about {need} pairs)")
    return train, heldout


@torch.no_grad()
def image_shape(backend) -> tuple[int, int, int]:
    """(C, H, W) of what the backend's classifiers read: its decoded images."""
    return tuple(backend.decode(torch.zeros(1, *backend.shape)).shape[1:])


def export_digits(out: Path, control: Control, n: int, cfg, overwrite: bool = False) -> dict[str, int]:
    """n training digits (a subset drawn by `seed`) as PNGs in one sub-folder per class of a labelled control:
    pairs on disk to try `--pairs` with. Written to a temporary folder and renamed: never half-written."""
    from .tasks.mnist import load_digits, to_unit

    out = Path(out)
    if control.labeller is None:
        raise CtrlDiffError(f"control {control.name!r} has no labeller to label the digits; choose a built-in one")
    if not overwrite:
        refuse_existing(out, what="")
    d = load_digits("train", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    if not 1 <= n <= len(d):
        raise CtrlDiffError(f"-n {n}: choose 1..{len(d)} (the training digits)")
    idx = torch.randperm(len(d), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
    images = to_unit(d.x[idx])
    y = control.label(images)
    names = control.class_names or tuple(str(k) for k in range(control.num_classes))
    with atomic_dir(out) as tmp:
        for i, (im, k) in enumerate(zip(images, y.tolist())):
            (tmp / names[k]).mkdir(exist_ok=True)
            Image.fromarray((im[0] * 255).round().to(torch.uint8).numpy()).save(tmp / names[k] / f"{i:05d}.png")
    return {names[k]: int(v) for k, v in enumerate(torch.bincount(y, minlength=control.num_classes)) if v}
