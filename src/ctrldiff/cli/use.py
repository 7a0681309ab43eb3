"""`ctrldiff sample | evaluate | export-digits | export`: the commands that use what was trained."""

from __future__ import annotations

from ..io import CtrlDiffError
from .options import config_of, out_of


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
    from ..definitions import define, load_definitions
    from ..io import load_weights
    from ..methods import check_knobs
    from ..pipeline import backend_for, method_for

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

    from ..conditions import balanced_conditions
    from ..contracts import Cond
    from ..evaluate import generate
    from ..io import save_weights
    from ..pipeline import controls_of
    from ..plots import grid_of, save_grid
    from ..runs import Run
    from ..tasks.controls import get_control

    cfg = config_of(args)
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
    run = Run(out_of(args, "sample"), cfg, args.overwrite)  # only once the request is valid
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
    from ..definitions import load_definitions, monitor_judged
    from ..pipeline import backend_for, load_reward_terms, run_evaluate
    from ..runs import Run

    cfg = config_of(args)
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
    run = Run(out_of(args, "evaluate"), cfg, args.overwrite)
    run_evaluate(cfg, run, methods, backend, terms=terms)
    print((run.path("metrics.md")).read_text())
    if judged:
        print(f"{', '.join(judged)}: no oracle; accuracy judged by the independent monitor classifier")

def cmd_export_digits(args) -> None:
    from ..pairs import export_digits
    from ..tasks.controls import get_control

    cfg = config_of(args)
    out = out_of(args, "export-digits")
    counts = export_digits(out, get_control(args.control), args.n, cfg, args.overwrite)
    print(f"wrote {args.n} PNGs to {out}/ ({', '.join(f'{k}: {v}' for k, v in counts.items())})")

def cmd_export(args) -> None:
    import shlex

    from ..export import export

    flags = [*(w for y in args.y for w in ("--y", y)), *(["--all-y"] if args.all_y else []),
             *(["--preset", args.preset] if args.preset else []), *(w for o in args.overrides for w in ("--set", o))]
    command = shlex.join(["ctrldiff", "export", "--model", str(args.model), "--ckpt", str(args.ckpt), *flags,
                          "--out", str(args.out)])
    info = export(args.ckpt, args.model, args.out, args.y, args.all_y, config_of(args), args.overwrite, command)
    print(f"wrote {args.out}/: a {info['pipeline']} ({args.out}/README.md says how to sample it)")
