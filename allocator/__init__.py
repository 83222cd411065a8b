"""Architecture-aware LoRA rank allocation for hybrid language models.

Typical use, before training::

    import allocator
    plan = allocator.allocate("path/or/hub-id", data="train.jsonl", budget="r8")
    model = plan.apply(model)          # a PeftModel whose trainable parameters == plan.cost

Public names are imported lazily so that the pure-math modules (budget, utility, solve) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AllocatorError": "allocator.errors",
    "InputError": "allocator.errors",
    "AllocatorWarning": "allocator.errors",
    "Component": "allocator.components",
    "find_components": "allocator.components",
    "Budget": "allocator.budget",
    "lora_params": "allocator.budget",
    "UtilityTable": "allocator.utility",
    "UtilitySettings": "allocator.utility",
    "compute_utilities": "allocator.utility",
    "SolverSettings": "allocator.solve",
    "Allocation": "allocator.solve",
    "solve": "allocator.solve",
    "Plan": "allocator.plan",
    "allocate": "allocator.api",
    "tune": "allocator.tuning",
    "TuneSettings": "allocator.tuning",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'allocator' has no attribute {name!r}")
