"""`ctrldiff demo | bench`: the commands that run whole studies."""

from __future__ import annotations

from pathlib import Path

from .. import config as C
from ..io import CtrlDiffError, default_jobs, refuse_existing
from .options import device_override, resolved


def cmd_demo(args) -> None:
    from ..demo import run_preset, run_side_by_side
    from ..pipeline import check_finetune

    root = args.out or Path("runs") / "demo"
    if len(set(args.presets)) < len(args.presets):
        raise CtrlDiffError(f"demo --presets {' '.join(args.presets)}: each preset once (it names its run folder)")
    cfgs = {name: resolved(C.apply_overrides(C.preset(name), [*args.overrides, *device_override(args)]))
            for name in args.presets}
    for name, cfg in cfgs.items():
        check_finetune(cfg)
        if not args.overwrite:  # before any preset starts
            refuse_existing(root / name)
    if args.report_to not in (None, "none"):  # a tracker that is not installed: one line, before any worker
        from ..tracking import trackers_for

        trackers_for(args.report_to)
    cpu = all(c.device == "cpu" for c in cfgs.values())
    jobs = default_jobs(len(cfgs), cpu) if args.jobs is None else args.jobs
    if jobs < 1:
        raise CtrlDiffError(f"demo --jobs {jobs}: at least 1 (1 runs the presets in turn in this process)")
    if jobs > 1:  # asked for, or more than one preset on a multi-core CPU
        tables = run_side_by_side(cfgs, root, args.overwrite, args.report_to, min(jobs, len(cfgs)))
    else:
        tables = []
        for name, cfg in cfgs.items():
            print(f"== {name}: classifier -> CTRL fine-tune -> sample -> evaluate  ({root / name}/)")
            tables.append(run_preset(name, cfg, root, args.overwrite, args.report_to))
    print("\n" + "\n".join(tables))

def cmd_bench(args) -> None:
    from ..backends import resolve_device
    from ..bench import PARTS, SIZES, rewrite_report, run_bench, training_waves
    from ..bench.grid import restrict, section

    out = args.out or Path("runs") / ("bench-quick" if args.quick else "bench")
    parts = [p for p in PARTS if p in (args.parts or PARTS)]  # in the report's order, once each
    seeds = None if args.seeds is None else sorted(set(args.seeds))
    if seeds is not None and seeds[0] < 0:
        raise CtrlDiffError(f"bench --seeds {seeds[0]}: seeds are non-negative")
    if args.report_only:
        rewrite_report(out, args.docs, parts, seeds)
        print(f"rewrote {(args.docs or out / 'docs') / 'benchmarks.md'} from "
              f"{out / (section(parts, seeds) + '.json')}")
        return
    if not (args.overwrite or args.resume):
        refuse_existing(out, options="--resume, --overwrite")
    if args.overwrite and args.resume:
        raise CtrlDiffError("bench: --resume keeps what a run in --out finished, --overwrite redoes it; pass one")
    docs, size = args.docs or out / "docs", "quick" if args.quick else "full"
    pipelines = len(training_waves(restrict(SIZES[size], parts, seeds), out)[0])
    jobs = default_jobs(pipelines, resolve_device("auto") == "cpu") if args.jobs is None else args.jobs
    if jobs < 1:
        raise CtrlDiffError(f"bench --jobs {jobs}: at least 1 (1 trains and measures in turn in this process)")
    results = run_bench(size, out, docs, report_to=args.report_to or "none", resume=args.resume, jobs=jobs,
                        parts=parts, seeds=seeds)
    print(f"wrote {docs / 'benchmarks.md'} and {docs / 'figures'}/ in {results['seconds'] / 60:.1f} min "
          f"(peak memory {results['peak_rss_gb']:.2f} GiB)")
