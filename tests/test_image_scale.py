"""The scale benchmark's code on small sizes: synthetic LAION metadata through the whole image flow in a
fresh process per size, and a result file with the fields BENCHMARKS.md reports."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_metadata_has_laions_schema_and_the_asked_loopback_share(tmp_path):
    bench = _bench()
    path = tmp_path / "laion.parquet"
    bench.write_metadata(path, 1200, every=100, port=8123)
    table = pq.read_table(path)
    assert table.num_rows == 1200
    assert {"URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark"} <= set(table.column_names)
    urls = table["URL"].to_pylist()
    assert sum(u.startswith("http://127.0.0.1:8123/") for u in urls) == 12
    assert all(u.startswith(("http://127.0.0.1:8123/", "http://10.")) for u in urls)


def test_scale_benchmark_writes_both_ratios_and_the_raw_figures(tmp_path):
    bench = _bench()
    out = tmp_path / "scale.json"
    assert bench.main(["--sizes", "10000", "20000", "--repeats", "1", "--every", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = {r["rows"]: r for r in result["runs"]}
    assert sorted(runs) == [10000, 20000]
    for rows, run in runs.items():
        assert sum(run["counts"].values()) == rows and run["counts"].get("failed:refused", 0) > 0
        assert run["driver_peak_rss_mb"] >= run["rss_after_imports_mb"] > 0 and run["rows_per_s"] > 0
    small, big = runs[10000], runs[20000]
    assert result["driver_rss_ratio"] == round(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3)
    assert result["rows_per_s_ratio"] == round(big["rows_per_s"] / small["rows_per_s"], 3)
