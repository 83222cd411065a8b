"""Stage 4: utilities x budget -> ranks. Build, solve (one ``scipy.optimize.milp`` call, HiGHS), decode.

``solve(components, table, budget, settings) -> Allocation`` maximises total utility minus weighted retention risk
over one rank per group, with total LoRA cost <= budget, optional per-family budget shares and required families.
The program is written out in ``docs/solver.md``; ``build_program`` (``allocator/program.py``) makes its arrays and
``reduce_program`` (``allocator/reduction.py``) drops options a Lagrangian bound proves useless before HiGHS.
Infeasible or degenerate requests are :class:`InputError` naming the feasible range and the setting to change.
HiGHS is deterministic: the same inputs give the same allocation. The relaxation is never rounded.
Pure: numpy/scipy only.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from allocator.budget import describe_params, lora_params
from allocator.components import FAMILIES, Component
from allocator.errors import AllocatorError, AllocatorWarning, InputError
from allocator.program import Program, build_program
from allocator.reduction import Reduction, reduce_program
from allocator.utility import UtilityTable, check_ranks
from probes.settings import Range, check_ranges, ranged

__all__ = ["COARSE_RANKS", "DEFAULT_RANKS", "DENSE_RANKS", "Allocation", "Program", "SolverSettings", "build_program",
           "decode", "solve"]

GRANULARITIES = ("module", "layer-type", "type")
_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "error"}


# Dense at the low end so that budget can move in small steps: on the placement benchmark (each cell at uniform's
# best lr) the coarse grid's plan at a uniform-r1 budget (rank 4 on a quarter of the modules) was worse in mean than
# uniform on Falcon-H1, while the dense grid was never worse in mean and beat uniform on the fact task
# (docs/method.md). COARSE_RANKS is the earlier default, kept as a named alternative.
DENSE_RANKS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
COARSE_RANKS = (0, 4, 8, 16, 32, 64)
DEFAULT_RANKS = DENSE_RANKS


@dataclass(frozen=True)
class SolverSettings:
    """What the integer program may choose and how long it may search. Validated at construction."""

    granularity: str = field(
        default="layer-type",
        metadata={"help": "one rank per: module | layer-type (same kind in one layer) | type (same kind everywhere)"},
    )
    ranks: tuple[int, ...] = ranged(DEFAULT_RANKS, "rank grid, strictly increasing from 0", Range(0, integer=True))
    align: int = ranged(1, "every non-zero grid rank must be a multiple of this", Range(1, integer=True))
    share_bounds: dict[str, tuple[float, float]] = field(
        default_factory=dict,
        metadata={"help": "budget share per family as lo:hi fractions of the budget, e.g. attention=0.1:0.5"},
    )
    required: tuple[str, ...] = field(default=(), metadata={"help": "families that must get a non-zero rank somewhere"})
    include: tuple[str, ...] = field(
        default=(), metadata={"help": "regexes; if given, only matching module names may get budget"}
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "regexes; matching module names never get budget"})
    time_limit: float = ranged(60.0, "seconds HiGHS may search", Range(0, lo_open=True))
    mip_rel_gap: float = ranged(1e-6, "relative optimality gap at which HiGHS stops", Range(0, 1, hi_open=True))
    presolve: bool = field(
        default=False,
        metadata={"help": "let HiGHS presolve (off: on these programs it costs more than it saves, see docs/solver.md)"},
    )
    reduce: bool = field(
        default=True,
        metadata={"help": "drop rank options a Lagrangian bound proves non-optimal before calling HiGHS (exact)"},
    )

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InputError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if not isinstance(self.ranks, (tuple, list)):
            raise InputError(f"SolverSettings.ranks must be a sequence of ranks, got {self.ranks!r}")
        check_ranges(self, InputError)
        ranks = check_ranks(self.ranks, "SolverSettings.ranks")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "align", int(self.align))
        off = [r for r in ranks if r % self.align]
        if off:
            raise InputError(f"ranks {off} are not multiples of align={self.align}; drop them or lower align")
        bounds = {}
        for fam, pair in dict(self.share_bounds).items():
            try:
                lo, hi = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise InputError(f"share_bounds[{fam!r}] must be a (lo, hi) pair, got {pair!r}") from None
            if not 0 <= lo <= hi <= 1:
                raise InputError(f"share_bounds[{fam!r}] = ({lo}, {hi}) needs 0 <= lo <= hi <= 1; fix the pair")
            bounds[str(fam)] = (lo, hi)
        if sum(lo for lo, _ in bounds.values()) > 1 + 1e-12:
            named = ", ".join(f"{f}>={lo:g}" for f, (lo, _) in sorted(bounds.items()) if lo > 0)
            raise InputError(f"share lower bounds sum to more than the whole budget ({named}); lower them")
        object.__setattr__(self, "share_bounds", dict(sorted(bounds.items())))
        required = tuple(sorted({str(f) for f in self.required}))
        object.__setattr__(self, "required", required)
        bad = sorted((set(bounds) | set(required)) - set(FAMILIES))
        if bad:
            raise InputError(f"unknown families {bad} in share_bounds/required; families are {list(FAMILIES)}")
        capped = [f for f in required if bounds.get(f, (0, 1))[1] == 0]
        if capped:
            raise InputError(f"families {capped} are required but their share upper bound is 0; drop one of the two")
        for name in ("include", "exclude"):
            patterns = tuple(str(p) for p in getattr(self, name))
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise InputError(f"{name} pattern {p!r} is not a regex ({exc}); fix or escape it") from None
            object.__setattr__(self, name, patterns)
        for name in ("time_limit", "mip_rel_gap"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["share_bounds"] = {k: list(v) for k, v in self.share_bounds.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SolverSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown SolverSettings fields {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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
            raise InputError(f"Allocation fields differ: unknown {sorted(set(data) - known)}, "
                             f"missing {sorted(known - set(data))}")
        data = dict(data)
        data["groups"] = {k: tuple(v) for k, v in data.get("groups", {}).items()}
        return cls(**data)


def solve(
    components: Sequence[Component], table: UtilityTable, budget: int, settings: SolverSettings | None = None
) -> Allocation:
    """Choose ranks maximising ``sum u - risk_weight * sum risk`` with cost <= ``budget`` (parameters).

    Raises:
        InputError: the budget is outside the feasible range (the message gives it, in parameters and as a uniform
            rank), a share bound or required family cannot be met, or nothing can be adapted.
        AllocatorError: HiGHS failed or found no allocation within ``time_limit``.
    """
    settings = settings or SolverSettings()
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise InputError(f"budget must be a positive number of parameters, got {budget!r}; see Budget.resolve")
    budget = int(budget)
    program = build_program(components, table, budget, settings)
    _check_feasible_range(program, settings, components)
    reduction = reduce_program(program) if settings.reduce else None
    b_u = (program.b_u if reduction is None else reduction.b_u).copy()
    budget_row = program.row_labels.index("budget") - (program.A.shape[0] - len(b_u))  # one-hot rows come first
    for _ in range(3):  # a tolerance slip past B is re-solved with a tighter row; in practice never
        x, status, gap = _run_milp(program, reduction, b_u, settings, components)
        allocation = decode(program, x, status=status, mip_gap=gap)
        over = allocation.cost - budget
        if over <= 0:
            break
        b_u[budget_row] -= math.ceil(over / program.cost_unit)
    else:
        raise AllocatorError(f"HiGHS kept returning allocations over the budget {budget:,}; report this as a bug")
    if status == "time_limit":
        warnings.warn(
            f"the solver stopped at time_limit={settings.time_limit:g}s with MIP gap {allocation.mip_gap:.2g}; "
            "raise SolverSettings.time_limit or mip_rel_gap to get (or accept) a proven optimum",
            AllocatorWarning,
            stacklevel=2,
        )
    return allocation


def _run_milp(program: Program, reduction: Reduction | None, b_u: np.ndarray, settings: SolverSettings,
              components: Sequence[Component]) -> tuple[np.ndarray, str, float | None]:
    """The one ``milp`` call, on the reduced program if there is one; returns (x over all columns, status, gap)."""
    if reduction is None:
        c, A, b_l, rel_gap = program.c, program.A, program.b_l, settings.mip_rel_gap
    else:
        if reduction.c.size == 0:  # every group fixed: the incumbent is the proven optimum, nothing to ask HiGHS
            return reduction.incumbent_x, "optimal", 0.0
        c, A, b_l = reduction.c, reduction.A, reduction.b_l
        # HiGHS measures its gap against the residual objective, a small part of the whole: rescale the tolerance
        sub = abs(reduction.incumbent + float(program.c @ reduction.fixed))
        rel_gap = min(0.5, settings.mip_rel_gap * abs(reduction.incumbent) / sub) if sub > 0 else settings.mip_rel_gap
    res = milp(
        c,
        integrality=np.ones(c.size, dtype=np.int8),
        bounds=Bounds(0.0, 1.0),
        constraints=LinearConstraint(A, b_l, b_u),
        options={"time_limit": settings.time_limit, "mip_rel_gap": rel_gap, "presolve": settings.presolve,
                 "disp": False},
    )
    status = _STATUS.get(res.status, "error")
    if res.x is None:
        _raise_failure(program, settings, status, res.message, components)
    bound = -res.mip_dual_bound if res.mip_dual_bound is not None else np.nan  # upper bound, maximise sense
    if reduction is None:
        return res.x, status, _gap(bound, -float(res.fun))
    x = reduction.expand(res.x)
    bound = float(np.fmin(bound - float(program.c @ reduction.fixed), reduction.bound))
    if -float(program.c @ x) < reduction.incumbent:  # HiGHS stopped, within its gap, below our incumbent
        x = reduction.incumbent_x
    return x, status, _gap(bound, -float(program.c @ x))


def _gap(bound: float, value: float) -> float | None:
    """Proven relative gap ``(bound - value) / |value|`` (``None`` without a bound)."""
    if not np.isfinite(bound):
        return None
    return max(0.0, bound - value) / max(abs(value), 1e-300)


def decode(program: Program, x: np.ndarray, *, status: str = "optimal", mip_gap: float | None = 0.0) -> Allocation:
    """Read a MIP solution: the one selected option per group -> member ranks, exact cost, utility and risk.

    ``x`` must be integral (a MIP solution); a fractional ``x`` raises AllocatorError instead of being rounded.
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
    ranks = dict.fromkeys(program.eligible_names, 0)
    cost = 0
    for c, r in zip(program.members, member_rank.tolist()):
        ranks[c.name] = int(r)
        cost += lora_params(c.d_in, c.d_out, r, c.n_experts)
    return Allocation(
        ranks=ranks,
        cost=int(cost),
        utility=float(program.col_utility[chosen].sum()),
        risk=float(program.col_risk[chosen].sum()),
        budget=program.budget,
        status=status,
        mip_gap=float("nan") if mip_gap is None else float(mip_gap),
        granularity=program.granularity,
        groups=dict(zip(program.group_labels, program.group_members)),
    )


def _family_costs(program: Program) -> dict[str, tuple[int, int]]:
    """{family: (cheapest non-zero option of any group, every group at its top option)}."""
    out: dict[str, tuple[int, int]] = {}
    fam = np.asarray(program.group_family, dtype=object)
    last = np.r_[program.col_group[1:] != program.col_group[:-1], True]  # a group's last column is its top option
    top = program.col_cost[last]
    nonzero = program.col_option > 0
    for f in sorted(set(program.group_family)):
        sel = nonzero & (fam[program.col_group] == f)
        out[f] = (int(program.col_cost[sel].min()), int(top[fam == f].sum()))
    return out


def check_budget(components: Sequence[Component], budget: int, settings: SolverSettings | None = None) -> None:
    """Raise :class:`InputError` now if no allocation of the eligible ``components`` can meet ``budget`` under
    ``settings`` (the range and share checks of :func:`solve`), so a bad budget fails before minutes of probing.

    Probing may still leave modules out (no gradient), which can only narrow the range; :func:`solve` checks again.
    """
    from allocator.signals import prior_curves

    settings = settings or SolverSettings()
    rows = [c for c in components if c.eligible]
    if not rows:
        raise InputError("nothing can be adapted: no eligible module; see `allocate inspect`")
    table = UtilityTable(tuple(c.name for c in rows), settings.ranks, prior_curves(rows, settings.ranks))
    _check_feasible_range(build_program(components, table, int(budget), settings), settings, components)


def _check_feasible_range(program: Program, settings: SolverSettings, components: Sequence[Component]) -> None:
    """Errors for budgets no allocation can meet, stated in parameters and uniform ranks, naming the fix."""
    B = program.budget
    fams = _family_costs(program)
    top = sum(hi for _, hi in fams.values())
    low = {f: max(fams[f][0] if f in settings.required else 0,
                  math.ceil(settings.share_bounds.get(f, (0.0, 1.0))[0] * B - 1e-9)) for f in fams}
    floor = max(sum(low.values()), min(lo for lo, _ in fams.values()))

    def span() -> str:
        return f"feasible range {describe_params(floor, components)} to {describe_params(top, components)}"

    for f in sorted(set(settings.required) | {f for f, (lo, _) in settings.share_bounds.items() if lo > 0}):
        if f not in fams:
            raise InputError(f"family {f!r} is required or has a share lower bound, but none of its modules can "
                             "be adapted; drop it from required/share_bounds")
        cheap, most = fams[f]
        lo, hi = settings.share_bounds.get(f, (0.0, 1.0))
        if f in settings.required and cheap > math.floor(hi * B + 1e-9):
            raise InputError(f"required family {f!r} needs at least {describe_params(cheap, components)} but its "
                             f"share bound {hi:g} allows {describe_params(math.floor(hi * B), components)}; raise it "
                             "or the budget")
        if most < lo * B:
            raise InputError(f"share lower bound {lo:g} asks {f!r} for {describe_params(math.ceil(lo * B), components)}"
                             f" but it can absorb at most {describe_params(most, components)} at rank "
                             f"{settings.ranks[-1]}; lower the bound or the budget")
    if B < floor:
        why = "the required families and share lower bounds need" if floor > min(lo for lo, _ in fams.values()) \
            else "the cheapest adapter costs"
        raise InputError(f"budget {describe_params(B, components)} is below the {describe_params(floor, components)} "
                         f"{why}; raise the budget ({span()})")
    if B > top:
        raise InputError(f"budget {describe_params(B, components)} exceeds the {describe_params(top, components)} "
                         f"of every adaptable module at rank {settings.ranks[-1]}; lower the budget or add larger "
                         f"ranks to SolverSettings.ranks ({span()})")


def _raise_failure(program: Program, settings: SolverSettings, status: str, message: str,
                   components: Sequence[Component]) -> None:
    if status == "infeasible":
        rows = [lab for lab in program.row_labels if lab.startswith(("share[", "required["))]
        raise InputError(f"no allocation meets {', '.join(rows) or 'the constraints'} at budget "
                         f"{describe_params(program.budget, components)} on the rank grid {settings.ranks}; the grid is "
                         "too coarse for these bounds: widen share_bounds, add ranks or change the budget")
    if status == "time_limit":
        raise AllocatorError(f"HiGHS found no allocation within time_limit={settings.time_limit:g}s; raise it")
    raise AllocatorError(f"HiGHS failed ({status}: {message}); report this with the inputs")
