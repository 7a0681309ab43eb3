"""A run folder: runs/<name>/ with config.json, metrics.jsonl, checkpoints, PNGs and metrics.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import Checkpointer
from .config import Config, config_diff
from .io import CtrlDiffError, read_json, write_json


class Run:
    def __init__(self, root: str | Path, cfg: Config, overwrite: bool = False, resume: bool = False):
        """resume: continue the run in `root` (its config must equal cfg); its checkpoints say where."""
        self.dir, self.cfg = Path(root), cfg
        if resume:
            self._check_resumable()
            return
        if self.dir.exists() and any(self.dir.iterdir()) and not overwrite:
            raise CtrlDiffError(f"run folder {self.dir} already exists; pass --overwrite or choose another --out")
        if overwrite and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "config.json", cfg.to_dict())

    def _check_resumable(self) -> None:
        if not (self.dir / "config.json").is_file():
            raise CtrlDiffError(f"--resume {self.dir}: no run there (config.json missing)")
        key = config_diff(read_json(self.dir / "config.json"), self.cfg.to_dict())
        if key is not None:
            raise CtrlDiffError(f"--resume {self.dir}: the config differs from the run's at {key}; "
                                f"pass the run's --preset and --set (or none to reuse them)")

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

    def records(self) -> list[dict]:
        p = self.dir / "metrics.jsonl"
        lines = p.read_text().splitlines(keepends=True) if p.exists() else []
        return [json.loads(line) for line in lines if line.endswith("\n")]
