"""What one `allocate tune` study searches and how long it runs: :class:`TuneSettings` and its search parts.

Every search part is one string, parsed once in :class:`TuneSettings` (:func:`parse_space`)::

    "lo..hi"  searched in [lo, hi] (log scale for budget, lr, alpha_ratio, family_priors, max_rank)
    "a,b,c"   searched among the listed values          "v"  fixed at v
    ""        fixed at the base settings' value (utility_settings / solver_settings)
    "...@v"   base value v: what the enqueued baselines and the `default` trial use; without it, the base
              settings' value when inside the space, else the middle of the range / the first choice

Pure settings: importing this module (or ``allocator.tuning``) does not import Optuna or torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from allocator.errors import InputError
from allocator.solver.budget import Budget
from allocator.solver.settings import GRANULARITIES
from probes.settings import Range, check_ranges, ranged

__all__ = ["BASELINES", "PLACEMENTS", "Space", "TuneSettings", "parse_space"]

FAMILY_BASELINES = ("attention", "recurrent", "mlp")
BASELINES = ("default", "uniform", *FAMILY_BASELINES)
PLACEMENTS = ("solver", "uniform", *FAMILY_BASELINES)  # the categorical `placement` parameter
MODES, PRUNERS = ("single", "pareto"), ("halving", "median", "hyperband", "none")
# Baselines no pruner stops: the probes' plan (where the search starts) and uniform (what it must beat). The
# single-family baselines are pruned like searched trials: most lag early, and their pilots are the cost.
PROTECTED_BASELINES = ("default", "uniform")
WEIGHTED_SIGNALS = ("activation_rank", "fisher", "gradient_spectrum", "heldout_capture")
# part -> (value type, log scale, lowest allowed value, highest allowed value, strict lower bound)
_PARTS: dict[str, tuple[type, bool, float, float, bool]] = {
    "budget": (Budget, True, 0, math.inf, True),
    "lr": (float, True, 0, 1, True),
    "alpha_ratio": (float, True, 0, math.inf, True),
    "weights": (float, False, 0, math.inf, False),
    "uniform_prior": (float, False, 0, 1, False),
    "family_priors": (float, True, 0, math.inf, True),
    "retention_weight": (float, False, 0, math.inf, False),
    "granularity": (str, False, 0, 0, False),
    "max_rank": (int, True, 1, math.inf, False),
}


@dataclass(frozen=True)
class Space:
    """One search part, parsed: ``kind`` is ``fixed | range | choices | inherit`` (see the module
    docstring)."""

    kind: str
    values: tuple[Any, ...] = ()
    base: Any = None  # explicit ``@v``; None: decided once the base settings are known
    log: bool = False

    @property
    def searched(self) -> bool:
        return self.kind in ("range", "choices")

    def base_value(self, inherited: Any = None) -> Any:
        """The base point: ``@v``, else ``inherited`` when inside the space, else the middle / the first
        choice."""
        if self.base is not None:
            return self.base
        if self.kind in ("fixed", "inherit"):
            return self.values[0] if self.kind == "fixed" else inherited
        if self.kind == "choices":
            if inherited in self.values or not isinstance(inherited, (int, float)):
                return inherited if inherited in self.values else self.values[0]
            return min(self.values, key=lambda v: (abs(v - inherited), v))
        lo, hi = self.values
        if isinstance(inherited, (int, float)) and lo <= inherited <= hi:
            return inherited
        mid = math.sqrt(lo * hi) if self.log else (lo + hi) / 2
        return round(mid) if isinstance(lo, int) else mid


def parse_space(part: str, text: str) -> Space:
    """``"1e-3..1e-2@3e-3"`` -> ``Space("range", (0.001, 0.01), 0.003, log=True)``; InputError naming the
    part.

    >>> parse_space("granularity", "module,type")
    Space(kind='choices', values=('module', 'type'), base=None, log=False)
    """
    cast, log, lo_ok, hi_ok, strict = _PARTS[part]
    body, _, base_text = str(text).replace(" ", "").partition("@")

    def value(item: str) -> Any:
        try:
            out = Budget.parse(item) if cast is Budget else cast(item)
        except (TypeError, ValueError) as exc:
            raise InputError(f"TuneSettings.{part} {text!r}: {item!r} is not a {cast.__name__} "
                             f"({exc}); see docs/tuning.md") from None
        if cast is str and out not in GRANULARITIES:
            raise InputError(f"TuneSettings.{part} {text!r}: {item!r} is not one of {GRANULARITIES}")
        if cast in (int, float) and not math.isfinite(out):
            raise InputError(f"TuneSettings.{part} {text!r}: {item!r} is not a finite number")
        if cast in (int, float) and not (lo_ok < out <= hi_ok if strict else lo_ok <= out <= hi_ok):
            raise InputError(f"TuneSettings.{part} {text!r}: {item!r} lies outside "
                             f"{'(' if strict else '['}{lo_ok}, {hi_ok}]")
        return out

    base = value(base_text) if base_text else None
    if not body:
        if base is not None:
            raise InputError(f"TuneSettings.{part} {text!r}: a base (@v) needs a space before it, e.g. "
                             "1..4@2")
        return Space("inherit", log=log)
    if ".." in body:
        if cast is str:
            raise InputError(f"TuneSettings.{part} {text!r}: {part} takes a list (a,b) or one value, not a "
                             "range")
        lo, hi = (value(v) for v in body.split("..", 1))
        if cast is not Budget and not lo < hi:
            raise InputError(f"TuneSettings.{part} {text!r}: the range needs lo < hi")
        if base is not None and cast is not Budget and not lo <= base <= hi:
            raise InputError(f"TuneSettings.{part} {text!r}: the base {base} lies outside the range")
        return Space("range", (lo, hi), base, log)
    items = tuple(value(v) for v in body.split(",") if v)
    if len(items) > 1:
        if len(set(map(str, items))) != len(items):
            raise InputError(f"TuneSettings.{part} {text!r}: the list repeats a value")
        if base is not None and str(base) not in map(str, items):
            raise InputError(f"TuneSettings.{part} {text!r}: the base {base} is not in the list")
        return Space("choices", items, base, log)
    return Space("fixed", items, None, log)


def _space_field(default: str, what: str) -> Any:
    return field(default=default, metadata={"help": f"{what} (lo..hi | a,b | v | '' = base settings; @v = "
                                                    "base)"})


@dataclass(frozen=True)
class TuneSettings:
    """One study: its size and mode, the fine-tune every trial runs, and the search space. Validated here."""

    trials: int = ranged(20, "finished trials (complete + pruned) of the study, all "
                             "workers together", Range(1, integer=True))
    mode: str = field(default="single", metadata={"help": "single: min eval loss at one budget | pareto: "
                                                          "min (eval loss, trainable params)"})
    pruner: str = field(
        default="halving",
        metadata={"help": "halving (successive halving over the pilot's eval steps) | median | hyperband | "
                          "none (single mode; never the default and uniform baselines)"},
    )
    baselines: tuple[str, ...] = field(default=BASELINES, metadata={"help": "trials enqueued first, once "
                                                                            f"per study: any of {BASELINES}"})
    steps: int = ranged(60, "optimizer steps of every trial's LoRA fine-tune", Range(1, integer=True))
    batch_size: int = ranged(8, "sequences per fine-tune step", Range(1, integer=True))
    eval_every: int = ranged(10, "steps between intermediate eval losses (reported "
                                 "for pruning; 0: end only)", Range(0, integer=True))
    step_budget: int = ranged(0, "optimizer steps all pilots of the study may train together (0: no cap); "
                                 "a trial that would pass it is pruned at its last eval step within it, "
                                 "counting the steps the default, uniform and uniform@winner pilots still "
                                 "need", Range(0, integer=True))
    train_samples: int = ranged(256, "fine-tune training sequences drawn from --data", Range(1, integer=True))
    eval_samples: int = ranged(64, "eval sequences drawn from --eval-data", Range(1, integer=True))
    seed: int = ranged(0, "seed of every fine-tune (data order, LoRA init) and of "
                          "the sampler", Range(0, integer=True))
    heartbeat_interval: int = ranged(30, "seconds between a running trial's "
                                         "heartbeats", Range(1, integer=True))
    grace_period: int = ranged(90, "a trial silent this many seconds is failed and "
                                   "retried", Range(1, integer=True))
    max_retry: int = ranged(2, "times a killed (stale) trial is re-run", Range(0, integer=True))
    budget: str = field(default="", metadata={"help": "trainable-parameter budget: v (single mode), lo..hi "
                                                      "or a,b (pareto mode); '' = r8 in single mode, "
                                                      "r2..r12 in pareto mode"})
    lr: str = _space_field("1e-3..1e-2@3e-3", "learning rate")
    alpha_ratio: str = _space_field("1..4@2", "lora_alpha / r")
    weights: str = _space_field("0..1", "weight of each signal mixed by signal=combined")
    uniform_prior: str = _space_field("0..1", "uniform prior blended into the utility")
    family_priors: str = _space_field("0.5..2", "utility multiplier of each family")
    retention_weight: str = _space_field("0..2", "retention weight lambda (searched only with retention "
                                                 "data)")
    granularity: str = _space_field(",".join(GRANULARITIES), "solver granularity")
    max_rank: str = _space_field("16,32,64", "largest rank of the solver's grid")

    def __post_init__(self) -> None:
        check_ranges(self, InputError)
        if self.grace_period < self.heartbeat_interval:
            raise InputError(f"grace_period {self.grace_period}s is shorter than heartbeat_interval "
                             f"{self.heartbeat_interval}s; raise it (Optuna suggests twice the interval)")
        if self.mode not in MODES or self.pruner not in PRUNERS:
            raise InputError(f"mode {self.mode!r} / pruner {self.pruner!r}: choose mode from {MODES}, "
                             f"pruner from {PRUNERS}")
        baselines = tuple(str(b) for b in self.baselines)
        if set(baselines) - set(BASELINES) or len(set(baselines)) != len(baselines):
            raise InputError(f"baselines {baselines} must be distinct names from {BASELINES} (or empty)")
        object.__setattr__(self, "baselines", baselines)
        if not self.budget:
            object.__setattr__(self, "budget", "r8" if self.mode == "single" else "r2..r12")
        spaces = {part: parse_space(part, getattr(self, part)) for part in _PARTS}
        if spaces["lr"].kind == "inherit":
            raise InputError("lr has no base setting to keep; give a value (3e-3) or a range (1e-3..1e-2)")
        if self.trials <= len(baselines):
            raise InputError(f"trials={self.trials} leaves no searched trial after the {len(baselines)} "
                             "baselines; raise trials or drop baselines")
        if self.mode == "single" and spaces["budget"].searched:
            raise InputError(f"mode=single compares allocations at one budget, got budget={self.budget!r}; "
                             "give one budget (e.g. r8) or use mode=pareto")
        object.__setattr__(self, "_spaces", spaces)

    @property
    def spaces(self) -> Mapping[str, Space]:
        """Every search part, parsed."""
        return self._spaces  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuneSettings:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"unknown TuneSettings fields {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
