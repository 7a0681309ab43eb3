"""One CTRL task of a benchmark (fine-tune, then evaluate against the target), each in its own process so that its
peak memory and time are its own; several at a time on the 2-core box (one thread each)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ctrldiff import config as C
from ctrldiff.io import write_json
from ctrldiff.methods import build_method
from ctrldiff.pipeline import (
    backend_for,
    controls_of,
    fit_reward_terms,
    load_reward_terms,
    method_for,
    run_evaluate,
    run_finetune,
)
from ctrldiff.report import results_table
from ctrldiff.runs import Run


def ctrl_task(preset: str, overrides: list[str], out: Path, classifiers: Path | None = None,
              baselines: dict | None = None) -> dict:
    """classifier (or the ones in `classifiers`) -> CTRL -> evaluate with the target and its yardstick beside base,
    CTRL and `baselines` ({method: knobs}); a run folder cut short is resumed (same config)."""
    cfg = C.apply_overrides(C.preset(preset), overrides)
    resume = (out / "config.json").is_file() and C.config_diff(json.loads((out / "config.json").read_text()),
                                                               cfg.to_dict()) is None
    # a finished run re-entered (say, its row relabelled) skips the fine-tune: keep the peak it had then
    earlier = out / "result.json"
    earlier_peak = json.loads(earlier.read_text()).get("peak_rss_gb", 0.0) if resume and earlier.is_file() else 0.0
    run = Run(out, cfg, overwrite=not resume, resume=resume)
    t0 = time.time()
    if classifiers is None:
        terms, reports = fit_reward_terms(cfg, run, progress=False)
    else:
        terms, reports = load_reward_terms(cfg, classifiers), {"from": str(classifiers)}
    t_clf = time.time() - t0
    backend = backend_for(cfg)
    model, summary = run_finetune(cfg, run, terms, backend, progress=False)
    methods = [build_method("ctrl", backend, {"w": cfg.eval.guidance}, steps=cfg.sampler.steps, eta=cfg.sampler.eta,
                            model=model.merge_lora())]
    folder = classifiers or out
    methods += [method_for(cfg, name, backend, knobs, out / "ctrl.safetensors", folder)
                for name, knobs in (baselines or {}).items()]
    results = run_evaluate(cfg, run, methods, backend, progress=False, terms=terms)
    records = run.records()
    return {"preset": preset, "overrides": overrides, "config": cfg.to_dict(), "classifiers": reports,
            "classifier_seconds": t_clf, "finetune_seconds": summary["seconds"], "results": results,
            "table": results_table(results, controls_of(cfg)), "run": str(out),
            "gap_curve": [r["gap"] for r in records if "gap" in r],
            "gap_all_curve": [r["gap_all"] for r in records if "gap_all" in r],
            "step_seconds": [r["seconds"] for r in records if "seconds" in r],
            "peak_rss_gb": max(earlier_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)}


def run_tasks(script: str, jobs: list[tuple[str, list[str], Path]], parallel: int, threads: int = 1,
              extra: list[str] | None = None) -> list[dict]:
    """Each job (preset, overrides, out) as `python <script> task ...` in its own process (`threads` each when
    several run at once); results in job order. Each task writes its result.json into its run folder, so a sweep
    cut short keeps what it finished, and a finished one is not run again."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if parallel > 1 else dict(os.environ)
    procs, results = [], [None] * len(jobs)
    pending = []
    for i, (preset, overrides, out) in enumerate(jobs):
        done = out / "result.json"
        if done.is_file() and json.loads(done.read_text())["overrides"] == overrides:
            results[i] = json.loads(done.read_text())
        else:
            pending.append((i, (preset, overrides, out)))
    while pending or procs:
        while pending and len(procs) < parallel:
            i, (preset, overrides, out) = pending.pop(0)
            cmd = [sys.executable, script, "task", "--preset", preset, "--out", str(out), *(extra or [])]
            cmd += [x for o in overrides for x in ("--set", o)]
            procs.append((i, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)))
        i, p = procs.pop(0)
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"task {jobs[i]} failed with exit code {p.returncode}")
        results[i] = json.loads(stdout.split("RESULT ", 1)[1])
        print(f"done: {jobs[i][0]} {jobs[i][1]}", flush=True)
    return results


def task_main(args, **kw) -> None:
    """The `task` part of a benchmark script: one ctrl_task, its result.json, and its result on stdout."""
    result = ctrl_task(args.preset, args.overrides, args.out, **kw)
    write_json(args.out / "result.json", result)
    print("RESULT " + json.dumps(result))


def gap_trend(gaps: list[float], parts: int = 5) -> str:
    """The meter's mean over consecutive fifths of training: its trend in a few numbers."""
    chunks = np.array_split(np.array(gaps), parts)
    return " → ".join(f"{c.mean():.1f}" for c in chunks if len(c))


def acc(m: dict) -> float:
    """Joint accuracy for several controls, else the one control's."""
    return m.get("joint_accuracy", next(v["accuracy"] for v in m.values() if isinstance(v, dict) and "accuracy" in v))
