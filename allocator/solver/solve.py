"""Stage 4: utilities x budget -> ranks. Build, solve (one ``scipy.optimize.milp`` call, HiGHS), decode.

``solve(components, table, budget, settings) -> Allocation`` maximises total utility minus weighted retention
risk over one rank per group, with total LoRA cost <= budget, optional per-family budget shares and required
families. The program is written out in ``docs/solver.md``; ``build_program`` (``allocator/program.py``) makes
its arrays and ``reduce_program`` (``allocator/reduction.py``) drops options a Lagrangian bound proves useless
before HiGHS. Infeasible or degenerate requests are :class:`InputError` naming the feasible range and the
setting to change. HiGHS is deterministic: the same inputs give the same allocation. The relaxation is never
rounded.
Pure: numpy/scipy only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from allocator.discovery.component import Component
from allocator.errors import AllocatorError, AllocatorWarning, InputError
from allocator.scoring.utility import UtilityTable
from allocator.solver.budget import describe_params
from allocator.solver.program import Program, build_program, group_candidates
from allocator.solver.reduction import Reduction, polish, reduce_program
from allocator.solver.settings import COARSE_RANKS, DEFAULT_RANKS, DENSE_RANKS, SolverSettings

__all__ = [
    "COARSE_RANKS",
    "DEFAULT_RANKS",
    "DENSE_RANKS",
    "Allocation",
    "Program",
    "SolverSettings",
    "build_program",
    "decode",
    "solve",
]

_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "error"}


@dataclass(frozen=True)
class Allocation:
    """The solver's answer: a rank for every eligible component (0 = no adapter) and the totals."""

    ranks: dict[str, int]  # every eligible component name, sorted
    cost: int  # sum of lora_params over ranks; <= budget
    utility: float  # sum of table utilities at the chosen ranks
    risk: float  # sum of table risks at the chosen ranks (0 without risk)
    budget: int
    status: str  # "optimal" | "time_limit"
    mip_gap: float
    granularity: str
    groups: dict[str, tuple[str, ...]]  # group label -> member names (candidates only)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["groups"] = {k: list(v) for k, v in self.groups.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) != known:
            raise InputError(
                f"Allocation fields differ: unknown {sorted(set(data) - known)}, "
                f"missing {sorted(known - set(data))}"
            )
        data = dict(data)
        data["groups"] = {k: tuple(v) for k, v in data.get("groups", {}).items()}
        return cls(**data)


def solve(
    components: Sequence[Component], table: UtilityTable, budget: int, settings: SolverSettings | None = None
) -> Allocation:
    """Choose ranks maximising ``sum u - risk_weight * sum risk`` with cost <= ``budget`` (parameters).

    Raises:
        InputError: the budget is outside the feasible range (the message gives it, in parameters and as a
            uniform rank), a share bound or required family cannot be met, or nothing can be adapted.
        AllocatorError: HiGHS failed or found no allocation within ``time_limit``.
    """
    settings = settings or SolverSettings()
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise InputError(
            f"budget must be a positive number of parameters, got {budget!r}; see Budget.resolve"
        )
    budget = int(budget)
    program = build_program(components, table, budget, settings)
    _check_feasible_range(program.family_costs, budget, settings, components)
    reduction = reduce_program(program) if settings.reduce else None
    b_u = (program.b_u if reduction is None else reduction.b_u).copy()
    # one-hot rows come first
    budget_row = len(program.group_labels) - (program.A.shape[0] - len(b_u))
    for _ in range(3):  # a tolerance slip past B is re-solved with a tighter row; in practice never
        x, status, gap = _run_milp(program, reduction, b_u, settings, components)
        allocation = decode(program, x, status=status, mip_gap=gap)
        over = allocation.cost - budget
        if over <= 0:
            break
        b_u[budget_row] -= math.ceil(over / program.cost_unit)
    else:
        raise AllocatorError(
            f"HiGHS kept returning allocations over the budget {budget:,}; report this as a bug"
        )
    if status == "time_limit":
        warnings.warn(
            f"the solver stopped at time_limit={settings.time_limit:g}s with MIP gap "
            f"{allocation.mip_gap:.2g}; raise SolverSettings.time_limit or mip_rel_gap to get (or accept) a "
            "proven optimum",
            AllocatorWarning,
            stacklevel=2,
        )
    return allocation


def _run_milp(
    program: Program,
    reduction: Reduction | None,
    b_u: np.ndarray,
    settings: SolverSettings,
    components: Sequence[Component],
) -> tuple[np.ndarray, str, float | None]:
    """The one ``milp`` call, on the reduced program if there is one; returns (x over all columns, status,
    gap)."""
    if reduction is None:
        c, A, b_l, rel_gap = program.c, program.A, program.b_l, settings.mip_rel_gap
    else:
        # every group fixed: the incumbent is the proven optimum, nothing to ask HiGHS
        if reduction.cols.size == 0:
            return reduction.incumbent_x, "optimal", 0.0
        # the Lagrangian bound already proves the incumbent within mip_rel_gap: what HiGHS would stop at
        if reduction.gap <= settings.mip_rel_gap:
            return reduction.incumbent_x, "optimal", reduction.gap
        c, A, b_l = reduction.c, reduction.A, reduction.b_l
        # HiGHS measures its gap against the residual objective, a small part of the whole: rescale the
        # tolerance
        sub = abs(reduction.incumbent + float(program.c @ reduction.fixed))
        rel_gap = (
            min(0.5, settings.mip_rel_gap * abs(reduction.incumbent) / sub)
            if sub > 0
            else settings.mip_rel_gap
        )
    res = milp(
        c,
        integrality=np.ones(c.size, dtype=np.int8),
        bounds=Bounds(0.0, 1.0),
        constraints=LinearConstraint(A, b_l, b_u),
        options={
            "time_limit": settings.time_limit,
            "mip_rel_gap": rel_gap,
            "presolve": settings.presolve,
            "disp": False,
        },
    )
    status = _STATUS.get(res.status, "error")
    if res.x is None:
        _raise_failure(program, settings, status, res.message, components)
    bound = -res.mip_dual_bound if res.mip_dual_bound is not None else np.nan  # upper bound, maximise sense
    if reduction is None:
        x = polish(program, res.x)
        return x, status, _gap(bound, -float(program.c @ x))
    x = polish(program, reduction.expand(res.x))
    bound = float(np.fmin(bound - float(program.c @ reduction.fixed), reduction.bound))
    if -float(program.c @ x) < reduction.incumbent:  # HiGHS stopped, within its gap, below our incumbent
        x = reduction.incumbent_x
    return x, status, _gap(bound, -float(program.c @ x))


def _gap(bound: float, value: float) -> float | None:
    """Proven relative gap ``(bound - value) / |value|`` (``None`` without a bound)."""
    if not np.isfinite(bound):
        return None
    return max(0.0, bound - value) / max(abs(value), 1e-300)


def decode(
    program: Program, x: np.ndarray, *, status: str = "optimal", mip_gap: float | None = 0.0
) -> Allocation:
    """Read a MIP solution: the one selected option per group -> member ranks, exact cost, utility and risk.

    ``x`` must be integral (a MIP solution); a fractional ``x`` raises AllocatorError instead of being
    rounded.
    """
    x = np.asarray(x, dtype=float)
    if np.max(np.abs(x - np.round(x)), initial=0.0) > 1e-6:
        raise AllocatorError("decode needs an integral solution; never round a relaxation")
    chosen = np.flatnonzero(x > 0.5)
    n_g = len(program.group_labels)
    if chosen.size != n_g or np.any(np.bincount(program.col_group[chosen], minlength=n_g) != 1):
        raise AllocatorError("solution does not pick exactly one rank per group; this is a solver bug")
    option = np.zeros(n_g, dtype=np.int64)
    option[program.col_group[chosen]] = program.col_option[chosen]
    member_rank = program.member_ranks(option)
    if program.member_names == program.eligible_names:  # every eligible component is a candidate
        ranks = dict(zip(program.member_names, member_rank.tolist()))
    else:
        ranks = dict.fromkeys(program.eligible_names, 0)
        ranks.update(zip(program.member_names, member_rank.tolist()))
    cost = int(member_rank @ program.member_params)  # lora_params of every member, exact int64
    return Allocation(
        ranks=ranks,
        cost=cost,
        utility=float(program.col_utility[chosen].sum()),
        risk=float(program.col_risk[chosen].sum()),
        budget=program.budget,
        status=status,
        mip_gap=float("nan") if mip_gap is None else float(mip_gap),
        granularity=program.granularity,
        groups=dict(zip(program.group_labels, program.group_members)),
    )


def check_budget(
    components: Sequence[Component], budget: int, settings: SolverSettings | None = None
) -> None:
    """Raise :class:`InputError` now if no allocation of the eligible ``components`` can meet ``budget`` under
    ``settings`` (the range and share checks of :func:`solve`), so a bad budget fails before minutes of
    probing.

    Computed from costs alone (:func:`~allocator.solver.program.group_candidates`). Probing may still leave
    modules out (no gradient), which can only narrow the range; :func:`solve` checks again.
    """
    settings = settings or SolverSettings()
    if not any(c.eligible for c in components):
        raise InputError("nothing can be adapted: no eligible module; see `allocate inspect`")
    fams = group_candidates(components, None, settings).family_costs()
    _check_feasible_range(fams, int(budget), settings, components)


def _check_feasible_range(
    fams: dict[str, tuple[int, int]], B: int, settings: SolverSettings, components: Sequence[Component]
) -> None:
    """Errors for budgets no allocation can meet, stated in parameters and uniform ranks, naming the fix.

    ``fams``: {family: (cheapest non-zero option, every group at its top option)} (``Groups.family_costs``).
    """
    top = sum(hi for _, hi in fams.values())
    low = {
        f: max(
            fams[f][0] if f in settings.required else 0,
            math.ceil(settings.share_bounds.get(f, (0.0, 1.0))[0] * B - 1e-9),
        )
        for f in fams
    }
    floor = max(sum(low.values()), min(lo for lo, _ in fams.values()))

    def span() -> str:
        return f"feasible range {describe_params(floor, components)} to {describe_params(top, components)}"

    for f in sorted(set(settings.required) | {f for f, (lo, _) in settings.share_bounds.items() if lo > 0}):
        if f not in fams:
            raise InputError(
                f"family {f!r} is required or has a share lower bound, but none of its modules "
                "can be adapted; drop it from required/share_bounds"
            )
        cheap, most = fams[f]
        lo, hi = settings.share_bounds.get(f, (0.0, 1.0))
        if f in settings.required and cheap > math.floor(hi * B + 1e-9):
            raise InputError(
                f"required family {f!r} needs at least {describe_params(cheap, components)} "
                f"but its share bound {hi:g} allows "
                f"{describe_params(math.floor(hi * B), components)}; raise it or the budget"
            )
        if most < lo * B:
            raise InputError(
                f"share lower bound {lo:g} asks {f!r} for "
                f"{describe_params(math.ceil(lo * B), components)} but it can absorb at most "
                f"{describe_params(most, components)} at rank {settings.ranks[-1]}; lower the "
                "bound or the budget"
            )
    if B < floor:
        why = (
            "the required families and share lower bounds need"
            if floor > min(lo for lo, _ in fams.values())
            else "the cheapest adapter costs"
        )
        raise InputError(
            f"budget {describe_params(B, components)} is below the "
            f"{describe_params(floor, components)} {why}; raise the budget ({span()})"
        )
    if B > top:
        raise InputError(
            f"budget {describe_params(B, components)} exceeds the "
            f"{describe_params(top, components)} of every adaptable module at rank "
            f"{settings.ranks[-1]}; lower the budget or add larger ranks to "
            f"SolverSettings.ranks ({span()})"
        )


def _raise_failure(
    program: Program, settings: SolverSettings, status: str, message: str, components: Sequence[Component]
) -> None:
    if status == "infeasible":
        rows = [lab for lab in program.row_labels if lab.startswith(("share[", "required["))]
        raise InputError(
            f"no allocation meets {', '.join(rows) or 'the constraints'} at budget "
            f"{describe_params(program.budget, components)} on the rank grid {settings.ranks}; "
            "the grid is too coarse for these bounds: widen share_bounds, add ranks or change "
            "the budget"
        )
    if status == "time_limit":
        raise AllocatorError(
            f"HiGHS found no allocation within time_limit={settings.time_limit:g}s; raise it"
        )
    raise AllocatorError(f"HiGHS failed ({status}: {message}); report this with the inputs")
