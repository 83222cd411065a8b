"""find_components on tiny random-init models of every hybrid family, checked against the model's own
forward."""

from __future__ import annotations

import warnings
from collections import defaultdict

import pytest
import torch
from tiny_models import EXPECTED, TINY, build, called_linears
from transformers import PretrainedConfig

from allocator.discovery.component import Component
from allocator.discovery.components import find_components
from allocator.errors import AllocatorWarning

HYBRIDS = sorted(TINY)


def per_layer_kinds(components: list[Component]) -> list[set[tuple[str, str]]]:
    found: dict[int, set] = defaultdict(set)
    for c in components:
        if c.layer is not None:
            found[c.layer].add((c.family, c.kind))
    return [found[i] for i in range(max(found) + 1)]


@pytest.fixture(scope="module")
def tiny_models():
    cache: dict[str, torch.nn.Module] = {}

    def get(model_type: str) -> torch.nn.Module:
        if model_type not in cache:
            cache[model_type] = build(model_type)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_every_layer_has_the_families_and_kinds_of_its_block_types(tiny_models, model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AllocatorWarning)  # known families need no guess
        components = find_components(tiny_models(model_type))
    assert per_layer_kinds(components) == EXPECTED[model_type]


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_every_linear_is_listed_once_with_its_shape(tiny_models, model_type):
    model = tiny_models(model_type)
    components = find_components(model)
    names = [c.name for c in components]
    assert names == sorted(names) and len(set(names)) == len(names)
    by_name = {c.name: c for c in components}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.nn.Linear):
            assert (by_name[name].d_in, by_name[name].d_out) == (module.in_features, module.out_features)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_effective_linears_are_exactly_those_the_cpu_forward_calls(tiny_models, model_type):
    """Without fused kernels, a module runs iff it is effective (PEFT refusals and weights shared by distinct
    modules aside: they run, but PEFT cannot adapt them, or not exactly)."""
    model = tiny_models(model_type)
    ran = called_linears(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    for c in find_components(model, fused_kernels=False):
        module = modules.get(c.name)
        if c.is_parameter or not isinstance(module, torch.nn.Linear):
            continue
        peft_only = ("PEFT refuses" in c.note or "merge_and_unload()" in c.note) and not (
            "bypassed" in c.note or "dead" in c.note)
        assert (id(module) in ran) == (c.lora_effective or peft_only), (c.name, c.note)


@pytest.mark.parametrize(
    "model_type", ["mamba2", "falcon_h1", "bamba", "granitemoehybrid", "nemotron_h", "zamba2"]
)
def test_mamba2_out_proj_is_bypassed_under_fused_kernels_only(tiny_models, model_type):
    fused = {c.name: c for c in find_components(tiny_models(model_type))}
    plain = {c.name: c for c in find_components(tiny_models(model_type), fused_kernels=False)}
    out_projs = [n for n, c in fused.items() if c.kind == "mamba2" and n.endswith(".out_proj")]
    assert out_projs
    for name in out_projs:
        assert not fused[name].lora_effective and "mamba2_split_conv1d_scan_combined" in fused[name].note
        # PEFT's _check_lora_target_modules_mamba
        refused = model_type in ("mamba2", "falcon_h1", "nemotron_h")
        assert plain[name].lora_effective is not refused
        assert ("PEFT refuses" in plain[name].note) is refused


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba"])
def test_mamba1_dt_proj_always_bypassed_and_x_out_proj_under_fused_kernels(tiny_models, model_type):
    plain = {
        c.name.rsplit(".", 1)[-1]: c for c in find_components(tiny_models(model_type), fused_kernels=False)
    }
    fused = {c.name.rsplit(".", 1)[-1]: c for c in find_components(tiny_models(model_type))}
    assert not plain["dt_proj"].lora_effective and "dt_proj.weight @" in plain["dt_proj"].note
    assert plain["x_proj"].lora_effective and plain["in_proj"].lora_effective
    assert not fused["x_proj"].lora_effective and "mamba_inner_fn" in fused["x_proj"].note
    assert not plain["out_proj"].lora_effective and "PEFT refuses 'out_proj'" in plain["out_proj"].note


def test_jamba_dt_proj_bypassed_but_x_proj_and_out_proj_adaptable(tiny_models):
    comps = [c for c in find_components(tiny_models("jamba")) if c.kind == "mamba"]
    for c in comps:
        assert c.lora_effective is (not c.name.endswith(".dt_proj")), c


def test_nemotron_h_mixers_classified_by_block_type(tiny_models):
    """Every nemotron_h block is called `mixer`; the hybrid_override_pattern M*-E decides each one."""
    comps = find_components(tiny_models("nemotron_h"))
    kinds = {
        c.layer: (c.family, c.kind)
        for c in comps
        if c.layer is not None and c.kind not in ("router", "shared_expert")
    }
    assert all(".mixer." in c.name for c in comps if c.layer is not None)
    assert kinds == {
        0: ("recurrent", "mamba2"),
        1: ("attention", "softmax"),
        2: ("mlp", "dense"),
        3: ("moe", "expert"),
    }


@pytest.mark.parametrize(
    "model_type,linear_kind,full_kind",
    [("kimi_linear", "kda", "mla"), ("minimax", "lightning", "softmax"), ("bailing_hybrid", "kda", "mla")],
)
def test_self_attn_named_blocks_split_by_layer_type(tiny_models, model_type, linear_kind, full_kind):
    """kimi_linear, minimax and bailing_hybrid call both linear and softmax mixers `self_attn`."""
    comps = [c for c in find_components(tiny_models(model_type)) if ".self_attn." in c.name]
    assert {c.kind for c in comps if c.layer == 0} == {linear_kind}
    assert {c.kind for c in comps if c.layer == 1} == {full_kind}


def test_falcon_h1_parallel_attention_and_mamba_in_one_layer(tiny_models):
    comps = find_components(tiny_models("falcon_h1"))
    layer0 = {c.name.split(".", 3)[-1]: (c.family, c.kind) for c in comps if c.layer == 0}
    assert layer0["self_attn.q_proj"] == ("attention", "softmax")
    assert layer0["mamba.in_proj"] == ("recurrent", "mamba2")
    assert layer0["feed_forward.down_proj"] == ("mlp", "dense")


def test_moe_layers_split_experts_shared_experts_and_routers(tiny_models):
    comps = {c.name: c for c in find_components(tiny_models("qwen3_5_moe"))}
    experts = comps["model.layers.0.mlp.experts.gate_up_proj"]
    assert (experts.kind, experts.is_parameter, experts.n_experts) == ("expert", True, 4)
    assert (experts.d_in, experts.d_out) == (64, 64)  # (E, 2*moe_intermediate, hidden): out 2*32, in 64
    assert comps["model.layers.0.mlp.experts.down_proj"].n_params_per_rank == 4 * (32 + 64)
    assert comps["model.layers.0.mlp.shared_expert.up_proj"].kind == "shared_expert"
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate"):
        assert comps[name].kind == "router" and not comps[name].default_target and not comps[name].eligible


def test_granite_shared_mlp_is_a_shared_expert_beside_the_moe_block(tiny_models):
    comps = {c.name: c for c in find_components(tiny_models("granitemoehybrid"))}
    assert comps["model.layers.0.shared_mlp.input_linear"].kind == "shared_expert"
    assert comps["model.layers.0.block_sparse_moe.experts.gate_up_proj"].kind == "expert"


def test_zamba2_shared_block_with_several_call_sites_is_not_offered(tiny_models):
    """Layers 1 and 3 run shared block 0 (num_mem_blocks=2): distinct modules, one weight. A LoRA on one would
    run in that layer only, but merge_and_unload() would write it into the weight both read: neither is
    offered."""
    comps = {c.name: c for c in find_components(tiny_models("zamba2"))}
    q1, q3 = (comps[f"model.layers.{i}.shared_transformer.self_attn.q_proj"] for i in (1, 3))
    for q in (q1, q3):
        assert not q.lora_effective and q.tied_to is None and "merge_and_unload()" in q.note
    assert comps["model.layers.2.shared_transformer.self_attn.q_proj"].eligible  # block 1: layer 2 only
    assert comps["model.layers.1.linear"].eligible  # the per-layer projection is not shared
    assert comps["model.layers.3.shared_transformer.self_attn.linear_q_adapter_list.2.0"].eligible


def test_zamba2_adapter_entries_of_other_layers_never_run(tiny_models):
    """Only entry hybrid_layer_ids.index(layer) of each adapter list runs in that layer."""
    model = tiny_models("zamba2")
    comps = {c.name: c for c in find_components(model)}
    live = "model.layers.3.shared_transformer.self_attn.linear_q_adapter_list.2.0"  # layer 3 = hybrid entry 2
    dead = "model.layers.3.shared_transformer.self_attn.linear_q_adapter_list.0.0"
    assert comps[live].lora_effective and comps[live].tied_to is None
    assert not comps[dead].lora_effective and "dead adapter entry" in comps[dead].note
    ran = called_linears(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    assert id(modules[live]) in ran and id(modules[dead]) not in ran


def test_zamba_shared_transformer_not_offered_and_per_layer_linear_attention(tiny_models):
    comps = {c.name: c for c in find_components(tiny_models("zamba"))}
    shared = [c for c in comps.values() if ".shared_transf." in c.name]
    assert shared and not any(c.lora_effective or c.tied_to for c in shared)
    linear = comps["model.layers.3.linear"]
    assert (linear.family, linear.eligible) == ("attention", True)


def peft_trainable(model: torch.nn.Module, components: list[Component], rank: int) -> int:
    """Trainable parameters PEFT creates when every eligible component gets ``rank``.

    ``model_type`` is hidden while injecting: for qwen2_moe/mixtral-pattern model types PEFT rewrites targets
    ending in gate_proj/up_proj/down_proj into expert parameters (see allocator.compat.peft_rewrites).
    """
    from peft import LoraConfig, get_peft_model

    eligible = [c for c in components if c.eligible]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=[c.name for c in eligible if not c.is_parameter] or None,
        target_parameters=[c.name for c in eligible if c.is_parameter] or None,
    )
    model_type, model.config.model_type = model.config.model_type, "allocator_test"
    try:
        peft_model = get_peft_model(model, config)
    finally:
        model.config.model_type = model_type
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_type", HYBRIDS + ["llama", "gpt2"])
def test_peft_trainable_params_equal_the_component_costs(model_type):
    model = build(model_type, meta=True)
    components = find_components(model)
    assert peft_trainable(model, components, 4) == 4 * sum(
        c.n_params_per_rank for c in components if c.eligible
    )


def test_peft_refusal_is_never_offered_even_without_fused_kernels():
    from peft import LoraConfig, get_peft_model

    model = build("falcon_h1", meta=True)
    out_proj = [c for c in find_components(model, fused_kernels=False) if c.name.endswith("mamba.out_proj")]
    assert out_proj and not any(c.eligible for c in out_proj)
    with pytest.raises(ValueError, match="incompatible with Mamba"):
        get_peft_model(model, LoraConfig(target_modules=[out_proj[0].name]))


def test_linears_peft_would_rewrite_are_exported_as_parameters(tiny_models):
    """qwen3_next's shared-expert and dense-MLP gate/up/down linears are exported as '<name>.weight'."""
    from allocator.compat import peft_rewrites

    assert peft_rewrites("qwen3_next", "gate_proj") and peft_rewrites("minimax", "w1")
    assert not peft_rewrites("qwen3_next", "q_proj") and not peft_rewrites("llama", "gate_proj")
    comps = {c.name: c for c in find_components(tiny_models("qwen3_next"))}
    for name in ("model.layers.0.mlp.shared_expert.gate_proj", "model.layers.2.mlp.down_proj"):
        assert comps[name].export_as_parameter and comps[name].peft_name == name + ".weight"
        assert comps[name].eligible and not comps[name].is_parameter  # probed and priced as the linear it is
    assert not comps["model.layers.1.self_attn.q_proj"].export_as_parameter
    assert not any(c.export_as_parameter for c in find_components(tiny_models("qwen3_5_moe")))


@pytest.mark.parametrize(
    "model_type,kinds",
    [
        ("llama", {("attention", "softmax"), ("mlp", "dense")}),
        ("qwen3", {("attention", "softmax"), ("mlp", "dense")}),
        ("mistral", {("attention", "softmax"), ("mlp", "dense")}),
        ("gpt2", {("attention", "softmax"), ("mlp", "dense")}),
        ("mamba", {("recurrent", "mamba")}),
        ("mamba2", {("recurrent", "mamba2")}),
        ("falcon_mamba", {("recurrent", "mamba")}),
    ],
)
def test_pure_transformers_and_pure_ssms_have_one_token_mixer_type(model_type, kinds):
    model = (
        build(model_type, meta=True, num_hidden_layers=2, n_layer=2)
        if model_type == "gpt2"
        else build(model_type, meta=True, num_hidden_layers=2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", AllocatorWarning)
        comps = find_components(model)
    assert {(c.family, c.kind) for c in comps if c.layer is not None} == kinds
    assert {c.layer for c in comps if c.layer is not None} == {0, 1}
    head = [c for c in comps if c.layer is None]
    assert [(c.kind, c.default_target) for c in head] == [("lm_head", False)]


def test_gpt2_conv1d_modules_are_offered_with_input_and_output_sizes():
    comps = {c.name: c for c in find_components(build("gpt2", meta=True, n_layer=1))}
    c_attn = comps["transformer.h.0.attn.c_attn"]
    assert (c_attn.module_class, c_attn.d_in, c_attn.d_out) == ("Conv1D", 64, 192)


class Weird(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)


class Oddball(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Weird()
        self.squeeze = torch.nn.Linear(8, 4)


class ToyLM(torch.nn.Module):
    """No config layer types, no known classes: only the structural rule and 'other' can place its modules."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "toy", "num_hidden_layers": 2})()
        self.blocks = torch.nn.ModuleList([Oddball(), Oddball()])
        self.head = torch.nn.Linear(8, 16)


def test_unknown_modules_fall_back_with_a_warning_naming_each_guess_and_never_crash():
    with pytest.warns(AllocatorWarning) as record:
        comps = {c.name: c for c in find_components(ToyLM())}
    message = str(record[0].message)
    assert "Weird -> attention/softmax (2 modules, e.g. blocks.0.attn.q_proj)" in message
    assert "Oddball -> other/unknown (2 modules, e.g. blocks.0.squeeze)" in message
    assert (comps["blocks.1.attn.q_proj"].layer, comps["blocks.1.attn.q_proj"].family) == (1, "attention")
    assert (comps["blocks.1.squeeze"].layer, comps["blocks.1.squeeze"].family) == (1, "other")
    assert comps["head"].layer is None and not comps["head"].default_target


def test_component_round_trips_through_dict(tiny_models):
    for c in find_components(tiny_models("zamba2"))[:20]:
        assert Component.from_dict(c.to_dict()) == c


class SharedBlocksLM(torch.nn.Module):
    """Layers 0 and 2 run one block object; layers 1 and 3 run distinct blocks whose q_proj share a tensor."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=4)
        same, first, second = Oddball(), Oddball(), Oddball()
        second.attn.q_proj.weight = first.attn.q_proj.weight  # as transformers 5 ties Zamba's shared blocks
        self.blocks = torch.nn.ModuleList([same, first, same, second])

    def forward(self, x):
        for block in self.blocks:
            x = x + block.attn.q_proj(x)
        return x


def _merge_error(model: torch.nn.Module, target: str) -> tuple[float, float]:
    """(max |merged - adapted|, max |adapted - base|) with a random LoRA on ``target``."""
    from peft import LoraConfig, get_peft_model

    x = torch.randn(4, 8)
    base = model(x).detach()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[target]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    adapted = peft_model(x).detach()
    merged = peft_model.merge_and_unload()(x).detach()
    return (merged - adapted).abs().max().item(), (adapted - base).abs().max().item()


def test_shared_weight_in_distinct_modules_is_refused_and_a_shared_module_is_tied():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AllocatorWarning)
        comps = {c.name: c for c in find_components(SharedBlocksLM())}
    assert comps["blocks.0.attn.q_proj"].eligible
    assert comps["blocks.2.attn.q_proj"].tied_to == "blocks.0.attn.q_proj"  # one module: PEFT's wrapper runs
    for name in ("blocks.1.attn.q_proj", "blocks.3.attn.q_proj"):
        assert not comps[name].lora_effective and comps[name].tied_to is None
        assert "merge_and_unload()" in comps[name].note and "layers 1, 3" in comps[name].note
    # what the marks rest on: merging the shared module is exact, merging one of two distinct modules is not
    error, effect = _merge_error(SharedBlocksLM(), "blocks.0.attn.q_proj")
    assert error < 1e-5 * effect
    error, effect = _merge_error(SharedBlocksLM(), "blocks.1.attn.q_proj")
    assert error > 0.1 * effect
