"""The CLI end to end on the tiny preset (shipped base), and its behaviour on bad input."""

import json
import subprocess
import sys

import pytest

from ctrldiff.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--presets", "tiny", "--out", str(out)]) == 0
    return out / "tiny"


def test_demo_writes_a_complete_run_folder(demo_dir):
    for name in ["config.json", "metrics.jsonl", "classifiers.json", "ctrl.safetensors", "curves.png",
                 "samples-base.png", "samples-ctrl.png", "samples-target.png", "target-vs-ctrl.png", "metrics.json",
                 "metrics.md"]:
        assert (demo_dir / name).is_file(), name
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert set(metrics) == {"base", "target", "ctrl"}
    rows = [line.split(" | ")[0] for line in (demo_dir / "metrics.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| base", "| target", "| ctrl"]  # the target right after the base
    for m in metrics.values():
        assert 0 <= m["compress4"]["accuracy"] <= 1 and len(m["compress4"]["confusion"]) == 4
        assert m["mean_kl"] >= 0
    assert metrics["base"]["mean_kl"] == 0 and metrics["ctrl"]["seconds_per_sample"] > 0  # the base against itself
    assert metrics["base"]["gap"] >= 0  # Jensen: the base's J = E[gamma log p̂] <= log Z
    assert metrics["target"]["objective"] == metrics["target"]["log_z"]  # the target's J is the optimum
    assert metrics["ctrl"]["log_z"] == metrics["base"]["log_z"]  # log Z of the same requests
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["name"] == "tiny" and config["device"] == "cpu"  # "auto", resolved on this GPU-less machine
    assert all("gap" in r for r in map(json.loads, (demo_dir / "metrics.jsonl").read_text().splitlines())
               if "reward" in r)  # the convergence meter, every CTRL step


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
    assert set(metrics) == {"base", "target", "ctrl"} and "gap" in metrics["ctrl"]
    assert (tmp_path / "c" / "target-vs-ctrl.png").is_file() and "log Z - J" in (tmp_path / "c" / "metrics.md").read_text()


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
