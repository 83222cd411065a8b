"""Exact Lagrangian reduction of the rank program before HiGHS: drop options no optimal solution can use.

Stage 4b. Input: a :class:`~allocator.solver.program.Program`. Output: a :class:`Reduction` (the bound, a
feasible incumbent, the fixed columns and the residual program HiGHS sees), or ``None`` when no feasible
incumbent is at hand. Why and the proof: ``docs/solver.md`` ("Exact reduction before HiGHS"). Pure:
numpy/scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from allocator.solver.program import Program


@dataclass(frozen=True, eq=False)
class Reduction:
    """The program HiGHS actually sees after exact Lagrangian reduced-cost fixing (``docs/solver.md``).

    ``cols`` are the surviving columns of the full program, ``fixed`` a 0/1 vector over all columns holding
    the options of groups left with a single candidate; ``c, A, b_l, b_u`` (built on first use: a solve whose
    incumbent is already proven within the gap never needs them) are restricted to ``cols`` and to the rows
    still open (one-hot rows of fixed groups are met and dropped; other rows are shifted by the fixed
    columns).
    """

    program: Program
    cols: np.ndarray
    fixed: np.ndarray  # (n_cols_full,) 0/1
    open_rows: np.ndarray  # (n_rows,) bool: rows of the residual program
    bound: float  # Lagrangian upper bound on the (scaled) objective to maximise
    incumbent: float  # value of the feasible Lagrangian solution used for fixing
    incumbent_x: np.ndarray  # (n_cols_full,) that solution

    @property
    def gap(self) -> float:
        """Proven relative gap of the incumbent, ``(bound - incumbent) / |incumbent|`` (as ``mip_gap``)."""
        return max(0.0, self.bound - self.incumbent) / max(abs(self.incumbent), 1e-300)

    @cached_property
    def c(self) -> np.ndarray:
        return self.program.c[self.cols]

    @cached_property
    def A(self) -> sp.csr_array:
        return sp.csr_array(self.program.A[self.open_rows][:, self.cols])

    @cached_property
    def _shift(self) -> np.ndarray:
        return (self.program.A @ self.fixed)[self.open_rows]

    @cached_property
    def b_l(self) -> np.ndarray:
        return self.program.b_l[self.open_rows] - self._shift

    @cached_property
    def b_u(self) -> np.ndarray:
        return self.program.b_u[self.open_rows] - self._shift

    def expand(self, x_sub: np.ndarray) -> np.ndarray:
        """A solution of the reduced program as a solution of the full one."""
        x = self.fixed.astype(float)
        x[self.cols] = x_sub
        return x


def hull_steps(V: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every group's upper concave hull from option 0 as steps ``(group, to option, slope, cost)``, slope > 0.

    ``V, C``: (G, J) values (``-inf`` where not offered) and costs (strictly increasing along offered options,
    0 at option 0). A group's steps come in walk order with non-increasing slopes (clipped so, against
    rounding), so the Lagrangian choice at any price is a prefix of each group's walk. Groups whose options
    are already concave (the usual case) step option by option; the others walk their hull. Vectorised.
    """
    n_g, n_j = V.shape
    offered = np.isfinite(V[:, 1:])
    slope = np.full((n_g, n_j - 1), -np.inf)
    dcost = np.diff(C, axis=1)
    with np.errstate(invalid="ignore"):  # -inf - -inf between options not offered: masked out below
        dv = np.diff(V, axis=1)
    np.divide(dv, dcost, out=slope, where=offered)
    concave = np.all(slope[:, 1:] <= slope[:, :-1], axis=1)
    k, g = np.nonzero((slope > 0).T & concave)  # step-major: a group's steps in walk order
    parts = [(g, k + 1, slope[g, k], dcost[g, k])]
    idx = np.flatnonzero(~concave)
    cur = np.zeros(n_g, dtype=np.int64)
    prev = np.full(n_g, np.inf)
    later = np.arange(n_j)[None, :]
    while idx.size:
        a = cur[idx]
        dv = V[idx] - V[idx, a][:, None]
        dc = C[idx] - C[idx, a][:, None]
        step = np.full(dv.shape, -np.inf)
        np.divide(dv, dc, out=step, where=(later > a[:, None]) & np.isfinite(dv))
        b = np.argmax(step, axis=1)  # first maximum: the nearest of collinear points, finest steps
        s = np.minimum(step[np.arange(idx.size), b], prev[idx])
        up = s > 0
        idx, a, b, s = idx[up], a[up], b[up], s[up]
        parts.append((idx, b, s, C[idx, b] - C[idx, a]))
        cur[idx], prev[idx] = b, s
    return tuple(np.concatenate(p) for p in zip(*parts))


def _fill(V: np.ndarray, C: np.ndarray, option: np.ndarray, budget: float) -> np.ndarray:
    """A better incumbent: spend the budget ``option`` leaves on the upgrades worth most per parameter.

    One pass, each group upgraded at most once; only the bound's incumbent improves (a smaller ``L - LB``
    fixes more options), the optimum is still HiGHS's to find.
    """
    rows = np.arange(V.shape[0])
    left = budget - C[rows, option].sum()
    dv = V - V[rows, option][:, None]  # (G, J) gain of moving group g to option j; -inf where not offered
    dc = C - C[rows, option][:, None]
    gi, ji = np.nonzero((dv > 0) & (dc > 0) & (dc <= left))
    out = option.copy()
    for k in np.argsort(-(dv[gi, ji] / dc[gi, ji]), kind="stable"):
        g, jj = gi[k], ji[k]
        if out[g] == option[g] and dc[g, jj] <= left:
            out[g] = jj
            left -= dc[g, jj]
    return out


def lagrangian(V: np.ndarray, C: np.ndarray, budget: float) -> tuple[float, np.ndarray]:
    """The budget price ``lam`` minimising ``L`` (the LP relaxation's dual) and the greedy choice at it.

    Hull steps sorted by slope (ties in walk order) are taken while they fit; ``lam`` is the slope of the
    first step that does not (0 if all fit). The choice holds the steps taken: the LP optimum's integral part.
    Exactness never rests on this: :func:`reduce_program` recomputes the bound at ``lam`` and checks the
    choice against every row.
    """
    g, b, slope, dcost = hull_steps(V, C)
    order = np.argsort(-slope)  # not stable: only a tie run across the cut needs its walk order back
    key = -slope[order]  # ascending
    k = int(np.searchsorted(np.cumsum(dcost[order]), budget, side="right"))  # steps [0, k) fit
    if 0 < k < key.size and key[k - 1] == key[k]:
        lo, hi = np.searchsorted(key, key[k], side="left"), np.searchsorted(key, key[k], side="right")
        order[lo:hi] = np.sort(order[lo:hi])  # hull_steps lists every group's steps in walk order
        k = int(np.searchsorted(np.cumsum(dcost[order]), budget, side="right"))
    g, b, slope = g[order], b[order], slope[order]
    option = np.zeros(V.shape[0], dtype=np.int64)
    np.maximum.at(option, g[:k], b[:k])  # a group's steps taken are a prefix of its walk: the last one counts
    return (float(slope[k]) if k < slope.size else 0.0), option


def _tables(program: Program) -> tuple[np.ndarray, np.ndarray]:
    """(G, J) value to maximise (``-inf`` where a group does not offer the option) and cost in parameters."""
    n_g, n_j = len(program.group_labels), len(program.grid)
    V = np.full((n_g, n_j), -np.inf)
    V[program.col_group, program.col_option] = -program.c
    C = np.zeros((n_g, n_j))
    C[program.col_group, program.col_option] = program.col_cost  # strictly increasing along offered options
    return V, C


def _as_x(program: Program, option: np.ndarray) -> np.ndarray:
    """0/1 columns of one option per group (a group's columns are contiguous, option 0 first)."""
    start = np.r_[0, np.cumsum(np.bincount(program.col_group, minlength=option.size))[:-1]]
    x = np.zeros(program.c.size)
    x[start + option] = 1.0
    return x


def _meets_rows(program: Program, x: np.ndarray) -> bool:
    act = program.A @ x
    return bool(np.all(act >= program.b_l - 1e-9) and np.all(act <= program.b_u + 1e-9))


def polish(program: Program, x: np.ndarray) -> np.ndarray:
    """``x`` with the budget it leaves spent on single-group upgrades (:func:`_fill`), if that meets every row
    and is worth more; else ``x``. HiGHS's tolerances can overlook a gain far below the largest utility
    (it returned 2.0 where 2.000001 fitted); this recovers such upgrades and never loses value."""
    V, C = _tables(program)
    option = np.zeros(V.shape[0], dtype=np.int64)
    chosen = np.flatnonzero(x > 0.5)
    option[program.col_group[chosen]] = program.col_option[chosen]
    y = _as_x(program, _fill(V, C, option, float(program.budget)))
    return y if float(program.c @ y) < float(program.c @ x) and _meets_rows(program, y) else x


def reduce_program(program: Program) -> Reduction | None:
    """Drop options no optimal solution can use; ``None`` if no feasible Lagrangian solution is at hand.

    For any price ``lam >= 0`` on the budget row, ``L(lam) = lam*B + sum_g max_j (v[g,j] - lam*cost[g,j])``
    bounds every feasible value from above (the other rows only shrink the feasible set). The greedy choice at
    the best ``lam`` (:func:`lagrangian`), its leftover budget filled (:func:`_fill`), is an incumbent of
    value ``LB`` if it meets every row. An option with deficit ``d[g,j] = max_j' (v - lam*cost)[g,j'] - (v -
    lam*cost)[g,j] > L - LB`` is then in no solution worth ``>= LB``, so in no optimal one: dropping it is
    exact.
    """
    n_g = len(program.group_labels)
    g, j = program.col_group, program.col_option
    V, C = _tables(program)
    B = float(program.budget)
    lam, option = lagrangian(V, C, B)
    # the filled choice if it meets every row, else the plain one
    x = next(
        (
            y
            for y in map(lambda o: _as_x(program, o), (_fill(V, C, option, B), option))
            if _meets_rows(program, y)
        ),
        None,
    )
    if x is None:
        return None  # share/required rows not met by the Lagrangian choice: no incumbent, no fixing
    val = V - lam * C
    best = val.max(axis=1)
    bound, incumbent = lam * B + float(best.sum()), float(-program.c @ x)
    slack = (bound - incumbent) * (1 + 1e-9) + 1e-12 * max(1.0, abs(bound))  # floating-point safety margin
    keep = (best[g] - val[g, j]) <= slack
    n_left = np.bincount(g[keep], minlength=n_g)
    return Reduction(
        program=program,
        cols=np.flatnonzero(keep & (n_left[g] > 1)),
        fixed=(keep & (n_left[g] == 1)).astype(float),
        open_rows=np.r_[n_left > 1, np.ones(program.A.shape[0] - n_g, dtype=bool)],  # one-hot rows come first
        bound=bound,
        incumbent=incumbent,
        incumbent_x=x,
    )
