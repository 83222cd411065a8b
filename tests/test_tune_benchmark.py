"""Smoke test of benchmarks/tune_overhead.py: a seconds-long study writes its report; probes ran once."""

from __future__ import annotations

from benchmarks import tune_overhead


def test_tune_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "tune.md"
    res = tune_overhead.main(["--smoke", "--out", str(out)])
    assert res["probe_runs"] == 1 and res["resumed_probe_runs"] == 0 and res["resumed_trials"] == 4
    assert len(res["rows"]) == 3 and all(r["finetune_s"] > 0 and r["overhead_s"] >= 0 for r in res["rows"])
    text = out.read_text()
    assert "probe runs: **1**" in text and "nproc" in text and "--smoke" in text
