"""Atomic, pickle-free file I/O: every file ctrldiff writes goes to a temp file first and is renamed."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file


class CtrlDiffError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""


def reason(e: BaseException) -> str:
    """What a one-line error quotes of an exception: its message's first line (its type if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after writing (a writer may recreate the file): mkstemp's 0600 would
        os.replace(tmp, path)  # make shared results unreadable
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a new temp folder beside `path`; it replaces `path` (removed first if it exists) only if the block
    finishes, so a folder is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, like mkstemp's 0600, would hide the result
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def refuse_existing(folder: Path, what: str = "run folder", options: str = "--overwrite") -> None:
    """A folder that holds anything is replaced only when told (`options`): one line before any work."""
    if folder.exists() and any(folder.iterdir()):
        raise CtrlDiffError(f"{what + ' ' if what else ''}{folder} already exists; pass {options} or choose another --out")


def worker_threads(jobs: int) -> int:
    """CPU threads of each of `jobs` workers side by side: an equal share of the cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


@contextmanager
def worker_pool(jobs: int):
    """`jobs` spawned worker processes sharing this machine's cores; yields (pool, threads per worker). The
    workers start with OMP_NUM_THREADS at their share: set before their OpenMP starts, a worker's step was 7-9%
    faster than with torch.set_num_threads alone (two demo workers side by side, two repeats)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    threads = worker_threads(jobs)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            yield pool, threads
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old


def default_jobs(tasks: int, cpu: bool) -> int:
    """Worker processes for `tasks` independent jobs: one per core while each gets a core of its own; off the CPU
    (a GPU), or on one core, 1 (in turn, in this process)."""
    return max(1, min(tasks, os.cpu_count() or 1)) if cpu else 1


def write_section(path: str | Path, key: str, text: str) -> None:
    """Replace (or append) the section `key` of a markdown file, written by several producers, each owning
    the text between its `<!-- section:key -->` markers."""
    start, end = f"<!-- section:{key} -->", f"<!-- /section:{key} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    path = Path(path)
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    write_text(path, doc)


def write_json(path: str | Path, obj, sort_keys: bool = True) -> None:
    """Atomically; keys sorted (stable diffs of configs) unless their order means something (`sort_keys=False`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CtrlDiffError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise CtrlDiffError(f"corrupt JSON in {path}: {e}") from None


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """safetensors + JSON metadata (stored in the file's header), written atomically, with the sha256 of both
    in the header: a file damaged or edited later is refused when it is loaded, never silently used."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(meta or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ctrldiff": text, "sha256": _digest(tensors, text)})


def _digest(tensors: dict[str, torch.Tensor], meta: str) -> str:
    """sha256 of the metadata's text and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_meta(path: str | Path) -> dict:
    """The ctrldiff metadata in a safetensors header, without reading the tensors."""
    return _read(path, tensors=False)[1]


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and metadata from safetensors (never unpickling)."""
    return _read(path, tensors=True)


def _read(path: str | Path, tensors: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """One read of the whole file, then parsed: safetensors' own `safe_open` opens the path twice (header,
    then mapping), so a reader racing an atomic rename could pair one file's header with another's size."""
    path = Path(path)
    if not path.is_file():
        raise CtrlDiffError(f"missing checkpoint {path}")
    try:
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + n > len(data):
            raise ValueError(f"{len(data)} bytes, truncated")
        header = json.loads(data[8:8 + n])
        stored = header.get("__metadata__") or {}
        text = stored.get("ctrldiff", "{}")
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise TypeError("its ctrldiff metadata is not a JSON object")
        if not tensors:
            return {}, meta
        state = load(data)
        if "sha256" in stored and stored["sha256"] != _digest(state, text):  # older files have no digest
            raise ValueError("its contents differ from the sha256 in its header (damaged or edited)")
        return state, meta
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise CtrlDiffError(f"corrupt checkpoint {path}: {reason(e)}") from None


@contextmanager
def _locked(path: Path):
    """Hold an exclusive OS lock (flock) on `.<name>.lock` beside `path`. The kernel drops it when its holder's
    process ends, however it ends: a killed holder leaves no stale lock. The lock file itself stays (removing it
    would let a newcomer lock a new file while a waiter holds the old one)."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            print(f"waiting for process {f.read().strip() or '?'}, which is building {path}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(str(os.getpid()))  # for the message of the next waiter
        f.flush()
        yield


def build_once(path: str | Path, build: Callable[[], dict[str, torch.Tensor]], meta: dict) -> tuple[dict, dict]:
    """The safetensors file at `path` (tensors, metadata), built by `build` and saved with `meta` if it is missing,
    by one process however many ask at once: the first to take the lock builds, the others wait and then read
    what it wrote. Files appear by atomic rename, so no reader sees a partial one; a killed builder's lock is
    gone with it, and its temp file is removed by the next builder."""
    path = Path(path)
    if not path.exists():
        with _locked(path):
            if not path.exists():  # not built while this process waited
                for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # atomic_path's temp names
                    stale.unlink()
                save_weights(path, build(), meta)
    return load_weights(path)


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """`load_state_dict` with a one-line error naming the first mismatch."""
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise CtrlDiffError(f"checkpoint {path} does not match the model ({detail})")
    module.load_state_dict(state)
