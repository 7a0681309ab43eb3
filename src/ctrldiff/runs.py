"""A run folder: runs/<name>/ with config.json, metrics.jsonl, checkpoints, PNGs and metrics.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import Config
from .io import CtrlDiffError, write_json


class Run:
    def __init__(self, root: str | Path, cfg: Config, overwrite: bool = False, resume_ok: bool = False):
        self.dir = Path(root)
        if self.dir.exists() and any(self.dir.iterdir()) and not (overwrite or resume_ok):
            raise CtrlDiffError(f"run folder {self.dir} already exists; pass --overwrite or choose another --out")
        if overwrite and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        write_json(self.dir / "config.json", cfg.to_dict())

    def path(self, name: str) -> Path:
        return self.dir / name

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (a line is small; append is atomic enough for a log)."""
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        p = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
