"""Reliability: SIGKILL + --resume is bit-identical, atomic writes, the NaN guard, and bad input (fuzzed)."""

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrldiff import config as C
from ctrldiff import io as cio
from ctrldiff.cli import main
from ctrldiff.io import CtrlDiffError, load_weights, read_meta

SEED = int(os.environ.get("CTRLDIFF_KILL_SEED", "7"))  # the kill points are random but reproducible
PRETRAIN = ["pretrain", "--preset", "tiny", "--set", "pretrain.steps=30", "--set", "pretrain.checkpoint_every=1",
            "--set", "classifier.checkpoint_every=2"]
CLASSIFIER = ["classifier", "--preset", "tiny", "--set", "classifier.checkpoint_every=1"]
FINETUNE = ["finetune", "--preset", "tiny", "--set", "rl.steps=6", "--set", "rl.checkpoint_every=1"]


def _ok(argv: list[str]) -> None:
    assert main(argv) == 0


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> Path:
    """An uninterrupted `ctrldiff classifier` run: the reference for its resume and the finetune's classifiers."""
    out = tmp_path_factory.mktemp("clf") / "run"
    _ok([*CLASSIFIER, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def finetuned(classifiers, tmp_path_factory) -> Path:
    """An uninterrupted CTRL fine-tune (the reference for every interrupted one)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    _ok([*FINETUNE, "--classifiers", str(classifiers), "--out", str(out)])
    return out


def _kill_during(argv: list[str], out: Path, stage: str, step: int, env: dict | None = None) -> None:
    """Run the CLI in a subprocess (environment `env`) and SIGKILL it once `stage`'s checkpoint reaches `step`."""
    proc = subprocess.Popen([sys.executable, "-m", "ctrldiff.cli", *argv, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = out / "checkpoints" / f"{stage}.safetensors"
    while proc.poll() is None:
        if ckpt.exists() and read_meta(ckpt)["step"] >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert read_meta(ckpt)["step"] < read_meta(ckpt)["total"]


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields (the only thing a resume may change)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def assert_same_run(a: Path, b: Path) -> None:
    """Every safetensors file (results and checkpoints) bit-identical, the same metrics records."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for f in files:
        ta, tb = load_weights(a / f)[0], load_weights(b / f)[0]
        assert ta.keys() == tb.keys(), f
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{f}: {k}"
    assert _records(a) == _records(b)


@pytest.mark.parametrize("argv, stages", [
    (PRETRAIN, {"digits": 20, "pretrain": 25}),
    (CLASSIFIER, {"classifier-compress4": 20, "monitor-compress4": 3, "noisy-compress4": 20}),
    (FINETUNE, {"ctrl": 4}),
])
def test_sigkill_and_resume_is_bit_identical(argv, stages, classifiers, request, tmp_path):
    rng = random.Random(f"{SEED}-{argv[0]}")
    stage = rng.choice(sorted(stages))
    step = rng.randint(1, stages[stage])
    extra = ["--classifiers", str(classifiers)] if argv[0] == "finetune" else []
    reference = {"classifier": classifiers, "finetune": request.getfixturevalue("finetuned")}.get(argv[0])
    if reference is None:
        reference = tmp_path / "ref"
        _ok([*argv, "--out", str(reference)])
    _kill_during([*argv, *extra], tmp_path / "run", stage, step)
    _ok([argv[0], "--resume", str(tmp_path / "run"), *extra])  # the run's own config, from config.json
    assert_same_run(reference, tmp_path / "run")


def _one_line_error(capsys, *needles: str) -> str:
    """Besides progress bars, stderr holds exactly one line: the error."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("ctrldiff") and "Traceback" not in err, err
    err = lines[0]
    for needle in needles:
        assert needle in err, err
    return err


def test_nan_reward_stops_at_its_step_and_keeps_the_last_good_checkpoint(classifiers, finetuned, tmp_path,
                                                                          monkeypatch, capsys):
    from ctrldiff.classifier import Classifier

    real, calls = Classifier.log_prob, []

    def poisoned(self, x, y):  # the reward of step 3 (one control: one call per step) is NaN
        calls.append(1)
        return real(self, x, y) * (float("nan") if len(calls) == 4 else 1.0)

    monkeypatch.setattr(Classifier, "log_prob", poisoned)
    run = tmp_path / "run"
    assert main([*FINETUNE, "--classifiers", str(classifiers), "--out", str(run)]) == 2
    _one_line_error(capsys, "non-finite loss or gradient at step 3", "last good checkpoint (step 3)")
    state, meta = load_weights(run / "checkpoints" / "ctrl.safetensors")
    # finite everywhere, except that the running path log Z is -inf (never NaN) for requests no path has seen yet
    assert meta["step"] == 3 and not state["s.paths.lse"].isnan().any()
    assert all(t.isfinite().all() for k, t in state.items() if t.is_floating_point() and k != "s.paths.lse")
    assert not (run / "ctrl.safetensors").exists()
    monkeypatch.undo()
    _ok(["finetune", "--resume", str(run), "--classifiers", str(classifiers)])
    assert_same_run(finetuned, run)


def _sha(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_a_write_failing_midway_leaves_the_previous_checkpoint(classifiers, finetuned, tmp_path, monkeypatch, capsys):
    real, calls, before = cio.save_file, [], {}
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "ctrl.safetensors"

    def disk_full(tensors, filename, metadata=None):  # the 4th save (step 3) dies after half its bytes
        calls.append(1)
        if len(calls) < 4:
            return real(tensors, filename, metadata=metadata)
        before.update({k: v for k, v in _sha(run).items() if k.suffix != ".tmp"})  # save's own temp file
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cio, "save_file", disk_full)
    assert main([*FINETUNE, "--classifiers", str(classifiers), "--out", str(run)]) == 2
    _one_line_error(capsys, "No space left on device")
    assert _sha(run) == before  # the step-2 checkpoint byte-identical, no temp file left behind
    assert read_meta(ckpt)["step"] == 2
    monkeypatch.undo()
    _ok(["finetune", "--resume", str(run), "--classifiers", str(classifiers)])
    assert_same_run(finetuned, run)


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), cio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


# --- bad input: fuzzed (hypothesis) and corrupted -----------------------------------------------------------

KEYS = sorted(f"{s}.{k}" if isinstance(v, dict) else s for s, v in C.tiny().to_dict().items()
              for k in (v if isinstance(v, dict) else [None]))
VALUES = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats().map(json.dumps), st.text(max_size=8),
                   st.lists(st.integers(-16, 80), max_size=3).map(json.dumps),
                   st.sampled_from(["null", "true", "[]", "{}", '"random"', "1e400", "-0", '{"compress4": 1}']))
OVERRIDES = st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUES)


@settings(max_examples=300, deadline=None)
@given(OVERRIDES)
def test_fuzzed_set_is_refused_in_one_line_or_survives_the_run_folder(item):
    try:
        cfg = C.apply_overrides(C.tiny(), [item])
    except CtrlDiffError as e:
        assert "\n" not in str(e)
        return
    d = cfg.to_dict()
    assert C.config_diff(C.from_dict(d).to_dict(), d) is None  # what is accepted is read back by --resume
    numbers = [v for sec in d.values() for v in (sec.values() if isinstance(sec, dict) else [sec])
               if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers)


@pytest.fixture(scope="module")
def bad_files(finetuned, tmp_path_factory) -> dict[str, Path]:
    """A truncated and a wrong-shape copy of a real CTRL checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    data = (finetuned / "ctrl.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    state, meta = load_weights(finetuned / "ctrl.safetensors")
    cio.save_weights(root / "shape.safetensors", {k: v.flatten() for k, v in state.items()}, meta)
    return {"truncated": root / "truncated.safetensors", "shape": root / "shape.safetensors"}


TOKENS = ["--preset", "tiny", "default", "nope", "--set", "rl.steps=0", "rl.nope=1", "sampler.eta=NaN", "x=",
          "--method", "ctrl", "cfg", "dps", "smc", "base", "--knob", "w=2", "particles=0.5", "--ckpt", "--classifiers",
          "--y", "compress4=9", "compress4=x", "nope=1", "--c", "11", "-1", "-n", "0", "--base", "", "--", "=", "é"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["pretrain", "classifier", "finetune", "sample", "evaluate"]),
       tokens=st.lists(st.one_of(st.sampled_from([*TOKENS, "TRUNCATED", "SHAPE"]), st.text(max_size=6)), max_size=6))
def test_fuzzed_arguments_fail_in_one_line_and_touch_nothing(command, tokens, bad_files, tmp_path, capsys):
    out = tmp_path / "existing"  # every request that passes validation stops here: the folder exists
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("precious")
    before = _sha(tmp_path)
    tokens = [str(bad_files["truncated"]) if t == "TRUNCATED" else str(bad_files["shape"]) if t == "SHAPE" else t
              for t in tokens]
    try:
        rc = main([command, *tokens, "--out", str(out)])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    _one_line_error(capsys)
    assert _sha(tmp_path) == before


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _resume_case(finetuned, classifiers, tmp_path, case):
    run = _copy(finetuned, tmp_path / "run")
    ckpt = run / "checkpoints" / "ctrl.safetensors"
    argv = ["finetune", "--resume", str(run), "--classifiers", str(classifiers)]
    if case == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif case == "wrong shape":
        state, meta = load_weights(ckpt)
        cio.save_weights(ckpt, {k: v.flatten() if v.ndim > 1 else v for k, v in state.items()}, meta)
    elif case == "other preset":
        argv += ["--preset", "default"]
    elif case == "other run's checkpoint":  # the folder says lr_emb 0.05, the checkpoint was trained at 0.1
        cfg = json.loads((run / "config.json").read_text())
        cfg["rl"]["lr_emb"] = 0.05
        (run / "config.json").write_text(json.dumps(cfg))
        argv += FINETUNE[1:] + ["--set", "rl.lr_emb=0.05"]
    elif case == "corrupt config":
        (run / "config.json").write_text("{")
    return run, argv


@pytest.mark.parametrize("case, message", [
    ("truncated", "corrupt checkpoint"),
    ("wrong shape", "does not match this run"),
    ("other preset", "differs from the run's at name: run \"tiny\", now \"default\""),
    ("other run's checkpoint", "different config (rl.lr_emb: run 0.1, now 0.05)"),
    ("corrupt config", "corrupt JSON"),
])
def test_bad_resume_fails_in_one_line_and_touches_nothing(case, message, finetuned, classifiers, tmp_path, capsys):
    run, argv = _resume_case(finetuned, classifiers, tmp_path, case)
    before = _sha(run)
    assert main(argv) == 2
    _one_line_error(capsys, message)
    assert _sha(run) == before


@pytest.mark.parametrize("argv, message", [
    (["sample", "--preset", "tiny", "--ckpt", "SHAPE"], "does not match the base model"),
    (["sample", "--preset", "tiny", "--ckpt", "TRUNCATED"], "corrupt checkpoint"),
    (["sample", "--preset", "tiny", "--ckpt", "CKPT", "--y", "compress4=7"], "outside 0..3"),
    (["sample", "--preset", "tiny", "--method", "base", "--c", "12"], "outside 0..9"),
    (["classifier", "--preset", "tiny", "--set", "data.heldout=5000"], "data.heldout='5000': choose a value in 10..4990"),
    (["classifier", "--preset", "tiny", "--set", "data.pairs=5", "--set", "classifier.base_pairs=0"], "5 labelled pairs are too few"),
    (["finetune", "--preset", "sd_tiny", "--set", "sd.model=0"], "sd.model='0' has type int, expected str or null"),
    (["pretrain", "--preset", "tiny", "--resume", "NOWHERE"], "no run there"),
    (["pretrain", "--preset", "tiny", "--resume", "EXISTING", "--overwrite"], "drop --out and --overwrite"),
    (["pretrain", "--preset", "tiny", "--out", "EXISTING"], "already exists"),
    (["classifier", "--preset", "tiny", "--out", "EXISTING"], "already exists"),
    (["finetune", "--preset", "tiny", "--out", "EXISTING"], "already exists"),
])
def test_bad_input_fails_in_one_line_and_touches_nothing(argv, message, finetuned, bad_files, tmp_path, capsys):
    existing = _copy(finetuned, tmp_path / "existing")
    before = _sha(tmp_path)
    names = {"SHAPE": bad_files["shape"], "TRUNCATED": bad_files["truncated"], "CKPT": existing / "ctrl.safetensors",
             "EXISTING": existing, "NOWHERE": tmp_path / "nowhere"}
    argv = [str(names.get(a, a)) for a in argv]
    if "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    assert main(argv) == 2
    _one_line_error(capsys, message)
    after = _sha(tmp_path)  # a run that fails after it started may leave its new folder; nothing else changes
    assert {k: after.get(k) for k in before} == before


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(item=st.builds(lambda k, v: f"{k}={v}", st.sampled_from([k for k in KEYS if k.split(".")[0] in ("rl", "sampler")]),
                      VALUES))
def test_a_fuzzed_set_that_is_accepted_runs(item, classifiers, tmp_path_factory, capsys):
    """The property the boundary sweep of docs/reliability.md checks for every key, here on CTRL's keys."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    rc = main(["finetune", "--preset", "tiny", "--set", "rl.steps=1", "--set", "eval.per_class=1", "--set", item,
               "--classifiers", str(classifiers), "--out", str(out)])
    if rc != 0:
        assert rc == 2
        _one_line_error(capsys)


def test_a_checkpoint_restores_every_rng_it_holds(tmp_path):
    """The loops reseed torch's global RNG per stage and draw from their generators, so the kill tests cannot
    see the global state; this one does: both states come back exactly."""
    from ctrldiff.checkpoint import Checkpointer

    g = torch.Generator().manual_seed(1)
    ckpt = Checkpointer(tmp_path / "c.safetensors", {}, every=1)
    ckpt.start(2, {}, {"g": g})  # fresh: writes the step-0 checkpoint with the current states
    expected = torch.rand(3), torch.rand(3, generator=g)
    ckpt.start(2, {}, {"g": g})  # resume from it
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=g), expected[1])
