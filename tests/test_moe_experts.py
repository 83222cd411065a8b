"""Routed MoE experts are first-class: offered, probed, budgeted and adapted through PEFT's target_parameters.

Tiny random models of every MoE family transformers ships (hybrid ones from ``tiny_models``, plus mixtral
and qwen3_moe here). Oracles: the model's own experts forward, autograd's expert gradients (the probe's
exact norm sums), PEFT's own trainable-parameter count and a plain ``LoraConfig.from_pretrained`` reload.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import PURE_MOE, TINY, build

import allocator
import probes
from allocator.discovery.components import find_components
from allocator.discovery.experts import expert_layouts, per_layer
from allocator.errors import AllocatorWarning, InputError
from allocator.solver.budget import Budget
from allocator.solver.settings import SolverSettings
from probes.errors import ProbeError
from probes.experts import ExpertProber
from probes.settings import DataSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = sorted(
    [*PURE_MOE]
    + [t for t in TINY if t in ("qwen3_5_moe", "qwen3_next", "granitemoehybrid", "nemotron_h", "jamba")]
    + [t for t in TINY if t in ("lfm2_moe", "minimax", "kimi_linear", "bailing_hybrid")]
)
QUIET = probes.ProbeSettings(progress=False, max_rank=8)


def _model(model_type: str, **overrides) -> torch.nn.Module:
    return build(model_type, **overrides).float()


def _batches(n: int = 4, seq: int = 16, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, 128, (2, seq), generator=gen),
            "labels": torch.randint(3, 128, (2, seq), generator=gen),
        }
        for _ in range(n)
    ]


def _experts(model) -> list:
    return [c for c in find_components(model) if c.is_parameter and c.kind == "expert"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routed_experts_are_offered_probed_and_exact(model_type):
    """Every 3-D expert parameter is eligible; the probe's expert-by-expert forward equals the model's own;
    Σ_b ‖G_b‖² equals autograd's expert gradients; the pooled spectrum and capture are well-formed."""
    model = _model(model_type)
    experts = _experts(model)
    assert experts and all(c.eligible and c.n_experts == 4 for c in experts)
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
    prober = ExpertProber(model, [c.name for c in experts], torch.float32, QUIET)
    prober.attach()
    try:
        with torch.no_grad():
            probed = model(ids).logits
    finally:
        prober.detach()
    torch.testing.assert_close(probed, reference, rtol=1e-5, atol=1e-6)

    batches = _batches()
    report = probes.run(model, batches, [c.name for c in experts], QUIET)
    params = dict(model.named_parameters())
    oracle = {c.name: 0.0 for c in experts}
    for p in params.values():
        p.requires_grad_(False)
    for batch in batches:
        for c in experts:
            params[c.name].requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for c in experts:
            oracle[c.name] += float(params[c.name].grad.double().square().sum())
            params[c.name].requires_grad_(False)
    for c in experts:
        stats = report[c.name]
        assert stats.status == "ok" and stats.n_experts == 4 and stats.n_batches == 4
        assert stats.grad_sq_sum == pytest.approx(oracle[c.name], rel=1e-4)
        sigma = stats.grad_singular_values
        assert 0 < sigma.size <= min(8, c.d_in, c.d_out) and (sigma[:-1] >= sigma[1:]).all()
        capture = stats.heldout_capture
        assert capture.size and 0 <= capture.min() <= capture.max() <= 1


def test_experts_never_routed_are_counted():
    """One token, top-1 routing over 4 experts: at least 3 experts of every layer are never routed."""
    model = _model("mixtral", num_experts_per_tok=1)
    experts = _experts(model)
    batch = [{"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, 6]])}]
    report = probes.run(model, batch, [c.name for c in experts], QUIET)
    for c in experts:
        assert report[c.name].status == "ok" and report[c.name].n_unrouted >= 2


def test_inspect_and_allocate_count_experts_identically():
    """``rN`` costs what inspect prints: every expert parameter's n_experts * (d_in + d_out) per rank."""
    from allocator.discovery.inspect import inspect_model

    model = _model("mixtral", intermediate_size=128)
    comps = find_components(model)
    per_rank = sum(c.n_params_per_rank for c in comps if c.eligible)
    assert Budget.parse("r4").resolve(comps, 10**9) == 4 * per_rank
    layouts = expert_layouts(model, comps)
    assert {lay.fused_gate_up for lay in layouts} == {True, False} and all(lay.known for lay in layouts)
    assert per_layer(layouts)[0] == (4, 4 * (64 + 256) + 4 * (128 + 64))
    assert inspect_model(model).totals()["params_per_rank"] == per_rank


def _rows(n: int = 12, seed: int = 0) -> list[dict]:
    """Token rows of 6 to 17 tokens: allocate right-pads them to seq_len 20 with an attention mask."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (6 + (5 * i) % 12,), generator=gen)} for i in range(n)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_allocate_adapts_experts_and_peft_counts_the_plan(model_type, tiny_tokenizer, tmp_path):
    """At a generous budget, on padded rows of different lengths, the plan adapts routed experts; PEFT's
    trainable count equals plan.cost after plan.apply and after a plain LoraConfig.from_pretrained reload;
    one step changes expert LoRA weights. kimi_linear and bailing_hybrid run only because right-padded batches
    reach the model without their mask (probes.padding)."""
    model = _model(model_type)
    plan = allocator.allocate(
        model,
        data=_rows(),
        budget="r8",
        tokenizer=tiny_tokenizer,
        data_settings=DataSettings(seq_len=20, samples=12),
        probe_settings=replace(QUIET, warmup_steps=4),
        solver_settings=SolverSettings(granularity="module"),
    )
    experts = [c.name for c in _experts(model)]
    assert any(plan.ranks[n] > 0 for n in experts)
    plan.save(tmp_path / "plan")
    reloaded = get_peft_model(_model(model_type), LoraConfig.from_pretrained(str(tmp_path / "plan")))
    assert reloaded.get_nb_trainable_parameters()[0] == plan.cost
    peft_model = plan.apply(model)
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n and ".experts." in n}
    assert lora
    for n, p in lora.items():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    before = {n: p.detach().clone() for n, p in lora.items()}
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(**_batches(1)[0]).loss.backward()
    optim.step()
    assert any(not torch.equal(before[n], p) for n, p in lora.items())


def test_a_plan_leaving_all_experts_at_rank_0_warns_with_the_reason(tiny_tokenizer):
    """Experts hold most of the per-rank cost; a budget below one expert parameter at rank 1 leaves them out
    and the warning says it was the budget."""
    model = _model("mixtral", intermediate_size=256)
    comps = [c for c in find_components(model) if c.eligible]
    cheapest = min(c.n_params_per_rank for c in comps if c.kind == "expert")
    with pytest.warns(AllocatorWarning, match="routed-expert parameters.*budget"):
        plan = allocator.allocate(
            model,
            data=_batches(2),
            budget=cheapest - 1,
            tokenizer=tiny_tokenizer,
            probe_settings=QUIET,
            solver_settings=SolverSettings(granularity="module", ranks=(0, 1, 2, 4)),
        )
    assert all(plan.ranks[c.name] == 0 for c in comps if c.kind == "expert")


def test_a_3d_expert_plan_on_linear_experts_names_target_modules():
    """The plan adapts 3-D expert parameters; the model keeps experts as an nn.ModuleList of linears."""
    from allocator.output.plan import Plan

    model = _model("mixtral")
    comps = find_components(model)
    name = next(c.name for c in comps if c.kind == "expert")
    plan = Plan(model_id="tiny", components=tuple(comps), ranks={name: 2}, budget=10**9)
    mlp = model.model.layers[0].mlp
    mlp.experts = torch.nn.ModuleList(
        torch.nn.ModuleDict({"w1": torch.nn.Linear(64, 32), "w2": torch.nn.Linear(32, 64)}) for _ in range(4)
    )
    with pytest.raises(InputError, match=r"'mixtral'.*nn.ModuleList of nn.Linear.*target_modules"):
        plan.apply(model)


def test_a_linear_expert_plan_on_3d_experts_names_target_parameters():
    from dataclasses import replace

    from allocator.output.plan import Plan

    model = _model("mixtral")
    comps = find_components(model)
    fake = replace(
        next(c for c in comps if c.kind == "expert"),
        name="model.layers.0.mlp.experts.0.w1",
        is_parameter=False,
        n_experts=1,
    )
    plan = Plan(model_id="tiny", components=(*comps, fake), ranks={fake.name: 2}, budget=10**9)
    with pytest.raises(InputError, match=r"'mixtral'.*3-D parameters.*target_parameters"):
        plan.apply(model)


def test_an_unknown_expert_layout_is_refused_before_probing(tiny_tokenizer):
    """An ``*Experts`` module without transformers' declared layout: one message naming the class, the model
    type and what to pass."""
    model = _model("mixtral")
    for layer in model.model.layers:
        del layer.mlp.experts.has_gate
    with pytest.raises(ProbeError, match=r"MixtralExperts.*'mixtral'.*exclude"):
        probes.run(model, _batches(1), [c.name for c in _experts(model)], QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match="MixtralExperts"):
            allocator.allocate(
                model, data=_batches(1), budget="r4", tokenizer=tiny_tokenizer, probe_settings=QUIET
            )


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_5_moe"])
def test_the_rank_0_warning_names_only_fixes_that_bring_the_experts_back(model_type):
    """``required`` is met by any module of the family: with shared experts in it (qwen3_5_moe) it would be
    met at rank 1 on them, so the warning names it only where the routed experts are the family's only
    members (mixtral); the uniform prior is named in both."""
    from allocator.discovery.experts import idle_family_warning

    comps = [c for c in find_components(_model(model_type)) if c.eligible]
    ranks = {c.name: 0 if c.kind == "expert" else 4 for c in comps}
    text = idle_family_warning(comps, ranks, 10**9, dict.fromkeys(ranks, "ok"), (0, 1, 2, 4), share=0.0)
    shared = any(c.family == "moe" and c.kind != "expert" for c in comps)
    assert shared == (model_type == "qwen3_5_moe")
    assert "the evidence" in text and "--utility-uniform-prior 1" in text
    assert ("--solver-required moe" in text) == (not shared)
