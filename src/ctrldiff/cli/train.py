"""`ctrldiff pretrain | classifier | finetune`: the commands that train."""

from __future__ import annotations

import sys
from pathlib import Path

from ..io import CtrlDiffError
from .options import config_of, out_of, run_of


def cmd_pretrain(args) -> None:
    from ..io import save_weights
    from ..pipeline import fit_digit_oracle
    from ..pretrain import pretrain

    cfg = config_of(args)
    run = run_of(args, "pretrain", cfg)
    command = "ctrldiff pretrain " + " ".join(sys.argv[2:])
    oracle, report = fit_digit_oracle(cfg, run=run)
    oracle.save(run.path(f"digits{cfg.data.resolution}.safetensors"), {"report": report, "command": command})
    print(f"digit oracle: held-out accuracy {report['heldout']['accuracy']:.3f}")
    net, summary = pretrain(cfg, log=run.log, ckpt=run.checkpointer("pretrain", cfg.pretrain.checkpoint_every))
    meta = {"kind": "base", "resolution": cfg.data.resolution, "model": net.config, "summary": summary,
            "command": command}
    save_weights(run.path(f"base{cfg.data.resolution}.safetensors"), net.state_dict(), meta)
    print(f"wrote {run.dir}/  ({summary['seconds']:.0f} s, final loss {summary['final_loss']:.4f}); "
          f"copy its *.safetensors into src/ctrldiff/assets/ to ship them")

def _user_pairs(args, cfg, backend) -> dict:
    """--pairs: read, check and split the pairs (before any folder is written) and define their control.
    Returns {control: (train, held-out)}."""
    from ..definitions import define, definition
    from ..pairs import image_shape, load_pairs, split_pairs
    from ..tasks.controls import BUILTIN

    path, name = getattr(args, "pairs", None), getattr(args, "control", None)
    if path is None:
        if getattr(args, "oracle", None) or getattr(args, "classes", None):
            raise CtrlDiffError("--oracle and --classes describe the pairs of --pairs PATH; pass it")
        return {}
    if name is None:
        raise CtrlDiffError("--pairs needs --control NAME: the name of the control the pairs define")
    if name in BUILTIN:
        raise CtrlDiffError(f"control name {name!r} clashes with a built-in control; choose another "
                            f"(built-in: {sorted(BUILTIN)})")
    oracle = None
    if args.oracle is not None:
        who, sep, oracle = args.oracle.partition("=")
        if not sep or who != name:
            raise CtrlDiffError(f"--oracle {args.oracle!r}: write {name}=module:function")
    data = load_pairs(path, image_shape(backend), args.classes.split(",") if args.classes else None)
    split = split_pairs(data, seed=cfg.data.split_seed)
    made = definition(name, data, path, oracle)
    if getattr(args, "resume", None) is not None:
        _check_unchanged(args.resume, made)
    define(made, probe=data.x)
    return {name: split}

def _check_unchanged(run: Path, made: dict) -> None:
    """--resume: the pairs must be those the run started from (the sha256 of what was read, in its controls.json)."""
    from ..definitions import read_definitions

    was = read_definitions(run).get(made["name"], {})
    if was.get("sha256") not in (None, made["sha256"]):
        raise CtrlDiffError(f"--resume {run}: the pairs in {made['source']} changed since the run started (sha256 "
                            f"{was['sha256'][:12]}..., now {made['sha256'][:12]}...); restore them or start a new run")

def _check_digit_controls(cfg, backend, pairs: dict) -> None:
    """The built-in controls are fitted on the embedded digits: refused on a UNet2DModel base's images."""
    from ..backends import PixelBackend
    from ..pairs import image_shape
    from ..tasks.controls import BUILTIN

    if isinstance(backend, PixelBackend) or cfg.sd.model is not None:
        return
    digits = [n for n in cfg.rl.controls if n not in pairs and n in BUILTIN]
    if digits:
        raise CtrlDiffError(f"control {digits[0]!r} is fitted on the embedded digits, not on this base's images "
                            f"{image_shape(backend)}; define one from your pairs: --pairs PATH --control NAME")

def cmd_classifier(args) -> None:
    from ..definitions import save_definitions
    from ..pipeline import backend_for, fit_reward_terms

    cfg = config_of(args)
    if cfg.sd.model is not None and args.pairs is None:  # SD: pairs are labelled base samples, no noisy classifier
        from ..backends import sd_backend
        from ..sd_pipeline import clip_for, fit_sd_reward_terms

        backend = sd_backend(cfg)
        run = run_of(args, "classifier", cfg)
        for name, r in fit_sd_reward_terms(backend, cfg, run, clip=clip_for(cfg, backend.device))[1].items():
            print(f"{name}: held-out accuracy {r['heldout']['accuracy']:.3f} (classes {r['class_counts']})")
        print(f"wrote {run.dir}/")
        return
    backend = backend_for(cfg)
    pairs = _user_pairs(args, cfg, backend)
    _check_digit_controls(cfg, backend, pairs)
    run = run_of(args, "classifier", cfg)
    save_definitions(run.dir, pairs)  # before any work: a resume checks its pairs against it
    _, reports = fit_reward_terms(cfg, run, noisy=cfg.sd.model is None, pairs=pairs)  # SD: x_t are latents
    for name, r in reports.items():
        h = r["heldout"]
        noisy = ", ".join(f"{k} {v:.2f}" for k, v in r.get("noise_aware_heldout_accuracy", {}).items())
        print(f"{name}: held-out accuracy {h['accuracy']:.3f}, ECE {h['ece_raw']:.3f} -> {h['ece_calibrated']:.3f} "
              f"(T = {r['temperature']:.3f})" + (f"; noise-aware classifier at {noisy}" if noisy else ""))
    print(f"wrote {run.dir}/")

def cmd_finetune(args) -> None:
    from ..definitions import load_definitions
    from ..pipeline import backend_for, check_finetune, controls_of, finetune_from, run_cfg_finetune

    cfg = config_of(args)
    args.method = args.method or "ctrl"  # after config_of: a resume reuses the run's own method
    if args.method not in ("ctrl", "cfg"):
        raise CtrlDiffError(f"finetune --method {args.method!r}; choose ctrl (pairs, RL) or cfg (triplets, DSM)")
    if args.pairs is not None and (args.classifiers is not None or args.method == "cfg" or cfg.sd.model is not None):
        raise CtrlDiffError("finetune --pairs fits the classifiers here (ctrl, digits or a UNet2DModel); with "
                            "--classifiers, --method cfg or Stable Diffusion fit them first: ctrldiff classifier --pairs")
    load_definitions(args.classifiers)
    if args.method == "cfg":  # triplets (x, c, y): the digits with c, y labelled by each control's labeller
        unlabelled = [c.name for c in controls_of(cfg) if c.labeller is None]
        if unlabelled or cfg.model is not None or cfg.sd.model is not None:
            raise CtrlDiffError("--method cfg trains on the embedded digits' triplets, labelled by each control's "
                                f"labeller; not on another base, nor for {unlabelled or 'controls'} without one")
        run = run_of(args, "finetune", cfg)
        _, summary = run_cfg_finetune(cfg, run, backend_for(cfg, args.base))
        print(f"wrote {run.path('cfg.safetensors')} ({summary['triplets']} triplets, {summary['seconds']:.0f} s)")
        return
    if cfg.sd.model is not None:  # Stable Diffusion through accelerate: only the main process writes the run
        from ..sd_pipeline import finetune_sd

        check_finetune(cfg)
        finetune_sd(cfg, lambda: run_of(args, "finetune", cfg), args.classifiers)
        print(f"wrote {out_of(args, 'finetune') if args.resume is None else args.resume}/ctrl.safetensors")
        return
    backend = backend_for(cfg, args.base)
    pairs = _user_pairs(args, cfg, backend)
    _check_digit_controls(cfg, backend, pairs)
    check_finetune(cfg)
    run = run_of(args, "finetune", cfg)
    finetune_from(cfg, run, args.classifiers, args.base, backend, pairs)
    print(f"wrote {run.path('ctrl.safetensors')} and {run.path('curves.png')}")
