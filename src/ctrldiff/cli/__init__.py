"""ctrldiff command line: demo | pretrain | classifier | finetune | sample | evaluate | bench | export-digits |
export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bench.grid import PARTS
from ..io import CtrlDiffError
from .options import (
    add_common,
    add_control,
    add_device,
    add_pairs,
    add_report,
    add_resume,
    add_sd,
    add_settings,
)
from .studies import cmd_bench, cmd_demo
from .train import cmd_classifier, cmd_finetune, cmd_pretrain
from .use import cmd_evaluate, cmd_export, cmd_export_digits, cmd_sample


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
    add_common(p)
    add_resume(p)
    add_report(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("classifier", help="fit and calibrate p̂(y|x) on pairs for each control (+ a monitor)")
    add_common(p)
    add_resume(p)
    add_report(p)
    add_sd(p)
    add_pairs(p)
    add_control(p)
    p.set_defaults(fn=cmd_classifier)

    p = sub.add_parser("finetune", help="CTRL: KL-regularised RL fine-tuning of the augmented model "
                                        "(or, --method cfg, the CFG baseline on triplets)")
    add_common(p)
    p.add_argument("--method", help="ctrl (pairs, RL; default) or cfg (triplets, score matching)")
    p.add_argument("--classifiers", type=Path, help="a `ctrldiff classifier` run folder (default: fit them here)")
    p.add_argument("--base", type=Path, help="base checkpoint (default: the one shipped for the resolution)")
    add_resume(p)
    add_report(p)
    add_sd(p)
    add_pairs(p)
    add_control(p)
    p.set_defaults(fn=cmd_finetune)

    methods = "base, ctrl, cfg, dps, classifier, mpgd, smc, svdd, best_of_n, ctrl_smc (evaluate: also target)"
    for name, fn, text in [("sample", cmd_sample, "sample with a method (grid rows = y, columns = c)"),
                           ("evaluate", cmd_evaluate, "evaluate a method and the base against the oracles")]:
        p = sub.add_parser(name, help=text)
        add_common(p)
        p.add_argument("--method", default="ctrl", help=f"one of {methods} (default ctrl)")
        p.add_argument("--knob", dest="knobs", action="append", default=[], metavar="KEY=VALUE",
                       help="a knob of the method, repeatable (e.g. --knob w=2); see docs/baselines.md")
        p.add_argument("--ckpt", type=Path, help="checkpoint of `ctrldiff finetune` (methods ctrl, cfg, ctrl_smc)")
        p.add_argument("--classifiers", type=Path, help="`ctrldiff classifier` run folder (guidance methods; with "
                       "evaluate --method ctrl/cfg/target: the target p_gamma of these classifiers beside the base)")
        p.add_argument("--base", type=Path, help="base checkpoint (default: the one shipped)")
        add_sd(p)
        add_control(p)
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
                   help="rewrite benchmarks.md from a finished run's json and figures (nothing is re-run)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None, metavar="PART",
                   help=f"run only these parts ({', '.join(PARTS)}; default all): their models are the whole bench's "
                        "(--resume reuses them), their report a section of its own (`bench-<parts>`)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="each part's seeds (default the bench's own: 0 1 2 for compress4, 0 for the 2x2 task, "
                        "0 1 for sample efficiency)")
    p.add_argument("--jobs", type=int, default=None,
                   help="train every model first, this many at a time in worker processes with a share of the "
                        "CPU cores each, then measure alone (default: one per core; on a GPU 1); 1 trains and "
                        "measures in turn in this process")
    add_report(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("export-digits", help="write training digits as PNGs, one sub-folder per class of a "
                                             "built-in control: pairs on disk to try --pairs with")
    add_common(p)
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
    add_settings(p)
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
    add_device(p)
    add_report(p)
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
