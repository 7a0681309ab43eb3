"""The γ sweep's warm starts at other learning rates (docs/benchmarks.md, section gamma-rate).

`ctrldiff bench` fine-tunes each γ besides 10 from the seed's γ = 10 CTRL model for `BenchSize.gamma_steps` steps at
`BenchSize.gamma_rate` times the preset's learning rates. This fine-tunes the same warm starts at other fractions of
the rates, each into its own folder under --out (reused once finished under the same config), and measures them as the bench's γ table does: oracle accuracy, digit fidelity and feature-FID at 128
samples per class, and the meter log Z − J over the requests the bank trusts at every γ here and at 10, and over all.

    python benchmarks/gamma_rate.py runs/bench --gammas 3 30 100 --rates 1 0.3 0.1 0.03 --out runs/gamma-rate
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from _doc import machine, write_section

from ctrldiff import bench
from ctrldiff.bench.fronts import common_meter
from ctrldiff.bench.grid import task_config
from ctrldiff.bench.stages import backend_for, measure_meter
from ctrldiff.control import ControlledDenoiser
from ctrldiff.io import worker_pool
from ctrldiff.pipeline import load_reward_terms, run_finetune


def run_config(args, gamma: float, rate: float):
    """The bench's warm-start config of one γ, at `rate` times the preset's rates."""
    size = bench.SIZES["full"]
    cfg = task_config(size, dict.fromkeys(bench.TASKS[args.task], gamma), args.seed)
    cfg.rl.steps = size.gamma_steps
    cfg.rl.lr_lora, cfg.rl.lr_emb = rate * cfg.rl.lr_lora, rate * cfg.rl.lr_emb
    return cfg


def train(cfg, root: Path, seed_dir: Path) -> None:
    """One warm fine-tune from the seed's γ = 10 model (in a worker process), unless one finished under `cfg`."""
    if run := bench.stage(root, cfg, "ctrl.safetensors", True, "none"):
        backend = backend_for(cfg)
        init = ControlledDenoiser.load(seed_dir / "ctrl" / "ctrl.safetensors", backend)
        run_finetune(cfg, run, load_reward_terms(cfg, seed_dir / "classifiers"), backend, progress=False, init=init)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path, help="a `ctrldiff bench` output folder with the task's seed trained")
    ap.add_argument("--task", default="compress4", choices=sorted(bench.TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gammas", type=float, nargs="+", default=[3.0, 30.0, 100.0])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03], help="fractions of the rates")
    ap.add_argument("--out", type=Path, default=Path("runs/gamma-rate"))
    ap.add_argument("--parallel", type=int, default=2, help="fine-tunes at a time (the cores shared among them)")
    args = ap.parse_args()
    seed_dir = args.bench / args.task / f"seed{args.seed}"
    if not (seed_dir / "ctrl" / "ctrl.safetensors").is_file():
        ap.error(f"{seed_dir}: no finished CTRL model (run `ctrldiff bench --parts {args.task} --seeds {args.seed}`)")
    if 10.0 in args.gammas or any(g <= 0 for g in args.gammas) or any(r <= 0 for r in args.rates):
        ap.error(f"--gammas {args.gammas} --rates {args.rates}: each > 0, and no gamma 10 (the start)")
    if args.parallel < 1:
        ap.error(f"--parallel {args.parallel}: choose 1 or more")
    t0 = time.time()
    runs = {(gamma, rate): (run_config(args, gamma, rate), args.out / f"g{gamma:g}-r{rate:g}")
            for gamma, rate in itertools.product(args.gammas, args.rates)}
    with worker_pool(args.parallel) as (pool, _):
        for job in [pool.submit(train, cfg, root, seed_dir) for cfg, root in runs.values()]:
            job.result()
    trained = time.time() - t0
    env, torch_threads = bench.environment("default"), torch.get_num_threads()
    paths = {"classifiers": seed_dir / "classifiers"}
    ten = measure_meter(task_config(bench.SIZES["full"], bench.TASKS[args.task], args.seed),
                        paths | {"ctrl": seed_dir / "ctrl" / "ctrl.safetensors", "measured": seed_dir / "measured"},
                        env, args.seed)  # the start's meter: its trusted requests join the common ones
    rows = {}
    for key, (cfg, root) in runs.items():
        p = paths | {"ctrl": root / "ctrl.safetensors", "measured": root / "measured"}
        m = bench.measure(cfg, p, "ctrl", {"w": cfg.eval.guidance}, env, args.seed)[0]
        rows[key] = (bench.point("ctrl", {}, m, list(cfg.rl.controls)) | {"mean_kl": m["mean_kl"]},
                     measure_meter(cfg, p, env, args.seed))
    by_gamma = {10.0: ten} | {k[0]: meter for k, (_, meter) in rows.items()}  # the bank's trust depends on γ alone
    lines = []
    for (gamma, rate), (pt, meter) in rows.items():
        m = common_meter(by_gamma | {gamma: meter})[gamma]
        lines.append(f"| {gamma:g} | {rate:g} | {pt['accuracy']:.3f} | {pt['digit_fidelity']:.3f} | "
                     f"{pt['feature_fid']:.1f} | {pt['mean_kl']:.1f} | {m['meter_common']:.2f} ({m['common_requests']}) "
                     f"| {m['meter_all']:.2f} ({m['flagged']}) |")
        print(lines[-1], flush=True)
    text = "\n".join([
        "## The γ sweep's warm starts: at which learning rate\n",
        (f"Produced by `python benchmarks/gamma_rate.py {' '.join(sys.argv[1:])}` on {machine()}, "
         f"{time.strftime('%Y-%m-%d')}; {trained / 60:.1f} min of fine-tuning here ({args.parallel} at a time, the "
         f"cores shared), {(time.time() - t0 - trained) / 60:.1f} min measuring ({torch_threads} threads). Each row "
         f"starts from the bench's {args.task} seed-{args.seed} CTRL model (γ = 10) and fine-tunes "
         f"{bench.SIZES['full'].gamma_steps} steps at γ with the preset's learning rates times the rate shown; the "
         "same reward classifiers. Oracle accuracy, digit fidelity "
         "and feature-FID at 128 samples per class (sampling seed as the bench's table); log Z − J (nats to the "
         "objective's optimum) from 32 meter paths per request: over the requests the bank trusts at every γ here "
         "and at 10 (how many in brackets), and over all requests (log Z the larger of the bank's and the paths'; "
         "flagged in brackets: both ESS small, a lower bound there).\n"),
        ("| γ | rate | accuracy | digit fidelity | feature-FID | mean KL | log Z − J, common requests | "
         "log Z − J, all requests (flagged) |"),
        "|---" * 8 + "|", *lines])
    write_section("gamma-rate", text)
    print(text)


if __name__ == "__main__":
    main()
