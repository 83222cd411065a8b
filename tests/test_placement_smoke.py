"""The placement benchmark end to end on its smoke grid (one seed, a few steps, r4, qwen3_5_tiny), its grid
filters and its stats."""

from __future__ import annotations

import math

import pytest

from allocator.errors import AllocatorError
from allocator.reference import reference_model_path
from benchmarks import placement, stats
from benchmarks.grid import (
    CONDITIONS,
    CSV_NAME,
    GRADIENT,
    GRIDS,
    INSTR_CONDITIONS,
    INSTR_LRS,
    LRS,
    check_setup,
    planned_runs,
    subset,
)
from benchmarks.placement_report import write_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    try:
        reference_model_path("qwen3_5_tiny")
    except AllocatorError:
        pytest.skip("reference model qwen3_5_tiny not built (python -m benchmarks.zoo --only qwen3_5_tiny)")
    grid = GRIDS["smoke"][0]
    rows = placement.run_grid(grid, tmp_path, resume=False, cache_dir=tmp_path / "cache")
    assert len(rows) == len(planned_runs(grid))
    assert (tmp_path / CSV_NAME).is_file()
    budget = {int(r["budget_params"]) for r in rows if not r["frontier"]}
    assert len(budget) == 1
    (b,) = budget
    for r in rows:
        assert math.isfinite(float(r["target_loss"])) and math.isfinite(float(r["retention_loss"]))
        if r["condition"] not in ("full", "adalora") and not r["frontier"]:
            assert abs(int(r["trainable_params"]) - b) <= 0.01 * b, r["condition"]
    assert {r["condition"] for r in rows} >= set(CONDITIONS)
    assert {r["task"] for r in rows} == {"text_domain", "fact_recall"}
    for r in rows:  # the fact task is scored by accuracy against chance (1 of 90 values); text by loss alone
        if r["task"] == "fact_recall":
            assert 0.0 <= float(r["target_accuracy"]) <= 1.0
            assert float(r["target_chance"]) == pytest.approx(1 / 90)
        else:
            assert r["target_accuracy"] == "" and r["target_chance"] == ""
    tuned = [r for r in rows if r["condition"] == "alloc_tuned"]  # `allocate tune`'s pilots chose these plans
    assert len(tuned) == 2 and all(f"; {grid.tune_trials} pilots of " in r["note"] for r in tuned)
    tuned_eva = [r for r in rows if r["condition"] == "alloc_tuned_eva_init"]  # `allocate tune --init eva`
    assert len(tuned_eva) == 2
    assert all("pilots of" in r["note"] and "EVA init" in r["note"] for r in tuned_eva)
    for task in ("text_domain", "fact_recall"):  # GoRA, PEFT LoRA-GA / PiSSA (+ one at its own lr) at B
        new = {r["condition"]: r for r in rows if r["task"] == task}
        assert {*GRADIENT, "pissa@lr", "gora_keep_output"} <= set(new)
        for c in (*GRADIENT, "pissa@lr", "gora_keep_output"):
            assert abs(int(new[c]["trainable_params"]) - b) <= 0.01 * b, c
        assert float(new["pissa@lr"]["lr"]) == 2e-3 != float(new["pissa"]["lr"])  # its own lr (own_lrs)
        start = float(new["uniform"]["initial_target_loss"])
        for c in ("loraga", "pissa", "gora_keep_output"):  # base weights offset: the output unchanged at init
            assert float(new[c]["initial_target_loss"]) == pytest.approx(start, abs=2e-5), c
        assert float(new["gora"]["initial_target_loss"]) < start - 1e-4  # GoRA starts one gradient step on
        assert len({new[c]["plan_hash"] for c in ("uniform", "gora", "loraga", "pissa")}) == 4  # never reused
    summary = stats.summarize(rows, ["target_loss", "retention_loss"])
    assert {s["condition"] for s in summary} >= set(CONDITIONS)
    assert stats.compare(rows, "target_loss", "allocator", ["uniform", "random"])

    md = write_report(rows, tmp_path, grid=grid, grid_name="smoke", command="test", wall_s=1.0, threads=1)
    text = md.read_text()
    assert "| uniform |" in text and "nproc" in text
    assert "Answer accuracy" in text and "## qwen3_5_tiny / fact_recall / r4" in text
    assert (tmp_path / "placement.png").stat().st_size > 0
    again = placement.run_grid(grid, tmp_path, resume=True, cache_dir=tmp_path / "cache")  # nothing to run
    assert len(again) == len(rows)
    # another setup (other weights, data or fine-tune settings) must not be mixed into this CSV
    ids = {(r["model"], r["task"]): r["setup_id"] for r in rows}
    assert len(ids) == 2 and len(set(ids.values())) == 2  # one fingerprint per task, shared by its rows
    assert all(r["setup_id"] == ids[(r["model"], r["task"])] for r in rows)
    for (model, task), setup_id in ids.items():
        check_setup(tmp_path / CSV_NAME, model, task, setup_id)
    with pytest.raises(SystemExit, match="other weights, data or fine-tune settings"):
        check_setup(tmp_path / CSV_NAME, "qwen3_5_tiny", "text_domain", "0" * 12)


def test_smoke_grid_runs_the_instruction_task(tmp_path):
    """Chat rows with the loss on the assistant turn: every placement at the budget, scored by answer loss and
    exact match (overall in ``target_accuracy``, per kind in the note); no chance level."""
    try:
        reference_model_path("qwen3_5_tiny")
    except AllocatorError:
        pytest.skip("reference model qwen3_5_tiny not built (python -m benchmarks.zoo --only qwen3_5_tiny)")
    (grid,) = [p for p in GRIDS["smoke"] if p.tasks == ("instruction",)]
    rows = placement.run_grid(grid, tmp_path, resume=False, cache_dir=tmp_path / "cache")
    assert sorted(r["condition"] for r in rows) == sorted(INSTR_CONDITIONS)
    (b,) = {int(r["budget_params"]) for r in rows}
    for r in rows:
        assert r["task"] == "instruction" and abs(int(r["trainable_params"]) - b) <= 0.01 * b
        assert float(r["target_loss"]) < float(r["initial_target_loss"])  # the answers' loss falls
        assert 0.0 <= float(r["target_accuracy"]) <= 1.0 and r["target_chance"] == ""
        assert "exact match lookup " in r["note"] and " mul " in r["note"]
    shares = {r["condition"]: float(r["share_recurrent"]) for r in rows}
    assert shares["recurrent_only"] == 1.0 and shares["attention_only"] == 0.0
    text = write_report(rows, tmp_path, grid=grid, grid_name="smoke", command="test", wall_s=1.0,
                        threads=1).read_text()
    assert "## qwen3_5_tiny / instruction / r4" in text and "Answer accuracy" in text


def test_grid_filters_keep_each_part_and_name_unknown_values():
    parts = subset(GRIDS["full"], models="qwen3_5_deep")
    assert {p.models for p in parts} == {("qwen3_5_deep",)}
    assert len(parts) < len(GRIDS["full"])  # the parts without that model are dropped
    parts = subset(GRIDS["full"], budgets="2", conditions="uniform,eva", frontier=False)
    assert all(p.budgets == (2,) and set(p.conditions) <= {"uniform", "eva"} and not p.frontier
               for p in parts)
    for kwargs, message in (({"models": "llama"}, "--models: llama"), ({"budgets": "0"}, "--budgets"),
                            ({"conditions": "uniform,best"}, "--conditions: best")):
        with pytest.raises(ValueError, match=message):
            subset(GRIDS["full"], **kwargs)


def test_each_budget_runs_at_its_own_lr():
    core = GRIDS["core"][0]
    assert [core.lr_for(m, b) for m, b, _ in LRS] == [lr for _, _, lr in LRS]
    assert core.lr_for("qwen3_5_tiny", 4, "full") == core.full_lr != core.lr_for("qwen3_5_tiny", 4)
    assert core.lr_for("qwen3_5_tiny", 2) == core.lr  # a budget outside the sweep falls back to the grid's lr
    smoke = GRIDS["smoke"][0]
    assert smoke.lr_for("qwen3_5_tiny", 4) == smoke.lr
    (instruction,) = subset(GRIDS["full"], tasks="instruction")  # its own part, at its own lrs
    assert instruction.lr_for("falcon_h1_tiny", 4) == dict(
        ((m, b), lr) for m, b, lr in INSTR_LRS)[("falcon_h1_tiny", 4)]


def test_the_moe_model_runs_in_a_part_of_its_own_at_its_own_lr():
    """The routed-MoE model's lr lives in its own part: an entry in the core grid's ``lrs`` would change the
    setup id of every core row and refuse ``--resume``."""
    from benchmarks.grid import MOE_LRS, MOE_PART

    (part,) = subset(GRIDS["full"], models="granite_moe_tiny")
    assert part == MOE_PART and part.lr_for("granite_moe_tiny", 4) == MOE_LRS[0][2] != part.lr
    assert "mlp_only" in part.conditions and len(part.seeds) >= 5
    assert all("granite_moe_tiny" not in m for p in GRIDS["full"] for m, _, _ in p.lrs if p != MOE_PART)
