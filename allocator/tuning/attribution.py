"""Where a tune study's gain over uniform LoRA comes from: the placement, or the training settings.

The baselines run at the base lr and alpha; the winner usually runs at others, so "winner − uniform" mixes two
effects. One extra pilot, ``uniform@winner``, scores uniform LoRA at the winner's budget, lr and alpha ratio:

    winner − uniform  =  (winner − uniform@winner)  +  (uniform@winner − uniform)
                              placement                   training settings

``uniform@winner`` takes the study's last trial slot (it counts in ``--tune-trials``): a worker that reaches
the last slot waits until every other trial has finished, so the winner is final, then enqueues it (under the
claim locks: the folder's, and on a server database the server's) unless a finished or queued uniform trial
already has those settings (the ``uniform`` baseline when the winner kept the base lr and alpha, or the trial
a resumed or parallel worker enqueued). Its trial is marked ``user_attrs["baseline"] = "uniform@winner"``, so
it is never pruned and never counted as a searched trial. If the last slot holds a searched trial that wins
after all (a winner at the base settings did not need the extra pilot), the split of the new winner is
reported as not measured.

Optuna-free: trials are read through ``.params``, ``.state.name``, ``.values``, ``.user_attrs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

UNIFORM_AT_WINNER = "uniform@winner"
TRAINING = ("budget", "lr", "alpha_ratio")  # what uniform@winner shares with the winner


def training_key(params: Mapping[str, Any]) -> dict[str, Any]:
    """The searched training settings of a trial (settings fixed in the study are equal in every trial)."""
    return {k: params[k] for k in TRAINING if k in params}


def _loss(trial: Any) -> float | None:
    values = getattr(trial, "values", None)
    return float(values[0]) if values and math.isfinite(values[0]) else None


def winner(trials: Sequence[Any]) -> Any:
    """The lowest-loss complete trial (ties: the cheaper, then the earlier), as :func:`summarize` picks it."""
    done = [t for t in trials if t.state.name == "COMPLETE" and _loss(t) is not None]
    return min(done, key=lambda t: (_loss(t), t.user_attrs.get("cost") or 0, t.number), default=None)


def wanted(trials: Sequence[Any], fits: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any] | None:
    """The parameters of the ``uniform@winner`` trial the study still needs, or None: no winner yet, a uniform
    trial (finished, running or queued, not failed) with the winner's settings exists, or ``fits(params)``
    says uniform LoRA does not fit the winner's budget."""
    best = winner(trials)
    if best is None:
        return None
    key = training_key(best.params)
    for t in trials:
        params = {**_fixed(t), **t.params}  # a queued trial has only the parameters it was enqueued with
        if t.state.name != "FAIL" and params.get("placement") == "uniform" and training_key(params) == key:
            return None
    params = {"placement": "uniform", **key}
    return params if fits(params) else None


def _fixed(trial: Any) -> Mapping[str, Any]:
    """The parameters a trial was enqueued with (Optuna keeps them in ``system_attrs``)."""
    return getattr(trial, "system_attrs", {}).get("fixed_params", {}) or {}


def enqueue_if_wanted(study: Any, fits: Callable[[Mapping[str, Any]], bool]) -> bool:
    """Enqueue ``uniform@winner`` when :func:`wanted` (the caller holds the claim locks); True when it did."""
    trials = study.get_trials(deepcopy=False)
    params = wanted(trials, fits)
    if params is None:
        return False
    best = winner(trials)
    study.enqueue_trial(params, user_attrs={"baseline": UNIFORM_AT_WINNER, "winner": best.number})
    return True


def attribute(rows: Sequence[Any], best: Any, uniform: Any, identical: bool) -> dict[str, Any]:
    """The split of ``best`` (a report row) against the ``uniform`` baseline row (or None), from the complete
    ``rows``: ``{"identical_to_uniform", "uniform_at_winner" (trial number or None), "uniform_at_winner_loss",
    "placement", "total", "settings"}``; losses as differences (negative: the winner is better)."""
    if best is None:
        return {}
    key = training_key(best.params)
    same = [r for r in rows if r.placement == "uniform" and training_key(r.params) == key]
    at = min(same, key=lambda r: r.number, default=None)
    out: dict[str, Any] = {
        "identical_to_uniform": bool(identical),
        "uniform_at_winner": None if at is None else at.number,
        "uniform_at_winner_loss": None if at is None else at.value,
        "placement": None if at is None else best.value - at.value,
    }
    if uniform is not None:
        out["uniform"] = uniform.number
        out["total"] = best.value - uniform.value
        out["settings"] = None if at is None else at.value - uniform.value
    return out
