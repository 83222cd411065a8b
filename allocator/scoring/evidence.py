"""Capacity demand per family, and how far to trust it.

The capacity signal (:class:`allocator.scoring.signals.CapacitySignal`) weighs each family by the gradient
energy its modules carry beyond the budget's uniform rank ``r0``, per LoRA parameter, measured after the
probes' warm-up. This module computes those weights once, for the signal and for the plan's report: the report
also recomputes them from two halves of each family's modules (alternate layers), so a user sees whether two
halves of the model tell the same story (agreement) before trusting a plan that moved far from uniform. Pure:
numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from allocator.discovery.component import Component

# The capacity window: energy of singular directions r0+1 .. max(TAIL_SPAN * r0, r0 + MIN_WINDOW) (what a
# rank a few times the uniform one would reach, and uniform's cannot). At r0 = 1 three directions are too few
# to tell families apart: on the fact task recurrent's demand is 1.19 over r2..r4 and 1.34 over r2..r9.
TAIL_SPAN, MIN_WINDOW = 4, 8


def window(r0: int) -> tuple[int, int]:
    """Zero-based slice of the singular values in the capacity window of uniform rank ``r0``."""
    return r0, max(TAIL_SPAN * r0, r0 + MIN_WINDOW)


# How a module's window energy counts (UtilitySettings.capacity_measure): its share of the module's own
# measured gradient energy ("share"), the energy itself ("energy"), or per family the more cautious of the
# two ("consensus", :func:`demand_weights`).
MEASURES = ("consensus", "share", "energy")


def family_tails(
    stats: Iterable[Any], components: Iterable[Component], r0: int, measure: str = "share"
) -> dict[str, tuple[float, float]]:
    """Per family: (capacity demand summed over its modules, LoRA parameters per rank).

    ``measure="energy"``: a module adds the gradient energy in the capacity window. ``"share"``: it adds that
    energy as a share of its own measured energy (all its kept singular values), times its parameters per
    rank, so the family's demand per parameter is the parameter-weighted mean share: how much of what its
    modules are still asked to learn lies beyond the uniform rank, whatever their gradients' scale. ``stats``
    are probe statistics with ``grad_singular_values`` (top singular values of the accumulated calibration
    gradient, any order).
    """
    if measure not in ("share", "energy"):
        raise ValueError(f"capacity measure {measure!r}; choose share or energy")
    lo, hi = window(r0)
    out: dict[str, tuple[float, float]] = {}
    for s, c in zip(stats, components, strict=True):
        sigma = np.sort(np.abs(np.asarray(getattr(s, "grad_singular_values", ()), dtype=float).ravel()))[::-1]
        energy = sigma**2
        tail = float(energy[lo:hi].sum())
        if measure == "share":
            total = float(energy.sum())
            tail = tail / total * c.n_params_per_rank if total > 0 else 0.0
        family_tail, params = out.get(c.family, (0.0, 0.0))
        out[c.family] = (family_tail + tail, params + c.n_params_per_rank)
    return out


def capacity_weights(tails: Mapping[str, tuple[float, float]], exponent: float) -> dict[str, float]:
    """Family weight ``(t_F / tbar) ** exponent``: ``t_F`` the family's window energy per parameter, ``tbar``
    the parameter-weighted mean over families; 0 for a family with no energy in the window. Empty when no
    family has any (the evidence is flat: the prior's plan)."""
    total_tail = sum(t for t, _ in tails.values())
    total_params = sum(p for _, p in tails.values())
    if total_tail <= 0 or total_params <= 0:
        return {}
    mean = total_tail / total_params
    return {f: (t / p / mean) ** exponent if t > 0 and p > 0 else 0.0 for f, (t, p) in tails.items()}


def demand_weights(
    stats: Sequence[Any], components: Sequence[Component], r0: int, measure: str, exponent: float = 1.0
) -> dict[str, float]:
    """Per family: capacity demand (1 = the parameter-weighted average) to the power ``exponent``; empty when
    the evidence is flat.

    ``"consensus"``: the share and the energy demand of each family, whichever lies nearer 1 (in log), and 1
    where they fall on opposite sides of it. Each reading has its own failure: the energy takes a module's
    gradient scale for demand (Adam does not: an update does not grow with it), the share ignores how much
    the module's gradient matters at all. The plan moves only as far as both say it should.
    """
    if measure != "consensus":
        return capacity_weights(family_tails(stats, components, r0, measure), exponent)
    share, energy = (capacity_weights(family_tails(stats, components, r0, m), 1.0) for m in MEASURES[1:])
    if not share or not energy:
        return {}
    return {f: _cautious(share[f], energy.get(f, 0.0)) ** exponent for f in share}


def _cautious(a: float, b: float) -> float:
    """Of two demands, the one nearer 1 in log; 1 when they fall on opposite sides of it."""
    if min(a, b) <= 0:  # no window energy in one reading: the other's, if it too is below average
        return min(max(a, b), 1.0)
    la, lb = float(np.log(a)), float(np.log(b))
    if la * lb <= 0:
        return 1.0
    return a if abs(la) < abs(lb) else b


@dataclass(frozen=True)
class FamilyEvidence:
    """What the capacity evidence says of one family (one row of the plan's report)."""

    family: str
    demand: float  # window energy per parameter over the mean (1 = average; > 1 wants more rank)
    demand_even: float  # the same from half of each family's modules (its 1st, 3rd, ... by layer)
    demand_odd: float  # ... and from the other half (2nd, 4th, ...)
    uniform_share: float  # the family's share of the budget under uniform ranks
    plan_share: float  # its share of the budget in the plan

    @property
    def agrees(self) -> bool:
        """Neither layer half contradicts the whole model: none puts the family clearly above average demand
        where the whole puts it clearly below, or the reverse (within 10% of average counts as neither)."""
        whole = _side(self.demand)
        return all(_side(d) * whole >= 0 for d in (self.demand_even, self.demand_odd))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agrees": self.agrees}


def _side(demand: float) -> int:
    """+1 clearly above average demand, -1 clearly below, 0 within 10% of it."""
    log = float(np.log(max(demand, 1e-12)))
    return 0 if abs(log) < np.log(1.1) else int(np.sign(log))


def family_demand(
    stats: Sequence[Any], components: Sequence[Component], r0: int, measure: str = "consensus"
) -> dict[str, tuple[float, float, float]]:
    """Per family: capacity demand (window energy per parameter over the mean; 1 when the evidence is flat)
    from the whole model and from each half of every family's modules (alternate ones by layer). ``stats``
    line up with ``components``."""

    def demand(keep: Any) -> dict[str, float]:
        pairs = [(s, c) for s, c in zip(stats, components, strict=True) if keep(c)]
        return demand_weights([s for s, _ in pairs], [c for _, c in pairs], r0, measure)

    # halves within each family (its modules by layer, alternately), so a family found only in odd layers
    # (attention every fourth layer) is still in both
    order: dict[str, list[str]] = {}
    for c in sorted(components, key=lambda c: (c.layer if c.layer is not None else -1, c.name)):
        order.setdefault(c.family, []).append(c.name)
    first = {n for names in order.values() for n in names[::2]}
    whole = demand(lambda c: True)
    even = demand(lambda c: c.name in first)
    odd = demand(lambda c: c.name not in first)
    return {
        f: (whole.get(f, 1.0), even.get(f, 1.0), odd.get(f, 1.0))
        for f in sorted({c.family for c in components})
    }


def family_evidence(
    demand: Mapping[str, tuple[float, float, float]],
    components: Sequence[Component],
    ranks: Mapping[str, int],
) -> list[FamilyEvidence]:
    """One row per family of ``demand``: its demand and its budget share, uniform's (parameters per rank)
    against the plan's ``ranks``."""
    uniform_cost: dict[str, float] = {}
    plan_cost: dict[str, float] = {}
    for c in components:
        if c.family in demand:
            uniform_cost[c.family] = uniform_cost.get(c.family, 0.0) + c.n_params_per_rank
            plan_cost[c.family] = plan_cost.get(c.family, 0.0) + ranks.get(c.name, 0) * c.n_params_per_rank
    u_total, p_total = sum(uniform_cost.values()) or 1.0, sum(plan_cost.values()) or 1.0
    return [
        FamilyEvidence(f, *demand[f], uniform_cost.get(f, 0.0) / u_total, plan_cost.get(f, 0.0) / p_total)
        for f in demand
    ]
