"""Smoke test of benchmarks/tune_overhead.py: a seconds-long study writes its report; probes ran once; the
totals and ratios it reports are the ones its per-trial rows add up to, and the report prints those rows."""

from __future__ import annotations

import re
import statistics

import pytest

from benchmarks import tune_overhead


def test_tune_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "tune.md"
    res = tune_overhead.main(["--smoke", "--out", str(out)])
    assert res["probe_runs"] == 1 and res["resumed_probe_runs"] == 0 and res["resumed_trials"] == 4
    rows = res["rows"]
    assert [r["trial"] for r in rows] == [0, 1, 2]  # the first study's trials, in order
    assert rows[0]["claim_s"] is None and all(r["claim_s"] >= 0 for r in rows[1:])  # one worker: back to back
    for r in rows:  # a trial's duration holds its set-up (suggest, solve, plan) and its fine-tune
        assert 0 < r["setup_s"] <= r["overhead_s"] + 1e-3, r
    # the totals and ratios are those of the rows
    assert res["finetune_s"] == pytest.approx(sum(r["finetune_s"] for r in rows))
    assert res["overhead_s"] == pytest.approx(sum(r["overhead_s"] + (r["claim_s"] or 0.0) for r in rows))
    assert res["overhead_ratio"] == pytest.approx(res["overhead_s"] / res["finetune_s"])
    assert res["median_trial_ratio"] == pytest.approx(
        statistics.median(r["overhead_s"] / r["finetune_s"] for r in rows))
    # the whole study (probes and model load included) spans its trials and the gaps between them
    assert res["study_s"] >= res["finetune_s"] + res["overhead_s"] - 1e-3
    text = out.read_text()
    assert "probe runs: **1**" in text and "nproc" in text and "--smoke" in text
    assert f"= **{100 * res['overhead_ratio']:.2f}%**" in text
    table = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == len(rows)
    for line, r in zip(table, rows, strict=True):  # the report prints the rows measured
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [str(r["trial"]), f"{r['finetune_s']:.2f}", f"{r['setup_s']:.3f}",
                             f"{r['overhead_s']:.3f}"]
