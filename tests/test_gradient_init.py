"""Gradient init at a plan's ranks: lora_A on the top right singular vectors of the calibration gradient
(exact and sketched), Kaiming's row norm, exact count, base output kept, the init recorded."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig

import probes
from allocator.commands.cli import main
from allocator.discovery.components import find_components
from allocator.errors import InputError
from allocator.output.lora_init import kaiming_row_norm
from allocator.output.plan import Plan
from probes.gradient_subspace import gradient_subspaces
from tests.tiny_models import uneven_plan

FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "--quiet"]


def _setup(saved_tiny_model, corpus_file, model_type="qwen3_5"):
    return uneven_plan(saved_tiny_model(model_type), corpus_file, "gradient", samples=8)


def _exact_gradient(model, name, batches):
    """Σ_b ∇_W mean-token loss of batch b, by autograd on the module's weight alone (eval mode)."""
    weight = model.get_submodule(name).weight
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    weight.requires_grad_(True)
    for b in batches:
        model(**b).loss.backward()
    grad = weight.grad.double().clone()
    weight.grad = None
    for p, flag in flags:
        p.requires_grad_(flag)
    return grad


def _cosines(rows, grad, r):
    """Cosines of the principal angles between span(rows[:r]) and the top-r right singular subspace."""
    top = torch.linalg.svd(grad).Vh[:r]
    q = torch.linalg.qr(rows[:r].double().T).Q
    return torch.linalg.svdvals(q.T @ top.T)


@pytest.mark.parametrize("model_type", ["qwen3_5", "falcon_h1"])
def test_gradient_init_keeps_count_and_base_output_and_spans_the_gradient(
    model_type, saved_tiny_model, corpus_file
):
    model, batches, plan = _setup(saved_tiny_model, corpus_file, model_type)
    name, r = max(plan.targets.items(), key=lambda kv: kv[1])
    grad = _exact_gradient(model, name, batches)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft_model = plan.apply(model, init_data=batches)
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before)  # lora_B = 0
    for target, rank in plan.targets.items():
        layer = peft_model.base_model.model.get_submodule(target)
        a = layer.lora_A["default"].weight.detach().double()
        assert a.shape[0] == rank and not layer.lora_B["default"].weight.any()
        # orthogonal rows at PEFT's default row norm
        gram = torch.eye(rank, dtype=torch.float64) * kaiming_row_norm() ** 2
        torch.testing.assert_close(a @ a.T, gram, atol=1e-5, rtol=0)
    a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.detach()
    assert _cosines(a, grad, r).min() > 1 - 1e-4


def test_sketched_subspace_is_exact_when_the_gradient_fits_the_sketch(saved_tiny_model, corpus_file):
    """The streaming sketch (no weight gradient formed) recovers G exactly when rank(G) <= its width: 16
    tokens, sketch range 4 + 32 wide. With many tokens it keeps most of the top-r energy."""
    model, batches, _ = _setup(saved_tiny_model, corpus_file)
    name = "model.layers.0.mlp.down_proj"
    one = [{k: v[:1, :16] for k, v in batches[0].items()}]
    sketch = probes.ProbeSettings(grad_sketch="sketch", device="cpu")
    model.train()
    model.lm_head.weight.requires_grad_(False)  # the pass restores flags and mode as they were
    flags, weights = [p.requires_grad for p in model.parameters()], [p.clone() for p in model.parameters()]
    rows = gradient_subspaces(model, one, [name], 4, sketch)[name]
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    model.eval()
    assert _cosines(rows, _exact_gradient(model, name, one), 4).min() > 1 - 1e-6
    rows = gradient_subspaces(model, batches, [name], 4, sketch)[name]
    grad = _exact_gradient(model, name, batches)
    captured = (grad @ rows.double().T).square().sum() / torch.linalg.svdvals(grad)[:4].square().sum()
    assert captured > 0.9


def test_kaiming_row_norm_is_what_peft_draws(saved_tiny_model, corpus_file):
    model, _, plan = _setup(saved_tiny_model, corpus_file)
    peft_model = replace(plan, init="default").apply(model)
    norms = torch.cat([m.lora_A["default"].weight.detach().norm(dim=1) for m in peft_model.modules()
                       if "default" in getattr(m, "lora_A", {})])
    assert norms.mean() == pytest.approx(kaiming_row_norm(), rel=0.05)


def test_gradient_plan_round_trips_and_saves_a_standard_lora_config(saved_tiny_model, corpus_file, tmp_path):
    _, _, plan = _setup(saved_tiny_model, corpus_file)
    plan.save(tmp_path / "plan", report=False)
    assert Plan.load(tmp_path / "plan").init == "gradient"
    assert LoraConfig.from_pretrained(str(tmp_path / "plan")).init_lora_weights is True


def test_gradient_plan_without_data_names_the_fix(saved_tiny_model, corpus_file):
    model, _, plan = _setup(saved_tiny_model, corpus_file)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(InputError, match="pass init_data=calibration batches"):
        plan.apply(model)
    with pytest.raises(InputError, match="needs calibration batches; pass init_data="):
        plan.apply(model, init_data=[])
    assert not hasattr(model, "peft_config") and [p.requires_grad for p in model.parameters()] == flags


def test_cli_records_gradient_init(saved_tiny_model, corpus_file, tmp_path, capsys):
    out = tmp_path / "plan"
    args = [str(saved_tiny_model("qwen3_5")), "--data", str(corpus_file), "--budget", "r2"]
    assert main([*args, "--init", "gradient", "--probe-warmup-steps", "0", "-o", str(out), *FAST]) == 0
    assert "calibration-gradient init of lora_A" in capsys.readouterr().out
    assert Plan.load(out).init == "gradient" and json.loads((out / "allocation.json").read_text())[
        "init"] == "gradient"


def test_gradient_init_on_a_moe_hybrid_leaves_expert_parameters_to_peft():
    """Routed experts adapted as 3-D parameters keep PEFT's init; the shared expert, whose input is flattened
    to (batch * seq, d), gets the gradient's rows."""
    from tiny_models import build

    torch.manual_seed(0)
    model = build("qwen3_next").eval()
    components = find_components(model)
    plan = Plan(model_id="qwen3_next", components=tuple(components), budget=10**9, init="gradient",
                ranks={c.name: 2 for c in components if c.eligible})
    experts = [c.name for c in components if c.eligible and c.is_parameter]
    shared = [n for n in plan.targets if "shared_expert" in n]
    assert experts and shared
    ids = torch.randint(3, 100, (4, 32))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft_model = plan.apply(model, init_data=[{"input_ids": ids}])
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before)
    for name in shared:
        a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.detach().double()
        torch.testing.assert_close(a @ a.T, torch.eye(2, dtype=torch.float64) * kaiming_row_norm() ** 2,
                                   atol=1e-5, rtol=0)
