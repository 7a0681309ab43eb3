"""The options several commands share, and from a command's arguments: its config, its run folder, what a
--resume recalls."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import config as C
from ..io import CtrlDiffError


def add_common(p: argparse.ArgumentParser) -> None:
    add_settings(p)
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<command>-<preset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    add_device(p)

def add_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=f"named settings: {', '.join(sorted(C.PRESETS))} (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, JSON value, repeatable (e.g. --set rl.steps=100)")

def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help=f"where the networks run: {', '.join(C.DEVICES)} (default auto: "
                                                   "a GPU if torch sees one); sets `device`, recorded in config.json")

def device_override(args) -> list[str]:
    return [f"device={args.device}"] if getattr(args, "device", None) is not None else []

def resolved(cfg: C.Config) -> C.Config:
    """`device` "auto" resolved to what this machine has, so config.json says where the run ran."""
    from ..backends import resolve_device

    cfg.device = resolve_device(cfg.device)
    return cfg

def add_sd(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, metavar="PATH",
                   help="a local diffusers folder as the base: a DDPMPipeline/DDIMPipeline (or unet/ + scheduler/) "
                        "of a UNet2DModel (sets `model`), or Stable Diffusion (docs/sd.md; default preset "
                        "sd_compress4; sets sd.model)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="SD prompts, one per line (default: 45 animals)")

def model_kind_of(args) -> str | None:
    """None (the embedded digits), "unet2d" or "sd", from what --model's folder holds."""
    if getattr(args, "model", None) is None:
        return None
    from ..backends.unet2d import model_kind

    return model_kind(args.model)

def sd_overrides(args) -> list[str]:
    """--model / --prompts as config overrides (JSON strings, so any path stays a string)."""
    import json

    kind = model_kind_of(args)
    if kind == "unet2d" and getattr(args, "prompts", None) is not None:
        raise CtrlDiffError("--prompts is for Stable Diffusion; a UNet2DModel's c is a class index (--c)")
    pairs = [("model" if kind == "unet2d" else "sd.model", getattr(args, "model", None)),
             ("sd.prompts", getattr(args, "prompts", None))]
    return [f"{k}={json.dumps(str(v))}" for k, v in pairs if v is not None]

def add_report(p: argparse.ArgumentParser) -> None:
    from ..tracking import REPORT_TO

    p.add_argument("--report-to", choices=REPORT_TO, default=None,
                   help="also log the metrics, the config and sample grids to an experiment tracker (an optional "
                        "extra: pip install 'ctrldiff[tensorboard]'); default none, or with --resume the run's own")

def add_pairs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=Path, metavar="PATH",
                   help="labelled pairs (x, y) defining a new control (with --control): a folder with one "
                        "sub-folder per class, a CSV file,label (or a folder with labels.csv), or an .npz / "
                        ".safetensors with x (uint8 images) and y")
    p.add_argument("--classes", metavar="A,B,...",
                   help="with --pairs: the class names of integer labels 0..K-1 (fixing K), or the order of text labels")
    p.add_argument("--oracle", metavar="NAME=MODULE:FUNCTION",
                   help="with --pairs: a Python labeller (images in [0, 1] -> labels) used as the control's oracle")

def add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="NAME",
                   help="the one control to use (sets rl.controls to {NAME: gamma}, gamma the preset's unless "
                        "rl.controls names it): built in, defined by --pairs, or by the --classifiers run")

def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint (same --preset/--set, or none)")

INPUTS = "inputs.json"  # in a run folder: the command's arguments that are not config, for --resume

RESUMED = {"method": str, "classifiers": Path, "base": Path, "pairs": Path, "control": str, "classes": str,
           "oracle": str}  # those arguments, by type

def inputs_of(args) -> dict:
    """The arguments of RESUMED this command was given (paths absolute, so a resume may run from elsewhere)."""
    given = {k: getattr(args, k, None) for k in RESUMED}
    return {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in given.items() if v is not None}

def recall(args) -> None:
    """--resume: the arguments the run recorded (inputs.json) stand in for those not given again; one given
    again must be the one recorded (a run with other classifiers, pairs or method would not be this run)."""
    from ..io import read_json

    path = args.resume / INPUTS
    if not path.is_file():  # a run from before inputs.json: what is given is used as it is
        return
    recorded = read_json(path)
    if not isinstance(recorded, dict) or any(k not in RESUMED or not isinstance(v, str) for k, v in recorded.items()):
        raise CtrlDiffError(f"{path} is damaged: expected {{argument: text}} for arguments among {sorted(RESUMED)}")
    given = inputs_of(args)
    for key, kind in RESUMED.items():
        if key in given and given[key] != recorded.get(key):
            was = f"--{key} {recorded[key]}" if key in recorded else f"no --{key}"
            raise CtrlDiffError(f"--resume {args.resume}: the run was started with {was}, not --{key} {given[key]}; "
                                f"drop --{key} (a resume reuses the run's own)")
        if key in recorded:
            setattr(args, key, kind(recorded[key]))

def config_of(args) -> C.Config:
    resume = getattr(args, "resume", None)
    if resume is not None:
        recall(args)
    if resume is not None and args.preset is None and not args.overrides:  # the run's own settings
        from ..runs import read_config

        return resolved(read_config(resume))
    default = "sd_compress4" if model_kind_of(args) == "sd" else "default"
    cfg = resolved(C.apply_overrides(C.preset(args.preset or default),
                                      [*args.overrides, *device_override(args), *sd_overrides(args)]))
    name = getattr(args, "control", None)
    if name is not None:
        cfg.rl.controls = {name: cfg.rl.controls.get(name, next(iter(cfg.rl.controls.values()), 10.0))}
    if cfg.name.startswith("sd_") and cfg.sd.model is None:
        raise CtrlDiffError(f"preset {cfg.name!r} is for Stable Diffusion: pass --model PATH (a local diffusers folder)")
    return cfg

def out_of(args, command: str) -> Path:
    return args.out or Path("runs") / f"{command}-{args.preset or 'default'}"

def run_of(args, command: str, cfg: C.Config):
    """The run folder: a new one, or with --resume the interrupted one (its checkpoints say where to go on)."""
    from ..io import write_json
    from ..runs import Run

    if getattr(args, "resume", None) is None:
        run = Run(out_of(args, command), cfg, args.overwrite, report_to=args.report_to)
        write_json(run.path(INPUTS), inputs_of(args))
        return run
    if args.out is not None or args.overwrite:
        raise CtrlDiffError("--resume continues a run in its own folder; drop --out and --overwrite")
    return Run(args.resume, cfg, resume=True, report_to=args.report_to)
