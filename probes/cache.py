"""Reuse a saved ``ProbeReport`` when nothing that shapes it has changed.

The key is a sha256 over: model id and revision (``key_meta``), the data fingerprint of the batches, the
sorted module names, the result-relevant settings (all but ``progress``) and the report format. A hit loads
``<cache_dir>/probe-<key>/`` and runs nothing; a miss runs :func:`probes.run` and rank 0 writes the folder
through the safe folder writer (:mod:`probes.folders`: atomic, marked as ours). A cached report that cannot be
read (truncated, edited) is probed again and replaced, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probes.data import data_fingerprint
from probes.errors import ProbeError, ProbeWarning
from probes.folders import FolderError, write_folder
from probes.report import ARRAYS_NAME, FORMAT, JSON_NAME, ProbeReport
from probes.runner import run
from probes.settings import ProbeSettings
from probes.warmup import Warmup, run_warm


def cache_key(
    key_meta: Mapping[str, Any], fingerprint: str, modules: Sequence[str], settings: ProbeSettings
) -> str:
    """Hex sha256 of everything a probe report depends on (see the module docstring)."""
    payload = {
        "format": FORMAT,
        "model": dict(key_meta),
        "data": fingerprint,
        "modules": sorted(set(modules)),
        "settings": settings.result_key(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_cached(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    modules: Sequence[str],
    settings: ProbeSettings | None = None,
    *,
    cache_dir: str | os.PathLike,
    key_meta: Mapping[str, Any] | None = None,
    warmup: Warmup | None = None,
) -> ProbeReport:
    """:func:`probes.run` (or :func:`probes.warmup.run_warm` after ``warmup``) with a disk cache in
    ``cache_dir``.

    ``key_meta`` identifies the weights, e.g. ``{"model_id": "Qwen/Qwen3.5-0.8B", "model_revision":
    "<sha>"}``; by default ``model.config.name_or_path`` and ``model.config._commit_hash``. Under
    torch.distributed every rank reads its own cache and the run is reused only if all ranks hit, so the
    collectives stay in step.
    """
    settings = settings or ProbeSettings()
    check_cache_dir(cache_dir)
    if key_meta is None:
        config = getattr(model, "config", None)
        key_meta = {
            "model_id": getattr(config, "name_or_path", None),
            "model_revision": getattr(config, "_commit_hash", None),
        }
    if warmup is not None and settings.warmup_steps:
        key_meta = {**dict(key_meta), "warmup": warmup.key()}
    key = cache_key(key_meta, data_fingerprint(batches), modules, settings)
    folder = Path(cache_dir) / f"probe-{key[:32]}"
    cached = _load(folder, key)
    if _all_ranks(cached is not None, settings):
        return cached
    meta = {**dict(key_meta), "cache_key": key}
    if warmup is not None and settings.warmup_steps:
        report = run_warm(model, batches, modules, settings, warmup.lora_config, warmup.batches, meta=meta)
    else:
        report = run(model, batches, modules, settings, meta=meta)
    if _rank(settings) == 0:
        _save_atomic(report, folder)
    return report


def check_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """``cache_dir`` as a Path, or a ProbeError now (before any probing) if it cannot hold a cache."""
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise ProbeError(f"the probe cache folder must be a path, got {type(cache_dir).__name__}")
    path = Path(cache_dir).expanduser()
    if not str(cache_dir).strip():
        raise ProbeError("the probe cache folder is empty; give a folder name, e.g. --cache-dir probe-cache")
    if path.exists() and not path.is_dir():
        raise ProbeError(f"probe cache {path} is a file, not a folder; pass a folder to --cache-dir")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ProbeError(
            f"probe cache {path} cannot be created or written under {parent}; pass a writable --cache-dir"
        )
    return path


def _load(folder: Path, key: str) -> ProbeReport | None:
    if not folder.exists():
        return None
    try:
        report = ProbeReport.load(folder)
        if report.meta.get("cache_key") != key:
            raise ValueError("its cache key differs")
    except Exception as exc:  # safetensors, json and field errors alike: the cache is only a shortcut
        warnings.warn(
            f"cached probe report {folder} is unreadable ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); probing again and replacing it",
            ProbeWarning,
            stacklevel=3,
        )
        return None
    return report


def _save_atomic(report: ProbeReport, folder: Path) -> None:
    try:
        write_folder(
            folder,
            report.save,
            overwrite=True,
            legacy=[{JSON_NAME, ARRAYS_NAME}],
            flag="cache folder",
            overwrite_flag="replacing",
        )
    except FolderError as exc:
        raise ProbeError(f"{exc} (probe cache)") from None


def _distributed(settings: ProbeSettings) -> bool:
    return settings.distributed and torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank(settings: ProbeSettings) -> int:
    return torch.distributed.get_rank() if _distributed(settings) else 0


def _all_ranks(flag: bool, settings: ProbeSettings) -> bool:
    if not _distributed(settings):
        return flag
    value = torch.tensor([1 if flag else 0])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())
