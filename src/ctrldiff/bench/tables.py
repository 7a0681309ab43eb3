"""The bench's report: the markdown of its `bench` section, from results alone (no sampling)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import config as C
from ..classifier import classifier_steps, held_back
from .fronts import best_at, ms_per_sample
from .grid import HARD_CORNER, PARTS, TASK_TITLES, TUNE_SEED, BenchSize, section, task_seeds


def _ms(values: list[float], fmt: str = ".3f") -> str:
    """mean ± std over seeds (the sample std, ddof = 1; a single seed prints its value)."""
    a = np.asarray(values, dtype=float)
    return f"{a.mean():{fmt}}" if len(a) == 1 else f"{a.mean():{fmt}} ± {a.std(ddof=1):{fmt}}"

def _setting(knobs: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in knobs.items()) or "—"

def single_table(task: dict) -> list[str]:
    name = task["controls"][0]
    lines = [("| method | setting | accuracy | monitor accuracy | macro-F1 | digit fidelity | feature-FID | "
              "mean KL to base | denoiser fwd / bwd per sample | ms / sample |"), "|---" * 10 + "|"]
    for method, knobs in task["best"].items():
        ms = [r[method] for r in task["runs"].values()]
        cost = ms[0]["cost_per_sample"]
        kl = _ms([m["mean_kl"] for m in ms], ".1f") if "mean_kl" in ms[0] else "n/a (not one Gaussian chain)"
        lines.append(f"| {method} | {_setting(knobs)} | {_ms([m[name]['accuracy'] for m in ms])} | "
                     f"{_monitor(ms)} | "
                     f"{_ms([m[name]['macro_f1'] for m in ms])} | {_ms([m['digit_fidelity'] for m in ms])} | "
                     f"{_ms([m['feature_fid'] for m in ms], '.1f')} | {kl} | "
                     f"{cost.get('forward_denoiser', 0):g} / {cost.get('backward_denoiser', 0):g} | "
                     f"{_ms([1000 * m['seconds_per_sample'] for m in ms], '.1f')} |")
    return lines

def multi_table(task: dict) -> list[str]:
    first = next(iter(task["runs"].values()))
    corners = list(next(iter(first.values()))["per_corner"])
    head = [f"**{c}** (hard)" if c == HARD_CORNER else c for c in corners]
    lines = ["| method | setting | " + " | ".join(head) + " | joint accuracy | monitor accuracy | digit fidelity |",
             "|---" * (len(corners) + 5) + "|"]
    for method, knobs in task["best"].items():
        ms = [r[method] for r in task["runs"].values()]
        cells = [_ms([m["per_corner"][c] for m in ms]) for c in corners]
        cells = [f"**{v}**" if c == HARD_CORNER else v for c, v in zip(corners, cells)]
        lines.append(f"| {method} | {_setting(knobs)} | " + " | ".join(cells) +
                     f" | {_ms([m['joint_accuracy'] for m in ms])} | {_monitor(ms)} | "
                     f"{_ms([m['digit_fidelity'] for m in ms])} |")
    return lines

def _monitor(ms: list[dict]) -> str:
    """The independent monitors' (joint) accuracy over seeds: the judge no method was optimised against."""
    return _ms([m["monitor_accuracy"] for m in ms]) if all("monitor_accuracy" in m for m in ms) else "—"

def front_table(curves: dict[str, list[dict]], seeds: list[dict[str, list[dict]]], levels=(0.90, 0.80)) -> list[str]:
    """Per method: the best accuracy at digit fidelity >= each level along its own front, mean ± std over the seeds'
    fronts (`seeds`; a method absent there, the target, from `curves` alone), and its cost."""
    lines = ["| method | " + " | ".join(f"best accuracy at fidelity ≥ {v:.2f}" for v in levels) +
             " | ms / sample | network passes / sample |", "|---" * (len(levels) + 3) + "|"]
    for method, pts in curves.items():
        per_seed = [c[method] for c in seeds if method in c] or [pts]
        cells = []
        for level in levels:
            reached = [b for b in (best_at(p, level) for p in per_seed) if b is not None]
            cells.append("not reached" if not reached else _ms(reached) + (
                f" ({len(reached)} of {len(per_seed)} seeds)" if len(reached) < len(per_seed) else ""))
        ms = sorted(ms_per_sample(pts))
        passes = sorted(p["passes"] for p in pts) if ms else []  # the target is not sampled: no cost
        span = (lambda v, f: "—" if not v else f"{v[0]:{f}}" if v[0] == v[-1] else f"{v[0]:{f}}–{v[-1]:{f}}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {span(ms, '.1f')} | {span(passes, 'g')} |")
    return lines

def against_ctrl(curves: dict[str, list[dict]], lo: float = 0.85, step: float = 0.01) -> list[str]:
    """For each other method, where its front lies above CTRL's at digit fidelity >= lo (on a grid of levels):
    the largest margin and its level, and the fidelity it reaches where CTRL's front stops."""
    levels = [round(lo + i * step, 4) for i in range(round((1 - lo) / step) + 1)]
    ctrl = {f: best_at(curves["ctrl"], f) for f in levels}
    ctrl_top = max(p["digit_fidelity"] for p in curves["ctrl"])
    lines = []
    for method, pts in curves.items():
        if method == "ctrl":
            continue
        best = {f: best_at(pts, f) for f in levels}
        margins = [(best[f] - ctrl[f], f) for f in levels if best[f] is not None and ctrl[f] is not None]
        above = max(margins, default=None)
        beyond = [f for f in levels if best[f] is not None and ctrl[f] is None]
        words = (f"above CTRL by up to {above[0]:.3f} (at fidelity {above[1]:.2f})" if above and above[0] > 0 else
                 "at or below CTRL wherever both reach it" if margins else "no level that both reach")
        if beyond:
            words += (f"; it reaches fidelity {beyond[-1]:.2f} with accuracy {best[beyond[-1]]:.3f}, where CTRL's "
                      f"front stops at {ctrl_top:.3f}")
        lines.append(f"- {method}: {words}.")
    return lines

def report(size_name: str, size: BenchSize, results: dict, figures: dict[str, Path], docs: Path) -> str:
    """The bench's section of benchmarks.md: the parts it ran (`results["tasks"]`, the sample-efficiency study where
    `results["efficiency"]`), every figure linked relative to `docs`."""
    tasks, parts, seeds = results["tasks"], results.get("parts", PARTS), results.get("seeds")
    partial = section(parts, seeds) != "bench"
    rel = {k: p.relative_to(docs).as_posix() for k, p in figures.items()}
    command = ("ctrldiff bench" + (" --quick" if size_name == "quick" else "")
               + (f" --parts {' '.join(parts)}" if partial else "")
               + (f" --seeds {' '.join(map(str, seeds))}" if seeds is not None else "")
               + (f" --jobs {results['jobs']}" if results.get("jobs", 1) > 1 else "") + " --docs docs")
    wall = f"wall time {results['seconds'] / 60:.1f} min" + (
        " (the last invocation of a resumed run: what earlier ones finished is not counted)"
        if results.get("resumed") else "")
    (n_ctrl, s_ctrl), (n_cfg, s_cfg) = results["training"]["ctrl"], results["training"]["cfg"]
    jobs = results.get("jobs", 1)
    wall += (f"; of the work, {n_ctrl} CTRL fine-tunes took {s_ctrl / 60:.0f} min and {n_cfg} CFG trainings on "
             f"triplets {s_cfg / 60:.0f} min" + (f" (each timed in its worker, {jobs} side by side, one share "
                                                 "of the cores each; the sampling after them alone)" if jobs > 1 else ""))
    on = "; ".join(f"seeds {task_seeds(size, t)} for {TASK_TITLES[t]}" for t in tasks)
    chosen = ", ".join(f"seed {task_seeds(size, t)[0]}'s models on {t}" for t in tasks)
    lines = [
        "# The paper's evaluation at our scale (`ctrldiff bench`" + (f": {', '.join(parts)} alone)" if partial else ")")
        + "\n",
        (f"Produced by `{command}` on {results['machine']}, {time.strftime('%Y-%m-%d')}; {wall}, "
         f"peak memory {results['peak_rss_gb']:.2f} GiB. Size `{size_name}`, preset `{size.preset}`, "
         f"{size.per_class} samples per class; a seed is a whole pipeline (classifiers, CTRL, CFG and the sampling): "
         f"{on}. Each method's setting is its best accuracy over the grid below on {chosen} (sampling seed "
         f"{TUNE_SEED}, {size.tune_per_class} per class). Nothing here is typed by hand.\n"),
        *([(f"Real digits for scale: {results['real']['n']:,} training digits score feature-FID "
            f"{results['real']['feature_fid']:.1f} against the held-out ones (the floor at this sample size) and "
            f"digit fidelity {results['real']['digit_fidelity']:.3f} (the digit oracle's own accuracy).\n")]
          if "real" in results else []),
        "Grids: " + "; ".join(f"{m} {g}" for m, g in size.grid.items() if g) + ".\n",
        *(["## Single control: compress4\n", *single_table(tasks["compress4"]), ""] if "compress4" in tasks else []),
        *(["## Multi-task 2×2: thickness2 × compress2 (per-corner joint accuracy)\n",
           f"The hard corner, thick yet compressible (`{HARD_CORNER}`), is in bold.\n", *multi_table(tasks["multi"]), ""]
          if "multi" in tasks else []),
    ]
    fronts = [] if not tasks else [
        "## Accuracy against quality: each method along its knob\n",
        ("Every setting of the grid (sampling seed "
         f"{TUNE_SEED}, {size.tune_per_class} samples per class), CTRL over γ {size.gammas} (every control at γ), "
         "and the target p_γ over the same γ from the bank (the first seed's classifiers). Best "
         "accuracy at a fidelity level: along the method's own front (its points no other of its points beats in "
         "both), on the upper concave envelope of its points (a random mixture of two settings reaches every point "
         "between them); \"not reached\" where no setting gets there. The figures and the verdicts against CTRL: the "
         "first seed's models. The tables: mean ± std (sample std, ddof = 1) over each seed's own front ("
         f"{on}; the target from the first seed's classifiers); the cost columns span the method's settings.\n"),
        *[x for task in tasks for x in (f"### {task}\n", f"![{task} front]({rel[f'front-{task}']})\n",
                                        *front_table(results["fronts"][task], results["front_seeds"][task]), "",
                                        "At digit fidelity ≥ 0.85, against CTRL's front (levels 0.01 apart):\n",
                                        *against_ctrl(results["fronts"][task]), "")],
    ]
    rest = [] if not tasks else [
        "## The γ trade-off\n",
        (f"![gamma sweep]({rel['gamma']})\n\nCTRL for each γ (every control of the task at γ), the first seed's "
         "classifiers; the paper fixes γ and leaves this curve open. "
         + (f"Each γ besides 10 starts from the γ = 10 model and fine-tunes {size.gamma_steps} steps at "
            f"{size.gamma_rate:g}× the learning rates (sections gamma-rate and gamma-warm below measure the rate, and "
            "warm starts against fine-tunes from scratch); "
            if size.gamma_steps is not None else "Each γ is fine-tuned from scratch; ")
         + "log Z − J (nats to the objective's optimum) from each γ's meter paths after its fine-tune: over the "
         "requests the bank trusts at every γ (the same requests for every γ; how many in brackets), and over all "
         "requests with log Z the larger of the bank's and the paths' estimate (flagged: both ESS small, the gap "
         "there a lower bound); beside them the training meter at the end of the fine-tune (its last tenth of "
         "steps, on each γ's own trusted requests).\n"),
        ("| task | γ | accuracy | digit fidelity | feature-FID | mean KL | log Z − J, common requests | "
         "log Z − J, all requests (flagged) | training meter |"), "|---" * 9 + "|",
        *[f"| {task} | {g:g} | {v['accuracy']:.3f} | {v['digit_fidelity']:.3f} | {v['feature_fid']:.1f} | "
          f"{v['mean_kl']:.1f} | {v['meter_common']:.2f} ({v['common_requests']}) | {v['meter_all']:.2f} "
          f"({v['flagged']}) | {v['final_gap']:.1f} |" for task, sweep in results["gamma"].items()
          for g, v in sweep.items()], "",
        "## Sample grids (rows = requested y, columns = digit c; the first seed)\n",
        "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
        *[f"| {m} | " + " | ".join(f"![{t} {m}]({rel[f'grid-{t}-{m}']})" for t in tasks) + " |"
          for m in next(iter(tasks.values()))["best"]], "",
        "## Beside the paper\n",
        paper_section(results),
    ]
    lines += fronts
    if results.get("efficiency") is not None:
        lines += efficiency_section(size, results["efficiency"], rel)
    lines += rest
    return "\n".join(lines)

def efficiency_section(size: BenchSize, efficiency: dict, rel: dict[str, str]) -> list[str]:
    """The sample-efficiency study's table: CTRL from N pairs against CFG from N triplets."""
    return [
        "## Sample efficiency: CTRL's pairs against CFG's triplets\n",
        (f"![sample efficiency]({rel['efficiency']})\n\nCTRL fits its classifier on N pairs (x, y) alone (no base "
         "samples) and fine-tunes by RL; CFG is the same augmented model trained by score matching on N triplets "
         "(x, c, y), sampled at the w that its grid search chose for that N. The classifier trains for at least "
         f"{C.preset(size.preset).classifier.min_steps} optimiser steps whatever N ("
         + ", ".join(f"{classifier_steps(_train(n, size), C.preset(size.preset).classifier)} at N = {n}"
                     for n in size.pairs)
         + f"; docs/tuning.md, section min-steps). Seeds {size.efficiency_seeds}, mean ± std.\n"),
        "| N | " + " | ".join(str(n) for n in size.pairs) + " |", "|---" * (len(size.pairs) + 1) + "|",
        *[f"| {name} {metric.replace('_', ' ')} | " + " | ".join(
            _ms([r[metric] for r in efficiency[name][n]]) for n in size.pairs) + " |"
          for name in ("ctrl", "cfg") for metric in ("accuracy", "digit_fidelity")],
        "| CFG's w | " + " | ".join(f"{efficiency['cfg_w'][n]:g}" for n in size.pairs) + " |", "",
        efficiency_claim(efficiency, size.pairs), ""]

def efficiency_claim(eff: dict, pairs: list[int]) -> str:
    """The paper's sample-efficiency claim at our scale: CTRL from a quarter of the data against CFG from all."""
    few, most = (pairs[-2], pairs[-1]) if len(pairs) > 1 else (pairs[0], pairs[0])
    mean = (lambda name, n, key: float(np.mean([r[key] for r in eff[name][n]])))
    da = mean("ctrl", few, "accuracy") - mean("cfg", most, "accuracy")
    df = mean("ctrl", few, "digit_fidelity") - mean("cfg", most, "digit_fidelity")
    return (f"CTRL from {few:,} pairs against CFG from {most:,} triplets: accuracy {mean('ctrl', few, 'accuracy'):.3f} "
            f"against {mean('cfg', most, 'accuracy'):.3f} ({da:+.3f}), digit fidelity "
            f"{mean('ctrl', few, 'digit_fidelity'):.3f} against {mean('cfg', most, 'digit_fidelity'):.3f} ({df:+.3f}).")

def _train(n: int, size: BenchSize) -> int:
    """Pairs the classifier trains on out of n (the share held back for calibration excluded)."""
    return n - held_back(n, C.preset(size.preset).classifier)

def paper_section(results: dict) -> str:
    """Our numbers beside the paper's (METHOD.md §5): same metrics, a different scale and model."""
    def mean(task, method, key):
        return float(np.mean([key(r[method]) for r in results["tasks"][task]["runs"].values()]))

    rows = [(q, p, task, method, key) for q, p, task, method, key in [
        ("compress4, reconstruction guidance: accuracy", "0.449", "compress4", "dps",
         lambda m: m["compress4"]["accuracy"]),
        ("compress4, reconstruction guidance: macro-F1", "0.446", "compress4", "dps",
         lambda m: m["compress4"]["macro_f1"]),
        ("compress4, CTRL: accuracy", "not given as one number", "compress4", "ctrl",
         lambda m: m["compress4"]["accuracy"]),
        ("2×2, CTRL: joint accuracy", "\"over 90%\"", "multi", "ctrl", lambda m: m["joint_accuracy"]),
        ("2×2, reconstruction guidance: hard corner", "8 / 128 compressible = 0.06", "multi", "dps",
         lambda m: m["per_corner"][HARD_CORNER]),
    ] if task in results["tasks"]]
    lines = [("The paper fine-tunes Stable Diffusion v1.5 (512 px, animal prompts) with compressibility measured on "
             "512×512 JPEGs and an aesthetic predictor; we fine-tune a 0.62 M-parameter digit model at 16 px, with "
             "thickness standing in for aesthetics. The metric is the same (the oracle label of the generated image "
             "against the requested one, 128 per class); the scale, the model and the difficulty are not, so the "
             "columns are not a reproduction, only the same question asked of a smaller system.\n"),
             "| quantity | paper (SD v1.5) | ours (digits, 16 px) |", "|---|---|---|"]
    lines += [f"| {q} | {p} | {mean(task, method, key):.3f} |" for q, p, task, method, key in rows]
    return "\n".join(lines) + "\n"
