"""`ctrldiff bench --quick`: a smoke run of the whole benchmark on tiny sizes (values are not asserted)."""

import json

from ctrldiff.bench import GRID, SIZES, TASKS
from ctrldiff.cli import main


def test_quick_bench_writes_every_table_and_figure(tmp_path):
    out, docs = tmp_path / "bench", tmp_path / "docs"
    (docs).mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n<!-- section:core -->\nkept\n<!-- /section:core -->\n")
    assert main(["bench", "--quick", "--out", str(out), "--docs", str(docs)]) == 0
    text = (docs / "benchmarks.md").read_text()
    assert "kept" in text  # another producer's section survives
    for heading in ["## Single control: compress4", "## Multi-task 2×2", "## Sample efficiency", "## The γ trade-off",
                    "## Sample grids", "## Beside the paper"]:
        assert heading in text, heading
    for method in GRID:  # every method has a row in both tables and in the grid table
        assert text.count(f"\n| {method} |") == 3, method
    assert "**thickness2=1,compress2=0** (hard)" in text
    size = SIZES["quick"]
    for name in ["sample_efficiency.png", "gamma_sweep.png",
                 *[f"grid-{task}-{m}.png" for task in TASKS for m in GRID]]:
        path = docs / "figures" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}" in text, name
    results = json.loads((out / "bench.json").read_text())
    assert sorted(results["tasks"]["compress4"]["runs"]) == [str(s) for s in size.seeds]
    assert sorted(map(int, results["efficiency"]["ctrl"])) == size.pairs
    assert results["seconds"] > 0 and results["peak_rss_gb"] > 0


def test_bench_refuses_an_existing_run_folder(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "keep.txt").write_text("x")
    assert main(["bench", "--quick", "--out", str(tmp_path / "bench")]) == 2
    assert (tmp_path / "bench" / "keep.txt").read_text() == "x"
