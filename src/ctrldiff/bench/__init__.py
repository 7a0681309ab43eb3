"""`ctrldiff bench`: the CTRL paper's evaluation at our scale, in one command.

Tables (single control compress4; the 2x2 multi-task thickness2 x compress2) with every method at its best
setting from a documented grid, mean ± std over seeds; every method's accuracy-quality front along its knob with
the target p_gamma's beside it, and the best accuracy each reaches at a digit fidelity level; figures (the fronts,
sample efficiency of CTRL's pairs against CFG's triplets, the gamma trade-off, sample grids per method); and our
numbers beside the paper's. Writes the `bench` section of `<docs>/benchmarks.md` and PNGs under `<docs>/figures/`.

A seed is one whole pipeline: classifiers, CTRL, CFG and every method's sampling. The grid runs on every seed's
models (each seed's fronts; CTRL's gamma sweep starts from that seed's gamma-10 model) with a separate sampling
seed, at `tune_per_class` samples per class; each method's reported setting is chosen on seed 0's.
`run_bench(parts=, seeds=)` runs a part of it (a task or the sample-efficiency study, on chosen seeds) into the same
model folders and a report section of its own.

Modules: `grid` (sizes, tasks, knob grids), `stages` (models and measurements on disk, the γ sweep), `fronts`
(front geometry, pure), `tables` and `figures` (the report), `run` (the whole bench).
"""

from .fronts import best_at, envelope, pareto, point
from .grid import GRID, PARTS, SIZES, TASKS, BenchSize, machine
from .run import rewrite_report, run_bench
from .stages import environment, final_gap, gamma_dir, measure, stage, training_waves
from .tables import against_ctrl, front_table

__all__ = [
           "GRID",
           "PARTS",
           "SIZES",
           "TASKS",
           "BenchSize",
           "against_ctrl",
           "best_at",
           "envelope",
           "environment",
           "final_gap",
           "front_table",
           "gamma_dir",
           "machine",
           "measure",
           "pareto",
           "point",
           "rewrite_report",
           "run_bench",
           "stage",
           "training_waves",
]
