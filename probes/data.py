"""Stage 2a: calibration data -> token batches.

``load_batches(source, tokenizer) -> list[dict[str, Tensor]]``, each dict holding ``input_ids``,
``attention_mask`` and ``labels`` (``-100`` where no loss is taken), all ``(batch, seq_len)`` int64.

Sources, chosen by what ``source`` is:

- ``"builtin"``: the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``), present on
every
  machine; a fixed sorted file list, shuffled by ``seed``.
- a folder: a Hugging Face ``datasets`` folder written by ``save_to_disk`` (needs ``pip install datasets``).
- ``*.jsonl`` / ``*.json``: one record per line; ``text_field`` text, chat ``messages`` (rendered with the
  tokenizer's chat template, loss on assistant turns) or ``prompt`` + ``response``/``completion`` (loss on the
  response only).
- any other file: plain text.
- a sequence of token batches (mappings holding ``input_ids``, optionally ``labels`` and ``attention_mask``;
1-D
  rows or 2-D batches; tensors or lists): data the caller has tokenised already. Its rows are taken **in
  order**
  (``seed`` is not used), truncated or padded to ``seq_len`` and re-batched at ``batch_size``.

Plain text is packed into windows of ``seq_len`` tokens; records are truncated/padded to ``seq_len``.
Everything is deterministic under ``seed``; :func:`data_fingerprint` hashes the resulting batches.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from probes.errors import ProbeError
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
) -> list[Batch]:
    """Token batches for :func:`probes.run` from text, JSONL, a ``datasets`` folder, ``"builtin"`` or batches
    the
    caller has tokenised already.

    Args:
        source: ``"builtin"``, a file path, a ``datasets`` folder or a sequence of token batches (see the
        module
            docstring).
        tokenizer: a Hugging Face tokenizer (callable, with ``eos_token_id``/``pad_token_id``).
        seq_len: tokens per sequence (window length for text, pad/truncate length for records).
        samples: number of sequences in all; fewer are returned (with a ``ProbeWarning``) if the data is
        short.
        batch_size: sequences per micro-batch; the last batch may be smaller.
        seed: picks the windows / records and their order (token batches keep theirs).
        text_field: the record field holding plain text.
        encoding: how ``.txt``/``.jsonl`` files are decoded, strictly: a byte that does not decode (or a NUL
        byte,
            the mark of a binary file) is a ProbeError naming its offset and line.

    Raises:
        ProbeError: missing file, undecodable or binary file, empty data, text shorter than one sequence,
        every
            label masked.
    """
    for name, value in (("seq_len", seq_len), ("samples", samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ProbeError(f"{name} must be a positive int, got {value!r}")
    if seq_len < 2:
        raise ProbeError(f"seq_len must be >= 2 for a next-token loss, got {seq_len}")
    rng = random.Random(seed)
    if is_token_source(source):
        rows = token_rows(source, tokenizer, seq_len, samples)
    elif str(source) == "builtin":
        rows = _packed_rows(_builtin_chunks(rng), tokenizer, "builtin", seq_len, samples, rng)
    else:
        path = Path(source)
        if not path.exists():
            raise ProbeError(
                f"calibration data {str(source)!r} not found; pass an existing .txt/.jsonl file, a datasets "
                "folder or 'builtin'"
            )
        if path.is_dir():
            rows = record_rows(
                datasets_records(path), tokenizer, str(path), seq_len, samples, rng, text_field
            )
        elif path.suffix.lower() in RECORD_SUFFIXES:
            rows = record_rows(
                jsonl_records(path, encoding), tokenizer, str(path), seq_len, samples, rng, text_field
            )
        else:
            rows = _packed_rows(_text_chunks(path, encoding), tokenizer, str(path), seq_len, samples, rng)
    return _collate(rows, batch_size)


def is_token_source(source: Any) -> bool:
    """Whether ``source`` is a sequence of token batches rather than a path or ``"builtin"``."""
    return isinstance(source, Sequence) and not isinstance(source, (str, bytes))


def describe_source(source: Any) -> str:
    """How a run records its data: the path or name as given, or a count and fingerprint of token batches."""
    if not is_token_source(source):
        return str(source)
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
