"""The control a dataset of pairs defines (`ctrldiff.pairs` reads the pairs).

A control defined by pairs has no oracle unless the user names one (`--oracle NAME=module:function`); its
definition (name, classes, class names, where its classifiers are) is stored in the classifier run folder
(`controls.json`) and in every checkpoint fine-tuned with it, so later commands need no code.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .io import CtrlDiffError, read_json, reason, write_json
from .tasks.controls import BUILTIN, Control, get_control, register

if TYPE_CHECKING:
    from .pairs import Pairs

DEFINITIONS = "controls.json"
PROBE = 16  # pairs a user's oracle is tried on when its control is defined (a broken one fails before any work)
_DEFINED: dict[str, dict] = {}  # name -> definition, for the controls defined by pairs in this process


def resolve_oracle(spec: str):
    """`module:function` -> the function (images in [0, 1], (N, C, H, W) -> labels 0..K-1)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise CtrlDiffError(f"oracle {spec!r} is not of the form module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way while it is imported
        raise CtrlDiffError(f"oracle {spec!r} cannot be imported: {type(e).__name__}: {reason(e)}") from None
    if not callable(fn):
        raise CtrlDiffError(f"oracle {spec!r} is not callable")
    return fn


def checked_oracle(spec: str, control: Control):
    """The user's labeller `spec`, wrapped: an exception it raises, or a result that is not one integer label in
    0..K-1 per image, is a one-line error naming it (never a traceback, never labels silently cast)."""
    fn = resolve_oracle(spec)

    def label(images: Tensor) -> Tensor:
        try:
            y = fn(images)
        except Exception as e:  # noqa: BLE001 - the user's code
            raise CtrlDiffError(f"oracle {spec!r} raised {type(e).__name__}: {reason(e)}") from None
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise CtrlDiffError(f"oracle {spec!r} returned a {type(y).__name__}, not labels") from None
        if tuple(y.shape) != (len(images),):
            raise CtrlDiffError(f"oracle {spec!r} returned shape {tuple(y.shape)} for {len(images)} images; "
                                f"expected ({len(images)},): one label per image")
        try:
            return control.check_labels(y)
        except CtrlDiffError as e:
            raise CtrlDiffError(f"oracle {spec!r} returned bad labels: {e} (class indices follow the classes in "
                                f"order: {list(control.class_names)})") from None

    return label


def define(definition: dict, probe: Tensor | None = None) -> Control:
    """Register the control a definition describes (its oracle imported if it names one). probe: images in
    [-1, 1] (some of the pairs) the oracle is tried on now, so that a broken one fails before any work."""
    name = definition["name"]
    if name in BUILTIN:
        raise CtrlDiffError(f"control name {name!r} clashes with a built-in control; choose another "
                            f"(built-in: {sorted(BUILTIN)})")
    control = Control(name, definition["num_classes"], None, tuple(definition["class_names"]))
    if definition.get("oracle"):
        control = dataclasses.replace(control, labeller=checked_oracle(definition["oracle"], control))
        if probe is not None:
            control.label((probe[:PROBE] + 1) / 2)
    _DEFINED[name] = dict(definition)
    return register(control)


def definition(name: str, pairs: Pairs, source: Path, oracle: str | None) -> dict:
    """What defines a control from pairs; `sha256` is what was read (a resumed run checks it is unchanged)."""
    return {"name": name, "num_classes": len(pairs.class_names), "class_names": list(pairs.class_names),
            "pairs": len(pairs), "source": str(Path(source).resolve()), "oracle": oracle, "classifiers": None,
            "sha256": pairs.digest()}


def defined(names) -> dict[str, dict]:
    """The definitions of those of `names` that were defined by pairs (for a checkpoint's metadata)."""
    return {n: _DEFINED[n] for n in names if n in _DEFINED}


def save_definitions(folder: Path, names) -> None:
    """controls.json in a run folder that holds the classifiers of controls defined by pairs."""
    defs = {n: {**d, "classifiers": str(Path(folder).resolve())} for n, d in defined(names).items()}
    for n, d in defs.items():
        _DEFINED[n] = d
    if defs:
        write_json(Path(folder) / DEFINITIONS, defs)


FIELDS = {"name": str, "num_classes": int, "class_names": list, "oracle": (str, type(None)),
          "classifiers": (str, type(None))}  # what `define` and `monitor_judged` read from a definition, by type


def _sound(key: str, d) -> bool:
    """A definition as `define` reads it: the fields of FIELDS by type, under its own name, K >= 2 named classes."""
    return (isinstance(d, dict) and all(isinstance(d.get(f), kind) for f, kind in FIELDS.items()) and d["name"] == key
            and d["num_classes"] >= 2 and len(d["class_names"]) == d["num_classes"]
            and all(isinstance(n, str) for n in d["class_names"]))


def read_definitions(folder: Path) -> dict[str, dict]:
    """A run folder's controls.json ({} if it has none), checked: a damaged or edited file is a one-line error
    naming it."""
    path = Path(folder) / DEFINITIONS
    if not path.is_file():
        return {}
    defs = read_json(path)
    bad = next((k for k, d in defs.items() if not _sound(k, d)), None) if isinstance(defs, dict) else "?"
    if bad is not None:
        raise CtrlDiffError(f"{path} is damaged or edited at control {bad!r}: expected {{name: {{name, num_classes "
                            ">= 2, class_names (as many), oracle, classifiers, ...}}}}")
    return defs


def load_definitions(folder: Path | None) -> dict[str, dict]:
    """Register the controls a classifier run folder defines (none if it has no controls.json)."""
    defs = read_definitions(folder) if folder is not None else {}
    for d in defs.values():
        define(d)
    return defs


def monitor_judged(name: str, folder: Path | None = None) -> Control:
    """For evaluation: a control without an oracle, labelled by its independent monitor classifier (fitted on
    the held-out share of the pairs, never optimised against); `folder`: where the monitor is (default: where
    the definition says). A control with an oracle is returned as is."""
    from .classifier import Classifier

    ctl = get_control(name)
    if ctl.labeller is not None or name not in _DEFINED:
        return ctl
    folder = Path(folder or _DEFINED[name].get("classifiers") or ".")
    path = folder / f"monitor-{name}.safetensors"
    if not path.is_file():
        raise CtrlDiffError(f"control {name!r} has no oracle and its monitor {path} is missing; pass --classifiers "
                            "RUN (the folder of `ctrldiff classifier --pairs`)")
    mon = Classifier.load(path, name, ctl.num_classes)

    def label(images: Tensor) -> Tensor:
        return mon.predict(images * 2 - 1)

    return register(Control(name, ctl.num_classes, label, ctl.class_names, judge="monitor"))
