"""Sketched gradient statistics (probes/sketch.py) against the exact path: linearity, recovery, accuracy on
the reference models, and the plan `allocate` makes from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
from probes.accumulators import GradAccumulator, SketchedGradAccumulator
from probes.sketch import TwoSidedSketch, corange_matrix, range_matrix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(n_batches: int, m: int, n: int, tokens: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(tokens, m, generator=g, dtype=torch.float64),
            torch.randn(tokens, n, generator=g, dtype=torch.float64),
        )
        for _ in range(n_batches)
    ]


def _sketch(m: int, n: int, k: int, width: int) -> TwoSidedSketch:
    return TwoSidedSketch(
        range_matrix(n, k, 0, "cpu", torch.float64), corange_matrix(m, width, 0, "cpu", torch.float64)
    )


def test_sum_of_sketches_equals_sketch_of_sum():
    """Data-parallel reduce: shards sketched with shared test matrices add up to the one-pass sketch."""
    pairs = _pairs(6, 40, 30)
    one = _sketch(40, 30, 6, 10)
    shards = [_sketch(40, 30, 6, 10) for _ in range(3)]
    for i, (delta, x) in enumerate(pairs):
        one.update(delta, x)
        shards[i % 3].update(delta, x)
    for shard in shards[1:]:
        shards[0].merge(shard)
    torch.testing.assert_close(shards[0].y, one.y)
    torch.testing.assert_close(shards[0].w, one.w)
    total = sum(d.T @ x for d, x in pairs)  # the sketch is of Σ δᵀX, formed here only as the oracle
    torch.testing.assert_close(one.y, total @ one.omega)
    torch.testing.assert_close(one.w, one.psi.T @ total)


def test_sketch_recovers_a_matrix_of_rank_below_its_width_exactly():
    pairs = _pairs(1, 50, 40, tokens=5)  # rank 5 < k = 8
    sketch = _sketch(50, 40, 8, 16)
    sketch.update(*pairs[0])
    total = pairs[0][0].T @ pairs[0][1]
    q, x = sketch.low_rank()
    torch.testing.assert_close(q @ x, total)
    torch.testing.assert_close(sketch.top(5)[1], torch.linalg.svdvals(total)[:5])
    assert sketch.frobenius_sq() == pytest.approx(float(total.square().sum()), rel=0.5)  # an estimate


@pytest.mark.parametrize("transposed", [False, True])
def test_sketched_accumulator_shards_merge_to_one_pass(transposed):
    m, n = (12, 30) if transposed else (30, 12)  # (d_out, d_in)
    long, short = max(m, n), min(m, n)
    omega, psi = (
        range_matrix(short, 6, 0, "cpu", torch.float64),
        corange_matrix(long, 10, 0, "cpu", torch.float64),
    )
    pairs = _pairs(5, m, n)
    one = SketchedGradAccumulator(omega, psi, 6, transposed)
    shards = [SketchedGradAccumulator(omega, psi, 6, transposed) for _ in range(2)]
    for i, (delta, x) in enumerate(pairs):
        one.update(one.contribution(delta, x), i)
        shards[i % 2].update(shards[i % 2].contribution(delta, x), i)  # halves by global index
    shards[0].merge(shards[1])
    a, b = shards[0].finalize(4), one.finalize(4)
    assert shards[0].n_batches == 5
    for key in ("grad_sq_sum", "grad_norm_sum", "grad_total_sq"):
        assert a[key] == pytest.approx(b[key], rel=1e-9)
    np.testing.assert_allclose(a["grad_singular_values"], b["grad_singular_values"], rtol=1e-9)
    np.testing.assert_allclose(a["heldout_capture"], b["heldout_capture"], rtol=1e-9, atol=1e-12)


def test_sketched_accumulator_matches_exact_on_low_rank_gradients():
    """Every half of rank <= k: the sketch reproduces the exact statistics (norms up to the estimate)."""
    m, n, k = 30, 24, 8
    omega, psi = range_matrix(n, k, 0, "cpu", torch.float64), corange_matrix(m, 16, 0, "cpu", torch.float64)
    sketched, exact = SketchedGradAccumulator(omega, psi, k), GradAccumulator(m, n, "cpu", torch.float64)
    for i, (delta, x) in enumerate(_pairs(4, m, n, tokens=2)):  # each half rank 4
        sketched.update(sketched.contribution(delta, x), i)
        exact.update(exact.contribution(delta, x), i)
    a, b = sketched.finalize(4), exact.finalize(4)
    np.testing.assert_allclose(a["grad_singular_values"], b["grad_singular_values"], rtol=1e-8)
    np.testing.assert_allclose(a["heldout_capture"], b["heldout_capture"], atol=0.15)


# --- reference models: the sketch forced on, the exact path as the oracle ---------------------------------


@pytest.fixture(scope="module")
def reference_reports():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allocator.discovery.components import find_components
    from allocator.reference import ZOO_DIR

    out = {}
    for name in ("qwen3_5_tiny", "falcon_h1_tiny"):
        model = AutoModelForCausalLM.from_pretrained(ZOO_DIR / name)
        tok = AutoTokenizer.from_pretrained(ZOO_DIR / name)
        batches = probes.load_batches("builtin", tok, seq_len=128, samples=16, batch_size=4, seed=0)
        components = find_components(model)
        names = [c.name for c in components if c.eligible]
        reports = {
            mode: probes.run(model, batches, names, probes.ProbeSettings(progress=False, grad_sketch=mode))
            for mode in ("exact", "sketch")
        }
        out[name] = (model, components, reports)
    return out


def test_sketched_top_singular_values_track_the_exact_ones(reference_reports):
    """Leading singular values against the exact ones (see docs/results/probes.md for the measured errors)."""
    for model_name, (_, _, reports) in reference_reports.items():
        errors8, errors32 = [], []
        for name, exact in reports["exact"].modules.items():
            sketch = reports["sketch"][name]
            if not exact.ok or min(exact.d_in, exact.d_out) <= 72:  # sketch as wide as the module: exact
                continue
            rel = np.abs(sketch.grad_singular_values[:32] / exact.grad_singular_values[:32] - 1)
            errors8.append(rel[:8].max())
            errors32.append(rel.max())
        assert len(errors8) >= 10, model_name
        print(model_name, np.median(errors8), np.median(errors32), max(errors8), max(errors32))
        assert np.median(errors8) <= 0.05, (model_name, np.median(errors8))
        assert np.median(errors32) <= 0.12, (model_name, np.median(errors32))
        assert max(errors8) <= 0.2, (model_name, max(errors8))


def test_plan_from_sketched_statistics_keeps_the_exact_utility(reference_reports):
    """The integer program on sketched statistics: the same plan, or within 1% of its exact utility."""
    from allocator.scoring.utility import UtilitySettings, compute_utilities
    from allocator.solver.budget import Budget
    from allocator.solver.settings import SolverSettings
    from allocator.solver.solve import solve

    solver = SolverSettings()
    for model_name, (model, components, reports) in reference_reports.items():
        n_base = sum(p.numel() for p in model.parameters())
        for budget in ("r4", "r16"):
            params = Budget.parse(budget).resolve(components, n_base)
            tables = {
                m: compute_utilities(r, components, solver.ranks, UtilitySettings())
                for m, r in reports.items()
            }
            plans = {m: solve(components, t, params, solver) for m, t in tables.items()}
            exact = tables["exact"]
            row, col = exact.index(), {r: j for j, r in enumerate(exact.ranks)}

            def value(ranks, row=row, col=col, exact=exact):
                return sum(float(exact.values[row[n], col[r]]) for n, r in ranks.items() if n in row)

            same = dict(plans["sketch"].ranks) == dict(plans["exact"].ranks)
            ratio = value(plans["sketch"].ranks) / value(plans["exact"].ranks)
            assert same or ratio >= 0.99, (model_name, budget, ratio)
