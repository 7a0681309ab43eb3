"""Exactness study (issue 5): does CTRL sample p_gamma ∝ p̂(y|x)^gamma p_pre(x|c)? 2-D mixtures, known answer.

    python benchmarks/exactness.py [--out runs/exactness] [--samples 100000]

Writes docs/exactness.md and docs/figures/exactness-*.png; every number comes from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctrldiff.backends.mixture import MIXTURES, Grid, mixture_backend, sample_data
from ctrldiff.bench import machine
from ctrldiff.exactness import (
    CONTROL,
    TiltedStart,
    base_rollouts,
    ctrl_samples,
    distances,
    make_setup,
    rl_config,
    smc_samples,
    target_masses,
    train_ctrl,
)
from ctrldiff.io import write_text

ROOT = Path(__file__).resolve().parents[1]
GAMMAS, ETAS, POOL = [1.0, 3.0], [0.5, 1.0], 100_000
SMC_K, SMC_N = [1, 4, 16], 2_000


def mean_over(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "samples"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/exactness"))
    ap.add_argument("--samples", type=int, default=50_000, help="samples per (c, y) for the CTRL rows")
    ap.add_argument("--rl-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start, g = time.time(), torch.Generator().manual_seed(0)
    setup = make_setup(steps=args.steps)
    pairs, n = setup.conditions(), args.samples
    results: dict = {"steps": setup.steps, "samples": n}

    def log(msg):
        print(f"[{time.time() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    # --- 1. the exact base alone: how close does the sampler itself get to p_pre?
    results["base"] = {}
    for eta in ETAS:
        rows = []
        for c in range(setup.backend.num_c):
            _, x0 = base_rollouts(setup, c, n, eta, g)
            rows.append(distances(setup, x0, c, 0, 0.0, g))
        results["base"][eta] = mean_over(rows)
        log(f"base eta={eta}: {results['base'][eta]}")

    # --- 2. CTRL for each gamma and eta, sampled from N(0, I) and from the tilted start
    results["ctrl"], samples_for_figure = {}, {}
    for gamma in GAMMAS:
        for eta in ETAS:
            t0 = time.time()
            model, records = train_ctrl(setup, rl_config(setup, gamma, eta, steps=args.rl_steps))
            train_s = time.time() - t0
            tilt = TiltedStart(setup, gamma, eta, POOL, g)
            row = {"train_seconds": train_s, "final_kl": float(np.mean([r["kl"] for r in records[-20:]]))}
            for name, start in [("plain", None), ("tilted", tilt)]:
                per = []
                for c, y in pairs:
                    x = ctrl_samples(setup, model, c, y, n, eta, g, start)
                    per.append(distances(setup, x, c, y, gamma, g))
                    if (c, y) == (0, 0) and gamma == 3.0 and eta == 1.0:
                        samples_for_figure["CTRL, N(0, I) start" if name == "plain" else "CTRL, tilted start"] = x
                row[name] = mean_over(per)
                row[f"{name}_per_pair"] = per
            results["ctrl"][f"{gamma:g},{eta:g}"] = row
            log(f"ctrl gamma={gamma} eta={eta}: plain {row['plain']} tilted {row['tilted']} ({train_s:.0f} s)")

    # --- 3. SMC (TDS) with growing K on the exact base: the asymptotically exact reference
    results["smc"] = {}
    for k in SMC_K:
        x = smc_samples(setup, 0, 0, SMC_N, 1.0, 3.0, k, g)
        results["smc"][k] = distances(setup, x, 0, 0, 3.0, g)
        if k == SMC_K[-1]:
            samples_for_figure[f"SMC, K = {k}"] = x
        log(f"smc K={k}: {results['smc'][k]}")

    # --- 4. the official code's KL convention: mean over dimensions => gamma * d
    model, _ = train_ctrl(setup, rl_config(setup, 3.0, 1.0, steps=args.rl_steps, kl="mean"))
    x = ctrl_samples(setup, model, 0, 0, n, 1.0, g)
    samples_for_figure["KL mean over dims, γ = 3"] = x
    d = x.shape[1]
    results["official_kl"] = {"gamma": 3.0, "d": d,
                              "tv_to_gamma": distances(setup, x, 0, 0, 3.0, g),
                              "tv_to_gamma_times_d": distances(setup, x, 0, 0, 3.0 * d, g)}
    log(f"official KL: {results['official_kl']}")

    # --- 5. the realistic case: a denoiser learned by score matching, then CTRL
    results["learned"] = learned_case(n, args.rl_steps, args.steps, g, log)

    results["seconds"] = time.time() - t_start
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    figure(setup, samples_for_figure, ROOT / "docs" / "figures" / "exactness-c0-y0.png")
    write_text(ROOT / "docs" / "exactness.md", report(results, " ".join(sys.argv[1:])))
    print((ROOT / "docs" / "exactness.md").read_text())


def learned_case(n: int, rl_steps: int, steps: int, g: torch.Generator, log, pretrain_steps: int = 3000) -> dict:
    """An MLP denoiser trained by DSM on mixture samples (no exact score), then CTRL gamma = 3, eta = 1."""
    from ctrldiff.contracts import Cond
    from ctrldiff.pretrain import dsm_loss

    backend = mixture_backend(exact=False)
    net = backend.net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    t0 = time.time()
    for _ in range(pretrain_steps):
        c = torch.randint(0, len(MIXTURES), (512,), generator=g)
        x0 = sample_data(c, g)
        loss = dsm_loss(lambda x, t, cond: net(x, t, cond.c), backend.schedule, x0, Cond(c), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    setup = make_setup(steps=steps)
    setup.backend = backend
    base = mean_over([distances(setup, base_rollouts(setup, c, n, 1.0, g)[1], c, 0, 0.0, g) for c in range(2)])
    model, _ = train_ctrl(setup, rl_config(setup, 3.0, 1.0, steps=rl_steps))
    ctrl = mean_over([distances(setup, ctrl_samples(setup, model, c, y, n, 1.0, g), c, y, 3.0, g)
                      for c, y in setup.conditions()])
    log(f"learned: base {base} ctrl {ctrl}")
    return {"pretrain_seconds": time.time() - t0, "base": base, "ctrl": ctrl}


def figure(setup, samples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid: Grid = setup.grid
    panels = {"target p_γ (γ = 3)": target_masses(setup, 0, 0, 3.0)}
    panels.update({k: grid.histogram(v) for k, v in samples.items()})
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, m) in zip(axes, panels.items()):
        ax.imshow(m.T.numpy(), origin="lower", extent=[-grid.half, grid.half, -grid.half, grid.half], cmap="magma")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"ring of 8 modes (c = 0), y = 0 ({CONTROL.name}); histograms on a {grid.bins}² grid", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(r: dict, argv: str) -> str:
    lines = [
        "# Exactness: does CTRL sample p_γ? (2-D mixtures with a known answer)\n",
        (f"Produced by `python benchmarks/exactness.py {argv}` on {machine()}, {time.strftime('%Y-%m-%d')}; "
         f"wall time {r['seconds'] / 60:.1f} min. Nothing here is typed by hand.\n"),
        ("Setup (`ctrldiff.backends.mixture`, `ctrldiff.exactness`): c = 0 is a ring of 8 Gaussians (radius 2, "
         "std 0.25), c = 1 a 3×3 grid (spacing 1.5, std 0.25); the pre-trained ε-predictor is the exact noisy "
         "mixture score (no training error) plus a residual MLP that starts at zero, where CTRL's adapters act "
         "(control embedding + LoRA rank 8 on the MLP). p̂(y|x) is an analytic logistic in x with 3 classes "
         f"(directions 0°, 120°, 240°, slope 1.5). DDIM {r['steps']} steps, trailing spacing. CTRL: the same "
         "`rl.finetune` as the images, full back-propagation, KL summed over dimensions. Distances: total "
         f"variation on a {Grid().bins}² histogram over [-4, 4]² against the exact p_γ integrated on the same bins, "
         "and the largest per-mode mass error; each beside its sampling-noise floor (the same number for as many "
         f"exact draws of p_γ, by rejection). {r['samples']:,} samples per (c, y), means over the 6 (c, y).\n"),
        "## The sampler alone (exact base, γ = 0)\n",
        "| η | TV to p_pre | noise floor | mode-mass error | floor |", "|---|---|---|---|---|",
        *[f"| {eta} | {v['tv']:.4f} | {v['tv_floor']:.4f} | {v['mode_error']:.4f} | {v['mode_error_floor']:.4f} |"
          for eta, v in r["base"].items()], "",
        "## CTRL against the exact p_γ, with and without the start correction\n",
        ("The start correction: x_T drawn from ν*(x_T) ∝ N(x_T; 0, I)·E_pre[p̂(y|x_0)^γ | x_T] by "
         f"sampling-importance-resampling from {POOL:,} base rollouts per c (each x_T weighted by p̂(y | its own "
         "x_0)^γ, an unbiased estimate of exp v(x_T)). It needs no training and is exact as the pool grows; the "
         "fine-tuned policy is the same (the soft-optimal transitions do not depend on the start), only its "
         "start changes. A memoryless schedule would need a different sampler for the base as well.\n"),
        "| γ | η | TV, N(0, I) start | TV, tilted start | noise floor | mode error, N(0, I) | mode error, tilted | final KL (nats) | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, v in r["ctrl"].items():
        gamma, eta = key.split(",")
        lines.append(f"| {gamma} | {eta} | {v['plain']['tv']:.4f} | {v['tilted']['tv']:.4f} | "
                     f"{v['plain']['tv_floor']:.4f} | {v['plain']['mode_error']:.4f} | {v['tilted']['mode_error']:.4f} "
                     f"| {v['final_kl']:.2f} | {v['train_seconds']:.0f} |")
    lines += ["", "![target vs samples](figures/exactness-c0-y0.png)\n",
              (f"## SMC (TDS) with growing K, the asymptotically exact reference (c = 0, y = 0, γ = 3, η = 1, "
              f"{SMC_N:,} samples)\n"),
              "| K | TV | noise floor | mode error |", "|---|---|---|---|",
              *[f"| {k} | {v['tv']:.4f} | {v['tv_floor']:.4f} | {v['mode_error']:.4f} |" for k, v in r["smc"].items()],
              "", "## The official code's KL convention\n"]
    o = r["official_kl"]
    lines += [(f"With the KL averaged over the d = {o['d']} dimensions instead of summed, CTRL at γ = {o['gamma']:g} "
               f"(c = 0, y = 0, η = 1) lands at TV {o['tv_to_gamma']['tv']:.4f} from p_γ but "
               f"{o['tv_to_gamma_times_d']['tv']:.4f} from p_(γ·d) = p_{o['gamma'] * o['d']:g}: the mean hides a factor d "
               "in γ. On SD-1.5 latents (d = 4·64·64 = 16,384), the official weights (reward 0.1, KL 0.01, mean) "
               "imply γ = 10·d ≈ 1.6·10⁵ (METHOD.md §3).\n"),
              "## The realistic case: a denoiser learned by score matching\n"]
    lr = r["learned"]
    lines += ["| | TV | noise floor | mode error |", "|---|---|---|---|",
              (f"| learned base vs p_pre (η = 1) | {lr['base']['tv']:.4f} | {lr['base']['tv_floor']:.4f} | "
              f"{lr['base']['mode_error']:.4f} |"),
              (f"| CTRL on it vs p_γ (γ = 3, η = 1) | {lr['ctrl']['tv']:.4f} | {lr['ctrl']['tv_floor']:.4f} | "
              f"{lr['ctrl']['mode_error']:.4f} |"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
