"""What a plan's verdict rests on, gathered at solve time and recorded in the plan (``Plan.marginal``,
``Plan.evidence``; ``allocation.json`` keys ``"marginal"`` per module and ``"evidence"``).

- :func:`marginal_values`: per module, the utility the next grid rank would add per parameter it costs,
  ``(u(R_{k+1}) - u(R_k) - lambda * (risk(R_{k+1}) - risk(R_k))) / (p_m * (R_{k+1} - R_k))`` at the chosen
  rank ``R_k``. At the optimum the solver has made these as equal as the grid allows: a module whose next
  rank bought more per parameter than another's last one would have taken that budget.
- :func:`gather`: how much of the budget the plan places differently from uniform (:func:`moved_share`), the
  same with each lever switched off in turn (the probe signals, family priors, share bounds, the retention
  risk, include/exclude; each mixed signal alone), and how consistent the gradients were across the two
  calibration halves (the probes' held-out capture), and each family's capacity demand (:func:`capacity`),
  with whether two halves of its modules agree on it. Re-solving is cheap (milliseconds on the reference
  models) next to the probes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from allocator.discovery.component import Component
from allocator.errors import AllocatorError, InputError
from allocator.scoring.evidence import family_demand, family_evidence, window
from allocator.scoring.utility import UtilitySettings, UtilityTable, compute_utilities
from allocator.solver.settings import SolverSettings
from allocator.solver.solve import solve

PLACES = 4  # shares are recorded rounded, so that a plan's JSON is stable across platforms


def marginal_values(
    table: UtilityTable, ranks: Mapping[str, int], components: Sequence[Component]
) -> dict[str, float | None]:
    """``{name: utility per parameter of the next grid rank}`` for every module of ``table`` (None at the
    grid's top); modules without a table row (no usable probe statistics) are left out."""
    by_name, col = {c.name: c for c in components}, {r: j for j, r in enumerate(table.ranks)}
    out: dict[str, float | None] = {}
    for i, name in enumerate(table.names):
        k = col.get(ranks.get(name, 0))
        if k is None or k + 1 >= len(table.ranks):
            out[name] = None
            continue
        gain = table.values[i, k + 1] - table.values[i, k]
        if table.risk is not None:
            gain -= table.risk_weight * (table.risk[i, k + 1] - table.risk[i, k])
        cost = by_name[name].n_params_per_rank * (table.ranks[k + 1] - table.ranks[k])
        out[name] = float(gain / cost) if cost else None
    return out


def moved_share(ranks: Mapping[str, int], components: Sequence[Component]) -> float:
    """Share of the plan's parameters placed differently from uniform LoRA over the same modules:
    ``1/2 sum_m |cost_m / cost - p_m / P|`` (0: uniform's placement; 1: none in common)."""
    by_name = {c.name: c for c in components}
    per_rank = {n: by_name[n].n_params_per_rank for n in ranks}
    total, scale = sum(r * per_rank[n] for n, r in ranks.items()), sum(per_rank.values())
    if not total or not scale:
        return 0.0
    return 0.5 * sum(abs(r * per_rank[n] / total - per_rank[n] / scale) for n, r in ranks.items())


def levers(utility: UtilitySettings, solver: SolverSettings, has_risk: bool) -> dict[str, tuple]:
    """Each active lever that can move budget away from uniform -> the settings with it switched off."""
    out: dict[str, tuple] = {}
    if utility.signal != "uniform" and utility.uniform_prior < 1:
        out["signals"] = (dataclasses.replace(utility, uniform_prior=1.0), solver)
    if any(v != 1 for v in utility.family_priors.values()):
        out["family_priors"] = (dataclasses.replace(utility, family_priors={}), solver)
    if solver.share_bounds or solver.required:
        out["share_bounds"] = (utility, dataclasses.replace(solver, share_bounds={}, required=()))
    if has_risk and utility.retention_weight > 0:
        out["retention"] = (dataclasses.replace(utility, retention_weight=0.0), solver)
    if solver.include or solver.exclude:
        out["include_exclude"] = (utility, dataclasses.replace(solver, include=(), exclude=()))
    return out


def gather(
    report: Any,
    components: Sequence[Component],
    budget: int,
    ranks: Mapping[str, int],
    utility: UtilitySettings,
    solver: SolverSettings,
    risk_report: Any = None,
) -> dict[str, Any]:
    """The evidence dict a plan records (see the module docstring); every share rounded to 4 places."""

    def moved_with(u: UtilitySettings, s: SolverSettings) -> float | None:
        try:
            with warnings.catch_warnings():  # the real solve has said it all already
                warnings.simplefilter("ignore")
                table = compute_utilities(report, components, s.ranks, u, risk_report=risk_report)
                return round(moved_share(solve(components, table, budget, s).ranks, components), PLACES)
        except (InputError, AllocatorError):  # e.g. a share bound this lever's removal makes moot
            return None

    active = levers(utility, solver, risk_report is not None)
    evidence: dict[str, Any] = {
        "signal": utility.signal,
        "uniform_prior": utility.uniform_prior,
        "moved": round(moved_share(ranks, components), PLACES),
        "without": {name: moved_with(*pair) for name, pair in active.items()},
    }
    if utility.signal == "combined":
        evidence["weights"] = {k: w for k, w in utility.weights.items() if w > 0}
    if "signals" in active and utility.signal == "combined" and len(evidence["weights"]) > 1:
        evidence["signals_alone"] = {
            k: moved_with(dataclasses.replace(utility, weights={k: 1.0}), solver) for k in evidence["weights"]
        }
    if active:
        flat = dataclasses.replace(utility, uniform_prior=1.0, family_priors={}, retention_weight=0.0)
        evidence["grid_only"] = moved_with(
            flat, dataclasses.replace(solver, share_bounds={}, required=(), include=(), exclude=())
        )
    evidence["consistency"] = consistency(report, [c for c in components if c.name in ranks], budget)
    evidence["capacity"] = capacity(report, [c for c in components if c.name in ranks], ranks, utility)
    return evidence


def capacity(
    report: Any, eligible: Sequence[Component], ranks: Mapping[str, int], utility: UtilitySettings
) -> dict[str, Any]:
    """Per family: capacity demand (by ``utility.capacity_measure``: the share of its modules' gradient
    energy beyond the budget's uniform rank, or that energy per parameter; 1 = average;
    :mod:`allocator.scoring.evidence`) from all its modules and from each half of them, whether the halves
    agree, and its budget share under uniform and in the plan."""
    ok = [c for c in eligible if str(getattr(report.modules.get(c.name), "status", "")) == "ok"]
    r0 = max(1, int(utility.capacity_start))
    demand = family_demand([report.modules[c.name] for c in ok], ok, r0, utility.capacity_measure)
    rows = {
        e.family: {k: round(v, PLACES) if isinstance(v, float) else v for k, v in e.to_dict().items()}
        for e in family_evidence(demand, ok, ranks)
    }
    return {"rank": r0, "window": list(window(r0)), "measure": utility.capacity_measure, "families": rows}


def consistency(report: Any, eligible: Sequence[Component], budget: int) -> dict[str, Any]:
    """Median held-out capture per family at the uniform rank of ``budget`` (at least 1): the share of one
    calibration half's gradient energy that the other half's top-r directions capture (``docs/probes.md``);
    ``random``: what random rank-r subspaces would capture in expectation, ``r^2 / (d_in d_out)``."""
    per_rank = sum(c.n_params_per_rank for c in eligible)
    rank = max(1, budget // per_rank if per_rank else 1)
    captures, chance, batches = defaultdict(list), defaultdict(list), 0
    for c in eligible:
        stats = report.modules.get(c.name)
        if stats is None or str(getattr(stats, "status", "")) != "ok":
            continue
        batches = max(batches, int(getattr(stats, "n_batches", 0) or 0))
        h = np.asarray(getattr(stats, "heldout_capture", ()), dtype=float).ravel()
        if h.size:
            t = min(rank, h.size)
            captures[c.family].append(float(h[t - 1]))
            chance[c.family].append(t * t / (c.d_in * c.d_out))  # random rank-t subspaces on both sides
    return {
        "rank": int(rank),
        "batches": batches,
        "capture": {f: round(float(np.median(v)), PLACES) for f, v in sorted(captures.items())},
        "random": {f: float(f"{np.median(v):.4g}") for f, v in sorted(chance.items())},
    }
