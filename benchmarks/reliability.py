"""Issue 27's hardening cases, run and tabulated (docs/reliability.md, section `hardening`).

1. Runs tests/test_hardening.py (pytest, JUnit XML) and tabulates each test: the case (its docstring), how many
   instances, the processes, kills and fuzz examples it recorded, and its outcome.
2. Breaks each protection once (MUTANTS: a one-place edit of a copy of src/, never of the working tree, imported
   first through PYTHONPATH) and runs the tests that guard it: each must fail (or hang, which its timeout stops).

    python benchmarks/reliability.py                 # both -> docs/reliability.md, section hardening
    python benchmarks/reliability.py --no-mutants    # the cases only
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from _doc import ROOT, machine

from ctrldiff.io import write_section

TESTS = ROOT / "tests" / "test_hardening.py"
COUNTS = ("processes", "kills", "examples")
TMP = re.escape(tempfile.gettempdir()) + r"/\S*"  # temp paths in failure messages: noise in the table

LOCK_NEVER_RELEASED = '''def _locked(path: Path):  # a lock file only its holder removes: a killed holder's stays
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            break
        except FileExistsError:
            print(f"waiting for process {lock.read_text()}, which is building {path}", file=sys.stderr)
            __import__("time").sleep(0.2)
    yield
    os.close(fd)
    lock.unlink()


@contextmanager
def _flocked(path: Path):'''

# (protection broken, file under src/ctrldiff, the text replaced, its replacement, the tests run: pytest -k)
MUTANTS = [
    ("bank: no lock (each process builds)", "io.py", "        with _locked(path):", "        if True:", "three"),
    ("bank: a lock a killed holder never releases (a pid file without the kernel's flock)", "io.py",
     "def _locked(path: Path):", LOCK_NEVER_RELEASED, "three"),
    ("bank: a killed builder's temp file not removed", "io.py", "                    stale.unlink()",
     "                    pass", "three"),
    ("bank: written in place, not by atomic rename", "io.py", "    with atomic_path(path) as tmp:\n        save_file(",
     "    with __import__('contextlib').nullcontext(Path(path)) as tmp:\n        save_file(", "three"),
    ("safetensors: the header's sha256 not checked", "io.py", 'if "sha256" in stored and',
     'if False and "sha256" in stored and', "corrupt"),
    ("pairs: 16-bit grey left to PIL (clipped at 255)", "pairs.py", 'if image.mode.startswith("I;16"):',
     "if False:", "image_folders"),
    ("pairs: transparency left to PIL (alpha dropped)", "pairs.py", "if image.has_transparency_data:", "if False:",
     "image_folders"),
    ("pairs: 32-bit / float images not refused", "pairs.py", 'if image.mode in ("I", "F"):', "if False:",
     "image_folders"),
    ("pairs: PIL's pixel limit only warns below twice the limit", "pairs.py",
     'warnings.simplefilter("error", Image.DecompressionBombWarning)',
     'warnings.simplefilter("default", Image.DecompressionBombWarning)', "image_folders"),
    ("pairs: only OSError/ValueError caught from PIL (a bomb over twice the limit raises another)", "pairs.py",
     "    except Exception as e:  # noqa: BLE001 - whatever PIL raises on a damaged or hostile file",
     "    except (OSError, ValueError) as e:  # whatever PIL raises on a damaged or hostile file", "image_folders"),
    ("CLI: control characters of a file name not escaped (a newline splits the error)", "cli/__init__.py",
     'return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)', "return message", "image_folders"),
    ("pairs: non-regular files opened (a pipe blocks)", "pairs.py", "    if not path.is_file():  # opening a named",
     "    if False:  # opening a named", "image_folders"),
    ("CSV: read without dropping a BOM", "pairs.py", 'encoding="utf-8-sig"', 'encoding="utf-8"', "csv"),
    ("CSV: a decoding error not caught", "pairs.py", "except (UnicodeDecodeError, csv.Error) as e:",
     "except csv.Error as e:", "csv"),
    ("CSV: a repeated row read twice", "pairs.py", "        if first == i:\n", "        if True:\n", "csv"),
    ("CSV: a file with two labels accepted", "pairs.py", "if first != i and was != label:", "if False:", "csv"),
    ("arrays: only OSError/ValueError caught while reading", "pairs.py",
     "    except Exception as e:  # noqa: BLE001 - whatever numpy, zipfile or safetensors raise: a damaged file",
     "    except (OSError, ValueError) as e:", "array_files"),
    ("arrays: object arrays unpickled", "pairs.py", "d = np.load(path, allow_pickle=False)",
     "d = np.load(path, allow_pickle=True)", "array_files"),
    ("arrays: an .npy read as if it were an .npz", "pairs.py", "if not isinstance(d, np.lib.npyio.NpzFile):",
     "if False:", "array_files"),
    ("arrays: x's dtype not checked (floats, NaN)", "pairs.py", "    if x.dtype != np.uint8:", "    if False:",
     "array_files"),
    ("arrays: y's length not checked", "pairs.py", "    if y.ndim != 1 or len(y) != len(x):", "    if False:",
     "array_files"),
    ("arrays: empty images not refused", "pairs.py", "    if 0 in x.shape[1:3]:", "    if False:", "array_files"),
    ("labels: empty classes found by bincount (a label 10^12 allocates terabytes)", "pairs.py",
     "empty = next(i for i in range(len(present) + 1) if i not in present)",
     "empty = (lambda c: int(np.argmin(c)) if (c == 0).any() else k)(np.bincount(ys, minlength=k))", "array_files"),
    ("oracle: the user's function called unwrapped", "definitions.py",
     'labeller=checked_oracle(definition["oracle"], control)', 'labeller=resolve_oracle(definition["oracle"])',
     "oracle"),
    ("oracle: only ImportError/AttributeError caught on import", "definitions.py",
     "    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way while it is imported",
     "    except (ImportError, AttributeError) as e:", "oracle"),
    ("oracle: not tried on the pairs when defined", "definitions.py", "            control.label((probe[:PROBE] + 1) / 2)",
     "            pass", "oracle"),
    ("resume: inputs.json not read back", "cli/options.py", "    if resume is not None:\n        recall(args)",
     "    if False:\n        recall(args)", "killed_pairs or killed_model"),
    ("resume: inputs.json not checked", "cli/options.py",
     "    if not isinstance(recorded, dict) or any(k not in RESUMED or not isinstance(v, str) for k, v in recorded",
     "    if False:  #", "not_the_same_run"),
    ("resume: the pairs' sha256 not compared", "cli/train.py", "        _check_unchanged(args.resume, made)",
     "        pass", "not_the_same_run"),
    ("resume: arguments given again not compared", "cli/options.py",
     "if key in given and given[key] != recorded.get(key):", "if False:", "not_the_same_run"),
    ("config.json: not checked to be an object", "runs.py", "        if not isinstance(d, dict):",
     "        if False:", "corrupt"),
    ("config.json: its errors not prefixed with its path", "runs.py", 'raise CtrlDiffError(f"{path}: {e}") from None',
     "raise", "corrupt"),
    ("controls.json: not checked", "definitions.py",
     'bad = next((k for k, d in defs.items() if not _sound(k, d)), None) if isinstance(defs, dict) else "?"',
     "bad = None", "corrupt"),
    ("classifiers: K not compared with the control's", "classifier.py",
     "if num_classes is not None and k != num_classes:", "if False:", "corrupt"),
    ("trackers: started at the first record, after work", "runs.py",
     "            if self.tracker is not None:\n                self.tracker.start()",
     "            if False:\n                self.tracker.start()", "mlflow or cannot_start"),
    ("trackers: a start failure not caught", "tracking.py",
     "            except Exception as e:  # noqa: BLE001", "            except CtrlDiffError as e:  #",
     "mlflow or cannot_start"),
    ("trackers: an overwritten run deleted, not put aside", "runs.py", "            os.replace(self.dir, old)",
     "            shutil.rmtree(self.dir)", "cannot_start"),
    ("trackers: tracking.json not checked", "tracking.py",
     "    if not (isinstance(state, dict) and", "    if False and not (isinstance(state, dict) and", "cannot_start"),
    ("demo: no --report-to", "cli/__init__.py",
     "    add_device(p)\n    add_report(p)\n    p.set_defaults(fn=cmd_demo)", "    add_device(p)\n    p.set_defaults(fn=cmd_demo)", "demo"),
]


def pytest(args: list[str], xml: Path, pythonpath: str | None = None, timeout: float | None = None) -> int | None:
    """Run pytest on the hardening tests; the exit code (None: stopped by its timeout, i.e. hung)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    try:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS), *args,
                               f"--junitxml={xml}"], check=False, cwd=ROOT, env=env, timeout=timeout,
                              stdout=subprocess.DEVNULL).returncode
    except subprocess.TimeoutExpired:
        return None


def cases(xml: Path) -> list[dict]:
    """Each test case of a JUnit XML: name, outcome, seconds, counts."""
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        props = {p.get("name"): int(p.get("value")) for p in case.iter("property")}
        out.append({"name": case.get("name"), "outcome": "passed" if bad is None else bad.tag,
                    "message": "" if bad is None else " ".join(re.sub(TMP, "…", bad.get("message") or "").split())[:100],
                    "seconds": float(case.get("time")), **{k: props.get(k, 0) for k in COUNTS}})
    return out


def docstrings() -> dict[str, str]:
    sys.path.insert(0, str(TESTS.parent))
    import test_hardening

    return {name: " ".join(fn.__doc__.split()) for name, fn in vars(test_hardening).items()
            if name.startswith("test_") and fn.__doc__}


def case_table(rows: list[dict]) -> list[str]:
    docs, by_test = docstrings(), {}
    for r in rows:
        by_test.setdefault(r["name"].split("[")[0], []).append(r)
    lines = ["| case | test | instances | processes | kills | fuzz examples | outcome |", "|---" * 7 + "|"]
    for test, runs in by_test.items():
        params = [r["name"].split("[", 1)[1][:-1] for r in runs if "[" in r["name"]]
        passed = sum(r["outcome"] == "passed" for r in runs)
        sums = [sum(r[k] for r in runs) or "" for k in COUNTS]
        lines.append(f"| {docs.get(test, '')} | `{test}` | {len(runs)}{': ' + ', '.join(params) if params else ''} | "
                     f"{' | '.join(map(str, sums))} | {passed} of {len(runs)} passed, "
                     f"{sum(r['seconds'] for r in runs):.1f} s |")
    return lines


def mutant_table(tmp: Path) -> list[str]:
    lines = ["| protection broken | file | tests run (`-k`) | result |", "|---|---|---|---|"]
    for what, file, old, new, select in MUTANTS:
        src = tmp / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(ROOT / "src", src)
        path = src / "ctrldiff" / file
        text = path.read_text()
        assert text.count(old) == 1, f"{what}: the text to break is not (once) in {file}"
        path.write_text(text.replace(old, new))
        compile(path.read_text(), str(path), "exec")  # a broken protection, not broken Python
        t0 = time.time()
        rc = pytest(["-x", "-k", select], tmp / "mutant.xml", str(src), timeout=600)
        failed = [] if rc is None else [c for c in cases(tmp / "mutant.xml") if c["outcome"] != "passed"]
        result = ("hung: stopped after 600 s" if rc is None else "NOT CAUGHT: the tests pass" if not failed
                  else f"**fails**: `{failed[0]['name']}`: {failed[0]['message'].replace('|', '/')}")
        lines.append(f"| {what} | {file} | `{select}` | {result} ({time.time() - t0:.0f} s) |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-mutants", action="store_true", help="skip breaking each protection")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rc = pytest([], tmp / "cases.xml")
        rows = cases(tmp / "cases.xml")
        minutes = (time.time() - t0) / 60
        totals = {k: sum(r[k] for r in rows) for k in COUNTS}
        lines = ["## Hardening: shared caches, hostile user data, bring-your-own resume, trackers, corrupted files\n",
                 (f"Produced by `python benchmarks/reliability.py{' --no-mutants' if args.no_mutants else ''}` on "
                  f"{machine()}, {time.strftime('%Y-%m-%d')}. `tests/test_hardening.py` (CPU, tiny preset): "
                  f"{len(rows)} tests, {sum(r['outcome'] == 'passed' for r in rows)} passed (pytest exit {rc}) in "
                  f"{minutes:.1f} min, with {totals['processes']} processes spawned, {totals['kills']} SIGKILLs "
                  f"and {totals['examples']} fuzz examples (hypothesis, derandomised: the same on every run; "
                  "every fault kind is also an explicit example).\n"), *case_table(rows)]
        if not args.no_mutants:
            t1 = time.time()
            table = mutant_table(tmp)
            caught = sum("**fails**" in line or "hung" in line for line in table[2:])
            lines += ["", (f"Each protection broken once (a copy of `src/` edited in one place, imported first; "
                           f"{(time.time() - t1) / 60:.1f} min): {caught} of {len(MUTANTS)} make their tests fail "
                           "(the first failing test shown; `-x` stops there).\n"), *table]
    write_section(args.doc, "hardening", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
