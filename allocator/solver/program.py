"""The rank-allocation integer program as arrays: ``build_program(...) -> Program`` (math in
``docs/solver.md``).

Stage 4a. Input: components, a :class:`~allocator.scoring.utility.UtilityTable`, a budget in parameters and
:class:`~allocator.solver.solve.SolverSettings`. Output: a :class:`Program` holding ``c``, sparse ``A``, row
bounds, variable bounds and integrality for ``scipy.optimize.milp``, a label for every row and column, and
what :func:`allocator.solver.solve.decode` needs to map a solution back to ranks. Construction is vectorised
(numpy and one ``scipy.sparse`` matrix); a 100,000-group program builds in about a second. Pure: numpy/scipy
only.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter, itemgetter
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


def candidates(
    components: Sequence[Component],
    allowed: Collection[str] | None,
    settings: SolverSettings,
    eligible: Sequence[Component] | None = None,
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
    allowed = None if allowed is None else frozenset(allowed)  # a tuple made this O(n^2): 330 s at 100k
    if eligible is None:  # the caller may pass the eligible components it already has
        eligible = [c for c in components if c.eligible]
    out = list(eligible) if allowed is None else [c for c in eligible if c.name in allowed]
    if settings.include:
        inc = [re.compile(p) for p in settings.include]
        out = [c for c in out if any(p.search(c.name) for p in inc)]
    for p in map(re.compile, settings.exclude):
        out = [c for c in out if not p.search(c.name)]
    out.sort(key=attrgetter("name"))
    return out


@dataclass(frozen=True, eq=False)
class Groups:
    """Candidates grouped by the granularity, with the exact LoRA cost of every group at every grid rank.

    Everything the budget checks need and nothing of the utilities:
    :func:`allocator.solver.solve.check_budget` reads the feasible range from it before any probing.
    """

    members: tuple[Component, ...]  # by name; narrower than the smallest non-zero rank: dropped
    member_group: np.ndarray  # (n_mem,) group index
    member_cap: np.ndarray  # (n_mem,) largest grid index with rank <= min(d_in, d_out)
    member_option: np.ndarray  # (n_mem, J) the member's grid option when its group takes option j
    member_params: np.ndarray  # (n_mem,) int64 LoRA parameters per rank unit: n_experts * (d_in + d_out)
    keys: tuple[tuple, ...]  # group keys, sorted
    family: tuple[str, ...]  # family of each group
    cost: np.ndarray  # (G, J) int64 exact LoRA parameters of each group at each option
    top: np.ndarray  # (G,) highest option a group offers (options above every member's cap repeat it)

    @cached_property
    def families(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.family)))

    @cached_property
    def family_code(self) -> np.ndarray:
        """(G,) index of each group's family in :attr:`families`."""
        code = {f: i for i, f in enumerate(self.families)}
        return np.array([code[f] for f in self.family], dtype=np.int64)

    def family_costs(self) -> dict[str, tuple[int, int]]:
        """{family: (cheapest non-zero option of any of its groups, all its groups at their top option)}."""
        top_cost = self.cost[np.arange(len(self.keys)), self.top]
        out: dict[str, tuple[int, int]] = {}
        for i, f in enumerate(self.families):
            sel = self.family_code == i
            out[f] = (int(self.cost[sel][:, 1:].min()), int(top_cost[sel].sum()))
        return out


def _group_index(members: Sequence[Component], granularity: str) -> tuple[tuple[tuple, ...], np.ndarray]:
    """Sorted group keys and each member's group index."""
    if granularity == "module":
        names = [c.name for c in members]
        if all(map(operator.lt, names, names[1:])):  # sorted, unique: one group per member, in order
            return tuple(zip(names)), np.arange(len(names))
    keys = [group_key(c, granularity) for c in members]
    uniq = sorted(set(keys))
    gid = {k: i for i, k in enumerate(uniq)}
    return tuple(uniq), np.array([gid[k] for k in keys], dtype=np.int64)


def group_candidates(
    components: Sequence[Component],
    allowed: Collection[str] | None,
    settings: SolverSettings,
    eligible: Sequence[Component] | None = None,
) -> Groups:
    """Group the candidates (see :func:`candidates`) and cost every group at every grid rank."""
    grid = settings.ranks
    members = candidates(components, allowed, settings, eligible)
    g_arr = np.asarray(grid, dtype=np.int64)  # (J,)
    dims = (
        np.array(
            [[c.d_in for c in members], [c.d_out for c in members], [c.n_experts for c in members]],
            dtype=np.int64,
        )
        .reshape(3, -1)
        .T
    )
    cap = np.searchsorted(g_arr, dims[:, :2].min(axis=1), side="right") - 1  # (n_mem,)
    usable = cap > 0  # narrower than the smallest rank: never adaptable
    if not usable.all():
        members = [c for c, k in zip(members, usable) if k]
        dims, cap = dims[usable], cap[usable]
    if not members:
        raise InputError("no module can be adapted: none is eligible, has utility and passes include/exclude")
    keys, mg = _group_index(members, settings.granularity)
    opt = np.minimum(np.arange(len(grid))[None, :], cap[:, None])  # (n_mem, J)
    p = dims[:, 2] * (dims[:, 0] + dims[:, 1])
    cost = _group_sum(mg, g_arr[opt] * p[:, None], len(keys))  # exact: lora_params(d_in, d_out, r, n_experts)
    top = np.zeros(len(keys), dtype=np.int64)
    np.maximum.at(top, mg, cap)
    first = np.unique(mg, return_index=True)[1]  # a group key holds the family (or the name) of its members
    return Groups(
        members=tuple(members),
        member_group=mg,
        member_cap=cap,
        member_option=opt,
        member_params=p,
        keys=keys,
        family=tuple(np.array([c.family for c in members], dtype=object)[first]),
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
    side_labels: tuple[str, ...]  # rows after the one-hot ones: budget, share[family], required[family]
    col_group: np.ndarray  # (n_cols,) group index
    col_option: np.ndarray  # (n_cols,) index into grid
    col_cost: np.ndarray  # (n_cols,) int64 exact LoRA parameters of the group at that option
    col_utility: np.ndarray  # (n_cols,) sum of member utilities
    col_risk: np.ndarray  # (n_cols,) sum of member risks (zeros without risk)
    group_labels: tuple[str, ...]
    group_members: tuple[tuple[str, ...], ...]
    group_family: tuple[str, ...]
    members: tuple[Component, ...]  # candidates in a group, by name
    member_names: tuple[str, ...]
    member_group: np.ndarray  # (n_members,)
    member_cap: np.ndarray  # (n_members,) largest grid index with rank <= min(d_in, d_out)
    member_params: np.ndarray  # (n_members,) int64 LoRA parameters per rank unit
    grid: tuple[int, ...]
    budget: int
    cost_unit: int  # gcd of all column costs; cost rows are divided by it (exact)
    objective_scale: float
    risk_weight: float
    granularity: str
    eligible_names: tuple[str, ...]  # every eligible component: the keys of Allocation.ranks
    family_costs: dict[str, tuple[int, int]]  # Groups.family_costs(): what the budget checks read

    @cached_property
    def row_labels(self) -> tuple[str, ...]:
        """``one_hot[group]`` per group, then ``budget``, ``share[family]``, ``required[family]`` (built on
        first use)."""
        return tuple(f"one_hot[{g}]" for g in self.group_labels) + self.side_labels

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
    eligible = sorted((c for c in components if c.eligible), key=attrgetter("name"))
    groups = group_candidates(components, table.names, settings, eligible)
    n_g, n_j = len(groups.keys), len(grid)
    names = [c.name for c in groups.members]
    ridx = _table_rows(table, names)
    jcols = np.array([col_of[r] for r in grid])

    def gather(values: np.ndarray) -> np.ndarray:  # (G, J) group sums of a member table at member options
        return _group_sum(
            groups.member_group,
            values[ridx][:, jcols][np.arange(len(names))[:, None], groups.member_option],
            n_g,
        )

    util = gather(table.values)
    risk = np.zeros_like(util) if table.risk is None else gather(table.risk)
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
        side_labels=labels,
        col_group=col_group,
        col_option=col_option,
        col_cost=col_cost,
        col_utility=col_util,
        col_risk=col_risk,
        group_labels=(
            tuple(map(itemgetter(0), groups.keys))
            if settings.granularity == "module"
            else tuple(group_label(k, settings.granularity) for k in groups.keys)
        ),
        group_members=_members_by_group(names, groups.member_group, n_g),
        group_family=groups.family,
        members=groups.members,
        member_names=tuple(names),
        member_group=groups.member_group,
        member_cap=groups.member_cap,
        member_params=groups.member_params,
        grid=tuple(grid),
        budget=int(budget),
        cost_unit=unit,
        objective_scale=scale,
        risk_weight=table.risk_weight,
        granularity=settings.granularity,
        eligible_names=tuple(c.name for c in eligible),
        family_costs=groups.family_costs(),
    )


def _table_rows(table: UtilityTable, names: list[str]) -> np.ndarray:
    """Row of each name in the utility table (an identity when the table lists exactly these names)."""
    if len(table.names) == len(names) and all(map(operator.eq, table.names, names)):
        return np.arange(len(names))
    rows = table.index()
    return np.array([rows[n] for n in names], dtype=np.int64)


def _constraint_rows(
    groups: Groups,
    col_group: np.ndarray,
    col_option: np.ndarray,
    col_cost: np.ndarray,
    unit: int,
    budget: int,
    settings: SolverSettings,
) -> tuple[sp.csr_array, np.ndarray, np.ndarray, tuple[str, ...]]:
    """The rows of the program: one-hot per group, then the budget, family shares, required families (the
    labels returned are those of the rows after the one-hot ones). Written straight into CSR arrays."""
    n_g, n_cols = len(groups.keys), col_group.size
    cost_row = col_cost / unit  # budget: sum cost x <= B, in units of gcd (exact, small coefficients)
    rows, lo_rows, hi_rows, labels = [cost_row], [0.0], [float(budget // unit)], ["budget"]
    code = {f: i for i, f in enumerate(groups.families)}
    fam_col = groups.family_code[col_group] if settings.share_bounds or settings.required else None
    for fam, (lo, hi) in sorted(settings.share_bounds.items()):
        rows.append(np.where(fam_col == code.get(fam, -1), cost_row, 0.0))
        lo_rows.append(float(math.ceil(lo * budget / unit - 1e-9)))
        hi_rows.append(float(math.floor(hi * budget / unit + 1e-9)))
        labels.append(f"share[{fam}]")
    for fam in settings.required:
        rows.append(((fam_col == code.get(fam, -1)) & (col_option > 0)).astype(float))
        lo_rows.append(1.0)
        hi_rows.append(np.inf)
        labels.append(f"required[{fam}]")
    # one_hot[g]: sum_j x[g, j] == 1; a group's columns are contiguous, so its row is one run of indices
    nonzero = [np.flatnonzero(r) for r in rows]
    indptr = np.concatenate(
        [[0], np.cumsum(np.bincount(col_group, minlength=n_g)), n_cols + np.cumsum([z.size for z in nonzero])]
    )
    indices = np.concatenate([np.arange(n_cols), *nonzero])
    data = np.concatenate([np.ones(n_cols), *(r[z] for r, z in zip(rows, nonzero))])
    A = sp.csr_array((data, indices, indptr), shape=(n_g + len(rows), n_cols))
    b_l = np.concatenate([np.ones(n_g), lo_rows])
    b_u = np.concatenate([np.ones(n_g), hi_rows])
    return A, b_l, b_u, tuple(labels)


def _group_sum(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum member rows into group rows; (n_mem, J) -> (n_groups, J), dtype kept (int64 costs stay exact)."""
    if group.size == n_groups and np.array_equal(group, np.arange(n_groups)):
        return values.copy()  # one member per group, in order
    out = np.zeros((n_groups, values.shape[1]), dtype=values.dtype)
    np.add.at(out, group, values)
    return out


def _members_by_group(names: Sequence[str], mg: np.ndarray, n_g: int) -> tuple[tuple[str, ...], ...]:
    if mg.size == n_g and np.array_equal(mg, np.arange(n_g)):
        return tuple(zip(names))
    out: list[list[str]] = [[] for _ in range(n_g)]
    for n, g in zip(names, mg.tolist()):
        out[g].append(n)
    return tuple(tuple(v) for v in out)
