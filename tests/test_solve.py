"""The rank-allocation integer program: brute-force optimality, budget, granularity, shares, errors."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from allocator.discovery.component import Component
from allocator.errors import AllocatorError, InputError
from allocator.scoring.utility import UtilityTable
from allocator.solver.budget import lora_params
from allocator.solver.program import group_key
from allocator.solver.reduction import reduce_program
from allocator.solver.settings import SolverSettings
from allocator.solver.solve import Allocation, build_program, decode, solve

FAMS = ("attention", "recurrent", "mlp")


def comp(name, layer, family, d_in, d_out, kind=None, **kw) -> Component:
    return Component(
        name,
        layer,
        family,
        kind or {"attention": "softmax", "recurrent": "mamba2"}.get(family, "dense"),
        d_in,
        d_out,
        "Linear",
        **kw,
    )


def table_for(comps, ranks, values, risk=None, weight=0.0) -> UtilityTable:
    return UtilityTable(tuple(c.name for c in comps), ranks, values, risk=risk, risk_weight=weight)


@st.composite
def problems(draw, constrained=True):
    n = draw(st.integers(1, 5))
    dims = st.sampled_from([64, 16, 48, 8, 4, 2])
    comps = []
    for i in range(n):
        fam = draw(st.sampled_from(FAMS))
        comps.append(
            comp(
                f"m{i}",
                draw(st.integers(0, 1)),
                fam,
                draw(dims),
                draw(dims),
                lora_effective=i == 0 or draw(st.integers(0, 3)) > 0,
            )
        )
    ranks = tuple(sorted({0, *draw(st.lists(st.sampled_from([8, 4, 16, 32]), min_size=1, max_size=3))}))
    inc = np.array(
        draw(st.lists(st.floats(0, 10), min_size=n * (len(ranks) - 1), max_size=n * (len(ranks) - 1)))
    )
    values = np.hstack([np.zeros((n, 1)), np.cumsum(inc.reshape(n, -1), axis=1)])
    risk, weight = None, 0.0
    if draw(st.booleans()):
        rinc = np.array(draw(st.lists(st.floats(0, 5), min_size=values.size - n, max_size=values.size - n)))
        risk = np.hstack([np.zeros((n, 1)), np.cumsum(rinc.reshape(n, -1), axis=1)])
        weight = draw(st.sampled_from([0.0, 0.5, 2.0]))
    present = sorted({c.family for c in comps if c.eligible})
    shares, required = {}, ()
    if constrained and draw(st.integers(0, 2)) == 0:
        fam = draw(st.sampled_from(present))
        lo = draw(st.sampled_from([0.0, 0.1, 0.3]))
        shares[fam] = (lo, draw(st.sampled_from([max(lo, 0.05), 0.5, 0.8, 1.0])))
    if constrained and draw(st.integers(0, 2)) == 0:
        required = (draw(st.sampled_from(present)),)
    s = SolverSettings(
        granularity=draw(st.sampled_from(["module", "layer-type", "type"])),
        ranks=ranks,
        share_bounds=shares,
        required=required,
        mip_rel_gap=0.0,
    )
    top = sum(
        lora_params(c.d_in, c.d_out, max(r for r in ranks if r <= min(c.d_in, c.d_out)))
        for c in comps
        if c.eligible
    )
    budget = max(
        1, top - draw(st.one_of(st.integers(0, top), st.integers(0, top // 2), st.integers(-10, 10)))
    )
    return comps, table_for(comps, ranks, values, risk, weight), budget, s


def brute_force(comps, table, budget, s):
    """Best objective over every rank choice per group, or None if nothing meets the rows (or no group
    exists)."""
    col = {r: j for j, r in enumerate(table.ranks)}
    row = table.index()
    members = [c for c in comps if c.eligible and c.name in row]
    members = [c for c in members if max(r for r in s.ranks if r <= min(c.d_in, c.d_out)) > 0]
    groups = {}
    for c in members:
        groups.setdefault(group_key(c, s.granularity), []).append(c)
    if not groups:
        return None
    options = []
    for ms in groups.values():
        opts = {}
        for r in s.ranks:
            rs = tuple(max(q for q in s.ranks if q <= min(r, c.d_in, c.d_out)) for c in ms)
            opts[rs] = ms
        options.append([(ms, rs) for rs, ms in opts.items()])
    best = None
    for choice in itertools.product(*options):
        cost, util, risk, fam_cost = 0, 0.0, 0.0, dict.fromkeys(FAMS, 0)
        for ms, rs in choice:
            for c, r in zip(ms, rs):
                k = lora_params(c.d_in, c.d_out, r)
                cost += k
                fam_cost[c.family] += k
                util += table.values[row[c.name], col[r]]
                risk += 0.0 if table.risk is None else table.risk[row[c.name], col[r]]
        if cost > budget:
            continue
        if any(
            not (lo * budget - 1e-9 <= fam_cost[f] <= hi * budget + 1e-9)
            for f, (lo, hi) in s.share_bounds.items()
        ):
            continue
        if any(fam_cost[f] == 0 for f in s.required):
            continue
        obj = util - table.risk_weight * risk
        best = obj if best is None else max(best, obj)
    return best


def objective(a: Allocation, table: UtilityTable) -> float:
    return a.utility - table.risk_weight * a.risk


def check_rows(a: Allocation, comps, s: SolverSettings):
    by = {c.name: c for c in comps}
    assert a.cost == sum(lora_params(by[n].d_in, by[n].d_out, r) for n, r in a.ranks.items()) <= a.budget
    fam = dict.fromkeys(FAMS, 0)
    for n, r in a.ranks.items():
        fam[by[n].family] += lora_params(by[n].d_in, by[n].d_out, r)
    for f, (lo, hi) in s.share_bounds.items():
        assert lo * a.budget - 1e-6 <= fam[f] <= hi * a.budget + 1e-6
    for f in s.required:
        assert fam[f] > 0
    for members in a.groups.values():  # one rank per group, capped per member at its usable grid rank
        shared = max(a.ranks[m] for m in members)
        for m in members:
            c = by[m]
            assert a.ranks[m] == max(q for q in s.ranks if q <= min(shared, c.d_in, c.d_out))
            assert group_key(c, s.granularity) == group_key(by[members[0]], s.granularity)
    assert set(a.ranks) == {c.name for c in comps if c.eligible}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(st.one_of(problems(), problems(constrained=False)), st.booleans())
def test_solution_equals_brute_force_optimum_and_meets_every_row(problem, reduce):
    comps, table, budget, s = problem
    # a zero gap: with the default 1e-6 HiGHS may stop at a solution 1e-6 (relative) below the optimum
    s = dataclasses.replace(s, reduce=reduce, mip_rel_gap=0.0)
    best = brute_force(comps, table, budget, s)
    try:
        a = solve(comps, table, budget, s)
    except InputError:
        # refused: infeasible, or outside the range [cheapest adapter, everything at its top rank]
        event("refused: infeasible" if best is None else "refused: outside the budget range")
        if best is not None:
            prog = build_program(comps, table, budget, s)
            last = np.r_[prog.col_group[1:] != prog.col_group[:-1], True]
            assert budget > prog.col_cost[last].sum() or budget < prog.col_cost[prog.col_option > 0].min()
        return
    event("solved")
    assert best is not None
    assert a.status == "optimal"
    # HiGHS also stops within an absolute gap of 1e-6 (mip_abs_gap, which scipy's milp does not expose):
    # hypothesis
    # found utilities of 6e-8 against a risk of 0.5, where "adapt nothing" is within that gap
    assert objective(a, table) == pytest.approx(best, rel=1e-9, abs=1e-6)
    check_rows(a, comps, s)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**32 - 1), st.sampled_from(["module", "layer-type", "type"]))
def test_more_budget_never_lowers_optimal_utility(n, seed, granularity):
    rng = np.random.default_rng(seed)
    comps = [
        comp(f"m{i:02d}", i // 3, FAMS[i % 3], int(rng.choice([16, 64, 128])), int(rng.choice([16, 64, 128])))
        for i in range(n)
    ]
    ranks = (0, 4, 8, 16)
    values = np.hstack([np.zeros((n, 1)), np.cumsum(rng.random((n, 3)), axis=1)])
    table = table_for(comps, ranks, values)
    s = SolverSettings(granularity=granularity, ranks=ranks, mip_rel_gap=0.0)
    per_rank = sum(c.n_params_per_rank for c in comps)
    budgets = sorted({int(x) for x in rng.integers(4 * per_rank, 16 * per_rank, size=5)} | {16 * per_rank})
    values_seen = []
    for b in budgets:
        a = solve(comps, table, b, s)
        check_rows(a, comps, s)
        values_seen.append(a.utility)
    assert all(y >= x - 1e-9 for x, y in zip(values_seen, values_seen[1:]))


@pytest.mark.parametrize("granularity", ["module", "layer-type", "type"])
@pytest.mark.parametrize("r", [4, 8, 16])
def test_flat_utility_reproduces_the_uniform_plan(granularity, r):
    from allocator.scoring.signals import prior_curves

    comps = [
        comp(f"l{i}.{k}", i, f, di, do)
        for i in range(3)
        for k, (f, di, do) in enumerate(
            [("attention", 64, 64), ("attention", 64, 16), ("mlp", 64, 256), ("recurrent", 128, 64)]
        )
    ]
    ranks = (0, 4, 8, 16, 32)
    p = np.array([c.n_params_per_rank for c in comps], dtype=float)
    table = table_for(comps, ranks, p[:, None] * prior_curves(comps, ranks))
    a = solve(comps, table, r * int(p.sum()), SolverSettings(granularity=granularity, ranks=ranks))
    assert set(a.ranks.values()) == {r}


def test_modules_not_eligible_or_excluded_never_get_budget():
    comps = [
        comp("a", 0, "attention", 64, 64),
        comp("fused", 0, "recurrent", 64, 64, lora_effective=False),
        comp("router", 0, "mlp", 64, 8, default_target=False),
        comp("skip", 0, "mlp", 64, 64),
    ]
    ranks = (0, 4, 8)
    table = table_for(comps, ranks, np.tile([0.0, 10.0, 20.0], (4, 1)))
    a = solve(comps, table, 8 * 128, SolverSettings(granularity="module", ranks=ranks, exclude=("skip",)))
    assert a.ranks == {"a": 8, "skip": 0}
    a = solve(comps, table, 4 * 128, SolverSettings(granularity="module", ranks=ranks, include=("^a$",)))
    assert a.ranks == {"a": 4, "skip": 0}


def test_ranks_are_capped_per_member_at_the_largest_usable_grid_rank():
    comps = [
        comp("wide", 0, "mlp", 256, 256),
        comp("narrow", 0, "mlp", 256, 6, kind="dense"),
        comp("tiny", 0, "mlp", 256, 2),
    ]
    ranks = (0, 4, 8, 16)
    table = table_for(comps, ranks, np.tile([0.0, 1.0, 2.0, 3.0], (3, 1)))
    a = solve(comps, table, 16 * 512 + 4 * 262, SolverSettings(granularity="layer-type", ranks=ranks))
    assert a.ranks == {"narrow": 4, "tiny": 0, "wide": 16}
    assert a.groups == {"layer0/mlp/dense": ("narrow", "wide")}


def test_cost_never_exceeds_a_large_budget_exactly():
    rng = np.random.default_rng(0)
    comps = [comp(f"m{i:03d}", i, "mlp", 8192, 28672) for i in range(256)]
    ranks = (0, 8, 16, 32, 64, 128)
    values = np.hstack([np.zeros((256, 1)), np.cumsum(rng.random((256, 5)), axis=1)])
    table = table_for(comps, ranks, values)
    for budget in (1_000_000_007, 1_100_000_009):
        a = solve(comps, table, budget, SolverSettings(granularity="module", ranks=ranks))
        assert budget * 0.95 < a.cost <= budget


def test_decode_refuses_a_relaxation():
    # the doctest of milp: rounding the LP relaxation is wrong; decode never does it
    comps = [comp(f"m{i}", 0, "mlp", 64, 64 + i) for i in range(3)]
    ranks = (0, 4, 8)
    table = table_for(comps, ranks, [[0, 3, 3.5], [0, 2.5, 4.9], [0, 1, 1.2]])
    prog = build_program(comps, table, 1300, SolverSettings(granularity="module", ranks=ranks))
    lp = milp(
        prog.c,
        integrality=0,
        bounds=Bounds(prog.lb, prog.ub),
        constraints=LinearConstraint(prog.A, prog.b_l, prog.b_u),
    )
    assert np.any(np.abs(lp.x - np.round(lp.x)) > 1e-6)
    with pytest.raises(AllocatorError, match="never round a relaxation"):
        decode(prog, lp.x)


def test_program_labels_every_row_and_column():
    comps = [comp("a", 0, "attention", 64, 64), comp("b", 1, "mlp", 64, 64)]
    ranks = (0, 4, 8)
    s = SolverSettings(ranks=ranks, share_bounds={"mlp": (0.1, 0.9)}, required=("attention",))
    prog = build_program(comps, table_for(comps, ranks, np.tile([0.0, 1.0, 2.0], (2, 1))), 1000, s)
    assert prog.A.shape == (len(prog.row_labels), len(prog.col_labels)) == (len(prog.b_l), len(prog.c))
    assert prog.row_labels == (
        "one_hot[layer0/attention/softmax]",
        "one_hot[layer1/mlp/dense]",
        "budget",
        "share[mlp]",
        "required[attention]",
    )
    assert prog.col_labels[:3] == (
        "x[layer0/attention/softmax, r=0]",
        "x[layer0/attention/softmax, r=4]",
        "x[layer0/attention/softmax, r=8]",
    )
    assert set(np.unique(prog.integrality)) == {1}


def test_reduction_is_exact_and_keeps_the_optimum():
    rng = np.random.default_rng(3)
    comps = [comp(f"m{i:03d}", i, FAMS[i % 3], 64, int(rng.choice([64, 128, 256]))) for i in range(300)]
    ranks = (0, 4, 8, 16, 32)
    values = np.hstack([np.zeros((300, 1)), np.cumsum(np.sort(rng.random((300, 4)))[:, ::-1], axis=1)])
    table = table_for(comps, ranks, values)
    budget = 9 * sum(c.n_params_per_rank for c in comps)
    s = SolverSettings(granularity="module", ranks=ranks, mip_rel_gap=0.0)
    red = reduce_program(build_program(comps, table, budget, s))
    assert red is not None and red.c.size < 300 * 5 / 2  # most options are proven useless
    a, b = solve(comps, table, budget, s), solve(comps, table, budget, dataclasses.replace(s, reduce=False))
    assert a.utility == pytest.approx(b.utility, rel=1e-12)


def _small():
    comps = [comp("a", 0, "attention", 64, 64), comp("b", 0, "mlp", 64, 64), comp("c", 1, "mlp", 64, 64)]
    ranks = (0, 4, 8)
    return comps, table_for(comps, ranks, np.tile([0.0, 1.0, 1.5], (3, 1))), ranks


def test_budget_below_the_cheapest_adapter_names_the_feasible_range():
    comps, table, ranks = _small()
    with pytest.raises(
        InputError, match=r"budget 100 params .* below the 512 params .*~r1\.33 uniform.*feasible range"
    ):
        solve(comps, table, 100, SolverSettings(ranks=ranks))


def test_budget_above_everything_at_max_rank_names_the_feasible_range():
    comps, table, ranks = _small()
    with pytest.raises(InputError, match=r"exceeds the 3,072 params .*r8 uniform.*rank 8.*feasible range"):
        solve(comps, table, 5000, SolverSettings(ranks=ranks))


def test_required_and_share_bounds_errors_name_the_row():
    comps, table, ranks = _small()
    with pytest.raises(InputError, match="'recurrent' is required"):
        solve(comps, table, 1000, SolverSettings(ranks=ranks, required=("recurrent",)))
    with pytest.raises(InputError, match="share lower bound 0.9 asks 'attention'"):
        solve(comps, table, 3000, SolverSettings(ranks=ranks, share_bounds={"attention": (0.9, 1.0)}))
    with pytest.raises(InputError, match="required family 'attention' needs at least 512"):
        solve(
            comps,
            table,
            2000,
            SolverSettings(ranks=ranks, required=("attention",), share_bounds={"attention": (0.0, 0.1)}),
        )
    with pytest.raises(InputError, match=r"no allocation meets share\[attention\]"):
        solve(comps, table, 2000, SolverSettings(ranks=ranks, share_bounds={"attention": (0.3, 0.4)}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "layer"}, "granularity"),
        ({"ranks": (4, 8)}, "start at 0"),
        ({"ranks": (0, 8, 4)}, "strictly increasing"),
        ({"ranks": (0, 4, 12), "align": 8}, r"ranks \[4, 12\] are not multiples of align=8"),
        ({"share_bounds": {"mlp": (0.6, 0.4)}}, r"0 <= lo <= hi <= 1"),
        ({"share_bounds": {"mlp": (0.6, 1.0), "attention": (0.5, 1.0)}}, "attention>=0.5, mlp>=0.6"),
        ({"share_bounds": {"transformer": (0.1, 0.2)}}, "unknown families"),
        (
            {"required": ("mlp",), "share_bounds": {"mlp": (0.0, 0.0)}},
            "required but their share upper bound is 0",
        ),
        ({"include": ("(",)}, "not a regex"),
        ({"time_limit": 0}, "time_limit"),
        ({"mip_rel_gap": 1.0}, "mip_rel_gap"),
    ],
)
def test_solver_settings_reject_contradictions_naming_them(kwargs, message):
    with pytest.raises(InputError, match=message):
        SolverSettings(**kwargs)


def test_settings_and_allocation_round_trip():
    s = SolverSettings(
        granularity="module", share_bounds={"mlp": (0.1, 0.5)}, required=("attention",), include=("a",)
    )
    assert SolverSettings.from_dict(s.to_dict()) == s
    with pytest.raises(InputError, match="unknown SolverSettings fields"):
        SolverSettings.from_dict({"granularity": "module", "gap": 0.1})
    assert all(f.metadata.get("help") for f in dataclasses.fields(SolverSettings))
    comps, table, ranks = _small()
    a = solve(comps, table, 1500, SolverSettings(ranks=ranks))
    assert Allocation.from_dict(a.to_dict()) == a


def test_budget_must_be_a_positive_int():
    comps, table, ranks = _small()
    for bad in (0, -5, 2.5, "2M", True):
        with pytest.raises(InputError, match="positive number of parameters"):
            solve(comps, table, bad, SolverSettings(ranks=ranks))


def test_table_must_cover_the_solver_grid_and_the_model():
    comps, table, ranks = _small()
    with pytest.raises(InputError, match="lack solver ranks"):
        solve(comps, table, 1500, SolverSettings(ranks=(0, 4, 16)))
    with pytest.raises(InputError, match="the model lacks"):
        solve(comps[:2], table, 1000, SolverSettings(ranks=ranks))


def test_retention_risk_trades_against_utility():
    comps, _, ranks = _small()
    values = np.tile([0.0, 1.0, 1.5], (3, 1))
    risk = np.array([[0.0, 5.0, 10.0], [0.0, 0.1, 0.2], [0.0, 0.1, 0.2]])
    a = solve(
        comps,
        table_for(comps, ranks, values, risk, 1.0),
        3072,
        SolverSettings(ranks=ranks, granularity="module"),
    )
    assert a.ranks["a"] == 0 and a.ranks["b"] == 8
    assert a.risk == pytest.approx(0.4) and a.utility == pytest.approx(3.0)
