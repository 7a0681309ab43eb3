"""Experiment tracking (--report-to): TensorBoard's event files hold every number of metrics.jsonl at its step
and the monitoring grid, a resumed run sends no step twice, a missing extra is one line, none imports none."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctrldiff.checkpoint import Checkpointer
from ctrldiff.cli import main

FINETUNE = ["finetune", "--preset", "tiny", "--set", "rl.steps=6", "--set", "rl.checkpoint_every=2"]
STEPS, MONITORED = list(range(6)), [0, 2, 4, 5]  # tiny: rl.monitor_every = 2, and the last step


def _events(run: Path) -> tuple[dict, dict]:
    """Every scalar (step, value) and image step per tag, as written: no reader-side purge of repeated steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0},
                          purge_orphaned_data=False)
    ea.Reload()
    scalars = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    images = {tag: [(e.step, e.height, e.width) for e in ea.Images(tag)] for tag in ea.Tags()["images"]}
    return scalars, images


def _expected(run: Path) -> dict:
    """What metrics.jsonl says each tag holds: its numbers by (loop, step), loop-prefixed for classifiers."""
    out: dict = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        loop, step = r.get("classifier"), r.get("step", r.get("epoch"))
        for k, v in r.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                out.setdefault(f"{loop}/{k}" if loop else k, []).append((step, v))
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tb") / "run"
    assert main([*FINETUNE, "--report-to", "tensorboard", "--out", str(out)]) == 0
    return out


def test_every_number_of_metrics_jsonl_and_the_sample_grid_reach_tensorboard(tracked):
    scalars, images = _events(tracked)
    expected = _expected(tracked)
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert {"reward", "kl", "loss", "log_p/compress4", "grad_norm", "lr/emb", "lr/lora", "seconds",
            "acc_oracle/compress4", "acc_monitor/compress4", "classifier-compress4/loss",
            "monitor-compress4/loss"} <= set(scalars)
    assert [s for s, _ in scalars["reward"]] == STEPS
    assert [s for s, _ in scalars["acc_oracle/compress4"]] == MONITORED
    rows, cols, px, scale = 4, 10, 16, 3  # rows = compress4's classes, columns = digits c, 1-pixel padding
    size = ((rows * (px + 1) + 1) * scale, (cols * (px + 1) + 1) * scale)
    assert images == {"samples": [(s, *size) for s in MONITORED]}
    hparams = next((tracked / "tensorboard").glob("*/hparams.yml")).read_text()
    assert "rl.steps: 6" in hparams and "rl.controls: '{\"compress4\": 10.0}'" in hparams


class Crash(Exception):
    pass


def test_a_resumed_run_continues_the_tracker_run_and_logs_no_step_twice(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save = Checkpointer.save

    def crash_before_step_4_is_saved(self, step, extra):  # steps 0-3 logged, the last checkpoint is step 2's
        if self.path is not None and self.path.name == "ctrl.safetensors" and step == 4:
            raise Crash
        save(self, step, extra)

    monkeypatch.setattr(Checkpointer, "save", crash_before_step_4_is_saved)
    with pytest.raises(Crash):
        main([*FINETUNE, "--report-to", "tensorboard", "--out", str(out)])
    monkeypatch.undo()
    assert [s for s, _ in _events(out)[0]["reward"]] == [0, 1, 2, 3]
    assert main(["finetune", "--resume", str(out)]) == 0  # the run's config and its tracker: steps 2-5 again
    scalars, images = _events(out)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one run, two sessions
    assert [s for s, _ in scalars["reward"]] == STEPS
    assert [s for s, _, _ in images["samples"]] == MONITORED
    for tag, points in scalars.items():
        assert len({s for s, _ in points}) == len(points), tag
    expected = _expected(out)
    for tag in ("reward", "kl", "acc_oracle/compress4"):  # what was sent before the crash is what the resume made
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in expected[tag]], rel=1e-6)


@pytest.mark.parametrize("command", ["finetune", "bench"])
@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow", "all"])
def test_a_tracker_that_is_not_installed_is_a_one_line_error_naming_its_extra(name, command, tmp_path, monkeypatch,
                                                                              capsys):
    for module in ("tensorboard", "wandb", "mlflow") if name == "all" else (name,):
        monkeypatch.setitem(sys.modules, module, None)  # the import system reports the package as absent
    out = tmp_path / "run"
    argv = [*FINETUNE] if command == "finetune" else ["bench", "--quick"]
    assert main([*argv, "--report-to", name, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ctrldiff[" + ("tensorboard" if name == "all" else name) in err
    assert not out.exists()


def test_report_to_none_imports_no_tracker(tmp_path):
    """In a fresh interpreter: a fine-tune without --report-to imports no tracker package and writes no tracker
    files; the same with --report-to tensorboard does (so the check can see an import)."""
    code = f"""
import sys
from ctrldiff.cli import main
FINETUNE = {FINETUNE!r}
def trackers():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb", "mlflow")
                  or m.startswith("torch.utils.tensorboard"))
assert main([*FINETUNE, "--out", {str(tmp_path / "none")!r}]) == 0
print("none:", trackers())
assert main([*FINETUNE, "--report-to", "tensorboard", "--out", {str(tmp_path / "tb")!r}]) == 0
print("tensorboard:", "tensorboard" in trackers(), "torch.utils.tensorboard" in trackers())
"""
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith(("none:", "tensorboard:"))]
    assert lines == ["none: []", "tensorboard: True True"]
    assert not (tmp_path / "none" / "tensorboard").exists() and not (tmp_path / "none" / "tracking.json").exists()
