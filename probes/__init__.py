"""Calibration probes: per-module sensitivity statistics from a short forward/backward pass.

This package knows modules by name only and never imports ``allocator``.

Typical use::

    import probes
    batches = probes.load_batches("builtin", tokenizer, seq_len=256, samples=32)
    report = probes.run(model, batches, ["model.layers.0.mlp.up_proj", ...],
    probes.ProbeSettings(max_rank=64))
    report.save("out/")            # probe_report.safetensors + probe_report.json

Public names are imported lazily, so ``probes.report`` (numpy + safetensors only) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ProbeError": "probes.errors",
    "ProbeWarning": "probes.errors",
    "ProbeSettings": "probes.settings",
    "DataSettings": "probes.settings",
    "ProbeReport": "probes.report",
    "ModuleStats": "probes.report",
    "load_batches": "probes.data",
    "data_fingerprint": "probes.data",
    "describe_source": "probes.data",
    "is_token_source": "probes.data",
    "check_source": "probes.sources",
    "source_kind": "probes.sources",
    "RecordFormat": "probes.formats",
    "run": "probes.runner",
    "check_device": "probes.runner",
    "check_token_ids": "probes.runner",
    "run_cached": "probes.cache",
    "gradient_subspaces": "probes.gradient_subspace",
    "Warmup": "probes.warmup",
    "run_warm": "probes.warmup",
    "check_cache_dir": "probes.cache",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
