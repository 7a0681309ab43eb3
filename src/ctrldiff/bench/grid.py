"""The bench's sizes, tasks and knob grids: what `ctrldiff bench` runs, and the config of one of its runs."""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
from dataclasses import dataclass, field

import torch

from .. import config as C

GRID: dict[str, dict[str, list]] = {  # each method's knob grid (the other knobs at their defaults)
    "base": {},
    "ctrl": {"w": [1.0]},  # CTRL as shipped (no guidance on y)
    "cfg": {"w": [1.0, 2.0, 4.0, 8.0]},
    "dps": {"w": [0.1, 0.3, 1.0]},  # w = 3 collapses (digit fidelity 0.14 in a first probe, docs/baselines.md)
    "classifier": {"w": [3.0, 10.0, 30.0]},
    "mpgd": {"w": [0.3, 1.0, 3.0]},
    "smc": {"particles": [4, 8], "w": [0.0, 1.0]},
    "svdd": {"candidates": [4, 20], "alpha": [0.1, 0.3]},
    "best_of_n": {"n": [4, 16]},
    "ctrl_smc": {"particles": [2, 4, 8]},  # SMC proposing with CTRL's chain (2 passes per particle and step)
}

QUICK_GRID = {"base": {}, "ctrl": {"w": [1.0]}, "cfg": {"w": [1.0, 2.0]}, "dps": {"w": [0.3]},
              "classifier": {"w": [10.0]}, "mpgd": {"w": [1.0]}, "smc": {"particles": [2], "w": [1.0]},
              "svdd": {"candidates": [2], "alpha": [0.1]}, "best_of_n": {"n": [2]},
              "ctrl_smc": {"particles": [2]}}

TUNE_SEED = 101  # sampling seed of the grid search, apart from the seeds of the reported runs

HARD_CORNER = "thickness2=1,compress2=0"  # thick yet compressible (METHOD.md §5's hard corner, our analogue)

@dataclass
class BenchSize:
    preset: str  # base preset of every run (its controls are replaced per task)
    seeds: list[int]  # the single-control table's seeds
    multi_seeds: list[int]  # the 2x2 table's (fewer: the full run's time budget)
    per_class: int  # samples per class (per joint class for the 2x2 task) in the reported runs
    tune_per_class: int
    grid: dict = field(default_factory=lambda: GRID)
    pairs: list[int] = field(default_factory=lambda: [100, 300, 1000, 4000])  # sample-efficiency study
    efficiency_seeds: list[int] = field(default_factory=lambda: [0, 1])
    gammas: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0, 30.0, 100.0])
    gamma_steps: int | None = 60  # the gamma sweep's fine-tunes start from the task's own CTRL model (gamma 10)
    # and run this many steps (None: from scratch, rl.steps): docs/benchmarks.md, section gamma-warm
    gamma_rate: float = 0.1  # ... at this fraction of the preset's learning rates: at the full rates a warm start
    # at gamma 100 collapsed (digit fidelity 0.12); a tenth ended 0.6-17.6 nats nearer each gamma's target
    # (docs/benchmarks.md, section gamma-rate)

SIZES = {
    "full": BenchSize("default", [0, 1, 2], [0], 128, 128),
    "quick": BenchSize("tiny", [0, 1], [0], 2, 1, QUICK_GRID, [20, 40], [0], [1.0, 10.0], 2),  # a smoke run: minutes
}

TASKS = {"compress4": {"compress4": 10.0}, "multi": {"thickness2": 10.0, "compress2": 10.0}}

PARTS = [*TASKS, "efficiency"]  # what `ctrldiff bench --parts` can pick: each task, and the sample-efficiency study

TASK_TITLES = {"compress4": "compress4 (4 JPEG-size classes)", "multi": "the 2×2 task thickness2 × compress2"}

def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"

def settings(grid: dict) -> list[dict]:
    return [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]

def task_config(size: BenchSize, controls: dict, seed: int, **overrides) -> C.Config:
    cfg = C.preset(size.preset)
    cfg.rl.controls, cfg.seed, cfg.eval.per_class = dict(controls), seed, size.per_class
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def task_seeds(size: BenchSize, task: str) -> list[int]:
    return size.seeds if task == "compress4" else size.multi_seeds


def efficiency_config(size: BenchSize, n: int, seed: int) -> C.Config:
    """The sample-efficiency study's pipeline: CTRL from n pairs (x, y), CFG from n triplets (x, c, y); the reward
    classifier sees the n pairs alone (no base samples)."""
    return task_config(size, TASKS["compress4"], seed, data__pairs=n, triplets__n=n, classifier__base_pairs=0)


def swept(size: BenchSize, task: str) -> list[float]:
    """The gammas of the sweep that need a fine-tune of their own (every gamma but the task's)."""
    return [g for g in size.gammas if dict.fromkeys(TASKS[task], g) != TASKS[task]]


def restrict(size: BenchSize, parts: list[str], seeds: list[int] | None = None) -> BenchSize:
    """The bench of `size` on `parts` alone (tasks of TASKS, "efficiency"), each on `seeds` (None: its own): a
    part without seeds is not run, and a finished part's models and measurements are the whole bench's."""
    def pick(part: str, own: list[int]) -> list[int]:
        return (list(own) if seeds is None else list(seeds)) if part in parts else []

    return dataclasses.replace(size, seeds=pick("compress4", size.seeds), multi_seeds=pick("multi", size.multi_seeds),
                               efficiency_seeds=pick("efficiency", size.efficiency_seeds))


def tasks_of(size: BenchSize) -> list[str]:
    """The tasks this (perhaps restricted) size runs."""
    return [t for t in TASKS if task_seeds(size, t)]


def section(parts: list[str], seeds: list[int] | None) -> str:
    """The benchmarks.md section (and figures/ subfolder) of a bench on `parts` and `seeds`: `bench` for the whole
    one, else its own (`bench-compress4-seed0`), so that a part never overwrites the whole bench's numbers."""
    if list(parts) == PARTS and seeds is None:
        return "bench"
    return "-".join(["bench", *parts] + ([f"seed{'+'.join(map(str, seeds))}"] if seeds is not None else []))
