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


def family_tails(
    stats: Iterable[Any], components: Iterable[Component], r0: int
) -> dict[str, tuple[float, float]]:
    """Per family: (gradient energy in the capacity window summed over its modules, LoRA parameters per
    rank).

    ``stats`` are probe statistics with ``grad_singular_values`` (top singular values of the accumulated
    calibration gradient, any order).
    """
    out: dict[str, tuple[float, float]] = {}
    for s, c in zip(stats, components, strict=True):
        sigma = np.sort(np.abs(np.asarray(getattr(s, "grad_singular_values", ()), dtype=float).ravel()))[::-1]
        tail, params = out.get(c.family, (0.0, 0.0))
        lo, hi = window(r0)
        out[c.family] = (tail + float((sigma[lo:hi] ** 2).sum()), params + c.n_params_per_rank)
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
    stats: Sequence[Any], components: Sequence[Component], r0: int
) -> dict[str, tuple[float, float, float]]:
    """Per family: capacity demand (window energy per parameter over the mean; 1 when the evidence is flat)
    from the whole model and from each half of every family's modules (alternate ones by layer). ``stats``
    line up with ``components``."""

    def demand(keep: Any) -> dict[str, float]:
        pairs = [(s, c) for s, c in zip(stats, components, strict=True) if keep(c)]
        return capacity_weights(family_tails([s for s, _ in pairs], [c for _, c in pairs], r0), 1.0)

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
