"""Utility signals: probe statistics of one module -> a normalised per-parameter curve phi_m(r) over a rank
grid.

Stage 3a. Input: per-module probe stats (see ``docs/design.md``: ``grad_singular_values``,
``act_eigenvalues``,
``heldout_capture``, ``fisher_trace``, ...) and :class:`~allocator.discovery.components.Component` shapes.
Output: an ``(n_modules, n_ranks)`` array ``phi``; :func:`allocator.scoring.utility.compute_utilities` turns
it into utilities ``u_m(r) = p_m * prior_family * phi_m(r)`` with ``p_m`` the LoRA parameters per rank
(``docs/utility.md``).

Every signal is built from two primitives (both optional):

- ``spectrum(stats, c)``: per-direction energies ``e_1..e_k >= 0``; the first ``r`` of them are what rank
``r``
  reaches. ``None`` means no rank information, and the prior shape is used.
- ``scale(stats, c)``: a shape-normalised module-level sensitivity; ``None`` means no magnitude information.

References: LoRA-GA (Wang et al. 2024) and GoRA (He et al. 2025) for the gradient-spectrum view; EVA (Paischer
et al. 2024) for explained activation variance; the empirical Fisher (Kirkpatrick et al. 2017) for
sensitivity.
Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.errors import AllocatorError
from allocator.scoring.evidence import demand_weights

if TYPE_CHECKING:
    from allocator.discovery.component import Component
    from allocator.scoring.utility import UtilitySettings

# the capacity signal's prior shift: at a budget of rank 1 the sqrt(r) prior's first-rank premium (2.4x the
# second) kept every plan uniform's; shifted by one rank it is 1.3x
CAPACITY_PRIOR_SHIFT = 1
_CAPTURE_TOL = 1e-3  # held-out capture may dip by float noise; a larger dip is a probe bug


def dmin(c: Component) -> int:
    """Largest rank a LoRA on ``c`` can use: ``min(d_in, d_out)`` (rank(BA) never exceeds it)."""
    return min(int(c.d_in), int(c.d_out))


def prior_curves(components: Sequence[Component], ranks: Sequence[int], shift: int = 0) -> np.ndarray:
    """The uniform prior ``phi_U[m, r] = (sqrt(min(r, dmin_m) + s) - sqrt(s)) / (sqrt(R + s) - sqrt(s))``,
    ``R = max(ranks)``, ``s = shift``; shape (n, n_ranks). At ``s = 0`` (the default) it is
    ``sqrt(min(r, dmin_m) / R)``.

    With ``u_m = p_m * phi_U`` the utility per parameter is the same concave function of rank for every
    module, so by Jensen's inequality the uniform rank is the optimum of ``max sum u s.t. sum cost <= B``
    whenever ``B`` is a uniform grid rank's cost: flat evidence reproduces the uniform plan, for any shift. A
    shift lowers the premium on a module's first ranks: under ``sqrt(r)`` the first rank is worth 2.4x the
    second, at ``s = 1`` 1.3x (``CapacitySignal``).
    """
    r = np.asarray(ranks, dtype=float)  # (R,)
    caps = np.array([dmin(c) for c in components], dtype=float)  # (n,)
    top = np.sqrt(r[-1] + shift) - np.sqrt(shift)
    return (np.sqrt(np.minimum(r[None, :], caps[:, None]) + shift) - np.sqrt(shift)) / top  # (n, R)


def spectral_curve(energies: np.ndarray | None, cap: int, ranks: np.ndarray) -> np.ndarray | None:
    """``sqrt(E(min(r, T)) / E(T) * T / R)`` with ``E`` the partial sums of ``energies``, ``T = min(R, cap)``.

    Directions past the measured ``k`` are assumed as strong as the ``k``-th (a flat tail: the optimistic
    bound for a descending spectrum, which leans toward the prior). A flat spectrum gives exactly the prior
    curve. Returns ``None`` (use the prior) when there is nothing to normalise by.
    """
    top = int(min(ranks[-1], cap))
    if energies is None or energies.size == 0 or top <= 0:
        return None
    e = energies[:top]
    if e.size < top:
        e = np.concatenate([e, np.full(top - e.size, e[-1])])  # flat tail
    cum = np.concatenate([[0.0], np.cumsum(e)])  # (top + 1,), non-decreasing: e >= 0
    if not cum[top] > 0:
        return None
    return np.sqrt(cum[np.minimum(ranks, top)] / cum[top] * (top / ranks[-1]))


def scale_weights(q: np.ndarray, exponent: float, clip: float) -> np.ndarray:
    """``clip((q / geomean(q))**exponent, 1/clip, clip)``: a compressed, bounded sensitivity weight, mean ~1.

    Magnitudes vary by orders across layers (layer 0 gradients dominate); measured on tiny models,
    uncompressed magnitude put 40-68% of the budget in layer 0 and lost to uniform, so the exponent is small
    and the range bounded. ``q <= 0`` gets the floor ``1/clip``; ``NaN`` (no information) gets the neutral 1.
    """
    q = np.asarray(q, dtype=float)
    known = ~np.isnan(q)
    if exponent == 0 or not np.any(q[known] > 0):
        return np.ones_like(q)
    ref = np.exp(np.mean(np.log(q[known & (q > 0)])))
    with np.errstate(divide="ignore"):
        w = np.power(np.maximum(np.where(known, q, ref), 0.0) / ref, exponent)
    return np.clip(w, 1.0 / clip, clip)


def _vector(stats: Any, field: str, name: str) -> np.ndarray:
    value = getattr(stats, field, None)
    v = np.zeros(0) if value is None else np.asarray(value, dtype=float).ravel()
    if not np.all(np.isfinite(v)):
        raise AllocatorError(f"probe stats of {name} are marked ok but {field} is not finite; re-run the "
                             "probes")
    return v


def _scalar(stats: Any, field: str, name: str) -> float:
    value = float(getattr(stats, field, 0.0) or 0.0)
    if not np.isfinite(value):
        raise AllocatorError(f"probe stats of {name} are marked ok but {field} is not finite; re-run the "
                             "probes")
    return value


def n_entries(c: Component) -> int:
    """Weight entries of the adapted matrix (all experts): the shape normaliser for summed statistics."""
    return int(c.n_experts) * int(c.d_in) * int(c.d_out)


class Signal:
    """A way to read probe statistics as utility.

    Contract (checked for every signal by ``tests/test_utility.py``, and on every call by
    :func:`check_curves`): ``curves`` returns a finite ``(n, n_ranks)`` array ``phi`` with ``phi[:, 0] == 0``,
    non-decreasing along ranks, normalised across shapes: ``p_m * phi_m(r)`` is utility *per LoRA parameter
    spent* comparable between modules of any shape, flat evidence (isotropic spectrum, equal sensitivity)
    gives the prior :func:`prior_curves`, and a module can never look more valuable than its usable rank
    ``min(d_in, d_out)`` allows (a 4-output projection saturates at ``phi = sqrt(4 / R)``, as its prior does).

    Subclasses override ``spectrum`` and/or ``scale`` (both default to "no information"); ``curves`` is
    written once here on top of them. ``scale_kind`` picks the exponent: ``"magnitude"`` (gradient, Fisher) or
    ``"consistency"``.
    """

    name: ClassVar[str] = ""
    scale_kind: ClassVar[str] = "magnitude"

    def spectrum(self, stats: Any, c: Component) -> np.ndarray | None:
        """Per-direction energies (length k, >= 0); ``None`` = no rank information."""
        return None

    def scale(self, stats: Any, c: Component) -> float | None:
        """Shape-normalised module sensitivity (> 0); ``None`` = no magnitude information."""
        return None

    def curves(
        self,
        stats: Sequence[Any],
        components: Sequence[Component],
        ranks: Sequence[int],
        settings: UtilitySettings,
    ) -> np.ndarray:
        r = np.asarray(ranks, dtype=np.int64)
        phi = prior_curves(components, ranks)  # (n, R): rows without rank information keep the prior shape
        for i, (s, c) in enumerate(zip(stats, components, strict=True)):
            row = spectral_curve(self.spectrum(s, c), dmin(c), r)
            if row is not None:
                phi[i] = row
        q = [self.scale(s, c) for s, c in zip(stats, components, strict=True)]
        if any(v is not None for v in q):
            exponent = (
                settings.magnitude_exponent
                if self.scale_kind == "magnitude"
                else settings.consistency_exponent
            )
            phi = (
                phi
                * scale_weights(
                    np.array([np.nan if v is None else v for v in q]), exponent, settings.scale_clip
                )[:, None]
            )
        return phi


class UniformSignal(Signal):
    """No evidence: the prior. The solver then reproduces the uniform plan (up to the grid)."""

    name = "uniform"


class GradientSpectrumSignal(Signal):
    """First-order loss decrease reachable by a rank-r update: ``sqrt(sum_{i<=r} sigma_i^2)`` (LoRA-GA, GoRA).

    Shape: sigma_i^2 of the accumulated gradient. Scale: gradient energy per direction per LoRA parameter over
    the measured usable directions, ``sqrt(E(t) / (t * p_m))``, ``t = min(k, dmin)``.
    """

    name = "gradient_spectrum"

    def spectrum(self, stats: Any, c: Component) -> np.ndarray | None:
        sigma = np.sort(np.abs(_vector(stats, "grad_singular_values", c.name)))[::-1]
        return sigma**2 if sigma.size else None

    def scale(self, stats: Any, c: Component) -> float | None:
        e = self.spectrum(stats, c)
        if e is None:
            return None
        top = min(e.size, dmin(c))
        return float(np.sqrt(e[:top].sum() / (top * c.n_params_per_rank)))


class FisherSignal(Signal):
    """Sensitivity only: RMS gradient per weight entry ``sqrt(fisher_trace / n_entries)``, prior shape."""

    name = "fisher"

    def scale(self, stats: Any, c: Component) -> float | None:
        return float(np.sqrt(max(_scalar(stats, "fisher_trace", c.name), 0.0) / n_entries(c)))


class ActivationRankSignal(Signal):
    """Explained variance of the input second moment captured by its top-r eigenvectors (EVA); no scale.

    Modules reading the same input share this curve; that is the EVA view, not a bug. Per-parameter
    normalisation keeps narrow readers (few outputs) from looking cheap and valuable.
    """

    name = "activation_rank"

    def spectrum(self, stats: Any, c: Component) -> np.ndarray | None:
        # PSD: negatives are round-off
        lam = np.sort(np.maximum(_vector(stats, "act_eigenvalues", c.name), 0.0))[::-1]
        return lam if lam.size else None


class ExplainedVarianceSignal(Signal):
    """EVA's own criterion: the share of the input variance the top-r principal directions explain,
    ``phi_m(r) = sum_{i<=r} lambda_i / tr(C)``, linear in the eigenvalues.

    With ``u_m = p_m * phi_m`` the solver's value per parameter of a module's i-th direction is its
    explained-variance ratio ``lambda_i / tr(C)``: EVA's global ranking of components, counted in parameters
    (``docs/utility.md``). Unlike the other signals, flat evidence is not the prior: an isotropic input
    explains ``r / d_in`` (every direction equally little), so a concentrated input wins budget from a spread
    one, which is EVA's point. Capped at ``scale_clip`` times the prior's top value, like every signal, so a
    narrow projection cannot look cheap and valuable. Directions past the measured ``k`` add nothing (a lower
    bound).
    """

    name = "explained_variance"

    def curves(
        self,
        stats: Sequence[Any],
        components: Sequence[Component],
        ranks: Sequence[int],
        settings: UtilitySettings,
    ) -> np.ndarray:
        r = np.asarray(ranks, dtype=np.int64)
        prior = prior_curves(components, ranks)
        phi = prior.copy()  # rows without a spectrum keep the prior
        for i, (st, c) in enumerate(zip(stats, components, strict=True)):
            lam = np.sort(np.maximum(_vector(st, "act_eigenvalues", c.name), 0.0))[::-1]
            trace = float(getattr(st, "act_trace", math.nan))
            total = trace if math.isfinite(trace) and trace > 0 else float(lam.sum())
            if lam.size == 0 or not total > 0:
                continue
            cum = np.minimum(np.concatenate([[0.0], np.cumsum(lam)]) / total, 1.0)  # (k + 1,)
            phi[i] = np.minimum(
                cum[np.minimum(r, min(lam.size, dmin(c)))], settings.scale_clip * prior[i, -1]
            )
        return phi


class HeldoutCaptureSignal(Signal):
    """Adam-aware: how much held-out gradient energy a rank-r subspace chosen on other batches captures.

    Adam normalises step sizes, so direction consistency matters more than gradient magnitude. Shape:
    increments of the capture curve. Scale (``consistency`` exponent): lift over a random subspace,
    ``h(t) * dmin / t`` at ``t = min(k, dmin)``; 1 for noise, about ``dmin / t`` for a gradient that keeps its
    direction.
    """

    name = "heldout_capture"
    scale_kind = "consistency"

    def _capture(self, stats: Any, c: Component) -> np.ndarray:
        h = _vector(stats, "heldout_capture", c.name)
        if h.size and (
            np.min(np.diff(np.concatenate([[0.0], h]))) < -_CAPTURE_TOL or h.max() > 1 + _CAPTURE_TOL
        ):
            raise AllocatorError(
                f"heldout_capture of {c.name} is not a non-decreasing fraction in [0, 1]; the probe report "
                "is corrupt"
            )
        return np.maximum.accumulate(np.clip(h, 0.0, 1.0))  # absorb float noise below the tolerance

    def spectrum(self, stats: Any, c: Component) -> np.ndarray | None:
        h = self._capture(stats, c)
        return np.diff(np.concatenate([[0.0], h])) if h.size else None

    def scale(self, stats: Any, c: Component) -> float | None:
        h = self._capture(stats, c)
        if not h.size:
            return None
        t = min(h.size, dmin(c))
        return float(h[t - 1] * dmin(c) / t)


class CapacitySignal(Signal):
    """Where a LoRA's capacity binds: gradient energy beyond the rank the budget gives every module, per
    parameter, pooled over each family, measured at a warmed-up point (``probes.warmup``).

    For family ``F``, ``t_F`` = the energy of singular directions in ``allocator.scoring.evidence.window(r0)``
    summed over its modules, divided by their LoRA parameters per rank; ``r0`` is the budget's uniform rank
    (``UtilitySettings.capacity_start``; the warm-up's LoRA rank). The family weight is
    ``w_F = (t_F / tbar) ** capacity_exponent`` (``tbar`` the parameter-weighted mean), bounded by
    ``capacity_clip``, on the prior's shape shifted by ``CAPACITY_PRIOR_SHIFT``. With ``u ~ p w sqrt(r)``
    (ranks above a few) the solver gives family ``F`` ranks ``~ w_F^2``, so its budget share is
    ``~ P_F t_F^(2 e)``. Within a family the plan stays uniform. Flat evidence (equal ``t_F``) is the prior,
    hence uniform's plan. A module whose spectrum ends before the window counts 0.
    """

    name = "capacity"

    def curves(
        self,
        stats: Sequence[Any],
        components: Sequence[Component],
        ranks: Sequence[int],
        settings: UtilitySettings,
    ) -> np.ndarray:
        r0 = max(1, int(settings.capacity_start))
        phi = prior_curves(components, ranks, shift=CAPACITY_PRIOR_SHIFT)
        for s, c in zip(stats, components, strict=True):
            _vector(s, "grad_singular_values", c.name)  # a non-finite spectrum is a probe bug, not evidence
        weight = demand_weights(stats, components, r0, settings.capacity_measure, settings.capacity_exponent)
        if not weight:
            return phi
        clip = settings.capacity_clip
        w = np.array([min(max(weight[c.family], 1.0 / clip), clip) for c in components])
        return phi * w[:, None]


class CombinedSignal(Signal):
    """Weighted mean of other signals' curves; weights from ``UtilitySettings.weights`` (normalised to sum
    1)."""

    name = "combined"

    def curves(
        self,
        stats: Sequence[Any],
        components: Sequence[Component],
        ranks: Sequence[int],
        settings: UtilitySettings,
    ) -> np.ndarray:
        weights = {k: float(w) for k, w in settings.weights.items() if w > 0}
        total = sum(weights.values())
        phi = np.zeros((len(components), len(ranks)))
        for key, w in sorted(weights.items()):
            phi += (w / total) * SIGNALS[key]().curves(stats, components, ranks, settings)
        return phi


SIGNALS: Mapping[str, type[Signal]] = {
    cls.name: cls
    for cls in (
        UniformSignal,
        GradientSpectrumSignal,
        FisherSignal,
        ActivationRankSignal,
        ExplainedVarianceSignal,
        HeldoutCaptureSignal,
        CapacitySignal,
        CombinedSignal,
    )
}


def check_curves(signal: str, names: Sequence[str], phi: np.ndarray, shape: tuple[int, int]) -> None:
    """Raise :class:`AllocatorError` if ``phi`` breaks the :class:`Signal` contract (a bug in the signal)."""
    if phi.shape != shape or not np.all(np.isfinite(phi)):
        raise AllocatorError(
            f"signal {signal!r} returned shape {phi.shape} or non-finite values; expected {shape}"
        )
    bad = np.flatnonzero(
        (phi[:, 0] != 0) | np.any(np.diff(phi, axis=1) < 0, axis=1) | np.any(phi < 0, axis=1)
    )
    if bad.size:
        raise AllocatorError(
            f"signal {signal!r} broke its contract (phi(0) == 0, non-decreasing in rank) on "
            f"{names[bad[0]]!r} and {bad.size - 1} other(s); this is a bug in the signal"
        )
