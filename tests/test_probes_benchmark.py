"""Smoke test of benchmarks/probe_overhead.py: a seconds-long in-process run writes its markdown table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_overhead.py"


def test_probe_overhead_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("probe_overhead", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "probes.md"
    result = bench.main(["--smoke", "--out", str(out)])
    (title, rows), = result["sections"]
    row = rows[0]
    assert row["plain"]["wall_s"] > 0 and row["probes"]["wall_s"] > 0
    assert row["wall_ratio"] > 0 and row["peak_ratio"] > 0
    text = out.read_text()
    assert "| qwen3_5-smoke |" in text and "nproc" in text and "--smoke" in text
