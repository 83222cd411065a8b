"""Stage 3: probe report x components -> :class:`UtilityTable` (utility of every module at every grid rank).

``compute_utilities(report, components, ranks, settings, risk_report=None)`` reads the probe statistics
through a signal from :data:`SIGNALS` (``allocator/signals.py``), blends it with the uniform prior, weights
families, and scales by LoRA parameters per rank, so that utility per parameter spent is comparable across
shapes::

    u_m(r) = p_m / P * pi_family(m) * [ alpha * phi_U,m(r) + (1 - alpha) * phi_signal,m(r) ]
    risk_m(r) = p_m / P * rho_m * min(r, dmin_m) / R              (only with a risk report)

``p_m = n_experts * (d_in + d_out)``, ``P = sum p_m`` over the table, ``R = max(ranks)``. The solver maximises
``sum u - retention_weight * sum risk``. Formulas, normalisation and the reasons are in ``docs/utility.md``.
Pure: numpy only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from allocator.discovery.component import FAMILIES, Component
from allocator.errors import AllocatorError, AllocatorWarning, InputError
from allocator.scoring.evidence import MEASURES
from allocator.scoring.signals import SIGNALS, check_curves, n_entries, prior_curves, scale_weights
from probes.settings import Range, check_ranges, ranged

__all__ = ["SIGNALS", "UtilitySettings", "UtilityTable", "compute_utilities", "risk_curves", "with_risk"]

OK = "ok"


def check_ranks(ranks: Sequence[int], what: str = "ranks") -> tuple[int, ...]:
    """A rank grid: integers, strictly increasing, starting at 0, at least one non-zero rank."""
    try:
        out = tuple(int(r) for r in ranks)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be integers, got {ranks!r}") from None
    if len(out) < 2 or out[0] != 0 or any(b <= a for a, b in zip(out, out[1:])):
        raise InputError(f"{what} must be strictly increasing, start at 0 and hold a non-zero rank; got "
                         f"{out}")
    return out


def _readonly(a: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    arr = np.array(a, dtype=float, copy=True)
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise InputError(f"UtilityTable.{what} must be a finite array of shape {shape}, got {arr.shape}")
    if np.any(arr[:, 0] != 0) or np.any(np.diff(arr, axis=1) < 0):
        raise InputError(f"UtilityTable.{what} must be 0 at rank 0 and non-decreasing along ranks")
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True)
class UtilityTable:
    """Utility (and optional retention risk) of each module at each grid rank; rows follow ``names``."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]  # starts at 0, strictly increasing
    values: np.ndarray  # (n_names, n_ranks), values[:, 0] == 0, non-decreasing along ranks
    risk: np.ndarray | None = None  # same shape and contract; retention cost of moving the module
    risk_weight: float = 0.0  # lambda in  max sum u - lambda * sum risk
    signal: str = ""  # name of the signal that produced ``values``

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        if len(set(names)) != len(names):
            raise InputError("UtilityTable.names must be unique")
        ranks = check_ranks(self.ranks, "UtilityTable.ranks")
        shape = (len(names), len(ranks))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "values", _readonly(self.values, shape, "values"))
        if self.risk is not None:
            object.__setattr__(self, "risk", _readonly(self.risk, shape, "risk"))
        lam = float(self.risk_weight)
        if not (math.isfinite(lam) and lam >= 0):
            raise InputError("UtilityTable.risk_weight must be a finite number >= 0, got "
                             f"{self.risk_weight!r}")
        object.__setattr__(self, "risk_weight", lam)

    def index(self) -> dict[str, int]:
        """``{name: row}``."""
        return {n: i for i, n in enumerate(self.names)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "ranks": list(self.ranks),
            "values": self.values.tolist(),
            "risk": None if self.risk is None else self.risk.tolist(),
            "risk_weight": self.risk_weight,
            "signal": self.signal,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UtilityTable:
        _reject_unknown(cls, data)
        return cls(**dict(data))


def _reject_unknown(cls: type, data: Mapping[str, Any]) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InputError(f"unknown {cls.__name__} fields {unknown}; known: "
                         f"{[f.name for f in dataclasses.fields(cls)]}")


def _default_weights() -> dict[str, float]:
    return {"gradient_spectrum": 0.5, "heldout_capture": 0.5}


@dataclass(frozen=True)
class UtilitySettings:
    """How probe statistics become utilities. Defaults are a starting point for the placement benchmark to
    tune."""

    signal: str = field(default="capacity", metadata={"help": f"utility signal, one of {sorted(SIGNALS)}"})
    weights: dict[str, float] = ranged(
        help="weights of the signals mixed by signal=combined, e.g. "
             "gradient_spectrum=0.5,heldout_capture=0.5",
        range=Range(0), default_factory=_default_weights)
    uniform_prior: float = ranged(
        0.0, "weight in [0, 1] of the uniform prior blended into the signal; 1 reproduces the "
             "uniform plan", Range(0, 1))
    magnitude_exponent: float = ranged(
        0.25, "exponent compressing gradient/Fisher magnitudes across modules (0 ignores "
              "magnitude)", Range(0, 4))
    consistency_exponent: float = ranged(
        0.5, "exponent on held-out direction consistency across modules (0 ignores it)", Range(0, 4))
    scale_clip: float = ranged(
        2.0, "bound (>= 1) on magnitude/consistency/risk weights: each lies in [1/clip, clip]", Range(1))
    family_priors: dict[str, float] = ranged(
        help="utility multiplier per family, e.g. attention=1.2,recurrent=0.9", range=Range(0, lo_open=True),
        default_factory=dict)
    retention_weight: float = ranged(
        0.0, "lambda >= 0 on the retention risk from general-text probes: max sum u - lambda sum "
             "risk", Range(0))
    risk_exponent: float = ranged(
        0.5, "exponent compressing general-text Fisher into the retention risk weight", Range(0, 4))
    capacity_start: int = ranged(
        0, "signal capacity: first rank whose gradient energy counts as capacity "
           "demand (0: the budget's uniform rank, set by allocate)", Range(0, integer=True))
    capacity_exponent: float = ranged(
        1.0, "signal capacity: exponent e of the family weights; a family's budget share grows "
             "like its capacity demand per parameter to the power 2e", Range(0, 8))
    capacity_measure: str = field(default="consensus", metadata={
        "help": "signal capacity: how demand is read, one of share (a module's window as a share of its own "
                "gradient energy: under Adam an update does not grow with the gradient's scale), energy (the "
                "window energy itself, per parameter) or consensus (per family the one of the two nearer "
                "average; average where they disagree)"})
    capacity_clip: float = ranged(
        64.0, "signal capacity: bound (>= 1) on a family's weight: each lies in [1/clip, clip]", Range(1))

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise InputError(f"unknown utility signal {self.signal!r}; choose one of {sorted(SIGNALS)}")
        if self.capacity_measure not in MEASURES:
            raise InputError(
                f"unknown capacity measure {self.capacity_measure!r}; choose one of {list(MEASURES)}"
            )
        for name in ("weights", "family_priors"):
            if not isinstance(getattr(self, name), Mapping):
                raise InputError(f"UtilitySettings.{name} must be a mapping of names to numbers, got "
                                 f"{getattr(self, name)!r}")
        check_ranges(self, InputError)
        weights = {str(k): float(v) for k, v in dict(self.weights).items()}
        mixable = sorted(set(SIGNALS) - {"combined"})
        bad = sorted(k for k in weights if k not in mixable)
        if bad:
            raise InputError(f"utility weights name unknown signals {bad}; choose from {mixable}")
        if self.signal == "combined" and not any(w > 0 for w in weights.values()):
            raise InputError("signal=combined needs a positive weight; set e.g. "
                             "weights={'gradient_spectrum': 1}")
        object.__setattr__(self, "weights", dict(sorted(weights.items())))
        priors = {str(k): float(v) for k, v in dict(self.family_priors).items()}
        bad = sorted(k for k in priors if k not in FAMILIES)
        if bad:
            raise InputError(f"family_priors name unknown families {bad}; families are {list(FAMILIES)}")
        object.__setattr__(self, "family_priors", dict(sorted(priors.items())))
        for name in (
            "uniform_prior",
            "magnitude_exponent",
            "consistency_exponent",
            "risk_exponent",
            "scale_clip",
            "retention_weight",
            "capacity_exponent",
            "capacity_clip",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UtilitySettings:
        _reject_unknown(cls, data)
        return cls(**dict(data))


def _usable(report: Any, components: Sequence[Component]) -> tuple[list[Component], list[Any]]:
    """Eligible components with status ``ok`` in ``report``; warns once about eligible modules left out."""
    modules = report.modules
    rows, stats, left_out = [], [], {}
    for c in sorted((c for c in components if c.eligible), key=lambda c: c.name):
        s = modules.get(c.name)
        status = "missing" if s is None else str(s.status)
        if status == OK:
            rows.append(c)
            stats.append(s)
        else:
            left_out.setdefault(status, []).append(c.name)
    if left_out:
        detail = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(left_out.items()))
        warnings.warn(
            f"{sum(map(len, left_out.values()))} eligible modules get no utility and rank 0: {detail}. "
            "Calibrate on more (or more varied) data so they receive gradients, or exclude them in "
            "SolverSettings",
            AllocatorWarning,
            stacklevel=3,
        )
    return rows, stats


def compute_utilities(
    report: Any,
    components: Sequence[Component],
    ranks: Sequence[int],
    settings: UtilitySettings | None = None,
    risk_report: Any = None,
) -> UtilityTable:
    """Utility of every usable module at every rank of ``ranks``.

    Args:
        report: any object with ``.modules: Mapping[str, stats]`` (a :class:`probes.ProbeReport`).
        components: the model's components; only ``eligible`` ones with status ``"ok"`` get a row. Others
            (``no_input``, ``no_gradient``, ``nonfinite``, missing) are left out, so the solver gives them
            rank 0.
        ranks: the rank grid (starts at 0); usually ``SolverSettings.ranks``.
        settings: signal, prior and weights; defaults to ``UtilitySettings()``.
        risk_report: probes of general (pretraining-like) text; adds ``risk`` with ``retention_weight``.
    Raises:
        InputError: bad ranks, or no usable module at all. AllocatorError: a signal broke its contract.
    """
    settings = settings or UtilitySettings()
    grid = check_ranks(ranks)
    rows, stats = _usable(report, components)
    if not rows:
        raise InputError(
            "no eligible module has probe status 'ok'; check that the calibration data reach the model"
        )
    names = tuple(c.name for c in rows)
    shape = (len(rows), len(grid))
    phi = np.asarray(SIGNALS[settings.signal]().curves(stats, rows, grid, settings), dtype=float)
    check_curves(settings.signal, names, phi, shape)
    alpha = settings.uniform_prior
    phi = alpha * prior_curves(rows, grid) + (1.0 - alpha) * phi  # (n, R)
    values = _per_parameter(rows, settings.family_priors) * phi
    check_curves(settings.signal, names, values, shape)
    table = UtilityTable(names=names, ranks=grid, values=values, signal=settings.signal)
    if risk_report is not None:
        table = with_risk(table, risk_report, settings.retention_weight, components=rows, settings=settings)
    return table


def _per_parameter(rows: Sequence[Component], priors: Mapping[str, float] | None = None) -> np.ndarray:
    """``p_m / P * pi_family``, shape (n, 1): utility per parameter spent, total prior utility 1 at the top
    rank."""
    p = np.array([c.n_params_per_rank for c in rows], dtype=float)
    w = np.array([(priors or {}).get(c.family, 1.0) for c in rows])
    return (p / p.sum() * w)[:, None]


def risk_curves(
    risk_report: Any, rows: Sequence[Component], ranks: Sequence[int], settings: UtilitySettings | None = None
) -> np.ndarray:
    """``risk_m(r) = p_m / P * rho_m * min(r, dmin_m) / R``, shape (n, n_ranks).

    ``rho_m`` is the general-text Fisher per weight entry, compressed by ``risk_exponent`` and bounded by
    ``scale_clip`` (mean ~1); modules general ability leans on are costly to move. Linear in rank: the
    quadratic loss change ``1/2 F ||dW||^2`` of an Adam-trained LoRA grows with the parameters it moves,
    ``r * p_m``. Modules without ``ok`` stats in the risk report get the neutral ``rho = 1``.
    """
    settings = settings or UtilitySettings()
    q = np.full(len(rows), np.nan)
    for i, c in enumerate(rows):
        s = risk_report.modules.get(c.name)
        if s is not None and str(s.status) == OK:
            f = float(getattr(s, "fisher_trace", 0.0) or 0.0)
            q[i] = max(f, 0.0) / n_entries(c) if math.isfinite(f) else np.nan
    rho = scale_weights(q, settings.risk_exponent, settings.scale_clip)
    shape = prior_curves(rows, ranks) ** 2  # min(r, dmin) / R
    return _per_parameter(rows) * rho[:, None] * shape


def with_risk(
    table: UtilityTable,
    risk: Any,
    lam: float,
    *,
    components: Sequence[Component] | None = None,
    settings: UtilitySettings | None = None,
) -> UtilityTable:
    """A copy of ``table`` with retention risk and its weight ``lam``; the objective is
    ``sum u - lam sum risk``.

    ``risk`` is an ``(n, n_ranks)`` array aligned with ``table.names``, a :class:`UtilityTable` whose rows
    cover ``table.names``, or a probe report of general text (then ``components`` gives the shapes; see
    :func:`risk_curves`).
    """
    if hasattr(risk, "modules"):
        if components is None:
            raise InputError("with_risk(table, report, lam) needs components= to read a probe report")
        by_name = {c.name: c for c in components}
        missing = [n for n in table.names if n not in by_name]
        if missing:
            raise InputError(
                f"with_risk: components lack table modules {missing[:3]}; pass the model's components"
            )
        arr = risk_curves(risk, [by_name[n] for n in table.names], table.ranks, settings)
    elif isinstance(risk, UtilityTable):
        if risk.ranks != table.ranks:
            raise InputError(f"risk table ranks {risk.ranks} differ from the utility ranks {table.ranks}")
        index = risk.index()
        missing = [n for n in table.names if n not in index]
        if missing:
            raise InputError(f"risk table lacks modules {missing[:3]}; compute it over the same components")
        arr = risk.values[[index[n] for n in table.names]]
    else:
        arr = np.asarray(risk, dtype=float)
    if np.any(np.asarray(arr) < 0):
        raise AllocatorError("retention risk must be >= 0; this is a bug in the risk computation")
    return dataclasses.replace(table, risk=arr, risk_weight=float(lam))
