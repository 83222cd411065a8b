"""Stage 1, placement: decoder layer, family and kind of one adaptable call site, by ordered rules.

Input: the model's module table, its decoder stack and the per-layer labels from its config. Output: a
:class:`Placement`. Rules, first match wins (tables in ``allocator.discovery.architectures``):

1. **config**: the layer's label (``layers_block_type``, ``layer_types``, ``hybrid_override_pattern``, ...)
   names the token mixer of that layer (for nemotron_h, the whole block). The architecture table gives its
   kind.
2. **class**: the class of the enclosing block (``Qwen3_5GatedDeltaNet``, ``FalconH1Mixer``,
   ``...SparseMoeBlock``), or of the experts it holds, decides channel mixers and everything rule 1 leaves
   open.
3. **structure**: attribute names along the path (``q_proj``, ``mlp``, ``in_proj``, ...). Each such guess is
   reported back so that ``find_components`` can warn about it. Anything still unplaced is family ``other``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from allocator.discovery import architectures as A

TOKEN_FAMILIES = ("attention", "recurrent")


@dataclass(frozen=True)
class Placement:
    layer: int | None
    family: str
    kind: str
    rule: str  # config | class | structure | arch | outside | none
    block_class: str | None = None
    default_target: bool = True
    note: str = ""


@dataclass
class Stack:
    """What placement needs to know about the model, built once per ``find_components`` call."""

    modules: dict[str, nn.Module]  # every name -> module, duplicates included
    prefix: str | None  # name of the decoder ModuleList, e.g. "model.layers"
    labels: tuple[str | None, ...]
    arch: A.Architecture | None
    output_name: str | None = None  # the lm_head's name


def place(stack: Stack, name: str, module_path: str, is_parameter: bool) -> Placement:
    """Placement of call site ``name``: the linear at ``module_path``, or a parameter owned by it."""
    rel = _relative(stack.prefix, module_path)
    if rel is None:
        kind = "lm_head" if name == stack.output_name else "outside"
        return Placement(None, "other", kind, "outside", default_target=False,
                         note="outside the decoder stack; not targeted unless asked for")
    layer, attrs = rel
    if not attrs:  # a parameter owned by the layer module itself
        return Placement(layer, "other", "unknown", "none", note="no rule placed this module; family 'other'")
    chain_attrs = attrs if is_parameter else attrs[:-1]
    chain = [
        (a, stack.modules[_join(stack.prefix, layer, chain_attrs[: i + 1])])
        for i, a in enumerate(chain_attrs)
    ]
    chain = [(a, m) for a, m in chain if not A.WRAPPER.search(type(m).__name__)]
    layer_module = stack.modules[f"{stack.prefix}.{layer}"]
    return _place_in_layer(stack, layer, layer_module, chain, attrs, is_parameter)


def _place_in_layer(
    stack: Stack, layer: int, layer_module: nn.Module, chain: list, attrs: tuple, is_param: bool
):
    if not chain:  # a linear directly under the layer: the layer class's own projection
        if stack.arch and attrs[-1] in stack.arch.extra:
            return Placement(layer, *stack.arch.extra[attrs[-1]], "arch", type(layer_module).__name__)
        if attrs[-1] in A.LAYER_DIRECT:
            return Placement(layer, *A.LAYER_DIRECT[attrs[-1]], "class", type(layer_module).__name__)
        return _structural(layer, attrs, type(layer_module).__name__)
    block_attr, block = chain[0]
    below = tuple(a for a, _ in chain[1:]) + (attrs[-1],)
    by_config = _rule_config(stack, layer, block_attr, block)
    by_class = _rule_class(chain)
    if by_config is not None:
        family, kind, rule = *by_config, "config"
        if kind is None:  # rule 1 knows the family only: take the kind from the class if it agrees
            kind = by_class[1] if by_class and by_class[0] == family else None
    elif by_class is not None:
        family, kind, rule = *by_class, "class"
    else:
        return _structural(layer, attrs, type(block).__name__)
    if kind is None:
        return Placement(
            layer,
            family,
            "unknown",
            "config",
            type(block).__name__,
            note=f"layer label says {family}, no known class names the kind",
        )
    return _refine(layer, family, kind, rule, chain, below, layer_module, is_param)


def _rule_config(stack: Stack, layer: int, block_attr: str, block: nn.Module):
    """Rule 1: (family, kind or None) from the layer label, or None when the label does not decide."""
    families = A.label_families(stack.labels[layer])
    if not families:
        return None
    # the label names the whole block (nemotron_h), unless it is a token mixer
    if families[0] in ("moe", "mlp"):
        if _is_token(block_attr, block) and not _is_channel(block_attr, block):
            return None
        family = families[0]
    elif _is_channel(block_attr, block) or not _is_token(block_attr, block):
        return None
    elif len(families) == 1:
        family = families[0]
    else:  # "hybrid": two token mixers in one layer; the class says which one this block is
        by_class = A.class_rule(type(block).__name__)
        if by_class is None or by_class[0] not in families:
            return None
        family = by_class[0]
    arch = stack.arch
    if arch is not None and family == "recurrent" and arch.recurrent:
        return family, arch.recurrent
    if arch is not None and family == "attention":
        return family, arch.attention
    return family, ("dense" if family == "mlp" else "expert" if family == "moe" else None)


def _rule_class(chain: list) -> tuple[str, str] | None:
    """Rule 2: the first block in the chain (outermost first) whose class, or whose experts, is known."""
    for _, module in chain:
        found = A.class_rule(type(module).__name__)
        if (found is None or found[0] in ("mlp", "moe")) and _holds_experts(module):
            return "moe", "expert"
        if found is not None:
            return found
    return None


def _structural(layer: int, attrs: tuple, block_class: str | None) -> Placement:
    found = A.structural_rule(attrs)
    if found is None:
        return Placement(
            layer, "other", "unknown", "none", block_class, note="no rule placed this module; family 'other'"
        )
    return Placement(
        layer, *found, "structure", block_class, note=f"guessed from the name '{'.'.join(attrs)}'"
    )


def _refine(layer, family, kind, rule, chain, below, layer_module, is_param) -> Placement:
    """Sub-kinds: expert / shared_expert / router inside MoE, mla attention, Mamba-1 vs Mamba-2."""
    block_attr, block = chain[0]
    cls = type(block).__name__
    if (
        family == "mlp"
        and block_attr in ("shared_mlp", "shared_expert", "shared_experts")
        and _layer_has_moe(layer_module)
    ):
        return Placement(layer, "moe", "shared_expert", rule, cls)
    if family == "moe":
        if any(A.SHARED_ATTRS.search(a) for a in (block_attr, *below)):
            return Placement(layer, "moe", "shared_expert", rule, cls)
        owner = type(chain[-1][1]).__name__
        if (is_param and "Experts" in owner) or (not is_param and "experts" in below):
            return Placement(layer, "moe", "expert", rule, cls)
        return Placement(
            layer,
            "moe",
            "router",
            rule,
            cls,
            default_target=False,
            note="router/gate: excluded unless asked for (it picks each token's experts: a LoRA here "
            "moves tokens between experts and unsettles the load balance the model was trained with)",
        )
    if family == "attention" and kind == "softmax" and _has_leaf(block, A.MLA_LEAVES):
        kind = "mla"
    if kind == "mamba?":
        kind = "mamba" if hasattr(block, "x_proj") or hasattr(block, "x_proj_weight") else "mamba2"
    return Placement(layer, family, kind, rule, cls)


def _is_channel(attr: str, module: nn.Module) -> bool:
    found = A.class_rule(type(module).__name__)
    return (
        attr in A.CHANNEL_ATTRS
        or (found is not None and found[0] in ("mlp", "moe"))
        or _holds_experts(module)
    )


def _is_token(attr: str, module: nn.Module) -> bool:
    found = A.class_rule(type(module).__name__)
    return attr in A.TOKEN_ATTRS or (found is not None and found[0] in TOKEN_FAMILIES)


def _holds_experts(module: nn.Module) -> bool:
    for name, sub in module.named_modules():
        if "Experts" in type(sub).__name__ or (
            name.rsplit(".", 1)[-1] == "experts" and isinstance(sub, nn.ModuleList)
        ):
            return True
    return False


def _layer_has_moe(layer_module: nn.Module) -> bool:
    return any(_holds_experts(child) for child in layer_module.children())


def _has_leaf(module: nn.Module, leaves: frozenset) -> bool:
    return any(name in leaves for name, _ in module.named_children())


def _relative(prefix: str | None, module_path: str) -> tuple[int, tuple[str, ...]] | None:
    """(layer index, attribute path inside the layer) or None outside the stack."""
    if prefix is None or not module_path.startswith(prefix + "."):
        return None
    index, _, rest = module_path[len(prefix) + 1 :].partition(".")
    if not index.isdigit():
        return None
    return int(index), tuple(rest.split(".")) if rest else ()


def _join(prefix: str | None, layer: int, attrs: tuple[str, ...]) -> str:
    return ".".join([f"{prefix}.{layer}", *attrs])
