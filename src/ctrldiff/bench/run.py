"""`ctrldiff bench` end to end: every method on both tasks over seeds, sample efficiency, the target's fronts;
then bench.json, the figures and the report."""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path

from tqdm import tqdm

from ..io import CtrlDiffError, read_json, write_json, write_section
from ..pipeline import controls_of, load_reward_terms
from ..plots import grid_of
from ..tracking import trackers_for
from .figures import write_figures
from .fronts import accuracy, fronts, point
from .grid import (
    PARTS,
    SIZES,
    TASKS,
    TUNE_SEED,
    BenchSize,
    efficiency_config,
    machine,
    restrict,
    section,
    settings,
    task_config,
    task_seeds,
    tasks_of,
)
from .stages import environment, gamma_sweep, measure, prepare, real_floor, train_all, training_time
from .tables import report


def run_task(size: BenchSize, task: str, out: Path, env: dict, bar) -> dict:
    """Every method on one task: its grid measured on each seed's models (the fronts; sampling seed TUNE_SEED),
    each method's setting chosen on the first seed's, then measured on each seed's own models; and CTRL over
    gamma on each seed (`gamma_sweep`)."""
    controls = list(TASKS[task])
    runs, best, tuning, gammas, images = {}, {}, {}, {}, {}
    for seed in task_seeds(size, task):
        cfg = task_config(size, TASKS[task], seed)
        bar.set_postfix_str(f"{task} seed {seed}: classifiers, CTRL, CFG")
        paths = prepare(cfg, out / task / f"seed{seed}", report_to=env["report_to"], resume=env["resume"])
        tune_cfg = copy.deepcopy(cfg)
        tune_cfg.eval.per_class = size.tune_per_class
        tuning[seed] = []
        for name, grid in size.grid.items():
            rows = []
            for knobs in settings(grid):
                bar.set_postfix_str(f"{task} seed {seed}: grid {name} {knobs}")
                rows.append((knobs, measure(tune_cfg, paths, name, knobs, env, TUNE_SEED)[0]))
            tuning[seed] += [point(name, k, m, controls) for k, m in rows]
            best.setdefault(name, max(rows, key=lambda r: accuracy(r[1], controls))[0])
        runs[seed] = {}
        for name, knobs in best.items():
            bar.set_postfix_str(f"{task} seed {seed}: {name}")
            metrics, imgs, cond = measure(cfg, paths, name, knobs, env, seed)
            runs[seed][name] = metrics
            if not images.get(name):
                images[name] = grid_of(imgs, cond, controls_of(cfg))
        bar.update()
        gammas[seed] = gamma_sweep(size, task, seed, out, env, bar, table=not gammas)
    return {"controls": controls, "best": best, "tuning": tuning, "runs": runs, "gamma": gammas, "grids": images}

def sample_efficiency(size: BenchSize, out: Path, env: dict, bar) -> dict:
    """compress4: CTRL from N pairs (x, y) against CFG from N triplets (x, c, y), one whole pipeline per N and seed.
    The reward classifier sees the N pairs alone (no base samples) and trains for at least
    `classifier.min_steps` steps whatever N; CFG's w is tuned per N (on the first seed's model, sampling seed
    TUNE_SEED) as CTRL's gamma is fixed. Accuracy and digit fidelity of both."""
    result: dict = {"ctrl": {}, "cfg": {}, "cfg_w": {}}
    for n in size.pairs:
        for seed in size.efficiency_seeds:
            bar.set_postfix_str(f"sample efficiency N={n} seed {seed}")
            cfg = efficiency_config(size, n, seed)
            paths = prepare(cfg, out / "efficiency" / f"n{n}-seed{seed}", report_to=env["report_to"],
                            resume=env["resume"], noisy=False)  # only CTRL and CFG are measured here
            if n not in result["cfg_w"]:
                tune_cfg = copy.deepcopy(cfg)
                tune_cfg.eval.per_class = size.tune_per_class
                result["cfg_w"][n] = max(size.grid["cfg"]["w"], key=lambda w: measure(
                    tune_cfg, paths, "cfg", {"w": w}, env, TUNE_SEED)[0]["compress4"]["accuracy"])
            for name, knobs in [("ctrl", {}), ("cfg", {"w": result["cfg_w"][n]})]:
                m = measure(cfg, paths, name, knobs, env, seed)[0]
                result[name].setdefault(n, []).append({"accuracy": m["compress4"]["accuracy"],
                                                       "digit_fidelity": m["digit_fidelity"]})
            bar.update()
    return result

def target_curve(size: BenchSize, task: str, out: Path, env: dict) -> list[dict]:
    """The target p_gamma over the gamma grid (every control at that gamma), by importance sampling over the bank
    with the task's first seed's reward classifiers, at the grid search's sample count: the front CTRL aims at."""
    from ..pipeline import target_bank
    from ..target import target_metrics

    first = task_seeds(size, task)[0]
    cfg = task_config(size, TASKS[task], first)
    terms = load_reward_terms(cfg, out / task / f"seed{first}" / "classifiers")
    bank, controls = target_bank(cfg, env["backend"], progress=False), controls_of(cfg)
    rows = []
    for gamma in size.gammas:
        for t in terms:
            t.gamma = gamma
        m = target_metrics(env["backend"], bank, terms, controls, size.tune_per_class, env["oracle"], env["real"],
                           TUNE_SEED, cfg.target.min_ess)[0]
        rows.append(point("target", {"gamma": gamma}, m, list(TASKS[task])) | {"untrusted": m["untrusted_cells"]})
    return rows

def figures_dir(docs: Path, name: str) -> Path:
    """Where the bench's section `name` keeps its figures: figures/ for the whole bench, figures/<name>/ for a part."""
    return docs / "figures" / ("" if name == "bench" else name)

def run_bench(size_name: str = "full", out: str | Path = "runs/bench", docs: str | Path | None = None,
              progress: bool = True, report_to: str = "none", resume: bool = False, jobs: int = 1,
              parts: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """Run the benchmark; returns the results and writes `<docs>/benchmarks.md` (section `bench`) + figures.
    report_to: every training run (classifiers, CTRL, CFG, the gamma sweep) also logs to these trackers.
    resume: reuse what an interrupted bench in `out` finished under the same configs (models, measurements).
    jobs: with more than 1, every model is trained first, that many at a time in worker processes
    (`train_all`); the measurements follow in this process, alone on the machine (their seconds per sample are
    a column).
    parts, seeds: run only these parts (`grid.PARTS`) on these seeds (`grid.restrict`); the report goes to a
    section and figures/ subfolder of its own (`grid.section`), and the models to the whole bench's folders."""
    if report_to != "none":
        trackers_for(report_to)  # fail before any work
    parts = list(PARTS if parts is None else parts)
    size, name = restrict(SIZES[size_name], parts, seeds), section(parts, seeds)
    out = Path(out)
    docs = Path(docs) if docs is not None else out / "docs"
    t0 = time.time()
    if jobs > 1:
        train_all(size, out, resume, report_to, jobs, progress)
    env = environment(size.preset, report_to, resume=resume or jobs > 1)  # jobs > 1: the models just trained
    total = len(size.seeds) + len(size.multi_seeds) + len(size.pairs) * len(size.efficiency_seeds)
    with tqdm(total=total, desc=f"bench ({size_name})", disable=not progress, dynamic_ncols=True) as bar:
        tasks = {task: run_task(size, task, out, env, bar) for task in tasks_of(size)}
        efficiency = sample_efficiency(size, out, env, bar) if size.efficiency_seeds else None
        bar.set_postfix_str("the target's fronts")
        targets = {task: target_curve(size, task, out, env) for task in tasks}
    first = {task: next(iter(tasks[task]["runs"])) for task in tasks}
    results = {"size": size_name, "parts": parts, "seeds": seeds,
               "tasks": {k: {kk: vv for kk, vv in v.items() if kk not in ("grids", "tuning", "gamma")}
                         for k, v in tasks.items()},
               "efficiency": efficiency, "gamma": {task: tasks[task]["gamma"][first[task]] for task in tasks},
               "fronts": {task: fronts(tasks[task], first[task], targets[task]) for task in tasks},
               "front_seeds": {task: [fronts(tasks[task], s) for s in tasks[task]["runs"]] for task in tasks},
               "seconds": time.time() - t0, "real": real_floor(env, size.preset),
               "resumed": resume, "jobs": jobs, "training": training_time(size, out),
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "machine": machine()}
    write_json(out / f"{name}.json", results, sort_keys=False)  # the methods' and knobs' order is the report's
    folder = figures_dir(docs, name)
    figures = write_figures(folder, tasks, efficiency, results["gamma"], results["fronts"])
    write_section(docs / "benchmarks.md", name, report(size_name, size, results, figures, docs))
    return results

def rewrite_report(out: str | Path, docs: str | Path | None = None, parts: list[str] | None = None,
                   seeds: list[int] | None = None) -> dict:
    """Rewrite a bench's section (`parts` and `seeds` as it ran) from its finished run's json and figures (no sampling,
    no training)."""
    out = Path(out)
    docs = Path(docs) if docs is not None else out / "docs"
    parts = list(PARTS if parts is None else parts)
    name = section(parts, seeds)
    results = read_json(out / f"{name}.json")
    if results["efficiency"] is not None:
        results["efficiency"].update({k: {int(n): v for n, v in results["efficiency"][k].items()}
                                      for k in ("ctrl", "cfg", "cfg_w")})
    results["gamma"] = {t: {float(g): v for g, v in sweep.items()} for t, sweep in results["gamma"].items()}
    folder = figures_dir(docs, name)
    figures = {"gamma": folder / "gamma_sweep.png"} if results["tasks"] else {}
    if results["efficiency"] is not None:
        figures["efficiency"] = folder / "sample_efficiency.png"
    for t, task in results["tasks"].items():
        figures |= {f"front-{t}": folder / f"front-{t}.png"} | {f"grid-{t}-{m}": folder / f"grid-{t}-{m}.png"
                                                               for m in task["best"]}
    missing = [str(p) for p in figures.values() if not p.is_file()]
    if missing:
        raise CtrlDiffError(f"missing figure {missing[0]}; run `ctrldiff bench` with the same --docs first")
    size = restrict(SIZES[results["size"]], parts, seeds)
    write_section(docs / "benchmarks.md", name, report(results["size"], size, results, figures, docs))
    return results
