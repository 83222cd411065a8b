"""Stage 2a: calibration data -> token batches.

``load_batches(source, tokenizer) -> list[dict[str, Tensor]]``, each dict holding ``input_ids``,
``attention_mask`` and ``labels`` (``-100`` where no loss is taken), all ``(batch, seq_len)`` int64.

Sources, chosen by what ``source`` is (:func:`probes.sources.source_kind`):

- ``"builtin"``: the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``), present on
  every machine; a fixed sorted file list, shuffled by ``seed``.
- ``"builtin-facts"``: the demo task, synthetic facts to store (:mod:`probes.facts`).
- a folder: a Hugging Face ``datasets`` folder written by ``save_to_disk`` (needs ``pip install datasets``).
- ``*.jsonl`` / ``*.json``: one record per line (or a JSON list of records).
- any other file: plain text, packed into windows of ``seq_len`` tokens.
- records in memory: a ``datasets.Dataset`` / ``DatasetDict`` (its ``train`` split), a
  ``datasets.IterableDataset`` (read in its own order, as far as needed) or a list of dicts.
- token batches: a sequence of mappings holding ``input_ids``, optionally ``labels`` and ``attention_mask``
  (1-D rows or 2-D batches; tensors or lists), or a ``torch.utils.data.DataLoader`` yielding them (what a
  data collator makes): data the caller has tokenised already. Rows are taken **in order** (``seed`` is not
  used), truncated or padded to ``seq_len`` and re-batched at ``batch_size``.

Records (text, chat ``messages``, ``prompt`` + ``completion``, ``input_ids``) are tokenised exactly as TRL's
SFTTrainer does (:mod:`probes.formats`), truncated to ``seq_len`` (keep the start) and right-padded as TRL's
collator pads. Everything is deterministic under ``seed``; :func:`data_fingerprint` hashes the batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from probes import facts
from probes.errors import ProbeError
from probes.formats import RecordFormat
from probes.records import (
    TokenSource,
    batch_ids,
    datasets_records,
    encode,
    jsonl_records,
    read_text,
    record_rows,
    token_rows,
    warn_short,
)
from probes.sources import check_source, source_kind, split_of

RECORD_SUFFIXES = (".jsonl", ".json")
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_CHUNK_CHARS = 1 << 16  # plain text is tokenised in chunks of about this many characters, cut at newlines
_OVERSAMPLE = 8  # packed text: tokenise up to this many times the tokens needed, then pick windows by seed

Batch = dict[str, torch.Tensor]




def load_batches(
    source: str | os.PathLike | TokenSource,
    tokenizer: Any,
    *,
    seq_len: int = 256,
    samples: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    text_field: str = "text",
    encoding: str = "utf-8",
    assistant_only_loss: bool = False,
    completion_only_loss: bool = True,
) -> list[Batch]:
    """Token batches for :func:`probes.run` from any source of the module docstring.

    Args:
        source: ``"builtin"``, a file path, a ``datasets`` folder or object, a list of records, token batches
            or a DataLoader of them (see the module docstring).
        tokenizer: a Hugging Face tokenizer (callable, with ``eos_token_id``/``pad_token_id``).
        seq_len: tokens per sequence (window length for text, truncate/pad length for records).
        samples: number of sequences in all; fewer are returned (with a ``ProbeWarning``) if the data is
            short.
        batch_size: sequences per micro-batch; the last batch may be smaller.
        seed: picks the windows / records and their order (token batches and iterable datasets keep theirs).
        text_field: the record field holding plain text (TRL's ``dataset_text_field``).
        encoding: how ``.txt``/``.jsonl`` files are decoded, strictly: a byte that does not decode (or a NUL
            byte, the mark of a binary file) is a ProbeError naming its offset and line.
        assistant_only_loss: chat records: labels on the assistant turns only (TRL's ``assistant_only_loss``).
        completion_only_loss: prompt + completion records: labels on the completion only (TRL's default).

    Raises:
        ProbeError: missing file, undecodable or binary file, empty data, text shorter than one sequence,
            every label masked, a record or dataset of no known form, a conversation without an assistant turn
            under ``assistant_only_loss``.
    """
    for name, value in (("seq_len", seq_len), ("samples", samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ProbeError(f"{name} must be a positive int, got {value!r}")
    if seq_len < 2:
        raise ProbeError(f"seq_len must be >= 2 for a next-token loss, got {seq_len}")
    rng = random.Random(seed)
    fmt = RecordFormat(text_field, assistant_only_loss, completion_only_loss)
    check_source(source, fmt)
    kind = source_kind(source, fmt)
    if kind in ("tokens", "loader"):
        label = "(token batches)" if kind == "tokens" else "(DataLoader batches)"
        rows = token_rows(source, tokenizer, seq_len, samples, label)
    elif kind in ("records", "dataset", "iterable"):
        label = "(records)" if kind == "records" else f"(the {type(split_of(source)).__name__})"
        rows = record_rows(split_of(source), tokenizer, label, seq_len, samples, rng, fmt)
    elif kind == "builtin" and str(source) == facts.NAME:
        rows = facts.fact_rows(tokenizer, seq_len, samples, rng)
    elif kind == "builtin":
        rows = _packed_rows(_builtin_chunks(rng), tokenizer, "builtin", seq_len, samples, rng)
    else:
        path = Path(source)
        if not path.exists():
            raise ProbeError(
                f"calibration data {str(source)!r} not found; pass an existing .txt/.jsonl file, a datasets "
                "folder or 'builtin'"
            )
        if path.is_dir():
            rows = record_rows(datasets_records(path), tokenizer, str(path), seq_len, samples, rng, fmt)
        elif path.suffix.lower() in RECORD_SUFFIXES:
            records = jsonl_records(path, encoding)
            rows = record_rows(records, tokenizer, str(path), seq_len, samples, rng, fmt)
        else:
            rows = _packed_rows(_text_chunks(path, encoding), tokenizer, str(path), seq_len, samples, rng)
    return _collate(rows, batch_size)


def is_token_source(source: Any) -> bool:
    """Whether ``source`` is a sequence of token batches rather than a path or ``"builtin"``."""
    return source_kind(source) == "tokens"


def describe_source(source: Any, fmt: RecordFormat | None = None) -> str:
    """How a run records its data: the path or name as given; token batches or records (read by ``fmt``) by
    count and fingerprint; a ``datasets`` object by size, columns and fingerprint; a DataLoader by its batch
    count."""
    kind = source_kind(source, fmt)
    if kind == "tokens":
        return _describe_token_batches(source)
    if kind == "records":
        digest = hashlib.sha256(json.dumps(list(source), sort_keys=True, default=str).encode()).hexdigest()
        return f"<{len(source)} records, sha256 {digest[:16]}>"
    if kind == "loader":
        try:
            size = f"{len(source)} batches"
        except TypeError:  # an iterable-style dataset behind it
            size = "batches"
        return f"<torch DataLoader of {size} over a {type(source.dataset).__name__}>"
    if kind in ("dataset", "iterable"):
        split = split_of(source)
        rows = f"{len(split)} rows, " if kind == "dataset" else ""
        fingerprint = getattr(split, "_fingerprint", None)
        return (f"<datasets.{type(split).__name__}: {rows}columns {sorted(split.column_names or [])}"
                f"{', fingerprint ' + str(fingerprint) if fingerprint else ''}>")
    return facts.DESCRIPTION if str(source) == facts.NAME else str(source)


def _describe_token_batches(source: Any) -> str:
    rows = sum(batch_ids(b, i).shape[0] for i, b in enumerate(source))
    try:
        tensors = [{k: torch.as_tensor(v) for k, v in b.items()} for b in source]
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProbeError(
            "token batches: every value must be a tensor or a list of ids "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return f"<{rows} tokenised sequences in {len(source)} batches, sha256 {data_fingerprint(tensors)[:16]}>"


def data_fingerprint(batches: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """sha256 over every batch's keys, dtypes, shapes and bytes: equal fingerprints mean equal batches."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            tensor = batch[key].detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# --- plain text: packed windows ----------------------------------------------------------------------------


def _builtin_chunks(rng: random.Random):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_STDLIB_DIRS]  # installed packages differ per machine
        rel = Path(folder).relative_to(root)
        files.extend((rel / n).as_posix() for n in names if n.endswith(".py"))
    files.sort()
    if not files:
        raise ProbeError(
            f"no Python sources under the stdlib folder {root}; pass a text file instead of 'builtin'"
        )
    rng.shuffle(files)
    for rel in files:
        yield (root / rel).read_text(encoding="utf-8", errors="replace"), True  # True: a document ends here


def _text_chunks(path: Path, encoding: str = "utf-8"):
    text = read_text(path, encoding)
    start = 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        cut = text.rfind("\n", start, end) + 1 if end < len(text) else end
        end = cut if cut > start else end
        yield text[start:end], end >= len(text)
        start = end


def _packed_rows(chunks, tokenizer, label: str, seq_len: int, samples: int, rng: random.Random):
    budget = seq_len * samples * _OVERSAMPLE
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text, doc_end in chunks:
        if text.strip():
            stream.extend(encode(tokenizer, text, special=False))
            if doc_end and eos is not None:
                stream.append(eos)
        if len(stream) >= budget:
            break
    if not stream:
        raise ProbeError(f"calibration data {label} is empty; give it some text")
    n_windows = len(stream) // seq_len
    if n_windows == 0:
        raise ProbeError(
            f"calibration data {label} has {len(stream)} tokens, fewer than one sequence of "
            f"seq_len={seq_len}; add text or lower seq_len"
        )
    starts = rng.sample(range(n_windows), min(samples, n_windows))
    warn_short(label, len(starts), samples)
    rows = []
    for w in starts:
        ids = stream[w * seq_len : (w + 1) * seq_len]
        rows.append((ids, list(ids), [1] * seq_len))
    return rows


def _collate(rows, batch_size: int) -> list[Batch]:
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batches.append(
            {
                "input_ids": torch.tensor([r[0] for r in chunk], dtype=torch.long),
                "labels": torch.tensor([r[1] for r in chunk], dtype=torch.long),
                "attention_mask": torch.tensor([r[2] for r in chunk], dtype=torch.long),
            }
        )
    return batches
