"""Exact Lagrangian reduction of the rank program before HiGHS: drop options no optimal solution can use.

Stage 4b. Input: a :class:`~allocator.solver.program.Program`. Output: a :class:`Reduction` (the residual
program HiGHS
sees, the fixed columns, the bound and the incumbent), or ``None`` when no feasible incumbent is at hand. Why
and
the proof: ``docs/solver.md`` ("Exact reduction before HiGHS"). Pure: numpy/scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from allocator.solver.program import Program


@dataclass(frozen=True, eq=False)
class Reduction:
    """The program HiGHS actually sees after exact Lagrangian reduced-cost fixing (``docs/solver.md``).

    ``cols`` are the surviving columns of the full program, ``fixed`` a 0/1 vector over all columns holding
    the
    options of groups left with a single candidate; ``c, A, b_l, b_u`` are restricted to ``cols`` and to the
    rows
    still open (one-hot rows of fixed groups are met and dropped; other rows are shifted by the fixed
    columns).
    """

    cols: np.ndarray
    fixed: np.ndarray  # (n_cols_full,) 0/1
    c: np.ndarray
    A: sp.csr_array
    b_l: np.ndarray
    b_u: np.ndarray
    bound: float  # Lagrangian upper bound on the (scaled) objective to maximise
    incumbent: float  # value of the feasible Lagrangian solution used for fixing
    incumbent_x: np.ndarray  # (n_cols_full,) that solution

    def expand(self, x_sub: np.ndarray) -> np.ndarray:
        """A solution of the reduced program as a solution of the full one."""
        x = self.fixed.astype(float)
        x[self.cols] = x_sub
        return x


def _fill(V: np.ndarray, C: np.ndarray, option: np.ndarray, budget: float) -> np.ndarray:
    """A better incumbent: spend the budget the Lagrangian choice leaves on the upgrades worth most per
    parameter.

    One pass, each group upgraded at most once; only the bound's incumbent improves (a smaller ``L - LB``
    fixes
    more options), the optimum is still HiGHS's to find.
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


def reduce_program(program: Program) -> Reduction | None:
    """Drop options no optimal solution can use; ``None`` if no feasible Lagrangian solution is at hand.

    For any price ``lam >= 0`` on the budget row, ``L(lam) = lam*B + sum_g max_j (v[g,j] - lam*cost[g,j])``
    bounds
    every feasible value from above (the other rows only shrink the feasible set). The Lagrangian choice just
    above the best ``lam`` fits the budget; if it also meets every other row it is feasible, of value ``LB``.
    An
    option with deficit ``d[g,j] = max_j' (v - lam*cost)[g,j'] - (v - lam*cost)[g,j] > L - LB`` is then in no
    solution worth ``>= LB``, so in no optimal one: dropping it is exact. ``lam`` is the kink of the convex
    ``L``
    where the budget starts to bind, found by binary search over the pairwise slopes within groups; the
    choice's
    leftover budget is then filled greedily (:func:`_fill`) to raise ``LB``.
    """
    n_g, n_j = len(program.group_labels), len(program.grid)
    g, j = program.col_group, program.col_option
    V = np.full((n_g, n_j), -np.inf)  # (G, J) value to maximise; -inf marks options a group does not offer
    V[g, j] = -program.c
    C = np.zeros((n_g, n_j))
    C[g, j] = program.col_cost  # strictly increasing along j within a group
    B = float(program.budget)

    def choice(lam: float) -> np.ndarray:
        return np.argmax(V - lam * C, axis=1)  # first maximum = cheapest among ties

    slopes = [np.zeros(1)]
    for a in range(1, n_j):
        for b in range(a):
            ok = np.isfinite(V[:, a]) & np.isfinite(V[:, b])
            slopes.append((V[ok, a] - V[ok, b]) / (C[ok, a] - C[ok, b]))
    kinks = np.unique(np.concatenate(slopes))
    kinks = kinks[kinks >= 0]  # kinks[0] == 0; the cost of the choice is non-increasing in lam
    mids = np.r_[(kinks[:-1] + kinks[1:]) / 2, 2 * kinks[-1] + 1]  # one lam inside each interval

    def fits(k: int) -> bool:
        return C[np.arange(n_g), choice(mids[k])].sum() <= B

    # mids[-1] lies above every kink: everything at its best-per-cost (cost-0) choice
    lo, hi = 0, mids.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    lam = float(kinks[lo])
    pos = np.full((n_g, n_j), -1)
    pos[g, j] = np.arange(program.c.size)
    option = choice(mids[lo])
    x = None
    # the filled choice if it meets every row, else the plain one
    for opt in (_fill(V, C, option, B), option):
        cand = np.zeros(program.c.size)
        cand[pos[np.arange(n_g), opt]] = 1.0
        act = program.A @ cand
        if np.all(act >= program.b_l - 1e-9) and np.all(act <= program.b_u + 1e-9):
            x = cand
            break
    if x is None:
        return None  # share/required rows not met by the Lagrangian choice: no incumbent, no fixing
    val = V - lam * C
    best = val.max(axis=1)
    bound, incumbent = lam * B + float(best.sum()), float(-program.c @ x)
    slack = (bound - incumbent) * (1 + 1e-9) + 1e-12 * max(1.0, abs(bound))  # floating-point safety margin
    keep = (best[g] - val[g, j]) <= slack
    n_left = np.bincount(g[keep], minlength=n_g)
    fixed = (keep & (n_left[g] == 1)).astype(float)
    cols = np.flatnonzero(keep & (n_left[g] > 1))
    shift = program.A @ fixed
    open_rows = np.r_[n_left > 1, np.ones(program.A.shape[0] - n_g, dtype=bool)]  # one-hot rows come first
    return Reduction(
        cols=cols,
        fixed=fixed,
        c=program.c[cols],
        A=sp.csr_array(program.A[open_rows][:, cols]),
        b_l=(program.b_l - shift)[open_rows],
        b_u=(program.b_u - shift)[open_rows],
        bound=bound,
        incumbent=incumbent,
        incumbent_x=x,
    )
