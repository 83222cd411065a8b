"""Architecture-aware LoRA rank allocation for hybrid language models.

Typical use, before training::

    import allocator
    plan = allocator.allocate("path/or/hub-id", data="train.jsonl", budget="r8",
                              data_settings=allocator.DataSettings(samples=64))   # calibration size
    plan                               # one screen: model, budget, cost, vs uniform, ranks per family
    model = plan.apply(model)          # a PeftModel whose trainable parameters == plan.cost

Public names are imported lazily so that the pure-math stages (``allocator.scoring``, ``allocator.solver``)
load without torch. The stages, in the order data flows: ``discovery`` (model -> components), ``probes`` (its
own package), ``scoring`` (probe report -> utilities), ``solver`` (utilities x budget -> ranks), ``output``
(plan, PEFT export, report), ``tuning`` (Optuna studies over all of it); ``commands`` is the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AllocatorError": "allocator.errors",
    "InputError": "allocator.errors",
    "AllocatorWarning": "allocator.errors",
    "Component": "allocator.discovery.component",
    "find_components": "allocator.discovery.components",
    "Budget": "allocator.solver.budget",
    "lora_params": "allocator.solver.budget",
    "UtilityTable": "allocator.scoring.utility",
    "UtilitySettings": "allocator.scoring.utility",
    "compute_utilities": "allocator.scoring.utility",
    "SolverSettings": "allocator.solver.settings",
    "Allocation": "allocator.solver.solve",
    "solve": "allocator.solver.solve",
    "Plan": "allocator.output.plan",
    "LoraSettings": "allocator.output.settings",
    "DataSettings": "probes.settings",
    "ProbeSettings": "probes.settings",
    "allocate": "allocator.api",
    "tune": "allocator.tuning",
    "TuneSettings": "allocator.tuning.settings",
    "FinetuneSettings": "allocator.tuning.finetune",
    "PlanCallback": "allocator.integrations",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'allocator' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names too, though they load lazily (``dir(allocator)``, tab completion)."""
    return sorted(set(globals()) | set(__all__))
