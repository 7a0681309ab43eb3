"""CTRL against its own target p_gamma on images (issue 14), in three parts, each writing its own doc section.

    python benchmarks/target.py classifiers   # reward-classifier variants, measured by the target they give
                                              #   -> docs/tuning.md, section classifiers (+ a reliability diagram)
    python benchmarks/target.py final-step    # rl.final_step "model" vs "base" at gamma 10 / 30, seeds
                                              #   -> docs/tuning.md, section final-step
    python benchmarks/target.py tune          # CTRL's optimisation settings, each measured against the target
                                              #   -> docs/tuning.md, section ctrl-tuning
    python benchmarks/target.py step-time     # seconds per fine-tuning step by truncation, and a profile
                                              #   -> docs/tuning.md, section step-time
    python benchmarks/target.py main          # the default presets: base, target and CTRL side by side
                                              #   -> docs/benchmarks.md, section target (+ heat maps)

The target's numbers come from importance sampling over the cached bank of base samples (ctrldiff/target.py);
every CTRL run is the product's own pipeline (fit_reward_terms -> run_finetune -> run_evaluate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from _doc import ROOT, machine, write_section
from _tasks import acc, gap_trend, run_tasks, task_main

from ctrldiff import config as C
from ctrldiff.classifier import evaluate_classifier, fit_classifier
from ctrldiff.io import write_json
from ctrldiff.io import write_section as write_doc_section
from ctrldiff.methods import build_method
from ctrldiff.pipeline import (
    backend_for,
    base_pairs,
    controls_of,
    digit_oracle,
    fit_reward_terms,
    on_base_samples,
    pairs_for,
    real_features,
    target_bank,
)
from ctrldiff.plots import plot_reliability
from ctrldiff.rl import RewardTerm
from ctrldiff.target import on_trusted, target_metrics

TUNING_MD = ROOT / "docs" / "tuning.md"
FIGURES = ROOT / "docs" / "figures"

# reward-classifier variants for compress4: (label, config overrides)
OLD = ["classifier.base_pairs=0", "classifier.noise=0.1", "classifier.shift=1"]  # the defaults before issue 14
VARIANTS = [
    ("4k real pairs (old default)", OLD),
    ("+ 20k base samples (new default)", []),
    ("+ 20k, 30 epochs", ["classifier.epochs=30"]),
    ("+ 20k, width 64", ["classifier.width=64"]),
    ("+ 20k, no noise, shift 2", ["classifier.noise=0.0", "classifier.shift=2"]),
    ("+ 50k base samples", [*OLD, "classifier.base_pairs=50000"]),
]


# CTRL's optimisation settings (issue 14, part 5), each against the same target: (label, preset, overrides).
# Rows are relative to the settings before the study (OLD_RL); row indices name the run folders, so rows are
# only ever appended.
OLD_RL = ["rl.truncate=random", "rl.steps=150", "rl.lr_schedule=constant"]
C300 = ["rl.steps=300", "rl.lr_schedule=cosine"]
C250 = ["rl.steps=250", "rl.lr_schedule=cosine"]
FULL = ["rl.truncate=null"]
_ROWS = [
    ("random truncation, 150 steps (old default)", "default", []),
    ("300 steps", "default", ["rl.steps=300"]),
    ("300 steps, cosine", "default", C300),
    ("full backprop", "default", FULL),
    ("full backprop, 300 cosine", "default", [*FULL, *C300]),
    ("300 cosine, lr / 3", "default", [*C300, "rl.lr_lora=1e-3", "rl.lr_emb=0.03"]),
    ("300 cosine, LoRA lr x 3", "default", [*C300, "rl.lr_lora=1e-2"]),
    ("300 cosine, rank 8", "default", [*C300, "rl.lora_rank=8"]),
    ("full, 300 cosine, rank 8", "default", [*FULL, *C300, "rl.lora_rank=8"]),
    ("300 steps, cosine, seed 1", "default", [*C300, "seed=1"]),
    ("full backprop, 300 cosine, seed 1", "default", [*FULL, *C300, "seed=1"]),
    ("random truncation, 150 steps (old default)", "multi", []),
    ("full backprop, 300 cosine", "multi", [*FULL, *C300]),
    ("full backprop, 250 cosine", "default", [*FULL, *C250]),
    ("full backprop, 250 cosine, seed 1", "default", [*FULL, *C250, "seed=1"]),
    ("full backprop, 250 cosine", "multi", [*FULL, *C250]),
    ("full backprop, seed 1", "default", [*FULL, "seed=1"]),
    ("full backprop, 200 cosine (new default)", "default", [*FULL, "rl.steps=200", "rl.lr_schedule=cosine"]),
    ("full backprop, 200 cosine (new default)", "multi", [*FULL, "rl.steps=200", "rl.lr_schedule=cosine"]),
]
TUNE = [(label, preset, [*OLD_RL, *ov]) for label, preset, ov in _ROWS]


def _command(part: str, args: list[str]) -> str:
    return " ".join(["python benchmarks/target.py", part, *args])


# --- classifiers ------------------------------------------------------------------------------------------

SELECTION_SEED = 100  # the selection bank's seed, past target.seed: the yardstick's and the base pairs' stay unseen


def part_classifiers(args) -> None:
    t_start = time.time()
    cfg0 = C.apply_overrides(C.default(), args.overrides)
    backend, ctl = backend_for(cfg0), controls_of(cfg0)[0]
    oracle = digit_oracle(cfg0.data.resolution)
    real = real_features(cfg0, oracle)
    # variants are chosen on a bank of their own: the yardstick's (target.seed) later judges the kept one, and the
    # base pairs' (target.seed + 1 + seed) trained it
    bank = target_bank(C.apply_overrides(cfg0, [f"target.seed={cfg0.target.seed + SELECTION_SEED}"]), backend)
    images = backend.decode(bank.flatten(0, 1))
    labels = ctl.label(images)
    rows, curves = [], {}
    for label, overrides in VARIANTS[: args.limit]:
        cfg = C.apply_overrides(cfg0, overrides)
        t0 = time.time()
        x, y = pairs_for(ctl, "train", cfg)
        if cfg.classifier.base_pairs:
            xb, yb = base_pairs(ctl, cfg, backend)
            x, y = torch.cat([x, xb]), torch.cat([y, yb])
        clf, rep = fit_classifier(x, y, ctl.num_classes, cfg.classifier, cfg.seed, ctl.name)
        fit_s = time.time() - t0
        x_ho, y_ho = pairs_for(ctl, "heldout", cfg)
        ho = evaluate_classifier(clf, x_ho, y_ho)
        on_base = on_base_samples(clf, images, labels)
        row = {"variant": label, "overrides": overrides, "pairs": len(x), "fit_seconds": fit_s,
               "heldout_accuracy": ho["accuracy"], "heldout_ece": ho["ece_calibrated"],
               "base_accuracy": on_base["accuracy"], "base_ece": on_base["ece_calibrated"],
               "temperature": rep["temperature"]}
        for gamma in args.gammas:
            m, _, _ = target_metrics(backend, bank, [RewardTerm(ctl, clf, gamma)], [ctl], cfg.eval.per_class, oracle,
                                     real, cfg.seed, cfg.target.min_ess)
            row[f"g{gamma:g}"] = {"accuracy": m[ctl.name]["accuracy"], "fidelity": m["digit_fidelity"],
                                  "fid": m["feature_fid"], "untrusted": m["untrusted_cells"], "min_ess": m["min_ess"]}
        rows.append(row)
        curves[label] = (on_base["logits"], labels)
        print(json.dumps(row), flush=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    keep = [VARIANTS[0][0], rows[-1]["variant"] if args.best is None else VARIANTS[args.best][0]]
    plot_reliability({f"{k}, base samples": curves[k] for k in dict.fromkeys(keep) if k in curves},
                     FIGURES / "reliability-compress4.png", "compress4 reward classifier: reliability")
    g = args.gammas
    lines = ["## Raising the target: reward-classifier variants (compress4)\n",
             (f"Produced by `{_command('classifiers', sys.argv[2:])}` on {machine()}, {time.strftime('%Y-%m-%d')}; "
              f"{time.time() - t_start:.0f} s. Each variant is fitted once (seed 0) on the 4,000 real training pairs plus "
              "the stated number of base samples labelled by the JPEG oracle (their own bank, seed 1), 20% held back "
              "for the temperature. Held-out: the 1,000 real held-out digits. Base: 20,000 fresh base samples of "
              f"a selection bank (seed {cfg0.target.seed + SELECTION_SEED}: neither the yardstick's, seed "
              f"{cfg0.target.seed}, which judges the kept variant, nor the base pairs'). Target: p_gamma by importance "
              f"sampling over that bank, {cfg0.eval.per_class} requests per class for its feature-FID; 'low ESS' = requests (c, y) with an "
              f"effective sample size below {cfg0.target.min_ess:g} (of 40).\n"),
             "| variant | pairs | fit s | held-out acc | held-out ECE | base acc | base ECE | "
             + " | ".join(f"target γ={x:g}: acc / fidelity / FID / low ESS" for x in g) + " |",
             "|---" * (7 + len(g)) + "|"]
    for r in rows:
        tg = " | ".join(f"{r[f'g{x:g}']['accuracy']:.3f} / {r[f'g{x:g}']['fidelity']:.3f} / {r[f'g{x:g}']['fid']:.1f} / "
                        f"{r[f'g{x:g}']['untrusted']}" for x in g)
        lines.append(f"| {r['variant']} | {r['pairs']} | {r['fit_seconds']:.0f} | {r['heldout_accuracy']:.3f} | "
                     f"{r['heldout_ece']:.3f} | {r['base_accuracy']:.3f} | {r['base_ece']:.3f} | {tg} |")
    lines.append("\nReliability on base samples (old default vs the kept variant): "
                 "![reliability](figures/reliability-compress4.png)\n")
    write_doc_section(TUNING_MD, "classifiers", "\n".join(lines))
    print("\n".join(lines))


# --- final step ---------------------------------------------------------------------------------------------

def part_final_step(args) -> None:
    t_start = time.time()
    jobs = []
    for preset in args.presets:
        for gamma in args.gammas:
            for final in args.finals:
                for seed in args.seeds:
                    ctl = C.preset(preset).rl.controls
                    controls = json.dumps({k: gamma for k in ctl})
                    ov = [*args.overrides, f"rl.controls={controls}", f"rl.final_step={json.dumps(final)}",
                          f"seed={seed}"]
                    jobs.append((preset, ov, args.out / f"{preset}-g{gamma:g}-{final}-s{seed}"))
    res = run_tasks(__file__, jobs, args.parallel)
    title = ("## The last step on images: `rl.final_step` \"model\" vs \"base\", measured" if args.section is None
             else f"## Tuning: {' '.join(args.overrides)}")
    lines = [title + "\n",
             (f"Produced by `{_command('final-step', sys.argv[2:])}` on {machine()}, {time.strftime('%Y-%m-%d')}; "
              f"{(time.time() - t_start) / 60:.1f} min ({args.parallel} runs at a time, one thread each). Each row: one "
              "whole pipeline (classifier fit, CTRL, evaluation with the target beside it) at the preset's settings "
              "with the γ, final step and seed shown. acc = oracle accuracy (joint for the 2×2 task); target = p_γ "
              "by importance sampling over the bank with the same run's classifiers. log Z − J is on the evaluation "
              "samples (nats; ≥ 0 on the chain the KL sees; with \"model\" the last step is outside it).\n"),
             ("| task | γ | final step | seed | acc | target acc | fidelity | target fidelity | FID | target FID | "
              "path KL | log Z − J | meter over training |"), "|---" * 13 + "|"]
    for (preset, ov, _), r in zip(jobs, res):
        c, t = r["results"]["ctrl"], r["results"]["target"]
        cfg = r["config"]
        lines.append(f"| {preset} | {next(iter(cfg['rl']['controls'].values())):g} | {cfg['rl']['final_step']} | "
                     f"{cfg['seed']} | {acc(c):.3f} | {acc(t):.3f} | {c['digit_fidelity']:.3f} | "
                     f"{t['digit_fidelity']:.3f} | {c['feature_fid']:.1f} | {t['feature_fid']:.1f} | "
                     f"{c['mean_kl']:.1f} | {c['yardstick']['trusted']['gap']:.2f} | {gap_trend(r['gap_curve'])} |")
    write_doc_section(TUNING_MD, args.section or "final-step-" + "-".join(args.presets), "\n".join(lines))
    write_json(args.out / "final-step.json", res)
    print("\n".join(lines))


def part_last_step(args) -> None:
    """How much of a "model"-final-step fine-tune's accuracy comes from the step the KL cannot see: each such
    checkpoint evaluated as trained, and with the frozen base taking the last step instead (same samples otherwise)."""
    from ctrldiff.control import ControlledDenoiser
    from ctrldiff.evaluate import evaluate

    t_start = time.time()
    rows = []
    for run in args.runs:
        cfg = C.from_dict(json.loads((run / "config.json").read_text()))
        if cfg.rl.final_step != "model":
            continue
        backend, controls = backend_for(cfg), controls_of(cfg)
        oracle = digit_oracle(cfg.data.resolution)
        real = real_features(cfg, oracle)
        row = {"run": run.name}
        for final in ("model", "base"):
            model = ControlledDenoiser.load(run / "ctrl.safetensors", backend).merge_lora()
            model.final_step = final
            method = build_method("ctrl", backend, steps=cfg.sampler.steps, eta=cfg.sampler.eta, model=model)
            m, _, _ = evaluate(method, backend, controls, cfg, oracle, real, seed=cfg.seed, progress=False)
            row[final] = (m.get("joint_accuracy", m[controls[0].name]["accuracy"]), m["digit_fidelity"], m["feature_fid"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["## How much the KL-free last step does for a `\"model\"` fine-tune\n",
             (f"Produced by `{_command('last-step', sys.argv[2:])}` on {machine()}, {time.strftime('%Y-%m-%d')}; "
              f"{time.time() - t_start:.0f} s. Each checkpoint fine-tuned with `rl.final_step=\"model\"`, sampled as "
              "trained and again with the frozen base taking only the last, deterministic step (every other step "
              "and every random draw the same); oracle accuracy / digit fidelity / feature-FID.\n"),
             "| run | as trained | last step by the base | accuracy from the last step |", "|---|---|---|---|"]
    for r in rows:
        a, b = r["model"], r["base"]
        lines.append(f"| {r['run']} | {a[0]:.3f} / {a[1]:.3f} / {a[2]:.1f} | {b[0]:.3f} / {b[1]:.3f} / {b[2]:.1f} | "
                     f"{a[0] - b[0]:+.3f} |")
    write_doc_section(TUNING_MD, "last-step", "\n".join(lines))
    print("\n".join(lines))


# --- tune: CTRL's optimisation, against the target ----------------------------------------------------------

def part_tune(args) -> None:
    """Runs the TUNE rows picked (all by default) into --out/<row>-<preset>, then tabulates every row that has a
    finished run there: the sweep can be run in pieces, on different machines, and the table rebuilt (--pick)."""
    t_start = time.time()
    picked = range(len(TUNE)) if args.pick is None else args.pick
    jobs = [(TUNE[i][1], [*args.overrides, *TUNE[i][2]], args.out / f"{i:02d}-{TUNE[i][1]}") for i in picked]
    run_tasks(__file__, jobs, args.parallel, args.threads)
    lines = ["## Tuning CTRL's optimisation against its target\n",
             (f"Table written by `{_command('tune', sys.argv[2:])}` on {machine()}, {time.strftime('%Y-%m-%d')}, "
              "from runs made in pieces (`--pick`) on the machines the column \"networks on\" names (the notes "
              "below say which and how shared). Each row: one whole pipeline "
              "(classifier fit, CTRL, evaluation with the target beside it) at the preset's settings with the "
              "changes shown; γ = 10, final step base. acc = oracle accuracy (joint for the 2×2 task); target = "
              "p_γ by importance sampling over the bank with the same run's classifiers; Δ = CTRL − target. "
              "Trusted cells: the requests (c, y) where the bank's effective sample size is ≥ target.min_ess (29 "
              "of 40 for compress4, 35 of 40 for 2×2); elsewhere a handful of base samples stand for the target. "
              "log Z − J on the evaluation samples (nats, ≥ 0 up to Monte-Carlo error), and the meter's mean over "
              "each fifth of training; rows measured before the meter left untrusted cells out (all but the new "
              "defaults) count every cell, whose log Z is biased low, so their meter reads low. Fine-tuning seconds are where the networks ran, with other runs sharing "
              "it: not the 2-core timing, which is in docs/benchmarks.md.\n"),
             ("| task | changes | acc | Δ acc | Δ acc, trusted cells | fidelity | Δ fidelity | FID / target FID | "
              "log Z − J | meter over training | networks on | fine-tune s |"), "|---" * 12 + "|"]
    for i, (label, preset, _) in enumerate(TUNE):
        f = args.out / f"{i:02d}-{preset}" / "result.json"
        if not f.exists():  # cut short by a time limit: what its meter had reached
            log = f.parent / "metrics.jsonl"
            gaps = [r["gap"] for r in map(json.loads, log.read_text().splitlines()) if "gap" in r] if log.exists() else []
            state = f"cut short at step {len(gaps)} |" + " |" * 6 + f" {gap_trend(gaps)} |" if gaps else "not run |" + " |" * 7
            lines.append(f"| {preset} | {label} | {state} |" + " |" * 1)
            continue
        r = json.loads(f.read_text())
        c, t = r["results"]["ctrl"], r["results"]["target"]
        min_ess = r["config"]["target"]["min_ess"]
        trusted = (on_trusted(c["per_cell"], t["cells"], min_ess)["accuracy"]
                   - on_trusted(t["cells"], t["cells"], min_ess)["accuracy"])
        lines.append(f"| {preset} | {label} | {acc(c):.3f} | {acc(c) - acc(t):+.3f} | {trusted:+.3f} | "
                     f"{c['digit_fidelity']:.3f} | {c['digit_fidelity'] - t['digit_fidelity']:+.3f} | "
                     f"{c['feature_fid'] / t['feature_fid']:.2f} | {c['yardstick']['trusted']['gap']:.1f} | "
                     f"{gap_trend(r['gap_curve'])} | "
                     f"{r['config']['device']} | {r['finetune_seconds']:.0f} |")
    write_doc_section(TUNING_MD, "ctrl-tuning", "\n".join(lines))
    print("\n".join(lines))
    print(f"{(time.time() - t_start) / 60:.1f} min")


# --- step time: where a fine-tuning step's seconds go ----------------------------------------------------------

def part_step_time(args) -> None:
    """Seconds per optimiser step (steps 3-10 of a short fine-tune, this process's threads) for each truncation,
    and the profiler's top operators of a full-back-propagation step."""
    from torch.profiler import ProfilerActivity, profile

    from ctrldiff.rl import finetune

    base = C.apply_overrides(C.preset("default"), ["classifier.epochs=1", "classifier.base_pairs=0",
                                                    "rl.monitor_every=0", "rl.steps=10", *args.overrides])
    terms, _ = fit_reward_terms(base, None, progress=False)
    backend = backend_for(base)
    rows = []
    for trunc in ("random", "null"):
        cfg = C.apply_overrides(base, [f"rl.truncate={trunc}"])
        recs = []
        finetune(backend, terms, cfg, log=recs.append, progress=False)
        sec = [r["seconds"] for r in recs if "seconds" in r]
        rows.append(f"| {trunc if trunc != 'null' else 'none (full)'} | {(sec[-1] - sec[2]) / (len(sec) - 3):.2f} |")
    cfg = C.apply_overrides(base, ["rl.truncate=null", "rl.steps=2"])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        finetune(backend, terms, cfg, log=None, progress=False)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% |" for e in ops[:8]]
    lines = ["## Where a fine-tuning step's time goes\n",
             (f"Produced by `{_command('step-time', sys.argv[2:])}` on {machine()}, {torch.get_num_threads()} threads, "
              f"{time.strftime('%Y-%m-%d')}. Seconds per optimiser step of the default preset (batch 32, 20 DDIM "
              "steps, the last taken by the base), steps 3-10 of a short fine-tune:\n"),
             "| truncation | s / step |", "|---|---|", *rows,
             "\nThe profiler's top operators (self CPU time) of a full-back-propagation step:\n",
             "| operator | share |", "|---|---|", *top]
    write_doc_section(TUNING_MD, "step-time", "\n".join(lines))
    print("\n".join(lines))


# --- main: the default presets ----------------------------------------------------------------------------

def reuse(files: list[Path], presets: list[str], overrides: list[str]) -> list[dict]:
    """Finished runs (final-step.json of `final-step`) whose config is exactly each preset's with `overrides`."""
    done = [r for f in files for r in json.loads(Path(f).read_text())]
    out = []
    for p in presets:
        want = C.apply_overrides(C.preset(p), overrides).to_dict()
        match = [r for r in done if r["config"] == want]
        if not match:
            raise SystemExit(f"no finished run in {files} has the {p!r} preset's config")
        out.append(match[0])
    return out


def part_main(args) -> None:
    t_start = time.time()
    jobs = [(p, args.overrides, args.out / p) for p in args.presets]
    res = reuse(args.reuse, args.presets, args.overrides) if args.reuse else run_tasks(__file__, jobs, args.parallel)
    FIGURES.mkdir(parents=True, exist_ok=True)
    doc = ["# CTRL against its target p_γ\n",
           (f"Produced by `{_command('main', sys.argv[2:])}` on {machine()}, {time.strftime('%Y-%m-%d')}; total "
            f"{(time.time() - t_start) / 60:.1f} min" + (f" (the runs are the finished ones in "
                                                          f"{', '.join(map(str, args.reuse))} with exactly these "
                                                          "settings, `--reuse`; their times as measured there)"
                                                          if args.reuse else "")
            + ". The target p_γ(x | c, y) ∝ Π_k p̂_k(y_k | x)^γ_k p_pre(x | c) "
            "is estimated by self-normalised importance sampling over a cached bank of base samples (ctrldiff/"
            "target.py) with the very classifiers CTRL was fine-tuned on; it is what CTRL's objective is "
            "maximised by, so CTRL is judged against it first and against the oracle's ideal second.\n")]
    for r in res:
        cfg, c, name = r["config"], r["results"]["ctrl"], r["preset"]
        for png in Path(r["run"]).glob("target-vs-*.png"):
            shutil.copy(png, FIGURES / f"target-{name}-{png.name}")
        rc = cfg["rl"]
        doc += [f"## `{name}` ({' × '.join(rc['controls'])})\n",
                (f"γ {rc['controls']}, final step {rc['final_step']}, {rc['steps']} steps × batch {rc['batch']}, "
                 f"LoRA rank {rc['lora_rank']}, lr {rc['lr_lora']} / {rc['lr_emb']} ({rc['lr_schedule']}); reward "
                 f"classifier: {cfg['classifier']['base_pairs']} base pairs + the real ones, width "
                 f"{cfg['classifier']['width']}, {cfg['classifier']['epochs']} epochs (fit {r['classifier_seconds']:.0f} s); "
                 f"bank {cfg['target']['per_c']} base samples per digit. CTRL fine-tuning {r['finetune_seconds']:.0f} s, "
                 f"peak memory {r['peak_rss_gb']:.2f} GiB, sampling cost CTRL / base "
                 f"{c['seconds_per_sample'] / r['results']['base']['seconds_per_sample']:.2f}.\n"),
                r["table"],
                f"log Z − J over training (mean of each fifth of the steps): {gap_trend(r['gap_curve'])} nats.\n",
                f"![target vs CTRL per request](figures/target-{name}-target-vs-ctrl.png)\n"]
    write_section("target", "\n".join(doc))
    write_json(args.out / "main.json", res)
    print("\n".join(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["classifiers", "final-step", "last-step", "tune", "step-time", "main", "task"])
    ap.add_argument("runs", nargs="*", type=Path, help="last-step: run folders of the final-step study")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preset", default="default", help=argparse.SUPPRESS)  # part "task" (internal)
    ap.add_argument("--presets", nargs="+", default=["default", "multi"])
    ap.add_argument("--gammas", nargs="+", type=float, default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--finals", nargs="+", default=["model", "base"], help="final-step: the rl.final_step arms")
    ap.add_argument("--reuse", nargs="+", type=Path, default=None,
                    help="main: take the runs from finished final-step.json files instead of re-running them")
    ap.add_argument("--section", default=None, help="final-step: the docs/tuning.md section to write")
    ap.add_argument("--parallel", type=int, default=2, help="CTRL runs at a time (one thread each)")
    ap.add_argument("--limit", type=int, default=None, help="classifiers: only the first N variants")
    ap.add_argument("--pick", nargs="*", type=int, default=None, help="tune: the rows of TUNE to run (default all)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run when several run at once")
    ap.add_argument("--best", type=int, default=None, help="classifiers: the variant the reliability plot shows")
    args = ap.parse_args()
    args.out = args.out or Path("runs") / f"bench-target-{args.part}"
    if args.part == "task":
        task_main(args)
    elif args.part == "classifiers":
        args.gammas = args.gammas or [10.0, 30.0]
        part_classifiers(args)
    elif args.part == "tune":
        part_tune(args)
    elif args.part == "step-time":
        part_step_time(args)
    elif args.part == "last-step":
        part_last_step(args)
    elif args.part == "final-step":
        args.gammas = args.gammas or [10.0, 30.0]
        part_final_step(args)
    else:
        part_main(args)


if __name__ == "__main__":
    main()
