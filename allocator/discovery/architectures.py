"""Stage 1 rule tables: what each architecture's layers are, and which adapters its forward bypasses.

Data only, plus the small pure functions that read it. ``allocator.discovery.classify`` applies the rules in
order (config layer-type fields, then module class, then structure); ``allocator.discovery.components``
applies the bypass and refusal tables. Every entry cites the transformers 5.24 code it was read from;
``docs/architectures.md`` explains each family. Reference: transformers
``models/<family>/modeling_<family>.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ALWAYS, FUSED = "always", "fused"


@dataclass(frozen=True)
class Bypass:
    """An ``nn.Linear`` of a mixer whose forward reads ``.weight`` directly, so a LoRA on it never runs."""

    kind: str  # mixer kind the rule applies to (mamba, mamba2, ...)
    leaf: str  # attribute name of the linear inside the mixer
    # ALWAYS, or FUSED: only when the fused CUDA kernel path is taken (mamba_ssm installed, training)
    when: str
    reason: str  # the code that bypasses it


@dataclass(frozen=True)
class Architecture:
    """What rule 1 needs beyond the layer labels: the concrete kind of each token-mixer family."""

    recurrent: str | None = None  # kind of the layers labelled linear_attention / mamba / conv / hybrid
    attention: str = "softmax"  # kind of the layers labelled full_attention / sliding_attention
    bypass: tuple[Bypass, ...] = ()
    # linear directly under a layer -> (family, kind)
    extra: dict[str, tuple[str, str]] = field(default_factory=dict)


_MAMBA1_FUSED = ("MambaMixer.forward hands x_proj.weight, dt_proj.weight, out_proj.weight to mamba_inner_fn "
                 "(mamba_ssm, training, no cache)")
_MAMBA1_DT = "forward computes dt_proj.weight @ time_step (the module is never called)"
_MAMBA2_FUSED = (
    "forward hands out_proj.weight to mamba2_split_conv1d_scan_combined (mamba_ssm, training, no cache)"
)

MAMBA1 = (
    Bypass("mamba", "dt_proj", ALWAYS, _MAMBA1_DT),
    Bypass("mamba", "x_proj", FUSED, _MAMBA1_FUSED),
    Bypass("mamba", "out_proj", FUSED, _MAMBA1_FUSED),
)
MAMBA2 = (Bypass("mamba2", "out_proj", FUSED, _MAMBA2_FUSED),)
JAMBA = (Bypass("mamba", "dt_proj", ALWAYS, "JambaMambaMixer.forward computes dt_proj.weight @ time_step"),)
# Zamba: per-layer projection of the shared block's output
_SHARED_LINEAR = {"linear": ("attention", "softmax")}

ARCHITECTURES: dict[str, Architecture] = {
    "qwen3_5": Architecture(recurrent="gated_deltanet"),
    "qwen3_5_moe": Architecture(recurrent="gated_deltanet"),
    "qwen3_next": Architecture(recurrent="gated_deltanet"),
    "olmo_hybrid": Architecture(recurrent="gated_deltanet"),
    "lara_mini": Architecture(recurrent="gated_deltanet"),
    "kimi_linear": Architecture(recurrent="kda", attention="mla"),
    "bailing_hybrid": Architecture(recurrent="kda", attention="mla"),
    "minimax": Architecture(recurrent="lightning"),
    "falcon_h1": Architecture(recurrent="mamba2", bypass=MAMBA2),
    "bamba": Architecture(recurrent="mamba2", bypass=MAMBA2),
    "granitemoehybrid": Architecture(recurrent="mamba2", bypass=MAMBA2),
    "nemotron_h": Architecture(recurrent="mamba2", bypass=MAMBA2),
    "zamba2": Architecture(recurrent="mamba2", bypass=MAMBA2, extra=_SHARED_LINEAR),
    "mamba2": Architecture(recurrent="mamba2", bypass=MAMBA2),
    "jamba": Architecture(recurrent="mamba", bypass=JAMBA),
    "zamba": Architecture(recurrent="mamba", extra=_SHARED_LINEAR),
    "mamba": Architecture(recurrent="mamba", bypass=MAMBA1),
    "falcon_mamba": Architecture(recurrent="mamba", bypass=MAMBA1),
    "recurrent_gemma": Architecture(recurrent="rglru"),
    "lfm2": Architecture(recurrent="short_conv"),
    "lfm2_moe": Architecture(recurrent="short_conv"),
    "lfm3": Architecture(recurrent="short_conv"),
    "xlstm": Architecture(recurrent="mlstm"),
    "rwkv": Architecture(recurrent="rwkv"),
}
# Bypass rules assumed for a mixer kind found in an architecture not listed above.
DEFAULT_BYPASS = {"mamba": MAMBA1, "mamba2": MAMBA2}


def architecture_for(model_type: str | None) -> Architecture | None:
    """The table entry for ``model_type``; ``qwen3_5_text`` and ``qwen3_5`` share one."""
    if not model_type:
        return None
    return ARCHITECTURES.get(model_type) or ARCHITECTURES.get(re.sub(r"_text$", "", model_type))


# Rule 2: class name of the enclosing block -> (family, kind). Ordered: the first match wins, so the specific
# recurrent mixers come before the generic "Attention" and the MoE containers before "MLP".
# kind "mamba?" is resolved by structure: x_proj present -> mamba (Mamba-1), else mamba2.
CLASS_RULES: tuple[tuple[str, str, str], ...] = (
    (r"GatedDeltaNet|GatedDeltaProduct", "recurrent", "gated_deltanet"),
    (r"DeltaAttention|KimiDelta|KDA", "recurrent", "kda"),
    (r"LightningAttention", "recurrent", "lightning"),
    (r"Rglru|RGLRU|RecurrentBlock", "recurrent", "rglru"),
    (r"ShortConv", "recurrent", "short_conv"),
    (r"mLSTM|xLSTMLayer", "recurrent", "mlstm"),
    (r"^Rwkv.*(Attention|TimeMix)", "recurrent", "rwkv"),
    (r"Mamba|Mixer$|SSM$|Ssm$", "recurrent", "mamba?"),
    (r"MLA$|MLA[A-Z_]|LatentAttention", "attention", "mla"),
    (r"Attention|Attn|MoA$", "attention", "softmax"),
    (r"Experts|MoE|Moe$|MoeBlock|SparseMoe|SparseMLP|MoeLayer", "moe", "expert"),
    (r"MLP|Mlp|FeedForward|FFN|Ffn|Intermediate$|(?<!Self)Output$", "mlp", "dense"),
)
# Containers and layer wrappers are looked through when searching the enclosing block.
WRAPPER = re.compile(r"^(ModuleList|ModuleDict|Sequential|ParameterList)$|(Decoder|Hybrid)Layer$")
CHANNEL_ATTRS = frozenset(
    {"mlp", "mlps", "feed_forward", "ffn", "block_sparse_moe", "shared_mlp", "mlp_block", "moe"}
)
SHARED_ATTRS = re.compile(r"^shared_(expert|experts|mlp)$")
ROUTER_CLASS = re.compile(r"Router|Gating|TopkGate|TopKGate|HashRouter")
TOKEN_ATTRS = frozenset(
    {
        "self_attn",
        "attn",
        "attention",
        "self_attention",
        "linear_attn",
        "mamba",
        "mixer",
        "conv",
        "temporal_block",
        "mlstm_layer",
        "token_mixer",
        "cross_attn",
        "encoder_attn",
    }
)
# Linears that decoder-layer classes own directly (OPTDecoderLayer, BartDecoderLayer, XGLMDecoderLayer, ...).
LAYER_DIRECT = {"fc1": ("mlp", "dense"), "fc2": ("mlp", "dense")}
MLA_LEAVES = frozenset({"kv_a_proj_with_mqa", "kv_b_proj", "kv_a_proj"})  # latent (compressed) key/value


def class_rule(class_name: str) -> tuple[str, str] | None:
    """Rule 2 on one class name: (family, kind) of the first matching pattern, or None."""
    for pattern, family, kind in CLASS_RULES:
        if re.search(pattern, class_name):
            return family, kind
    return None


# Rule 3: structural fallback on attribute names along the path (block attribute, then leaf).
STRUCT_RULES: tuple[tuple[str, str, str], ...] = (
    (r"^(in_proj|x_proj|dt_proj)$", "recurrent", "mamba"),
    (
        r"attn|attention|^(q|k|v|o|qkv|kv|query|key|value|c_attn|query_key_value|wqkv|Wqkv)(_proj|_lin)?$",
        "attention",
        "softmax",
    ),
    (
        r"^(mlp|ffn|ff|feed_forward|intermediate|fc\d|fc_in|fc_out|c_fc|w\d|up_proj|down_proj|gate_proj|gate_up_proj"
        r"|dense_h_to_4h|dense_4h_to_h|lin\d|layer_\d)$",
        "mlp",
        "dense",
    ),
)


def structural_rule(path: tuple[str, ...]) -> tuple[str, str] | None:
    """Rule 3: the first STRUCT_RULES pattern matching any attribute in ``path`` (outermost first)."""
    for attr in path:
        for pattern, family, kind in STRUCT_RULES:
            if re.search(pattern, attr):
                return family, kind
    return None


# Rule 1: config fields that label each decoder layer, read in this order (first usable one wins).
LABEL_FIELDS = (
    "layers_block_type",
    "layer_types",
    "hybrid_override_pattern",
    "attn_type_list",
    "block_types",
    "attn_layer_indices",
    "attn_layer_period",
    "full_attn_idxs",
)
_PATTERN_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def layer_labels(config: Any, n_layers: int) -> tuple[tuple[str | None, ...], str | None]:
    """Per-layer labels from the first usable config field, and that field's name; (None, ...), None if
    none."""
    for name in LABEL_FIELDS:
        labels = _labels_from_field(config, name, n_layers)
        if labels is not None and len(labels) == n_layers:
            return tuple(labels), name
    return (None,) * n_layers, None


def _labels_from_field(config: Any, name: str, n: int) -> list[str] | None:
    try:
        value = getattr(config, name, None)
    except Exception:  # a property that cannot be computed for this config
        return None
    if value is None or value == [] or value == "":
        return None
    if name == "hybrid_override_pattern" and isinstance(value, str):
        return [_PATTERN_CHARS.get(c, c) for c in value]
    if name == "attn_type_list":  # MiniMax remote code: 1 softmax, 0 lightning
        return ["full_attention" if int(v) else "linear_attention" for v in value]
    if name == "block_types":  # RecurrentGemma: a pattern repeated over the stack
        return [str(value[i % len(value)]) for i in range(n)]
    if name == "attn_layer_indices":
        return ["full_attention" if i in set(value) else "mamba" for i in range(n)]
    if name == "attn_layer_period":
        offset = getattr(config, "attn_layer_offset", 0) or 0
        return ["full_attention" if i % int(value) == offset else "mamba" for i in range(n)]
    if name == "full_attn_idxs":
        return ["full_attention" if i in set(value) else "conv" for i in range(n)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return None


def label_families(label: str | None) -> tuple[str, ...] | None:
    """Families a layer label announces, in block order; None when the label says nothing usable.

    >>> label_families("linear_attention"), label_families("hybrid"), label_families("moe")
    (('recurrent',), ('attention', 'recurrent'), ('moe',))
    """
    if label is None:
        return None
    low = label.lower()
    if low in ("moe", "sparse", "e"):
        return ("moe",)
    if low in ("mlp", "dense", "-"):
        return ("mlp",)
    if "hybrid" in low:
        return ("attention", "recurrent")
    if re.search(r"linear|mamba|recurrent|conv|ssm|rglru|deltanet|lightning|^m$|^g$", low):
        return ("recurrent",)
    if re.search(r"attention|^attn|^full|^sliding|^global|^local|^\*$", low):
        return ("attention",)
    return None


def dead_entry(config: Any, layer: int | None, name: str) -> str | None:
    """Zamba2 per-layer adapter lists: only entry ``hybrid_layer_ids.index(layer)`` runs in ``layer``.

    ``Zamba2Attention.forward`` / ``Zamba2MLP.forward`` call ``*_adapter_list[layer_dic[layer_idx]]`` only;
    the other non-Identity entries of that block's list are parameters that never execute in this layer.
    """
    match = re.search(r"_adapter_list\.(\d+)(\.|$)", name)
    ids = getattr(config, "hybrid_layer_ids", None)
    if match is None or layer is None or not ids or layer not in ids:
        return None
    live = list(ids).index(layer)
    if int(match.group(1)) == live:
        return None
    return f"dead adapter entry: layer {layer} runs only entry {live} of this list (Zamba2 layer_dic)"


# ---- PEFT's own behaviour ---------------------------------------------------------------------------------
# Every use of PEFT internals in this package is in this section, written against PEFT 0.21.2 and
# transformers 5.24. Each function asks PEFT's own code on a stand-in model (only ``config.model_type`` is
# read), so a newer PEFT's lists are honoured; an ImportError (another PEFT) means "PEFT does not do this".
