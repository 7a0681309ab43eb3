"""The bench's figures (matplotlib, Agg): the fronts, sample efficiency, the γ trade-off, sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import save_grid
from .fronts import ms_per_sample
from .grid import TASK_TITLES


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path

FRONT_STYLE = {"base": {"marker": "*", "ms": 12, "ls": "none"}, "target": {"marker": "s", "ls": "--", "color": "black"}}

def front_figure(task: str, curves: dict[str, list[dict]], path: Path) -> Path:
    """Accuracy against digit fidelity and against feature-FID, one curve per method along its knob (the base a
    star, the target dashed), each method's cost per sample in the legend."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["digit_fidelity"])
        span = sorted({f"{v:.0f}" for v in ms_per_sample(pts)}, key=float)
        cost = f" ({span[0]}–{span[-1]} ms/sample)" if len(span) > 1 else (
            f" ({span[0]} ms/sample)" if span else " (from the bank)")
        for ax, key in zip(axes, ("digit_fidelity", "feature_fid")):
            ax.plot([p[key] for p in pts], [p["accuracy"] for p in pts], **FRONT_STYLE.get(method, {"marker": "o"}),
                    label=method + cost if ax is axes[0] else None)
    axes[0].set(xlabel="digit fidelity (fraction whose oracle digit is the requested c)",
                ylabel="accuracy (oracle; joint on the 2×2 task)")
    axes[1].set(xlabel="feature-FID to real digits (lower is better)")
    fig.legend(loc="center right", fontsize=7)
    fig.suptitle(f"Accuracy against quality along each method's knob: {TASK_TITLES[task]}")
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    return _save(fig, path)

def efficiency_figure(efficiency: dict, path: Path) -> Path:
    """CTRL's accuracy and digit fidelity from N pairs beside CFG's from N triplets, mean ± std over seeds."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in [("ctrl", "CTRL from N pairs (x, y)"), ("cfg", "CFG from N triplets (x, c, y), w tuned per N")]:
        ns = sorted(efficiency[key])
        for ax, metric in zip(axes, ("accuracy", "digit_fidelity")):
            vals = [[r[metric] for r in efficiency[key][n]] for n in ns]
            ax.errorbar(ns, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], marker="o", capsize=3,
                        label=label)
    axes[0].axhline(0.25, color="grey", lw=0.8, ls=":", label="chance (4 classes)")
    axes[0].set(xscale="log", xlabel="labelled examples N", ylabel="compress4 accuracy (oracle)", ylim=(0, 1))
    axes[1].set(xscale="log", xlabel="labelled examples N", ylabel="digit fidelity", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    fig.suptitle("Sample efficiency on compress4 (mean ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)

def gamma_figure(gammas: dict, path: Path) -> Path:
    """CTRL's accuracy against feature-FID and against its path KL to the base, one line per task over γ."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for task, sweep in gammas.items():
        gs = sorted(sweep)
        for ax, key, label in [(axes[0], "feature_fid", "feature-FID (lower is closer to real digits)"),
                               (axes[1], "mean_kl", "mean path KL to the base (nats)")]:
            ax.plot([sweep[g][key] for g in gs], [sweep[g]["accuracy"] for g in gs], "o-", label=task)
            for g in gs:
                ax.annotate(f"γ={g:g}", (sweep[g][key], sweep[g]["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
            ax.set(xlabel=label, ylabel="accuracy (oracle; joint on the 2×2 task)")
    axes[0].legend(fontsize=7)
    fig.suptitle("CTRL's γ trade-off (every control at γ)")
    fig.tight_layout()
    return _save(fig, path)

def write_figures(folder: Path, tasks: dict, efficiency: dict | None, gammas: dict, curves: dict) -> dict[str, Path]:
    """Every figure of the parts a bench ran, under `folder`; their paths by the report's keys."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    if efficiency is not None:
        figures["efficiency"] = efficiency_figure(efficiency, folder / "sample_efficiency.png")
    if gammas:
        figures["gamma"] = gamma_figure(gammas, folder / "gamma_sweep.png")
    for task, task_curves in curves.items():
        figures[f"front-{task}"] = front_figure(task, task_curves, folder / f"front-{task}.png")
    for task, result in tasks.items():
        for method, grid in result["grids"].items():
            figures[f"grid-{task}-{method}"] = folder / f"grid-{task}-{method}.png"
            save_grid(*grid, figures[f"grid-{task}-{method}"])
    return figures
