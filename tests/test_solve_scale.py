"""The solver's exact shortcuts at scale: the hull-based Lagrangian bound is the best one, and a solve that
skips HiGHS (bound within mip_rel_gap) or hands it a reduced program keeps the full program's optimum."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import allocator.solver.solve as solve_mod
from allocator.discovery.component import Component
from allocator.errors import InputError
from allocator.scoring.utility import UtilityTable
from allocator.solver.program import build_program
from allocator.solver.reduction import lagrangian, reduce_program
from allocator.solver.settings import SolverSettings
from allocator.solver.solve import solve


def _tables(rng, n_g, n_j, ties):
    """Random (G, J) values and costs: costs strictly increasing from 0, some options not offered."""
    C = np.cumsum(rng.integers(1, 6, size=(n_g, n_j)), axis=1).astype(float)
    C[:, 0] = 0.0
    V = np.cumsum(rng.random((n_g, n_j)) - (0.2 if not ties else 0.0), axis=1)
    V[:, 0] = 0.0
    if ties:
        V = np.round(V * 2) / 2  # equal utilities and collinear options
    top = rng.integers(1, n_j, size=n_g)
    V[np.arange(n_j)[None, :] > top[:, None]] = -np.inf
    return V, C


def _best_bound(V, C, B):
    """min over lam >= 0 of L(lam) = lam B + sum_g max_j (V - lam C): L is convex and piecewise linear, so
    its minimum is at lam = 0 or at a pairwise slope within a group (brute force over all of them)."""
    lams = {0.0}
    for g in range(V.shape[0]):
        for a, b in itertools.combinations(range(V.shape[1]), 2):
            if np.isfinite(V[g, a]) and np.isfinite(V[g, b]):
                lams.add(max(0.0, (V[g, b] - V[g, a]) / (C[g, b] - C[g, a])))
    return min(lam * B + np.max(V - lam * C, axis=1).sum() for lam in lams)


@pytest.mark.parametrize("seed", range(40))
def test_lagrangian_price_gives_the_best_bound_and_a_choice_that_fits(seed):
    rng = np.random.default_rng(seed)
    n_g, n_j = int(rng.integers(1, 30)), int(rng.integers(2, 7))
    V, C = _tables(rng, n_g, n_j, ties=seed % 2 == 0)
    top_cost = C[np.arange(n_g), np.isfinite(V).sum(axis=1) - 1].sum()
    B = float(rng.integers(0, int(top_cost) + 2))
    lam, option = lagrangian(V, C, B)
    rows = np.arange(n_g)
    assert lam >= 0 and np.all(np.isfinite(V[rows, option]))
    assert C[rows, option].sum() <= B  # the choice fits the budget
    bound = lam * B + np.max(V - lam * C, axis=1).sum()
    assert bound == pytest.approx(_best_bound(V, C, B), rel=1e-12, abs=1e-12)  # and lam is the best price
    # the choice is the LP optimum's integral part: no other choice within budget beats it by a whole step
    assert V[rows, option].sum() <= bound + 1e-12


def _instance(n, seed, ties=False, concave=True):
    rng = np.random.default_rng(seed)
    dims = rng.choice([16, 32, 64, 128], size=(n, 2))
    fams = ("attention", "mlp", "recurrent")
    comps = [
        Component(f"m{i:04d}", i // 4, fams[i % 3], "dense", int(a), int(b), "Linear")
        for i, (a, b) in enumerate(dims)
    ]
    ranks = (0, 2, 4, 8, 16, 32)
    inc = rng.random((n, len(ranks) - 1))
    inc = np.sort(inc)[:, ::-1] if concave else inc
    if ties:
        inc = np.round(inc * 2) / 2
    p = dims.sum(axis=1)
    values = np.hstack([np.zeros((n, 1)), np.cumsum(inc, axis=1)]) * (p / p.sum())[:, None]
    return comps, UtilityTable(tuple(c.name for c in comps), ranks, values), ranks, int(p.sum())


@pytest.mark.parametrize(
    ("n", "seed", "ties", "concave", "granularity", "per_rank"),
    [
        (300, 0, False, True, "module", 6),
        (300, 1, True, True, "module", 3),
        (300, 2, True, False, "module", 10),
        (300, 3, False, False, "layer-type", 5),
        (400, 4, True, True, "type", 7),
        (250, 5, False, True, "module", 25.5),
    ],
)
def test_reduced_solve_equals_the_full_milp(n, seed, ties, concave, granularity, per_rank):
    comps, table, ranks, p = _instance(n, seed, ties, concave)
    s = SolverSettings(granularity=granularity, ranks=ranks, mip_rel_gap=0.0)
    budget = int(per_rank * p)
    a = solve(comps, table, budget, s)
    b = solve(comps, table, budget, dataclasses.replace(s, reduce=False))
    assert a.status == b.status == "optimal"
    assert a.utility == pytest.approx(b.utility, rel=1e-9)
    assert a.cost <= budget and b.cost <= budget


def test_a_bound_within_the_gap_skips_highs_and_keeps_the_optimum(monkeypatch):
    comps, table, ranks, p = _instance(3000, 7)
    s = SolverSettings(granularity="module", ranks=ranks, mip_rel_gap=1e-5)
    budget = 9 * p
    red = reduce_program(build_program(comps, table, budget, s))
    assert red is not None and 0 < red.gap <= 1e-5 and red.cols.size > 0  # HiGHS would have work to do
    full = solve(comps, table, budget, dataclasses.replace(s, reduce=False, mip_rel_gap=0.0))

    def no_milp(*args, **kwargs):
        raise AssertionError("milp called although the Lagrangian bound proves the incumbent")

    monkeypatch.setattr(solve_mod, "milp", no_milp)
    a = solve(comps, table, budget, s)
    assert a.status == "optimal" and a.mip_gap == pytest.approx(red.gap) and a.mip_gap <= 1e-5
    assert full.utility * (1 - 1e-5) <= a.utility <= full.utility * (1 + 1e-12)
    # a tighter tolerance than the bound proves goes to HiGHS
    with pytest.raises(AssertionError, match="milp called"):
        solve(comps, table, budget, dataclasses.replace(s, mip_rel_gap=red.gap / 2))


def test_budgets_out_of_range_are_refused_at_scale():
    comps, table, ranks, p = _instance(2000, 8)
    s = SolverSettings(granularity="module", ranks=ranks)
    with pytest.raises(InputError, match="exceeds"):
        solve(comps, table, 32 * p + 1, s)
    with pytest.raises(InputError, match="below"):
        solve(comps, table, 10, s)


def test_highs_tolerance_misses_are_recovered():
    # HiGHS returned 2.0 where 2.000001 fits (a gain below its tolerances on the scaled objective)
    comps = [Component(n, 0, "attention", "softmax", 64, 64, "Linear") for n in ("m0", "m2")]
    table = UtilityTable(("m0", "m2"), (0, 4, 8), np.array([[0.0, 0.0, 2.0], [0.0, 1e-6, 1e-6]]))
    for reduce in (True, False):
        s = SolverSettings(granularity="module", ranks=(0, 4, 8), mip_rel_gap=0.0, reduce=reduce)
        a = solve(comps, table, 2047, s)
        assert a.ranks == {"m0": 8, "m2": 4} and a.utility == pytest.approx(2.000001, rel=1e-12)


def test_lagrangian_choice_fits_when_the_budget_cuts_a_run_of_tied_slopes():
    # every option on one line: all hull steps tie, and the budget falls inside the run
    rng = np.random.default_rng(0)
    C = np.cumsum(rng.integers(1, 9, size=(5000, 6)), axis=1).astype(float)
    C[:, 0] = 0.0
    V = 0.5 * C
    for B in (C[:, -1].sum() / 3, C[:, -1].sum() / 2 + 0.5):
        lam, option = lagrangian(V, C, B)
        assert lam == 0.5 and C[np.arange(5000), option].sum() <= B
