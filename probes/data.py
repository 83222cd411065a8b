"""Stage 2a: calibration data -> token batches.

``load_batches(source, tokenizer) -> list[dict[str, Tensor]]``, each dict holding ``input_ids``,
``attention_mask`` and ``labels`` (``-100`` where no loss is taken), all ``(batch, seq_len)`` int64.

Sources, chosen by what ``source`` is:

- ``"builtin"``: the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``), present on every
  machine; a fixed sorted file list, shuffled by ``seed``.
- a folder: a Hugging Face ``datasets`` folder written by ``save_to_disk`` (needs ``pip install datasets``).
- ``*.jsonl`` / ``*.json``: one record per line; ``text_field`` text, chat ``messages`` (rendered with the
  tokenizer's chat template, loss on assistant turns) or ``prompt`` + ``response``/``completion`` (loss on the
  response only).
- any other file: plain text.
- a sequence of token batches (mappings holding ``input_ids``, optionally ``labels`` and ``attention_mask``; 1-D
  rows or 2-D batches; tensors or lists): data the caller has tokenised already. Its rows are taken **in order**
  (``seed`` is not used), truncated or padded to ``seq_len`` and re-batched at ``batch_size``.

Plain text is packed into windows of ``seq_len`` tokens; records are truncated/padded to ``seq_len``.
Everything is deterministic under ``seed``; :func:`data_fingerprint` hashes the resulting batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from probes.errors import ProbeError, ProbeWarning

IGNORE_INDEX = -100
RECORD_SUFFIXES = (".jsonl", ".json")
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_CHUNK_CHARS = 1 << 16  # plain text is tokenised in chunks of about this many characters, cut at newlines
_OVERSAMPLE = 8  # packed text: tokenise up to this many times the tokens needed, then pick windows by seed

Batch = dict[str, torch.Tensor]


TokenSource = Sequence[Mapping[str, Any]]


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
    """Token batches for :func:`probes.run` from text, JSONL, a ``datasets`` folder, ``"builtin"`` or batches the
    caller has tokenised already.

    Args:
        source: ``"builtin"``, a file path, a ``datasets`` folder or a sequence of token batches (see the module
            docstring).
        tokenizer: a Hugging Face tokenizer (callable, with ``eos_token_id``/``pad_token_id``).
        seq_len: tokens per sequence (window length for text, pad/truncate length for records).
        samples: number of sequences in all; fewer are returned (with a ``ProbeWarning``) if the data is short.
        batch_size: sequences per micro-batch; the last batch may be smaller.
        seed: picks the windows / records and their order (token batches keep theirs).
        text_field: the record field holding plain text.
        encoding: how ``.txt``/``.jsonl`` files are decoded, strictly: a byte that does not decode (or a NUL byte,
            the mark of a binary file) is a ProbeError naming its offset and line.

    Raises:
        ProbeError: missing file, undecodable or binary file, empty data, text shorter than one sequence, every
            label masked.
    """
    for name, value in (("seq_len", seq_len), ("samples", samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ProbeError(f"{name} must be a positive int, got {value!r}")
    if seq_len < 2:
        raise ProbeError(f"seq_len must be >= 2 for a next-token loss, got {seq_len}")
    rng = random.Random(seed)
    if is_token_source(source):
        rows = _token_rows(source, tokenizer, seq_len, samples)
    elif str(source) == "builtin":
        rows = _packed_rows(_builtin_chunks(rng), tokenizer, "builtin", seq_len, samples, rng)
    else:
        path = Path(source)
        if not path.exists():
            raise ProbeError(
                f"calibration data {str(source)!r} not found; pass an existing .txt/.jsonl file, a datasets folder "
                "or 'builtin'"
            )
        if path.is_dir():
            rows = _record_rows(_datasets_records(path), tokenizer, str(path), seq_len, samples, rng, text_field)
        elif path.suffix.lower() in RECORD_SUFFIXES:
            rows = _record_rows(_jsonl_records(path, encoding), tokenizer, str(path), seq_len, samples, rng,
                                text_field)
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
    rows = sum(_batch_ids(b, i).shape[0] for i, b in enumerate(source))
    try:
        tensors = [{k: torch.as_tensor(v) for k, v in b.items()} for b in source]
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProbeError(f"token batches: every value must be a tensor or a list of ids ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
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
        raise ProbeError(f"no Python sources under the stdlib folder {root}; pass a text file instead of 'builtin'")
    rng.shuffle(files)
    for rel in files:
        yield (root / rel).read_text(encoding="utf-8", errors="replace"), True  # True: a document ends here


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole file decoded strictly; a bad byte or a NUL byte is a ProbeError naming where it is."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProbeError(f"cannot read calibration data {path} ({exc.strerror or exc}); check the path and its "
                         "permissions") from None
    nul = data.find(b"\x00") if encoding.replace("-", "").lower() in ("utf8", "ascii", "latin1") else -1
    try:
        if nul >= 0:
            raise UnicodeDecodeError(encoding, data, nul, nul + 1, "NUL byte")
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        what = "looks binary (a NUL byte" if err.reason == "NUL byte" else f"is not valid {encoding} (byte " \
            f"0x{data[err.start]:02x}"
        raise ProbeError(f"{path} {what} at offset {err.start}, line {line}); give a UTF-8 text file, convert it "
                         "(iconv -f latin1 -t utf-8), or name its encoding with --encoding") from None


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
            stream.extend(_encode(tokenizer, text, special=False))
            if doc_end and eos is not None:
                stream.append(eos)
        if len(stream) >= budget:
            break
    if not stream:
        raise ProbeError(f"calibration data {label} is empty; give it some text")
    n_windows = len(stream) // seq_len
    if n_windows == 0:
        raise ProbeError(
            f"calibration data {label} has {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}; "
            "add text or lower seq_len"
        )
    starts = rng.sample(range(n_windows), min(samples, n_windows))
    _warn_short(label, len(starts), samples)
    rows = []
    for w in starts:
        ids = stream[w * seq_len:(w + 1) * seq_len]
        rows.append((ids, list(ids), [1] * seq_len))
    return rows


# --- token batches given by the caller ---------------------------------------------------------------------


def _batch_ids(batch: Any, index: int) -> torch.Tensor:
    """A token batch's ``input_ids`` as (rows, seq) int64, or a ProbeError naming what is wrong with it."""
    if not isinstance(batch, Mapping):
        raise ProbeError(f"token batch {index} is a {type(batch).__name__}, not a mapping of input_ids/labels")
    return _as_rows(batch.get("input_ids"), index)


def _shaped_like(batch: Mapping, key: str, ids: torch.Tensor, index: int) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(batch[key])
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProbeError(f"token batch {index}: {key} must be integers shaped like input_ids ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if tensor.numel() != ids.numel():
        raise ProbeError(f"token batch {index}: {key} has shape {tuple(tensor.shape)}, input_ids "
                         f"{tuple(ids.shape)}; give one value per token")
    return tensor.reshape(ids.shape).long()


def _as_rows(value: Any, index: int) -> torch.Tensor:
    if value is None:
        raise ProbeError(f"token batch {index} has no 'input_ids'; give mappings with input_ids (and optionally "
                         "labels, attention_mask)")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # strings, ragged rows, ids past int64
        raise ProbeError(f"token batch {index}: input_ids must be integer ids of shape (seq,) or (batch, seq) "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.is_floating_point() or tensor.is_complex():
        raise ProbeError(f"token batch {index}: input_ids must be integer ids of shape (seq,) or (batch, seq), got "
                         f"{tuple(tensor.shape)} {tensor.dtype}")
    return tensor.long()


def _token_rows(source: TokenSource, tokenizer: Any, seq_len: int, samples: int):
    label, rows, pad_id = "(token batches)", [], _pad_id(tokenizer)
    for index, batch in enumerate(source):
        ids = _batch_ids(batch, index)
        mask = torch.ones_like(ids) if batch.get("attention_mask") is None else _shaped_like(
            batch, "attention_mask", ids, index)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if batch.get("labels") is None else _shaped_like(
            batch, "labels", ids, index)
        for i in range(ids.shape[0]):
            row = _padded_row(ids[i].tolist(), labels[i].tolist(), mask[i].tolist(), seq_len, pad_id)
            if row is None:
                continue
            rows.append(row)
            if len(rows) == samples:
                return rows
    if not rows:
        raise ProbeError(f"{label}: no sequence has a loss token within seq_len={seq_len}; check the labels")
    _warn_short(label, len(rows), samples)
    return rows


# --- records: padded sequences -----------------------------------------------------------------------------


def _jsonl_records(path: Path, encoding: str = "utf-8") -> list[dict]:
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
            raise ProbeError(f"{path}:{line_no} is not valid JSON ({err.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise ProbeError(f"{path}:{line_no} is a {type(record).__name__}, not a JSON object; write one object "
                             "per line")
        records.append(record)
    return records


def _datasets_records(path: Path):
    """The saved split itself (indexable, lazy): records are read one by one as they are drawn."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only for this source
    except ImportError:
        raise ProbeError(
            f"{path} is a folder, read as a Hugging Face datasets folder, which needs the `datasets` package: "
            "pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else sorted(loaded)[0]
        loaded = loaded[split]
    return loaded


def _padded_row(ids: list[int], labels: list[int], mask: list[int], seq_len: int, pad_id: int):
    """One sequence truncated to ``seq_len`` and right-padded (``pad_id``, label -100, mask 0); None when no label
    is left to predict."""
    ids, labels, mask = ids[:seq_len], labels[:seq_len], mask[:seq_len]
    if sum(lab != IGNORE_INDEX for lab in labels[1:]) == 0:  # labels[0] is never predicted
        return None
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, mask + [0] * pad


def _record_rows(records, tokenizer, label, seq_len, samples, rng, text_field):
    if not records:
        raise ProbeError(f"calibration data {label} is empty; give it at least one record")
    order = list(range(len(records)))
    rng.shuffle(order)
    rows, n_masked = [], 0
    for index in order:
        ids, labels = _encode_record(dict(records[index]), index, tokenizer, text_field, label)
        row = _padded_row(ids, labels, [1] * len(ids), seq_len, _pad_id(tokenizer))
        if row is None:
            n_masked += 1
            continue
        rows.append(row)
        if len(rows) == samples:
            break
    if not rows:
        raise ProbeError(
            f"every label in {label} is masked ({n_masked} records, none with a loss token within seq_len={seq_len}); "
            "check the response/assistant fields or raise seq_len"
        )
    _warn_short(label, len(rows), samples)
    return rows


def _encode_record(record: dict, index: int, tokenizer, text_field: str, label: str):
    if text_field in record and not isinstance(record[text_field], str):
        value = record[text_field]
        raise ProbeError(f"record {index} of {label} has {text_field!r}: "
                         f"{'null' if value is None else type(value).__name__}, not a string; give it text or drop "
                         "the record")
    if isinstance(record.get(text_field), str):
        ids = _encode(tokenizer, record[text_field], special=True)
        return ids, list(ids)
    if isinstance(record.get("messages"), list):
        return _encode_chat(record["messages"], tokenizer, label)
    response = record.get("response", record.get("completion"))
    if isinstance(record.get("prompt"), str) and isinstance(response, str):
        prompt = _encode(tokenizer, record["prompt"], special=True)
        answer = _encode(tokenizer, response, special=False)
        eos = getattr(tokenizer, "eos_token_id", None)
        answer = answer + ([eos] if eos is not None else [])
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    raise ProbeError(
        f"record {index} of {label} has none of {text_field!r}, 'messages', 'prompt'+'response'; "
        f"its keys are {sorted(record)}; set text_field or fix the records"
    )


def _encode_chat(messages: list, tokenizer, label: str):
    """Whole conversation as input; loss on assistant turns, found by rendering each prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise ProbeError(
            f"{label} has chat 'messages' but the tokenizer has no chat template; set tokenizer.chat_template "
            "or give the records a text field"
        )

    def render(msgs, generation_prompt=False):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return _encode(tokenizer, text, special=False)

    ids = render(messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = render(messages[:i], generation_prompt=True) if i else []
        upto = render(messages[: i + 1])
        if upto != ids[: len(upto)] or prefix != upto[: len(prefix)]:  # template not prefix-stable: loss everywhere
            return ids, list(ids)
        labels[len(prefix):len(upto)] = upto[len(prefix):]
    if all(lab == IGNORE_INDEX for lab in labels):
        return ids, list(ids)
    return ids, labels


# --- helpers -----------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _warn_short(label: str, got: int, wanted: int) -> None:
    if got < wanted:
        warnings.warn(
            f"calibration data {label} gave {got} sequences, fewer than samples={wanted}; add data or lower samples "
            "to silence this",
            ProbeWarning,
            stacklevel=3,
        )


def _collate(rows, batch_size: int) -> list[Batch]:
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batches.append({
            "input_ids": torch.tensor([r[0] for r in chunk], dtype=torch.long),
            "labels": torch.tensor([r[1] for r in chunk], dtype=torch.long),
            "attention_mask": torch.tensor([r[2] for r in chunk], dtype=torch.long),
        })
    return batches
