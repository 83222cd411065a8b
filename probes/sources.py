"""What a ``data`` argument is, checked before any model loads.

:func:`source_kind` names the form (``"builtin"``, ``"path"``, ``"tokens"``: a sequence of token batches,
``"records"``: a list of dicts of text / messages / prompt + completion, ``"dataset"``: an in-memory
``datasets.Dataset`` or ``DatasetDict``, ``"iterable"``: a ``datasets.IterableDataset``, ``"loader"``: a
``torch.utils.data.DataLoader`` of token batches); :func:`check_source` refuses what no form fits, and a
dataset without a column TRL's SFTTrainer would read (``probes.data.describe_source`` records a source).
``datasets`` is never imported here: its objects are known by their class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from probes.errors import ProbeError
from probes.formats import RecordFormat, has_usable_columns, usable_keys

BUILTIN = ("builtin", "builtin-facts")  # the package's general text, and the demo task (probes.facts)
KINDS = ("builtin", "path", "tokens", "records", "dataset", "iterable", "loader")
_DATASETS = {"Dataset": "dataset", "DatasetDict": "dataset", "IterableDataset": "iterable",
             "IterableDatasetDict": "iterable"}


def source_kind(source: Any, fmt: RecordFormat | None = None) -> str | None:
    """One of :data:`KINDS`, or None for anything calibration data cannot be. A list is records when its first
    item has a field of a record form (``fmt``'s text field, messages, prompt + completion), else token
    batches."""
    if isinstance(source, (str, os.PathLike)):
        return "builtin" if str(source) in BUILTIN else "path"
    cls = type(source)
    if cls.__module__.split(".")[0] == "datasets" and cls.__name__ in _DATASETS:
        return _DATASETS[cls.__name__]
    if _is_dataloader(source):
        return "loader"
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        first = source[0] if len(source) else None
        is_record = isinstance(first, Mapping) and "input_ids" not in first and has_usable_columns(
            first, fmt or RecordFormat())
        return "records" if is_record else "tokens"
    return None


def _is_dataloader(source: Any) -> bool:
    try:
        from torch.utils.data import DataLoader  # noqa: PLC0415 - torch is there whenever a loader can be
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(source, DataLoader)


def split_of(dataset: Any) -> Any:
    """A ``DatasetDict``'s ``train`` split (else its first by name); any other dataset as it is."""
    if type(dataset).__name__ in ("DatasetDict", "IterableDatasetDict"):
        if not len(dataset):
            raise ProbeError("the DatasetDict holds no split; give it a 'train' split")
        return dataset["train" if "train" in dataset else sorted(dataset)[0]]
    return dataset


def check_source(source: Any, fmt: RecordFormat | None = None, name: str = "data") -> None:
    """ProbeError unless ``source`` is a form :func:`probes.load_batches` takes; a dataset must have a column
    of a record form (``text_field``, ``messages``, ``conversations``, ``prompt`` + ``completion``,
    ``input_ids``). Paths are not checked for existence here."""
    fmt = fmt or RecordFormat()
    kind = source_kind(source, fmt)
    if kind is None:
        raise ProbeError(
            f"{name} must be a file or folder path, 'builtin', token batches (a list of dicts of input_ids), "
            "records (a list of dicts), a datasets.Dataset / IterableDataset or a torch DataLoader, got "
            f"{type(source).__name__}"
        )
    if kind in ("dataset", "iterable"):
        split = split_of(source)
        columns = getattr(split, "column_names", None)
        if columns is not None and not has_usable_columns(columns, fmt):
            raise ProbeError(
                f"{name}: the {type(split).__name__} has columns {sorted(columns)}, none of them "
                f"{usable_keys(fmt)}; rename one (dataset.rename_column(OLD, 'text')) or set "
                "DataSettings.text_field"
            )
