"""Hardening (issue 27): the bank cache under concurrent processes, hostile pairs folders and oracles (fuzzed),
resumed bring-your-own runs, trackers that fail to start, corrupted artefacts. Each test's docstring is a row of
the table in docs/reliability.md, which `python benchmarks/reliability.py` writes by running this file; the
counts it reports (processes, kills, fuzz examples) are the ones these tests record as they run."""

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from one_thread import one_thread
from PIL import Image
from test_reliability import _kill_during, _one_line_error, _sha, assert_same_run

from ctrldiff.cli import main
from ctrldiff.config import tiny
from ctrldiff.io import CtrlDiffError, load_weights
from ctrldiff.pairs import export_digits, load_pairs
from ctrldiff.tasks.controls import get_control

TESTS = Path(__file__).parent
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def count(request, what: str, n: int = 1) -> None:
    """Add n to a count of this test (processes, kills, examples) for the reliability table (JUnit properties)."""
    props = request.node.user_properties
    for i, (k, v) in enumerate(props):
        if k == what:
            props[i] = (k, v + n)
            return
    props.append((what, n))


# --- 1. the bank cache under concurrency ------------------------------------------------------------------

BUILDER = """
import hashlib, os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import GaussianBase
from ctrldiff import io, target
from ctrldiff.backends.pixels import PixelBackend
from ctrldiff.schedule import Schedule

folder, marks, slow = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "slow"
sys.stderr = open(sys.argv[4], "w", buffering=1)  # where the test reads "waiting for process ..."
build, save = target.build_bank, io.save_file

def building(*args, **kwargs):  # who builds
    (marks / f"build-{{os.getpid()}}").touch()
    return build(*args, **kwargs)

def stalling(tensors, filename, metadata=None):  # the slow one stalls with its temp file half-written
    save(tensors, filename, metadata=metadata)
    if slow:
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        (marks / "writing").touch()
        time.sleep(120)

target.build_bank, io.save_file = building, stalling
schedule = Schedule.linear()
x0 = target.load_bank(PixelBackend(GaussianBase(schedule), schedule, 8), 4, steps=3, eta=1.0, folder=folder,
                      progress=False)
print(hashlib.sha256(x0.numpy().tobytes()).hexdigest())
"""


def _wait(condition, what: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_three_processes_share_one_bank_build_and_a_killed_builder_is_recovered(tiny_backend, tmp_path, request):
    """Bank cache: 3 processes ask for one bank; the builder is SIGKILLed with its temp file half-written and
    the lock held. The 2 waiting ones: one builds, one waits and reads it; both get the bank an uninterrupted
    build gives; no temp file is left, the file holds its key."""
    from ctrldiff.target import bank_key, load_bank

    cache, marks = tmp_path / "banks", tmp_path / "marks"
    marks.mkdir()
    script = BUILDER.format(tests=str(TESTS))

    procs = []

    def spawn(role: str, i: int) -> subprocess.Popen:
        count(request, "processes")
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(cache), str(marks), role,
                                       str(tmp_path / f"err{i}")], stdout=subprocess.PIPE, text=True))
        return procs[-1]

    def waits(i: int) -> bool:
        err = tmp_path / f"err{i}"
        return err.exists() and f"waiting for process {procs[0].pid}" in err.read_text()

    try:
        first = spawn("slow", 0)
        _wait(lambda: (marks / "writing").exists() or first.poll() is not None, "the first process to write")
        waiting = [spawn("normal", i) for i in (1, 2)]
        _wait(lambda: (waits(1) and waits(2)) or any(p.poll() is not None for p in waiting), "both to wait")
        assert waits(1) and waits(2), "the others did not wait for the builder"
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        count(request, "kills")
        digests = []
        for proc, i in zip(waiting, (1, 2)):
            out, _ = proc.communicate(timeout=90)
            assert proc.returncode == 0, (tmp_path / f"err{i}").read_text()[-2000:]
            digests.append(out.strip())
    finally:  # a failed test leaves no process behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    expected = load_bank(tiny_backend, 4, steps=3, eta=1.0, folder=tmp_path / "fresh", progress=False)
    assert digests == [hashlib.sha256(expected.numpy().tobytes()).hexdigest()] * 2
    assert len(list(marks.glob("build-*"))) == 2  # the killed one, then exactly one of the two others
    (bank,) = cache.glob("bank-*.safetensors")
    assert sorted(p.name for p in cache.iterdir()) == sorted([bank.name, f".{bank.name}.lock"])  # no temp file
    assert load_weights(bank)[1] == bank_key(tiny_backend, 4, 3, 1.0, 0)


# --- 2. hostile pairs folders (fuzzed) ---------------------------------------------------------------------

LIMIT = 32 * 32  # PIL's pixel limit while fuzzing, so that a decompression bomb is a few kB


def _png16(path: Path, rgb16: tuple[int, int, int], size: int = 8) -> None:
    """A 16-bit RGB PNG (PIL cannot write one): IHDR, one IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\0" + np.tile(np.array(rgb16, ">u2"), size).tobytes()
    ihdr = size.to_bytes(4, "big") * 2 + bytes([16, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * size))
                     + chunk(b"IEND", b""))


def _luma(rgb) -> float:
    return (rgb[0] * 299 + rgb[1] * 587 + rgb[2] * 114) / 1000


def _over_black(rgb, alpha: int) -> tuple:
    return tuple(v * alpha / 255 for v in rgb)


def _image(path: Path, kind: str, v: int) -> tuple[tuple, float]:
    """Write one image of `kind`, every pixel alike (value v drawn), at `path` (its suffix is kept whatever it is).
    Returns the RGB it must read as (the documented conversion) and the tolerance in grey levels."""
    rgb, tol = (v, 255 - v, v // 2), 2.0
    if kind == "png8":
        Image.new("L", (8, 8), v).save(path, "PNG")
        return (v,) * 3, 0.5
    if kind == "png16":  # 16-bit grey: its high byte (PIL alone clips it at 255)
        Image.fromarray(np.full((8, 8), v * 256 + 100, np.uint16)).save(path, "PNG")
        return (v,) * 3, 0.5
    if kind == "rgb48":  # 16-bit colour: PIL keeps the high byte too
        _png16(path, tuple(c * 256 + 100 for c in rgb))
    elif kind == "palette":
        im = Image.new("P", (8, 8), 3)
        im.putpalette([0, 0, 0] * 3 + list(rgb) + [0, 0, 0] * 252)
        im.save(path, "PNG")
    elif kind == "palette_transparent":  # the transparent palette entry: black
        im = Image.new("P", (8, 8), 3)
        im.putpalette([0, 0, 0] * 3 + list(rgb) + [0, 0, 0] * 252)
        im.save(path, "PNG", transparency=3)
        rgb = (0, 0, 0)
    elif kind == "rgba":  # composited onto black (PIL alone drops alpha)
        Image.new("RGBA", (8, 8), (*rgb, v)).save(path, "PNG")
        rgb = _over_black(rgb, v)
    elif kind == "grey_alpha":
        Image.new("LA", (8, 8), (200, v)).save(path, "PNG")
        rgb = _over_black((200,) * 3, v)
    elif kind == "cmyk_jpeg":  # PIL's plain CMYK conversion; JPEG moves a level or two
        cmyk = (v, 255 - v, 40, 10)
        Image.new("CMYK", (8, 8), cmyk).save(path, "JPEG", quality=95)
        rgb, tol = Image.new("CMYK", (1, 1), cmyk).convert("RGB").getpixel((0, 0)), 4.0
    elif kind == "animated_gif":  # the first frame
        frames = [Image.new("L", (8, 8), v), Image.new("L", (8, 8), 255 - v)]
        frames[0].save(path, "GIF", save_all=True, append_images=frames[1:])
        rgb = (v,) * 3
    elif kind == "other_size":  # stretched to 8 x 8 (Lanczos) in any case
        Image.new("RGB", (13, 5), rgb).save(path, "PNG")
    return rgb, tol


HOSTILE = {  # kind -> what the one-line error must say
    "zero_bytes": "not a readable image", "truncated": "not a readable image", "text": "not a readable image",
    "bomb": "could be decompression bomb", "bomb_2x": "could be decompression bomb", "link_loop": "not a regular file",
    "fifo": "not a regular file", "float_tiff": "32-bit pixels have no fixed range",
}
CONVERTED = ["png8", "png16", "rgb48", "palette", "palette_transparent", "rgba", "grey_alpha", "cmyk_jpeg",
             "animated_gif", "other_size", "unreadable"]


def _hostile(path: Path, kind: str) -> None:
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), np.uint8)).save(path, "PNG")
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "text":
        path.write_text("not an image\n")
    elif kind in ("bomb", "bomb_2x"):  # over PIL's limit: PIL alone only warns below twice the limit
        Image.new("L", (40, 40) if kind == "bomb" else (50, 50)).save(path, "PNG")
    elif kind == "link_loop":
        path.symlink_to(path.name)
    elif kind == "fifo":  # opening it would block forever
        os.mkfifo(path)
    elif kind == "float_tiff":
        Image.new("F", (8, 8), 0.5).save(path, "TIFF")


NAMES = {  # how a file or class folder is named
    "plain": lambda i: f"f{i}.png", "spaces": lambda i: f" my file {i} .png", "newline": lambda i: f"new\nline{i}.png",
    "latin1": lambda i: os.fsdecode(b"\xe9t\xe9" + str(i).encode() + b".png"),  # not UTF-8
    "no_suffix": lambda i: f"f{i}",
}
def _files(kinds: list[str]) -> st.SearchStrategy:
    """Up to 6 files: (kind, name style, value, in the second class?)."""
    return st.lists(st.tuples(st.sampled_from(kinds), st.sampled_from(sorted(NAMES)), st.integers(0, 255),
                              st.booleans()), min_size=1, max_size=6)


FILES = st.one_of(_files(CONVERTED), _files([*CONVERTED, *HOSTILE]))  # half the folders have no hostile file
CLASS_NAMES = st.sampled_from([("a", "b"), ("thin lines", "thick"), (os.fsdecode(b"\xff"), "b")])


def _snapshot(root: Path) -> dict:
    """Every entry under root (files' bytes; links, pipes and folders by kind), without following links."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            out[p] = p.read_bytes() if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK) else \
                os.lstat(p).st_mode
    return out


def _cli_refuses(capsys, pairs: Path, out: Path, words: str = "", *extra: str) -> str:
    """`classifier --pairs` on them: exit 2, one line (with `words`), no run folder."""
    from ctrldiff.cli import _one_line

    capsys.readouterr()
    assert main(["classifier", "--preset", "tiny", "--pairs", str(pairs), "--control", "mine", *extra,
                 "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert _one_line(words) in err, err
    assert not out.exists()
    return err


@FUZZ
@given(files=FILES, classes=CLASS_NAMES, rgb=st.booleans())
@example(files=[(kind, "plain", 7, False) for kind in CONVERTED], classes=("a", "b"), rgb=True)
@example(files=[(kind, "plain", 7, False) for kind in CONVERTED], classes=("a", "b"), rgb=False)
@example(files=[("bomb", "spaces", 0, True)], classes=("a", "b"), rgb=False)  # each hostile kind at least once
@example(files=[("zero_bytes", "latin1", 0, False)], classes=("a", "b"), rgb=False)
@example(files=[("link_loop", "newline", 0, False)], classes=("a", "b"), rgb=False)
@example(files=[("truncated", "plain", 0, False), ("fifo", "plain", 0, True)], classes=("a", "b"), rgb=False)
@example(files=[("text", "no_suffix", 0, False), ("bomb_2x", "plain", 0, True)], classes=("a", "b"), rgb=False)
@example(files=[("float_tiff", "plain", 0, False)], classes=("a", "b"), rgb=False)
def test_fuzzed_image_folders_read_as_documented_or_fail_in_one_line(files, classes, rgb, request, capsys):
    """Hostile image folders (fuzzed): 16-bit, palette, RGBA, grey+alpha, CMYK JPEG, animated GIF, other sizes,
    a zero-byte, truncated or text file, a decompression bomb under and over twice PIL's limit, a symlink loop, a
    named pipe, a float TIFF, an unreadable file, non-UTF-8 / space / newline names: each file reads as its
    documented conversion, or the first bad one is a one-line error naming it (exit 2); nothing is written."""
    count(request, "examples")
    shape = (3 if rgb else 1, 8, 8)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(Image, "MAX_IMAGE_PIXELS", LIMIT):
        root = Path(tmp) / "pairs"
        expected, first_bad = {}, None
        for k, name in enumerate(classes):
            (root / name).mkdir(parents=True)
            Image.new("L", (8, 8), 128).save(root / name / "zz-ok.png")  # every class has a good pair
            expected[root / name / "zz-ok.png"] = ((128,) * 3, 0.5, k)
        for i, (kind, style, v, second) in enumerate(files):
            path = root / classes[second] / NAMES[style](i)
            if kind in HOSTILE:
                _hostile(path, kind)
            else:
                expected[path] = (*_image(path, kind if kind != "unreadable" else "png8", v), classes.index(path.parent.name))
                if kind == "unreadable":
                    path.chmod(0)
                    if not os.access(path, os.R_OK):  # root reads it anyway
                        kind = "permission"
                        expected.pop(path)
            if kind in HOSTILE or kind == "permission":
                first_bad = min(first_bad or (path, kind), (path, kind), key=lambda pk: (pk[0].parent.name, pk[0].name))
        before = _snapshot(root)
        if first_bad is not None:
            with pytest.raises(CtrlDiffError) as e:
                load_pairs(root, shape)
            words = HOSTILE.get(first_bad[1], "Permission denied")
            assert str(first_bad[0]) in str(e.value) and words in str(e.value), (first_bad, str(e.value))
            _cli_refuses(capsys, root, Path(tmp) / "run", str(first_bad[0]))
        else:
            pairs = load_pairs(root, shape)
            order = sorted(expected, key=lambda p: (p.parent.name, p.name))
            assert pairs.class_names == tuple(sorted(classes)) and len(pairs) == len(order)
            for x, y, path in zip(pairs.x, pairs.y, order):
                want, tol, k = expected[path]
                want = torch.tensor(want if rgb else [_luma(want)]).view(-1, 1, 1).expand(shape)
                assert (x - (want / 127.5 - 1)).abs().max() <= tol / 127.5 + 1e-6, (path, x.mean() * 127.5 + 127.5)
                assert y == sorted(classes).index(classes[k])
            _cli_refuses(capsys, root, Path(tmp) / "run", "pairs are too few")  # fewer than a split needs
        assert _snapshot(root) == before


CSV_NAMES = ["plain {}.png", "comma, {}.png", 'quote "{}".png', "é {}.png", " lead {}.png"]  # the last: stripped


ALL_ROWS = [(0, "cat"), (1, "dog"), (2, "cat"), (3, "dog")]  # every name but the space-led one


@FUZZ
@given(rows=st.lists(st.tuples(st.integers(0, len(CSV_NAMES) - 1), st.sampled_from(["cat", "dog"])), min_size=1,
                     max_size=6),
       bom=st.booleans(), crlf=st.booleans(), quote_all=st.booleans(), latin1=st.booleans(),
       repeat=st.sampled_from(["none", "same", "other label"]))
@example(rows=ALL_ROWS, bom=True, crlf=True, quote_all=True, latin1=False, repeat="same")  # read, the repeat once
@example(rows=ALL_ROWS, bom=False, crlf=False, quote_all=False, latin1=False, repeat="other label")
@example(rows=ALL_ROWS, bom=False, crlf=True, quote_all=False, latin1=True, repeat="none")  # not UTF-8
@example(rows=[], bom=True, crlf=True, quote_all=False, latin1=False, repeat="none")  # a header only
def test_fuzzed_csv_files_read_as_documented_or_fail_in_one_line(rows, bom, crlf, quote_all, latin1, repeat, request,
                                                                 capsys):
    """Hostile CSVs (fuzzed): a BOM, CRLF, quoted names with commas and quotes, non-ASCII names, a file that is
    not UTF-8, a repeated row (read once) or a file listed with two labels, names with surrounding spaces
    (ignored, so such a file is missing), a header only: the pairs in row order, or a one-line error naming
    the CSV (exit 2); nothing is written."""
    count(request, "examples")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pairs"
        root.mkdir()
        table = [(CSV_NAMES[j].format(i), label, 10 + 20 * i) for i, (j, label) in enumerate(rows)]
        for name, _, v in table:
            Image.new("L", (8, 8), v).save(root / name, "PNG")
        if repeat != "none" and table:
            name, label, v = table[-1]
            table.append((name, label if repeat == "same" else {"cat": "dog", "dog": "cat"}[label], v))
        text = "\r\n" if crlf else "\n"
        path = root / "labels.csv"
        with open(path, "w", newline="", encoding="latin-1" if latin1 else "utf-8-sig" if bom else "utf-8") as f:
            w = csv.writer(f, lineterminator=text, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
            w.writerow(["file", "label"])
            w.writerows([(name, label) for name, label, _ in table])
        before = _snapshot(root)
        words, seen = None, {}  # the first error as documented: the file's encoding, then row by row
        if latin1 and any(ord(c) > 127 for name, _, _ in table for c in name):
            words = "as a UTF-8 CSV"
        for i, (name, label, _) in enumerate(table if words is None else [], start=2):
            if name != name.strip():
                words = f"row {i} names a missing file"
            elif seen.setdefault(name, label) != label:
                words = f"row {i} labels"
            if words:
                break
        words = words or ("lists no pairs" if not table else None)
        if words:
            with pytest.raises(CtrlDiffError) as e:
                load_pairs(path, (1, 8, 8))
            assert str(path) in str(e.value) and words in str(e.value), (words, str(e.value))
            _cli_refuses(capsys, path, Path(tmp) / "run", words)
        else:
            pairs = load_pairs(path, (1, 8, 8))
            once = list(dict.fromkeys(table))
            assert len(pairs) == len(once) and pairs.class_names == tuple(sorted({lb for _, lb, _ in once}))
            assert torch.allclose(pairs.x.mean((1, 2, 3)), torch.tensor([v / 127.5 - 1 for _, _, v in once]))
            assert pairs.y.tolist() == [pairs.class_names.index(lb) for _, lb, _ in once]
        assert _snapshot(root) == before


X_KINDS = {"uint8": None, "float32": "x is float32", "nan": "x is float32", "int64": "x is int64", "bool": "x is bool",
           "object": "allow_pickle=False"}
X_LAYOUTS = {"NHW": None, "NCHW": None, "NHWC": None, "NHWC2": "x has shape", "empty": "its images are empty"}
Y_KINDS = {"int": None, "text": None, "huge": "has no pairs", "negative": "outside the classes", "nan": "y is float64",
           "bool": "y is bool", "bytes": "y is |S", "object": "allow_pickle=False"}
DAMAGE = {"none": None, "zero_bytes": "cannot read", "truncated": "cannot read", "npy": "not an .npz archive",
          "missing_y": "lacks the array(s) ['y']"}


def _arrays(x_kind: str, layout: str, y_kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(n)
    shape = {"NHW": (n, 8, 8), "NCHW": (n, 1, 8, 8), "NHWC": (n, 8, 8, 3), "NHWC2": (n, 8, 8, 2), "empty": (n, 0, 8)}
    x = g.integers(0, 256, shape[layout]).astype(np.uint8)
    if x_kind == "nan":
        x = x.astype(np.float32)
        x.flat[:1] = np.nan
    elif x_kind == "object":
        x = np.array(list(x) + [None], dtype=object)[:n]
    elif x_kind != "uint8":
        x = x.astype(x_kind)
    y = np.arange(n) % 2
    y = {"int": y, "text": np.where(y == 1, "cat", "dog"), "huge": y * 10**12, "negative": y - 1,
         "nan": np.where(y == 1, np.nan, 0.0), "bool": y.astype(bool), "bytes": np.where(y == 1, b"cat", b"dog"),
         "object": np.array([1, "a"] * n, dtype=object)[:n]}[y_kind]
    return x, y


def _half_good(table: dict) -> st.SearchStrategy:
    """A key of `table`: half the time one without a fault (so that whole files without one are drawn too)."""
    return st.one_of(st.sampled_from([k for k, v in table.items() if v is None]),
                     st.sampled_from([k for k, v in table.items() if v is not None]))


def _one_fault_each(test):
    """Explicit examples: every fault alone, and files without one in each layout and label kind."""
    for table, arg in ((X_KINDS, "x_kind"), (X_LAYOUTS, "layout"), (Y_KINDS, "y_kind"), (DAMAGE, "damage")):
        for key, fault in table.items():
            if fault is not None:
                test = example(**{"x_kind": "uint8", "layout": "NHW", "y_kind": "int", "extra_y": False,
                                  "damage": "none", "safetensors": False, arg: key})(test)
    for layout in ("NHW", "NCHW", "NHWC"):
        for y_kind, safetensors in (("int", True), ("text", False)):
            test = example(x_kind="uint8", layout=layout, y_kind=y_kind, extra_y=False, damage="none",
                           safetensors=safetensors)(test)
    return example(x_kind="uint8", layout="NHW", y_kind="int", extra_y=True, damage="none", safetensors=True)(test)


@FUZZ
@given(x_kind=_half_good(X_KINDS), layout=_half_good(X_LAYOUTS), y_kind=_half_good(Y_KINDS),
       extra_y=st.booleans(), damage=_half_good(DAMAGE), safetensors=st.booleans())
@_one_fault_each
def test_fuzzed_array_files_read_or_fail_in_one_line(x_kind, layout, y_kind, extra_y, damage, safetensors, request,
                                                     capsys):
    """Hostile .npz / .safetensors pairs (fuzzed): wrong dtypes of x or y, NaN, mismatched lengths, object arrays
    (never unpickled), an empty or 2-channel image shape, a label like 10^12 (no memory blow-up) or -1, a
    zero-byte, truncated or .npy file, a missing array: the pairs, or a one-line error naming the file and one
    of its faults (exit 2); nothing is written."""
    count(request, "examples")
    n = 12
    x, y = _arrays(x_kind, layout, y_kind, n)
    y = np.concatenate([y, y[:1]]) if extra_y else y
    faults = {X_KINDS[x_kind], X_LAYOUTS[layout], Y_KINDS[y_kind], DAMAGE[damage], "y has shape" if extra_y else None}
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.numpy import save_file

        arrays = {"x": x, **({} if damage == "missing_y" else {"y": y})}
        storable = all(a.dtype.kind in "biuf" for a in arrays.values())  # safetensors holds numbers only
        path = Path(tmp) / ("pairs.safetensors" if safetensors and storable and damage != "npy" else "pairs.npz")
        if path.suffix == ".safetensors":
            save_file(arrays, str(path))
            faults.discard("allow_pickle=False")
        elif damage == "npy":
            with open(path, "wb") as f:
                np.save(f, x, allow_pickle=True)
        else:
            np.savez(path, **arrays)
        if damage == "zero_bytes":
            path.write_bytes(b"")
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        faults.discard(None)
        before = _snapshot(Path(tmp))
        if faults:
            with pytest.raises(CtrlDiffError) as e:
                load_pairs(path, (1, 8, 8))
            assert str(path) in str(e.value) and any(w in str(e.value) for w in faults), (faults, str(e.value))
            _cli_refuses(capsys, path, Path(tmp) / "run", str(path))
        else:
            pairs = load_pairs(path, (1, 8, 8))
            grey = x if layout == "NHW" else x[:, 0] if layout == "NCHW" else np.asarray(
                [np.asarray(Image.fromarray(im).convert("L")) for im in x])
            assert torch.equal(pairs.x[:, 0], torch.from_numpy(grey.astype(np.float32)) / 127.5 - 1)
            assert len(pairs.class_names) == 2 and pairs.y.tolist() == [pairs.class_names.index(str(v)) for v in y]
            _cli_refuses(capsys, path, Path(tmp) / "run", "pairs are too few")
        assert _snapshot(Path(tmp)) == before


ORACLES = '''
import torch

def bright(images):  # a sound oracle: 1 if the mean pixel is above 0.15
    return (images.mean((1, 2, 3)) > 0.15).long()

def raises(images):
    raise ValueError("no labels today")

def column(images):
    return torch.zeros(len(images), 1, dtype=torch.long)

def floats(images):
    return images.mean((1, 2, 3))

def shifted(images):  # classes counted from 1: the user forgot they follow the sorted class names from 0
    return bright(images) + 1

def text(images):
    return "thick"
'''


@pytest.fixture(scope="module")
def oracles(tmp_path_factory) -> Path:
    """A folder with the users' oracle modules: one with sound and broken labellers, one that fails on import."""
    root = tmp_path_factory.mktemp("oracles")
    (root / "user_oracles.py").write_text(ORACLES)
    (root / "broken_oracles.py").write_text("raise RuntimeError('boom at import')\n")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """60 digits as PNGs, one sub-folder per thickness class (thick/, thin/)."""
    out = tmp_path_factory.mktemp("pairs") / "digits"
    export_digits(out, get_control("thickness2"), 60, tiny())
    return out


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:f", "cannot be imported: ModuleNotFoundError"),
    ("broken_oracles:f", "cannot be imported: RuntimeError: boom at import"),
    ("user_oracles:nope", "cannot be imported: AttributeError"),
    ("user_oracles:raises", "raised ValueError: no labels today"),
    ("user_oracles:column", "returned shape (16, 1) for 16 images; expected (16,)"),
    ("user_oracles:floats", "must be integers, got torch.float32"),
    ("user_oracles:shifted", ("label 2 for control 'mine' is outside 0..1 (class indices follow the classes in "
                              "order: ['thick', 'thin'])")),
    ("user_oracles:text", "returned a str, not labels"),
])
def test_a_broken_oracle_is_one_line_naming_it_before_any_work(spec, words, oracles, digits, tmp_path, monkeypatch,
                                                               capsys):
    """`--oracle NAME=module:function` that cannot be imported (missing, failing on import, no such function),
    raises, returns the wrong shape or dtype, or labels outside 0..K-1: one line naming the function and the
    problem (exit 2), tried on 16 of the pairs before any work, so no run folder is written."""
    monkeypatch.syspath_prepend(str(oracles))
    err = _cli_refuses(capsys, digits, tmp_path / "run", words, "--oracle", f"mine={spec}")
    assert f"oracle {spec!r}" in err


# --- 3. resume for bring-your-own runs ---------------------------------------------------------------------

PAIRS_FT = ["finetune", "--preset", "tiny", "--set", "rl.steps=6", "--set", "rl.checkpoint_every=1",
            "--set", "classifier.checkpoint_every=1", "--set", "classifier.min_steps=20", "--control", "stroke"]


def _uninterrupted(argv: list[str], out: Path) -> Path:
    assert main([*argv, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pairs_run(digits, tmp_path_factory) -> Path:
    """An uninterrupted `finetune --pairs` run (the reference of the interrupted ones)."""
    return _uninterrupted([*PAIRS_FT, "--pairs", str(digits)], tmp_path_factory.mktemp("pairs-ft") / "run")


@pytest.mark.parametrize("stage, step", [("classifier-stroke", 5), ("monitor-stroke", 5), ("ctrl", 3)])
def test_a_killed_pairs_run_resumes_bit_identical_from_its_folder_alone(stage, step, digits, pairs_run, tmp_path,
                                                                        request):
    """`finetune --pairs DIR --control NAME`, SIGKILLed in a classifier, the monitor or CTRL, then `--resume RUN`
    with no other argument: the run folder records them (inputs.json); every weight, checkpoint and metrics
    record is bit-identical to an uninterrupted run."""
    _kill_during([*PAIRS_FT, "--pairs", str(digits)], tmp_path / "run", stage, step)
    count(request, "processes")
    count(request, "kills")
    assert main(["finetune", "--resume", str(tmp_path / "run")]) == 0
    assert_same_run(pairs_run, tmp_path / "run")


def test_a_killed_model_dir_run_with_pairs_classes_and_oracle_resumes_bit_identical(oracles, tmp_path, monkeypatch,
                                                                                     request):
    """`finetune --model DIR` (a diffusers UNet2DModel folder) with `.npz` pairs, `--classes` and `--oracle`,
    SIGKILLed in CTRL, then `--resume RUN` alone: bit-identical to an uninterrupted run."""
    from test_unet2d import save_pipeline

    monkeypatch.syspath_prepend(str(oracles))
    g = np.random.default_rng(0)
    y = np.arange(60) % 2
    np.savez(tmp_path / "pairs.npz", x=(g.integers(0, 128, (60, 8, 8, 3)) + 127 * y[:, None, None, None]).astype(
        np.uint8), y=y)
    argv = [*PAIRS_FT[:-2], "--model", str(save_pipeline(tmp_path / "model")), "--pairs", str(tmp_path / "pairs.npz"),
            "--control", "bright", "--classes", "dark,bright", "--oracle", "bright=user_oracles:bright"]
    # bit-identical needs one thread in every process: with 2, diffusers' UNet2DModel backward sums in a
    # thread-dependent order (CI saw Adam moments differ in the 3rd significant digit of a 1e-7 entry)
    with one_thread():
        reference = _uninterrupted(argv, tmp_path / "ref")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(oracles), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        _kill_during(argv, tmp_path / "run", "ctrl", 3, env=env)
        count(request, "processes")
        count(request, "kills")
        assert main(["finetune", "--resume", str(tmp_path / "run")]) == 0
    assert_same_run(reference, tmp_path / "run")
    assert "acc_oracle/bright" in (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("change, words", [
    ("pairs", "changed since the run started (sha256"),
    ("--pairs", "the run was started with --pairs"),
    ("--classifiers", "the run was started with no --classifiers"),
    ("--method", "the run was started with --method ctrl, not --method cfg"),
    ("inputs.json", "inputs.json is damaged"),
])
def test_a_resume_that_is_not_the_same_run_is_refused_in_one_line(change, words, digits, pairs_run, tmp_path, capsys):
    """`--resume` of a `--pairs` run whose pairs changed since it started (one pixel of one PNG: content hash),
    or given another --pairs, --classifiers or --method than it recorded, or a damaged inputs.json: one line,
    exit 2, the run folder byte-identical."""
    data = shutil.copytree(digits, tmp_path / "digits")
    run = shutil.copytree(pairs_run, tmp_path / "run")
    inputs = json.loads((run / "inputs.json").read_text())
    (run / "inputs.json").write_text(json.dumps({**inputs, "pairs": str(data)}))  # the run read this copy
    (run / "controls.json").write_text((run / "controls.json").read_text().replace(str(digits), str(data)))
    argv = ["finetune", "--resume", str(run)]
    if change == "pairs":
        png = min(data.glob("thin/*.png"))
        im = np.asarray(Image.open(png)).copy()
        im[0, 0] ^= 1
        Image.fromarray(im).save(png)
    elif change == "inputs.json":
        (run / "inputs.json").write_text('{"pairs": 3}')
    else:
        argv += {"--pairs": ["--pairs", str(digits)], "--classifiers": ["--classifiers", str(pairs_run)],
                 "--method": ["--method", "cfg"]}[change]
    before = _sha(run)
    assert main(argv) == 2
    _one_line_error(capsys, words)
    assert _sha(run) == before


# --- 4. trackers that fail to start -------------------------------------------------------------------------

FT = ["finetune", "--preset", "tiny", "--set", "rl.steps=2"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any training starts (every loop fits a classifier or calls the CTRL loop first)."""
    def work(*args, **kwargs):
        raise AssertionError("work started")

    for name in ("ctrldiff.pipeline.fit_classifier", "ctrldiff.pipeline.finetune"):
        monkeypatch.setattr(name, work)


@pytest.mark.parametrize("command", ["finetune", "demo"])
def test_a_bad_mlflow_tracking_uri_is_one_line_before_any_work(command, tmp_path, monkeypatch, no_work, capsys):
    """A tracker that fails to start (`--report-to mlflow` with a bad MLFLOW_TRACKING_URI) on `finetune` and on
    `demo`: one line naming it (exit 2) before any training, and no run folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nope://nowhere")
    monkeypatch.chdir(tmp_path)  # where MLflow would put a local store
    argv = FT if command == "finetune" else ["demo", "--presets", "tiny"]
    assert main([*argv, "--report-to", "mlflow", "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "--report-to mlflow: mlflow failed to start", "nope://nowhere")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run" / "tiny").exists()


def test_a_missing_tracker_package_on_demo_is_one_line(tmp_path, monkeypatch, no_work, capsys):
    """`demo --report-to tensorboard` without the tensorboard package: one line naming its extra, exit 2."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["demo", "--presets", "tiny", "--report-to", "tensorboard", "--out", str(tmp_path / "demo")]) == 2
    _one_line_error(capsys, "pip install 'ctrldiff[tensorboard]'")
    assert not (tmp_path / "demo").exists()


def test_demo_reports_to_tensorboard(tmp_path):
    """`demo --report-to tensorboard` sends the demo's training records to TensorBoard (its run folder's
    tensorboard/), like finetune."""
    from test_tracking import _events

    out = tmp_path / "demo"
    assert main(["demo", "--presets", "tiny", "--set", "rl.steps=2", "--set", "eval.per_class=1",
                 "--report-to", "tensorboard", "--out", str(out)]) == 0
    scalars, _ = _events(out / "tiny")
    assert [s for s, _ in scalars["reward"]] == [0, 1] and "classifier-compress4/loss" in scalars


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """A finished `finetune --report-to tensorboard` run."""
    return _uninterrupted([*FT, "--report-to", "tensorboard"], tmp_path_factory.mktemp("tracked") / "run")


@pytest.mark.parametrize("case, words", [
    ("unwritable tensorboard folder", "tensorboard failed to start (FileExistsError"),
    ("damaged tracking.json", "tracking.json is damaged"),
    ("overwrite with a bad MLflow URI", "mlflow failed to start"),
])
def test_a_tracker_that_cannot_start_leaves_the_run_folder_as_it_was(case, words, tracked, tmp_path, monkeypatch,
                                                                     no_work, capsys):
    """A resumed run whose tracker cannot start (its tensorboard/ folder cannot be written; a damaged
    tracking.json), and `--overwrite` of a run with a tracker that cannot start: one line, exit 2, before any
    work; the old run folder byte-identical (an overwritten run is put aside and comes back)."""
    run = shutil.copytree(tracked, tmp_path / "run")
    argv = ["finetune", "--resume", str(run)]
    if case == "unwritable tensorboard folder":
        shutil.rmtree(run / "tensorboard")
        (run / "tensorboard").write_text("a file where the tracker writes its folder")
    elif case == "damaged tracking.json":
        (run / "tracking.json").write_text('{"report_to": "tensorboard"}')
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "nope://nowhere")
        monkeypatch.chdir(tmp_path)
        argv = [*FT, "--report-to", "mlflow", "--overwrite", "--out", str(run)]
    before = _sha(tmp_path)
    assert main(argv) == 2
    _one_line_error(capsys, words)
    assert _sha(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["run"]


# --- 5. corrupted artefacts ---------------------------------------------------------------------------------

def _flip_a_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # in the last tensor's bytes, after the header
    path.write_bytes(bytes(data))


def _edit_metadata(path: Path) -> None:
    """Change a value in the ctrldiff metadata of the header (as a hand edit would), keeping the file well-formed."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["ctrldiff"])
    header["__metadata__"]["ctrldiff"] = json.dumps({**meta, "gammas": {"stroke": 99.0}})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "tensor byte flipped": _flip_a_tensor_byte,
    "metadata edited": _edit_metadata,
}


@pytest.fixture(scope="module")
def pairs_clf(digits, tmp_path_factory) -> Path:
    """A `classifier --pairs` run (control `stroke`) and the target's bank of the tiny preset beside it."""
    out = tmp_path_factory.mktemp("clf") / "run"
    assert main(["classifier", "--preset", "tiny", "--pairs", str(digits), "--control", "stroke",
                 "--out", str(out)]) == 0
    assert main(["evaluate", "--preset", "tiny", "--method", "target", "--classifiers", str(out), "--control", "stroke",
                 "--set", f'target.bank="{out / "bank.safetensors"}"', "--out", str(out.parent / "eval")]) == 0
    return out


@pytest.fixture(scope="module")
def pairs_ckpt(pairs_clf, tmp_path_factory) -> Path:
    return _uninterrupted(["finetune", "--preset", "tiny", "--set", "rl.steps=2", "--classifiers", str(pairs_clf),
                           "--control", "stroke"], tmp_path_factory.mktemp("ft") / "run")


def _corrupt_cases():
    cases = [(f"ctrl.safetensors {d}", "ctrl.safetensors", d) for d in DAMAGES]
    cases += [(f"bank {d}", "bank.safetensors", d) for d in DAMAGES]
    cases += [("controls.json truncated", "controls.json", "truncated"),
              ("controls.json: 3 classes", "controls.json", "3 classes"),
              ("controls.json: class names", "controls.json", "class names"),
              ("controls.json: a list", "controls.json", "a list"),
              ("config.json truncated", "config.json", "truncated"),
              ("config.json: a list", "config.json", "a list"),
              ("config.json: unknown key", "config.json", "unknown key"),
              ("config.json: rl.steps=-1", "config.json", "rl.steps=-1")]
    return cases


WORDS = {"truncated": "corrupt", "tensor byte flipped": "differ from the sha256 in its header",
         "metadata edited": "differ from the sha256 in its header", "3 classes": "has 2 classes, but control 'stroke' "
         "is defined with 3", "class names": "damaged or edited at control 'stroke'", "a list": "",
         "unknown key": "unknown config key 'rl.nope'", "rl.steps=-1": "rl.steps"}


@pytest.mark.parametrize("name, artefact, damage", _corrupt_cases(), ids=[c[0] for c in _corrupt_cases()])
def test_a_corrupted_artefact_is_one_line_naming_it(name, artefact, damage, pairs_clf, pairs_ckpt, tmp_path, capsys):
    """A truncated or edited ctrl.safetensors (sample), bank file (evaluate --method target), controls.json
    (finetune --classifiers), config.json (--resume): one line naming the file (exit 2), every file
    byte-identical; a byte or metadata edit is caught by the sha256 in the safetensors header."""
    clf, ft = shutil.copytree(pairs_clf, tmp_path / "clf"), shutil.copytree(pairs_ckpt, tmp_path / "ft")
    tiny_args = ["--preset", "tiny", "--out", str(tmp_path / "new")]
    path, argv = {
        "ctrl.safetensors": (ft / "ctrl.safetensors", ["sample", "--ckpt", str(ft / "ctrl.safetensors"), *tiny_args]),
        "bank.safetensors": (clf / "bank.safetensors", ["evaluate", "--method", "target", "--classifiers", str(clf),
                                                        "--control", "stroke", "--set",
                                                        f'target.bank="{clf / "bank.safetensors"}"', *tiny_args]),
        "controls.json": (clf / "controls.json", ["finetune", "--classifiers", str(clf), "--control", "stroke",
                                                  *tiny_args]),
        "config.json": (ft / "config.json", ["finetune", "--resume", str(ft)]),
    }[artefact]
    if damage in DAMAGES:
        DAMAGES[damage](path)
    elif artefact == "controls.json":
        defs = json.loads(path.read_text())
        defs["stroke"].update({"3 classes": {"num_classes": 3, "class_names": ["thick", "thin", "other"]},
                               "class names": {"class_names": ["thick"]}}.get(damage, {}))
        path.write_text(json.dumps([defs] if damage == "a list" else defs))
    else:
        cfg = json.loads(path.read_text())
        cfg["rl"].update({"unknown key": {"nope": 1}, "rl.steps=-1": {"steps": -1}}.get(damage, {}))
        path.write_text(json.dumps([cfg] if damage == "a list" else cfg))
    before = _sha(tmp_path)
    assert main(argv) == 2
    _one_line_error(capsys, str(path.parent), path.name, WORDS[damage])
    after = _sha(tmp_path)  # a command that fails after it started may leave its new folder; nothing else changes
    assert {k: after.get(k) for k in before} == before


def test_a_damaged_classifiers_json_changes_nothing(pairs_clf, pairs_ckpt, tmp_path):
    """classifiers.json (the fit reports) is read by no command: with it truncated, `finetune --classifiers`
    runs bit-identical to the run with it intact (the classifiers themselves carry their sha256)."""
    clf = shutil.copytree(pairs_clf, tmp_path / "clf")
    (clf / "classifiers.json").write_bytes((clf / "classifiers.json").read_bytes()[:20])
    _uninterrupted(["finetune", "--preset", "tiny", "--set", "rl.steps=2", "--classifiers", str(clf),
                    "--control", "stroke"], tmp_path / "ft")
    assert_same_run(pairs_ckpt, tmp_path / "ft")
