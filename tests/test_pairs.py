"""Pairs from disk in the three layouts, the control they define (its round trip through a run folder), the
one-line errors, and the README's "Your own data and model" section run end to end on the tiny preset."""

import csv
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctrldiff import definitions as D
from ctrldiff import pairs as P
from ctrldiff.cli import main
from ctrldiff.config import tiny
from ctrldiff.definitions import DEFINITIONS, define, definition, load_definitions
from ctrldiff.pairs import export_digits, load_pairs
from ctrldiff.tasks.controls import CONTROLS, get_control


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 digits as PNGs, one sub-folder per thickness class (thick/, thin/)."""
    out = tmp_path_factory.mktemp("pairs") / "digits"
    export_digits(out, get_control("thickness2"), 60, tiny())
    return out


def _layouts(folder: Path, root: Path) -> dict[str, Path]:
    """The same pairs as a CSV beside the images, an .npz and a .safetensors (uint8 x, text / integer y)."""
    files = sorted(folder.glob("*/*.png"))
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows([[p.relative_to(folder).as_posix(), p.parent.name] for p in files])
    x = np.stack([np.asarray(Image.open(p)) for p in files])
    names = sorted({p.parent.name for p in files})
    y = np.array([names.index(p.parent.name) for p in files])
    np.savez(root / "pairs.npz", x=x, y=np.array([p.parent.name for p in files]))
    from safetensors.numpy import save_file

    save_file({"x": x[:, None], "y": y}, str(root / "pairs.safetensors"))  # channels first, integer labels
    return {"csv": folder / "labels.csv", "npz": root / "pairs.npz", "safetensors": root / "pairs.safetensors"}


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 8, 8)])
def test_three_layouts_give_the_same_classifier_inputs(folder, tmp_path, shape):
    image_folder = tmp_path / "folder"
    import shutil

    shutil.copytree(folder, image_folder)
    paths = _layouts(image_folder, tmp_path)
    ref = load_pairs(folder, shape)
    assert ref.x.shape == (60, *shape) and ref.class_names == ("thick", "thin")
    assert -1 <= ref.x.min() and ref.x.max() <= 1 and len(set(ref.y.tolist())) == 2
    for layout, path in paths.items():
        got = load_pairs(path, shape, ["thick", "thin"] if layout == "safetensors" else None)
        assert torch.equal(got.x, ref.x) and torch.equal(got.y, ref.y), layout
        assert got.class_names == ref.class_names, layout


def test_split_holds_out_a_share_of_each_class(folder):
    pairs = load_pairs(folder, (1, 16, 16))
    train, held = P.split_pairs(pairs, 0.2, seed=0)
    assert len(train) + len(held) == 60 and len(held) == 12
    for k in range(2):  # stratified: 20% of each class, rounded
        assert (held.y == k).sum() == round(0.2 * (pairs.y == k).sum().item())
    again = P.split_pairs(pairs, 0.2, seed=0)[1]
    assert torch.equal(again.x, held.x)


def test_control_survives_the_run_folder_round_trip(folder, tmp_path):
    pairs = load_pairs(folder, (1, 16, 16))
    made = define(definition("stroke", pairs, folder, None))
    D.save_definitions(tmp_path, ["stroke"])
    del CONTROLS["stroke"]
    defs = load_definitions(tmp_path)
    assert defs["stroke"]["classifiers"] == str(tmp_path.resolve()) and defs["stroke"]["pairs"] == 60
    assert get_control("stroke") == made and made.class_names == ("thick", "thin") and made.labeller is None


def bright(images):
    """An oracle for --oracle: 1 if the mean pixel is above 0.15."""
    return (images.mean((1, 2, 3)) > 0.15).long()


def _bad(tmp_path):
    """Bad pair sets, each with the words its one-line error must contain."""
    cases = {}
    (tmp_path / "empty").mkdir()
    cases["empty"] = (tmp_path / "empty", ["the folder is empty"])
    empty_class = tmp_path / "empty-class"
    (empty_class / "a").mkdir(parents=True)
    (empty_class / "b").mkdir()
    for i in range(12):
        Image.new("L", (4, 4), i).save(empty_class / "a" / f"{i}.png")
    cases["empty class"] = (empty_class, ["class folder", "b is empty"])
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(broken / "a" / "ok.png")
    (broken / "a" / "notes.txt").write_text("not an image")
    cases["non-image"] = (broken, ["notes.txt is not a readable image"])
    for name, rows in [("missing", [["gone.png", "0"]]), ("outside", [["x.png", "0"], ["y.png", "2"]]),
                       ("mixed", [["x.png", "cat"], ["y.png", "3"]])]:
        d = tmp_path / name
        d.mkdir()
        Image.new("L", (4, 4)).save(d / "x.png")
        Image.new("L", (4, 4)).save(d / "y.png")
        (d / "labels.csv").write_text("file,label\n" + "".join(f"{a},{b}\n" for a, b in rows))
    cases["missing"] = (tmp_path / "missing", ["row 2 names a missing file 'gone.png'"])
    cases["outside"] = (tmp_path / "outside", ["label 2", "outside the classes 0..1"])
    cases["mixed"] = (tmp_path / "mixed", ["mixed label types", "'cat' (text) and 3 (integer)"])
    np.savez(tmp_path / "float.npz", x=np.zeros((20, 4, 4), np.float32), y=np.zeros(20, int))
    cases["float"] = (tmp_path / "float.npz", ["x is float32", "uint8"])
    np.savez(tmp_path / "pickled.npz", x=np.zeros((60, 4, 4), np.uint8), y=np.array([1, "a"] * 30, dtype=object))
    cases["pickled"] = (tmp_path / "pickled.npz", ["cannot read", "allow_pickle=False"])  # never unpickled
    np.savez(tmp_path / "few.npz", x=np.zeros((20, 4, 4), np.uint8), y=np.arange(20) % 2)
    cases["few"] = (tmp_path / "few.npz", ["20 pairs are too few"])
    return cases


def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_bad_pairs_are_one_line_errors_and_nothing_is_written(tmp_path, capsys):
    pairs_root = tmp_path / "data"
    pairs_root.mkdir()
    cases = _bad(pairs_root)
    before = _snapshot(pairs_root)
    out = tmp_path / "run"
    for case, (path, words) in cases.items():
        classes = ["--classes", "a,b"] if case == "outside" else []
        for cmd in ("classifier", "finetune"):
            capsys.readouterr()
            assert main([cmd, "--preset", "tiny", "--pairs", str(path), "--control", "mine", *classes,
                         "--out", str(out)]) == 2, case
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert all(w in err for w in words), (case, err)
            assert not out.exists()
    assert _snapshot(pairs_root) == before


@pytest.mark.parametrize("args, words", [
    (["--control", "compress4"], ["'compress4' clashes with a built-in control"]),
    ([], ["--pairs needs --control NAME"]),
    (["--control", "mine", "--oracle", "other=x:y"], ["write mine=module:function"]),
    (["--control", "mine", "--oracle", "mine=no_such_module_xyz:f"], ["No module named 'no_such_module_xyz'"]),
])
def test_bad_control_options_are_one_line_errors(folder, tmp_path, capsys, args, words):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    assert main(["classifier", "--preset", "tiny", "--pairs", str(folder), *args, "--out", str(tmp_path / "run"),
                 "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]  # --overwrite did not wipe it


def test_an_oracle_from_a_python_entry_point_judges_evaluation(folder, tmp_path):
    args = ["--preset", "tiny", "--set", "rl.steps=1"]
    assert main(["finetune", *args, "--pairs", str(folder), "--control", "lit", "--oracle",
                 f"lit={__name__}:bright", "--out", str(tmp_path / "ft")]) == 0
    assert json.loads((tmp_path / "ft" / DEFINITIONS).read_text())["lit"]["oracle"] == f"{__name__}:bright"
    assert "acc_oracle/lit" in (tmp_path / "ft" / "metrics.jsonl").read_text()
    assert main(["evaluate", *args, "--ckpt", str(tmp_path / "ft" / "ctrl.safetensors"),
                 "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["ctrl"]["lit"]["judge"] == "oracle"


def readme_commands() -> list[str]:
    """The `ctrldiff` lines of the README's "Your own data and model" section (its digits part)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Your own data and model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("ctrldiff ")]


def test_readme_section_runs_end_to_end_on_the_tiny_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["export-digits", "classifier", "finetune", "sample", "evaluate"]
    for line in commands:
        assert main([*shlex.split(line)[1:], "--preset", "tiny"]) == 0, line
    metrics = json.loads(next(tmp_path.glob("runs/*eval*/metrics.json")).read_text())
    name = next(k for k, v in metrics["ctrl"].items() if isinstance(v, dict) and "judge" in v)
    assert metrics["ctrl"][name]["judge"] == "monitor" and 0 <= metrics["ctrl"][name]["accuracy"] <= 1


def test_cfg_baseline_refuses_a_control_without_labeller(folder, tmp_path, capsys):
    define(definition("stroke3", load_pairs(folder, (1, 16, 16)), folder, None))
    D.save_definitions(tmp_path / "clf", ["stroke3"])
    out = tmp_path / "run"
    assert main(["finetune", "--method", "cfg", "--classifiers", str(tmp_path / "clf"), "--control", "stroke3",
                 "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "['stroke3'] without one" in err and not out.exists()
