"""Streaming accumulators of the probe statistics; memory is independent of the number of batches.

``GradAccumulator`` sums G_b = δ_bᵀ X_b into an even-batch and an odd-batch half (by GLOBAL batch index, so a
sharded run splits the same way as one process) plus Σ‖G_b‖_F and Σ‖G_b‖_F²: 2·d_out·d_in numbers, the exact
path (the test oracle, and narrow modules). ``SketchedGradAccumulator`` keeps the same statistics as one
two-sided sketch per half (:mod:`probes.sketch`): k·max(d_in, d_out) + l·min(d_in, d_out) numbers per half,
never a weight gradient. ``ActAccumulator`` sums the input second moment C = Σ XᵀX, or its Nystrom sketch C Ω
when d_in is above ``sketch_threshold``.

All have ``update`` (one micro-batch), ``merge`` (another accumulator, same shapes) and ``all_reduce`` (sum
over torch.distributed ranks); sums are associative, so merged shards equal one pass up to float rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from probes import spectra
from probes.sketch import TwoSidedSketch, sketched_capture


def _all_reduce(tensor: torch.Tensor) -> None:

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


class GradAccumulator:
    """Σ_even G_b, Σ_odd G_b (d_out, d_in) and the norm sums of one module, on the module's device."""

    def __init__(self, d_out: int, d_in: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.device, self.dtype = (d_out, d_in), device, dtype
        self.halves: list[torch.Tensor | None] = [None, None]  # [even, odd], allocated on first use
        self.norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n_batches = 0

    def update(self, grad: torch.Tensor, batch_index: int) -> None:
        """Add one micro-batch's full weight gradient G_b (d_out, d_in), already summed over call sites."""
        half = batch_index % 2
        if self.halves[half] is None:
            self.halves[half] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.halves[half].add_(grad)
        norm = torch.linalg.vector_norm(grad).to(torch.float64)  # no host sync
        self.norm_sum += norm
        self.sq_sum += norm.square()
        self.n_batches += 1

    def contribution(self, delta: torch.Tensor, x: torch.Tensor, x_omega: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """One call site's share of G_b: δᵀX (d_out, d_in) from δ (T, d_out) and X (T, d_in)."""
        return delta.T @ x

    @property
    def n_bytes(self) -> int:
        """Bytes held across batches once both halves exist."""
        return 2 * self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def half(self, index: int) -> torch.Tensor:
        out = self.halves[index]
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device) if out is None else out

    def merge(self, other: GradAccumulator) -> None:
        for i in (0, 1):
            if other.halves[i] is not None:
                self.halves[i] = self.half(i).add_(other.halves[i].to(self.device))
        self.norm_sum += other.norm_sum.to(self.device)
        self.sq_sum += other.sq_sum.to(self.device)
        self.n_batches += other.n_batches

    def all_reduce(self) -> None:
        """Sum over ranks in place. Every rank must call it, in the same module order."""
        self.halves = [self.half(0), self.half(1)]
        for tensor in self.halves:
            _all_reduce(tensor)
        scalars = torch.stack([self.norm_sum, self.sq_sum,
                               torch.tensor(float(self.n_batches), dtype=torch.float64, device=self.device)])
        _all_reduce(scalars)
        self.norm_sum, self.sq_sum, self.n_batches = scalars[0], scalars[1], int(scalars[2].item())

    def finite(self) -> bool:
        parts = [self.norm_sum, self.sq_sum] + [h for h in self.halves if h is not None]
        return all(bool(torch.isfinite(p).all()) for p in parts)

    def finalize(self, k: int, method: str = "exact", **options) -> dict:
        """Top-k σ of Σ G_b, ‖Σ G_b‖_F², symmetric held-out capture; scalars as Python floats.

        ``method``/``options``: how the top-k SVDs are taken (:func:`probes.spectra.singular`).
        """
        even, odd = self.half(0), self.half(1)
        total = even + odd
        if method == "exact" or (
            method == "auto" and min(self.shape) <= 2 * (k + options.get("oversample", 32))
        ):
            sigma = spectra.top_singular_values(total, k)
        else:
            sigma = spectra.singular(total, k, method, **options)[1]
        return {
            "grad_norm_sum": float(self.norm_sum),
            "grad_sq_sum": float(self.sq_sum),
            "fisher_trace": float(self.sq_sum) / self.n_batches,
            "grad_total_sq": float(total.to(torch.float64).square().sum()),
            "grad_singular_values": sigma.cpu().numpy(),
            "heldout_capture": spectra.heldout_capture(even, odd, k, method, **options).cpu().numpy(),
        }


class SketchedGradAccumulator:
    """The statistics of :class:`GradAccumulator` from one :class:`TwoSidedSketch` per calibration half.

    The sketch is of G (d_out, d_in) when d_out ≥ d_in and of Gᵀ otherwise (``transposed``), so the wider
    co-range always lies along the shorter side: memory k·max(d_in, d_out) + l·min(d_in, d_out) per half.
    ``omega`` (long side, ≥ k columns) and ``psi`` (short side, l columns) are shared by every module of the
    same widths on a device and by every rank (seeded). Per micro-batch, ‖G_b‖_F² is the sketches' unbiased
    estimate (:meth:`TwoSidedSketch.frobenius_sq_of`), so ``grad_norm_sum``/``grad_sq_sum`` are estimates.
    """

    def __init__(self, omega: torch.Tensor, psi: torch.Tensor, k: int, transposed: bool = False) -> None:
        self.transposed = transposed
        self.device, self.dtype, self.k = omega.device, omega.dtype, k
        self.halves = [TwoSidedSketch(omega, psi, k), TwoSidedSketch(omega, psi, k)]  # [even, odd]
        self.shape = (self.halves[0].m, self.halves[0].n)  # of the sketched matrix (G or Gᵀ)
        self.norm_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sq_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_batches = 0

    def contribution(self, delta: torch.Tensor, x: torch.Tensor, x_omega: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call site's share of the sketches of G_b (or G_bᵀ): (range (m, k), co-range (l, n)).

        ``x_omega``: X Ω, reused when G itself is sketched (Ω then acts on the input side)."""
        if self.transposed:
            return self.halves[0].project(x, delta)  # Gᵀ = Xᵀδ
        return self.halves[0].project(delta, x, x_omega)

    def update(self, parts: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        """Add one micro-batch's sketches (summed over call sites) to its half."""
        y, w = parts
        self.halves[batch_index % 2].add(y, w)
        sq = TwoSidedSketch.frobenius_sq_of(y, w, *self.shape)
        self.norm_sum += sq.sqrt()
        self.sq_sum += sq
        self.n_batches += 1

    @property
    def n_bytes(self) -> int:
        return sum(h.n_bytes for h in self.halves)

    def merge(self, other: SketchedGradAccumulator) -> None:
        for mine, theirs in zip(self.halves, other.halves, strict=True):
            mine.merge(theirs)
        self.norm_sum += other.norm_sum.to(self.device)
        self.sq_sum += other.sq_sum.to(self.device)
        self.n_batches += other.n_batches

    def all_reduce(self) -> None:
        for half in self.halves:
            half.all_reduce()
        scalars = torch.stack([self.norm_sum, self.sq_sum,
                               torch.tensor(float(self.n_batches), dtype=torch.float64, device=self.device)])
        _all_reduce(scalars)
        self.norm_sum, self.sq_sum, self.n_batches = scalars[0], scalars[1], int(scalars[2].item())

    def finite(self) -> bool:
        return all(h.finite() for h in self.halves) and bool(torch.isfinite(self.norm_sum + self.sq_sum))

    def finalize(self, k: int, method: str = "exact", **options) -> dict:
        """As :meth:`GradAccumulator.finalize`, from the sketches (``method``/``options`` unused: every
        factorisation here is of a k-row matrix). ‖Σ G_b‖_F² is the sketch estimate, raised to Σ_{i≤k} σ̂_i²
        where that is larger, so the energy curve stays ≤ 1."""
        even, odd = self.halves
        total = even.summed(odd)
        sigma = total.top(k)[1]
        energy = max(total.frobenius_sq(), float(sigma.square().sum()))
        return {
            "grad_norm_sum": float(self.norm_sum),
            "grad_sq_sum": float(self.sq_sum),
            "fisher_trace": float(self.sq_sum) / self.n_batches,
            "grad_total_sq": energy,
            "grad_singular_values": sigma.cpu().numpy(),
            "heldout_capture": self._capture(k).cpu().numpy(),
        }

    def _capture(self, k: int) -> torch.Tensor:
        """Symmetric held-out capture from the two halves' sketches (see :func:`sketched_capture`)."""
        energies = [h.frobenius_sq() for h in self.halves]
        if not all(e > 0 for e in energies):
            return torch.zeros(0, dtype=torch.float64)
        recovered = [h.low_rank() for h in self.halves]
        tops = [h.top(k, lr) for h, lr in zip(self.halves, recovered, strict=True)]
        return 0.5 * (sketched_capture(tops[0], recovered[1], energies[1])
                      + sketched_capture(tops[1], recovered[0], energies[0]))


class ActAccumulator:
    """Σ XᵀX (d_in, d_in), or the sketch Σ XᵀX Ω (d_in, s) plus tr(Σ XᵀX), for one or several modules.

    Several modules that always read the same input tensor (q/k/v, gate/up) share one accumulator.
    """

    def __init__(
        self, d_in: int, device: torch.device, dtype: torch.dtype, omega: torch.Tensor | None
    ) -> None:
        self.d_in, self.device, self.dtype, self.omega = d_in, device, dtype, omega
        width = d_in if omega is None else omega.shape[1]
        self.moment = torch.zeros((d_in, width), dtype=dtype, device=device)
        self.trace = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def sketched(self) -> bool:
        return self.omega is not None

    def update(self, x: torch.Tensor, x_omega: torch.Tensor | None = None) -> None:
        """Add the rows of x (tokens, d_in), in place (no d_in x d_in temporary for the exact moment).

        ``x_omega`` (tokens, ≥ s): x Ω when the caller has it already (the gradient sketch shares it)."""
        x = x.to(self.dtype)
        if self.omega is None:
            self.moment.addmm_(x.T, x)  # tr(C) is read off the diagonal at the end
        else:
            xo = x @ self.omega if x_omega is None else x_omega[:, : self.omega.shape[1]]
            self.moment.addmm_(x.T, xo)  # (d_in, s)
            self.trace += x.square().sum(dtype=torch.float64)

    @property
    def n_bytes(self) -> int:
        return self.moment.numel() * self.moment.element_size()

    def add(self, moment: torch.Tensor, trace: torch.Tensor) -> None:
        self.moment.add_(moment)
        self.trace += trace

    def merge(self, other: ActAccumulator) -> None:
        self.add(other.moment.to(self.device), other.trace.to(self.device))

    def clone(self) -> ActAccumulator:
        out = ActAccumulator(self.d_in, self.device, self.dtype, self.omega)
        out.merge(self)
        return out

    def all_reduce(self) -> None:
        _all_reduce(self.moment)
        _all_reduce(self.trace)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.moment).all()) and bool(torch.isfinite(self.trace))

    def spectrum(self) -> tuple[torch.Tensor, float]:
        """(descending eigenvalues of C, or their Nystrom lower bounds when sketched; tr(C)), on the CPU."""
        if self.omega is None:
            trace = float(self.moment.diagonal().sum(dtype=torch.float64))
            return spectra.eigenvalues_desc(self.moment).cpu(), trace
        return spectra.nystrom_eigenvalues(self.moment, self.omega).cpu(), float(self.trace)

    def finalize(self, n_tokens: int, spectrum: tuple[torch.Tensor, float] | None = None) -> dict:
        """Eigenvalues of C / n_tokens and tr(C) / n_tokens (``spectrum`` reuses a shared accumulator's)."""
        eig, trace = spectrum if spectrum is not None else self.spectrum()
        return {
            "act_eigenvalues": (eig / n_tokens).numpy(),
            "act_trace": trace / n_tokens,
            "act_sketched": self.sketched,
        }
