"""Baselines benchmark (issue 3): every method on compress4, the same base, classifiers and sampler as CTRL.

    python benchmarks/baselines.py [--out runs/bench-baselines] [--reuse]

1. `ctrldiff classifier` (reward, monitor and noise-aware classifiers), CTRL fine-tuning (default preset) and
   the CFG baseline on all 4,000 triplets (`finetune --method cfg`).
2. Tuning: each method over the grid in GRID, `TUNE_PER_CLASS` samples per class, seed 1.
3. Final: each method at its best-accuracy setting, `eval.per_class` samples per class, seed 0 (the seed of
   every other table), beside CTRL.
Writes the `baselines` section of docs/benchmarks.md; nothing typed by hand. --reuse keeps the classifiers and
models of a previous run in --out (the tables are recomputed).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

from _doc import write_section

from ctrldiff import config as C
from ctrldiff.bench import GRID as BENCH_GRID
from ctrldiff.bench import machine, measure, prepare, settings
from ctrldiff.pipeline import backend_for, digit_oracle, real_features

TUNE_PER_CLASS, TUNE_SEED = 32, 1
GRID = {**{k: v for k, v in BENCH_GRID.items() if k != "base"}, "best_of_n": {"n": [4, 16, 64]}}


def prepared(cfg: C.Config, out: Path, reuse: bool) -> dict:
    """Classifiers, the CTRL model and the CFG model (or those of a previous run with --reuse)."""
    paths = {"classifiers": out / "classifiers", "ctrl": out / "ctrl" / "ctrl.safetensors",
             "cfg": out / "cfg" / "cfg.safetensors"}
    if reuse and all(p.exists() for p in paths.values()):
        return {"paths": paths, "seconds": json.loads((out / "prepare.json").read_text())}
    seconds: dict = {}
    paths = prepare(cfg, out, progress=True, seconds=seconds)
    (out / "prepare.json").write_text(json.dumps(seconds))
    return {"paths": paths, "seconds": seconds}


def run_method(cfg, env, paths, name, knobs, per_class, seed) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.eval.per_class = per_class
    return measure(cfg, paths, name, knobs, env, seed)[0]


def fmt(knobs: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in knobs.items()) or "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-baselines"))
    ap.add_argument("--reuse", action="store_true", help="reuse the classifiers and models already in --out")
    args = ap.parse_args()
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = C.default()
    prep = prepared(cfg, args.out, args.reuse)
    backend, oracle = backend_for(cfg), digit_oracle(cfg.data.resolution)
    env = {"backend": backend, "oracle": oracle, "real": real_features(cfg, oracle)}
    run_method(cfg, env, prep["paths"], "base", {}, 4, TUNE_SEED)  # warm-up: first-call costs

    tuning, best = [], {"base": {}}
    for name, grid in GRID.items():
        rows = []
        for knobs in settings(grid):
            m = run_method(cfg, env, prep["paths"], name, knobs, TUNE_PER_CLASS, TUNE_SEED)
            rows.append((knobs, m))
            print(f"tune {name} {fmt(knobs)}: acc {m['compress4']['accuracy']:.3f}, "
                  f"{m['seconds_per_sample'] * 1000:.1f} ms/sample", file=sys.stderr, flush=True)
        tuning += [(name, k, m) for k, m in rows]
        best[name] = max(rows, key=lambda r: r[1]["compress4"]["accuracy"])[0]

    final = {}
    for name, knobs in best.items():
        final[name] = run_method(cfg, env, prep["paths"], name, knobs, cfg.eval.per_class, cfg.seed)
        print(f"final {name} {fmt(knobs)}: acc {final[name]['compress4']['accuracy']:.3f}", file=sys.stderr, flush=True)
    (args.out / "results.json").write_text(json.dumps({"tuning": tuning, "final": final}, indent=1))
    command = "python benchmarks/baselines.py " + " ".join(sys.argv[1:])
    write_section("baselines", report(cfg, prep, tuning, final, command, time.time() - t_start))
    print((Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text().split("section:baselines")[1])


def report(cfg, prep, tuning, final, command, wall) -> str:
    ctrl = final["ctrl"]
    lines = [
        "# Baselines: every method on compress4, same base, classifiers and sampler\n",
        (f"Produced by `{command}` on {machine()}, {time.strftime('%Y-%m-%d')}; total wall time {wall:.0f} s, "
         f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB.\n"),
        ("Setup: the shipped base, DDIM 20 steps η 1; reward classifier p̂(y|x) and the noise-aware p̂(y|x_t,t) "
         "fitted on the same 4,000 training pairs; CTRL with the default preset; CFG is the same augmented model "
         "(zero-init y-embedding + LoRA rank 4) trained by denoising score matching on the 4,000 triplets (x, c, y), "
         f"{cfg.triplets.steps} steps, y dropped at p = {cfg.triplets.p_uncond}. Preparation: "
         + ", ".join(f"{k} {v:.0f} s" for k, v in prep["seconds"].items()) + ".\n"),
        (f"Each method's setting is the best oracle accuracy over its grid at {TUNE_PER_CLASS} samples per class "
         f"(seed {TUNE_SEED}); the final row is a fresh evaluation at {cfg.eval.per_class} per class (seed "
         f"{cfg.seed}). Cost: network passes per returned sample (denoiser forward / backward) and wall "
         "seconds per sample on this machine.\n"),
        ("| method | setting | accuracy | macro-F1 | digit fidelity | feature-FID | mean KL | fwd | bwd | ms/sample "
        "| cost / CTRL | CTRL ≥ 5× cheaper or more accurate |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in final.items():
        c = m["cost_per_sample"]
        ratio = m["seconds_per_sample"] / ctrl["seconds_per_sample"]
        acc = m["compress4"]["accuracy"]
        verdict = "—" if name in ("base", "ctrl") else (
            "yes (cheaper)" if ratio >= 5 else "yes (more accurate)" if ctrl["compress4"]["accuracy"] > acc
            else "**no**")
        kl = f"{m['mean_kl']:.1f}" if "mean_kl" in m else "n/a"
        lines.append(f"| {name} | {fmt(m['knobs'])} | {acc:.3f} | {m['compress4']['macro_f1']:.3f} | "
                     f"{m['digit_fidelity']:.3f} | {m['feature_fid']:.1f} | {kl} | {c.get('forward_denoiser', 0):g} | "
                     f"{c.get('backward_denoiser', 0):g} | {1000 * m['seconds_per_sample']:.1f} | {ratio:.1f}× | "
                     f"{verdict} |")
    lines += ["\nTuning grid (accuracy, digit fidelity and ms/sample at each setting):\n",
              "| method | setting | accuracy | digit fidelity | ms/sample |", "|---|---|---|---|---|"]
    for name, knobs, m in tuning:
        lines.append(f"| {name} | {fmt(knobs)} | {m['compress4']['accuracy']:.3f} | {m['digit_fidelity']:.3f} | "
                     f"{1000 * m['seconds_per_sample']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
