"""One trial's configuration from its suggestions: placement, budget, lr, alpha, utility and solver settings.

:class:`Search` maps whatever answers ``suggest_categorical`` / ``suggest_int`` / ``suggest_float`` (an Optuna
trial, :class:`FixedParams` rebuilding a finished trial, :class:`BaseTrial` taking every base value) to a
configuration dict. Pure: no Optuna import (the worker passes its trials in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from allocator.errors import InputError
from allocator.solver.budget import Budget
from allocator.tuning.settings import PLACEMENTS, WEIGHTED_SIGNALS, Space, TuneSettings


class BaseTrial:
    """Stands in for a trial: every searched part takes its base value, recorded in ``params``."""

    def __init__(self, placement: str) -> None:
        self.placement, self.params = placement, {"placement": placement}


class FixedParams:
    """Stands in for a finished trial: every suggestion returns the value it recorded (Optuna's
    ``FixedTrial``)."""

    def __init__(self, params: Mapping[str, Any], number: int = 0) -> None:
        self.params, self.number = dict(params), number

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise InputError(f"the trial recorded no value for {name!r}; it was made by another version")
        return self.params[name]

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._get(name)

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int:
        return int(self._get(name))

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return float(self._get(name))


def grid_up_to(ranks: tuple[int, ...], top: int) -> tuple[int, ...]:
    """The solver's rank grid cut at ``top``: ``(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ...)`` at 16 ->
    ``(0, 1, 2, 3, 4, 6, 8, 12, 16)``."""
    return tuple(r for r in ranks if r < top) + (top,)


class Search:
    """Suggestions -> one trial's configuration (placement, budget, lr, alpha, utility and solver
    settings)."""

    def __init__(self, settings: TuneSettings, utility: Any, solver: Any, families: list[str],
                 resolve: Callable[[Budget], int], has_risk: bool) -> None:
        self.spaces, self.utility, self.solver = dict(settings.spaces), utility, solver
        self.families, self.has_risk = families, has_risk
        b = self.spaces["budget"]  # budgets become parameter counts once the model is known
        b = self.spaces["budget"] = Space(b.kind, tuple(resolve(v) for v in b.values),
                                          None if b.base is None else resolve(b.base), True)
        if b.kind == "range" and not (
            b.values[0] < b.values[1] and b.values[0] <= b.base_value() <= b.values[1]
        ):
            raise InputError(
                f"budget range {settings.budget!r} is {b.values[0]:,}..{b.values[1]:,} "
                "parameters on this model; give lo < hi and a base (@v) inside"
            )

    def _pick(self, trial: Any, name: str, space: Space, inherited: Any = None) -> Any:
        if isinstance(trial, BaseTrial) or not space.searched:
            value = space.base_value(inherited)
            if isinstance(trial, BaseTrial) and space.searched:
                trial.params[name] = value
            return value
        if space.kind == "choices":
            return trial.suggest_categorical(name, list(space.values))
        lo, hi = space.values
        if isinstance(lo, int):
            return trial.suggest_int(name, lo, hi, log=space.log)
        return trial.suggest_float(name, lo, hi, log=space.log)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The configuration of ``trial`` (an Optuna trial, :class:`FixedParams` or :class:`BaseTrial`)."""
        sp, u, s = self.spaces, self.utility, self.solver
        placement = (
            trial.placement
            if isinstance(trial, BaseTrial)
            else trial.suggest_categorical("placement", list(PLACEMENTS))
        )
        cfg = {
            "placement": placement,
            "budget": self._pick(trial, "budget", sp["budget"]),
            "lr": self._pick(trial, "lr", sp["lr"]),
            "alpha_ratio": self._pick(trial, "alpha_ratio", sp["alpha_ratio"], 2.0),
        }
        if placement != "solver":
            return cfg
        weights = dict(u.weights)
        if u.signal == "combined":
            mixed = {
                k: self._pick(trial, f"weight.{k}", sp["weights"], u.weights.get(k, 0.0))
                for k in WEIGHTED_SIGNALS
            }
            weights = {**weights, **mixed} if any(v > 0 for v in mixed.values()) else weights
        priors = {
            f: self._pick(trial, f"prior.{f}", sp["family_priors"], u.family_priors.get(f, 1.0))
            for f in self.families
        }
        lam = (
            self._pick(trial, "retention_weight", sp["retention_weight"], u.retention_weight)
            if self.has_risk
            else u.retention_weight
        )
        cfg["utility"] = dataclasses.replace(
            u,
            weights=weights,
            family_priors=priors,
            retention_weight=lam,
            uniform_prior=self._pick(trial, "uniform_prior", sp["uniform_prior"], u.uniform_prior),
        )
        top = self._pick(trial, "max_rank", sp["max_rank"], s.ranks[-1])
        granularity = self._pick(trial, "granularity", sp["granularity"], s.granularity)
        cfg["solver"] = dataclasses.replace(s, granularity=granularity, ranks=grid_up_to(s.ranks, top))
        return cfg
