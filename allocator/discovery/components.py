"""Stage 1: model -> components.

``find_components(model)`` walks any transformers causal LM and returns one :class:`Component` per module
that could carry a LoRA adapter, labelled by decoder layer, family and kind.

Adaptable call sites: every ``nn.Linear``, transformers' ``Conv1D`` (GPT-2 style; PEFT adapts it with
``fan_in_fan_out``), every 3-D expert parameter (PEFT ``target_parameters``) and the 2-D weight of router
classes that are not ``nn.Linear``. Placement rules live in ``allocator.discovery.classify``; bypass and
refusal tables in ``allocator.discovery.architectures``; ``docs/architectures.md`` explains them per family.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from allocator import compat
from allocator.discovery import architectures as A
from allocator.discovery.classify import Stack, place
from allocator.discovery.component import Component
from allocator.errors import AllocatorWarning


@dataclass(frozen=True)
class _Site:
    """One adaptable call site before classification."""

    name: str
    module_path: str  # the linear itself, or the owner of the parameter
    leaf: str  # attribute name PEFT sees: the module's own name, or the parameter's name
    d_in: int
    d_out: int
    module_class: str
    weight_id: int  # identity of the weight tensor: equal ids are tied call sites
    is_parameter: bool = False
    n_experts: int = 1


def find_components(model: nn.Module, *, fused_kernels: bool = True) -> list[Component]:
    """Every adaptable call site of ``model``, classified and sorted by name.

    Args:
        model: a transformers causal LM, on any device (the meta device is enough).
        fused_kernels: assume training runs the fused CUDA kernels (``mamba_ssm``), so that adapters the fused
            path bypasses (Mamba-2 ``out_proj``, Mamba-1 ``x_proj``/``out_proj``) are not effective. False
            relaxes only those; adapters bypassed on every path or refused by PEFT stay not effective.

    Warns:
        AllocatorWarning: once, naming every class whose modules were placed by the structural fallback.
    """

    config = text_config(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    prefix = find_stack(model, config)
    n_layers = len(modules[prefix]) if prefix else 0
    labels, _ = A.layer_labels(config, n_layers)
    stack = Stack(modules, prefix, labels, A.architecture_for(getattr(config, "model_type", None)),
                  _output_name(model, modules))
    top_type = getattr(getattr(model, "config", None), "model_type", None)
    components, guesses, sites = [], defaultdict(list), list(_sites(modules))
    for site in sites:
        p = place(stack, site.name, site.module_path, site.is_parameter)
        if p.rule in ("structure", "none") or p.kind == "unknown":
            guesses[(p.block_class or site.module_class, p.family, p.kind)].append(site.name)
        note = _not_effective(stack.arch, p.family, p.kind, site, config, p.layer, top_type, fused_kernels)
        components.append(Component(
            name=site.name, layer=p.layer, family=p.family, kind=p.kind, d_in=site.d_in, d_out=site.d_out,
            module_class=site.module_class, lora_effective=note is None, note=note or p.note,
            is_parameter=site.is_parameter, n_experts=site.n_experts, default_target=p.default_target))
    components = _mark_ties(components, [s.weight_id for s in sites], [_slot(modules, s) for s in sites])
    if guesses:
        _warn_guesses(guesses)
    return sorted(peft_exports(components, top_type), key=lambda c: c.name)


def peft_exports(components: Sequence[Component], model_type: str | None) -> list[Component]:
    """``export_as_parameter`` on every ``nn.Linear`` whose ``target_modules`` entry PEFT would rewrite on
    this model type (``allocator.compat.peft_rewrites``: shared-expert and dense-MLP
    ``gate_proj``/``up_proj``/ ``down_proj`` of qwen3_next, qwen3_moe, ...). PEFT adapts ``<name>.weight`` in
    ``target_parameters`` with a ``ParamWrapper``: the same ``lora_A``/``lora_B`` shapes and count, and a
    saved adapter reloads onto the same module."""
    return [replace(c, export_as_parameter=True)
            if not (c.is_parameter or c.export_as_parameter or c.module_class == "Conv1D")
            and compat.peft_rewrites(model_type, c.name.rsplit(".", 1)[-1]) else c
            for c in components]


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """What a plan records of the model it was made for, to refuse another: model_type, decoder layers,
    class."""
    config = text_config(model)
    stack = find_stack(model, config)
    return {"model_type": getattr(config, "model_type", None),
            "n_layers": len(model.get_submodule(stack)) if stack else 0,
            "model_class": type(model).__name__}


def text_config(model: nn.Module) -> Any:
    """The config of the language model (``text_config`` of a composite config); None without a config."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_stack(model: nn.Module, config: Any) -> str | None:
    """Name of the decoder ``ModuleList``: length ``num_hidden_layers``, not in a vision/audio tower,
    shallowest."""

    n = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
              if isinstance(getattr(config, k, None), int)), None)
    aux = re.compile(r"vision|visual|audio|image|img|speech|patch|mtp")
    candidates = [(len(m) != n, bool(aux.search(name)), name.count("."), name)
                  for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and name and len(m) and _layer_like(m)]
    return min(candidates)[3] if candidates else None


def _layer_like(modules: nn.ModuleList) -> bool:

    first = modules[0]
    return not isinstance(first, (nn.Linear, nn.Embedding)) and any(
        isinstance(m, (nn.Linear, Conv1D)) for m in first.modules())


def _sites(modules: dict[str, nn.Module]):


    for name, module in modules.items():
        cls = type(module).__name__
        if _peft_internal(name):
            continue
        if isinstance(module, nn.Linear):
            yield _Site(name, name, name.rsplit(".", 1)[-1], module.in_features, module.out_features, cls,
                        id(module.weight))
        elif isinstance(module, Conv1D):  # weight (d_in, d_out)
            d_in, d_out = module.weight.shape
            yield _Site(name, name, name.rsplit(".", 1)[-1], d_in, d_out, cls, id(module.weight))
        elif "Experts" in cls or A.ROUTER_CLASS.search(cls):
            yield from _parameter_sites(name, module, cls)


def _parameter_sites(name: str, module: nn.Module, cls: str):
    """3-D expert weights (E, d_out, d_in), or (E, d_in, d_out) when ``is_transposed``; 2-D router weights."""
    for pname, param in module.named_parameters(recurse=False):
        if param.dim() == 3 and "Experts" in cls:
            n_experts, a, b = param.shape
            d_in, d_out = (a, b) if getattr(module, "is_transposed", False) else (b, a)
            yield _Site(f"{name}.{pname}", name, pname, d_in, d_out, cls, id(param), True, n_experts)
        elif param.dim() == 2 and pname == "weight" and "Experts" not in cls:
            d_out, d_in = param.shape
            yield _Site(f"{name}.{pname}", name, pname, d_in, d_out, cls, id(param), True)


_PEFT_INTERNAL = re.compile(
    r"(^|\.)(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")


def _peft_internal(name: str) -> bool:
    return bool(_PEFT_INTERNAL.search(name))


def _not_effective(arch, family, kind, site, config, layer, model_type, fused) -> str | None:
    """Why a LoRA on ``site`` would do nothing, or None: dead entry, bypassed forward, PEFT refusal."""

    reasons = [A.dead_entry(config, layer, site.name)]
    if family == "recurrent":
        rules = arch.bypass if arch is not None else A.DEFAULT_BYPASS.get(kind, ())
        for rule in rules:
            if rule.kind == kind and rule.leaf == site.leaf and (rule.when == A.ALWAYS or fused):
                when = (
                    "always" if rule.when == A.ALWAYS else "with fused kernels (--no-fused-kernels relaxes)"
                )
                reasons.append(f"bypassed {when}: {rule.reason}")
    reasons.append(compat.peft_refuses(model_type, site.module_path.rsplit(".", 1)[-1]))
    reasons = [r for r in reasons if r]
    return "; ".join(reasons) if reasons else None


def _mark_ties(
    components: list[Component], weight_ids: list[int], slots: list[tuple[int, str]]
) -> list[Component]:
    """Call sites of one weight tensor (Zamba shared blocks). PEFT wraps the module at the first name it
    meets, and ``merge_and_unload()`` adds the update to the weight tensor itself. Where every effective site
    is in one slot (one module object reached through a shared parent), the wrapper runs at all of them: the
    later ones get ``tied_to`` = the first. Where distinct modules share the tensor (transformers 5's
    Zamba/Zamba2 blocks), a LoRA would run at one call site but a merge would change all of them: none is
    offered."""
    by_name = {c.name: c for c in components}
    order = [c.name for c in components]
    groups: dict[int, list[str]] = defaultdict(list)
    slot_of = dict(zip(order, slots, strict=True))
    for name, wid in zip(order, weight_ids, strict=True):
        groups[wid].append(name)
    for names in groups.values():
        live = [n for n in names if by_name[n].lora_effective]
        if len({slot_of[n] for n in live}) > 1:
            note = _shared_weight_note([by_name[n] for n in live])
            for name in live:
                by_name[name] = replace(by_name[name], lora_effective=False, note=note)
            continue
        for name in live[1:]:
            by_name[name] = replace(
                by_name[name], tied_to=live[0], note=f"shares its module with {live[0]}; adapt it there"
            )
    return [by_name[n] for n in order]


def _shared_weight_note(sites: list[Component]) -> str:
    where = ", ".join(str(c.layer) if c.layer is not None else c.name for c in sites)
    return (
        f"one weight read by distinct modules at layers {where}: PEFT's LoRA would run at one call site, "
        "but merge_and_unload() adds it to the shared weight and so changes every call site; not offered "
        "(adapt an unshared module beside it: Zamba's per-layer `linear`, Zamba2's adapter lists)"
    )


def _slot(modules: dict[str, nn.Module], site: _Site) -> tuple[int, str]:
    """Where PEFT puts its wrapper for ``site``: the object holding the module, and the attribute path below
    it. Call sites in one slot run one wrapper."""
    holder = site.module_path.rpartition(".")[0]
    return id(modules[holder]), site.name[len(holder) + 1 if holder else 0 :]


def _output_name(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, m in modules.items() if out is not None and m is out), None)


def _warn_guesses(guesses: dict) -> None:

    lines = [
        f"{cls} -> {family}/{kind} ({len(names)} modules, e.g. {names[0]})"
        for (cls, family, kind), names in sorted(guesses.items())
    ]
    warnings.warn(
        "find_components placed these modules by name only (no config layer type or known class matched): "
        + "; ".join(lines)
        + ". Check them with `allocate inspect`; to make this go away, add the class to "
        "allocator.discovery.architectures.CLASS_RULES.",
        AllocatorWarning,
        stacklevel=2,
    )
