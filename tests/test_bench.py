"""`ctrldiff bench --quick`: a smoke run of the whole benchmark on tiny sizes (values are not asserted)."""

import json
import math
import re

import pytest
import torch

from ctrldiff import bench
from ctrldiff import config as C
from ctrldiff.bench import GRID, SIZES, TASKS, against_ctrl, best_at, front_table, pareto, stage, stages
from ctrldiff.cli import main
from ctrldiff.runs import Run


def test_quick_bench_writes_every_table_and_figure(tmp_path, monkeypatch):
    out, docs = tmp_path / "bench", tmp_path / "docs"
    (docs).mkdir()
    inits, finetune = {}, stages.run_finetune

    def spy(cfg, run, *args, init=None, **kwargs):  # which fine-tunes start from a model
        inits[run.dir.relative_to(out).as_posix()] = init is not None
        return finetune(cfg, run, *args, init=init, **kwargs)

    monkeypatch.setattr(stages, "run_finetune", spy)
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n<!-- section:core -->\nkept\n<!-- /section:core -->\n")
    assert main(["bench", "--quick", "--out", str(out), "--docs", str(docs), "--jobs", "1"]) == 0
    text = (docs / "benchmarks.md").read_text()
    assert "kept" in text  # another producer's section survives
    for heading in ["## Single control: compress4", "## Multi-task 2×2", "## Accuracy against quality",
                    "## Sample efficiency", "## The γ trade-off", "## Sample grids", "## Beside the paper"]:
        assert heading in text, heading
    for method in GRID:  # every method has a row in both tables, both front tables and the grid table
        assert text.count(f"\n| {method} |") == 5, method
    assert text.count("\n| target |") == 2  # the target's own front on both tasks
    assert "**thickness2=1,compress2=0** (hard)" in text
    size = SIZES["quick"]
    for name in ["sample_efficiency.png", "gamma_sweep.png", *[f"front-{task}.png" for task in TASKS],
                 *[f"grid-{task}-{m}.png" for task in TASKS for m in GRID]]:
        path = docs / "figures" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}" in text, name
    results = json.loads((out / "bench.json").read_text())
    assert sorted(results["tasks"]["compress4"]["runs"]) == [str(s) for s in size.seeds]
    assert sorted(map(int, results["efficiency"]["ctrl"])) == size.pairs
    assert all(len(v) == len(size.efficiency_seeds) for v in results["efficiency"]["cfg"].values())
    for task in TASKS:  # CTRL and the target over gamma on both tasks
        fronts = results["fronts"][task]
        assert [p["knobs"]["gamma"] for p in fronts["ctrl"]] == size.gammas
        assert [p["knobs"]["gamma"] for p in fronts["target"]] == size.gammas
        assert {len(fronts[m]) for m in ("smc", "svdd")} == {1}  # quick grid: one setting each
    assert sorted(results["gamma"]) == sorted(TASKS)
    # the gamma sweep on every seed of each task, warm-started from that seed's gamma-10 model for gamma_steps steps
    assert [len(results["front_seeds"][t]) for t in TASKS] == [len(size.seeds), len(size.multi_seeds)]
    warm = {k for k, v in inits.items() if v}
    assert warm == {"compress4/seed0/gamma/g1", "compress4/seed1/gamma/g1", "multi/seed0/gamma/g1"}, inits
    rl = json.loads((out / "compress4/seed1/gamma/g1/config.json").read_text())["rl"]
    preset = C.preset(size.preset).rl  # a warm start at a fraction of the rates
    assert (rl["steps"], rl["lr_lora"], rl["lr_emb"]) == (size.gamma_steps, size.gamma_rate * preset.lr_lora,
                                                          size.gamma_rate * preset.lr_emb)
    assert all(math.isfinite(g["final_gap"]) for sweep in results["gamma"].values() for g in sweep.values())
    assert "CTRL from 20 pairs against CFG from 40 triplets: accuracy" in text
    assert results["seconds"] > 0 and results["peak_rss_gb"] > 0
    # every fine-tune is counted: 2 + 1 seeds, 2 x 1 efficiency runs, 1 gamma besides 10 on each seed; CFG per prepare
    assert [results["training"][m][0] for m in ("ctrl", "cfg")] == [8, 5]
    # classifier guidance is measured on the tasks only: no noise-aware classifier for the efficiency study
    assert list((out / "compress4").rglob("noisy-*")) and not list((out / "efficiency").rglob("noisy-*"))

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed bench redid finished work")

    for name in ("fit_reward_terms", "run_finetune", "run_cfg_finetune", "evaluate"):
        monkeypatch.setattr(stages, name, refuse)
    # --jobs 2 trains every model first in two worker processes (out of reach of the monkeypatches): they must find
    # each finished under the very config this process measures it with, and cover every model the bench trains
    waves = [len(wave) for wave in stages.training_waves(size, out)]
    assert waves == [results["training"]["cfg"][0], results["training"]["ctrl"][0] - results["training"]["cfg"][0]]
    models = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert main(["bench", "--quick", "--out", str(out), "--docs", str(docs), "--resume", "--jobs", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == models
    again = json.loads((out / "bench.json").read_text())
    for key in ("tasks", "efficiency", "gamma", "fronts", "front_seeds"):
        assert again[key] == results[key], key
    text = (docs / "benchmarks.md").read_text()
    assert "the last invocation of a resumed run" in text
    bench.rewrite_report(out, docs)  # from bench.json alone: the same section, methods and knobs in the same order
    assert (docs / "benchmarks.md").read_text() == text

    # a part of the bench (a seed given twice counts once) reuses the whole one's models and measurements (the spies
    # above still refuse any work) and writes a section, a json and a figures folder of its own; the whole bench's
    # section stays as it was
    whole = _section(text, "bench")
    for args, name in [(["compress4", "--seeds", "0", "0"], "bench-compress4-seed0"), (["efficiency"], "bench-efficiency")]:
        assert main(["bench", "--quick", "--out", str(out), "--docs", str(docs), "--resume", "--jobs", "1",
                     "--parts", *args]) == 0
        text = (docs / "benchmarks.md").read_text()
        assert _section(text, "bench") == whole
        part = _section(text, name)
        assert f"--parts {args[0]}" in part and ("## Sample efficiency" in part) == (args[0] == "efficiency")
        assert ("## Single control: compress4" in part) == (args[0] == "compress4")
        assert "## Multi-task" not in part
        figures = re.findall(r"\]\((figures/[^)]+\.png)\)", part)
        assert figures and all(f.startswith(f"figures/{name}/") and (docs / f).is_file() for f in figures), figures
    c4 = json.loads((out / "bench-compress4-seed0.json").read_text())
    assert list(c4["tasks"]) == ["compress4"] and c4["tasks"]["compress4"]["runs"] == {"0": again["tasks"]["compress4"]["runs"]["0"]}
    assert c4["gamma"] == {"compress4": again["gamma"]["compress4"]} and c4["efficiency"] is None
    # the part's own fine-tunes: seed 0's CTRL and its gamma sweep's, one CFG
    assert [c4["training"][m][0] for m in ("ctrl", "cfg")] == [1 + len(stages.swept(size, "compress4")), 1]
    eff = json.loads((out / "bench-efficiency.json").read_text())
    assert eff["tasks"] == {} and eff["efficiency"] == again["efficiency"]
    bench.rewrite_report(out, docs, ["compress4"], [0])
    assert (docs / "benchmarks.md").read_text() == text


def test_the_real_digit_floor_is_drawn_from_every_digit():
    """The training split is sorted by digit: the floor's real digits are a random draw of it, not its first rows."""
    seen = []

    class Net:
        def features(self, x):
            seen.append(x)
            return x.flatten(1)[:, :4]

    class Oracle:  # features of the images it is shown; predicts digit 0 throughout
        net = Net()

        def predict(self, x):
            return torch.zeros(len(x), dtype=torch.long)

    cfg = C.preset("tiny")
    train = stages.load_digits("train", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    floor = stages.real_floor({"oracle": Oracle(), "real": train.x[:50].flatten(1)[:, :4].numpy()}, "tiny", n=200)
    shown = (seen[0] + 1) / 2  # back to [0, 1]
    digits = train.c[torch.cdist(shown.flatten(1), stages.to_unit(train.x).flatten(1)).argmin(1)]
    assert len(shown) == 200 and set(digits.tolist()) == set(range(10))
    assert floor["digit_fidelity"] == pytest.approx((digits == 0).float().mean().item())  # labels of the same rows


def _section(text: str, key: str) -> str:
    """The text of one `write_section` section of a markdown file."""
    return text.split(f"<!-- section:{key} -->")[1].split(f"<!-- /section:{key} -->")[0]


def test_a_resumed_stage_is_kept_continued_or_redone_by_its_config(tmp_path):
    cfg, root = C.tiny(), tmp_path / "ctrl"
    Run(root, cfg).path("ctrl.safetensors").write_text("done")
    assert stage(root, cfg, "ctrl.safetensors", resume=True, report_to="none") is None  # finished: kept
    assert stage(root, cfg, "ctrl.safetensors", resume=False, report_to="none") is not None  # no resume: redone
    assert not (root / "ctrl.safetensors").exists()
    (root / "checkpoints").mkdir()
    assert stage(root, cfg, "ctrl.safetensors", resume=True, report_to="none") is not None
    assert (root / "checkpoints").is_dir()  # unfinished under the same config: continued from its checkpoints
    other = C.apply_overrides(C.tiny(), ["rl.steps=4"])
    assert stage(root, other, "ctrl.safetensors", resume=True, report_to="none") is not None
    assert not (root / "checkpoints").exists()  # another config: started afresh


def test_bench_refuses_an_existing_run_folder(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "keep.txt").write_text("x")
    assert main(["bench", "--quick", "--out", str(tmp_path / "bench")]) == 2
    assert (tmp_path / "bench" / "keep.txt").read_text() == "x"
    assert main(["bench", "--quick", "--out", str(tmp_path / "bench"), "--resume", "--overwrite"]) == 2


def _pts(*pairs):
    return [{"digit_fidelity": f, "accuracy": a} for f, a in pairs]


def test_front_keeps_only_undominated_points_by_fidelity():
    front = pareto(_pts((0.9, 0.5), (0.8, 0.7), (0.85, 0.6), (0.7, 0.6), (0.95, 0.3)))
    assert [(p["digit_fidelity"], p["accuracy"]) for p in front] == [(0.8, 0.7), (0.85, 0.6), (0.9, 0.5), (0.95, 0.3)]


@pytest.mark.parametrize("level, best", [(0.75, 0.7), (0.8, 0.7), (0.825, 0.65), (0.9, 0.5), (0.93, 0.38), (0.96, None)])
def test_best_accuracy_at_a_fidelity_is_interpolated_along_the_front(level, best):
    pts = _pts((0.9, 0.5), (0.8, 0.7), (0.85, 0.6), (0.7, 0.6), (0.95, 0.3))
    got = best_at(pts, level)
    assert got == pytest.approx(best) if best is not None else got is None


def test_best_accuracy_lies_on_the_concave_envelope_of_the_settings():
    """A random mixture of two settings reaches every point between them: at 0.85 the mixture of (0.80, 0.90) and
    (0.90, 0.55) gives 0.725, above the setting measured there (0.60)."""
    pts = _pts((0.80, 0.90), (0.85, 0.60), (0.90, 0.55))
    assert best_at(pts, 0.85) == pytest.approx(0.725)
    assert best_at(pts, 0.78) == pytest.approx(0.90) and best_at(pts, 0.90) == pytest.approx(0.55)
    assert best_at(_pts((0.8, 0.5), (0.8, 0.7)), 0.8) == pytest.approx(0.7)  # one fidelity, two accuracies


def test_a_front_that_never_reaches_the_level_says_so():
    assert best_at(_pts((0.5, 0.9), (0.6, 0.8)), 0.8) is None and best_at([], 0.8) is None


def test_each_front_is_compared_with_ctrls_where_fidelity_is_high():
    curves = {"ctrl": _pts((0.85, 0.8), (0.95, 0.6)),  # CTRL: 0.8 at 0.85 down to 0.6 at 0.95
              "mpgd": _pts((0.85, 0.9), (0.95, 0.5)),  # above CTRL at 0.85 by 0.1, below from 0.9 on
              "bon": _pts((0.99, 0.3)),  # below CTRL where both reach, then beyond CTRL's front
              "dps": _pts((0.5, 0.99))}  # never reaches 0.85
    lines = dict(line[2:].split(": ", 1) for line in against_ctrl(curves))
    assert lines["mpgd"] == "above CTRL by up to 0.100 (at fidelity 0.85)."
    assert lines["bon"] == ("at or below CTRL wherever both reach it; it reaches fidelity 0.99 with accuracy 0.300, "
                            "where CTRL's front stops at 0.950.")
    assert lines["dps"] == "no level that both reach."


def test_the_front_table_averages_each_seeds_own_front():
    seeds = [{"ctrl": _pts((0.95, 0.6), (0.85, 0.8))}, {"ctrl": _pts((0.9, 0.4), (0.8, 0.9))},
             {"ctrl": _pts((0.85, 0.9))}]
    curves = dict(seeds[0], target=_pts((0.91, 0.7)))
    for p in [*curves["ctrl"], *curves["target"]]:
        p |= {"seconds_per_sample": 0.01 if p in curves["ctrl"] else float("nan"), "passes": 20}
    rows = {r.split(" | ")[0][2:]: r.split(" | ")[1:3] for r in front_table(curves, seeds)[2:]}
    # at 0.90: 0.7 and 0.4 where reached (the third seed stops at 0.85); at 0.80: 0.8, 0.9, 0.9; std with ddof = 1
    assert rows["ctrl"] == ["0.550 ± 0.212 (2 of 3 seeds)", "0.867 ± 0.058"]
    assert rows["target"] == ["0.700", "0.700"]  # not in the seeds' fronts: its one front


def test_the_classifier_takes_its_minimum_steps_with_few_pairs(monkeypatch):
    """N = 100 pairs, batch 128, 15 epochs: 15 optimiser steps by epochs alone, min_steps when that is more."""
    from ctrldiff.classifier import fit_classifier
    from ctrldiff.config import ClassifierConfig

    calls = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (calls.append(1), step(self, *a, **k))[1])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand((100, 1, 16, 16), generator=g) * 2 - 1, torch.randint(0, 4, (100,), generator=g)
    for min_steps, want in [(0, 15), (40, 40)]:
        calls.clear()
        fit_classifier(x, y, 4, ClassifierConfig(min_steps=min_steps, width=8), progress=False)
        assert len(calls) == want
