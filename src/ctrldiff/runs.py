"""A run folder: runs/<name>/ with config.json, metrics.jsonl, checkpoints, PNGs and metrics.md."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import Checkpointer
from .config import Config, config_diff, from_dict
from .io import CtrlDiffError, read_json, refuse_existing, write_json


class Run:
    def __init__(self, root: str | Path, cfg: Config, overwrite: bool = False, resume: bool = False,
                 report_to: str | None = None):
        """resume: continue the run in `root` (its config must equal cfg); its checkpoints say where.
        report_to: experiment trackers fed beside metrics.jsonl (`tracking.py`); None: none, or the run's own."""
        self.dir, self.cfg, self.tracker = Path(root), cfg, None
        if resume:
            self._check_resumable()
            self._track(report_to, resume=True)
            if self.tracker is not None:  # before any work: a tracker that cannot start is a one-line error
                self.tracker.start()
            return
        self._track(report_to, resume=False)  # a tracker that is not installed fails before the folder is touched
        if not overwrite:
            refuse_existing(self.dir)
        self._create()

    def _create(self) -> None:
        """config.json in a new folder, and the trackers started before any work (one that cannot start, e.g. on
        a bad MLFLOW_TRACKING_URI, is a one-line error). If that fails, the disk is as it was: the folders this
        made are removed, and an old run being overwritten, put aside first, comes back."""
        old = None
        if self.dir.exists() and any(self.dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}.replaced.", dir=self.dir.parent)) / "run"
            os.replace(self.dir, old)
        made = next((p for p in reversed([self.dir, *self.dir.parents]) if not p.exists()), None)  # the topmost
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / "config.json", self.cfg.to_dict())
            if self.tracker is not None:
                self.tracker.start()
        except BaseException:
            shutil.rmtree(made or self.dir, ignore_errors=True)
            if old is not None:
                os.replace(old, self.dir)
            elif made is None:  # it was there, empty
                self.dir.mkdir()
            raise
        finally:
            if old is not None:
                shutil.rmtree(old.parent, ignore_errors=True)

    def _check_resumable(self) -> None:
        key = config_diff(read_config(self.dir).to_dict(), self.cfg.to_dict())
        if key is not None:
            raise CtrlDiffError(f"--resume {self.dir}: the config differs from the run's at {key}; "
                                f"pass the run's --preset and --set (or none to reuse them)")

    def _track(self, report_to: str | None, resume: bool) -> None:
        if resume and report_to is None:
            from .tracking import reported_to

            report_to = reported_to(self.dir)
        if report_to in (None, "none"):  # no tracker module is imported
            return
        from .tracking import Tracker, record_key

        logged = {record_key(r) for r in self.records()} if resume else set()  # before a resume cuts them back
        self.tracker = Tracker(self.dir, report_to, self.cfg.to_dict(), logged)

    def checkpointer(self, name: str, every: int) -> Checkpointer:
        """The checkpoints of one training loop of this run (checkpoints/<name>.safetensors)."""
        return Checkpointer(self.path(f"checkpoints/{name}.safetensors"), self.cfg.to_dict(), every,
                            self.path("metrics.jsonl"))

    def path(self, name: str) -> Path:
        return self.dir / name

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (a line is small; append is atomic enough for a log)."""
        with open(self.dir / "metrics.jsonl", "ab") as f:  # one write per line; a torn last line is
            f.write((json.dumps(record) + "\n").encode())  # cut at resume (Checkpointer) and skipped by records
        if self.tracker is not None:  # after the line: a record the tracker has is in metrics.jsonl
            self.tracker.log(record)

    def log_image(self, name: str, image, step: int) -> None:
        """An image (H, W, C uint8) to the experiment trackers (metrics.jsonl keeps numbers only)."""
        if self.tracker is not None:
            self.tracker.log_image(name, image, step)

    def close(self) -> None:
        """Finish the experiment trackers (also done at exit)."""
        if self.tracker is not None:
            self.tracker.close()

    def records(self) -> list[dict]:
        return read_records(self.dir)


def read_config(folder: str | Path) -> Config:
    """A run folder's config.json, checked as `--set` values are: a damaged or edited one is a one-line error
    naming it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CtrlDiffError(f"--resume {folder}: no run there (config.json missing)")
    d = read_json(path)
    try:
        if not isinstance(d, dict):
            raise CtrlDiffError("it is not a JSON object")
        return from_dict(d)
    except CtrlDiffError as e:
        raise CtrlDiffError(f"{path}: {e}") from None


def read_records(folder: str | Path) -> list[dict]:
    """A run folder's metrics.jsonl, every whole line (a torn last one is left out); [] where there is none."""
    p = Path(folder) / "metrics.jsonl"
    lines = p.read_text().splitlines(keepends=True) if p.exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]
