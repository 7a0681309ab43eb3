"""Config presets / dotted overrides / round-trips, and the atomic, pickle-free file I/O."""

import os

import pytest
import torch
from torch import nn

from ctrldiff.config import ADDED, PRESETS, Config, RLConfig, apply_overrides, config_diff, from_dict, preset
from ctrldiff.io import (
    CtrlDiffError,
    atomic_path,
    load_state,
    load_weights,
    read_json,
    save_weights,
    write_json,
)

# --- config ----------------------------------------------------------------------------------------------------


def test_presets():
    for name in PRESETS:
        cfg = preset(name)
        assert isinstance(cfg, Config) and cfg.name == name
    assert preset("default") == Config()
    assert preset("multi").rl.controls == {"thickness2": 10.0, "compress2": 10.0}
    with pytest.raises(CtrlDiffError, match="nope") as e:
        preset("nope")
    for name in PRESETS:
        assert name in str(e.value)


def test_override_sets_value_without_mutating():
    cfg = Config()
    out = apply_overrides(cfg, ["rl.steps=5", "sampler.eta=0", "rl.truncate=random", "seed=3"])
    assert out.rl.steps == 5 and cfg.rl.steps == RLConfig().steps
    assert out.sampler.eta == 0.0 and isinstance(out.sampler.eta, float)  # an int literal for a float field
    assert out.rl.truncate == "random" and cfg.rl.truncate is RLConfig().truncate is None
    assert out.seed == 3 and cfg.seed == 0
    assert apply_overrides(cfg, ["rl.truncate=2"]).rl.truncate == 2
    assert apply_overrides(out, ["rl.truncate=null"]).rl.truncate is None
    assert apply_overrides(cfg, ["pretrain.channels=[8, 16]"]).pretrain.channels == [8, 16]
    assert cfg == Config()


def test_override_dict_entry_changes_gamma():
    cfg = Config()
    out = apply_overrides(cfg, ["rl.controls.compress4=3"])
    assert out.rl.controls == {"compress4": 3}
    assert cfg.rl.controls == {"compress4": 10.0}  # the default's dict is not shared


@pytest.mark.parametrize("item, key, choice", [
    ("rl.nope=1", "rl.nope", "lr_emb"),
    ("nope.x=1", "nope.x", "sampler"),
    ("sampler.steps.x=1", "sampler.steps.x", ""),
])
def test_override_unknown_key_names_key_and_choices(item, key, choice):
    with pytest.raises(CtrlDiffError, match="unknown config key") as e:
        apply_overrides(Config(), [item])
    assert repr(key) in str(e.value) and choice in str(e.value)


@pytest.mark.parametrize("item", ['rl.steps="abc"', "rl.steps=abc", "rl.steps=1.5", "rl.checkpoint=1",
                                  "sampler.eta=fast", "rl.controls=5", "rl=1"])
def test_override_type_mismatch_raises(item):
    with pytest.raises(CtrlDiffError, match="expected"):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("item, choices", [("rl.lr_schedule=linear", "cosine"), ("rl.kl=max", "mean"),
                                           ("rl.final_step=last", "base")])
def test_override_outside_the_choices_names_them(item, choices):
    with pytest.raises(CtrlDiffError, match=choices):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("item", ["rl.lr_emb=3.402823466385288e+37", "rl.lr_lora=11", "pretrain.lr=1e300"])
def test_a_learning_rate_beyond_10_is_refused(item):  # 3.4e37 overflowed Adam's float32 step (fuzzing)
    with pytest.raises(CtrlDiffError, match="choose a value in 0..10"):
        apply_overrides(Config(), [item])


def test_override_without_equals_raises():
    with pytest.raises(CtrlDiffError, match="key=value"):
        apply_overrides(Config(), ["rl.steps"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_from_dict_round_trip(name):
    cfg = apply_overrides(preset(name), ["rl.truncate=random", "rl.controls.thickness2=2.5", "rl.checkpoint=true"])
    back = from_dict(cfg.to_dict())
    assert back == cfg
    assert back.rl.controls is not cfg.rl.controls


def test_a_config_written_before_a_key_existed_reads_as_the_value_it_had(monkeypatch):
    """`ADDED`: a run's config.json from before a key existed resumes under today's config when today's value is
    the one it ran with, and not otherwise; read back, it has that value whatever today's default."""
    monkeypatch.setitem(ADDED, "rl.warmup", 7)  # a legacy value apart from today's default (0)
    old = Config().to_dict()
    del old["rl"]["warmup"]
    assert config_diff(old, apply_overrides(Config(), ["rl.warmup=7"]).to_dict()) is None
    assert config_diff(old, Config().to_dict()) == "rl.warmup: run 7, now 0"
    assert from_dict(old).rl.warmup == 7


def test_from_dict_unknown_key_raises():
    with pytest.raises(CtrlDiffError, match="rl.nope"):
        from_dict({"rl": {"nope": 1}})
    with pytest.raises(CtrlDiffError, match="bogus"):
        from_dict({"bogus": 1})


# --- io -----------------------------------------------------------------------------------------------------------


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # parent folders are created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block finishes
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_failure_keeps_original(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_json_round_trip_and_errors(tmp_path):
    write_json(tmp_path / "a.json", {"b": [1, 2], "a": "x"})
    assert read_json(tmp_path / "a.json") == {"a": "x", "b": [1, 2]}
    with pytest.raises(CtrlDiffError, match="missing"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CtrlDiffError, match="corrupt"):
        read_json(tmp_path / "bad.json")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(8, 8, generator=g), "i": torch.arange(5), "h": torch.randn(3, generator=g).half(),
            "t": torch.randn(4, 4, generator=g).t()}  # non-contiguous is fine


def test_save_load_weights_round_trip(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors, meta = _tensors(), {"kind": "test", "nested": {"a": [1, 2.5, None]}}
    save_weights(path, tensors, meta)
    loaded, loaded_meta = load_weights(path)
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    save_weights(path, {"x": torch.ones(2)})  # no metadata -> {}
    assert load_weights(path)[1] == {}
    assert os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_load_weights_truncated_file(tmp_path, keep):
    path = tmp_path / "w.safetensors"
    save_weights(path, _tensors(), {"kind": "test"})
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(CtrlDiffError, match="corrupt checkpoint"):
        load_weights(path)


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(CtrlDiffError, match="missing checkpoint"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(CtrlDiffError, match="missing checkpoint"):
        load_weights(tmp_path)  # a folder is not a checkpoint


def test_load_state(tmp_path):
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    load_state(dst, src.state_dict(), "ok.safetensors")
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)

    wrong = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    with pytest.raises(CtrlDiffError, match=r"shape of weight is \(2, 4\), expected \(2, 3\)"):
        load_state(dst, wrong, "w.safetensors")
    with pytest.raises(CtrlDiffError, match="missing"):
        load_state(dst, {"weight": torch.zeros(2, 3)}, "w.safetensors")
    with pytest.raises(CtrlDiffError, match="unexpected"):
        load_state(dst, {**src.state_dict(), "extra": torch.zeros(1)}, "w.safetensors")
    assert torch.equal(dst.weight, src.weight)  # a failed load leaves the module untouched
