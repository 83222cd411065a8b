"""Rows of tokens from records (JSONL, ``datasets``) and from token batches the caller made: the part of
stage 2a that knows record formats (``text``, chat ``messages``, ``prompt`` + ``response``) and label masks.

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

IGNORE_INDEX = -100
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
            "file, convert it (iconv -f latin1 -t utf-8), or name its encoding with "
            "--encoding"
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
            f"token batch {index} has no 'input_ids'; give mappings with input_ids (and "
            "optionally labels, attention_mask)"
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


def token_rows(source: TokenSource, tokenizer: Any, seq_len: int, samples: int):
    label, rows, pad_id = "(token batches)", [], pad_token_id(tokenizer)
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
    label
    is left to predict."""
    ids, labels, mask = ids[:seq_len], labels[:seq_len], mask[:seq_len]
    if sum(lab != IGNORE_INDEX for lab in labels[1:]) == 0:  # labels[0] is never predicted
        return None
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, mask + [0] * pad


def record_rows(records, tokenizer, label, seq_len, samples, rng, text_field):
    if not records:
        raise ProbeError(f"calibration data {label} is empty; give it at least one record")
    order = list(range(len(records)))
    rng.shuffle(order)
    rows, n_masked = [], 0
    for index in order:
        ids, labels = encode_record(dict(records[index]), index, tokenizer, text_field, label)
        row = padded_row(ids, labels, [1] * len(ids), seq_len, pad_token_id(tokenizer))
        if row is None:
            n_masked += 1
            continue
        rows.append(row)
        if len(rows) == samples:
            break
    if not rows:
        raise ProbeError(
            f"every label in {label} is masked ({n_masked} records, none with a loss token within "
            f"seq_len={seq_len}); check the response/assistant fields or raise seq_len"
        )
    warn_short(label, len(rows), samples)
    return rows


def encode_record(record: dict, index: int, tokenizer, text_field: str, label: str):
    if text_field in record and not isinstance(record[text_field], str):
        value = record[text_field]
        raise ProbeError(
            f"record {index} of {label} has {text_field!r}: "
            f"{'null' if value is None else type(value).__name__}, not a string; give it text "
            "or drop the record"
        )
    if isinstance(record.get(text_field), str):
        ids = encode(tokenizer, record[text_field], special=True)
        return ids, list(ids)
    if isinstance(record.get("messages"), list):
        return encode_chat(record["messages"], tokenizer, label)
    response = record.get("response", record.get("completion"))
    if isinstance(record.get("prompt"), str) and isinstance(response, str):
        prompt = encode(tokenizer, record["prompt"], special=True)
        answer = encode(tokenizer, response, special=False)
        eos = getattr(tokenizer, "eos_token_id", None)
        answer = answer + ([eos] if eos is not None else [])
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    raise ProbeError(
        f"record {index} of {label} has none of {text_field!r}, 'messages', 'prompt'+'response'; "
        f"its keys are {sorted(record)}; set text_field or fix the records"
    )


def encode_chat(messages: list, tokenizer, label: str):
    """Whole conversation as input; loss on assistant turns, found by rendering each prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise ProbeError(
            f"{label} has chat 'messages' but the tokenizer has no chat template; set "
            "tokenizer.chat_template or give the records a text field"
        )

    def render(msgs, generation_prompt=False):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return encode(tokenizer, text, special=False)

    ids = render(messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = render(messages[:i], generation_prompt=True) if i else []
        upto = render(messages[: i + 1])
        # template not prefix-stable: loss everywhere
        if upto != ids[: len(upto)] or prefix != upto[: len(prefix)]:
            return ids, list(ids)
        labels[len(prefix) : len(upto)] = upto[len(prefix) :]
    if all(lab == IGNORE_INDEX for lab in labels):
        return ids, list(ids)
    return ids, labels


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
