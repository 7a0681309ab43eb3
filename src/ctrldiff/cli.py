"""ctrldiff command line: demo | pretrain | classifier | finetune | sample | evaluate | bench | export-digits |
export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config as C
from .io import CtrlDiffError


def _common(p: argparse.ArgumentParser) -> None:
    _settings(p)
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<command>-<preset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    _device(p)


def _settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=f"named settings: {', '.join(sorted(C.PRESETS))} (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, JSON value, repeatable (e.g. --set rl.steps=100)")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help=f"where the networks run: {', '.join(C.DEVICES)} (default auto: "
                                                   "a GPU if torch sees one); sets `device`, recorded in config.json")


def _device_override(args) -> list[str]:
    return [f"device={args.device}"] if getattr(args, "device", None) is not None else []


def _resolved(cfg: C.Config) -> C.Config:
    """`device` "auto" resolved to what this machine has, so config.json says where the run ran."""
    from .backends import resolve_device

    cfg.device = resolve_device(cfg.device)
    return cfg


def _sd(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, metavar="PATH",
                   help="a local diffusers folder as the base: a DDPMPipeline/DDIMPipeline (or unet/ + scheduler/) "
                        "of a UNet2DModel (sets `model`), or Stable Diffusion (docs/sd.md; default preset "
                        "sd_compress4; sets sd.model)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="SD prompts, one per line (default: 45 animals)")


def _model_kind(args) -> str | None:
    """None (the embedded digits), "unet2d" or "sd", from what --model's folder holds."""
    if getattr(args, "model", None) is None:
        return None
    from .backends.unet2d import model_kind

    return model_kind(args.model)


def _sd_overrides(args) -> list[str]:
    """--model / --prompts as config overrides (JSON strings, so any path stays a string)."""
    import json

    kind = _model_kind(args)
    if kind == "unet2d" and getattr(args, "prompts", None) is not None:
        raise CtrlDiffError("--prompts is for Stable Diffusion; a UNet2DModel's c is a class index (--c)")
    pairs = [("model" if kind == "unet2d" else "sd.model", getattr(args, "model", None)),
             ("sd.prompts", getattr(args, "prompts", None))]
    return [f"{k}={json.dumps(str(v))}" for k, v in pairs if v is not None]


def _report(p: argparse.ArgumentParser) -> None:
    from .tracking import REPORT_TO

    p.add_argument("--report-to", choices=REPORT_TO, default=None,
                   help="also log the metrics, the config and sample grids to an experiment tracker (an optional "
                        "extra: pip install 'ctrldiff[tensorboard]'); default none, or with --resume the run's own")


def _pairs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=Path, metavar="PATH",
                   help="labelled pairs (x, y) defining a new control (with --control): a folder with one "
                        "sub-folder per class, a CSV file,label (or a folder with labels.csv), or an .npz / "
                        ".safetensors with x (uint8 images) and y")
    p.add_argument("--classes", metavar="A,B,...",
                   help="with --pairs: the class names of integer labels 0..K-1 (fixing K), or the order of text labels")
    p.add_argument("--oracle", metavar="NAME=MODULE:FUNCTION",
                   help="with --pairs: a Python labeller (images in [0, 1] -> labels) used as the control's oracle")


def _control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="NAME",
                   help="the one control to use (sets rl.controls to {NAME: gamma}, gamma the preset's unless "
                        "rl.controls names it): built in, defined by --pairs, or by the --classifiers run")


def _resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint (same --preset/--set, or none)")


INPUTS = "inputs.json"  # in a run folder: the command's arguments that are not config, for --resume
RESUMED = {"method": str, "classifiers": Path, "base": Path, "pairs": Path, "control": str, "classes": str,
           "oracle": str}  # those arguments, by type


def _inputs(args) -> dict:
    """The arguments of RESUMED this command was given (paths absolute, so a resume may run from elsewhere)."""
    given = {k: getattr(args, k, None) for k in RESUMED}
    return {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in given.items() if v is not None}


def _recall(args) -> None:
    """--resume: the arguments the run recorded (inputs.json) stand in for those not given again; one given
    again must be the one recorded (a run with other classifiers, pairs or method would not be this run)."""
    from .io import read_json

    path = args.resume / INPUTS
    if not path.is_file():  # a run from before inputs.json: what is given is used as it is
        return
    recorded = read_json(path)
    if not isinstance(recorded, dict) or any(k not in RESUMED or not isinstance(v, str) for k, v in recorded.items()):
        raise CtrlDiffError(f"{path} is damaged: expected {{argument: text}} for arguments among {sorted(RESUMED)}")
    given = _inputs(args)
    for key, kind in RESUMED.items():
        if key in given and given[key] != recorded.get(key):
            was = f"--{key} {recorded[key]}" if key in recorded else f"no --{key}"
            raise CtrlDiffError(f"--resume {args.resume}: the run was started with {was}, not --{key} {given[key]}; "
                                f"drop --{key} (a resume reuses the run's own)")
        if key in recorded:
            setattr(args, key, kind(recorded[key]))


def _cfg(args) -> C.Config:
    resume = getattr(args, "resume", None)
    if resume is not None:
        _recall(args)
    if resume is not None and args.preset is None and not args.overrides:  # the run's own settings
        from .runs import read_config

        return _resolved(read_config(resume))
    default = "sd_compress4" if _model_kind(args) == "sd" else "default"
    cfg = _resolved(C.apply_overrides(C.preset(args.preset or default),
                                      [*args.overrides, *_device_override(args), *_sd_overrides(args)]))
    name = getattr(args, "control", None)
    if name is not None:
        cfg.rl.controls = {name: cfg.rl.controls.get(name, next(iter(cfg.rl.controls.values()), 10.0))}
    if cfg.name.startswith("sd_") and cfg.sd.model is None:
        raise CtrlDiffError(f"preset {cfg.name!r} is for Stable Diffusion: pass --model PATH (a local diffusers folder)")
    return cfg


def _out(args, command: str) -> Path:
    return args.out or Path("runs") / f"{command}-{args.preset or 'default'}"


def _run(args, command: str, cfg: C.Config):
    """The run folder: a new one, or with --resume the interrupted one (its checkpoints say where to go on)."""
    from .io import write_json
    from .runs import Run

    if getattr(args, "resume", None) is None:
        run = Run(_out(args, command), cfg, args.overwrite, report_to=args.report_to)
        write_json(run.path(INPUTS), _inputs(args))
        return run
    if args.out is not None or args.overwrite:
        raise CtrlDiffError("--resume continues a run in its own folder; drop --out and --overwrite")
    return Run(args.resume, cfg, resume=True, report_to=args.report_to)


def cmd_pretrain(args) -> None:
    from .io import save_weights
    from .pipeline import fit_digit_oracle
    from .pretrain import pretrain

    cfg = _cfg(args)
    run = _run(args, "pretrain", cfg)
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
    from .pairs import define, definition, image_shape, load_pairs, split_pairs
    from .tasks.controls import BUILTIN

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
    from .pairs import read_definitions

    was = read_definitions(run).get(made["name"], {})
    if was.get("sha256") not in (None, made["sha256"]):
        raise CtrlDiffError(f"--resume {run}: the pairs in {made['source']} changed since the run started (sha256 "
                            f"{was['sha256'][:12]}..., now {made['sha256'][:12]}...); restore them or start a new run")


def _check_digit_controls(cfg, backend, pairs: dict) -> None:
    """The built-in controls are fitted on the embedded digits: refused on a UNet2DModel base's images."""
    from .backends import PixelBackend
    from .pairs import image_shape
    from .tasks.controls import BUILTIN

    if isinstance(backend, PixelBackend) or cfg.sd.model is not None:
        return
    digits = [n for n in cfg.rl.controls if n not in pairs and n in BUILTIN]
    if digits:
        raise CtrlDiffError(f"control {digits[0]!r} is fitted on the embedded digits, not on this base's images "
                            f"{image_shape(backend)}; define one from your pairs: --pairs PATH --control NAME")


def cmd_classifier(args) -> None:
    from .pairs import save_definitions
    from .pipeline import backend_for, fit_reward_terms

    cfg = _cfg(args)
    if cfg.sd.model is not None and args.pairs is None:  # SD: pairs are labelled base samples, no noisy classifier
        from .sd_pipeline import clip_for, fit_sd_reward_terms, sd_backend

        backend = sd_backend(cfg)
        run = _run(args, "classifier", cfg)
        for name, r in fit_sd_reward_terms(backend, cfg, run, clip=clip_for(cfg, backend.device))[1].items():
            print(f"{name}: held-out accuracy {r['heldout']['accuracy']:.3f} (classes {r['class_counts']})")
        print(f"wrote {run.dir}/")
        return
    backend = backend_for(cfg)
    pairs = _user_pairs(args, cfg, backend)
    _check_digit_controls(cfg, backend, pairs)
    run = _run(args, "classifier", cfg)
    save_definitions(run.dir, pairs)  # before any work: a resume checks its pairs against it
    _, reports = fit_reward_terms(cfg, run, noisy=cfg.sd.model is None, pairs=pairs)  # SD: x_t are latents
    for name, r in reports.items():
        h = r["heldout"]
        noisy = ", ".join(f"{k} {v:.2f}" for k, v in r.get("noise_aware_heldout_accuracy", {}).items())
        print(f"{name}: held-out accuracy {h['accuracy']:.3f}, ECE {h['ece_raw']:.3f} -> {h['ece_calibrated']:.3f} "
              f"(T = {r['temperature']:.3f})" + (f"; noise-aware classifier at {noisy}" if noisy else ""))
    print(f"wrote {run.dir}/")


def _finetune(cfg, run, classifiers: Path | None, base: Path | None, backend=None, pairs: dict | None = None):
    from .pairs import save_definitions
    from .pipeline import backend_for, fit_reward_terms, load_reward_terms, run_finetune

    backend = backend or backend_for(cfg, base)
    save_definitions(run.dir, pairs or {})  # before any work: a resume checks its pairs against it
    terms = load_reward_terms(cfg, classifiers) if classifiers else fit_reward_terms(cfg, run, pairs=pairs)[0]
    return run_finetune(cfg, run, terms, backend)[0], backend, terms


def cmd_finetune(args) -> None:
    from .pairs import load_definitions
    from .pipeline import backend_for, check_finetune, controls_of, run_cfg_finetune

    cfg = _cfg(args)
    args.method = args.method or "ctrl"  # after _cfg: a resume reuses the run's own method
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
        run = _run(args, "finetune", cfg)
        _, summary = run_cfg_finetune(cfg, run, backend_for(cfg, args.base))
        print(f"wrote {run.path('cfg.safetensors')} ({summary['triplets']} triplets, {summary['seconds']:.0f} s)")
        return
    if cfg.sd.model is not None:  # Stable Diffusion through accelerate: only the main process writes the run
        from .sd_pipeline import finetune_sd

        check_finetune(cfg)
        finetune_sd(cfg, lambda: _run(args, "finetune", cfg), args.classifiers)
        print(f"wrote {_out(args, 'finetune') if args.resume is None else args.resume}/ctrl.safetensors")
        return
    backend = backend_for(cfg, args.base)
    pairs = _user_pairs(args, cfg, backend)
    _check_digit_controls(cfg, backend, pairs)
    check_finetune(cfg)
    run = _run(args, "finetune", cfg)
    _finetune(cfg, run, args.classifiers, args.base, backend, pairs)
    print(f"wrote {run.path('ctrl.safetensors')} and {run.path('curves.png')}")


def _parse_knobs(items: list[str]) -> dict:
    import json

    knobs = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CtrlDiffError(f"--knob {item!r} is not of the form key=value")
        try:
            knobs[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise CtrlDiffError(f"--knob {item!r}: the value must be a number") from None
    return knobs


def _method(args, cfg):
    """The backend and the requested method, with cfg.rl.controls set to the controls it samples."""
    from .io import load_weights
    from .methods import check_knobs
    from .pairs import define, load_definitions
    from .pipeline import backend_for, method_for

    knobs = _parse_knobs(args.knobs)
    check_knobs(args.method, knobs)  # fail before loading anything
    load_definitions(args.classifiers)
    if args.ckpt is not None:
        if args.method not in ("ctrl", "cfg", "ctrl_smc"):
            raise CtrlDiffError(f"--ckpt is for --method ctrl, ctrl_smc or cfg, not {args.method!r}")
        meta = load_weights(args.ckpt)[1]  # checked against its sha256 before anything in it is used
        if meta.get("resolution", cfg.data.resolution) != cfg.data.resolution:
            raise CtrlDiffError(f"{args.ckpt} was fine-tuned at resolution {meta['resolution']}, the config asks "
                                f"{cfg.data.resolution}; pass the matching --preset")
        gammas = meta.get("gammas", cfg.rl.controls)  # the gammas it was fine-tuned with (older checkpoints: config's)
        cfg.rl.controls = {k: gammas.get(k, 0.0) for k in meta.get("controls", {})}
        for definition in meta.get("defined_controls", {}).values():  # controls defined by pairs
            define(definition)
    backend = backend_for(cfg, args.base)
    return method_for(cfg, args.method, backend, knobs, args.ckpt, args.classifiers), backend


def cmd_sample(args) -> None:
    import torch

    from .conditions import balanced_conditions
    from .contracts import Cond
    from .evaluate import generate
    from .io import save_weights
    from .pipeline import controls_of, grid_of
    from .plots import save_grid
    from .runs import Run
    from .tasks.controls import get_control

    cfg = _cfg(args)
    method, backend = _method(args, cfg)
    controls = controls_of(cfg)
    ks = {c.name: c.num_classes for c in controls}
    if args.y or args.c is not None:  # one condition, n samples
        if args.n < 1:
            raise CtrlDiffError(f"-n {args.n}: ask for at least one sample")
        y = {}
        for item in args.y:
            name, _, v = item.partition("=")
            ctl = get_control(name)
            if name not in ks:
                raise CtrlDiffError(f"control {name!r} is not sampled here; choose from {sorted(ks)}")
            try:
                label = int(v)
            except ValueError:
                raise CtrlDiffError(f"--y {item!r}: the label must be an integer in 0..{ctl.num_classes - 1}") from None
            y[name] = ctl.check_labels(torch.full((args.n,), label))
        if method.name not in ("base", "ctrl", "cfg") and set(y) != set(ks):
            raise CtrlDiffError(f"method {method.name!r} needs a label for every control: pass --y for {sorted(ks)}")
        if args.c is not None and not getattr(backend, "conditional", True):
            raise CtrlDiffError(f"--c {args.c}: the base model is unconditional (it has no c); drop --c")
        if args.c is not None and not 0 <= args.c < backend.num_c:
            raise CtrlDiffError(f"c={args.c} is outside 0..{backend.num_c - 1}")
        if args.c is not None:
            c = torch.full((args.n,), args.c)
        elif getattr(backend, "has_null_c", True):
            c = torch.full((args.n,), backend.num_c)  # the null c: the base's unconditional model
        else:  # no null class (a diffusers class table): the n samples cycle through the classes
            c = torch.arange(args.n) % backend.num_c
        cond = Cond(c, y)
    else:  # the grid: rows = joint y, columns = c
        cond = balanced_conditions(backend.num_c * int(torch.tensor(list(ks.values())).prod()), backend.num_c, ks)
    run = Run(_out(args, "sample"), cfg, args.overwrite)  # only once the request is valid
    images, _, cost = generate(method, backend, cond, cfg, cfg.seed)
    save_weights(run.path("samples.safetensors"), {"images": images, "c": cond.c, **{f"y.{k}": v for k, v in cond.y.items()}},
                 {"kind": "samples", "method": method.name, "knobs": method.knobs, "cost_per_sample": cost})
    if args.y or args.c is not None:
        cols = min(args.n, 8)
        rows = -(-args.n // cols)
        pad = torch.ones((rows * cols - args.n, *images.shape[1:]))
        save_grid(torch.cat([images, pad]), rows, cols, run.path("samples.png"))
    else:
        save_grid(*grid_of(images, cond, controls, backend.num_c), run.path("samples.png"))
    passes = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in cost.items() if k != "seconds")
    print(f"{len(images)} samples by {method.name} {method.knobs} in {cost['seconds'] * len(images):.1f} s "
          f"(per sample: {passes}) -> {run.path('samples.png')}")


def cmd_evaluate(args) -> None:
    from .pairs import load_definitions, monitor_judged
    from .pipeline import backend_for, load_reward_terms, run_evaluate
    from .runs import Run

    cfg = _cfg(args)
    if args.method == "target":  # no sampler of its own: importance sampling over the bank (ctrldiff/target.py)
        if args.classifiers is None or args.ckpt is not None or args.knobs:
            raise CtrlDiffError("method 'target' takes --classifiers (the reward classifiers whose p_gamma it "
                                "estimates, gammas from rl.controls) and no --ckpt or --knob")
        load_definitions(args.classifiers)
        methods, backend = [], backend_for(cfg, args.base)
    else:
        method, backend = _method(args, cfg)
        methods = [method]
    terms = None  # the reward classifiers: the target's row, J and log Z - J beside the methods
    if args.classifiers is not None and args.method in ("target", "ctrl", "cfg", "ctrl_smc"):
        if cfg.sd.model is not None:
            raise CtrlDiffError("the target's bank of base samples is not built for Stable Diffusion here; "
                                "evaluate --model without --classifiers")
        terms = load_reward_terms(cfg, args.classifiers)
    # a control with no oracle is judged by its independent monitor classifier
    judged = [n for n in cfg.rl.controls if monitor_judged(n, args.classifiers).judge == "monitor"]
    run = Run(_out(args, "evaluate"), cfg, args.overwrite)
    run_evaluate(cfg, run, methods, backend, terms=terms)
    print((run.path("metrics.md")).read_text())
    if judged:
        print(f"{', '.join(judged)}: no oracle; accuracy judged by the independent monitor classifier")


def cmd_export_digits(args) -> None:
    from .pairs import export_digits
    from .tasks.controls import get_control

    cfg = _cfg(args)
    out = _out(args, "export-digits")
    counts = export_digits(out, get_control(args.control), args.n, cfg, args.overwrite)
    print(f"wrote {args.n} PNGs to {out}/ ({', '.join(f'{k}: {v}' for k, v in counts.items())})")


def cmd_export(args) -> None:
    import shlex

    from .export import export

    flags = [*(w for y in args.y for w in ("--y", y)), *(["--all-y"] if args.all_y else []),
             *(["--preset", args.preset] if args.preset else []), *(w for o in args.overrides for w in ("--set", o))]
    command = shlex.join(["ctrldiff", "export", "--model", str(args.model), "--ckpt", str(args.ckpt), *flags,
                          "--out", str(args.out)])
    info = export(args.ckpt, args.model, args.out, args.y, args.all_y, _cfg(args), args.overwrite, command)
    print(f"wrote {args.out}/: a {info['pipeline']} ({args.out}/README.md says how to sample it)")


def cmd_demo(args) -> None:
    from .demo import default_jobs, run_preset, run_side_by_side
    from .pipeline import check_finetune

    root = args.out or Path("runs") / "demo"
    if len(set(args.presets)) < len(args.presets):
        raise CtrlDiffError(f"demo --presets {' '.join(args.presets)}: each preset once (it names its run folder)")
    cfgs = {name: _resolved(C.apply_overrides(C.preset(name), [*args.overrides, *_device_override(args)]))
            for name in args.presets}
    for name, cfg in cfgs.items():
        check_finetune(cfg)
        folder = root / name
        if folder.exists() and any(folder.iterdir()) and not args.overwrite:  # before any preset starts
            raise CtrlDiffError(f"run folder {folder} already exists; pass --overwrite or choose another --out")
    if args.report_to not in (None, "none"):  # a tracker that is not installed: one line, before any worker
        from .tracking import trackers_for

        trackers_for(args.report_to)
    jobs = default_jobs(cfgs) if args.jobs is None else args.jobs
    if jobs < 1:
        raise CtrlDiffError(f"demo --jobs {jobs}: at least 1 (1 runs the presets in turn in this process)")
    if jobs > 1:  # asked for, or more than one preset on a multi-core CPU
        tables = run_side_by_side(cfgs, root, args.overwrite, args.report_to, min(jobs, len(cfgs)))
    else:
        tables = []
        for name, cfg in cfgs.items():
            print(f"== {name}: classifier -> CTRL fine-tune -> sample -> evaluate  ({root / name}/)")
            tables.append(run_preset(name, cfg, root, args.overwrite, args.report_to))
    print("\n" + "\n".join(tables))


def cmd_bench(args) -> None:
    from .bench import rewrite_report, run_bench

    out = args.out or Path("runs") / ("bench-quick" if args.quick else "bench")
    if args.report_only:
        rewrite_report(out, args.docs)
        print(f"rewrote {(args.docs or out / 'docs') / 'benchmarks.md'} from {out / 'bench.json'}")
        return
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise CtrlDiffError(f"run folder {out} already exists; pass --resume, --overwrite or choose another --out")
    if args.overwrite and args.resume:
        raise CtrlDiffError("bench: --resume keeps what a run in --out finished, --overwrite redoes it; pass one")
    docs = args.docs or out / "docs"
    results = run_bench("quick" if args.quick else "full", out, docs, report_to=args.report_to or "none",
                        resume=args.resume)
    print(f"wrote {docs / 'benchmarks.md'} and {docs / 'figures'}/ in {results['seconds'] / 60:.1f} min "
          f"(peak memory {results['peak_rss_gb']:.2f} GiB)")


def _one_line(message: str) -> str:
    """Errors quote user input; a newline (or any other control character) in it must not split the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), like every other ctrldiff error; subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctrldiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train the class-conditional base p_pre(x|c) and the digit oracle")
    _common(p)
    _resume(p)
    _report(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("classifier", help="fit and calibrate p̂(y|x) on pairs for each control (+ a monitor)")
    _common(p)
    _resume(p)
    _report(p)
    _sd(p)
    _pairs(p)
    _control(p)
    p.set_defaults(fn=cmd_classifier)

    p = sub.add_parser("finetune", help="CTRL: KL-regularised RL fine-tuning of the augmented model "
                                        "(or, --method cfg, the CFG baseline on triplets)")
    _common(p)
    p.add_argument("--method", help="ctrl (pairs, RL; default) or cfg (triplets, score matching)")
    p.add_argument("--classifiers", type=Path, help="a `ctrldiff classifier` run folder (default: fit them here)")
    p.add_argument("--base", type=Path, help="base checkpoint (default: the one shipped for the resolution)")
    _resume(p)
    _report(p)
    _sd(p)
    _pairs(p)
    _control(p)
    p.set_defaults(fn=cmd_finetune)

    methods = "base, ctrl, cfg, dps, classifier, mpgd, smc, svdd, best_of_n, ctrl_smc (evaluate: also target)"
    for name, fn, text in [("sample", cmd_sample, "sample with a method (grid rows = y, columns = c)"),
                           ("evaluate", cmd_evaluate, "evaluate a method and the base against the oracles")]:
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--method", default="ctrl", help=f"one of {methods} (default ctrl)")
        p.add_argument("--knob", dest="knobs", action="append", default=[], metavar="KEY=VALUE",
                       help="a knob of the method, repeatable (e.g. --knob w=2); see docs/baselines.md")
        p.add_argument("--ckpt", type=Path, help="checkpoint of `ctrldiff finetune` (methods ctrl, cfg, ctrl_smc)")
        p.add_argument("--classifiers", type=Path, help="`ctrldiff classifier` run folder (guidance methods; with "
                       "evaluate --method ctrl/cfg/target: the target p_gamma of these classifiers beside the base)")
        p.add_argument("--base", type=Path, help="base checkpoint (default: the one shipped)")
        _sd(p)
        _control(p)
        if name == "sample":
            p.add_argument("--y", action="append", default=[], metavar="CONTROL=LABEL", help="fix a control's label")
            p.add_argument("--c", type=int, help="fix the base's condition c (a digit, a class, a prompt index)")
            p.add_argument("-n", type=int, default=16, help="samples when --y/--c fix the condition")
        p.set_defaults(fn=fn)

    p = sub.add_parser("bench", help="every method on compress4 and the 2x2 task, sample efficiency, the gamma "
                                     "sweep, sample grids: benchmarks.md + figures")
    p.add_argument("--quick", action="store_true", help="a smoke run on tiny sizes (minutes; numbers meaningless)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/bench or runs/bench-quick)")
    p.add_argument("--docs", type=Path, default=None,
                   help="where benchmarks.md (section `bench`) and figures/ go (default <out>/docs; the "
                        "repository's docs/ are written by `ctrldiff bench --docs docs`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted bench in --out: stages finished under the same configs (classifiers, "
                        "fine-tunes, measurements) are reused, unfinished fine-tunes continue from their checkpoints")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite benchmarks.md from a finished run's bench.json and figures (nothing is re-run)")
    _report(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("export-digits", help="write training digits as PNGs, one sub-folder per class of a "
                                             "built-in control: pairs on disk to try --pairs with")
    _common(p)
    p.add_argument("--control", default="thickness2", help="the built-in control whose labels name the "
                                                           "sub-folders (default thickness2: thin/, thick/)")
    p.add_argument("-n", type=int, default=1000, help="digits to write (a subset drawn by `seed`; default 1000)")
    p.set_defaults(fn=cmd_export_digits)

    p = sub.add_parser("export", help="a fine-tuned model as a standard diffusers pipeline folder (LoRA merged, "
                                      "the control folded in) that samples without ctrldiff")
    p.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="the local diffusers folder it was fine-tuned on: a UNet2DModel pipeline or Stable Diffusion")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint of `ctrldiff finetune` (ctrl.safetensors)")
    p.add_argument("--y", action="append", default=[], metavar="CONTROL=LABEL",
                   help="the class of a control, repeatable (a control left out is null): a plain UNet")
    p.add_argument("--all-y", action="store_true",
                   help="every (c, y) in the UNet's class table, through class_labels (UNet2DModel bases)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the pipeline folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    _settings(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("demo", help="classifier -> CTRL -> sample -> evaluate for compress4 and the 2x2 task")
    p.add_argument("--presets", nargs="+", default=["default", "multi"], help="presets to run (each once)")
    p.add_argument("--jobs", type=int, default=None,
                   help="presets run side by side, each in its own process with its share of the CPU cores "
                        "(default: one per preset up to the cores; on a GPU 1); 1 runs them in turn here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override applied to every preset")
    p.add_argument("--out", type=Path, default=None, help="demo folder (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace existing run folders")
    _device(p)
    _report(p)
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (CtrlDiffError, OSError) as e:  # OSError: disk full, unwritable --out (earlier files stay intact)
        print(f"ctrldiff: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
