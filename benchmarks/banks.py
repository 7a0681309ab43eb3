"""The banks of base samples that ship with the package, and what 8 bits cost the target's numbers.

    python benchmarks/banks.py [--classifiers runs/clf-c4]

Writes src/ctrldiff/assets/bank-*.npz for the shipped digit base at the default sampler: the yardstick's bank
(target.seed) and the reward classifier's base pairs at pipeline seed 0 (target.seed + 1), each 20,000 samples,
so that the demo's first run builds none (`target.shipped_bank`). They are 8-bit images of decode(x_0), what every
use of a bank reads; the section `shipped-banks` of docs/benchmarks.md gives the target's numbers from the float
bank and from the shipped one, with the classifiers of --classifiers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _doc import ROOT, machine, write_section

from ctrldiff import config as C
from ctrldiff.pipeline import backend_for, digit_oracle, load_reward_terms, real_features
from ctrldiff.target import bank_key, load_bank, save_shipped_bank, shipped_bank, target_metrics
from ctrldiff.tasks.mnist import cache_dir

ASSETS = ROOT / "src" / "ctrldiff" / "assets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifiers", type=Path, default=Path("runs/clf-c4"))
    args = ap.parse_args()
    cfg = C.default()
    backend = backend_for(cfg)
    rows, t0 = [], time.time()
    for seed, use in [(cfg.target.seed, "the target's yardstick"), (cfg.target.seed + 1, "the base pairs (seed 0)")]:
        key = bank_key(backend, cfg.target.per_c, cfg.sampler.steps, cfg.sampler.eta, seed)
        bank = load_bank(backend, cfg.target.per_c, cfg.sampler.steps, cfg.sampler.eta, seed,
                         folder=cache_dir() / "banks")  # the float bank, built or cached
        path = save_shipped_bank(bank, key, ASSETS)
        rows.append((use, seed, path, bank))
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)
    terms = load_reward_terms(cfg, args.classifiers)
    oracle = digit_oracle(cfg.data.resolution)
    real = real_features(cfg, oracle)
    float_bank, key = rows[0][3], bank_key(backend, cfg.target.per_c, cfg.sampler.steps, cfg.sampler.eta,
                                           cfg.target.seed)
    measured = {}
    for name, bank in [("float32 (built)", float_bank), ("8-bit (shipped)", shipped_bank(key))]:
        m = target_metrics(backend, bank, terms, [t.control for t in terms], cfg.eval.per_class, oracle, real,
                           cfg.seed, cfg.target.min_ess)[0]
        measured[name] = m
    lines = ["## The banks that ship with the package\n",
             (f"Produced by `python benchmarks/banks.py {' '.join(sys.argv[1:])}` on {machine()}, "
              f"{time.strftime('%Y-%m-%d')}; {time.time() - t0:.0f} s. Each is {cfg.target.per_c:,} base samples "
              f"per digit (DDIM {cfg.sampler.steps}, η = {cfg.sampler.eta:g}) of the shipped base, as 8-bit images "
              "of decode(x_0) in a compressed .npz keyed by the base's weights hash and the sampler; `load_bank` "
              "uses one only where its key is the run's, so a first run on a new machine builds neither.\n"),
             "| bank | seed | file | size, MiB |", "|---|---|---|---|"]
    lines += [f"| {use} | {seed} | `{path.name}` | {path.stat().st_size / 2**20:.1f} |" for use, seed, path, _ in rows]
    lines += ["", (f"The target p_γ (γ = 10, compress4, the reward classifiers of `{args.classifiers}`) from the "
                   "float bank and from the shipped 8-bit one:\n"),
              "| bank | accuracy | monitor acc | digit fidelity | feature-FID | mean log Z | lowest ESS | untrusted |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in measured.items():
        ctl = terms[0].control.name
        lines.append(f"| {name} | {m[ctl]['accuracy']:.4f} | {m.get('monitor_accuracy', float('nan')):.4f} | "
                     f"{m['digit_fidelity']:.4f} | {m['feature_fid']:.2f} | {m['log_z']:.4f} | {m['min_ess']:.2f} | "
                     f"{m['untrusted_cells']} |")
    write_section("shipped-banks", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
