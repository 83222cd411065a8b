"""The rank-allocation integer program as arrays: ``build_program(...) -> Program`` (math in
``docs/solver.md``).

Stage 4a. Input: components, a :class:`~allocator.scoring.utility.UtilityTable`, a budget in parameters and
:class:`~allocator.solver.solve.SolverSettings`. Output: a :class:`Program` holding ``c``, sparse ``A``, row
bounds,
variable bounds and integrality for ``scipy.optimize.milp``, a label for every row and column, and what
:func:`allocator.solver.solve.decode` needs to map a solution back to ranks. Construction is vectorised
(numpy and one
``scipy.sparse`` matrix); a 100,000-group program builds in about a second. Pure: numpy/scipy only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from allocator.discovery.component import Component
from allocator.errors import InputError

if TYPE_CHECKING:
    from allocator.scoring.utility import UtilityTable
    from allocator.solver.settings import SolverSettings


def group_key(c: Component, granularity: str) -> tuple:
    """Members with equal keys share one rank: ``module``: the name; ``layer-type``: (layer, family, kind);
    ``type``: (family, kind)."""
    if granularity == "module":
        return (c.name,)
    if granularity == "layer-type":
        return (c.layer is None, -1 if c.layer is None else int(c.layer), c.family, c.kind)
    return (c.family, c.kind)


def group_label(key: tuple, granularity: str) -> str:
    """``'model.layers.3.self_attn.q_proj'``, ``'layer3/attention/softmax'`` (``'nolayer/...'``) or
    ``'mlp/dense'``."""
    if granularity == "module":
        return key[0]
    if granularity == "layer-type":
        return f"{'nolayer' if key[0] else f'layer{key[1]}'}/{key[2]}/{key[3]}"
    return f"{key[0]}/{key[1]}"


def candidates(components: Sequence[Component], allowed: Collection[str] | None, settings: SolverSettings
               ) -> list[Component]:
    """Components the solver may give budget: eligible, in ``allowed`` (the modules with a utility row; None:
    all),
    passing include/exclude; sorted by name."""
    known = {c.name for c in components}
    stray = [n for n in (allowed or ()) if n not in known]
    if stray:
        raise InputError(
            f"utility table names {len(stray)} modules the model lacks (e.g. {stray[0]!r}); compute "
            "utilities for this model's components"
        )
    inc = [re.compile(p) for p in settings.include]
    exc = [re.compile(p) for p in settings.exclude]
    allowed = None if allowed is None else frozenset(allowed)  # a tuple made this O(n^2): 330 s at 100k
    return sorted(
        (
            c
            for c in components
            if c.eligible
            and (allowed is None or c.name in allowed)
            and (not inc or any(p.search(c.name) for p in inc))
            and not any(p.search(c.name) for p in exc)
        ),
        key=lambda c: c.name,
    )


@dataclass(frozen=True, eq=False)
class Groups:
    """Candidates grouped by the granularity, with the exact LoRA cost of every group at every grid rank.

    Everything the budget checks need and nothing of the utilities:
    :func:`allocator.solver.solve.check_budget`
    reads the feasible range from it before any probing.
    """

    members: tuple[Component, ...]  # by name; narrower than the smallest non-zero rank: dropped
    member_group: np.ndarray  # (n_mem,) group index
    member_cap: np.ndarray  # (n_mem,) largest grid index with rank <= min(d_in, d_out)
    member_option: np.ndarray  # (n_mem, J) the member's grid option when its group takes option j
    keys: tuple[tuple, ...]  # group keys, sorted
    family: tuple[str, ...]  # family of each group
    cost: np.ndarray  # (G, J) int64 exact LoRA parameters of each group at each option
    top: np.ndarray  # (G,) highest option a group offers (options above every member's cap repeat it)

    def family_costs(self) -> dict[str, tuple[int, int]]:
        """{family: (cheapest non-zero option of any of its groups, all its groups at their top option)}."""
        out: dict[str, tuple[int, int]] = {}
        fam = np.asarray(self.family, dtype=object)
        top_cost = self.cost[np.arange(len(self.keys)), self.top]
        for f in sorted(set(self.family)):
            sel = fam == f
            out[f] = (int(self.cost[sel][:, 1:].min()), int(top_cost[sel].sum()))
        return out


def group_candidates(components: Sequence[Component], allowed: Collection[str] | None,
                     settings: SolverSettings) -> Groups:
    """Group the candidates (see :func:`candidates`) and cost every group at every grid rank."""
    grid = settings.ranks
    members = candidates(components, allowed, settings)
    g_arr = np.asarray(grid, dtype=np.int64)  # (J,)
    cap = np.searchsorted(g_arr, [min(c.d_in, c.d_out) for c in members], side="right") - 1  # (n_mem,)
    members = [c for c, k in zip(members, cap) if k > 0]  # narrower than the smallest rank: never adaptable
    cap = cap[cap > 0]
    if not members:
        raise InputError("no module can be adapted: none is eligible, has utility and passes include/exclude")
    keys = [group_key(c, settings.granularity) for c in members]
    uniq = sorted(set(keys))
    gid = {k: i for i, k in enumerate(uniq)}
    mg = np.array([gid[k] for k in keys], dtype=np.int64)  # (n_mem,)
    opt = np.minimum(np.arange(len(grid))[None, :], cap[:, None])  # (n_mem, J)
    p = np.array([c.n_params_per_rank for c in members], dtype=np.int64)
    cost = _group_sum(mg, g_arr[opt] * p[:, None], len(uniq))  # exact: lora_params(d_in, d_out, r, n_experts)
    top = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(top, mg, cap)
    first: dict[int, str] = {}
    for c, g in zip(members, mg.tolist()):
        first.setdefault(g, c.family)  # a group key always contains the family (or the name) of its members
    return Groups(
        members=tuple(members),
        member_group=mg,
        member_cap=cap,
        member_option=opt,
        keys=tuple(uniq),
        family=tuple(first[g] for g in range(len(uniq))),
        cost=cost,
        top=top,
    )


@dataclass(frozen=True, eq=False)
class Program:
    """``min c @ x  s.t.  b_l <= A @ x <= b_u,  lb <= x <= ub,  x binary``; one column per (group, grid
    rank)."""

    c: np.ndarray  # (n_cols,) = -(utility - risk_weight * risk) / objective_scale
    A: sp.csr_array  # (n_rows, n_cols)
    b_l: np.ndarray  # (n_rows,)
    b_u: np.ndarray  # (n_rows,)
    lb: np.ndarray  # (n_cols,) zeros
    ub: np.ndarray  # (n_cols,) ones
    integrality: np.ndarray  # (n_cols,) ones: every column binary
    row_labels: tuple[str, ...]  # one_hot[group], budget, share[family], required[family]
    col_group: np.ndarray  # (n_cols,) group index
    col_option: np.ndarray  # (n_cols,) index into grid
    col_cost: np.ndarray  # (n_cols,) int64 exact LoRA parameters of the group at that option
    col_utility: np.ndarray  # (n_cols,) sum of member utilities
    col_risk: np.ndarray  # (n_cols,) sum of member risks (zeros without risk)
    group_labels: tuple[str, ...]
    group_members: tuple[tuple[str, ...], ...]
    group_family: tuple[str, ...]
    members: tuple[Component, ...]  # candidates in a group, by name
    member_group: np.ndarray  # (n_members,)
    member_cap: np.ndarray  # (n_members,) largest grid index with rank <= min(d_in, d_out)
    grid: tuple[int, ...]
    budget: int
    cost_unit: int  # gcd of all column costs; cost rows are divided by it (exact)
    objective_scale: float
    risk_weight: float
    granularity: str
    eligible_names: tuple[str, ...]  # every eligible component: the keys of Allocation.ranks
    family_costs: dict[str, tuple[int, int]]  # Groups.family_costs(): what the budget checks read

    @cached_property
    def col_labels(self) -> tuple[str, ...]:
        """``'x[layer3/attention/softmax, r=16]'`` per column (built on first use: 800k strings cost time)."""
        return tuple(
            f"x[{self.group_labels[g]}, r={self.grid[j]}]" for g, j in zip(self.col_group, self.col_option)
        )

    def member_ranks(self, option: np.ndarray) -> np.ndarray:
        """Rank of every member when group g takes grid option ``option[g]`` (capped at the member's usable
        rank)."""
        return np.asarray(self.grid)[np.minimum(option[self.member_group], self.member_cap)]


def build_program(
    components: Sequence[Component], table: UtilityTable, budget: int, settings: SolverSettings
) -> Program:
    """Arrays for one ``milp`` call; see ``docs/solver.md``. Raises InputError when nothing can be adapted."""
    grid = settings.ranks
    col_of = {r: j for j, r in enumerate(table.ranks)}
    missing = [r for r in grid if r not in col_of]
    if missing:
        raise InputError(
            f"utility table ranks {table.ranks} lack solver ranks {missing}; compute utilities on "
            "SolverSettings.ranks"
        )
    groups = group_candidates(components, table.names, settings)
    n_g, n_j = len(groups.keys), len(grid)
    rows = table.index()
    ridx = np.array([rows[c.name] for c in groups.members])
    jcols = np.array([col_of[r] for r in grid])
    util = _group_sum(
        groups.member_group,
        np.take_along_axis(table.values[ridx][:, jcols], groups.member_option, axis=1),
        n_g,
    )
    risk = np.zeros_like(util)
    if table.risk is not None:
        risk = _group_sum(
            groups.member_group,
            np.take_along_axis(table.risk[ridx][:, jcols], groups.member_option, axis=1),
            n_g,
        )
    # (G, J): options above every member's cap not offered
    mask = np.arange(n_j)[None, :] <= groups.top[:, None]
    col_group, col_option = np.nonzero(mask)  # row-major: columns of a group are contiguous
    col_cost, col_util, col_risk = groups.cost[mask], util[mask], risk[mask]
    obj = col_util - table.risk_weight * col_risk
    scale = float(np.max(np.abs(obj))) or 1.0
    unit = int(np.gcd.reduce(col_cost[col_cost > 0])) if np.any(col_cost > 0) else 1
    A, b_l, b_u, labels = _constraint_rows(groups, col_group, col_option, col_cost, unit, budget, settings)
    return Program(
        c=-obj / scale,
        A=A,
        b_l=b_l,
        b_u=b_u,
        lb=np.zeros(col_group.size),
        ub=np.ones(col_group.size),
        integrality=np.ones(col_group.size, dtype=np.int8),
        row_labels=labels,
        col_group=col_group,
        col_option=col_option,
        col_cost=col_cost,
        col_utility=col_util,
        col_risk=col_risk,
        group_labels=tuple(group_label(k, settings.granularity) for k in groups.keys),
        group_members=_members_by_group(groups.members, groups.member_group, n_g),
        group_family=groups.family,
        members=groups.members,
        member_group=groups.member_group,
        member_cap=groups.member_cap,
        grid=tuple(grid),
        budget=int(budget),
        cost_unit=unit,
        objective_scale=scale,
        risk_weight=table.risk_weight,
        granularity=settings.granularity,
        eligible_names=tuple(sorted(c.name for c in components if c.eligible)),
        family_costs=groups.family_costs(),
    )


def _constraint_rows(
    groups: Groups,
    col_group: np.ndarray,
    col_option: np.ndarray,
    col_cost: np.ndarray,
    unit: int,
    budget: int,
    settings: SolverSettings,
) -> tuple[sp.csr_array, np.ndarray, np.ndarray, tuple[str, ...]]:
    """The rows of the program: one-hot per group, the budget, family shares, required families."""
    n_g, n_cols = len(groups.keys), col_group.size
    fam_of_col = np.asarray(groups.family, dtype=object)[col_group]
    lo_rows, hi_rows, labels, blocks = [], [], [], []
    # one_hot[g]: sum_j x[g, j] == 1
    blocks.append(sp.csr_array((np.ones(n_cols), (col_group, np.arange(n_cols))), shape=(n_g, n_cols)))
    lo_rows.append(np.ones(n_g))
    hi_rows.append(np.ones(n_g))
    labels += [f"one_hot[{group_label(k, settings.granularity)}]" for k in groups.keys]
    # budget: sum cost x <= B  (in units of gcd: exact integers, smaller coefficients)
    blocks.append(sp.csr_array((col_cost / unit)[None, :]))
    lo_rows.append(np.zeros(1))
    hi_rows.append(np.array([budget // unit], dtype=float))
    labels.append("budget")
    for fam, (lo, hi) in sorted(settings.share_bounds.items()):
        sel = fam_of_col == fam
        blocks.append(sp.csr_array(np.where(sel, col_cost / unit, 0.0)[None, :]))
        lo_rows.append(np.array([math.ceil(lo * budget / unit - 1e-9)], dtype=float))
        hi_rows.append(np.array([math.floor(hi * budget / unit + 1e-9)], dtype=float))
        labels.append(f"share[{fam}]")
    for fam in settings.required:
        blocks.append(sp.csr_array(((fam_of_col == fam) & (col_option > 0)).astype(float)[None, :]))
        lo_rows.append(np.ones(1))
        hi_rows.append(np.full(1, np.inf))
        labels.append(f"required[{fam}]")
    A = sp.csr_array(sp.vstack(blocks, format="csr"))
    return A, np.concatenate(lo_rows), np.concatenate(hi_rows), tuple(labels)


def _group_sum(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum member rows into group rows; (n_mem, J) -> (n_groups, J), dtype kept (int64 costs stay exact)."""
    out = np.zeros((n_groups, values.shape[1]), dtype=values.dtype)
    np.add.at(out, group, values)
    return out


def _members_by_group(members: Sequence[Component], mg: np.ndarray, n_g: int) -> tuple[tuple[str, ...], ...]:
    out: list[list[str]] = [[] for _ in range(n_g)]
    for c, g in zip(members, mg):
        out[g].append(c.name)
    return tuple(tuple(v) for v in out)
