"""`allocate inspect`, the gathering half: model -> :class:`InspectReport` (rows of numbers, no formatting).

Builds the model on the meta device
(``allocator.discovery.modelio.load_skeleton``) unless a model object is given, runs ``find_components`` and
groups the result: per decoder layer x (family, kind), per (family, kind), what is not effective and why,
which call sites are tied. ``allocator.commands.inspect`` only prints it. Cost of one rank unit of a group: Σ
n_params_per_rank = Σ n_experts·(d_in + d_out) over its eligible modules.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from allocator.discovery import architectures as A
from allocator.discovery.component import FAMILIES, Component
from allocator.discovery.components import find_components, find_stack, text_config
from allocator.discovery.modelio import count_base_params, load_skeleton
from allocator.errors import AllocatorWarning


@dataclass(frozen=True)
class InspectReport:
    model: str  # the reference as given (hub id, folder, config path)
    architecture: str  # class of the built model
    model_type: str
    n_layers: int
    layer_field: str | None  # config field whose labels typed the layers (rule 1), None if none
    n_base_params: int
    fused_kernels: bool
    components: tuple[Component, ...]
    warnings: tuple[str, ...] = ()

    @property
    def eligible(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.eligible)

    def kinds(self) -> list[tuple[str, str]]:
        """(family, kind) pairs of the eligible components, in FAMILIES order."""
        pairs = {(c.family, c.kind) for c in self.eligible}
        return sorted(pairs, key=lambda fk: (FAMILIES.index(fk[0]), fk[1]))

    def per_layer(self) -> list[dict[str, Any]]:
        """One row per decoder layer: {"layer", "cells": {"family/kind": [n_modules, params_per_rank]}}."""
        cells: dict[int, dict[str, list[int]]] = defaultdict(dict)
        for c in self.eligible:
            if c.layer is not None:
                cell = cells[c.layer].setdefault(f"{c.family}/{c.kind}", [0, 0])
                cell[0] += 1
                cell[1] += c.n_params_per_rank
        return [{"layer": i, "cells": cells.get(i, {})} for i in range(self.n_layers)]

    def per_kind(self) -> list[dict[str, Any]]:
        """One row per (family, kind): layers touched, modules, LoRA parameters per rank unit."""
        rows = []
        for family, kind in self.kinds():
            group = [c for c in self.eligible if (c.family, c.kind) == (family, kind)]
            rows.append({"family": family, "kind": kind, "n_layers": len({c.layer for c in group}),
                         "n_modules": len(group), "params_per_rank": sum(c.n_params_per_rank for c in group)})
        return rows

    def totals(self) -> dict[str, int]:
        return {"n_components": len(self.components), "n_eligible": len(self.eligible),
                "params_per_rank": sum(c.n_params_per_rank for c in self.eligible),
                "n_not_effective": sum(not c.lora_effective for c in self.components),
                "n_tied": sum(c.tied_to is not None for c in self.components),
                "n_not_default": sum(c.lora_effective and c.tied_to is None and not c.default_target
                                     for c in self.components)}

    def experts(self) -> list[dict[str, Any]]:
        """Routed 3-D expert parameters grouped by leaf and shape: layers, experts, d_in, d_out, LoRA
        parameters per rank unit in one layer (n_experts * (d_in + d_out)) and over all its layers."""
        groups: dict[tuple, list[Component]] = defaultdict(list)
        for c in self.eligible:
            if c.is_parameter and c.kind == "expert":
                groups[(c.name.rsplit(".", 1)[-1], c.n_experts, c.d_in, c.d_out)].append(c)
        return [{"leaf": leaf, "n_layers": len(group), "n_experts": e, "d_in": d_in, "d_out": d_out,
                 "per_layer": group[0].n_params_per_rank,
                 "params_per_rank": sum(c.n_params_per_rank for c in group)}
                for (leaf, e, d_in, d_out), group in sorted(groups.items())]

    def not_effective(self) -> list[dict[str, Any]]:
        """Not-effective modules grouped by name pattern (layer numbers as *) and reason."""
        return _grouped([c for c in self.components if not c.lora_effective])

    def not_default(self) -> list[dict[str, Any]]:
        """Effective, untied modules left out unless asked for (lm_head, routers, modules outside the
        stack)."""
        return _grouped([c for c in self.components if c.lora_effective and c.tied_to is None
                         and not c.default_target])

    def tied(self) -> list[dict[str, Any]]:
        return _grouped([c for c in self.components if c.tied_to is not None])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "layer_field": self.layer_field,
            "n_base_params": self.n_base_params,
            "fused_kernels": self.fused_kernels,
            "totals": self.totals(),
            "per_kind": self.per_kind(),
            "per_layer": self.per_layer(),
            "experts": self.experts(),
            "not_effective": self.not_effective(),
            "tied": self.tied(),
            "not_default": self.not_default(),
            "warnings": list(self.warnings),
            "components": [c.to_dict() for c in self.components],
        }


def inspect_model(
    model: Any,
    *,
    fused_kernels: bool = True,
    trust_remote_code: bool = False,
    name: str | None = None,
    revision: str | None = None,
) -> InspectReport:
    """Gather the report for ``model``: a hub id (at ``revision``), folder, config.json path, or an already
    built model."""

    is_ref = isinstance(model, str) or hasattr(model, "__fspath__")
    built = load_skeleton(model, trust_remote_code, revision) if is_ref else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AllocatorWarning)
        components = find_components(built, fused_kernels=fused_kernels)
    messages = tuple(str(w.message) for w in caught if issubclass(w.category, AllocatorWarning))
    config = text_config(built)
    stack = find_stack(built, config)
    n_layers = len(built.get_submodule(stack)) if stack else 0
    return InspectReport(
        model=name or (str(model) if is_ref else type(built).__name__),
        architecture=type(built).__name__,
        model_type=str(getattr(config, "model_type", "")),
        n_layers=n_layers,
        layer_field=A.layer_labels(config, n_layers)[1],
        n_base_params=count_base_params(built),
        fused_kernels=fused_kernels,
        components=tuple(components),
        warnings=messages,
    )


def _grouped(components: list[Component]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Component]] = defaultdict(list)
    for c in components:
        groups[(re.sub(r"\.\d+(?=\.|$)", ".*", c.name), re.sub(r"\b\d+\b", "*", c.note))].append(c)
    return [
        {
            "pattern": pattern,
            "reason": reason,
            "n_modules": len(group),
            "family": group[0].family,
            "kind": group[0].kind,
            "params_per_rank": sum(c.n_params_per_rank for c in group),
        }
        for (pattern, reason), group in sorted(groups.items())
    ]
