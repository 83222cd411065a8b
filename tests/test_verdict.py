"""The output explains itself (issue 18), on the built-in reference model: the verdict of a uniform and of
a moved plan, the marginal value per family, a budget below uniform r1, ``-q``, ``repr(plan)``,
``dir(allocator)`` and the heatmap's title."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import allocator
from allocator.commands.allocate import format_summary
from allocator.commands.cli import main
from allocator.output.evidence import marginal_values, moved_share
from allocator.output.plan import Plan
from allocator.output.report import heatmap_figure
from allocator.scoring.utility import UtilitySettings, UtilityTable
from probes.settings import DataSettings, ProbeSettings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops on a shared CPU
FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "-q"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(budget, **utility settings) -> (terminal summary, plan folder)``: the built-in model through the
    API (flag names belong to the CLI's owners), saved and summarised as `allocate` does; probes cached in
    ``run.cache``."""
    root = tmp_path_factory.mktemp("verdict")
    done: dict[str, tuple[str, Path]] = {}

    def call(budget: str = "r8", default: bool = False, data: str = "builtin", **utility) -> tuple[str, Path]:
        """``default``: allocate's default settings (warm-up, capacity signal); else the step-0 probes and the
        combined signal at half the uniform prior, whose plan on this model and data is uniform's."""
        key = repr((budget, default, data, sorted(utility.items())))
        if key not in done:
            base = {} if default else {"signal": "combined", "uniform_prior": 0.5}
            plan = allocator.allocate(
                None,
                data,
                budget,
                data_settings=DataSettings(samples=4, seq_len=32, batch_size=2),
                probe_settings=ProbeSettings(progress=False, warmup_steps=20 if default else 0),
                utility_settings=UtilitySettings(**{**base, **utility}),
                cache_dir=root / "cache",
            )
            out = plan.save(root / f"plan{len(done)}")
            done[key] = (format_summary(plan, out, 0.0), out)
        return done[key]

    call.cache = root / "cache"
    return call


def _verdict(printed: str) -> str:
    """The terminal's verdict block (up to its first blank line), its wrapped lines joined."""
    return " ".join(line.strip() for line in printed.split("\n\n")[0].splitlines())


def _family_column(printed: str) -> dict[str, str]:
    """The last column ("next rank buys") of the terminal's family table."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("family "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line or line.startswith("("):
            break
        rows[line.split()[0]] = line.split()[-1]
    return rows


def test_uniform_plan_says_so_first_in_terminal_and_report(run):
    printed, out = run()
    headline = (
        "identical to uniform's plan (rank 8 on all 31 targets): the probes saw no reason to move budget"
    )
    assert printed.splitlines()[0] == "verdict " + headline
    assert "next: train with it (it is uniform LoRA at rank 8)" in printed
    assert "\ndata    builtin\n" in printed  # what the plan was measured on, under the model
    report = (out / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## By family")
    assert "- " + headline[0].upper() + headline[1:] in report
    data = json.loads((out / "allocation.json").read_text())
    assert data["schema"] == 2 and data["evidence"]["moved"] == 0.0
    assert all("marginal" in m for m in data["modules"] if "rank" in m)


def test_moved_plan_names_where_budget_went_what_moved_it_and_what_next(run):
    printed, out = run(family_priors={"recurrent": 2.0})
    plan = Plan.load(out)
    moved = moved_share(plan.ranks, plan.components)
    assert moved > 0.05  # the prior moves budget deterministically: no coin flip in this test
    lines = printed.splitlines()
    assert lines[0] == f"verdict differs from uniform r8: {moved:.1%} of the budget placed differently"
    # the family's gain in share of the budget, from the saved ranks themselves
    recurrent = [c for c in plan.components if c.name in plan.ranks and c.family == "recurrent"]
    share = sum(plan.module_cost(c.name) for c in recurrent) / plan.cost
    uniform_share = sum(c.n_params_per_rank for c in recurrent) / sum(
        c.n_params_per_rank for c in plan.components if c.name in plan.ranks
    )
    text = _verdict(printed)
    assert f"budget moved to recurrent +{share - uniform_share:.1%} (layers" in text
    assert "driven by your family priors (recurrent=2): without them 0.0% of the budget would move" in text
    assert "next: the move comes from your settings, not from the probes" in text
    assert "share of utility" not in (out / "report.md").read_text()


def test_move_by_the_probes_names_the_signals_and_calls_two_batches_weak_evidence(run):
    printed, out = run(uniform_prior=0.0)  # the signals alone: the data, not a setting of yours, moves budget
    plan = Plan.load(out)
    assert moved_share(plan.ranks, plan.components) > 0
    text = _verdict(printed)
    assert "driven by the probe signals, combined (gradient_spectrum 0.5, heldout_capture 0.5)" in text
    assert "with the uniform prior alone 0.0% of the budget would move" in text
    assert "each signal alone would move gradient_spectrum" in text
    assert "consistency across calibration halves (2 batches, split even/odd)" in text
    assert "next: the evidence is weak (" in text and "2 calibration batches" in text


def test_marginal_value_is_the_next_grid_step_per_parameter_and_shown_per_family(run):
    printed, out = run(family_priors={"recurrent": 2.0})
    plan = Plan.load(out)
    by_name = {c.name: c for c in plan.components}
    names = sorted(plan.ranks)[:2]
    table = UtilityTable(names=tuple(names), ranks=(0, 4, 8), values=np.array([[0, 2, 3], [0, 1, 1.5]]))
    got = marginal_values(table, {names[0]: 4, names[1]: 8}, [by_name[n] for n in names])
    assert got[names[0]] == pytest.approx(1 / (by_name[names[0]].n_params_per_rank * 4))
    assert got[names[1]] is None  # the top of the grid: no next rank
    assert "next rank buys" in printed and "next rank buys" in (out / "report.md").read_text()
    rows = _family_column(printed)
    recurrent = [n for n in plan.ranks if by_name[n].family == "recurrent" and plan.marginal[n] is not None]
    weights = [by_name[n].n_params_per_rank for n in recurrent]
    expected = np.average([plan.marginal[n] for n in recurrent], weights=weights) * 1e6
    assert float(rows["recurrent"]) == pytest.approx(expected, rel=5e-3)
    assert float(rows["recurrent"]) < float(rows["mlp"])  # the favoured family bought further down its curve


def test_budget_below_uniform_rank_one_says_so_and_compares_with_r1_over_families_that_fit(run):
    printed, out = run("0.5%")
    plan = Plan.load(out)
    eligible = [c for c in plan.components if c.name in plan.ranks]
    fit = sum(c.n_params_per_rank for c in eligible if c.family in ("attention", "recurrent"))
    r1 = sum(c.n_params_per_rank for c in eligible)
    text = _verdict(printed)
    assert (
        f"your budget ({plan.budget:,}) is below uniform r1 ({r1:,}): the plan adapts only part of the "
        "modules"
    ) in text
    assert f"(attention + recurrent, 19 modules) would cost {fit:,}" in text
    for written in (printed, (out / "report.md").read_text()):
        assert "rank 0 on all" not in written and "every cell rank 0" not in written


def test_repr_fits_one_screen_and_dir_lists_the_public_names(run):
    _, out = run()
    text = repr(Plan.load(out))
    lines = text.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 110
    assert "qwen3_5_tiny" in text and "budget=113,024" in text and "cost=113,024" in text
    assert all(f in text for f in ("attention", "mlp", "recurrent")) and "ranks 8–8" in text
    assert {"allocate", "tune", "Plan", "DataSettings", "ProbeSettings"} <= set(dir(allocator))


def test_heatmap_title_fits_the_figure(run):
    _, out = run()
    fig = heatmap_figure(Plan.load(out))
    fig.canvas.draw()
    title = fig._suptitle
    box = title.get_window_extent()
    assert "113,024 parameters" in title.get_text() and "identical to uniform r8" in title.get_text()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_quiet_silences_weight_loading_bars_and_kernel_fallback_notices(run, capfd, tmp_path):
    run()  # the probes cached, so that the run without -q below only loads the model
    main(["-o", str(tmp_path / "loud"), "--cache-dir", str(run.cache), *FAST[:-1]])
    # without -q the loading bar is there to silence
    assert "Loading weights" in capfd.readouterr().err
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread: see conftest
    quiet = subprocess.run(  # a fresh process: transformers says each fallback notice once per process
        [sys.executable, "-m", "allocator.commands.cli", "-o", str(tmp_path / "q"), *FAST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert quiet.returncode == 0, quiet.stderr
    for noise in ("Loading weights", "%|", "falling back", "[transformers]"):
        assert noise not in quiet.stdout + quiet.stderr
    assert quiet.stdout.startswith("verdict ")


def test_tune_splits_the_gain_into_placement_and_training_settings(tmp_path):
    """The base lr is far too low, so a searched lr wins with the uniform ranks the uniform prior gives: the
    whole gain over uniform is the lr's, and the last trial slot scores uniform at the winner's lr to show
    it."""
    from allocator.commands.tune import format_summary as tune_summary
    from allocator.tuning import TuneSettings
    from allocator.tuning.attribution import UNIFORM_AT_WINNER

    evals = tmp_path / "eval.txt"
    evals.write_text((ROOT / "docs" / "tuning.md").read_text()[:6000])
    settings = TuneSettings(
        trials=3,
        baselines=("uniform",),
        lr="1e-4..3e-2@1e-4",
        alpha_ratio="",
        weights="",
        uniform_prior="",
        family_priors="",
        granularity="",
        max_rank="",
        steps=3,
        eval_every=0,
        pruner="none",
        batch_size=2,
        train_samples=8,
        eval_samples=4,
    )

    def study():
        return allocator.tune(
            None,
            "builtin",
            str(evals),
            settings=settings,
            out_dir=tmp_path / "study",
            data_settings=DataSettings(samples=4, seq_len=32, batch_size=2),
            probe_settings=ProbeSettings(progress=False, warmup_steps=0),
            utility_settings=UtilitySettings(uniform_prior=1.0),  # flat evidence: uniform's ranks
        )

    result = study()
    best, a = result.best, result.attribution
    at = [r for r in result.trials if r.baseline == UNIFORM_AT_WINNER]
    assert best.placement == "solver" and set(result.best_plan.ranks.values()) == {8}
    assert len(at) == 1 and at[0].number == 2 and at[0].params["lr"] == best.params["lr"] != 1e-4
    assert a["identical_to_uniform"] and a["uniform_at_winner"] == 2
    assert a["placement"] == pytest.approx(0.0, abs=1e-4)  # the same adapters at the same lr
    assert a["total"] == pytest.approx(a["placement"] + a["settings"]) and a["total"] < 0
    summary = tune_summary(result, 0.0).splitlines()
    assert "placement identical to uniform" in summary[2]
    lr = f"{best.params['lr']:.2e}"
    assert summary[-1].startswith("use:  get_peft_model(model, LoraConfig.from_pretrained(")
    assert summary[-1].endswith(
        f"; train at lr {lr} for 3 steps of 2 x 32 tokens (lora_alpha = 2 x rank, in the config)"
    )
    text = (tmp_path / "study" / "study.md").read_text()
    assert text.index("## Verdict") < text.index("## Study") < text.index("## Winner")
    assert f"= placement {a['placement']:+.4f} + training settings {a['settings']:+.4f}" in text
    assert f"train at lr {lr} for 3 steps" in text

    again = study()  # resumed with the same settings: nothing to run, uniform@winner not enqueued twice
    assert len(again.trials) == 3 and again.attribution == a


def test_default_plan_reports_capacity_demand_and_moves_budget_toward_the_most_demanding_family(run):
    printed, out = run(default=True, data="builtin-facts")  # the demo's task: storing facts binds capacity
    plan = Plan.load(out)
    rows = plan.evidence["capacity"]["families"]
    text = _verdict(printed)
    assert plan.evidence["signal"] == "capacity" and plan.evidence["capacity"]["measure"] == "consensus"
    assert "capacity demand after the warm-up (gradient energy in directions 9..32, per parameter or" in text
    top = max(rows, key=lambda f: rows[f]["demand"])
    low = min(rows, key=lambda f: rows[f]["demand"])
    assert rows[top]["demand"] > 1 > rows[low]["demand"]
    # the solver follows the evidence: the most demanding family gains share, the least loses it
    assert rows[top]["plan_share"] > rows[top]["uniform_share"]
    assert rows[low]["plan_share"] < rows[low]["uniform_share"]
    assert ("the halves agree" in text) == all(r["agrees"] for r in rows.values())
