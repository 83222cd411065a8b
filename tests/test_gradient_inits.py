"""The gradient- and weight-driven baselines of the placement benchmark (``benchmarks.gradient_inits``):
GoRA's ranks and init, PEFT LoRA-GA's gradients and the rank caps of LoRA-GA / PiSSA; the own-lr runs
(``X@lr``), the fact task's lr rule and the content-only weights id."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from allocator.discovery.component import Component
from allocator.discovery.components import find_components
from allocator.errors import AllocatorError
from allocator.output.export import get_peft_model_quietly, to_lora_config
from allocator.reference import reference_model_path
from allocator.tuning.finetune import evaluate_loss
from benchmarks import gradient_inits as gi
from benchmarks import lr_sweep
from benchmarks.grid import GRIDS, Grid
from benchmarks.placement_conditions import cost
from benchmarks.placement_run import _file_id

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _comp(name: str, d_in: int, d_out: int) -> Component:
    return Component(name=name, layer=0, family="mlp", kind="dense", d_in=d_in, d_out=d_out,
                     module_class="Linear")


def _gora(comps, scale, rank):
    weights = {c.name: torch.ones(c.d_out, c.d_in) for c in comps}
    grads = {c.name: torch.full((c.d_out, c.d_in), scale[c.name]) for c in comps}  # mean(|W * G|) = scale
    budget = rank * sum(c.n_params_per_rank for c in comps)
    ranks, added, info = gi.gora_ranks(comps, weights, grads, budget, rank)
    assert info["importance"] == pytest.approx(scale)
    return ranks, cost(ranks, {c.name: c for c in comps}), budget


def test_gora_ranks_follow_importance_within_clips_at_the_exact_budget():
    comps = [_comp(n, 64, 64) for n in "abcdef"]
    ranks, spent, budget = _gora(comps, dict(zip("abcdef", (40.0, 20.0, 10.0, 5.0, 1.0, 0.01))), 4)
    assert spent == budget
    assert [ranks[n] for n in "abcdef"] == sorted(ranks.values(), reverse=True)  # more important, more rank
    assert ranks["a"] > 2 * ranks["c"] > 4 and ranks["e"] == ranks["f"] == 2  # r_min = r / 2 at the bottom
    # uniform importance per parameter gives uniform's ranks
    ranks, spent, budget = _gora(comps, dict.fromkeys("abcdef", 1.0), 4)
    assert set(ranks.values()) == {4} and spent == budget
    # r_max = 4 r, and never beyond the matrix's rank min(d_in, d_out)
    comps = [_comp("narrow", 64, 8), *(_comp(n, 64, 64) for n in "abcdefgh")]
    ranks, spent, budget = _gora(comps, {"narrow": 1000.0, **dict.fromkeys("abcdefgh", 1.0)}, 4)
    assert ranks["narrow"] == 8 and budget - 128 < spent <= budget
    ranks, spent, budget = _gora(comps, {"narrow": 1.0, "a": 1000.0, **dict.fromkeys("bcdefgh", 1.0)}, 4)
    assert ranks["a"] == 16 and budget - 72 < spent <= budget


@pytest.fixture(scope="module")
def tiny():
    try:
        path = reference_model_path("qwen3_5_tiny")
    except AllocatorError:
        pytest.skip("reference model qwen3_5_tiny not built (python -m benchmarks.zoo --only qwen3_5_tiny)")
    from allocator.discovery.modelio import load_model

    model = load_model(str(path)).eval()
    eligible = [c for c in find_components(model, fused_kernels=False) if c.eligible and not c.is_parameter]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return model, eligible, batches


def test_calibration_gradients_match_peft_loraga_and_restore_the_model(tiny):
    model, eligible, batches = tiny
    flags = [p.requires_grad for p in model.parameters()]
    ours = gi.calibration_gradients(model, eligible, batches)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(p.grad is None for p in model.parameters())
    peft = gi.loraga_gradients(model, eligible, batches)
    assert set(peft) == set(ours) == {c.name for c in eligible}
    assert not any(hasattr(model.get_submodule(c.name), "_peft_loraga_grad") for c in eligible)
    for name in ours:
        assert torch.allclose(ours[name], peft[name].float(), rtol=1e-4, atol=1e-7), name
    assert all(float(g.abs().sum()) > 0 for g in ours.values())


@pytest.mark.parametrize("keep_output", [False, True])
def test_gora_init_is_a_compressed_descent_step(tiny, keep_output):
    model, eligible, batches = tiny
    grads = gi.calibration_gradients(model, eligible, batches)
    ranks = {c.name: 2 for c in eligible}
    torch.manual_seed(0)
    peft_model = get_peft_model_quietly(copy.deepcopy(model),
                                        to_lora_config(ranks, eligible, alpha_ratio=2.0))
    before = evaluate_loss(peft_model, batches)
    gi.gora_init(grads, ranks, step=0.05, keep_output=keep_output)(peft_model)
    after = evaluate_loss(peft_model, batches)
    for c in eligible[:6]:
        layer = peft_model.get_submodule(f"base_model.model.{c.name}")
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        g, s = grads[c.name].double(), layer.scaling["default"]
        # s B A restricted to A's row space is -step sqrt(d_in / r) G there: s B (A A^T) = -step k G A^T
        k = 0.05 * (c.d_in / 2) ** 0.5
        assert torch.allclose(s * b @ a @ a.T, -k * g @ a.T, rtol=1e-5, atol=1e-9), c.name
        assert float((s * b @ a * g).sum()) < 0  # a descent direction
        base = layer.get_base_layer().weight.detach().double()
        moved = not torch.equal(base, model.get_submodule(c.name).weight.double())
        assert moved == keep_output
    if keep_output:  # the offset base weights cancel the adapter: the output is unchanged at init
        assert after == pytest.approx(before, abs=1e-5)
    else:  # the paper's init: one small gradient step from the base model, on the calibration rows
        assert after < before - 1e-4


def test_loraga_and_pissa_ranks_are_uniform_unless_a_module_is_too_narrow():
    comps = [_comp("wide", 128, 256), _comp("narrow", 128, 8)]
    budget = 16 * sum(c.n_params_per_rank for c in comps)
    assert gi.init_ranks(comps, 4, 4 * sum(c.n_params_per_rank for c in comps), need=2) == (
        {"wide": 4, "narrow": 4}, 0)
    for need, cap in ((1, 8), (2, 4)):
        ranks, added = gi.init_ranks(comps, 16, budget, need)
        assert ranks["narrow"] == cap and ranks["wide"] > 16 and added > 0
        assert budget - comps[0].n_params_per_rank < cost(ranks, {c.name: c for c in comps}) <= budget


def test_own_lr_runs_read_their_table_and_refuse_a_missing_entry():
    grid = Grid(("m",), ("text_domain",), (4,), (0,), lrs=(("m", 4, 8e-3),),
                own_lrs=(("gora", "m", 4, 2e-3),))
    assert grid.lr_for("m", 4, "gora") == 8e-3  # at the cell's lr (uniform's)
    assert grid.lr_for("m", 4, "gora@lr") == 2e-3
    with pytest.raises(ValueError, match="no own lr for m r4"):
        grid.lr_for("m", 4, "pissa@lr")
    full = {c for p in GRIDS["full"] for c in p.conditions}
    core = set(GRIDS["core"][0].conditions)
    assert {"gora", "gora@lr", "loraga", "loraga@lr", "pissa", "pissa@lr"} <= full
    assert not core & {"gora", "loraga", "pissa"}  # the core grid keeps its hour


def test_weights_id_hashes_content_not_mtime(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 3000)
    first = _file_id(path)
    os.utime(path, (1, 1))
    assert _file_id(path) == first
    path.write_bytes(b"x" * 2999 + b"y")
    assert _file_id(path) != first


def test_fact_rule_skips_lrs_that_wreck_retention():
    rows = [{"condition": "gora", "model": "m", "budget": "r4", "lr": lr, "validation_loss": v,
             "retention_loss": ret, "base_retention_loss": "3.0"}
            for lr, v, ret in (("0.002", "2.0", "3.1"), ("0.004", "1.5", "3.4"), ("0.008", "1.0", "3.6"))]
    assert lr_sweep.chosen_lr(rows, "gora", "m", "r4", "fact_recall") == "0.004"
    assert lr_sweep.chosen_lr(rows, "gora", "m", "r4", "text_domain") == "0.008"
    assert lr_sweep.chosen_lr([{**r, "base_retention_loss": ""} for r in rows], "gora", "m", "r4",
                              "fact_recall") is None
