"""docs/benchmarks.md is written by several benchmark scripts, each owning one marked section."""

from __future__ import annotations

from pathlib import Path

from ctrldiff.bench import machine
from ctrldiff.io import write_section as _write_section

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"

__all__ = ["machine", "write_section"]


def write_section(key: str, text: str) -> None:
    _write_section(BENCHMARKS_MD, key, text)
