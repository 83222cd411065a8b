"""A streaming two-sided sketch of a sum of outer products A = Σ_b δ_bᵀ X_b (m × n), never formed.

Y = A Ω (m × k) and W = Ψᵀ A (l × n) with fixed test matrices Ω (n × k) and Ψ (m × l), l ≥ k. Each batch adds
δᵀ (X Ω) and (δ Ψ)ᵀ X: O(T·(m + n)·(k + l)) work and O(k·m + l·n) memory, independent of the number of
batches. Both sketches are linear in A, so with shared test matrices the sketch of a sum is the sum of the
sketches: batches, calibration halves and torch.distributed ranks add exactly (``merge``, ``all_reduce``).

Recovery (Tropp, Yurtsever, Udell & Cevher 2017, "Practical sketching algorithms for low-rank matrix
approximation", SIAM J. Matrix Anal. Appl., Alg. 4 / eq. (4.3)): Q = orth(Y), X = (ΨᵀQ)⁺ W (k × n), Â = Q X.
If rank(A) ≤ k, Â = A exactly. The top singular triplets of Â come from the thin SVD of the small X (cost
O(k²·n)); no m × n matrix is ever built. ``frobenius_sq`` is the unbiased estimate of ‖A‖_F² from both
sketches (the test matrices have orthonormal columns, E[ΩΩᵀ] = (k/n)·I).

Reusable for anything that arrives as (output gradient, input) pairs: linear modules here, routed experts
(the tokens routed to one expert) later. ``probes/accumulators.py`` keeps one sketch per calibration half.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Ψ must be independent of Ω when m == n: its generator stream is offset by this salt
_CORANGE_SALT = 7_368_787


def range_matrix(dim: int, width: int, seed: int, device, dtype, *, salt: int = 0) -> torch.Tensor:
    """(dim, width) Gaussian matrix from ``seed`` (a CPU generator: identical on every rank and device), its
    columns orthonormalised. Sketches depend only on its range, which orthonormalising keeps."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + dim + salt)
    gauss = torch.randn(dim, width, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)
    return q.to(device=device, dtype=dtype)


def corange_matrix(dim: int, width: int, seed: int, device, dtype) -> torch.Tensor:
    """Ψ (dim, width): like :func:`range_matrix`, from an independent stream."""
    return range_matrix(dim, width, seed, device, dtype, salt=_CORANGE_SALT)


class TwoSidedSketch:
    """Y = A Ω (m, k) and W = Ψᵀ A (l, n) of a streamed A (m, n), in the dtype of the test matrices.

    ``omega`` (n, ≥ k: only its first ``k`` columns are used, so one wide Ω can serve sketches of several
    widths) and ``psi`` (m, l) must be the same on every rank whose sketches are added.
    """

    def __init__(self, omega: torch.Tensor, psi: torch.Tensor, k: int | None = None) -> None:
        k = omega.shape[1] if k is None else k
        if not (0 < k <= omega.shape[1] and k <= psi.shape[1]):
            raise ValueError(
                f"sketch width k={k} must be in [1, {min(omega.shape[1], psi.shape[1])}]; "
                "widen the co-range test matrix psi to at least k columns"
            )
        self.omega, self.psi, self.k = omega[:, :k], psi, k
        self.m, self.n, self.width = psi.shape[0], omega.shape[0], psi.shape[1]  # width: l
        self.y = torch.zeros((self.m, k), dtype=omega.dtype, device=omega.device)  # A Ω
        self.w = torch.zeros((self.width, self.n), dtype=omega.dtype, device=omega.device)  # Ψᵀ A

    # --- streaming ------------------------------------------------------------------------------------

    def project(
        self, delta: torch.Tensor, x: torch.Tensor, x_omega: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(δᵀ X Ω (m, k), Ψᵀ δᵀ X (l, n)) for δ (T, m) and X (T, n) in the sketch dtype.

        ``x_omega`` (T, ≥ k): X Ω when the caller already has it (the input-moment sketch forms it)."""
        xo = x @ self.omega if x_omega is None else x_omega[:, : self.k]  # (T, k)
        return delta.T @ xo, (delta @ self.psi).T @ x  # (m, k), (l, n)

    def add(self, y: torch.Tensor, w: torch.Tensor) -> None:
        self.y.add_(y)
        self.w.add_(w)

    def update(self, delta: torch.Tensor, x: torch.Tensor, x_omega: torch.Tensor | None = None) -> None:
        """Add δᵀX (one batch, or one call site) to the sketched sum."""
        self.add(*self.project(delta, x, x_omega))

    def merge(self, other: TwoSidedSketch) -> None:
        """Add another sketch taken with the same test matrices (another shard, another half)."""
        self.add(other.y.to(self.y.device), other.w.to(self.w.device))

    def all_reduce(self) -> None:
        """Sum over torch.distributed ranks in place. Every rank must call it, in the same order."""
        dist.all_reduce(self.y, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.w, op=dist.ReduceOp.SUM)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.y).all()) and bool(torch.isfinite(self.w).all())

    @property
    def n_bytes(self) -> int:
        """Bytes held across batches (the test matrices are shared and counted once by their owner)."""
        return self.y.numel() * self.y.element_size() + self.w.numel() * self.w.element_size()

    # --- estimates ------------------------------------------------------------------------------------

    @staticmethod
    def frobenius_sq_of(y: torch.Tensor, w: torch.Tensor, m: int, n: int) -> torch.Tensor:
        """Unbiased ‖A‖_F² (a float64 0-d tensor, no host sync) from Y = AΩ (m, k) and W = ΨᵀA (l, n):
        E‖AΩ‖² = (k/n)‖A‖² and E‖ΨᵀA‖² = (l/m)‖A‖². Exact when k = n or l = m (nothing is lost)."""
        k, width = y.shape[1], w.shape[0]
        ey, ew = y.to(torch.float64).square().sum(), w.to(torch.float64).square().sum()
        if k >= n:
            return ey
        if width >= m:
            return ew
        return (ey + ew) / (k / n + width / m)

    def frobenius_sq(self) -> float:
        return float(self.frobenius_sq_of(self.y, self.w, self.m, self.n))

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q (m, k), X (k, n)) in float64 with Â = Q X (Tropp et al. 2017, eq. (4.3))."""
        q, _ = torch.linalg.qr(self.y.to(torch.float64))  # (m, k)
        core = self.psi.to(torch.float64).T @ q  # (l, k); pinv also covers a rank-deficient Y (A of rank < k)
        return q, torch.linalg.pinv(core) @ self.w.to(torch.float64)  # (k, n)

    def top(
        self, r: int, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-r (U (m, r), σ (r,), V (n, r)) of Â in float64, σ descending; r is clamped to k.

        ``low_rank``: this sketch's :meth:`low_rank`, when the caller already has it."""
        q, x = self.low_rank() if low_rank is None else low_rank
        ux, sigma, vh = torch.linalg.svd(x, full_matrices=False)  # (k, k), (k,), (k, n): small
        r = min(r, self.k)
        return q @ ux[:, :r], sigma[:r], vh[:r].T

    def summed(self, other: TwoSidedSketch) -> TwoSidedSketch:
        """A new sketch of the sum of both sketched matrices."""
        out = TwoSidedSketch(self.omega, self.psi)
        out.merge(self)
        out.merge(other)
        return out


def sketched_capture(
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    target: tuple[torch.Tensor, torch.Tensor],
    energy: float,
) -> torch.Tensor:
    """(r,) ‖U_iᵀ B V_i‖_F² / ‖B‖_F² for i = 1..r: the share of B's energy in the rank-i subspaces (U, V) of
    another matrix, with B ≈ Q X its sketch recovery and ``energy`` the estimate of ‖B‖_F².

    Non-decreasing in i (2-D cumulative sum of squares along the diagonal), clamped to [0, 1]."""
    u, _, v = top
    q, x = target
    a = (u.T @ q) @ (x @ v)  # (r, r)
    cum = a.square().cumsum(0).cumsum(1).diagonal()
    return (cum / energy).clamp(0.0, 1.0)
