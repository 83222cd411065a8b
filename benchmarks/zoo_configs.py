"""The transformers configs of the reference models (``benchmarks.zoo.RECIPES``): each follows a released
hybrid's config with widths scaled to hidden 128 and fewer layers; docs/reference-models.md says what was kept
and what was not, and why."""

from __future__ import annotations

from typing import Any

VOCAB_SIZE = 2048


def qwen3_5(n_layers: int) -> dict[str, Any]:
    """Qwen3.5-0.8B text config with sizes / 8 (hidden 1024 -> 128) and 3 GatedDeltaNet : 1 attention."""
    return {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 448,  # 3.5 x hidden, as 3584 / 1024
        "num_hidden_layers": n_layers,
        "layer_types": [
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n_layers)
        ],
        "full_attention_interval": 4,
        "num_attention_heads": 8,  # 8 q heads : 2 kv heads, q width 2 x hidden, as released
        "num_key_value_heads": 2,
        "head_dim": 32,
        "attn_output_gate": True,  # q_proj emits query and gate (2 x 8 x 32)
        "linear_num_key_heads": 8,  # GatedDeltaNet: 16 x 128 at 1024 -> 8 x 32 at 128 (key width 2 x hidden)
        "linear_num_value_heads": 8,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
            "mrope_section": [2, 1, 1],  # sums to rotary_dim / 2 = 4 (released: [11, 11, 10] for 32)
        },
        "mamba_ssm_dtype": "float32",
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }


def falcon_h1() -> dict[str, Any]:
    """Falcon-H1-0.5B config with sizes / 8 (hidden 1024 -> 128), 4 layers, neutral muP multipliers."""
    return {
        "architectures": ["FalconH1ForCausalLM"],
        "model_type": "falcon_h1",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,  # 2 x hidden, as 2048 / 1024
        "num_hidden_layers": 4,
        "num_attention_heads": 4,  # 4 q : 1 kv (released 8 : 2)
        "num_key_value_heads": 1,
        "head_dim": 32,
        "mamba_d_ssm": 192,  # 1.5 x hidden, as 1536 / 1024
        "mamba_n_heads": 6,
        "mamba_d_head": 32,
        "mamba_d_state": 32,
        "mamba_n_groups": 1,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 128,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_norm_before_gate": False,
        "mamba_rms_norm": False,
        "mamba_use_mlp": True,
        "attn_layer_indices": None,
        # The released muP multipliers (embedding 5.66, lm_head 0.039, ssm_out 0.236, ...) were tuned for
        # width 1024; at width 128 they stalled pretraining (held-out 7.04 vs 5.67 nats after 100 steps), so
        # the tiny model keeps FalconH1Config's neutral defaults. The multiplier code paths still run.
        "attention_in_multiplier": 1.0,
        "attention_out_multiplier": 1.0,
        "embedding_multiplier": 1.0,
        "key_multiplier": 1.0,
        "lm_head_multiplier": 1.0,
        "mlp_multipliers": [1.0, 1.0],
        "ssm_in_multiplier": 1.0,
        "ssm_multipliers": [1.0, 1.0, 1.0, 1.0, 1.0],
        "ssm_out_multiplier": 1.0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "projectors_bias": False,
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000000000.0},
        "num_logits_to_keep": 1,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }


def granite_moe_hybrid() -> dict[str, Any]:
    """Granite-4.0-H-Tiny config with widths / 12 (hidden 1536 -> 128), its first 6 layers (5 Mamba-2, then
    attention), 8 routed experts top-2 (released 64 top-6) beside the shared MLP in every layer."""
    return {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": "granitemoehybrid",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 32,  # per routed expert (released 512 at 1536)
        "shared_intermediate_size": 64,  # the shared MLP, 2 x an expert's as released (1024 : 512)
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 6,
        "layer_types": ["mamba"] * 5 + ["attention"],  # released: attention at layers 5, 15, 25, 35 of 40
        "num_attention_heads": 4,  # head_dim 32 (released 12 x 128 with 4 KV heads)
        "num_key_value_heads": 2,
        "mamba_n_heads": 8,  # 8 x 32 = 2 x hidden (released 48 x 64)
        "mamba_d_head": 32,
        "mamba_d_state": 32,  # released 128
        "mamba_n_groups": 1,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 128,  # the pretraining rows' length (released 256)
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "position_embedding_type": "nope",  # the H models' attention has no positional encoding
        # The released muP constants are for width 1536 (embedding x12, residual x0.22, logits / 6); like
        # Falcon-H1's they stalled this width's pretraining, so only the attention scale keeps its rule
        # (1 / head_dim, released 1/128): the others are GraniteMoeHybridConfig's neutral 1.0.
        "attention_multiplier": 1 / 32,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        # Switch load-balancing loss in pretraining (Recipe.router_aux_loss); off in every later forward
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }
