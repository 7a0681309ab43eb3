"""Does CTRL reach its target? The fine-tune's distance to its optimum (log Z - J, over every request) by
capacity, chain length, estimator and budget (issue 26), each part writing its section of docs/tuning.md.

    python benchmarks/convergence.py floor       # rows of FLOOR: capacity, chain, estimator, steps
    python benchmarks/convergence.py tune        # rows of TUNE: rates, batch and steps around the best floor row
    python benchmarks/convergence.py step-time   # seconds per optimiser step by estimator and adapter (2 threads)
    python benchmarks/convergence.py own         # the defaults on a control of our own, defined by pairs on disk

Every row fine-tunes on the same reward classifiers (`--classifiers`, a `ctrldiff classifier` run; default
runs/clf-c4 for compress4 and runs/clf-multi for the 2x2 task), so rows differ only by the fine-tune, and is
evaluated as `ctrldiff evaluate` does: the target's yardstick beside base and CTRL (ctrldiff/target.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from _doc import ROOT, machine
from _tasks import acc, gap_trend, run_tasks, task_main

from ctrldiff import config as C
from ctrldiff.io import write_section
from ctrldiff.pipeline import backend_for, load_reward_terms

TUNING_MD = ROOT / "docs" / "tuning.md"
CLASSIFIERS = {"default": Path("runs/clf-c4"), "multi": Path("runs/clf-multi")}

# (label, preset, overrides); a row's index names its run folder, so rows are only ever appended
LR3 = ["rl.lr_lora=3e-3"]  # the LoRA rate of the rows measured before TUNE row 0 made 1e-2 the default
B32 = ["rl.batch=32"]  # the batch of the rows measured before TUNE rows 8-9 made 16 x 400 the default
OLD = [*B32, "rl.steps=200"]  # and their steps, where the row does not set its own
R4 = ["rl.lora_rank=4", *LR3]  # the floor's reference is the old default, rank 4 (the default is 16 since this table)
FLOOR = [
    ("rank 4, backprop, 20-step chain, 200 steps (the old default)", "default", [*R4, *OLD]),
    ("rank 16", "default", ["rl.lora_rank=16", *LR3, *OLD]),
    ("rank 64", "default", ["rl.lora_rank=64", *LR3, *OLD]),
    ("full network, lr 3e-4", "default", ["rl.adapter=full", "rl.lr_lora=3e-4", *OLD]),
    ("40-step chain", "default", [*R4, "sampler.steps=40", *OLD]),
    ("adjoint", "default", [*R4, "rl.estimator=adjoint", *OLD]),
    ("adjoint, rank 16", "default", ["rl.estimator=adjoint", "rl.lora_rank=16", *LR3, *OLD]),
    ("400 steps", "default", [*R4, "rl.steps=400", *B32]),
    ("adjoint, 4 updates per rollout", "default", [*R4, "rl.estimator=adjoint", "rl.adjoint_updates=4", *OLD]),
    ("adjoint, rank 16, 4 updates per rollout", "default", ["rl.estimator=adjoint", "rl.lora_rank=16",
                                                            "rl.adjoint_updates=4", *LR3, *OLD]),
]
TUNE = [  # around the new default (rank 16, the floor table's best at the old step time): rates, batch, steps
    ("rank 16, LoRA lr 1e-2", "default", ["rl.lr_lora=1e-2", *OLD]),
    ("rank 16, embedding lr 0.3", "default", ["rl.lr_emb=0.3", *LR3, *OLD]),
    ("rank 16, batch 64, 100 steps", "default", ["rl.batch=64", "rl.steps=100", *LR3]),
    ("rank 16, 400 steps", "default", ["rl.steps=400", *LR3, *B32]),
    ("rank 16, seed 1", "default", ["seed=1", *LR3, *OLD]),  # is the LoRA-rate row's gain larger than a seed's spread?
    ("rank 16, LoRA lr 1e-2, seed 1", "default", ["rl.lr_lora=1e-2", "seed=1", *OLD]),
    # LoRA lr 1e-2 the default from here on
    ("rank 16, LoRA lr 1e-2, 400 steps", "default", ["rl.lora_rank=16", "rl.lr_lora=1e-2", "rl.steps=400", *B32]),
    ("rank 64, LoRA lr 1e-2", "default", ["rl.lora_rank=64", "rl.lr_lora=1e-2", *OLD]),
    ("rank 16, LoRA lr 1e-2, batch 16, 400 steps", "default", ["rl.lr_lora=1e-2", "rl.batch=16", "rl.steps=400"]),
    ("rank 16, LoRA lr 1e-2, batch 16, 400 steps, seed 1", "default",
     ["rl.lr_lora=1e-2", "rl.batch=16", "rl.steps=400", "seed=1"]),
    # batch 16 x 400 steps the default from here on
    ("rank 16, LoRA lr 1e-2, batch 8, 800 steps", "default", ["rl.batch=8", "rl.steps=800"]),
    ("rank 16, LoRA lr 1e-2, batch 8, 800 steps, seed 1", "default", ["rl.batch=8", "rl.steps=800", "seed=1"]),
    ("rank 16, LoRA lr 1e-2, batch 16, 400 steps, seed 2", "default", ["seed=2"]),  # the defaults' third seed
    ("rank 16, LoRA lr 1e-2, 400 steps, seed 1", "default", [*B32, "rl.steps=400", "seed=1"]),
    ("rank 16, LoRA lr 2e-2", "default", ["rl.lr_lora=2e-2"]),  # still learning at the end: a faster rate?
    ("rank 16, LoRA lr 2e-2, seed 1", "default", ["rl.lr_lora=2e-2", "seed=1"]),
    # rank and rate are one knob (rank 64 at 1e-2 overshoots): rank 64's capacity at rank 16 x 1e-2's step size
    ("rank 64, LoRA lr 3e-3, batch 16, 400 steps", "default", ["rl.lora_rank=64", "rl.lr_lora=3e-3"]),
    ("rank 64, LoRA lr 3e-3, batch 16, 400 steps, seed 1", "default", ["rl.lora_rank=64", "rl.lr_lora=3e-3", "seed=1"]),
]


def _command(part: str) -> str:
    return " ".join(["python benchmarks/convergence.py", part, *sys.argv[2:]])


def row_line(label: str, r: dict) -> str:
    """One table row: cost, the oracle's and the monitor's verdicts, and the meter on trusted and all requests."""
    c, t = r["results"]["ctrl"], r["results"]["target"]
    tr, al = c["yardstick"]["trusted"], c["yardstick"]["all"]
    rl = r["config"]["rl"]
    steps, adapter = rl["steps"], (f"rank {rl['lora_rank']}" if rl["adapter"] == "lora" else rl["adapter"])
    sec = r["step_seconds"]
    per_step = (sec[-1] - sec[2]) / (len(sec) - 3) if len(sec) > 3 else float("nan")
    return (f"| {label} | {adapter}, {rl['lr_lora']:g} | {per_step:.2f} | {r['finetune_seconds']:.0f} | "
            f"{r['peak_rss_gb']:.2f} | "
            f"{acc(c):.3f} / {acc(t):.3f} | {c.get('monitor_accuracy', float('nan')):.3f} | "
            f"{c['trusted']['accuracy']:.3f} / {t['trusted']['accuracy']:.3f} | {c['digit_fidelity']:.3f} / "
            f"{t['digit_fidelity']:.3f} | {c['feature_fid'] / t['feature_fid']:.2f} | "
            f"{tr['gap']:.2f} ± {tr['gap_se']:.2f} ({tr['requests']}) | {al['gap']:.2f} ± {al['gap_se']:.2f} "
            f"({al['flagged']} flagged) | {gap_trend(r['gap_all_curve'])} | {steps} |")


HEAD = ("| row | adapter, LoRA lr | s / step | fine-tune s | peak GiB | acc, CTRL / target | monitor acc | acc on trusted requests, "
        "CTRL / target | digit fidelity, CTRL / target | FID / target's | log Z − J, trusted (requests) | "
        "log Z − J, all requests | meter over training (all requests) | steps |")


def part_rows(args, rows: list, section: str, title: str) -> None:
    t0 = time.time()
    picked = range(len(rows)) if args.pick is None else args.pick
    jobs = [(rows[i][1], [*args.overrides, *rows[i][2]], args.out / f"{i:02d}-{rows[i][1]}") for i in picked]
    extra = ["--classifiers", str(args.classifiers)] if args.classifiers else []
    reused = sum((out / "result.json").is_file() for _, _, out in jobs)  # run_tasks keeps a finished row's result
    results = run_tasks(__file__, jobs, args.parallel, args.threads, extra)
    threads = f"{args.threads} thread(s) each" if args.parallel > 1 else "every thread"  # run_tasks' OMP_NUM_THREADS
    lines = [f"## {title}\n",
             (f"Produced by `{_command(args.part)}` on {machine()}, {time.strftime('%Y-%m-%d')}; "
              + (f"{(time.time() - t0) / 60:.0f} min for {len(jobs) - reused} rows, " if reused < len(jobs) else "")
              + f"{reused} re-tabulated from an earlier run's result.json ({args.parallel} runs at a time, {threads}: "
              "the seconds are under that load, `step-time` gives them alone). Each row fine-tunes CTRL on the "
              "same reward classifiers (γ = 10) and is evaluated as `ctrldiff evaluate --classifiers` does: "
              "128 samples per class for accuracy, fidelity and feature-FID, and "
              f"{results[0]['config']['target']['paths']} meter paths per request for log Z − J = KL(P_θ ‖ P*) "
              "(nats, ± Monte-Carlo error): on the requests the bank trusts (its log Z), and on all 40 (log Z the "
              "larger of the bank's and the path weights' estimate; flagged: both ESS small, the gap there a lower "
              "bound). The meter over training is `gap_all` (every request), mean of each fifth of the steps.\n"),
             HEAD, "|---" * 14 + "|"]
    lines += [row_line(rows[i][0], r) for i, r in zip(picked, results)]
    write_section(TUNING_MD, section, "\n".join(lines))
    print("\n".join(lines))


def part_step_time(args) -> None:
    """Seconds per optimiser step (steps 3-10 of a short fine-tune, this process's threads) of each estimator and
    adapter on the default preset, with classifiers from --classifiers."""
    base = C.apply_overrides(C.preset("default"), ["rl.monitor_every=0", "rl.steps=10", *B32, *args.overrides])
    terms = load_reward_terms(base, args.classifiers or CLASSIFIERS["default"])
    backend = backend_for(base)
    from ctrldiff.rl import finetune

    rows, load = [], os.getloadavg()[0]
    for label, ov in [("backprop, rank 4", ["rl.lora_rank=4"]), ("backprop, rank 16", ["rl.lora_rank=16"]),
                      ("backprop, rank 16, batch 16 (the default since)", ["rl.lora_rank=16", "rl.batch=16"]),
                      ("backprop, rank 64", ["rl.lora_rank=64"]),
                      ("backprop, full network", ["rl.adapter=full"]),
                      ("backprop, rank 4, 40-step chain", ["rl.lora_rank=4", "sampler.steps=40"]),
                      ("adjoint, rank 4", ["rl.lora_rank=4", "rl.estimator=adjoint"]),
                      ("adjoint, rank 4, 5 of 19 steps regressed", ["rl.lora_rank=4", "rl.estimator=adjoint",
                                                                   "rl.adjoint_steps=5"])]:
        recs = []
        finetune(backend, terms, C.apply_overrides(base, ov), log=recs.append, progress=False)
        sec = [r["seconds"] for r in recs]
        rows.append(f"| {label} | {(sec[-1] - sec[2]) / (len(sec) - 3):.2f} |")
        print(rows[-1], flush=True)
    lines = ["## Seconds per fine-tuning step, by estimator and adapter\n",
             (f"Produced by `{_command('step-time')}` on {machine()}, {torch.get_num_threads()} threads, "
              f"{time.strftime('%Y-%m-%d')}, load average {load:.1f} at the start (other jobs beside it). The default preset at batch 32 (unless the row "
              "says otherwise; 20 DDIM steps, the last taken by the base), steps 3-10 of a short fine-tune:\n"),
             "| estimator, adapter | s / step |", "|---|---|", *rows]
    write_section(TUNING_MD, "step-time-estimators", "\n".join(lines))
    print("\n".join(lines))


def part_own(args) -> None:
    """The defaults on a control none of them was tuned on, used as a user would: 3 slant classes
    (benchmarks/slant.py) as a folder of PNGs, the user's labeller as the oracle, the CLI's own commands."""
    import subprocess

    import slant
    from PIL import Image

    from ctrldiff.tasks.mnist import load_digits, to_unit

    out, t0 = args.out, time.time()
    pairs = out / "pairs"
    if not pairs.is_dir():  # 2,000 training digits as 16-px PNGs, one folder per class
        d = load_digits("train", 16, 1000, 0)
        images = to_unit(d.x[:2000])
        for i, (img, y) in enumerate(zip(images, slant.label(images))):
            folder = pairs / slant.CLASSES[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img[0].numpy() * 255).round().astype("uint8"), "L").save(folder / f"{i:04d}.png")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    sets = [x for o in args.overrides for x in ("--set", o)]
    commands = [
        ["classifier", "--pairs", str(pairs), "--control", "slant3", "--oracle", "slant3=slant:label",
         "--out", str(out / "clf")],
        ["finetune", "--classifiers", str(out / "clf"), "--control", "slant3", "--out", str(out / "ctrl"), *sets],
        ["evaluate", "--ckpt", str(out / "ctrl" / "ctrl.safetensors"), "--classifiers", str(out / "clf"),
         "--control", "slant3", "--out", str(out / "eval"), *sets]]
    seconds, peak = [], []
    for cmd in commands:
        t = time.time()
        subprocess.run([sys.executable, "-m", "ctrldiff.cli", *cmd, "--overwrite"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        seconds.append(time.time() - t)
        peak.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)  # KiB: the largest child so far
    results = json.loads((out / "eval" / "metrics.json").read_text())
    recs = [json.loads(x) for x in (out / "ctrl" / "metrics.jsonl").read_text().splitlines()]
    r = {"results": results, "finetune_seconds": seconds[1], "peak_rss_gb": peak[1],
         "gap_all_curve": [x["gap_all"] for x in recs if "gap_all" in x],
         "step_seconds": [x["seconds"] for x in recs if "seconds" in x],
         "config": json.loads((out / "ctrl" / "config.json").read_text())}
    lines = ["## The defaults on a control of our own (slant, 3 classes, from a folder of PNGs)\n",
             (f"Produced by `{_command('own')}` on {machine()}, {time.strftime('%Y-%m-%d')}; "
              f"{(time.time() - t0) / 60:.0f} min. 2,000 training digits labelled by their slant "
              "(benchmarks/slant.py: leaning left, upright, leaning right, the tertiles of the training digits) and "
              "written as PNGs, one folder per class; then, as a user would, `ctrldiff classifier --pairs ... "
              "--oracle slant3=slant:label`, `ctrldiff finetune --classifiers ...` and `ctrldiff evaluate --ckpt "
              f"... --classifiers ...` (seconds: {', '.join(f'{s:.0f}' for s in seconds)}; peak GiB: the larger of "
              "the classifier's and the fine-tune's). The oracle is the "
              "user's labeller; the target's columns come from the shipped bank.\n"),
             HEAD, "|---" * 14 + "|", row_line("defaults" + (f" ({', '.join(args.overrides)})" if args.overrides
                                                              else ""), r)]
    write_section(TUNING_MD, "ctrl-own-control", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["floor", "tune", "step-time", "own", "task"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preset", default="default", help=argparse.SUPPRESS)  # part "task" (internal)
    ap.add_argument("--classifiers", type=Path, default=None, help="a `ctrldiff classifier` run (default per preset)")
    ap.add_argument("--pick", nargs="*", type=int, default=None, help="the rows to run and tabulate (default all)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    args = ap.parse_args()
    args.out = args.out or Path("runs") / f"convergence-{args.part}"
    if args.part == "task":
        task_main(args, classifiers=args.classifiers or CLASSIFIERS[args.preset])
    elif args.part == "step-time":
        part_step_time(args)
    elif args.part == "own":
        part_own(args)
    else:
        rows, title = {"floor": (FLOOR, "Where is the floor? Capacity, chain, estimator and steps (issue 26)"),
                       "tune": (TUNE, "Tuning around the floor table's best row: rates, batch, steps (issue 26)")}[args.part]
        part_rows(args, rows, f"ctrl-{args.part}", title)


if __name__ == "__main__":
    main()
