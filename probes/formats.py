"""Records -> token ids and labels exactly as TRL's ``SFTTrainer`` prepares them, so the probes see the
tokens and labels the trainer trains on (TRL 1.x: ``SFTTrainer._prepare_dataset``,
``trl.data_utils._tokenize``; ``tests/test_integrations.py`` holds TRL's own pipeline as the oracle).

A record (a JSONL line, a row of a ``datasets`` split, a dict of a list) is read in TRL's order:

- ``prompt`` + ``completion`` (``response`` is taken for ``completion``). Plain text: the completion gets
  the EOS token appended unless it ends with it; prompt and prompt + completion are tokenised apart and the
  completion starts where the two diverge (TRL's ``common_prefix_length``). Lists of messages: the prompt is
  rendered with the generation prompt, the whole with the chat template. Loss on the completion only when
  ``completion_only_loss`` (TRL's default for this form), else on every token.
- ``messages`` (ShareGPT ``conversations`` with ``from``/``value`` renamed as TRL's
  ``maybe_convert_to_chatml`` does): ``tokenizer.apply_chat_template(messages, tokenize=True,
  return_dict=True)``, loss on every token; with ``assistant_only_loss`` only on the tokens the template marks
  with ``{% generation %}`` (for a known template without the markers, TRL's patched training template, when
  TRL is installed).
- ``text_field`` text: the EOS token appended unless the text ends with it, tokenised with the tokenizer's
  special tokens; loss on every token.
- ``input_ids`` (tokenised already): ``labels`` if given, else masked by ``assistant_masks`` and (with
  ``completion_only_loss``) ``completion_mask`` as TRL folds them, else every token.

Truncation to ``seq_len`` (TRL's ``max_length``, keep the start) and padding are :mod:`probes.records`' part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from probes.errors import ProbeError

IGNORE_INDEX = -100
COMPLETION_KEYS = ("completion", "response")  # TRL's name first; `response` is accepted for it
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # TRL's has_generation_markers


@dataclass(frozen=True)
class RecordFormat:
    """How records become labels: DataSettings' ``text_field``, ``assistant_only_loss``,
    ``completion_only_loss``."""

    text_field: str = "text"
    assistant_only_loss: bool = False
    completion_only_loss: bool = True


def usable_keys(fmt: RecordFormat) -> str:
    """The record forms, as error messages list them."""
    return f"{fmt.text_field!r} (text), 'messages', 'conversations', 'prompt'+'completion' or 'input_ids'"


def has_usable_columns(columns: Any, fmt: RecordFormat) -> bool:
    """Whether a record (or a dataset) with these keys has a form :func:`encode_record` reads."""
    cols = set(columns)
    pair = "prompt" in cols and bool(cols & set(COMPLETION_KEYS))
    return pair or bool(cols & {"messages", "conversations", "input_ids", fmt.text_field})


def encode_record(
    record: Mapping[str, Any], index: int, tokenizer: Any, fmt: RecordFormat, label: str
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record, labels ``-100`` where TRL takes no loss; a ProbeError naming the
    record and the fix for a record of no known form."""
    record = dict(record)
    if isinstance(record.get("conversations"), list) and "messages" not in record:
        record["messages"] = [_chatml(m) for m in record.pop("conversations")]
    where = f"record {index} of {label}"
    if "input_ids" in record:
        return _pretokenised(record, fmt, where)
    completion_key = next((k for k in COMPLETION_KEYS if k in record), None)
    if "prompt" in record and completion_key is not None:
        return _prompt_completion(record, record[completion_key], tokenizer, fmt, where)
    if is_messages(record.get("messages")):
        return _chat(record, tokenizer, fmt, where)
    if fmt.text_field in record and not isinstance(record[fmt.text_field], str):
        value = record[fmt.text_field]
        raise ProbeError(
            f"{where} has {fmt.text_field!r}: {'null' if value is None else type(value).__name__}, not a "
            "string; give it text or drop the record"
        )
    if isinstance(record.get(fmt.text_field), str):
        _no_assistant_loss(fmt, where)
        return _text(record[fmt.text_field], tokenizer)
    raise ProbeError(
        f"{where} has none of {usable_keys(fmt)}; its keys are {sorted(record)}; set "
        "DataSettings.text_field or fix the records"
    )


def is_messages(value: Any) -> bool:
    """TRL's ``is_conversational`` test: a list whose first item is a dict with a ``role``."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _chatml(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    out = dict(message)
    if "from" in out:
        out["role"] = out.pop("from")
    if "value" in out:
        out["content"] = out.pop("value")
    return out


def _text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not text.endswith(eos):
        text = text + eos
    ids = list(tokenizer(text=text, verbose=False)["input_ids"])
    return ids, list(ids)


def _no_assistant_loss(fmt: RecordFormat, where: str) -> None:
    if fmt.assistant_only_loss:
        raise ProbeError(
            f"{where} is not a conversation (no 'messages'): assistant-only loss applies to chat records "
            "only, as in TRL; turn it off for text data (DataSettings(assistant_only_loss=False))"
        )


def _chat(record: dict, tokenizer: Any, fmt: RecordFormat, where: str) -> tuple[list[int], list[int]]:
    messages = record["messages"]
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=fmt.assistant_only_loss,
        **_template_kwargs(record, tokenizer, fmt, where),
    )
    ids = list(out["input_ids"])
    if not fmt.assistant_only_loss:
        return ids, list(ids)
    return ids, _masked(ids, out["assistant_masks"], messages, where)


def _masked(ids: list[int], mask: Any, messages: list, where: str) -> list[int]:
    if 1 not in list(mask):
        turns = "no assistant turn" if not any(_role(m) == "assistant" for m in messages) else (
            "an assistant turn the chat template does not mark")
        raise ProbeError(
            f"{where} has {turns}; assistant-only loss needs one in every conversation (TRL's SFTTrainer "
            "refuses it too): drop the record, or turn it off (DataSettings(assistant_only_loss=False))"
        )
    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _prompt_completion(
    record: dict, completion: Any, tokenizer: Any, fmt: RecordFormat, where: str
) -> tuple[list[int], list[int]]:
    prompt = record["prompt"]
    if is_messages(prompt):
        if not isinstance(completion, list):
            raise ProbeError(f"{where}: the prompt is a list of messages but the completion is a "
                             f"{type(completion).__name__}; give the completion as messages too")
        kwargs = _template_kwargs(record, tokenizer, fmt, where)
        prompt_ids = tokenizer.apply_chat_template(
            prompt, tokenize=True, return_dict=True, add_generation_prompt=True, **kwargs
        )["input_ids"]
        out = tokenizer.apply_chat_template(
            prompt + completion, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=fmt.assistant_only_loss, **kwargs,
        )
        ids = list(out["input_ids"])
        masked = _masked(ids, out["assistant_masks"], prompt + completion, where) if (
            fmt.assistant_only_loss) else list(ids)
    else:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ProbeError(f"{where}: prompt and completion must both be strings or both lists of "
                             f"messages, got {type(prompt).__name__} and {type(completion).__name__}")
        _no_assistant_loss(fmt, where)
        eos = getattr(tokenizer, "eos_token", None)
        completion = completion + eos if eos and not completion.endswith(eos) else completion
        prompt_ids = tokenizer(text=prompt, verbose=False)["input_ids"]
        ids = list(tokenizer(text=prompt + completion, verbose=False)["input_ids"])
        masked = list(ids)
    if not fmt.completion_only_loss:
        return ids, masked
    start = _common_prefix(list(prompt_ids), ids)
    return ids, [IGNORE_INDEX] * start + masked[start:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _template_kwargs(record: dict, tokenizer: Any, fmt: RecordFormat, where: str) -> dict[str, Any]:
    """``chat_template`` (TRL's training template where one is needed), ``tools`` and the record's own
    ``chat_template_kwargs``, as TRL's ``tokenize_fn`` passes them."""
    template = tokenizer.chat_template if getattr(tokenizer, "chat_template", None) else None
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ProbeError(
            f"{where} holds chat messages but the tokenizer has no chat template; set "
            "tokenizer.chat_template or give the records a text field"
        )
    tools = record.get("tools")
    if isinstance(tools, str):
        import json  # noqa: PLC0415 - only for records that carry tools as JSON text

        tools = json.loads(tools)
    return {
        "chat_template": training_template(tokenizer, template) if fmt.assistant_only_loss else None,
        "tools": tools,
        **(record.get("chat_template_kwargs") or {}),
    }


def training_template(tokenizer: Any, template: str) -> str | None:
    """None when ``template`` marks assistant turns with ``{% generation %}``; else TRL's patched training
    template (``trl.chat_template_utils.get_training_chat_template``), as SFTTrainer swaps it in."""
    if _GENERATION.search(template):
        return None
    try:
        from trl.chat_template_utils import get_training_chat_template  # noqa: PLC0415 - optional
    except ImportError:
        raise ProbeError(
            "assistant-only loss needs a chat template that marks assistant turns with {% generation %}; "
            "this one does not: add the markers, pip install trl (it patches the templates it knows), or "
            "turn it off (DataSettings(assistant_only_loss=False))"
        ) from None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise ProbeError(
            "assistant-only loss needs a chat template that marks assistant turns with {% generation %}; "
            "neither this one nor TRL's patches do: add the markers, or turn it off "
            "(DataSettings(assistant_only_loss=False))"
        ) from None


def _pretokenised(record: dict, fmt: RecordFormat, where: str) -> tuple[list[int], list[int]]:
    _no_assistant_loss(fmt, where)  # TRL refuses assistant_only_loss on data that is not conversational
    ids = _ints(record["input_ids"], "input_ids", where)
    if record.get("labels") is not None:
        labels = _ints(record["labels"], "labels", where)
        if len(labels) != len(ids):
            raise ProbeError(f"{where}: labels has {len(labels)} values, input_ids {len(ids)}; give one per "
                             "token")
        return ids, labels
    masks = [_ints(record[k], k, where) for k in ("assistant_masks", "completion_mask")
             if record.get(k) is not None and (k != "completion_mask" or fmt.completion_only_loss)]
    return ids, [t if all(bits) else IGNORE_INDEX for t, *bits in zip(ids, *masks, strict=False)]


def _ints(value: Any, key: str, where: str) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProbeError(f"{where}: {key} must be a list of integer token ids")
    return list(value)
