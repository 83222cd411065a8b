"""Small-sample statistics for the placement benchmark: t-intervals, paired differences and verdicts.

Pure (numpy + scipy). Rows are plain dicts as read from ``docs/results/placement_runs.csv``; a *cell* is one
(model, task, budget) combination, a *condition* one way of placing the adapters, and runs of different
conditions with the same seed are paired (same LoRA init draw and data order where the condition allows it).

- :func:`t_interval`: mean and a two-sided Student-t interval (``n - 1`` degrees of freedom).
- :func:`paired`: the same on the per-seed differences ``a - b`` over the seeds both have.
- :func:`verdict`: which side wins (the interval excludes 0) or that they are indistinguishable.
- :func:`summarize` / :func:`compare`: the per-cell tables the report prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CELL = ("model", "task", "budget")


@dataclass(frozen=True)
class Interval:
    """Mean with a two-sided ``level`` t-interval; ``lo``/``hi`` are NaN when n < 2."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)

    def fmt(self, digits: int = 3) -> str:
        if self.n < 2 or not math.isfinite(self.lo):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean and Student-t interval of ``values`` (finite ones only)."""
    x = np.array([v for v in values if v is not None and math.isfinite(float(v))], dtype=float)
    n = int(x.size)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n, level)
    se = float(x.std(ddof=1)) / math.sqrt(n)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * se
    return Interval(mean, mean - half, mean + half, n, level)


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval:
    """Interval of the mean per-seed difference ``a[s] - b[s]`` over the seeds in both."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds], level)


def verdict(diff: Interval, ours: str, theirs: str, *, lower_is_better: bool = True) -> str:
    """One line: who wins (the interval of ``ours - theirs`` excludes 0) or that they are
    indistinguishable."""
    if diff.n < 2:
        return f"{ours} vs {theirs}: too few paired seeds (n={diff.n})"
    if not diff.excludes_zero():
        return f"{ours} ≈ {theirs} (indistinguishable)"
    ours_better = diff.hi < 0 if lower_is_better else diff.lo > 0
    return f"{ours} better than {theirs}" if ours_better else f"{theirs} better than {ours}"


def _key(row: Mapping[str, object], fields: Sequence[str]) -> tuple:
    return tuple(str(row[f]) for f in fields)


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def by_seed(rows: Iterable[Mapping[str, object]], metric: str) -> dict[tuple, dict[int, float]]:
    """``{(model, task, budget, condition): {seed: metric}}`` over rows with a finite ``metric``."""
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        v = _float(r.get(metric))
        if math.isfinite(v):
            out.setdefault((*_key(r, CELL), str(r["condition"])), {})[int(r["seed"])] = v
    return out


def summarize(rows: Iterable[Mapping[str, object]], metrics: Sequence[str],
              level: float = 0.95) -> list[dict]:
    """One dict per (cell, condition): ``{model, task, budget, condition, n, <metric>: Interval}``."""
    rows = list(rows)
    out: dict[tuple, dict] = {}
    for metric in metrics:
        for key, seeds in by_seed(rows, metric).items():
            entry = out.setdefault(key, dict(zip((*CELL, "condition"), key)))
            entry[metric] = t_interval(seeds.values(), level)
            entry["n"] = max(entry.get("n", 0), len(seeds))
    return [out[k] for k in sorted(out)]


def compare(
    rows: Iterable[Mapping[str, object]],
    metric: str,
    ours: str,
    baselines: Sequence[str],
    *,
    lower_is_better: bool = True,
    level: float = 0.95,
) -> list[dict]:
    """Paired differences ``ours - baseline`` per cell: ``{model, task, budget, baseline, diff, verdict}``."""
    table = by_seed(rows, metric)
    cells = sorted({k[:3] for k in table})
    out = []
    for cell in cells:
        mine = table.get((*cell, ours))
        if not mine:
            continue
        for base in baselines:
            theirs = table.get((*cell, base))
            if not theirs or base == ours:
                continue
            diff = paired(mine, theirs, level)
            out.append({**dict(zip(CELL, cell)), "ours": ours, "baseline": base, "diff": diff,
                        "verdict": verdict(diff, ours, base, lower_is_better=lower_is_better)})
    return out


def frontier_gap(points: Sequence[tuple[float, float]], x: float, y: float) -> float | None:
    """``y`` minus the lower envelope of ``points`` (x, y) interpolated at ``x``; None outside their x-range.

    Negative: (x, y) lies below the curve (less collateral damage at equal target loss).
    """
    pts = sorted(points)
    if len(pts) < 2 or not (pts[0][0] <= x <= pts[-1][0]):
        return None
    env: list[tuple[float, float]] = []  # Pareto points: retention non-increasing as target loss grows
    for px, py in pts:
        if not env or py < env[-1][1]:
            env.append((px, py))
    if not (env[0][0] <= x):
        return None
    if x >= env[-1][0]:
        return y - env[-1][1]
    xs, ys = zip(*env)
    return y - float(np.interp(x, xs, ys))
