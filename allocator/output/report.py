"""Stage 5b: a readable report of a plan: the verdict (:mod:`allocator.output.verdict`), per-family and
per-layer tables, a heatmap, and the uniform config of equal cost beside it.

``family_rows`` and ``layer_kind_ranks`` gather rows (data, testable); ``render_markdown`` and
``heatmap_figure`` / ``write_heatmap`` only format them.
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

from allocator.output.verdict import (
    UniformComparison,
    family_marginal,
    short_verdict,
    uniform_comparison,
    verdict_lines,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from allocator.output.plan import Plan

__all__ = ["FamilyRow", "UniformComparison", "family_rows", "layer_kind_ranks", "render_markdown",
           "uniform_comparison", "write_heatmap", "write_report"]


@dataclass(frozen=True)
class FamilyRow:
    family: str
    modules: int  # eligible modules of this family
    adapted: int  # of which rank > 0
    ranks: str  # e.g. "0–16 (median 8)"
    params: int
    share_budget: float
    # utility per parameter of the next grid rank, size-weighted mean over the family (what the solver
    # equalises); None where every module is at the top of the grid or has no utility
    marginal: float | None


MARGINAL_UNIT = 1e6  # marginal values are shown per million parameters
MARGINAL_NOTE = (
    "next rank buys: utility per million parameters that the next grid rank of the family's modules would "
    "add (what the solver equalises: budget goes where it buys most, until the grid allows no better trade)"
)


def family_rows(plan: Plan) -> list[FamilyRow]:
    """One row per family that has eligible modules, in a fixed order."""
    by_family: dict[str, list[str]] = defaultdict(list)
    by_name = plan.by_name
    for name in plan.ranks:
        by_family[by_name[name].family].append(name)
    marginal = family_marginal(plan)
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
                marginal=marginal.get(family),
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


def render_markdown(plan: Plan) -> str:
    uniform = uniform_comparison(plan)
    compare = (
        f"rank {uniform.rank} on all {uniform.n_targets} eligible targets = {uniform.cost:,} parameters"
        if not uniform.below_r1
        else f"uniform r1 on every eligible target costs {uniform.per_rank:,}, over the budget; r1 over "
        f"{' + '.join(uniform.families) or 'no family'} ({uniform.n_targets} modules) = {uniform.cost:,}"
    )
    lines = [
        f"# LoRA allocation for `{plan.model_id}`",
        "",
        "## Verdict",
        "",
        *(f"- {line[0].upper()}{line[1:]}" for line in verdict_lines(plan)),
        "",
        "## Plan",
        "",
        f"- budget: {plan.budget:,} trainable parameters; plan cost: **{plan.cost:,}** "
        f"({plan.cost / plan.budget:.1%} of budget)",
        f"- adapted modules: {len(plan.targets)} of {len(plan.ranks)} eligible "
        f"({sum(not c.eligible for c in plan.components)} found but not eligible)",
        f"- solver: {plan.solver.get('status', '?')}, MIP gap "
        f"{plan.solver.get('mip_gap', float('nan')):.2g}, granularity "
        f"`{plan.solver.get('granularity', '?')}`",
        f"- uniform config of equal cost for comparison: {compare}",
        "",
        "## By family",
        "",
        "| family | modules | adapted | ranks | parameters | share of budget | next rank buys |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in family_rows(plan):
        lines.append(
            f"| {row.family} | {row.modules} | {row.adapted} | {row.ranks} | {row.params:,} | "
            f"{row.share_budget:.1%} | {marginal_text(row.marginal)} |"
        )
    lines += ["", f"_{MARGINAL_NOTE}; – at the top of the grid or without utility._"]
    layers, kinds, cells = layer_kind_ranks(plan)
    if uniform.below_r1:
        title = f"rank; uniform r1 fits only over {' + '.join(uniform.families) or 'no family'}"
    else:
        title = f"rank; uniform would give every cell rank {uniform.rank}"
    lines += ["", f"## By layer ({title})", ""]
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


def marginal_text(value: float | None) -> str:
    """A family's marginal value per million parameters, or ``–``."""
    return "–" if value is None else f"{value * MARGINAL_UNIT:.3g}"


def heatmap_figure(plan: Plan) -> Figure:
    """Layer × kind grid, colour = rank; the title names the cost and how the plan compares with uniform, and
    the figure is widened until the title fits."""
    matplotlib.use("Agg")
    layers, kinds, cells = layer_kind_ranks(plan)
    grid = np.full((len(kinds), len(layers)), np.nan)
    for (layer, kind), r in cells.items():
        grid[kinds.index(kind), layers.index(layer)] = r
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(layers) + 2.5), max(2.4, 0.45 * len(kinds) + 1.6)))
    top = max(1, max(cells.values(), default=1))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    for (layer, kind), r in cells.items():
        ax.text(
            layers.index(layer), kinds.index(kind), str(r), ha="center", va="center", color="w", fontsize=7
        )
    fig.colorbar(image, ax=ax, label="rank")
    title = fig.suptitle(f"LoRA rank per layer and kind, {plan.cost:,} parameters\n({short_verdict(plan)})",
                         fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    needed = title.get_window_extent().width / fig.dpi + 0.4  # inches, with a margin each side
    if needed > fig.get_figwidth():
        fig.set_figwidth(needed)
        fig.tight_layout()
    return fig


def write_heatmap(plan: Plan, path: Path) -> None:
    fig = heatmap_figure(plan)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(plan: Plan, folder: Path) -> None:
    (folder / "report.md").write_text(render_markdown(plan))
    write_heatmap(plan, folder / "heatmap.png")
