"""Export: the LoraConfig a plan writes is matched by PEFT exactly as planned, and counts exactly
``plan.cost``."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from allocator.discovery.components import find_components
from allocator.errors import AllocatorError, InputError
from allocator.output.export import check_matching
from allocator.output.plan import Plan

TINY = {
    "qwen3_5_text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        vocab_size=128,
        layer_types=["linear_attention"] * 3
        + ["full_attention"]
        + ["linear_attention"] * 7
        + ["full_attention"],
    ),
    "falcon_h1": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        vocab_size=128,
    ),
}


def _model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY[model_type])
    return AutoModelForCausalLM.from_config(config)


def _random_plan(model, seed: int = 0) -> Plan:
    rng = random.Random(seed)
    components = find_components(model)
    eligible = [c for c in components if c.eligible and not c.is_parameter]
    ranks = {c.name: rng.choice([0, 1, 2, 4, 8]) for c in eligible}
    ranks[eligible[0].name] = 3  # at least one target
    plan = Plan(model_id="tiny", components=tuple(components), ranks=ranks, budget=10**9)
    return plan


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_plan_cost_equals_peft_trainable_params(model_type):
    model = _model(model_type)
    plan = _random_plan(model)
    config = plan.to_lora_config()
    check_matching(config, plan.ranks, [n for n, _ in model.named_modules()])
    peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == plan.cost
    # every adapted module got its own rank, and layer 1 never took layer 11's key
    for name, r in plan.targets.items():
        assert peft_model.base_model.model.get_submodule(name).r["default"] == r


def test_rank_keys_do_not_match_layer_11_for_layer_1():
    model = _model("qwen3_5_text")
    components = find_components(model)
    by_layer = {}
    for c in components:
        if c.eligible and c.kind == "dense" and c.name.endswith("up_proj"):
            by_layer[c.layer] = c.name
    ranks = {by_layer[1]: 2, by_layer[11]: 6}
    plan = Plan(model_id="tiny", components=tuple(components), ranks=ranks, budget=10**9)
    peft_model = get_peft_model(model, plan.to_lora_config())
    assert peft_model.base_model.model.get_submodule(by_layer[1]).r["default"] == 2
    assert peft_model.base_model.model.get_submodule(by_layer[11]).r["default"] == 6


def test_saved_config_loads_through_peft_and_trains(tmp_path):
    model = _model("falcon_h1")
    plan = _random_plan(model, seed=3)
    folder = plan.save(tmp_path / "plan")
    assert {p.name for p in folder.iterdir()} >= {
        "adapter_config.json",
        "allocation.json",
        "report.md",
        "heatmap.png",
    }
    loaded = LoraConfig.from_pretrained(str(folder))
    peft_model = get_peft_model(model, loaded)
    assert isinstance(peft_model, PeftModel)
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost
    data = json.loads((folder / "allocation.json").read_text())
    assert data["cost"] == plan.cost and data["budget"] == plan.budget
    ids = torch.randint(0, 128, (2, 16))
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert Plan.load(folder).to_dict() == plan.to_dict()


def test_alpha_keeps_scale_constant_or_uses_rslora():
    model = _model("qwen3_5_text")
    plan = _random_plan(model, seed=1)
    config = plan.to_lora_config(alpha_ratio=2.0)
    for key, r in config.rank_pattern.items():
        assert config.alpha_pattern[key] == 2.0 * r
    rs = plan.to_lora_config(use_rslora=True)
    assert rs.use_rslora and rs.alpha_pattern == {}


def test_save_refuses_a_folder_it_did_not_write_even_with_overwrite(tmp_path):
    model = _model("falcon_h1")
    plan = _random_plan(model)
    out = tmp_path / "plan"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="did not write"):
        plan.save(out)
    with pytest.raises(InputError, match="did not write.*keep.txt"):
        plan.save(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]  # no temporary folders left behind


def test_overwrite_replaces_the_plan_files_and_keeps_the_users(tmp_path):
    model = _model("falcon_h1")
    plan = _random_plan(model)
    out = tmp_path / "plan"
    plan.save(out)
    with pytest.raises(InputError, match="--overwrite"):
        plan.save(out)
    (out / "notes.md").write_text("my notes")
    (out / "report.md").unlink()  # the next plan writes no report: its old report must go, the notes stay
    second = Plan(model_id="other", components=plan.components, ranks=plan.ranks, budget=plan.budget)
    second.save(out, overwrite=True, report=False)
    assert (out / "notes.md").read_text() == "my notes"
    assert Plan.load(out).model_id == "other"
    assert sorted(p.name for p in out.iterdir()) == [
        ".allocator-files.json",
        "adapter_config.json",
        "allocation.json",
        "notes.md",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]


def test_plan_over_budget_is_rejected():
    model = _model("falcon_h1")
    plan = _random_plan(model)
    with pytest.raises(AllocatorError, match="exceeds its budget"):
        Plan(model_id="tiny", components=plan.components, ranks=plan.ranks, budget=plan.cost - 1)


def _tiny_families():
    from tiny_models import TINY as FAMILY_CONFIGS

    return sorted(FAMILY_CONFIGS)


@pytest.mark.parametrize("model_type", _tiny_families())
def test_plan_apply_counts_exactly_for_every_family(model_type):
    """Random per-module ranks (experts included) survive PEFT's matching and MoE rewrites exactly."""
    from tiny_models import build

    torch.manual_seed(0)
    model = build(model_type)
    plan = _random_plan_all(model, seed=hash(model_type) % 1000)
    peft_model = plan.apply(model)  # raises unless trainable params == plan.cost
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost > 0


def _random_plan_all(model, seed: int) -> Plan:
    rng = random.Random(seed)
    components = find_components(model)
    eligible = [c for c in components if c.eligible]
    ranks = {c.name: rng.choice([0, 2, 4]) for c in eligible}
    ranks[eligible[0].name] = 1
    return Plan(model_id="tiny", components=tuple(components), ranks=ranks, budget=10**9)


def test_plan_written_before_export_as_parameter_still_applies_exactly():
    """An allocation.json without ``export_as_parameter`` names qwen3_next's shared-expert linears in
    target_modules; ``apply`` marks them again for the model's type, so PEFT does not rewrite them."""
    from dataclasses import replace

    from tiny_models import build

    model = build("qwen3_next")
    components = [replace(c, export_as_parameter=False) for c in find_components(model)]
    shared = "model.layers.0.mlp.shared_expert.up_proj"
    ranks = {shared: 2, "model.layers.2.mlp.gate_proj": 1}
    plan = Plan(model_id="tiny", components=tuple(components), ranks=ranks, budget=10**9)
    peft_model = plan.apply(model)  # raises unless trainable params == plan.cost
    assert type(peft_model.base_model.model.get_submodule(shared)).__name__ == "ParamWrapper"


def test_dropout_with_parameter_targets_is_refused_with_the_reason():
    from tiny_models import build

    model = build("qwen3_next", meta=True)
    plan = _random_plan_all(model, seed=0)
    with pytest.raises(InputError, match="target_parameters.*lora_dropout"):
        plan.to_lora_config(lora_dropout=0.1)
