"""Utility signals and tables: the Signal contract on random stats, shape normalisation, prior, exclusion,
risk."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator.discovery.component import Component
from allocator.errors import AllocatorError, AllocatorWarning, InputError
from allocator.scoring.signals import SIGNALS, check_curves, prior_curves, scale_weights
from allocator.scoring.utility import UtilitySettings, UtilityTable, compute_utilities, risk_curves, with_risk

GRID = (0, 4, 8, 16, 32)


@dataclass
class Stats:
    """Probe statistics of one module, with the fields of ``probes.ModuleStats`` (data, not a mock)."""

    status: str = "ok"
    n_tokens: int = 4096
    n_batches: int = 8
    grad_norm_sum: float = 1.0
    grad_sq_sum: float = 1.0
    fisher_trace: float = 0.125
    grad_singular_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    act_eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heldout_capture: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class Report:
    modules: dict


def comp(name, d_in=64, d_out=64, family="mlp", kind="dense", layer=0, **kw) -> Component:
    return Component(name, layer, family, kind, d_in, d_out, "Linear", **kw)


def flat_stats(k=32, c: Component | None = None) -> Stats:
    """Uninformative evidence: isotropic spectra, equal sensitivity per parameter / weight entry, noise-level
    lift."""
    c = c or comp("x")
    k = min(k, c.d_in, c.d_out)
    return Stats(
        fisher_trace=float(c.d_in * c.d_out * c.n_experts),
        grad_singular_values=np.full(k, np.sqrt(c.n_params_per_rank)),
        act_eigenvalues=np.full(k, 1.0),
        heldout_capture=np.arange(1, k + 1) / min(c.d_in, c.d_out),
    )


@st.composite
def module_stats(draw, max_k=40):
    k = draw(st.integers(0, max_k))
    floats = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)
    sv = np.sort(np.array(draw(st.lists(floats, min_size=k, max_size=k))))[::-1]
    ev = np.sort(np.array(draw(st.lists(floats, min_size=k, max_size=k))))[::-1]
    inc = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k)))
    capture = np.cumsum(inc) / max(1.0, float(inc.sum()) / draw(st.floats(0.01, 1.0)))
    return Stats(
        fisher_trace=draw(st.floats(0.0, 1e6)),
        grad_singular_values=sv,
        act_eigenvalues=ev,
        heldout_capture=np.minimum(capture, 1.0),
    )


@st.composite
def instances(draw):
    n = draw(st.integers(1, 6))
    dims = st.sampled_from([1, 2, 4, 8, 24, 64, 256])
    comps = [comp(f"m{i}", draw(dims), draw(dims), layer=i) for i in range(n)]
    stats = {c.name: draw(module_stats()) for c in comps}
    return comps, Report(stats)


@pytest.mark.parametrize("signal", sorted(SIGNALS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(), prior=st.sampled_from([0.0, 0.5]), mag=st.sampled_from([0.0, 0.25, 1.0]))
def test_every_signal_is_monotone_and_zero_at_rank_zero(signal, inst, prior, mag):
    comps, report = inst
    s = UtilitySettings(signal=signal, uniform_prior=prior, magnitude_exponent=mag, consistency_exponent=mag)
    table = compute_utilities(report, comps, GRID, s)
    assert table.values.shape == (len(comps), len(GRID))
    assert np.all(table.values[:, 0] == 0)
    assert np.all(np.diff(table.values, axis=1) >= 0)
    assert np.all(np.isfinite(table.values))
    # never more valuable than the usable rank allows: phi <= clip * sqrt(min(R, dmin) / R)
    p = np.array([c.n_params_per_rank for c in comps], dtype=float)
    phi = table.values / (p / p.sum())[:, None]
    assert np.all(phi <= s.scale_clip * prior_curves(comps, GRID)[:, -1:] + 1e-12)


# EVA's criterion: see below
@pytest.mark.parametrize("signal", sorted(set(SIGNALS) - {"explained_variance"}))
def test_flat_evidence_gives_the_uniform_prior(signal):
    comps = [comp("a", 64, 64), comp("b", 32, 128), comp("c", 256, 64), comp("narrow", 64, 4)]
    report = Report({c.name: flat_stats(c=c) for c in comps})
    table = compute_utilities(report, comps, GRID, UtilitySettings(signal=signal, uniform_prior=0.0))
    uniform = compute_utilities(report, comps, GRID, UtilitySettings(signal="uniform"))
    expected = uniform.values
    if signal == "capacity":  # its prior is shifted by one rank: the same curve for every module all the same
        prior, shifted = prior_curves(comps, GRID), prior_curves(comps, GRID, shift=1)
        expected = uniform.values * np.divide(shifted, prior, out=np.zeros_like(prior), where=prior > 0)
    np.testing.assert_allclose(table.values, expected, rtol=1e-12)


@pytest.mark.parametrize("signal", ["gradient_spectrum", "activation_rank", "heldout_capture", "combined"])
def test_same_spectrum_on_different_shapes_gives_equal_utility_per_parameter(signal):
    rng = np.random.default_rng(0)
    sv = np.sort(rng.exponential(size=32))[::-1]
    h = np.cumsum(np.sort(rng.dirichlet(np.ones(32)))[::-1]) * 0.7
    small, big = comp("small", 64, 64), comp("big", 512, 256)
    report = Report(
        {
            "small": Stats(grad_singular_values=sv, act_eigenvalues=sv**2, heldout_capture=h),
            "big": Stats(grad_singular_values=3 * sv, act_eigenvalues=9 * sv**2, heldout_capture=h),
        }
    )
    s = UtilitySettings(signal=signal, uniform_prior=0.0, magnitude_exponent=0.0, consistency_exponent=0.0)
    t = compute_utilities(report, [small, big], GRID, s)
    row = t.index()
    per_param = [t.values[row[c.name]] / c.n_params_per_rank for c in (small, big)]
    np.testing.assert_allclose(per_param[0], per_param[1], rtol=1e-12)


def test_narrow_projection_does_not_look_cheap_and_valuable():
    wide, narrow = comp("wide", 256, 256), comp("narrow", 256, 4)
    rng = np.random.default_rng(1)
    report = Report(
        {
            "wide": Stats(act_eigenvalues=np.sort(rng.exponential(size=32))[::-1]),
            "narrow": Stats(act_eigenvalues=np.sort(rng.exponential(size=32))[::-1]),  # same input, EVA view
        }
    )
    settings = UtilitySettings(signal="activation_rank", uniform_prior=0.0)
    t = compute_utilities(report, [narrow, wide], GRID, settings)
    assert t.names == ("narrow", "wide")
    per_param_rank = (
        t.values[:, 1:] / np.array([[narrow.n_params_per_rank], [wide.n_params_per_rank]]) / GRID[1:]
    )
    # value per parameter at rank 4 is the same ballpark; above its usable rank 4 the narrow module adds
    # nothing
    assert per_param_rank[0, 0] <= 1.5 * per_param_rank[1, 0]
    assert np.all(np.diff(t.values[0, 1:]) == 0)


def test_concentrated_spectrum_saturates_early_flat_one_keeps_growing():
    a, b = comp("a"), comp("b")
    report = Report({"a": Stats(grad_singular_values=np.r_[10.0, np.full(31, 0.01)]), "b": flat_stats()})
    t = compute_utilities(
        report,
        [a, b],
        GRID,
        UtilitySettings(signal="gradient_spectrum", uniform_prior=0.0, magnitude_exponent=0.0),
    )
    frac = t.values / t.values[:, -1:]
    assert frac[0, 1] > 0.9 > frac[1, 1]


def test_magnitude_weight_is_compressed_and_bounded():
    q = np.array([1e6, 1.0, 1.0, 1.0, 0.0, np.nan])
    w = scale_weights(q, 0.25, 2.0)
    assert w[0] == 2.0 and w[4] == 0.5 and w[5] == 1.0
    assert np.all(scale_weights(q, 0.0, 2.0) == 1.0)


def test_uniform_prior_one_reproduces_uniform_values_for_any_signal():
    comps = [comp("a"), comp("b", 32, 128)]
    rng = np.random.default_rng(2)
    report = Report(
        {c.name: Stats(grad_singular_values=np.sort(rng.exponential(size=16))[::-1]) for c in comps}
    )
    for signal in SIGNALS:
        t = compute_utilities(report, comps, GRID, UtilitySettings(signal=signal, uniform_prior=1.0))
        u = compute_utilities(report, comps, GRID, UtilitySettings(signal="uniform"))
        np.testing.assert_allclose(t.values, u.values)


def test_family_prior_scales_utility():
    comps = [comp("a", family="attention", kind="softmax"), comp("m")]
    report = Report({c.name: flat_stats() for c in comps})
    t = compute_utilities(
        report, comps, GRID, UtilitySettings(signal="uniform", family_priors={"attention": 2.0})
    )
    np.testing.assert_allclose(t.values[0], 2 * t.values[1])


def test_modules_without_ok_stats_or_not_eligible_get_no_row_and_a_warning():
    comps = [
        comp("ok"),
        comp("silent"),
        comp("nan"),
        comp("missing"),
        comp("fused", lora_effective=False, note="bypassed"),
        comp("router", default_target=False),
    ]
    report = Report(
        {
            "ok": flat_stats(),
            "silent": Stats(status="no_gradient"),
            "nan": Stats(status="nonfinite"),
            "fused": flat_stats(),
            "router": flat_stats(),
        }
    )
    with pytest.warns(AllocatorWarning, match=r"3 eligible modules.*1 missing.*1 no_gradient.*1 nonfinite"):
        t = compute_utilities(report, comps, GRID)
    assert t.names == ("ok",)


def test_no_usable_module_is_an_input_error():
    with pytest.raises(InputError, match="status 'ok'"), warnings.catch_warnings():
        warnings.simplefilter("ignore", AllocatorWarning)
        compute_utilities(Report({"a": Stats(status="no_input")}), [comp("a")], GRID)


def test_corrupt_heldout_capture_is_an_allocator_error():
    report = Report({"a": Stats(heldout_capture=np.array([0.5, 0.2, 0.6]))})
    with pytest.raises(AllocatorError, match="heldout_capture of a"):
        compute_utilities(report, [comp("a")], GRID, UtilitySettings(signal="heldout_capture"))


def test_nonfinite_stats_marked_ok_are_an_allocator_error():
    report = Report({"a": Stats(grad_singular_values=np.array([1.0, np.nan]))})
    with pytest.raises(AllocatorError, match="not finite"):
        compute_utilities(report, [comp("a")], GRID, UtilitySettings(signal="gradient_spectrum"))


def test_check_curves_names_the_broken_signal_and_module():
    phi = np.array([[0.0, 1.0, 0.5]])
    with pytest.raises(AllocatorError, match="'buggy'.*'m0'"):
        check_curves("buggy", ["m0"], phi, (1, 3))
    with pytest.raises(AllocatorError, match=r"phi\(0\) == 0"):
        check_curves("buggy", ["m0"], np.array([[0.1, 1.0, 1.0]]), (1, 3))


def test_risk_from_general_text_is_monotone_and_larger_where_fisher_is_larger():
    comps = [comp("a"), comp("b")]
    report = Report({c.name: flat_stats() for c in comps})
    general = Report({"a": Stats(fisher_trace=100.0), "b": Stats(fisher_trace=1.0)})
    t = compute_utilities(report, comps, GRID, UtilitySettings(retention_weight=0.5), risk_report=general)
    assert t.risk_weight == 0.5 and t.risk is not None
    assert np.all(t.risk[:, 0] == 0) and np.all(np.diff(t.risk, axis=1) >= 0)
    assert np.all(t.risk[0, 1:] > t.risk[1, 1:])
    # a module missing from the risk report gets the neutral weight
    r = risk_curves(Report({}), comps, GRID)
    np.testing.assert_allclose(r[0], r[1])


def test_with_risk_accepts_array_table_and_report():
    comps = [comp("a"), comp("b")]
    t = compute_utilities(Report({c.name: flat_stats() for c in comps}), comps, GRID)
    arr = np.tile(np.arange(len(GRID), dtype=float), (2, 1))
    assert np.array_equal(with_risk(t, arr, 1.0).risk, arr)
    as_table = UtilityTable(("b", "a", "c"), GRID, np.vstack([arr, arr[:1]]))
    assert np.array_equal(with_risk(t, as_table, 2.0).risk, arr)
    from_report = with_risk(t, Report({"a": Stats()}), 1.0, components=comps)
    assert from_report.risk.shape == arr.shape
    with pytest.raises(InputError, match="components="):
        with_risk(t, Report({}), 1.0)
    with pytest.raises(InputError, match="non-decreasing"):
        with_risk(t, arr[:, ::-1], 1.0)


def test_utility_table_validates_and_round_trips():
    t = UtilityTable(
        ("a", "b"), (0, 4, 8), np.array([[0, 1, 2], [0, 0.5, 0.5]]), risk=np.zeros((2, 3)), signal="x"
    )
    back = UtilityTable.from_dict(t.to_dict())
    assert back.names == t.names and back.ranks == t.ranks and back.signal == "x"
    assert np.array_equal(back.values, t.values) and np.array_equal(back.risk, t.risk)
    assert not t.values.flags.writeable
    for bad in (
        dict(names=("a",), ranks=(0, 4), values=[[0.0, -1.0]]),
        dict(names=("a",), ranks=(0, 4), values=[[1.0, 2.0]]),
        dict(names=("a",), ranks=(4, 8), values=[[0.0, 1.0]]),
        dict(names=("a", "a"), ranks=(0, 4), values=[[0.0, 1.0], [0.0, 1.0]]),
        dict(names=("a",), ranks=(0, 4), values=[[0.0, np.inf]]),
    ):
        with pytest.raises(InputError):
            UtilityTable(**bad)
    with pytest.raises(InputError, match="unknown UtilityTable fields"):
        UtilityTable.from_dict({**t.to_dict(), "extra": 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"signal": "magic"}, "unknown utility signal"),
        ({"weights": {"magic": 1.0}}, "unknown signals"),
        ({"weights": {"combined": 1.0}}, "unknown signals"),
        ({"weights": {"fisher": 0.0}, "signal": "combined"}, "needs a positive weight"),
        ({"weights": {"fisher": -1.0}, "signal": "fisher"}, ">= 0"),
        ({"family_priors": {"transformer": 1.0}}, "unknown families"),
        ({"family_priors": {"mlp": 0.0}}, "> 0"),
        ({"uniform_prior": 1.5}, "uniform_prior"),
        ({"scale_clip": 0.5}, "scale_clip"),
        ({"retention_weight": -1}, "retention_weight"),
    ],
)
def test_utility_settings_reject_bad_values_naming_them(kwargs, message):
    with pytest.raises(InputError, match=message):
        UtilitySettings(**kwargs)


def test_utility_settings_round_trip_and_reject_unknown_keys():
    s = UtilitySettings(signal="fisher", family_priors={"mlp": 1.5}, retention_weight=0.25)
    assert UtilitySettings.from_dict(s.to_dict()) == s
    with pytest.raises(InputError, match="unknown UtilitySettings fields"):
        UtilitySettings.from_dict({"signal": "uniform", "lambda": 1})


def test_every_setting_is_documented():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(UtilitySettings))


def test_pure_modules_do_not_import_torch():
    code = (
        "import sys; import allocator.solver.budget, allocator.scoring.signals, allocator.scoring.utility, "
        "allocator.solver.program, allocator.solver.solve; assert 'torch' not in sys.modules and "
        "'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explained_variance_is_evas_ranking_counted_in_parameters():
    # a concentrated input explains more per direction than an isotropic one, so it wins the budget (EVA), and
    # a module's i-th direction is worth its explained-variance ratio per parameter: the solver's plan is
    # EVA's
    from allocator.solver.settings import SolverSettings
    from allocator.solver.solve import solve

    concentrated, spread = comp("concentrated", 64, 64), comp("spread", 64, 64)
    lam_c = np.r_[np.full(4, 10.0), np.full(60, 0.1)]
    report = Report(
        {"concentrated": Stats(act_eigenvalues=lam_c), "spread": Stats(act_eigenvalues=np.ones(64))}
    )
    s = UtilitySettings(signal="explained_variance", uniform_prior=0.0)
    t = compute_utilities(report, [concentrated, spread], (0, 1, 2, 4, 8), s)
    per_param = t.values / np.array([[concentrated.n_params_per_rank], [spread.n_params_per_rank]])
    ratio_c = lam_c / lam_c.sum()
    total = concentrated.n_params_per_rank + spread.n_params_per_rank  # P: utility is p_m / P * phi
    np.testing.assert_allclose(np.diff(per_param[0])[:2] * total, ratio_c[:2], rtol=1e-9)
    np.testing.assert_allclose(np.diff(per_param[1])[:1] * total, [1 / 64], rtol=1e-9)
    plan = solve(
        [concentrated, spread],
        t,
        8 * concentrated.n_params_per_rank,
        SolverSettings(granularity="module", ranks=(0, 1, 2, 4, 8), mip_rel_gap=0.0),
    )
    # EVA's greedy: the 4 concentrated directions (ratio 0.24 each) beat every isotropic one (1/64), then the
    # 0.1s (0.0024) lose to the isotropic 1/64 = 0.0156: concentrated 4, spread 4
    assert plan.ranks == {"concentrated": 4, "spread": 4}
