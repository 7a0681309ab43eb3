"""How many optimiser steps the reward classifier needs when it has few pairs (issue 16: a fair sample-efficiency
study). For N real compress4 pairs (no base samples) and a number of steps, the held-out accuracy (1,000 pairs never
fitted on) of the calibrated classifier; `classifier.min_steps` is chosen from this curve.

    python benchmarks/classifier_steps.py      # -> docs/tuning.md, section min-steps
"""

from __future__ import annotations

import argparse
import sys
import time

from _doc import ROOT, machine

from ctrldiff import config as C
from ctrldiff.classifier import classifier_steps, evaluate_classifier, fit_classifier, held_back
from ctrldiff.io import write_section
from ctrldiff.pipeline import controls_of, pairs_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", type=int, default=[100, 300, 1000, 4000])
    ap.add_argument("--steps", nargs="+", type=int, default=[0, 250, 500, 1000, 2000],
                    help="classifier.min_steps values (0 = epochs only)")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for n in args.pairs:
        cfg = C.apply_overrides(C.default(), ["classifier.base_pairs=0", f"data.pairs={n}"])
        ctl = controls_of(cfg)[0]
        x, y = pairs_for(ctl, "train", cfg)
        x_ho, y_ho = pairs_for(ctl, "heldout", cfg)
        cells = []
        for m in args.steps:
            cfg.classifier.min_steps = m
            clf, _ = fit_classifier(x, y, ctl.num_classes, cfg.classifier, cfg.seed, ctl.name, progress=False)
            steps = classifier_steps(len(x) - held_back(len(x), cfg.classifier), cfg.classifier)
            cells.append(f"{evaluate_classifier(clf, x_ho, y_ho)['accuracy']:.3f} ({steps})")
            print(n, m, cells[-1], flush=True)
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    lines = ["## The reward classifier's minimum number of optimiser steps\n",
             (f"Produced by `python benchmarks/classifier_steps.py {' '.join(sys.argv[1:])}` on {machine()}, "
              f"{time.strftime('%Y-%m-%d')}; {(time.time() - t0) / 60:.1f} min. compress4 classifier fitted on N real "
              "pairs only (`classifier.base_pairs=0`, seed 0), the default network and 15 epochs, or "
              "`classifier.min_steps` optimiser steps where the epochs give fewer; held-out accuracy on the 1,000 "
              "held-out digits (the optimiser steps taken in brackets).\n"),
             "| N pairs | " + " | ".join(f"min_steps {m}" for m in args.steps) + " |",
             "|---" * (len(args.steps) + 1) + "|", *rows]
    write_section(ROOT / "docs" / "tuning.md", "min-steps", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
