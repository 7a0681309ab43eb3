"""benchmarks/sd_scale.py: the SD-1.5-shaped cost benchmark (tiny size end to end; the full-size configs by
shape only, on the meta device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrldiff.backends.sd import build_sd_parts, shape_configs
from ctrldiff.io import CtrlDiffError

ROOT = Path(__file__).resolve().parents[1]


def test_sd15_configs_have_sd15_shapes_without_allocating(tmp_path):
    from accelerate import init_empty_weights

    with init_empty_weights():
        parts = build_sd_parts("sd15", tmp_path / "tokenizer")
    counts = {}
    for name in ("unet", "vae", "text_encoder"):
        params = list(parts[name].parameters())
        assert all(p.device.type == "meta" for p in params), name  # no weight was allocated
        counts[name] = sum(p.numel() for p in params)
    # SD v1.5: UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text tower 123.1 M parameters
    for name, want in [("unet", 859.5e6), ("vae", 83.65e6), ("text_encoder", 123.06e6)]:
        assert abs(counts[name] - want) < 0.01 * want, (name, counts[name])
    assert parts["unet"].config.sample_size * 2 ** (len(parts["vae"].config.block_out_channels) - 1) == 512
    assert max(parts["tokenizer"].get_vocab().values()) < shape_configs("sd15")["text_encoder"]["vocab_size"]
    with pytest.raises(CtrlDiffError, match="choose from"):
        shape_configs("sd21")


def test_tiny_benchmark_reports_time_memory_and_trains_only_adapters(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n<!-- section:core -->\nkept\n<!-- /section:core -->\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sd_scale.py"), "--size", "tiny", "--device", "cpu",
           "--steps", "1", "--warmup", "1", "--set", "sampler.steps=3", "--out", str(tmp_path / "out"),
           "--docs", str(docs)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "sd_scale.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["settings"]["rl.batch"] == 1  # the CPU default: one row at batch 1
    r = rows[0]["result"]
    assert "error" not in r, r
    assert len(r["step_seconds"]) == 1 and r["step_seconds"][0] > 0 and r["step_peak_gib"] > 0
    assert len(r["sample_seconds"]) == 1 and r["sample_seconds"][0] > 0 and r["sample_peak_gib"] > 0
    assert r["frozen_unchanged"] and r["adapters_changed"]  # a step changed the adapters and nothing else
    text = (docs / "benchmarks.md").read_text()
    assert "kept" in text and "<!-- section:sd_scale -->" in text and "| 1 | float32 | no | true | random |" in text
    # the same section from the run's JSON (a run made on another machine)
    again = tmp_path / "again"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sd_scale.py"), "--from-json",
           str(tmp_path / "out" / "sd_scale.json"), "--docs", str(again)]
    assert subprocess.run(cmd, check=False, capture_output=True, timeout=120).returncode == 0
    section = text[text.index("<!-- section:sd_scale -->"):]
    assert (again / "benchmarks.md").read_text().endswith(section)
