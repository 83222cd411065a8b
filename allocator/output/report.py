"""Stage 5b: a readable report of a plan: per-family and per-layer tables, a heatmap, and the uniform config
of
equal cost beside it.

``summarize(plan)`` gathers rows (data, testable); ``render_markdown`` and ``write_heatmap`` only format them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

if TYPE_CHECKING:
    from allocator.output.plan import Plan


@dataclass(frozen=True)
class FamilyRow:
    family: str
    modules: int  # eligible modules of this family
    adapted: int  # of which rank > 0
    ranks: str  # e.g. "0–16 (median 8)"
    params: int
    share_budget: float
    share_utility: float


@dataclass(frozen=True)
class UniformComparison:
    rank: int  # largest uniform rank over every eligible target that fits the budget
    cost: int
    n_targets: int


def family_rows(plan: Plan) -> list[FamilyRow]:
    """One row per family that has eligible modules, in a fixed order."""
    by_family: dict[str, list[str]] = defaultdict(list)
    by_name = plan.by_name
    for name in plan.ranks:
        by_family[by_name[name].family].append(name)
    total_utility = plan.total_utility or 1.0
    rows = []
    for family in sorted(by_family):
        names = by_family[family]
        ranks = sorted(plan.ranks[n] for n in names)
        params = sum(plan.module_cost(n) for n in names)
        rows.append(
            FamilyRow(
                family=family,
                modules=len(names),
                adapted=sum(r > 0 for r in ranks),
                ranks=f"{ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]})",
                params=params,
                share_budget=params / plan.budget if plan.budget else 0.0,
                share_utility=sum(plan.utility.get(n, 0.0) for n in names) / total_utility,
            )
        )
    return rows


def layer_kind_ranks(plan: Plan) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """(layers, kinds, {(layer, family/kind): max rank}) for the per-layer table and the heatmap."""
    by_name = plan.by_name
    cells: dict[tuple[str, str], int] = {}
    for name, r in plan.ranks.items():
        c = by_name[name]
        key = ("-" if c.layer is None else str(c.layer), f"{c.family}/{c.kind}")
        cells[key] = max(cells.get(key, 0), r)
    layers = sorted({k[0] for k in cells}, key=lambda s: (s == "-", int(s) if s != "-" else 0))
    kinds = sorted({k[1] for k in cells})
    return layers, kinds, cells


def uniform_comparison(plan: Plan) -> UniformComparison:
    """The uniform-rank LoRA over every eligible target whose cost is the largest not above the plan's
    budget."""
    per_rank = sum(plan.by_name[n].n_params_per_rank for n in plan.ranks)
    rank = plan.budget // per_rank if per_rank else 0
    return UniformComparison(rank=int(rank), cost=int(rank * per_rank), n_targets=len(plan.ranks))


def render_markdown(plan: Plan) -> str:
    uniform = uniform_comparison(plan)
    lines = [
        f"# LoRA allocation for `{plan.model_id}`",
        "",
        f"- budget: {plan.budget:,} trainable parameters; plan cost: **{plan.cost:,}** "
        f"({plan.cost / plan.budget:.1%} of budget)" if plan.budget else f"- plan cost: {plan.cost:,}",
        f"- adapted modules: {len(plan.targets)} of {len(plan.ranks)} eligible "
        f"({sum(not c.eligible for c in plan.components)} found but not eligible)",
        f"- solver: {plan.solver.get('status', '?')}, MIP gap "
        f"{plan.solver.get('mip_gap', float('nan')):.2g}, granularity "
        f"`{plan.solver.get('granularity', '?')}`",
        f"- uniform config of equal cost for comparison: rank {uniform.rank} on all {uniform.n_targets} "
        f"eligible targets = {uniform.cost:,} parameters",
        "",
        "## By family",
        "",
        "| family | modules | adapted | ranks | parameters | share of budget | share of utility |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in family_rows(plan):
        lines.append(
            f"| {row.family} | {row.modules} | {row.adapted} | {row.ranks} | {row.params:,} | "
            f"{row.share_budget:.1%} | {row.share_utility:.1%} |"
        )
    layers, kinds, cells = layer_kind_ranks(plan)
    lines += ["", "## By layer (rank; uniform would give every cell rank " f"{uniform.rank})", ""]
    lines.append("| layer | " + " | ".join(kinds) + " | parameters |")
    lines.append("|---|" + "---:|" * (len(kinds) + 1))
    by_name = plan.by_name
    for layer in layers:
        params = sum(
            plan.module_cost(n)
            for n in plan.ranks
            if ("-" if by_name[n].layer is None else str(by_name[n].layer)) == layer
        )
        row = [str(cells[(layer, k)]) if (layer, k) in cells else "" for k in kinds]
        lines.append(f"| {layer} | " + " | ".join(row) + f" | {params:,} |")
    not_effective = [c for c in plan.components if not c.lora_effective]
    if not_effective:
        lines += ["", "## Not offered to the solver", ""]
        for c in not_effective:
            lines.append(f"- `{c.name}`: {c.note or 'not effective'}")
    if plan.provenance:
        lines += ["", "## Provenance", "", "```json"]

        lines.append(json.dumps(dict(plan.provenance), indent=2, sort_keys=True, default=str))
        lines.append("```")
    return "\n".join(lines) + "\n"


def write_heatmap(plan: Plan, path: Path) -> None:
    """Layer × kind grid, colour = rank."""

    matplotlib.use("Agg")

    layers, kinds, cells = layer_kind_ranks(plan)
    grid = np.full((len(kinds), len(layers)), np.nan)
    for (layer, kind), r in cells.items():
        grid[kinds.index(kind), layers.index(layer)] = r
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(layers) + 2.5), max(2.0, 0.45 * len(kinds) + 1.2)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    ax.set_title(f"LoRA rank per layer and kind ({plan.cost:,} params)")
    for (layer, kind), r in cells.items():
        ax.text(
            layers.index(layer), kinds.index(kind), str(r), ha="center", va="center", color="w", fontsize=7
        )
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(plan: Plan, folder: Path) -> None:
    (folder / "report.md").write_text(render_markdown(plan))
    write_heatmap(plan, folder / "heatmap.png")
