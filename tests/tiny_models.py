"""Tiny configs (hidden 64, 2-4 layers) for every hybrid family, each with a layer pattern holding every block
type.

``TINY[model_type]`` are the keyword overrides for ``AutoConfig.for_model``; ``EXPECTED[model_type]`` is the
per-layer set of (family, kind) that ``find_components`` must report for decoder-layer modules. ``PURE_MOE``:
the same for MoE families without a recurrent mixer (mixtral, qwen3_moe, deepseek_v3, gpt_oss).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import probes
from allocator.discovery.components import find_components
from allocator.output.plan import Plan

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GDN = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    head_dim=16,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
MAMBA2 = dict(
    mamba_n_heads=4,
    mamba_d_head=32,
    mamba_n_groups=1,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=16,
)
LIN, FULL = "linear_attention", "full_attention"

TINY: dict[str, dict] = {
    "qwen3_5": dict(GDN, num_hidden_layers=2, layer_types=[LIN, FULL]),
    "qwen3_5_moe": dict(
        GDN, **MOE, shared_expert_intermediate_size=32, num_hidden_layers=2, layer_types=[LIN, FULL]
    ),
    "qwen3_next": dict(
        GDN,
        **MOE,
        shared_expert_intermediate_size=32,
        num_hidden_layers=3,
        layer_types=[LIN, FULL, LIN],
        mlp_only_layers=[2],
    ),
    "olmo_hybrid": dict(GDN, num_hidden_layers=2, layer_types=[LIN, FULL]),
    "falcon_h1": dict(MAMBA2, mamba_d_ssm=128, head_dim=16, num_hidden_layers=2),
    "bamba": dict(MAMBA2, num_hidden_layers=3, attn_layer_indices=[1]),
    "granitemoehybrid": dict(
        MAMBA2,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=64,
        num_hidden_layers=2,
        layer_types=["mamba", "attention"],
    ),
    "nemotron_h": dict(
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=32,
        ssm_state_size=16,
        n_groups=1,
        conv_kernel=4,
        expand=2,
        chunk_size=16,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        hybrid_override_pattern="M*-E",
        num_hidden_layers=4,
    ),
    "jamba": dict(
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
    ),
    "zamba": dict(
        num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        attention_head_dim=32,
        n_mamba_heads=2,
        mamba_d_state=8,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
    ),
    "zamba2": dict(
        num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "hybrid", "hybrid"],
        num_mem_blocks=2,
        mamba_d_state=8,
        mamba_headdim=16,
        n_mamba_heads=8,
        use_shared_attention_adapter=True,
        num_key_value_heads=4,
        adapter_rank=4,
        use_mamba_kernels=False,
    ),
    "mamba": dict(num_hidden_layers=2, state_size=8, time_step_rank=8, use_mambapy=False),
    "mamba2": dict(
        num_hidden_layers=2, num_heads=4, head_dim=32, state_size=16, n_groups=1, chunk_size=16, expand=2
    ),
    "falcon_mamba": dict(num_hidden_layers=2, state_size=8, time_step_rank=8),
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", FULL], block_auto_adjust_ff_dim=False),
    "lfm2_moe": dict(
        num_hidden_layers=3,
        layer_types=["conv", FULL, "conv"],
        num_dense_layers=1,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    ),
    "kimi_linear": dict(
        MLA,
        num_hidden_layers=2,
        layer_types=[LIN, FULL],
        mlp_layer_types=["dense", "sparse"],
        num_local_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        linear_head_dim=16,
        linear_num_heads=4,
        linear_conv_kernel_dim=4,
    ),
    "bailing_hybrid": dict(
        MLA,
        num_hidden_layers=2,
        layer_types=[LIN, FULL],
        mlp_layer_types=["dense", "sparse"],
        num_local_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        head_dim=16,
        num_mtp_layers=0,
    ),
    "minimax": dict(
        num_hidden_layers=2,
        layer_types=[LIN, FULL],
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=16,
    ),
    "recurrent_gemma": dict(
        num_hidden_layers=3,
        block_types=["recurrent", "recurrent", "attention"],
        lru_width=64,
        attention_window_size=16,
        conv1d_width=4,
    ),
}

# MoE families without a recurrent mixer (not hybrids): overrides for ``build``
PURE_MOE: dict[str, dict] = {
    "mixtral": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen3_moe": dict(
        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16
    ),
    # MLA attention as DeepSeek-V3 ships it (num_key_value_heads == num_attention_heads); layer 0 dense
    "deepseek_v3": dict(
        MLA,
        num_hidden_layers=2,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
    # transposed (E, d_in, d_out) experts with biases, gate and up interleaved in gate_up_proj
    "gpt_oss": dict(
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
A, R = "attention", "recurrent"
MLP = ("mlp", "dense")
EXPERT, SHARED, ROUTER = ("moe", "expert"), ("moe", "shared_expert"), ("moe", "router")
EXPECTED: dict[str, list[set]] = {
    "qwen3_5": [{(R, "gated_deltanet"), MLP}, {(A, "softmax"), MLP}],
    "qwen3_5_moe": [
        {(R, "gated_deltanet"), EXPERT, SHARED, ROUTER},
        {(A, "softmax"), EXPERT, SHARED, ROUTER},
    ],
    "qwen3_next": [
        {(R, "gated_deltanet"), EXPERT, SHARED, ROUTER},
        {(A, "softmax"), EXPERT, SHARED, ROUTER},
        {(R, "gated_deltanet"), MLP},
    ],
    "olmo_hybrid": [{(R, "gated_deltanet"), MLP}, {(A, "softmax"), MLP}],
    "falcon_h1": [{(A, "softmax"), (R, "mamba2"), MLP}] * 2,
    "bamba": [{(R, "mamba2"), MLP}, {(A, "softmax"), MLP}, {(R, "mamba2"), MLP}],
    "granitemoehybrid": [{(R, "mamba2"), EXPERT, SHARED, ROUTER}, {(A, "softmax"), EXPERT, SHARED, ROUTER}],
    "nemotron_h": [{(R, "mamba2")}, {(A, "softmax")}, {MLP}, {EXPERT, SHARED, ROUTER}],
    "jamba": [
        {(R, "mamba"), MLP},
        {(A, "softmax"), EXPERT, ROUTER},
        {(R, "mamba"), MLP},
        {(A, "softmax"), EXPERT, ROUTER},
    ],
    "zamba": [
        {(R, "mamba")},
        {(R, "mamba"), (A, "softmax"), MLP},
        {(R, "mamba")},
        {(R, "mamba"), (A, "softmax"), MLP},
    ],
    "zamba2": [{(R, "mamba2")}] + [{(R, "mamba2"), (A, "softmax"), MLP}] * 3,
    "mamba": [{(R, "mamba")}] * 2,
    "mamba2": [{(R, "mamba2")}] * 2,
    "falcon_mamba": [{(R, "mamba")}] * 2,
    "lfm2": [{(R, "short_conv"), MLP}, {(A, "softmax"), MLP}],
    "lfm2_moe": [
        {(R, "short_conv"), MLP},
        {(A, "softmax"), EXPERT, ROUTER},
        {(R, "short_conv"), EXPERT, ROUTER},
    ],
    "kimi_linear": [{(R, "kda"), MLP}, {(A, "mla"), EXPERT, SHARED, ROUTER}],
    "bailing_hybrid": [{(R, "kda"), MLP}, {(A, "mla"), EXPERT, SHARED, ROUTER}],
    "minimax": [{(R, "lightning"), EXPERT, ROUTER}, {(A, "softmax"), EXPERT, ROUTER}],
    "recurrent_gemma": [{(R, "rglru"), MLP}, {(R, "rglru"), MLP}, {(A, "softmax"), MLP}],
}


def tiny_config(model_type: str, **overrides):
    """The tiny config (``TINY`` or ``PURE_MOE``); composite model types (qwen3_5) get the overrides on their
    text config."""
    kwargs = dict(COMMON, **TINY.get(model_type, PURE_MOE.get(model_type, {})))
    kwargs.update(overrides)
    text_type = f"{model_type}_text"
    return AutoConfig.for_model(text_type if text_type in CONFIG_MAPPING else model_type, **kwargs)


def build(model_type: str, meta: bool = False, max_params: int = 5_000_000, **overrides):
    """A random-init model on CPU (or on the meta device); refuses anything that is not tiny."""
    config = tiny_config(model_type, **overrides)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if meta:
        return skeleton
    n_params = sum(p.numel() for p in skeleton.parameters())
    if n_params > max_params:
        raise ValueError(f"{model_type}: tiny config still has {n_params} parameters")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def called_linears(model, input_ids=None) -> set[int]:
    """ids of the modules that ran in one training-mode forward on CPU (the non-fused path)."""
    seen: set[int] = set()
    hooks = [
        m.register_forward_hook(lambda mod, i, o: seen.add(id(mod)))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    model.train()
    try:
        model(input_ids if input_ids is not None else torch.randint(0, 128, (1, 8)))
    finally:
        for h in hooks:
            h.remove()
    return seen


def uneven_plan(folder, corpus_file, init: str, samples: int):
    """(model, calibration batches, plan) of a saved tiny model: ranks 1, 2, 4, 0 in turn over its eligible
    linears (uneven, some skipped), lora_A init ``init``, ``samples`` rows of 32 tokens from ``corpus_file``
    in micro-batches of 4."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batches = probes.load_batches(str(corpus_file), tokenizer, seq_len=32, samples=samples, batch_size=4)
    eligible = [c for c in find_components(model) if c.eligible and not c.is_parameter]
    ranks = {c.name: (1, 2, 4, 0)[i % 4] for i, c in enumerate(eligible)}
    plan = Plan(model_id=str(folder), components=tuple(find_components(model)), ranks=ranks, budget=10**9,
                init=init)
    return model, batches, plan
