"""The placement benchmark end to end on its smoke grid (one seed, a few steps, r4, qwen3_5_tiny), and its stats."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import stats


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared CPU, two threads spin on every tiny op and run far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_t_interval_and_paired_verdicts():
    iv = stats.t_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert math.isclose(iv.half_width, 4.302652729911275 * 1.0 / math.sqrt(3), rel_tol=1e-9)
    ours, theirs = {0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.05, 2: 1.98}
    diff = stats.paired(ours, theirs)
    assert diff.hi < 0 and stats.verdict(diff, "a", "b") == "a better than b"
    assert "indistinguishable" in stats.verdict(stats.paired(ours, ours), "a", "b")
    assert "too few" in stats.verdict(stats.paired({0: 1.0}, {0: 2.0}), "a", "b")
    # below uniform's frontier at equal target loss is a negative gap
    assert stats.frontier_gap([(1.0, 3.0), (2.0, 2.0)], 1.5, 2.0) == pytest.approx(-0.5)
    assert stats.frontier_gap([(1.0, 3.0), (2.0, 2.0)], 2.5, 2.0) is None


def test_smoke_grid_matches_budgets_and_writes_results(tmp_path):
    from allocator.errors import AllocatorError
    from allocator.reference import reference_model_path
    from benchmarks import placement

    try:
        reference_model_path("qwen3_5_tiny")
    except AllocatorError:
        pytest.skip("reference model qwen3_5_tiny not built (python -m benchmarks.zoo --only qwen3_5_tiny)")
    (grid,) = placement.GRIDS["smoke"]
    rows = placement.run_grid(grid, tmp_path, resume=False, cache_dir=tmp_path / "cache")
    assert len(rows) == len(placement.planned_runs(grid))
    assert (tmp_path / placement.CSV_NAME).is_file()
    budget = {int(r["budget_params"]) for r in rows if not r["frontier"]}
    assert len(budget) == 1
    (b,) = budget
    for r in rows:
        assert math.isfinite(float(r["target_loss"])) and math.isfinite(float(r["retention_loss"]))
        if r["condition"] not in ("full", "adalora") and not r["frontier"]:
            assert abs(int(r["trainable_params"]) - b) <= 0.01 * b, r["condition"]
    assert {r["condition"] for r in rows} >= set(placement.CONDITIONS)
    summary = stats.summarize(rows, ["target_loss", "retention_loss"])
    assert {s["condition"] for s in summary} >= set(placement.CONDITIONS)
    assert stats.compare(rows, "target_loss", "allocator", ["uniform", "random"])

    from benchmarks.placement_report import write_report

    md = write_report(rows, tmp_path, grid=grid, grid_name="smoke", command="test", wall_s=1.0, threads=1)
    text = md.read_text()
    assert "| uniform |" in text and "nproc" in text
    assert (tmp_path / "placement.png").stat().st_size > 0
    again = placement.run_grid(grid, tmp_path, resume=True, cache_dir=tmp_path / "cache")  # nothing left to run
    assert len(again) == len(rows)
    # another setup (other weights, data or fine-tune settings) must not be mixed into this CSV
    from benchmarks.placement import check_setup

    check_setup(tmp_path / placement.CSV_NAME, "qwen3_5_tiny", rows[0]["setup_id"])
    with pytest.raises(SystemExit, match="other weights, data or fine-tune settings"):
        check_setup(tmp_path / placement.CSV_NAME, "qwen3_5_tiny", "0" * 12)


def test_grid_filters_keep_each_part_and_name_unknown_values():
    from benchmarks.placement import GRIDS, subset

    parts = subset(GRIDS["full"], models="qwen3_5_deep")
    assert [p.models for p in parts] == [("qwen3_5_deep",)]  # the parts without it are dropped
    parts = subset(GRIDS["full"], budgets="2", conditions="uniform,eva", frontier=False)
    assert all(p.budgets == (2,) and set(p.conditions) <= {"uniform", "eva"} and not p.frontier for p in parts)
    for kwargs, message in (({"models": "llama"}, "--models: llama"), ({"budgets": "0"}, "--budgets"),
                            ({"conditions": "uniform,best"}, "--conditions: best")):
        with pytest.raises(ValueError, match=message):
            subset(GRIDS["full"], **kwargs)
