"""The output of stage 2: ``ProbeReport`` and its per-module ``ModuleStats``. numpy, safetensors and json
only.

A report is written as two files, never pickled: ``probe_report.safetensors`` holds every array under the key
``"<module name>/<field>"`` and ``probe_report.json`` holds the scalars, statuses and ``meta`` (sorted keys).
Formulas behind every field: ``docs/probes.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

STATUSES = ("ok", "no_input", "no_gradient", "nonfinite")
ARRAY_FIELDS = ("grad_singular_values", "act_eigenvalues", "heldout_capture")
FORMAT = "probe_report/1"
JSON_NAME, ARRAYS_NAME = "probe_report.json", "probe_report.safetensors"


def _frozen_array(values: Any) -> np.ndarray:
    array = np.array(values, dtype=np.float64).reshape(-1)
    array.flags.writeable = False
    return array


# ModuleStats' statistics before any is measured (a module that never ran, or ran without a gradient)
UNMEASURED: dict[str, Any] = {
    "grad_norm_sum": math.nan,
    "grad_sq_sum": math.nan,
    "fisher_trace": math.nan,
    "grad_total_sq": math.nan,
    "grad_singular_values": [],
    "heldout_capture": [],
    "act_eigenvalues": [],
    "act_trace": math.nan,
    "act_sketched": False,
}


@dataclass(frozen=True, eq=False)
class ModuleStats:
    """Statistics of one ``nn.Linear`` (all its call sites summed) over the calibration batches.

    G_b = δ_bᵀ X_b (d_out, d_in) is the weight gradient of micro-batch b's mean causal-LM loss; C = Σ XᵀX over
    the real tokens of every call. Grad fields are NaN and arrays empty unless ``status == "ok"``; activation
    fields are filled whenever the module ran (``status`` in ok, no_gradient).
    """

    status: str  # "ok" | "no_input" (never ran) | "no_gradient" (ran, no gradient reached it) | "nonfinite"
    n_tokens: int  # rows of X seen over all calls and batches (real tokens only)
    n_batches: int  # micro-batches in which a gradient reached the module
    grad_norm_sum: float  # Σ_b ‖G_b‖_F
    grad_sq_sum: float  # Σ_b ‖G_b‖_F²
    fisher_trace: float  # grad_sq_sum / n_batches: empirical Fisher trace per micro-batch
    grad_singular_values: np.ndarray  # (k,) top-k σ of Σ_b G_b, descending; k = min(max_rank, d_in, d_out)
    # descending eigenvalues of C / n_tokens (all d_in, or sketch_dim if sketched)
    act_eigenvalues: np.ndarray
    # (k,) held-out gradient energy captured at rank r = 1..k; empty if < 2 batches
    heldout_capture: np.ndarray
    d_in: int = 0
    d_out: int = 0
    n_calls: int = 0  # forward calls seen (a module called twice per forward counts 2 per batch)
    grad_total_sq: float = math.nan  # ‖Σ_b G_b‖_F²: denominator of grad_energy_curve
    act_trace: float = math.nan  # tr(C) / n_tokens, exact even when the eigenvalues are sketched
    act_sketched: bool = False  # act_eigenvalues come from a Nystrom sketch (lower bounds, see docs)
    n_experts: int = 1  # experts pooled in these statistics (a 3-D routed-expert parameter, probes.experts)
    n_unrouted: int = 0  # of those, experts the calibration never routed a token to

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"ModuleStats.status must be one of {STATUSES}, got {self.status!r}")
        for name in ARRAY_FIELDS:
            object.__setattr__(self, name, _frozen_array(getattr(self, name)))

    def __eq__(self, other: object) -> bool:
        """Field by field; arrays compared exactly, NaN equal to NaN."""
        if not isinstance(other, ModuleStats):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ARRAY_FIELDS:
                if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
                    return False
            elif a != b and not (
                isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
            ):
                return False
        return True

    __hash__ = object.__hash__

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def grad_energy_curve(self) -> np.ndarray:
        """(k,) Σ_{i<=r} σ_i² / ‖Σ_b G_b‖_F²: share of the total gradient a rank-r update can follow."""
        if self.grad_singular_values.size == 0 or not self.grad_total_sq > 0:
            return _frozen_array([])
        return _frozen_array(np.minimum(np.cumsum(self.grad_singular_values**2) / self.grad_total_sq, 1.0))

    @property
    def act_explained_variance(self) -> np.ndarray:
        """Σ_{i<=r} λ_i / tr(C/n): share of the input second moment in the top-r eigen-directions."""
        if self.act_eigenvalues.size == 0 or not self.act_trace > 0:
            return _frozen_array([])
        return _frozen_array(
            np.minimum(np.cumsum(np.clip(self.act_eigenvalues, 0, None)) / self.act_trace, 1.0)
        )

    @property
    def act_effective_rank(self) -> float:
        """exp(Shannon entropy of λ / Σλ) (Roy & Vetterli 2007); NaN when the module never ran.

        For a sketched module the mass tr(C/n) − Σλ̂ not seen by the sketch is spread evenly over the d_in − s
        missing directions (an estimate, see docs/probes.md).
        """
        return effective_rank(self.act_eigenvalues, self.act_trace if self.act_sketched else None, self.d_in)

    def rank_for_variance(self, fraction: float) -> int:
        """Smallest r whose top-r eigen-directions hold ``fraction`` of the input second moment (0 if
        unknown)."""
        curve = self.act_explained_variance
        if curve.size == 0:
            return 0
        return int(min(np.searchsorted(curve, fraction - 1e-12) + 1, curve.size))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [float(v) for v in value] if f.name in ARRAY_FIELDS else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModuleStats:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModuleStats fields {unknown}")
        return cls(**data)


def effective_rank(eigenvalues: np.ndarray, trace: float | None = None, dim: int = 0) -> float:
    """exp(H(p)) with p = λ / Σλ over the non-negative λ; with ``trace`` the missing mass fills dim − len(λ)
    slots."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    if lam.size == 0:
        return math.nan
    parts = [lam]
    if trace is not None and dim > lam.size and trace > lam.sum():
        missing = dim - lam.size
        parts.append(np.full(missing, (trace - lam.sum()) / missing))
    lam = np.concatenate(parts)
    total = lam.sum()
    if not total > 0:
        return 0.0
    p = lam[lam > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


@dataclass(frozen=True)
class ProbeReport:
    """Per-module probe statistics plus provenance. ``modules`` is sorted by name; ``meta`` is JSON data."""

    modules: Mapping[str, ModuleStats]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(sorted(self.modules.items()))))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __getitem__(self, name: str) -> ModuleStats:
        return self.modules[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.modules)

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for stats in self.modules.values():
            counts[stats.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "meta": _plain(self.meta),
            "modules": {name: stats.to_dict() for name, stats in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeReport:
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"unsupported probe report format {data.get('format')!r}; expected {FORMAT!r}")
        return cls(
            {name: ModuleStats.from_dict(stats) for name, stats in data["modules"].items()},
            dict(data.get("meta", {})),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``probe_report.json`` and ``probe_report.safetensors`` into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays, scalars = {}, {}
        for name, stats in self.modules.items():
            row = stats.to_dict()
            for key in ARRAY_FIELDS:
                arrays[f"{name}/{key}"] = np.ascontiguousarray(getattr(stats, key))
                row.pop(key)
            scalars[name] = {k: _json_scalar(v) for k, v in row.items()}
        save_file(arrays, str(directory / ARRAYS_NAME))
        text = json.dumps(
            {"format": FORMAT, "meta": _plain(self.meta), "modules": scalars},
            sort_keys=True,
            indent=1,
            allow_nan=False,
            default=str,
        )
        (directory / JSON_NAME).write_text(text + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ProbeReport:
        directory = Path(directory)
        data = json.loads((directory / JSON_NAME).read_text(encoding="utf-8"))
        arrays = load_file(str(directory / ARRAYS_NAME))
        modules = {}
        for name, row in data["modules"].items():
            row = {k: (math.nan if v is None else v) for k, v in row.items()}
            for key in ARRAY_FIELDS:
                row[key] = arrays[f"{name}/{key}"]
            modules[name] = row
        return cls.from_dict({"format": data["format"], "meta": data["meta"], "modules": modules})


def _json_scalar(value: Any) -> Any:
    """NaN/inf are not JSON: written as null, read back as NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
