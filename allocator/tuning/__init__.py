"""`allocate tune`: Optuna studies over the budget, the allocation settings, LoRA alpha and the learning rate.

``settings`` (what a study searches; Optuna-free), ``search`` (suggestions -> a trial's configuration),
``objective`` (configuration -> plan -> pilot fine-tune -> eval loss), ``finetune`` (the short LoRA run),
``run`` (the worker: folder, probes, the trial loop), ``storage`` (the only code touching Optuna's storage),
``report`` (the study's result and files), ``folder`` (the study folder's record and lock).

``import allocator.tuning`` loads the settings only: Optuna is imported when :func:`tune` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from allocator.tuning.settings import BASELINES, PLACEMENTS, Space, TuneSettings, parse_space

if TYPE_CHECKING:
    from allocator.tuning.run import tune

__all__ = ["BASELINES", "PLACEMENTS", "Space", "TuneSettings", "parse_space", "tune"]


def __getattr__(name: str) -> Any:
    if name == "tune":  # the worker imports Optuna: only when a study runs
        from allocator.tuning.run import tune

        return tune
    raise AttributeError(f"module 'allocator.tuning' has no attribute {name!r}")
