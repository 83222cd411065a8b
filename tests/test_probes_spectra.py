"""The linear algebra behind the probe statistics, and accumulators: update/merge equals one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probes import spectra
from probes.accumulators import ActAccumulator, GradAccumulator


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(7, 20), (20, 7), (9, 9)])
def test_top_singular_matches_full_svd(shape):
    a = _rand(*shape)
    u, s, v = spectra.top_singular(a, 5)
    u_ref, s_ref, vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:5])
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, u_ref[:, :5] @ torch.diag(s_ref[:5]) @ vh_ref[:5])


def test_top_singular_of_rank_deficient_matrix_zeroes_null_directions():
    a = _rand(6, 1) @ _rand(1, 8, seed=1)  # rank 1
    u, s, v = spectra.top_singular(a, 4)
    assert s[0] > 0 and torch.all(s[1:] < 1e-6 * s[0])
    torch.testing.assert_close(u[:, 0:1] * s[0] @ v[:, 0:1].T, a)


def test_capture_of_a_matrix_by_its_own_subspace_reaches_one():
    a = _rand(6, 10)
    u, _, v = spectra.top_singular(a, 6)
    curve = spectra.capture_curve(u, v, a)
    s = torch.linalg.svdvals(a)
    torch.testing.assert_close(curve, (s.square().cumsum(0) / s.square().sum()))
    assert curve[-1] == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 10_000))
def test_heldout_capture_is_monotone_and_bounded(m, n, seed):
    even, odd = _rand(m, n, seed=seed), _rand(m, n, seed=seed + 1)
    curve = spectra.heldout_capture(even, odd, 8).numpy()
    assert curve.shape == (min(m, n),)
    assert np.all(np.diff(curve) >= -1e-12) and curve.min() >= 0 and curve.max() <= 1 + 1e-12


def test_heldout_capture_is_empty_without_a_second_half():
    assert spectra.heldout_capture(_rand(3, 4), torch.zeros(3, 4, dtype=torch.float64), 2).numel() == 0


def test_nystrom_is_exact_for_rank_below_sketch_and_a_lower_bound_otherwise():
    x = _rand(200, 5) @ _rand(5, 40, seed=1)  # rank 5 inputs, d_in 40
    c = x.T @ x
    omega = spectra.gaussian_test_matrix(40, 12, seed=0, device="cpu", dtype=torch.float64)
    lam = spectra.nystrom_eigenvalues(c @ omega, omega)
    exact = spectra.eigenvalues_desc(c)
    torch.testing.assert_close(lam[:5], exact[:5], rtol=1e-6, atol=1e-8)
    full = _rand(300, 40, seed=2)
    c = full.T @ full
    lam = spectra.nystrom_eigenvalues(c @ omega, omega)
    assert torch.all(lam <= spectra.eigenvalues_desc(c)[:12] * (1 + 1e-9))


def test_gaussian_test_matrix_is_seeded_and_orthonormal():
    a = spectra.gaussian_test_matrix(30, 6, seed=3, device="cpu", dtype=torch.float32)
    b = spectra.gaussian_test_matrix(30, 6, seed=3, device="cpu", dtype=torch.float32)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.T @ a, torch.eye(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("omega_cols", [None, 4])
def test_merged_shards_equal_one_pass(omega_cols):
    grads = [_rand(5, 8, seed=i).float() for i in range(5)]
    xs = [_rand(11, 8, seed=10 + i).float() for i in range(5)]
    omega = (
        None if omega_cols is None else spectra.gaussian_test_matrix(8, omega_cols, 0, "cpu", torch.float32)
    )
    one_g, one_a = GradAccumulator(5, 8, "cpu", torch.float32), ActAccumulator(8, "cpu", torch.float32, omega)
    shards = [
        (GradAccumulator(5, 8, "cpu", torch.float32), ActAccumulator(8, "cpu", torch.float32, omega))
        for _ in range(2)
    ]
    for i, (g, x) in enumerate(zip(grads, xs, strict=True)):
        one_g.update(g, i)
        one_a.update(x)
        shards[i % 2][0].update(g, i)  # batch i on rank i % 2, halves by global index
        shards[i % 2][1].update(x)
    merged_g, merged_a = shards[0]
    merged_g.merge(shards[1][0])
    merged_a.merge(shards[1][1])
    assert merged_g.n_batches == 5
    torch.testing.assert_close(merged_g.half(0), one_g.half(0))
    torch.testing.assert_close(merged_g.half(1), one_g.half(1))
    torch.testing.assert_close(merged_a.moment, one_a.moment)
    a, b = merged_g.finalize(3), one_g.finalize(3)
    assert a["grad_sq_sum"] == pytest.approx(b["grad_sq_sum"], rel=1e-6)
    np.testing.assert_allclose(a["heldout_capture"], b["heldout_capture"], rtol=1e-5)


def _decaying(m, n, seed=0):
    """A matrix with singular values 1/j: the power-law decay seen in gradient sums."""
    u, _ = torch.linalg.qr(_rand(m, min(m, n), seed=seed))
    v, _ = torch.linalg.qr(_rand(n, min(m, n), seed=seed + 1))
    s = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    return (u * s) @ v.T


def test_randomized_svd_matches_exact_on_decaying_spectrum():
    a = _decaying(300, 200).float()
    u, s, v = spectra.randomized_singular(a, 16, oversample=16, power_iters=3, seed=0)
    s_ref = torch.linalg.svdvals(a.double())[:16]
    assert torch.all(s <= s_ref * (1 + 1e-5))
    torch.testing.assert_close(s, s_ref, rtol=1e-3, atol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    ue, _, ve = spectra.top_singular(a, 16)
    b = a + 0.01 * _rand(300, 200, seed=5).float()
    torch.testing.assert_close(
        spectra.capture_curve(u, v, b), spectra.capture_curve(ue, ve, b), atol=1e-3, rtol=0
    )


def test_auto_svd_is_exact_for_small_and_randomized_for_large_matrices():
    small = _rand(40, 30)
    torch.testing.assert_close(spectra.singular(small, 8, "auto")[1], spectra.top_singular(small, 8)[1])
    large = _decaying(400, 300).float()
    auto = spectra.singular(large, 8, "auto", oversample=8)[1]
    torch.testing.assert_close(
        auto, spectra.randomized_singular(large, 8, oversample=8, power_iters=3, seed=0)[1]
    )
