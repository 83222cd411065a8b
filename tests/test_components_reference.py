"""Meta-device builds of the published configs reproduce the placement study's LoRA counts and the config's
layout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from allocator.discovery.components import find_components
from allocator.discovery.modelio import load_skeleton

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
RANK = 16


def lora_count(components, *, layer_kind, leaves=None, rank=RANK) -> int:
    return rank * sum(
        c.n_params_per_rank
        for c in components
        if c.eligible
        and (c.family, c.kind) == layer_kind
        and (leaves is None or c.name.rsplit(".", 1)[-1] in leaves)
    )


@pytest.fixture(scope="module")
def qwen():
    return find_components(load_skeleton(CONFIGS / "qwen3_5__Qwen__Qwen3.5-0.8B.RECONSTRUCTED.json"))


@pytest.fixture(scope="module")
def falcon():
    return find_components(load_skeleton(CONFIGS / "falcon_h1__tiiuae__Falcon-H1-0.5B.RECONSTRUCTED.json"))


def test_qwen3_5_0_8b_attention_lora_count_matches_study(qwen):
    """q, k, v, o in the 6 full-attention layers (q_proj doubled by attn_output_gate)."""
    assert lora_count(qwen, layer_kind=("attention", "softmax")) == 1_081_344
    assert len({c.layer for c in qwen if c.kind == "softmax"}) == 6


def test_qwen3_5_0_8b_gated_deltanet_lora_count_matches_study(qwen):
    """in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj in the 18 linear-attention layers."""
    assert lora_count(qwen, layer_kind=("recurrent", "gated_deltanet")) == 4_432_896
    assert {c.name.rsplit(".", 1)[-1] for c in qwen if c.kind == "gated_deltanet"} == {
        "in_proj_qkv",
        "in_proj_z",
        "in_proj_b",
        "in_proj_a",
        "out_proj",
    }
    assert len({c.layer for c in qwen if c.kind == "gated_deltanet"}) == 18


def test_qwen3_5_0_8b_mlp_lora_count_matches_study(qwen):
    assert lora_count(qwen, layer_kind=("mlp", "dense")) == 5_308_416


def test_falcon_h1_0_5b_attention_qkv_lora_count_matches_study(falcon):
    """The study counts q, k, v only; o_proj (36 x 512->1024) is offered too and adds 884,736 at r16."""
    assert (
        lora_count(falcon, layer_kind=("attention", "softmax"), leaves={"q_proj", "k_proj", "v_proj"})
        == 2_211_840
    )
    assert lora_count(falcon, layer_kind=("attention", "softmax"), leaves={"o_proj"}) == 884_736


def test_falcon_h1_0_5b_mamba_in_proj_lora_count_matches_study(falcon):
    """in_proj is the only effective Mamba-2 linear: out_proj is fused-bypassed and refused by PEFT."""
    assert lora_count(falcon, layer_kind=("recurrent", "mamba2")) == 2_520_576
    out_proj = [c for c in falcon if c.name.endswith("mamba.out_proj")]
    assert len(out_proj) == 36 and not any(c.eligible for c in out_proj)
    relaxed = [
        c
        for c in find_components(
            load_skeleton(CONFIGS / "falcon_h1__tiiuae__Falcon-H1-0.5B.RECONSTRUCTED.json"),
            fused_kernels=False,
        )
        if c.name.endswith("mamba.out_proj")
    ]
    assert not any(c.eligible for c in relaxed) and all("PEFT refuses" in c.note for c in relaxed)


def test_falcon_h1_0_5b_mlp_lora_count_matches_study(falcon):
    assert lora_count(falcon, layer_kind=("mlp", "dense")) == 5_308_416


@pytest.mark.parametrize(
    "filename,field,expected",
    [
        (
            "nemotron_h__nvidia__Nemotron-H-56B-Base-8K.json",
            "hybrid_override_pattern",
            {"M": ("recurrent", "mamba2"), "*": ("attention", "softmax"), "-": ("mlp", "dense")},
        ),
        (
            "nemotron_h__nvidia__NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json",
            "hybrid_override_pattern",
            {"M": ("recurrent", "mamba2"), "*": ("attention", "softmax"), "E": ("moe", "expert")},
        ),
    ],
)
def test_nemotron_h_real_configs_follow_the_pattern_string(filename, field, expected):
    import json

    pattern = json.loads((CONFIGS / filename).read_text())[field]
    comps = find_components(load_skeleton(CONFIGS / filename))
    for layer, char in enumerate(pattern):
        kinds = {
            (c.family, c.kind)
            for c in comps
            if c.layer == layer and c.kind not in ("router", "shared_expert")
        }
        assert kinds == {expected[char]}, (layer, char, kinds)


@pytest.mark.parametrize(
    "filename,linear,full",
    [
        ("kimi_linear__moonshotai__Kimi-Linear-48B-A3B-Instruct.RECONSTRUCTED.json", "kda", "mla"),
        ("minimax__MiniMaxAI__MiniMax-Text-01.CONVERTED.json", "lightning", "softmax"),
        ("qwen3_next__Qwen__Qwen3-Next-80B-A3B-Thinking.json", "gated_deltanet", "softmax"),
        ("qwen3_5_moe__Qwen__Qwen3.5-35B-A3B.json", "gated_deltanet", "softmax"),
        ("bamba__ibm-fms__Bamba-9B.json", "mamba2", "softmax"),
        ("jamba__ai21labs__Jamba-v0.1.json", "mamba", "softmax"),
        ("recurrent_gemma__google__recurrentgemma-2b-it.MIRROR.json", "rglru", "softmax"),
        ("lfm2__LiquidAI__LFM2-350M.MIRROR.json", "short_conv", "softmax"),
    ],
)
def test_real_configs_token_mixer_of_every_layer_follows_layer_types(filename, linear, full):
    model = load_skeleton(CONFIGS / filename)
    config = model.config.get_text_config()
    comps = find_components(model)
    for layer, label in enumerate(config.layer_types):
        mixers = {c.kind for c in comps if c.layer == layer and c.family in ("attention", "recurrent")}
        assert mixers == {full if label in ("full_attention", "sliding_attention") else linear}, (
            layer,
            label,
        )


def test_50b_config_builds_and_classifies_in_seconds():
    start = time.perf_counter()
    model = load_skeleton(CONFIGS / "jamba__ai21labs__Jamba-v0.1.json")
    comps = find_components(model)
    assert time.perf_counter() - start < 10
    assert sum(p.numel() for p in model.parameters()) > 50e9 and len(comps) == 225
