"""Stage 1, routed experts: their layout per 3-D parameter, and the checks and warnings that name them.

transformers (>= 5) stores the routed experts of every MoE family it ships as 3-D parameters of one
``*Experts`` module per layer: ``gate_up_proj`` (gate and up fused) or ``up_proj`` (no gate: nemotron_h),
and ``down_proj``, of shape (E, d_out, d_in), or (E, d_in, d_out) with ``is_transposed`` (gpt_oss). PEFT
(>= 0.17) adapts such a parameter through ``target_parameters`` with a ``lora.ParamWrapper`` whose
``lora_A`` is (r·E, d_in) and ``lora_B`` (d_out, r·E): every expert its own rank-r pair, r·E·(d_in + d_out)
parameters, the cost ``allocator.solver.budget.lora_params(d_in, d_out, r, n_experts=E)`` counts.

Remote-code models (and transformers < 5) keep experts as an ``nn.ModuleList`` of MLPs with ``nn.Linear``
projections; those are ordinary ``target_modules``. :func:`check_expert_targets` turns a plan made for one
storage and applied to the other into one message that says which to use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from allocator.discovery.component import Component

LAYOUT_ATTRS = ("has_gate", "has_bias", "is_transposed")  # transformers' use_experts_implementation


@dataclass(frozen=True)
class ExpertLayout:
    """One 3-D routed-expert parameter as PEFT adapts it."""

    name: str
    layer: int | None
    n_experts: int
    d_in: int
    d_out: int
    fused_gate_up: bool  # gate and up projections in one parameter (d_out = 2 x intermediate)
    known: bool  # the owner declares transformers' experts layout (probes can run it expert by expert)

    @property
    def n_params_per_rank(self) -> int:
        return self.n_experts * (self.d_in + self.d_out)


def expert_layouts(model: nn.Module, components: Sequence[Component]) -> list[ExpertLayout]:
    """The layout of every routed-expert component of ``model`` (from ``find_components``), by name."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out = []
    for c in components:
        if not (c.is_parameter and c.kind == "expert"):
            continue
        owner = modules.get(c.name.rpartition(".")[0])
        out.append(
            ExpertLayout(
                c.name,
                c.layer,
                c.n_experts,
                c.d_in,
                c.d_out,
                c.name.endswith("gate_up_proj"),
                owner is not None and all(hasattr(owner, a) for a in LAYOUT_ATTRS),
            )
        )
    return out


def per_layer(layouts: Sequence[ExpertLayout]) -> dict[int | None, tuple[int, int]]:
    """``{layer: (experts, LoRA parameters per rank unit over that layer's expert parameters)}``."""
    rows: dict[int | None, tuple[int, int]] = {}
    for lay in layouts:
        n, cost = rows.get(lay.layer, (0, 0))
        rows[lay.layer] = (max(n, lay.n_experts), cost + lay.n_params_per_rank)
    return rows


_LINEAR_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def check_expert_targets(
    model: nn.Module, names: Sequence[str], is_parameter: Mapping[str, bool]
) -> str | None:
    """Why the planned expert targets ``names`` do not exist on ``model`` in the form planned, or None.

    A 3-D parameter planned (``target_parameters``) where ``model`` holds an ``nn.ModuleList`` of linear
    experts, or a per-expert linear planned (``target_modules``) where ``model`` holds 3-D expert weights.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name in names:
        if is_parameter.get(name) and name not in modules:
            owner = modules.get(name.rpartition(".")[0])
            if isinstance(owner, nn.ModuleList):
                return (
                    f"the plan adapts {name} as a 3-D expert parameter (target_parameters), but this "
                    f"{model_type!r} model ({type(model).__name__}) keeps its experts as an "
                    "nn.ModuleList of nn.Linear modules; adapt them with target_modules: make the plan on "
                    "this model with `allocate` (or load it with transformers >= 5 without "
                    "trust_remote_code, which stores experts as 3-D parameters)"
                )
        match = _LINEAR_EXPERT.search(name)
        if not is_parameter.get(name) and match and name not in modules:
            owner_name = name[: match.start()] + ".experts"
            owner = modules.get(owner_name)
            if owner is not None and any(p.dim() == 3 for p in owner.parameters(recurse=False)):
                leaves = sorted(n for n, p in owner.named_parameters(recurse=False) if p.dim() == 3)
                return (
                    f"the plan adapts {name} as an nn.Linear expert (target_modules), but this "
                    f"{model_type!r} model ({type(model).__name__}) stores its experts as 3-D parameters "
                    f"({', '.join(f'{owner_name}.{leaf}' for leaf in leaves)}); adapt those with "
                    "target_parameters: make the plan on this model with `allocate`"
                )
    return None


def idle_family_warning(
    components: Sequence[Component],
    ranks: Mapping[str, int],
    budget: int,
    statuses: Mapping[str, str],
    grid: Sequence[int],
    share: float = 0.5,
) -> str | None:
    """A warning text when the routed experts hold at least ``share`` of what one rank unit costs over the
    offered modules and the plan gives every one of them rank 0, with the reason; None otherwise."""
    offered = [c for c in components if c.name in ranks]
    experts = [c for c in offered if c.kind == "expert"]
    total = sum(c.n_params_per_rank for c in offered)
    mass = sum(c.n_params_per_rank for c in experts)
    if not experts or not total or mass < share * total or any(ranks[c.name] > 0 for c in experts):
        return None
    smallest = min(r for r in grid if r > 0)
    cheapest = min(c.n_params_per_rank for c in experts) * smallest
    not_ok = sorted(c.name for c in experts if statuses.get(c.name, "missing") != "ok")
    if len(not_ok) == len(experts):
        why = (
            f"no expert parameter has usable probe statistics ({statuses.get(not_ok[0], 'missing')} for "
            f"{not_ok[0]}): the calibration data did not reach them"
        )
    elif cheapest > budget:
        why = (
            f"the budget {budget:,} is below the {cheapest:,} parameters the cheapest expert parameter "
            f"costs at rank {smallest}"
        )
    else:
        why = (
            "the probes measured less utility per parameter in them than in the modules that got the "
            "budget (the evidence)"
        )
    families = {c.family for c in experts}
    # `required` is met by any module of the family: shared experts would satisfy it with the routed ones at 0
    shared = any(c.family in families and c.kind != "expert" for c in offered)
    require = "" if shared else (
        f", or require them with SolverSettings(required={tuple(sorted(families))!r}) "
        f"(--solver-required {','.join(sorted(families))})")
    return (
        f"the plan leaves all {len(experts)} routed-expert parameters ({mass / total:.0%} of the offered "
        f"LoRA parameters per rank) at rank 0: {why}; raise the budget, weigh the uniform prior "
        f"(UtilitySettings(uniform_prior=1), --utility-uniform-prior 1: each family gets uniform LoRA's "
        f"share){require}"
    )
