"""Finalising accumulators into spectra: top-k SVD, held-out capture, eigenvalues and the Nystrom sketch.

Pure functions over tensors, run once per module after the pass (and after the all-reduce), on the
accumulator's device.

References: Halko, Martinsson & Tropp 2011 (randomized range finders, Alg. 4.4, Thm 10.5); Gu 2015, "Subspace
iteration randomization and singular value problems" (accuracy of the singular values); Tropp, Yurtsever,
Udell & Cevher 2017, "Fixed-rank approximation of a positive-semidefinite matrix from streaming data" (Alg. 3,
the stable Nystrom approximation used here).
"""

from __future__ import annotations

import torch


def top_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (U (m, k), σ (k,), V (n, k)) of ``matrix`` (m, n), σ descending, via the Gram matrix of the short
    side.

    Exact up to float64 rounding of σ² (σ_i is accurate while σ_i² ≫ 1e-16·σ_1²); cheaper than a full SVD when
    k ≪ min(m, n). Columns whose σ is 0 are returned as zeros (no direction is preferred there).
    """
    a = matrix.to(torch.float64)  # (m, n)
    m, n = a.shape
    k = min(k, m, n)
    wide = m < n
    gram = a @ a.T if wide else a.T @ a  # (short, short)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]
    sigma = evals.sqrt()  # (k,)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    keep = (sigma > 0).to(a.dtype)
    if wide:  # evecs are left vectors U (m, k)
        u, v = evecs * keep, (a.T @ evecs) / safe * keep
    else:  # evecs are right vectors V (n, k)
        v, u = evecs * keep, (a @ evecs) / safe * keep
    return u, sigma, v


def top_singular_values(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k σ of ``matrix`` (m, n), descending: ``top_singular`` without the vectors (eigvalsh of the
    Gram)."""
    a = matrix.to(torch.float64)
    gram = a @ a.T if a.shape[0] < a.shape[1] else a.T @ a
    return torch.linalg.eigvalsh(gram).flip(0)[: min(k, *a.shape)].clamp_min(0).sqrt()


def randomized_singular(matrix: torch.Tensor, k: int, *, oversample: int, power_iters: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (U, σ, V) like :func:`top_singular`, by randomized subspace iteration (HMT 2011, Alg. 4.4).

    A block of b = k + ``oversample`` Gaussian directions (from ``seed``, the same on every rank) is
    multiplied through ``matrix`` 2·``power_iters`` + 2 times with QR in between, in the matrix's dtype; the
    small b × n projection is then decomposed exactly in float64. σ̂_j ≤ σ_j always, and the relative error of
    σ̂_j decays like (σ_{b+1}/σ_j)^{2q+1} (Gu 2015), so the leading values are exact to rounding on decaying
    spectra. Cost O(m·n·b·q) instead of the Gram route's O(m·n² + n³).
    """
    a = matrix
    m, n = a.shape
    k = min(k, m, n)
    b = min(k + oversample, m, n)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + m * 7919 + n)
    omega = torch.randn(n, b, generator=generator, dtype=torch.float64).to(device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)  # (m, b)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q)  # (n, b)
        q, _ = torch.linalg.qr(a @ z)  # (m, b)
    small = (q.T @ a).to(torch.float64)  # (b, n)
    ub, sigma, vh = torch.linalg.svd(small, full_matrices=False)
    return q.to(torch.float64) @ ub[:, :k], sigma[:k], vh[:k].T


def singular(matrix: torch.Tensor, k: int, method: str, *, oversample: int = 32, power_iters: int = 3,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch: ``"exact"`` (Gram + eigh), ``"randomized"``, or ``"auto"`` (exact while the short side is at
    most 2·(k + oversample), where the Gram route is as cheap; randomized above)."""
    short = min(matrix.shape)
    if method == "exact" or (method == "auto" and short <= 2 * (k + oversample)):
        return top_singular(matrix, k)
    return randomized_singular(matrix, k, oversample=oversample, power_iters=power_iters, seed=seed)


def capture_curve(u: torch.Tensor, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(k,) ‖P_U_r target P_V_r‖_F² / ‖target‖_F² for r = 1..k, U_r/V_r the first r columns of u (m, k) / v
    (n, k).

    With A = Uᵀ target V (k, k) and orthonormal columns, ‖P_U_r T P_V_r‖_F² = Σ_{i,j<=r} A_ij²: the diagonal
    of the 2-D cumulative sum of A². Non-decreasing in r, within [0, 1].
    """
    t = target.to(torch.float64)
    energy = t.square().sum()
    a = u.T @ t @ v  # (k, k)
    cum = a.square().cumsum(0).cumsum(1).diagonal()  # (k,)
    return (cum / energy).clamp(0.0, 1.0)


def heldout_capture(even: torch.Tensor, odd: torch.Tensor, k: int, method: str = "exact",
                    **options) -> torch.Tensor:
    """Symmetric held-out capture: mean of (subspace of even, energy of odd) and (subspace of odd, energy of
    even).

    Returns (k,) with k = min(k, m, n), or an empty tensor when either half carries no gradient energy.
    ``method`` and ``options`` go to :func:`singular`.
    """
    if not (even.square().sum() > 0 and odd.square().sum() > 0):
        return torch.zeros(0, dtype=torch.float64, device=even.device)
    u_e, _, v_e = singular(even, k, method, **options)
    u_o, _, v_o = singular(odd, k, method, **options)
    return 0.5 * (capture_curve(u_e, v_e, odd) + capture_curve(u_o, v_o, even))


def eigenvalues_desc(second_moment: torch.Tensor) -> torch.Tensor:
    """All eigenvalues of a symmetric PSD matrix (d, d), descending, negatives from rounding clipped to 0.

    Solved in the matrix's own dtype: a float32 accumulator is only accurate to ~1e-7·λ_max anyway, and
    float64 would double the cost of the largest solves (d = 3584 in Qwen3.5-0.8B).
    """
    c = second_moment
    c = 0.5 * (c + c.T)
    return torch.linalg.eigvalsh(c).flip(0).clamp_min(0)


def gaussian_test_matrix(d_in: int, sketch_dim: int, seed: int, device, dtype) -> torch.Tensor:
    """Ω (d_in, s): a Gaussian matrix from ``seed`` (CPU generator, identical on every rank), columns
    orthonormalised.

    The Nystrom approximation depends only on range(Ω), so orthonormalising keeps the Gaussian error bound and
    improves conditioning.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + d_in)
    omega = torch.randn(d_in, sketch_dim, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(omega)
    return q.to(device=device, dtype=dtype)


def nystrom_eigenvalues(sketch: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (s,), descending, of the Nystrom approximation Ĉ = Y (ΩᵀY)⁺ Yᵀ from Y = C Ω (d, s).

    0 ≼ Ĉ ≼ C, so each returned value is a lower bound of the matching eigenvalue of C (Tropp et al. 2017,
    Alg. 3:
    shift by ν, Cholesky, SVD, unshift).
    """
    y = sketch.to(torch.float64)  # (d, s)
    om = omega.to(torch.float64)  # (d, s)
    nu = torch.finfo(torch.float64).eps * max(float(torch.linalg.matrix_norm(y)), 1e-300) * y.shape[0] ** 0.5
    y_nu = y + nu * om
    b = om.T @ y_nu  # (s, s)
    b = 0.5 * (b + b.T)
    chol, info = torch.linalg.cholesky_ex(b)
    # not positive definite: fall back to an eigen-decomposition pseudo-inverse square root
    if int(info) != 0:
        evals, evecs = torch.linalg.eigh(b)
        inv_sqrt = evecs * torch.where(evals > nu, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
        e = y_nu @ inv_sqrt
    else:
        e = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # y_nu @ chol^{-T}, (d, s)
    sigma = torch.linalg.svdvals(e)
    return (sigma.square() - nu).clamp_min(0)
