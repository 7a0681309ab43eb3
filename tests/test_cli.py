"""The CLI end to end on the tiny preset (shipped base), and its behaviour on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctrldiff import config as C
from ctrldiff.cli import main
from ctrldiff.demo import run_side_by_side
from ctrldiff.io import CtrlDiffError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--presets", "tiny", "--out", str(out), "--jobs", "2"]) == 0  # in a worker process
    assert "ctrl finetune" in (out / "tiny.log").read_text()  # the worker's progress bars went to its log
    return out / "tiny"


def test_a_demo_preset_that_fails_names_itself_and_leaves_its_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("precious")
    with pytest.raises(CtrlDiffError, match=r"demo preset 'b' failed: run folder .* already exists.*b\.log"):
        run_side_by_side({"b": C.preset("tiny")}, tmp_path, False, None, jobs=1)
    assert (tmp_path / "b" / "keep.txt").read_text() == "precious" and (tmp_path / "b.log").is_file()


def test_demo_writes_a_complete_run_folder(demo_dir):
    for name in ["config.json", "metrics.jsonl", "classifiers.json", "ctrl.safetensors", "curves.png",
                 "samples-base.png", "samples-ctrl.png", "samples-target.png", "target-vs-ctrl.png", "metrics.json",
                 "metrics.md"]:
        assert (demo_dir / name).is_file(), name
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert set(metrics) == {"base", "target", "ctrl"}
    tables = (demo_dir / "metrics.md").read_text().split("\n\n")
    rows = [line.split(" | ")[0] for line in tables[0].splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| base", "| target", "| ctrl"]  # the target right after the base
    assert "log Z − J" in (demo_dir / "metrics.md").read_text() and "monitor acc" in tables[0]
    for m in metrics.values():
        assert 0 <= m["compress4"]["accuracy"] <= 1 and len(m["compress4"]["confusion"]) == 4
        assert m["mean_kl"] >= 0 and 0 <= m["monitor_accuracy"] <= 1
    assert metrics["base"]["mean_kl"] == 0 and metrics["ctrl"]["seconds_per_sample"] > 0  # the base against itself
    for part in ("trusted", "all"):  # J, log Z and the KL over the same requests in every row
        y = {name: metrics[name]["yardstick"][part] for name in metrics}
        assert y["base"]["requests"] == y["ctrl"]["requests"] == y["target"]["requests"] > 0
        assert y["base"]["log_z"] == y["ctrl"]["log_z"] == y["target"]["J"]  # the target's J is the optimum
        assert y["base"]["kl"] == 0 and y["base"]["gap"] > 0  # Jensen: the base's J = E[gamma log p̂] < log Z
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["name"] == "tiny" and config["device"] == "cpu"  # "auto", resolved on this GPU-less machine
    assert all("gap" in r and "gap_all" in r for r in map(json.loads, (demo_dir / "metrics.jsonl").read_text()
               .splitlines()) if "reward" in r)  # the convergence meters, every CTRL step


def test_sample_and_evaluate_from_a_checkpoint(demo_dir, tmp_path):
    ckpt = str(demo_dir / "ctrl.safetensors")
    assert main(["sample", "--preset", "tiny", "--ckpt", ckpt, "--y", "compress4=2", "--c", "3", "-n", "5",
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.png").is_file()
    assert main(["evaluate", "--preset", "tiny", "--ckpt", ckpt, "--out", str(tmp_path / "e")]) == 0
    assert "compress4 acc" in (tmp_path / "e" / "metrics.md").read_text()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ctrldiff.cli", *args], capture_output=True, text=True, cwd=cwd, check=False)


@pytest.mark.parametrize("args, message", [
    (["finetune", "--preset", "nope"], "unknown preset 'nope'; choose from"),
    (["finetune", "--set", "rl.nope=1"], "unknown config key 'rl.nope'; choose from"),
    (["finetune", "--set", "rl.controls={\"nope\": 1}"], "unknown control 'nope'; choose from"),
    (["finetune", "--set", "sampler.eta=0", "--preset", "tiny"], "eta"),
    (["sample", "--ckpt", "missing.safetensors"], "missing checkpoint"),
    (["sample", "--method", "nope"], "unknown method 'nope'; choose from base, ctrl, cfg, dps"),
    (["evaluate", "--method", "dps", "--knob", "particles=2"], "knob 'particles' does not belong to method 'dps'"),
    (["evaluate", "--method", "smc", "--knob", "particles=0.5"], "must be an integer >= 1"),
    (["evaluate", "--method", "dps", "--knob", "w"], "not of the form key=value"),
    (["evaluate", "--method", "dps"], "method 'dps' needs --classifiers"),
    (["evaluate", "--method", "ctrl"], "method 'ctrl' needs --ckpt"),
    (["finetune", "--method", "smc"], "choose ctrl (pairs, RL) or cfg (triplets, DSM)"),
    (["finetune", "--method", "cfg", "--set", "triplets.n=0"], "choose null (all) or an int n >= 1"),
    (["evaluate", "--method", "target"], "method 'target' takes --classifiers"),
    (["evaluate", "--device", "gpu"], "device='gpu'; choose from ('auto', 'cpu', 'cuda')"),
    (["finetune", "--set", "target.per_c=0"], "target.per_c='0': choose a value in 1..inf"),
    (["demo", "--presets", "tiny", "tiny"], "demo --presets tiny tiny: each preset once"),
    (["demo", "--presets", "tiny", "--jobs", "0"], "demo --jobs 0: at least 1"),
    (["bench", "--quick", "--jobs", "0"], "bench --jobs 0: at least 1"),
    (["bench", "--quick", "--parts", "nope"], "invalid choice: 'nope' (choose from 'compress4', 'multi', 'efficiency')"),
    (["bench", "--quick", "--seeds", "-1"], "bench --seeds -1: seeds are non-negative"),
])
def test_bad_input_is_one_line_and_non_zero(args, message, tmp_path):
    r = _cli(*args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_evaluate_the_target_and_ctrl_beside_it(demo_dir, tmp_path):
    """`--method target` is base + target; ctrl with --classifiers adds the target, J and log Z - J."""
    assert main(["evaluate", "--preset", "tiny", "--method", "target", "--classifiers", str(demo_dir),
                 "--out", str(tmp_path / "t")]) == 0
    assert set(json.loads((tmp_path / "t" / "metrics.json").read_text())) == {"base", "target"}
    assert main(["evaluate", "--preset", "tiny", "--ckpt", str(demo_dir / "ctrl.safetensors"), "--classifiers",
                 str(demo_dir), "--out", str(tmp_path / "c")]) == 0
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert set(metrics) == {"base", "target", "ctrl"} and "gap" in metrics["ctrl"]["yardstick"]["all"]
    assert (tmp_path / "c" / "target-vs-ctrl.png").is_file() and "log Z − J" in (tmp_path / "c" / "metrics.md").read_text()


def test_bad_label_and_corrupt_checkpoint(demo_dir, tmp_path):
    r = _cli("sample", "--preset", "tiny", "--ckpt", str(demo_dir / "ctrl.safetensors"), "--y", "compress4=4",
             "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "label 4 for control 'compress4' is outside 0..3" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((demo_dir / "ctrl.safetensors").read_bytes()[:100])
    r = _cli("evaluate", "--preset", "tiny", "--ckpt", str(bad), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "corrupt checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_existing_run_folder_is_not_overwritten(demo_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = _cli("sample", "--preset", "tiny", "--ckpt", str(demo_dir / "ctrl.safetensors"), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "keep.txt").read_text() == "precious" and not (out / "config.json").exists()


def test_baselines_from_the_cli(demo_dir, tmp_path):
    """A guidance baseline reuses the run's classifiers; its cost per sample is what it ran (tiny: 5 steps)."""
    assert main(["evaluate", "--preset", "tiny", "--method", "dps", "--classifiers", str(demo_dir),
                 "--knob", "w=0.3", "--out", str(tmp_path / "dps")]) == 0
    metrics = json.loads((tmp_path / "dps" / "metrics.json").read_text())
    assert set(metrics) == {"base", "dps"} and metrics["dps"]["knobs"] == {"w": 0.3}
    assert metrics["dps"]["cost_per_sample"]["forward_denoiser"] == 5
    assert metrics["dps"]["cost_per_sample"]["backward_denoiser"] == 5
    assert metrics["base"]["cost_per_sample"]["backward_denoiser"] == 0
    r = _cli("evaluate", "--preset", "tiny", "--method", "classifier", "--classifiers", str(demo_dir),
             "--out", str(tmp_path / "cg"))
    assert r.returncode == 2 and "noisy-compress4.safetensors" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cfg_baseline_trains_and_samples_from_the_cli(tmp_path):
    assert main(["finetune", "--method", "cfg", "--preset", "tiny", "--set", "triplets.n=50",
                 "--out", str(tmp_path / "cfg")]) == 0
    ckpt = str(tmp_path / "cfg" / "cfg.safetensors")
    assert main(["sample", "--preset", "tiny", "--method", "cfg", "--ckpt", ckpt, "--knob", "w=3",
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.png").is_file()
    r = _cli("sample", "--preset", "tiny", "--ckpt", ckpt, "--out", str(tmp_path / "s2"))  # --method ctrl
    assert r.returncode == 2 and "trained by 'cfg', not 'ctrl'; pass --method cfg" in r.stderr


def library_example() -> str:
    """The library example of docs/library.md (moved there from the README): the first python block under its
    "Library" heading."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text()
    return text.split("# Library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_library_example_runs_as_written(monkeypatch, tmp_path):
    """Run at a tiny size (the preset's counts patched down), on the shipped base: it fine-tunes, samples the
    chain it was trained on (the base's last step) and estimates the target."""
    from ctrldiff import config

    def small():
        cfg = config.tiny()
        cfg.sampler.steps, cfg.rl.steps, cfg.rl.batch, cfg.rl.monitor_every, cfg.target.per_c = 3, 2, 4, 0, 5
        return cfg

    monkeypatch.setattr(config, "default", small)
    monkeypatch.setenv("CTRLDIFF_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    ns = {"my_images": torch.rand((64, 1, 16, 16), generator=g) * 2 - 1, "my_labels": torch.arange(64) % 2}
    code = library_example()
    assert "final=model.final(backend)" in code
    exec(compile(code, "docs/library.md", "exec"), ns)  # noqa: S102 - the docs' own example, as written
    assert ns["images"].shape == (16, 1, 16, 16) and ns["model"].final_step == "base"
    assert torch.isfinite(ns["est"].log_z.table).all() and len(ns["est"].ess) == 20
