"""Rows of tokens from records (JSONL, ``datasets``, lists of dicts) and from token batches the caller made
(lists, DataLoaders): reading, drawing, truncating and padding. How one record becomes ids and labels is
:mod:`probes.formats` (as TRL's SFTTrainer does it).

A row is ``(input_ids, labels, attention_mask)``, each a list of ``seq_len`` ints (right-padded; labels -100
where no loss is taken). :func:`probes.data.load_batches` collates rows into batches.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from probes.errors import ProbeError, ProbeWarning
from probes.formats import IGNORE_INDEX, RecordFormat, encode_record

TokenSource = Sequence[Mapping[str, Any]]


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole file decoded strictly; a bad byte or a NUL byte is a ProbeError naming where it is."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProbeError(
            f"cannot read calibration data {path} ({exc.strerror or exc}); check the path and its permissions"
        ) from None
    nul = data.find(b"\x00") if encoding.replace("-", "").lower() in ("utf8", "ascii", "latin1") else -1
    try:
        if nul >= 0:
            raise UnicodeDecodeError(encoding, data, nul, nul + 1, "NUL byte")
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        what = (
            "looks binary (a NUL byte"
            if err.reason == "NUL byte"
            else f"is not valid {encoding} (byte 0x{data[err.start]:02x}"
        )
        raise ProbeError(
            f"{path} {what} at offset {err.start}, line {line}); give a UTF-8 text "
            "file, convert it (iconv -f latin1 -t utf-8), or name its encoding in "
            "DataSettings.encoding"
        ) from None


# --- token batches given by the caller ---------------------------------------------------------------------


def batch_ids(batch: Any, index: int) -> torch.Tensor:
    """A token batch's ``input_ids`` as (rows, seq) int64, or a ProbeError naming what is wrong with it."""
    if not isinstance(batch, Mapping):
        raise ProbeError(
            f"token batch {index} is a {type(batch).__name__}, not a mapping of input_ids/labels"
        )
    return as_rows(batch.get("input_ids"), index)


def shaped_like(batch: Mapping, key: str, ids: torch.Tensor, index: int) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(batch[key])
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProbeError(
            f"token batch {index}: {key} must be integers shaped like input_ids "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if tensor.numel() != ids.numel():
        raise ProbeError(
            f"token batch {index}: {key} has shape {tuple(tensor.shape)}, input_ids "
            f"{tuple(ids.shape)}; give one value per token"
        )
    return tensor.reshape(ids.shape).long()


def as_rows(value: Any, index: int) -> torch.Tensor:
    if value is None:
        raise ProbeError(
            f"token batch {index} has no 'input_ids'; give mappings with input_ids (and optionally "
            "labels, attention_mask), or records with text, messages or prompt + completion"
        )
    try:
        tensor = torch.as_tensor(value)
    # strings, ragged rows, ids past int64
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProbeError(
            f"token batch {index}: input_ids must be integer ids of shape (seq,) or "
            f"(batch, seq) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.is_floating_point() or tensor.is_complex():
        raise ProbeError(
            f"token batch {index}: input_ids must be integer ids of shape (seq,) or (batch, "
            f"seq), got {tuple(tensor.shape)} {tensor.dtype}"
        )
    return tensor.long()


def token_rows(source: Any, tokenizer: Any, seq_len: int, samples: int, label: str = "(token batches)"):
    """Rows of token batches in their own order (a list of mappings, or a DataLoader's batches)."""
    rows, pad_id = [], pad_token_id(tokenizer)
    for index, batch in enumerate(source):
        ids = batch_ids(batch, index)
        mask = (
            torch.ones_like(ids)
            if batch.get("attention_mask") is None
            else shaped_like(batch, "attention_mask", ids, index)
        )
        labels = (
            ids.masked_fill(mask == 0, IGNORE_INDEX)
            if batch.get("labels") is None
            else shaped_like(batch, "labels", ids, index)
        )
        for i in range(ids.shape[0]):
            row = padded_row(ids[i].tolist(), labels[i].tolist(), mask[i].tolist(), seq_len, pad_id)
            if row is None:
                continue
            rows.append(row)
            if len(rows) == samples:
                return rows
    if not rows:
        raise ProbeError(f"{label}: no sequence has a loss token within seq_len={seq_len}; check the labels")
    warn_short(label, len(rows), samples)
    return rows


# --- records: padded sequences -----------------------------------------------------------------------------


def jsonl_records(path: Path, encoding: str = "utf-8") -> list[dict]:
    text = read_text(path, encoding)
    if path.suffix.lower() == ".json":  # a whole-file JSON list of objects is accepted too
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list) and all(isinstance(r, dict) for r in whole):
            return whole
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ProbeError(
                f"{path}:{line_no} is not valid JSON ({err.msg}); write one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise ProbeError(
                f"{path}:{line_no} is a {type(record).__name__}, not a JSON object; write one object per line"
            )
        records.append(record)
    return records


def datasets_records(path: Path):
    """The saved split itself (indexable, lazy): records are read one by one as they are drawn."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only for this source
    except ImportError:
        raise ProbeError(
            f"{path} is a folder, read as a Hugging Face datasets folder, which needs the `datasets` "
            "package: pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else sorted(loaded)[0]
        loaded = loaded[split]
    return loaded


def padded_row(ids: list[int], labels: list[int], mask: list[int], seq_len: int, pad_id: int):
    """One sequence truncated to ``seq_len`` and right-padded (``pad_id``, label -100, mask 0); None when no
    label is left to predict."""
    ids, labels, mask = ids[:seq_len], labels[:seq_len], mask[:seq_len]
    if sum(lab != IGNORE_INDEX for lab in labels[1:]) == 0:  # labels[0] is never predicted
        return None
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, mask + [0] * pad


def record_rows(records, tokenizer, label: str, seq_len: int, samples: int, rng, fmt: RecordFormat):
    """Rows of ``records``: an indexable collection (a list, a ``datasets`` split) is drawn in an order
    shuffled by ``rng``; anything else (an ``IterableDataset``) is read in its own order, as far as needed."""
    indexable = hasattr(records, "__len__") and hasattr(records, "__getitem__")
    if indexable and not len(records):
        raise ProbeError(f"calibration data {label} is empty; give it at least one record")
    if indexable:
        order = list(range(len(records)))
        rng.shuffle(order)
        drawn = ((i, records[i]) for i in order)
    else:
        drawn = enumerate(records)
    rows, n_masked, pad_id = [], 0, pad_token_id(tokenizer)
    for index, record in drawn:
        if not isinstance(record, Mapping):
            raise ProbeError(f"record {index} of {label} is a {type(record).__name__}, not a mapping of "
                             "fields")
        ids, labels = encode_record(record, index, tokenizer, fmt, label)
        row = padded_row(ids, labels, [1] * len(ids), seq_len, pad_id)
        if row is None:
            n_masked += 1
            continue
        rows.append(row)
        if len(rows) == samples:
            break
    if not rows and not n_masked:
        raise ProbeError(f"calibration data {label} is empty; give it at least one record")
    if not rows:
        raise ProbeError(
            f"every label in {label} is masked ({n_masked} records, none with a loss token within "
            f"seq_len={seq_len}); check the completion/assistant fields or raise seq_len"
        )
    warn_short(label, len(rows), samples)
    return rows


# --- helpers -----------------------------------------------------------------------------------------------


def encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def pad_token_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def warn_short(label: str, got: int, wanted: int) -> None:
    if got < wanted:
        warnings.warn(
            f"calibration data {label} gave {got} sequences, fewer than samples={wanted}; add data or lower "
            "samples to silence this",
            ProbeWarning,
            stacklevel=3,
        )
