"""`ctrldiff demo`: classifier -> CTRL -> sample -> evaluate for each preset, side by side on a multi-core CPU.

Each preset is one process with its share of the cores: on the 2-core box a step of the default fine-tune
takes 2.11 s alone on both cores and 2.4-3.3 s per worker with two side by side on one core each, so the pair
finishes sooner than in turn (README, Quick start). A worker's own output goes to <out>/<preset>.log; this
process draws one bar per preset from the metrics.jsonl its run writes (classifier epochs, then the fine-tune's
steps, then the evaluation).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, wait
from pathlib import Path

from .config import Config
from .io import CtrlDiffError, worker_pool, worker_threads
from .runs import Run, read_records


def run_preset(name: str, cfg: Config, root: Path, overwrite: bool, report_to: str | None) -> str:
    """One preset of the demo in this process; returns its results table (markdown)."""
    from .methods import build_method
    from .pipeline import controls_of, finetune_from, run_evaluate
    from .report import results_table

    run = Run(root / name, cfg, overwrite, report_to=report_to)
    model, backend, terms = finetune_from(cfg, run)
    ctrl = build_method("ctrl", backend, {"w": cfg.eval.guidance}, steps=cfg.sampler.steps, eta=cfg.sampler.eta,
                        model=model.merge_lora())
    results = run_evaluate(cfg, run, [ctrl], backend, terms=terms)
    return f"### {name}: {' x '.join(cfg.rl.controls)}\n\n" + results_table(results, controls_of(cfg))


def _worker(name: str, cfg: Config, root: Path, overwrite: bool, report_to: str | None, threads: int) -> str:
    """run_preset in a worker process: `threads` CPU threads, its stdout and stderr (progress bars, warnings)
    to <root>/<name>.log."""
    import torch

    torch.set_num_threads(threads)
    log = os.open(root / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(log, 1), os.dup2(log, 2)
    os.close(log)
    return run_preset(name, cfg, root, overwrite, report_to)


def _stage(records: list[dict], steps: int) -> tuple[int, str]:
    """(fine-tune steps done, what the run is doing) from its metrics.jsonl."""
    done = [r["step"] + 1 for r in records if "kl" in r and "step" in r]
    if done:
        return max(done), ("evaluating" if max(done) >= steps else "fine-tune")
    fits = [r for r in records if "classifier" in r]
    return 0, (f"fitting {fits[-1]['classifier']}, epoch {fits[-1]['epoch'] + 1}" if fits else "starting")


def run_side_by_side(cfgs: dict[str, Config], root: Path, overwrite: bool, report_to: str | None,
                     jobs: int) -> list[str]:
    """Every preset in its own process (`jobs` at a time), with one progress bar each; the tables in order. A
    preset that fails leaves the others running; the error names it and its log."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    print(f"{len(cfgs)} preset(s), {jobs} at a time in worker processes of {worker_threads(jobs)} "
          f"thread(s); their output in {', '.join(str(root / f'{n}.log') for n in cfgs)}")
    t0 = time.time()
    form = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} fine-tune steps [{elapsed}{postfix}]"
    bars = {n: tqdm(total=cfg.rl.steps, desc=n, position=i, dynamic_ncols=True, bar_format=form)
            for i, (n, cfg) in enumerate(cfgs.items())}
    with worker_pool(jobs) as (pool, threads):
        futures = {n: pool.submit(_worker, n, cfg, root, overwrite, report_to, threads) for n, cfg in cfgs.items()}
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=2.0, return_when=FIRST_EXCEPTION)
            for n, bar in bars.items():
                log = root / n / "metrics.jsonl"  # an older run's, until this one's worker replaces it
                fresh = log.is_file() and log.stat().st_mtime >= t0
                step, stage = _stage(read_records(root / n) if fresh else [], cfgs[n].rl.steps)
                if futures[n].done():
                    stage = "failed" if futures[n].exception() is not None else "done"
                bar.n = step
                bar.set_postfix_str(stage, refresh=True)
    for bar in bars.values():
        bar.close()
    failed = {n: f.exception() for n, f in futures.items() if f.exception() is not None}
    if failed:
        n, error = next(iter(failed.items()))
        raise CtrlDiffError(f"demo preset {n!r} failed: {error} (its output: {root / f'{n}.log'})")
    return [futures[n].result() for n in cfgs]
