"""`allocator.tune` in one process, on tiny random-init models built from configs (hidden 32, 2 layers)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import allocator
from allocator.discovery.components import find_components
from allocator.errors import InputError
from allocator.output.plan import Plan
from allocator.solver.budget import Budget, params_per_uniform_rank
from allocator.tuning import Space, TuneSettings, parse_space
from allocator.tuning.objective import Pruned, _reporter
from probes.folders import MANIFEST
from probes.settings import DataSettings

SOURCES = Path(__file__).resolve().parents[1] / "probes"
FAST = dict(steps=3, eval_every=0, batch_size=2, train_samples=8, eval_samples=4, max_rank="16,32")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("text")
    (folder / "train.txt").write_text((SOURCES / "data.py").read_text() * 2)
    (folder / "eval.txt").write_text((SOURCES / "runner.py").read_text())
    return str(folder / "train.txt"), str(folder / "eval.txt")


@pytest.fixture(scope="module")
def tiny():
    from probes.testing import byte_tokenizer, tiny_model

    return tiny_model("qwen3_5", hidden=32, layers=2), byte_tokenizer()


def _tune(tiny, texts, out, settings, **kw):
    import probes

    model, tokenizer = tiny
    return allocator.tune(
        model, texts[0], texts[1], settings=settings, out_dir=out, tokenizer=tokenizer,
        data_settings=DataSettings(seq_len=32, samples=4, batch_size=2),
        probe_settings=probes.ProbeSettings(max_rank=8, progress=False), **kw)


def test_spaces_parse_ranges_lists_fixed_values_and_bases():
    assert parse_space("lr", "1e-3..1e-2@3e-3") == Space("range", (1e-3, 1e-2), 3e-3, log=True)
    assert parse_space("granularity", "module,type") == Space("choices", ("module", "type"))
    assert parse_space("max_rank", "32") == Space("fixed", (32,), log=True)
    assert parse_space("uniform_prior", "").kind == "inherit"
    assert parse_space("budget", "r2..r16").values == (Budget.parse("r2"), Budget.parse("r16"))
    assert parse_space("uniform_prior", "0..1").base_value(0.5) == 0.5  # the base settings' value when inside
    assert math.isclose(parse_space("lr", "1e-3..1e-2").base_value(None), 1e-3 ** 0.5 * 1e-2 ** 0.5)
    assert parse_space("max_rank", "8,16").base_value(64) == 16  # nearest choice to the base grid's top


@pytest.mark.parametrize("kwargs, fix", [
    ({"budget": "r2..r16"}, "mode=pareto"),
    ({"lr": "1e-2..1e-3"}, "lo < hi"),
    ({"lr": "0..1e-2"}, "outside"),
    ({"granularity": "layer"}, "not one of"),
    ({"max_rank": "16..32", "granularity": "module..type"}, "a list"),
    ({"trials": 5}, "raise trials"),
    ({"baselines": ("uniform", "moe")}, "distinct names"),
    ({"grace_period": 10, "heartbeat_interval": 30}, "raise it"),
    ({"lr": ""}, "give a value"),
    ({"mode": "multi"}, "choose mode"),
])
def test_settings_reject_bad_input_naming_the_fix(kwargs, fix):
    with pytest.raises(InputError, match=fix):
        TuneSettings(**kwargs)


def test_settings_round_trip_through_dict_and_reject_unknown_keys():
    settings = TuneSettings(mode="pareto", lr="2e-3", baselines=("uniform",))
    assert TuneSettings.from_dict(settings.to_dict()) == settings and settings.budget == "r2..r12"
    with pytest.raises(InputError, match="unknown TuneSettings fields"):
        TuneSettings.from_dict({"trails": 3})


def test_pruning_callback_reports_every_eval_and_spares_baselines():
    reports = []
    attrs = {}
    trial = SimpleNamespace(report=lambda v, s: reports.append((s, v)), should_prune=lambda: True,
                            set_user_attr=attrs.__setitem__)
    _reporter(trial, prunable=False)(5, 1.25)
    assert reports == [(5, 1.25)] and attrs == {}
    with pytest.raises(Pruned, match="step 10"):
        _reporter(trial, prunable=True)(10, 2.0)
    assert attrs == {"steps": 10}  # the pilot's cost: the steps it ran before the pruner stopped it


def test_single_study_runs_baselines_first_probes_once_and_resumes(tiny, texts, tmp_path, monkeypatch):
    import probes.cache

    calls = []
    for name in ("run", "run_warm"):  # the probes, with or without their warm-up
        real = getattr(probes.cache, name)
        monkeypatch.setattr(probes.cache, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    out = tmp_path / "study"
    result = _tune(tiny, texts, out, TuneSettings(trials=6, **FAST))
    rows = result.trials
    assert [r.baseline for r in rows[:5]] == ["default", "uniform", "attention", "recurrent", "mlp"]
    assert sum(r.state in ("complete", "pruned") for r in rows) == 6 and calls == [1]
    # each baseline: uniform rank floor(B / per-rank cost) on its modules, at the default lr and alpha
    components = find_components(tiny[0])
    budget = Budget.parse("r8").resolve(components)
    for r in rows[1:5]:
        members = [
            c for c in components if c.eligible and (r.baseline == "uniform" or c.family == r.baseline)
        ]
        per_rank = sum(c.n_params_per_rank for c in members)
        assert r.cost == budget // per_rank * per_rank and r.params == {"alpha_ratio": 2.0, "lr": 3e-3}
    assert rows[1].cost == budget // params_per_uniform_rank(components) * params_per_uniform_rank(components)
    assert result.versus.keys() == {"default", "uniform", "attention", "recurrent", "mlp"}
    complete = [r for r in rows if r.state == "complete"]
    for name, delta in result.versus.items():  # winner minus baseline, as the trials say
        assert delta == min(r.value for r in complete) - result.baselines[name].value
    assert result.best.value == min(r.value for r in complete)
    best = Plan.load(out / "best")
    assert best.cost == result.best.cost <= best.budget == budget
    assert (out / "best" / "adapter_config.json").is_file() and (out / "study.db").is_file()
    text = (out / "study.md").read_text()
    assert (
        "Against the baselines" in text and "importances need" in text and (out / "study.png").stat().st_size
    )
    assert json.loads((out / "study.json").read_text())["best"]["number"] == result.best.number

    again = _tune(tiny, texts, out, TuneSettings(trials=7, **FAST))  # resume: one more trial, no re-enqueue
    assert len(again.trials) == 7 and calls == [1]
    assert sorted(r.baseline for r in again.trials if r.baseline) == sorted(
        ["default", "uniform", "attention", "recurrent", "mlp"]
    )


def _synthetic(plan: Plan, trial) -> float:
    """A cheap objective: more parameters help, with diminishing returns, plus a term the lr moves."""
    return 1.0 / math.log(2.0 + plan.cost) + 0.01 * abs(math.log10(trial.params.get("lr", 3e-3) / 3e-3))


def test_pareto_mode_with_user_objective_returns_front_plans_and_importances(tiny, texts, tmp_path):
    out = tmp_path / "pareto"
    settings = TuneSettings(
        trials=11, mode="pareto", budget="r1..r6", baselines=("uniform",), max_rank="16,32"
    )
    result = _tune(tiny, texts, out, settings, objective=_synthetic)
    front = result.pareto
    assert front and [r.cost for r in front] == sorted(r.cost for r in front)
    done = [r for r in result.trials if r.state == "complete"]
    for p in front:  # nothing dominates a point of the front
        assert not any(
            r.cost <= p.cost and r.value < p.value or r.cost < p.cost and r.value <= p.value for r in done
        )
    assert {p.name for p in (out / "pareto").iterdir()} == {f"trial-{r.number:04d}" for r in front} | {
        MANIFEST
    }
    assert all(Plan.load(out / "pareto" / f"trial-{r.number:04d}").cost == r.cost for r in front)
    uniform = result.baselines["uniform"]  # compared with the best trial within the uniform baseline's budget
    assert result.versus["uniform"] == min(r.value for r in done if r.cost <= uniform.budget) - uniform.value
    assert (out / "study.png").is_file()
    # the last of the 11 slots scores uniform at the winner's budget, lr and alpha (the split of its gain)
    last = result.trials[-1]
    assert last.baseline == "uniform@winner" and last.budget == result.best.budget
    assert {k: last.params[k] for k in ("lr", "alpha_ratio")} == {
        k: result.best.params[k] for k in ("lr", "alpha_ratio")
    }
    assert result.attribution["placement"] == result.best.value - last.value
    # PED-ANOVA without sklearn, over the 9 searched trials
    assert result.importances and "over 9 searched trials" in result.importance_note


def test_out_dir_of_another_study_is_refused_and_overwrite_starts_over(tiny, texts, tmp_path):
    out = tmp_path / "study"
    settings = TuneSettings(trials=2, baselines=(), max_rank="16,32")
    _tune(tiny, texts, out, settings, objective=_synthetic, study_name="a")
    with pytest.raises(InputError, match="--overwrite"):
        _tune(tiny, texts, out, settings, objective=_synthetic, study_name="b")
    with pytest.raises(InputError, match="started with other settings"):
        _tune(
            tiny,
            texts,
            out,
            TuneSettings(trials=2, baselines=(), max_rank="32"),
            objective=_synthetic,
            study_name="a",
        )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="holds no tune study"):
        _tune(tiny, texts, foreign, settings, objective=_synthetic)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]  # refused before anything was written
    fresh = _tune(tiny, texts, out, settings, objective=_synthetic, study_name="b", overwrite=True)
    assert len(fresh.trials) == 2 and not (out / "pareto").exists()


def test_study_takes_token_batches_for_data_and_eval_data(tiny, texts, tmp_path):
    """Data the caller has tokenised already: probes, fine-tunes and the study's record all take it as is."""
    import probes

    model, tokenizer = tiny
    train = probes.load_batches(texts[0], tokenizer, seq_len=32, samples=8, batch_size=2)
    evals = probes.load_batches(texts[1], tokenizer, seq_len=32, samples=4, batch_size=2)
    result = allocator.tune(
        model,
        train,
        evals,
        settings=TuneSettings(trials=6, **FAST),
        out_dir=tmp_path / "s",
        tokenizer=tokenizer,
        data_settings=DataSettings(seq_len=32, samples=4, batch_size=2),
        probe_settings=probes.ProbeSettings(max_rank=8, progress=False),
    )
    assert sum(r.state == "complete" for r in result.trials) == 6
    assert all(math.isfinite(r.value) for r in result.trials)
    assert result.best_plan.provenance["data"].startswith("<8 tokenised sequences in 4 batches, sha256 ")
    # the first 4 rows probed
    assert result.best_plan.provenance["data_hash"] == probes.data_fingerprint(train[:2])


def test_eva_init_study_starts_every_trial_from_eva_and_records_it_in_the_plans(tiny, texts, tmp_path):
    """``init="eva"``: each trial's fine-tune is the one ``Plan.apply(model, init_data=calibration)`` would
    start."""
    import probes
    from allocator.output.lora_init import eva_components, init_lora_a
    from allocator.tuning.finetune import FinetuneSettings, finetune

    model, tokenizer = tiny
    settings = TuneSettings(trials=2, baselines=("uniform",), **FAST)
    out = tmp_path / "eva"
    result = _tune(tiny, texts, out, settings, init="eva")
    plain = _tune(tiny, texts, tmp_path / "plain", settings)
    assert [r.state for r in result.trials] == ["complete", "complete"]
    assert result.best_plan.init == "eva" and Plan.load(out / "best").init == "eva"
    assert "lora_A init of every trial: EVA's" in (out / "study.md").read_text()
    assert "lora_A init" not in (tmp_path / "plain" / "study.md").read_text()

    # the uniform baseline (trial 0) again, outside the study: EVA's components on the calibration rows in
    # lora_A
    uniform = result.trials[0]
    components = find_components(model)
    budget = Budget.parse("r8").resolve(components)
    rank = budget // params_per_uniform_rank(components)
    plan = Plan(
        model_id="tiny",
        components=components,
        budget=budget,
        solver={},
        init="eva",
        ranks={c.name: rank for c in components if c.eligible},
    )
    calibration = probes.load_batches(texts[0], tokenizer, seq_len=32, samples=4, batch_size=2)
    directions = eva_components(model, sorted(plan.targets), calibration, rank)
    train = probes.load_batches(texts[0], tokenizer, seq_len=32, samples=8, batch_size=2)
    evals = probes.load_batches(texts[1], tokenizer, seq_len=32, samples=4, batch_size=2)
    again = finetune(
        model,
        plan.to_lora_config(base_model_name_or_path=None),
        train,
        evals,
        FinetuneSettings(steps=3, lr=uniform.params["lr"], seed=0, batch_size=2),
        init=lambda m: init_lora_a(m, directions, plan.targets),
    )
    assert again.eval_loss == pytest.approx(uniform.value, abs=1e-6)
    assert abs(plain.trials[0].value - uniform.value) > 1e-4  # PEFT's init trains to another loss

    with pytest.raises(InputError, match="started with other init"):
        _tune(tiny, texts, out, TuneSettings(trials=3, baselines=("uniform",), **FAST))
    # EVA data with too few labelled tokens per batch for the uniform baseline's rank: refused before any
    # trial
    sparse = [{**b, "labels": torch.where(torch.arange(32) < 30, -100, b["input_ids"])} for b in calibration]
    with pytest.raises(InputError, match=f"at least {rank} tokens that carry a label; the largest has 4"):
        _tune(tiny, texts, tmp_path / "sparse", settings, init="eva", init_data=sparse)
    assert not (tmp_path / "sparse" / "study.db").exists()
    with pytest.raises(InputError, match="pass init='eva'"):
        _tune(tiny, texts, tmp_path / "other", settings, init_data=texts[0])
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_gradient_init_study_starts_every_trial_from_the_gradient_directions(tiny, texts, tmp_path):
    """``init="gradient"``: each trial's fine-tune is the one ``Plan.apply(model, init_data=calibration)``
    would start, and the plans record the init."""
    import probes
    from allocator.output.lora_init import gradient_components, init_lora_a
    from allocator.tuning.finetune import FinetuneSettings, finetune

    model, tokenizer = tiny
    out = tmp_path / "gradient"
    result = _tune(tiny, texts, out, TuneSettings(trials=2, baselines=("uniform",), **FAST),
                   init="gradient")
    assert result.best_plan.init == "gradient" and Plan.load(out / "best").init == "gradient"
    assert "lora_A init of every trial: the gradient's" in (out / "study.md").read_text()
    components = find_components(model)
    budget = Budget.parse("r8").resolve(components)
    rank = budget // params_per_uniform_rank(components)
    ranks = {c.name: rank for c in components if c.eligible}
    calibration = probes.load_batches(texts[0], tokenizer, seq_len=32, samples=4, batch_size=2)
    directions = gradient_components(model, sorted(ranks), calibration, rank)
    plan = Plan(model_id="tiny", components=components, budget=budget, init="gradient", ranks=ranks)
    again = finetune(
        model,
        plan.to_lora_config(base_model_name_or_path=None),
        probes.load_batches(texts[0], tokenizer, seq_len=32, samples=8, batch_size=2),
        probes.load_batches(texts[1], tokenizer, seq_len=32, samples=4, batch_size=2),
        FinetuneSettings(steps=3, lr=result.trials[0].params["lr"], seed=0, batch_size=2),
        init=lambda m: init_lora_a(m, directions, plan.targets),
    )
    assert again.eval_loss == pytest.approx(result.trials[0].value, abs=1e-6)


def test_step_budget_caps_the_pilots_steps_and_keeps_the_protected_baselines_whole(tiny, texts, tmp_path):
    """8 pilots of 4 steps would train 32 steps; a budget of 18 stops searched pilots at their last eval step
    within it (the default and uniform pilots, owed first, run whole), then prunes the rest before they
    start."""
    fast = {**FAST, "steps": 4, "eval_every": 1}
    settings = TuneSettings(trials=8, pruner="none", lr="3e-3", alpha_ratio="2", step_budget=18,
                            baselines=("default", "uniform"), **fast)  # no training setting searched: no
    # uniform@winner pilot to reserve steps for
    rows = _tune(tiny, texts, tmp_path / "capped", settings).trials
    steps = [r.steps or 0 for r in rows]
    assert sum(steps) == 18 and len(rows) == 8
    assert [r.steps for r in rows if r.baseline in ("default", "uniform")] == [4, 4]
    assert steps.count(0) >= 1 and any(0 < s < 4 for s in steps)  # one stopped early, later ones never ran
    assert all(r.state == "pruned" for r in rows if (r.steps or 0) < 4)
