"""The probes' warm-up (probes.warmup) and the capacity signal that reads it (issue 14)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from peft import LoraConfig
from tiny_models import build

import probes
from allocator.api import warmup_for
from allocator.discovery.component import Component
from allocator.discovery.components import find_components
from allocator.scoring.signals import SIGNALS, prior_curves
from allocator.scoring.utility import UtilitySettings, compute_utilities
from probes.experts import ExpertProber
from probes.settings import DataSettings
from probes.testing import linear_names, random_batches, tiny_model
from probes.warmup import BASE_PREFIX, auto_lr, base_name, warmed_up

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(names, rank=2):
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names)


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        [type(m).__name__ for m in model.modules()],
    )


def test_warm_up_trains_then_leaves_the_model_exactly_as_it_came():
    model = tiny_model("qwen3_5", hidden=32, layers=2).train()
    names = linear_names(model)
    before = _state(model)
    batches = random_batches(4, batch=2, seq=16)
    with warmed_up(model, _config(names), batches, steps=12, lr=3e-2) as (peft_model, record):
        after_steps = float(torch.stack([peft_model(**b).loss for b in batches]).mean())
        lora_b = sum(float(p.abs().sum()) for n, p in peft_model.named_parameters() if "lora_B" in n)
    base_loss = float(torch.stack([model(**b).loss for b in batches]).mean())
    assert lora_b > 0 and after_steps < base_loss  # it trained on these batches
    assert len(record["losses"]) == 12 and record["lr"] == 3e-2
    state, flags, modes, types = _state(model)
    assert all(torch.equal(state[k], v) for k, v in before[0].items()) and state.keys() == before[0].keys()
    assert (flags, modes, types) == before[1:] and not hasattr(model, "peft_config")


def test_a_failed_warm_up_restores_the_model_too():
    model = tiny_model("qwen3_5", hidden=32, layers=2)
    before = _state(model)
    with pytest.raises(probes.ProbeError, match="lr > 0"):
        with warmed_up(model, _config(linear_names(model)), random_batches(2), steps=2, lr=0.0):
            pass
    with pytest.raises(ZeroDivisionError):
        with warmed_up(model, _config(linear_names(model)), random_batches(1), steps=1, lr=1e-3):
            raise ZeroDivisionError  # any failure inside the block
    assert [type(m).__name__ for m in model.modules()] == before[3]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before[0].items())


def test_warmed_up_report_differs_from_the_base_and_records_the_warm_up():
    model = tiny_model("qwen3_5", hidden=32, layers=2)
    names = linear_names(model)
    batches = random_batches(4, batch=2, seq=16)
    settings = probes.ProbeSettings(max_rank=4, progress=False, warmup_steps=8, warmup_lr=3e-2)
    base = probes.run(model, batches, names, settings)
    warm = probes.run_warm(model, batches, names, settings, _config(names), batches)
    assert set(warm.names) == set(names) and warm.meta["warmup"]["steps"] == 8
    assert warm.meta["warmup"]["rank"] == 2
    moved = [n for n in names if not np.allclose(warm[n].grad_singular_values, base[n].grad_singular_values)]
    assert len(moved) == len(names)  # the gradient is taken at the warmed-up point
    again = probes.run(model, batches, names, settings)
    assert all(np.array_equal(again[n].grad_singular_values, base[n].grad_singular_values) for n in names)


def test_warm_up_adapts_routed_experts_and_restores_an_moe_model_exactly(tiny_tokenizer):
    """qwen3_5_moe: allocate's warm-up covers the routed experts (target_parameters) at the uniform rank; the
    probes' expert-by-expert forward runs with PEFT's W + ΔW (the PEFT model's logits, which the experts'
    adapters change); afterwards the model is exactly as it came."""
    model = build("qwen3_5_moe").float().train()
    comps = [c for c in find_components(model) if c.eligible]
    experts = [c.name for c in comps if c.kind == "expert"]
    batches = random_batches(4, batch=2, seq=16, vocab=128, pad_last=5)
    warmup = warmup_for(batches, tiny_tokenizer, comps, 2, DataSettings(seq_len=16, samples=8),
                        probes.ProbeSettings(warmup_steps=6))
    config = warmup.lora_config
    assert sorted(config.target_parameters) == sorted(experts) and config.target_modules
    before = _state(model)
    with warmed_up(model, config, batches, steps=6, lr=3e-2) as (peft_model, _):
        lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n and ".experts." in n}
        assert len(lora_b) == len(experts) and all(float(p.abs().sum()) > 0 for p in lora_b.values())
        table = dict(peft_model.named_modules())
        inner = [base_name(table, f"{BASE_PREFIX}{n}") for n in experts]
        ids = batches[0]["input_ids"]
        prober = ExpertProber(peft_model, inner, torch.float32, probes.ProbeSettings(max_rank=4))
        with torch.no_grad():
            adapted = peft_model(input_ids=ids).logits
            prober.attach()
            try:
                probed = peft_model(input_ids=ids).logits
            finally:
                prober.detach()
            saved = {n: p.clone() for n, p in lora_b.items()}
            for p in lora_b.values():
                p.zero_()
            without_experts = peft_model(input_ids=ids).logits
            for n, p in lora_b.items():
                p.copy_(saved[n])
        torch.testing.assert_close(probed, adapted, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(without_experts, adapted, atol=1e-4)
    state, flags, modes, types = _state(model)
    assert all(torch.equal(state[k], v) for k, v in before[0].items()) and state.keys() == before[0].keys()
    assert (flags, modes, types) == before[1:] and not hasattr(model, "peft_config")
    warm = probes.run_warm(model, batches, experts, probes.ProbeSettings(max_rank=4, progress=False,
                           warmup_steps=6, warmup_lr=3e-2), config, batches)
    assert all(warm[n].status == "ok" and warm[n].n_experts == 4 for n in experts)


def test_auto_lr_follows_width_and_rank():
    model = tiny_model("qwen3_5", hidden=32, layers=2)
    assert auto_lr(model, 4) == pytest.approx(2 / 32)
    assert auto_lr(model, 16) == pytest.approx(auto_lr(model, 4) / 2)


class _Stats:
    status = "ok"

    def __init__(self, sigma):
        self.grad_singular_values = np.asarray(sigma, dtype=float)


def _comp(name, family, d=64):
    return Component(name, 0, family, "dense" if family == "mlp" else "x", d, d, "Linear")


def test_capacity_moves_budget_to_the_family_whose_gradient_energy_lies_beyond_the_budget_rank():
    comps = [_comp(f"a{i}", "attention") for i in range(2)] + [_comp(f"r{i}", "recurrent") for i in range(2)]
    # the same top-4 energy; beyond rank 4 the recurrent gradient keeps 9x the energy: capacity demand
    flat = np.concatenate([np.full(4, 10.0), np.ones(12)])
    deep = np.concatenate([np.full(4, 10.0), np.full(12, 3.0)])
    report = type(
        "R", (), {"modules": {"a0": _Stats(flat), "a1": _Stats(flat), "r0": _Stats(deep), "r1": _Stats(deep)}}
    )()
    grid = (0, 2, 4, 8, 16)
    table = compute_utilities(
        report, comps, grid, UtilitySettings(signal="capacity", uniform_prior=0.0, capacity_start=4)
    )
    prior = prior_curves(comps, grid)
    row = table.index()
    ratio = [table.values[row[c.name], -1] / prior[i, -1] for i, c in enumerate(comps)]
    assert ratio[2] == ratio[3] > ratio[0] == ratio[1]  # per family, and toward the deep spectrum
    # the tail (ranks 5..16) as a share of each module's energy: 12/412 and 108/508
    share = [12 / 412, 108 / 508]
    assert ratio[2] / ratio[0] == pytest.approx(share[1] / share[0])
    energy = UtilitySettings(signal="capacity", uniform_prior=0.0, capacity_start=4,
                             capacity_measure="energy")
    table = compute_utilities(report, comps, grid, energy)
    # tail energy per parameter: 12 vs 108 per module, mean 60: weights 0.2 and 1.8, ratio 9
    assert table.values[row["r0"], -1] / table.values[row["a0"], -1] == pytest.approx(9.0)
    squared = compute_utilities(report, comps, grid, dataclasses.replace(energy, capacity_exponent=2.0))
    assert squared.values[row["r0"], -1] / squared.values[row["a0"], -1] == pytest.approx(81.0)
    # a family whose gradients are 10x larger throughout: the share measure does not see the scale (under
    # Adam the update does not grow with it), the energy measure takes it for 100x the demand
    loud = type("R", (), {"modules": {**report.modules, "a0": _Stats(10 * flat), "a1": _Stats(10 * flat)}})()
    by_share = dataclasses.replace(energy, capacity_measure="share")
    for settings, expected in ((by_share, share[1] / share[0]), (energy, 108 / 1200)):
        scaled = compute_utilities(loud, comps, grid, settings)
        assert scaled.values[row["r0"], -1] / scaled.values[row["a0"], -1] == pytest.approx(expected)
    # the default reads both and keeps, per family, the demand nearer average: where the two disagree (the
    # share says recurrent, the energy says the loud attention) neither moves; where they agree, the cautious
    consensus = dataclasses.replace(energy, capacity_measure="consensus")
    scaled = compute_utilities(loud, comps, grid, consensus)
    assert scaled.values[row["r0"], -1] == pytest.approx(scaled.values[row["a0"], -1])
    table = compute_utilities(report, comps, grid, consensus)  # share 1.759 / 0.241, energy 1.8 / 0.2
    weights = [share[0] / sum(share) * 2, share[1] / sum(share) * 2]
    assert table.values[row["r0"], -1] / table.values[row["a0"], -1] == pytest.approx(weights[1] / weights[0])
    flat_report = type("R", (), {"modules": {c.name: _Stats(flat) for c in comps}})()
    flat_table = compute_utilities(
        flat_report, comps, grid, UtilitySettings(signal="capacity", uniform_prior=0.0, capacity_start=4)
    )
    # flat evidence: every module the same concave curve (the prior shifted by one rank), hence uniform's plan
    shifted = prior_curves(comps, grid, shift=1)
    assert np.allclose(flat_table.values / flat_table.values[:, -1:], shifted / shifted[:, -1:])
    assert shifted[0, 1] / shifted[0, 2] < prior[0, 1] / prior[0, 2]  # a smaller premium on the first ranks


def test_capacity_is_a_registered_signal():
    assert "capacity" in SIGNALS


def test_family_demand_and_its_layer_halves_flag_evidence_that_only_one_half_shows():
    from allocator.scoring.evidence import family_demand, family_evidence

    flat = np.concatenate([np.full(4, 10.0), np.ones(12)])
    deep = np.concatenate([np.full(4, 10.0), np.full(12, 3.0)])
    comps = [
        Component(f"l{layer}.{f}", layer, f, "x", 64, 64, "Linear")
        for layer in range(4)
        for f in ("attention", "recurrent")
    ]
    # both halves agree: recurrent deep in every layer (window energy per parameter, as in the test above)
    agree = [_Stats(deep if c.family == "recurrent" else flat) for c in comps]
    demand = family_demand(agree, comps, 4, "energy")
    assert demand["recurrent"] == pytest.approx((1.8, 1.8, 1.8)) and demand["attention"][0] == pytest.approx(
        0.2
    )
    ranks = {c.name: 8 if c.family == "recurrent" else 0 for c in comps}
    rows = {e.family: e for e in family_evidence(demand, comps, ranks)}
    assert rows["recurrent"].plan_share == 1.0 and rows["recurrent"].uniform_share == 0.5
    assert rows["recurrent"].agrees and rows["attention"].agrees
    # recurrent deep only in the even layers: the odd half is flat, which contradicts nothing
    huge = np.concatenate([np.full(4, 10.0), np.full(12, 9.0)])
    split = [_Stats(huge if c.family == "recurrent" and c.layer % 2 == 0 else flat) for c in comps]
    whole, even, odd = family_demand(split, comps, 4, "energy")["recurrent"]
    assert whole > 1.1 and even > 1.1 and odd == pytest.approx(1.0)  # odd half: recurrent == attention
    rows = {e.family: e for e in family_evidence(family_demand(split, comps, 4, "energy"), comps, ranks)}
    assert rows["recurrent"].agrees  # a flat half does not contradict
    # ... and attention deep in one odd layer: the odd half now puts recurrent below average, the whole above
    split[comps.index(next(c for c in comps if c.layer == 1 and c.family == "attention"))] = _Stats(huge)
    rows = {e.family: e for e in family_evidence(family_demand(split, comps, 4, "energy"), comps, ranks)}
    assert rows["recurrent"].demand > 1.1 and rows["recurrent"].demand_odd < 0.9
    assert not rows["recurrent"].agrees


def test_a_budget_of_rank_one_moves_when_one_family_demands_half_again_as_much():
    """Under sqrt(r) a first rank is worth 2.4x a second, so at a budget of rank 1 moderate evidence moved
    nothing (the fact task stayed uniform's plan); the capacity signal's shifted prior lets it move, while
    flat evidence still gives every module rank 1."""
    from allocator.solver.settings import SolverSettings
    from allocator.solver.solve import solve

    comps = [Component(f"l{layer}.{f}", layer, f, "x", 64, 64, "Linear")
             for layer in range(4) for f in ("mlp", "recurrent")]
    flat = np.concatenate([np.full(1, 10.0), np.ones(15)])
    deep = np.concatenate([np.full(1, 10.0), np.full(15, 1.25)])  # window energy 1.56x flat's
    budget = sum(c.n_params_per_rank for c in comps)  # uniform rank 1
    settings = UtilitySettings(capacity_start=1)
    solver = SolverSettings(granularity="module")

    def ranks(spectra):
        report = type("R", (), {"modules": {c.name: _Stats(spectra(c)) for c in comps}})()
        table = compute_utilities(report, comps, solver.ranks, settings)
        return solve(comps, table, budget, solver).ranks

    assert set(ranks(lambda c: flat).values()) == {1}
    moved = ranks(lambda c: deep if c.family == "recurrent" else flat)
    rec = sum(r for n, r in moved.items() if "recurrent" in n)
    mlp = sum(r for n, r in moved.items() if "mlp" in n)
    assert rec > 4 > mlp and rec + mlp <= 8
