"""The bench's warm-started gamma sweep against fine-tunes from scratch (docs/benchmarks.md, section gamma-warm).

`ctrldiff bench` fine-tunes each gamma besides the task's own (10) from that seed's gamma-10 CTRL model for
`BenchSize.gamma_steps` steps, instead of `rl.steps` from zero-initialised parameters. For each from-scratch run
given, this measures it and the bench's warm run of the same task, seed and gamma (same classifiers) at the
reported sample count: oracle accuracy, digit fidelity, feature-FID, path KL, the meter log Z - J at the end of
the fine-tune, and the fine-tune's steps and seconds.

    python benchmarks/gamma_warm.py runs/bench-v2 runs/gamma-scratch/compress4/g1 runs/gamma-scratch/compress4/g3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _doc import machine, write_section

from ctrldiff import bench
from ctrldiff import config as C
from ctrldiff.io import read_json, read_meta


def row(run: Path, classifiers: Path, env: dict) -> dict:
    """One CTRL fine-tune's numbers at its config's sample count (measurements cached under run/measured)."""
    cfg = C.from_dict(read_json(run / "config.json"))
    paths = {"classifiers": classifiers, "ctrl": run / "ctrl.safetensors", "measured": run / "measured"}
    m = bench.measure(cfg, paths, "ctrl", {"w": cfg.eval.guidance}, env, cfg.seed)[0]
    return bench.point("ctrl", {}, m, list(cfg.rl.controls)) | {
        "mean_kl": m["mean_kl"], "gap": bench.final_gap(run), "steps": cfg.rl.steps,
        "seconds": read_meta(paths["ctrl"])["summary"]}


def pair_of(out: Path, scratch: Path, ap: argparse.ArgumentParser) -> tuple[str, float, Path, Path]:
    """The task, gamma, seed folder and warm run that match a from-scratch run; a one-line error otherwise."""
    if not (scratch / "ctrl.safetensors").is_file():
        ap.error(f"{scratch} is no finished CTRL run (no ctrl.safetensors)")
    cfg = C.from_dict(read_json(scratch / "config.json"))
    task = next((t for t, c in bench.TASKS.items() if c.keys() == cfg.rl.controls.keys()), None)
    if task is None:
        ap.error(f"{scratch}: controls {sorted(cfg.rl.controls)} are no bench task's; choices: {sorted(bench.TASKS)}")
    gamma = next(iter(cfg.rl.controls.values()))
    warm = bench.gamma_dir(out, task, cfg.seed, gamma)
    if not (warm / "ctrl.safetensors").is_file():
        ap.error(f"{warm}: no warm run of {task} at gamma {gamma:g} (run `ctrldiff bench --out {out}` first)")
    return task, gamma, out / task / f"seed{cfg.seed}", warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path, help="a `ctrldiff bench` output folder (its warm gamma runs)")
    ap.add_argument("scratch", type=Path, nargs="+", help="CTRL runs fine-tuned from scratch at other gammas")
    args = ap.parse_args()
    pairs = [(scratch, *pair_of(args.bench, scratch, ap)) for scratch in args.scratch]  # every input checked first
    t0, env, lines = time.time(), bench.environment("default"), []
    for scratch, task, gamma, seed_dir, warm in pairs:
        for how, run in [("scratch", scratch), ("warm", warm)]:
            r = row(run, seed_dir / "classifiers", env)
            lines.append(f"| {task} | {gamma:g} | {how} | {r['steps']} | {r['seconds']:.0f} | {r['accuracy']:.3f} | "
                         f"{r['digit_fidelity']:.3f} | {r['feature_fid']:.1f} | {r['mean_kl']:.1f} | {r['gap']:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join([
        "## The γ sweep warm-started from γ = 10, against fine-tunes from scratch\n",
        (f"Produced by `python benchmarks/gamma_warm.py {' '.join(sys.argv[1:])}` on {machine()}, "
         f"{time.strftime('%Y-%m-%d')}; {(time.time() - t0) / 60:.1f} min (measuring; the fine-tunes were the "
         "bench's). Same task, seed and reward classifiers per pair of rows; \"warm\" starts from the seed's γ = 10 "
         "model, \"scratch\" from zero-initialised new parameters. Oracle accuracy (joint on the 2×2 task), digit "
         "fidelity and feature-FID at 128 samples per class; log Z − J: the meter over the last tenth of the "
         "fine-tune's steps (nats to the objective's optimum, trusted requests; ≥ 0 up to noise); seconds: the "
         "fine-tune's wall time as its model records it (the 2-core machine was not always free for it).\n"),
        "| task | γ | start | steps | seconds | accuracy | digit fidelity | feature-FID | mean KL | log Z − J |",
        "|---" * 10 + "|", *lines])
    write_section("gamma-warm", text)
    print(text)


if __name__ == "__main__":
    main()
