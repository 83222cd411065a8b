"""A plan's verdict in plain language: how it differs from uniform LoRA, where budget moved, what moved it,
how consistent the evidence was, and what to do next. ``allocate`` prints it first; ``report.md`` and a tune
study's ``study.md`` open with it.

Reads only the plan (its ranks, components and the ``evidence`` recorded at solve time by
:mod:`allocator.output.evidence`); a plan without evidence (made by hand, a tune baseline, an older file) gets
the parts its ranks alone support.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

from allocator.output.evidence import moved_share

if TYPE_CHECKING:
    from allocator.output.plan import Plan

SHOWN = 0.0005  # family shifts below this share of the budget are not named
STRONG_MOVE, STRONG_BATCHES = 0.05, 8  # a move smaller, or measured on fewer batches, is weak evidence
TUNE = "`allocate tune --eval-data EVAL`"
LEVER_NAMES = {
    "signals": "the probe signals",
    "family_priors": "your family priors",
    "share_bounds": "your share bounds",
    "retention": "the retention risk",
    "include_exclude": "your include/exclude patterns",
}


@dataclass(frozen=True)
class UniformComparison:
    rank: int  # largest uniform rank over every eligible target that fits the budget
    cost: int  # what that costs; below r1: uniform r1 over `families`
    n_targets: int
    per_rank: int  # uniform r1 over every eligible target
    # below r1: the families whose uniform r1 fits the budget together, at the highest cost
    families: tuple[str, ...] = ()

    @property
    def below_r1(self) -> bool:
        return self.rank == 0


def uniform_comparison(plan: Plan) -> UniformComparison:
    """The uniform-rank LoRA over every eligible target whose cost is the largest not above the budget; below
    uniform r1, uniform r1 over the set of families that fits the budget at the highest cost."""
    by_name = plan.by_name
    family_rank: dict[str, int] = defaultdict(int)
    for n in plan.ranks:
        family_rank[by_name[n].family] += by_name[n].n_params_per_rank
    per_rank = sum(family_rank.values())
    rank = plan.budget // per_rank if per_rank else 0
    if rank:
        return UniformComparison(int(rank), int(rank * per_rank), len(plan.ranks), per_rank)
    fits = [
        (sum(family_rank[f] for f in group), group)
        for k in range(1, len(family_rank) + 1)
        for group in combinations(sorted(family_rank), k)
        if sum(family_rank[f] for f in group) <= plan.budget
    ]
    cost, families = max(fits, default=(0, ()))
    n = sum(by_name[m].family in families for m in plan.ranks)
    return UniformComparison(0, int(cost), n, per_rank, tuple(families))


def family_marginal(plan: Plan) -> dict[str, float | None]:
    """Per family: the marginal value at the chosen ranks (utility per parameter of the next grid rank),
    averaged over its modules weighted by their size; None where no module has one."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_name = plan.by_name
    for name, value in plan.marginal.items():
        if value is not None and name in by_name:
            c = by_name[name]
            sums[c.family][0] += value * c.n_params_per_rank
            sums[c.family][1] += c.n_params_per_rank
    families = {by_name[n].family for n in plan.ranks}
    return {f: (sums[f][0] / sums[f][1] if sums[f][1] else None) for f in sorted(families)}


def _layers_text(layers: list[str]) -> str:
    """``['0', '1', '2', '5', '-']`` -> ``'layers 0-2, 5, outside the layers'``."""
    numbers = sorted(int(x) for x in layers if x != "-")
    spans: list[list[int]] = []
    for x in numbers:
        if spans and x == spans[-1][1] + 1:
            spans[-1][1] = x
        else:
            spans.append([x, x])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in spans]
    label = ("layer " if len(numbers) == 1 else "layers ") + ", ".join(parts) if parts else ""
    return ", ".join(p for p in (label, "outside the layers" if "-" in layers else "") if p)


def _cells(plan: Plan) -> dict[str, dict[str, float]]:
    """``{family: {layer: share of the budget gained (+) or lost (-) against uniform}}``; layer ``'-'`` for
    modules outside the decoder layers."""
    by_name = plan.by_name
    per_rank = {n: by_name[n].n_params_per_rank for n in plan.ranks}
    total, scale = plan.cost, sum(per_rank.values())
    cells: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    if not total or not scale:
        return cells
    for n, r in plan.ranks.items():
        c = by_name[n]
        layer = "-" if c.layer is None else str(c.layer)
        cells[c.family][layer] += r * per_rank[n] / total - per_rank[n] / scale
    return cells


def family_shifts(plan: Plan) -> list[tuple[str, float, str]]:
    """``[(family, share of the budget gained (+) or lost (-) against uniform, 'layers ...'), ...]``, the
    largest gain first; the layers are where the family gained (or lost) most of it."""
    out = []
    for family, layers in _cells(plan).items():
        delta = sum(layers.values())
        if abs(delta) < SHOWN:
            continue
        same = {k: v for k, v in layers.items() if v * delta > 0}
        keep, covered = [], 0.0
        for k in sorted(same, key=lambda k: -abs(same[k])):  # the layers holding 2/3 of the family's shift
            keep.append(k)
            covered += abs(same[k])
            if covered >= 2 / 3 * sum(abs(v) for v in same.values()):
                break
        out.append((family, delta, _layers_text(keep)))
    return sorted(out, key=lambda t: -t[1])


def layer_shifts(plan: Plan, top: int = 3) -> tuple[list[str], list[str]]:
    """The ``top`` largest gains and losses of (family, layer) cells:
    ``(['mlp in layer 0 +2.8%'], [...])``."""
    cells = [
        (d, f, layer) for f, layers in _cells(plan).items() for layer, d in layers.items() if abs(d) >= SHOWN
    ]

    def name(f: str, layer: str) -> str:
        return f"{f} {'outside the layers' if layer == '-' else 'in layer ' + layer}"

    gains = [f"{name(f, layer)} +{d:.1%}" for d, f, layer in sorted(cells, reverse=True)[:top] if d > 0]
    losses = [f"{name(f, layer)} −{-d:.1%}" for d, f, layer in sorted(cells)[:top] if d < 0]
    return gains, losses


def _settings_text(plan: Plan, lever: str) -> str:
    utility = plan.provenance.get("utility_settings", {}) or {}
    solver = plan.provenance.get("solver_settings", {}) or {}
    if lever == "family_priors":
        return ",".join(f"{k}={v:g}" for k, v in sorted((utility.get("family_priors") or {}).items()))
    if lever == "share_bounds":
        bounds = solver.get("share_bounds") or {}
        return ",".join(f"{k}={lo:g}:{hi:g}" for k, (lo, hi) in sorted(bounds.items()))
    if lever == "retention":
        return f"weight {utility.get('retention_weight', 0):g}"
    if lever == "include_exclude":
        return "; ".join(
            f"{k} {v}"
            for k, v in (("include", solver.get("include")), ("exclude", solver.get("exclude")))
            if v
        )
    return signal_text(plan.evidence)


def signal_text(evidence: dict[str, Any]) -> str:
    """``'combined (gradient_spectrum 0.5, heldout_capture 0.5) blended with a 50% uniform prior'``."""
    weights = evidence.get("weights") or {}
    mix = f" ({', '.join(f'{k} {w:g}' for k, w in weights.items())})" if weights else ""
    prior = float(evidence.get("uniform_prior", 0.0))
    return f"{evidence.get('signal', '?')}{mix} blended with a {prior:.0%} uniform prior"


def driver(evidence: dict[str, Any]) -> str | None:
    """The lever whose removal takes back most of the move, ``'rank grid'`` when only the grid's rounding
    moves budget, ``'together'`` when no lever alone explains it; None without evidence or a move."""
    moved = float(evidence.get("moved", 0.0))
    if not evidence or moved <= 0:
        return None
    without = {k: v for k, v in (evidence.get("without") or {}).items() if v is not None}
    grid = evidence.get("grid_only")
    if grid is not None and grid >= moved - 0.005:
        return "rank grid"
    if not without:
        return "rank grid" if grid is None and not evidence.get("without") else "together"
    best = max(without, key=lambda k: (moved - without[k], k))
    return best if moved - without[best] >= moved / 2 else "together"


def _consistency_text(evidence: dict[str, Any], order: list[str]) -> str | None:
    found = evidence.get("consistency") or {}
    capture, batches = found.get("capture") or {}, int(found.get("batches", 0))
    if not capture:
        return None
    families = [f for f in order if f in capture] + sorted(set(capture) - set(order))
    chance = found.get("random") or {}
    values = ", ".join(
        f"{f} {capture[f]:.0%}" + (f" ({capture[f] / chance[f]:.0f}x chance)" if chance.get(f) else "")
        for f in families
    )
    few = ""
    if batches < STRONG_BATCHES:
        few = f"; only {batches} calibration batches, a noisy measure (calibrate on more samples)"
    return (
        f"consistency across calibration halves ({batches} batches, split even/odd): the top-{found['rank']} "
        f"gradient directions of one half capture {values} of the other half's gradient energy{few}"
    )


def _capacity_text(evidence: dict[str, Any]) -> str | None:
    found = evidence.get("capacity") or {}
    rows = found.get("families") or {}
    if evidence.get("signal") != "capacity" or not rows:
        return None
    order = sorted(rows, key=lambda f: -rows[f]["demand"])
    values = ", ".join(
        f"{f} {rows[f]['demand']:.2f} (halves {rows[f]['demand_even']:.2f} / {rows[f]['demand_odd']:.2f})"
        for f in order
    )
    lo, hi = found.get("window", (0, 0))
    split = [f for f in order if not rows[f]["agrees"]]
    trust = (
        "the halves agree"
        if not split
        else f"the halves disagree on {', '.join(split)}: weak evidence there; `allocate tune` checks it "
        "with pilot fine-tunes"
    )
    what = {
        "energy": f"gradient energy in directions {lo + 1}..{hi} per parameter",
        "share": f"share of each module's gradient energy in directions {lo + 1}..{hi}",
    }.get(
        found.get("measure"),
        f"gradient energy in directions {lo + 1}..{hi}, per parameter or as a share of each module's, "
        "whichever is nearer average",
    )
    return f"capacity demand after the warm-up ({what}; 1 = average): {values}; {trust}"


def _headline(plan: Plan, uniform: UniformComparison, ranks: set[int]) -> str:
    status = str(plan.solver.get("status", ""))
    if uniform.below_r1:
        fit = " + ".join(uniform.families) or "no family"
        return (
            f"your budget ({plan.budget:,}) is below uniform r1 ({uniform.per_rank:,}): the plan adapts only "
            f"part of the modules ({len(plan.targets)} of {len(plan.ranks)}); uniform r1 over the families "
            f"that fit ({fit}, {uniform.n_targets} modules) would cost {uniform.cost:,}"
        )
    if len(ranks) == 1 and min(ranks) > 0:
        why = (
            f"a tune {status}" if status.startswith("baseline") else "the probes saw no reason to move budget"
        )
        return f"identical to uniform's plan (rank {min(ranks)} on all {len(plan.ranks)} targets): {why}"
    moved = moved_share(plan.ranks, plan.components)
    return f"differs from uniform r{uniform.rank}: {moved:.1%} of the budget placed differently"


def short_verdict(plan: Plan) -> str:
    """``'identical to uniform r8'``, ``'23.4% of the budget moved from uniform r8'``, ``'budget below uniform
    r1: ...'``."""
    uniform, ranks = uniform_comparison(plan), set(plan.ranks.values())
    if uniform.below_r1:
        return f"budget below uniform r1: {len(plan.targets)} of {len(plan.ranks)} modules adapted"
    if len(ranks) == 1 and min(ranks) > 0:
        return f"identical to uniform r{min(ranks)}"
    return f"{moved_share(plan.ranks, plan.components):.1%} of the budget moved from uniform r{uniform.rank}"


def _moves_text(plan: Plan) -> str | None:
    shifts = family_shifts(plan)
    gains = [f"{f} +{d:.1%} ({where})" for f, d, where in shifts if d > 0]
    losses = [f"{f} −{-d:.1%} ({where})" for f, d, where in shifts if d < 0]
    within = ""
    if not gains and not losses:  # each family keeps its share: the budget moved between its layers
        gains, losses = layer_shifts(plan)
        within = " between layers (each family keeps its share):"
    if not gains and not losses:
        return None
    return f"budget moved{within} to {', '.join(gains) or '-'}; away from {', '.join(losses) or '-'}"


def _adapted(plan: Plan) -> list[tuple[str, int, int]]:
    """``[(family, modules adapted, eligible modules)]``, the most adapted first."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_name = plan.by_name
    for n, r in plan.ranks.items():
        counts[by_name[n].family][0] += r > 0
        counts[by_name[n].family][1] += 1
    return sorted(((f, a, m) for f, (a, m) in counts.items()), key=lambda t: (-t[1], t[0]))


def _driver_text(plan: Plan, lever: str | None) -> str | None:
    evidence = plan.evidence
    if lever is None:
        return f"signal: {signal_text(evidence)}" if evidence else None
    if lever == "rank grid":
        return (
            "driven by the rank grid and the modules' shapes, not by the data: the uniform prior alone "
            "moves as much (a module cannot use more rank than min(d_in, d_out), and a uniform rank off "
            "the grid is mixed from its neighbours)"
        )
    if lever == "together":
        parts = ", ".join(
            f"without {LEVER_NAMES[k]} {v:.1%}" for k, v in evidence["without"].items() if v is not None
        )
        return f"driven by several settings together; moved with one switched off: {parts}"
    moved = f"{evidence['without'][lever]:.1%} of the budget would move"
    if lever == "signals":
        text = (
            f"driven by {LEVER_NAMES[lever]}, {_settings_text(plan, lever)}: with the uniform prior "
            f"alone {moved}"
        )
    else:
        text = f"driven by {LEVER_NAMES[lever]} ({_settings_text(plan, lever)}): without them {moved}"
    alone = {k: v for k, v in (evidence.get("signals_alone") or {}).items() if v is not None}
    if alone and lever == "signals":
        text += "; each signal alone would move " + ", ".join(f"{k} {v:.1%}" for k, v in alone.items())
    return text


def _next_text(plan: Plan, uniform: UniformComparison, identical: bool, lever: str | None) -> str:
    batches = int((plan.evidence.get("consistency") or {}).get("batches", 0))
    if uniform.below_r1:
        return (
            f"next: train with it, or raise the budget to r1 ({uniform.per_rank:,}) so that every module "
            f"gets an adapter; {TUNE} picks which modules to adapt with pilot fine-tunes"
        )
    if identical:
        return (
            f"next: train with it (it is uniform LoRA at rank {uniform.rank}); to test other placements "
            f"and the learning rate with pilot fine-tunes, run {TUNE}"
        )
    if lever in ("family_priors", "share_bounds", "include_exclude"):
        return (
            f"next: the move comes from your settings, not from the probes: train with it if that is the "
            f"intent; {TUNE} measures it against uniform with pilot fine-tunes"
        )
    moved = moved_share(plan.ranks, plan.components)
    weak = [
        why
        for why, bad in (
            (f"{moved:.1%} moved", moved < STRONG_MOVE),
            (f"{batches} calibration batches", batches < STRONG_BATCHES),
        )
        if bad
    ]
    if lever == "rank grid" or not plan.evidence:
        return "next: train with it"
    if weak:
        return (
            f"next: the evidence is weak ({', '.join(weak)}): run {TUNE} to check the plan against "
            "uniform with pilot fine-tunes before a long training run, or calibrate on more data"
        )
    return (
        "next: train with it; on the placement benchmark the default plan was never significantly worse "
        "than uniform (docs/results/placement.md)"
    )


def verdict_lines(plan: Plan) -> list[str]:
    """The verdict, one plain-language sentence per line: how the plan differs from uniform, where budget
    moved, what moved it, how consistent the calibration evidence was, what to do next."""
    uniform = uniform_comparison(plan)
    ranks = set(plan.ranks.values())
    identical = not uniform.below_r1 and len(ranks) == 1 and min(ranks) > 0
    lines = [_headline(plan, uniform, ranks)]
    if uniform.below_r1:
        lines.append("adapted: " + ", ".join(f"{f} {n} of {m} modules" for f, n, m in _adapted(plan)))
    elif not identical:
        lines.append(_moves_text(plan) or "")
    if str(plan.solver.get("status", "")).startswith("baseline"):
        return [line for line in lines if line]  # a tune baseline: nothing was solved, nothing to explain
    lever = None if identical or uniform.below_r1 else driver(dict(plan.evidence))
    lines.append(_driver_text(plan, lever) or "")
    lines.append(_consistency_text(dict(plan.evidence), [f for f, _, _ in family_shifts(plan)]) or "")
    lines.append(_capacity_text(dict(plan.evidence)) or "")
    lines.append(_next_text(plan, uniform, identical, lever))
    return [line for line in lines if line]
