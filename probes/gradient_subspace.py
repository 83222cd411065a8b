"""The top right singular vectors of each module's calibration-loss weight gradient, from one probe pass.

``gradient_subspaces(model, batches, names, k)`` runs the model's own causal-LM loss forward and backward once
per micro-batch with the weights frozen, as :func:`probes.run` does (same hooks, :mod:`probes.hooks`; same
frozen, eval-mode state, restored exactly afterwards), and keeps per module only the gradient G = Σ_b δ_bᵀ
X_b: exactly where the module is narrow, else as the two-sided sketch of :mod:`probes.sketch`
(``ProbeSettings``' ``grad_sketch`` rule), so no d_out × d_in gradient is formed for a wide module. Input
moments, spectra and held-out statistics are skipped. It returns the top ``k`` right singular vectors of G
(``(k, d_in)``, float32, rows by decreasing singular value): the input directions along which the loss falls
fastest, which ``allocator``'s gradient init puts in lora_A.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from probes.errors import ProbeError
from probes.hooks import ModuleProbe, Prober
from probes.records import IGNORE_INDEX
from probes.runner import _accepts, _check_batches, _probing_state, _resolve, check_token_ids, probe_batch
from probes.settings import ProbeSettings


class _GradientOnly(Prober):
    """The probe hooks without the input second moments (only the gradient is needed here)."""

    def end_forward(self) -> None:
        for probe in self.probes:
            probe.keys = []
        self._inputs = {}


def gradient_subspaces(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str],
    k: int,
    settings: ProbeSettings | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: (k, d_in) float32 CPU tensor}``: orthonormal rows, the top ``k`` right singular vectors of the
    module's calibration-loss gradient, by decreasing singular value.

    ``batches``: dicts with ``input_ids`` and optionally ``attention_mask`` and ``labels`` (without labels
    every attended token carries the loss). ``settings``: the probes' sketch settings (``max_rank`` is set to
    ``k``; ``dtype``, ``seed``, ``device``, ``grad_sketch``, the oversampling and ``gradient_checkpointing``
    apply). The sketches are at least ``k + max(32, k)`` (range) and ``max(64, 2k)`` more (co-range) wide,
    wider than the probes' defaults: a calibration gradient's spectrum is flat after its first few directions,
    and on the tiny reference models the probes' widths kept 85-97% of the exact top-k energy ‖G V‖², these
    97-99%. Where the gradient has fewer than ``k`` singular vectors (``d_out < k``), the remaining rows
    complete the basis orthogonally from a seeded draw (directions without gradient, as are those past G's
    rank when fewer tokens than ``k`` carry the loss).
    """
    if k < 1 or not names:
        raise ProbeError("the gradient subspaces need at least one module name and k >= 1")
    settings = settings or ProbeSettings()
    # wider sketches than the probes': here the subspace matters, not just its spectrum
    settings = ProbeSettings(**{**settings.to_dict(), "max_rank": k, "progress": False,
                                "sketch_oversample": max(settings.sketch_oversample, 32, k),
                                "corange_oversample": max(settings.corange_oversample, 64, 2 * k)})
    batches = [_labelled(b) for b in batches]
    _check_batches(batches)
    check_token_ids(model, batches)
    dtype = getattr(torch, settings.dtype)
    _resolve(model, list(names), dtype)  # bad names fail before the model is touched
    with _probing_state(model, settings) as device:
        # resolved where the pass runs (``device`` may have moved the model): accumulators live there
        probes, by_name = _resolve(model, list(names), dtype)
        prober = _GradientOnly(probes, dtype, settings.sketch_threshold, settings.sketch_dim, settings.seed,
                               settings)
        prober.attach(model)
        try:
            _backward_passes(model, batches, prober, device)
        finally:
            prober.detach()
    silent = sorted(n for n, p in by_name.items() if p.grad.n_batches == 0)
    if silent:
        raise ProbeError(f"no loss gradient reached {silent[:3]} on the calibration batches; leave such "
                         "modules out of the plan or use another init")
    done = {id(p): _right_vectors(p, k, settings.seed) for p in probes}
    return {name: done[id(p)] for name, p in by_name.items()}


def _labelled(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {key: batch[key] for key in ("input_ids", "attention_mask", "labels") if key in batch}
    if "labels" not in out:  # the causal-LM loss on every attended token
        mask = out.get("attention_mask", torch.ones_like(out["input_ids"]))
        out["labels"] = out["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    return out


def _backward_passes(model: nn.Module, batches: list[dict], prober: Prober, device: torch.device) -> None:
    """One forward and backward per batch, the hooks adding each module's δᵀX (or its sketches)."""
    accepts_cache = _accepts(model, "use_cache")
    for i, batch in enumerate(batches):
        value, _ = probe_batch(model, batch, i, device, prober, accepts_cache=accepts_cache)
        if not math.isfinite(value):
            raise ProbeError(f"loss is {value} on calibration batch {i}; check that batch and the model "
                             "dtype (load a float16 model in bfloat16 or float32)")


def _right_vectors(probe: ModuleProbe, k: int, seed: int) -> torch.Tensor:
    """(k, d_in): G's top right singular vectors, from the exact gradient or its sketch, completed to k."""
    grad = probe.grad
    if probe.sketched:  # a sketch of G (d_out, d_in), or of Gᵀ when d_in > d_out (``transposed``)
        total = grad.halves[0].summed(grad.halves[1])
        u, _, v = total.top(k)
        vectors = (u if grad.transposed else v).T  # (≤ k, d_in)
    else:
        g = (grad.half(0) + grad.half(1)).to(torch.float64)
        vectors = torch.linalg.svd(g, full_matrices=False).Vh[:k]
    vectors = vectors.to(torch.float64).cpu()
    if vectors.shape[0] < k:
        vectors = _complete(vectors, k, probe.d_in, seed)
    return vectors.to(torch.float32)


def _complete(rows: torch.Tensor, k: int, d_in: int, seed: int) -> torch.Tensor:
    """``rows`` (orthonormal) followed by orthonormal rows orthogonal to them, k in all (k <= d_in)."""
    if k > d_in:
        raise ProbeError(f"a rank of {k} exceeds the module's input width {d_in}; lower the rank")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + d_in)
    draw = torch.randn(d_in, k - rows.shape[0], generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([rows.T, draw], dim=1))  # the first columns span ``rows``: kept
    extra = q[:, rows.shape[0]:].T
    return torch.cat([rows, extra])
