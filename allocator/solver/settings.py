"""What the integer program may choose: :class:`SolverSettings` and the rank grids. Pure (no numpy needed
even).

Stage 4's settings, kept apart from the solver so that the CLI, the tuner and the scoring stage read them
without loading scipy.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from allocator.discovery.component import FAMILIES
from allocator.errors import InputError
from allocator.scoring.utility import check_ranks
from probes.settings import Range, check_ranges, ranged

GRANULARITIES = ("module", "layer-type", "type")

# Dense at the low end so that budget can move in small steps: on the placement benchmark (each cell at
# uniform's best lr) the coarse grid's plan at a uniform-r1 budget (rank 4 on a quarter of the modules) was
# worse in mean than uniform on Falcon-H1, while the dense grid was never worse in mean and beat uniform on
# the fact task (docs/method.md). COARSE_RANKS is the earlier default, kept as a named alternative.
DENSE_RANKS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
COARSE_RANKS = (0, 4, 8, 16, 32, 64)
DEFAULT_RANKS = DENSE_RANKS


@dataclass(frozen=True)
class SolverSettings:
    """What the integer program may choose and how long it may search. Validated at construction."""

    granularity: str = field(
        default="layer-type",
        metadata={"help": "one rank per: module | layer-type (same kind in one layer) | type (same kind "
                          "everywhere)"},
    )
    ranks: tuple[int, ...] = ranged(DEFAULT_RANKS, "rank grid, strictly increasing "
                                                   "from 0", Range(0, integer=True))
    align: int = ranged(1, "every non-zero grid rank must be a multiple of this", Range(1, integer=True))
    share_bounds: dict[str, tuple[float, float]] = field(
        default_factory=dict,
        metadata={"help": "budget share per family as lo:hi fractions of the budget, e.g. attention=0.1:0.5"},
    )
    required: tuple[str, ...] = field(default=(), metadata={"help": "families that must get a non-zero "
                                                                    "rank somewhere"})
    include: tuple[str, ...] = field(
        default=(), metadata={"help": "regexes; if given, only matching module names may get budget"}
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "regexes; matching module names never "
                                                                   "get budget"})
    time_limit: float = ranged(60.0, "seconds HiGHS may search", Range(0, lo_open=True))
    mip_rel_gap: float = ranged(1e-6, "relative optimality gap at which HiGHS "
                                      "stops", Range(0, 1, hi_open=True))
    presolve: bool = field(
        default=False,
        metadata={"help": "let HiGHS presolve (off: on these programs it costs more than it saves, see "
                          "docs/solver.md)"},
    )
    reduce: bool = field(
        default=True,
        metadata={"help": "drop rank options a Lagrangian bound proves non-optimal before calling HiGHS "
                          "(exact)"},
    )

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InputError(f"SolverSettings.granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if not isinstance(self.ranks, (tuple, list)):
            raise InputError(f"SolverSettings.ranks must be a sequence of ranks, got {self.ranks!r}")
        check_ranges(self, InputError)
        ranks = check_ranks(self.ranks, "SolverSettings.ranks")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "align", int(self.align))
        off = [r for r in ranks if r % self.align]
        if off:
            raise InputError(f"ranks {off} are not multiples of align={self.align}; drop them or lower align")
        bounds = {}
        for fam, pair in dict(self.share_bounds).items():
            try:
                lo, hi = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise InputError(f"SolverSettings.share_bounds: {fam} must be a (lo, hi) pair, "
                                 f"got {pair!r}") from None
            if not 0 <= lo <= hi <= 1:
                raise InputError(f"SolverSettings.share_bounds: {fam}={lo:g}:{hi:g} needs 0 <= lo <= hi <= "
                                 "1; fix the pair")
            bounds[str(fam)] = (lo, hi)
        if sum(lo for lo, _ in bounds.values()) > 1 + 1e-12:
            named = ", ".join(f"{f}>={lo:g}" for f, (lo, _) in sorted(bounds.items()) if lo > 0)
            raise InputError("SolverSettings.share_bounds: lower bounds sum to more than the whole budget "
                             f"({named}); lower them")
        object.__setattr__(self, "share_bounds", dict(sorted(bounds.items())))
        required = tuple(sorted({str(f) for f in self.required}))
        object.__setattr__(self, "required", required)
        bad = sorted((set(bounds) | set(required)) - set(FAMILIES))
        if bad:
            raise InputError(f"unknown families {bad} in share_bounds/required; families are "
                             f"{list(FAMILIES)}")
        capped = [f for f in required if bounds.get(f, (0, 1))[1] == 0]
        if capped:
            raise InputError(f"families {capped} are required but their share upper bound is 0; drop one of "
                             "the two")
        for name in ("include", "exclude"):
            patterns = tuple(str(p) for p in getattr(self, name))
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise InputError(f"SolverSettings.{name} pattern {p!r} is not a regex ({exc}); fix or "
                                     "escape it"
                                     ) from None
            object.__setattr__(self, name, patterns)
        for name in ("time_limit", "mip_rel_gap"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["share_bounds"] = {k: list(v) for k, v in self.share_bounds.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SolverSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown SolverSettings fields {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
