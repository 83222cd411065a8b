"""The built-in demo task ``"builtin-facts"``: synthetic ``key -> value`` facts to store in the weights.

Rows are ``? key: value`` lines (5-letter keys over n..z, values 10..99) with the loss on the values only,
the format of the placement benchmark's fact task (``benchmarks/tasks.py``), whose finding it demonstrates:
storing many independent facts binds a LoRA's capacity in the recurrent layers, and there the allocator's
plan beat uniform LoRA (``docs/results/summary.md``). On general text (``"builtin"``) no placement beat
uniform significantly, so this is what ``make demo`` runs. The facts come from a fixed generator of their own
(not the benchmark's facts); ``seed`` picks which facts fill the rows and their order.
"""

from __future__ import annotations

import random
from typing import Any

from probes.errors import ProbeError
from probes.records import warn_short

NAME = "builtin-facts"
N_FACTS = 4096
DESCRIPTION = (f"{NAME} (the built-in demo task: {N_FACTS:,} synthetic key -> value facts to store, loss on "
               "the values)")
_KEY_LETTERS, _KEY_LEN = "nopqrstuvwxyz", 5


def facts() -> list[tuple[str, int]]:
    """The fixed fact table, sorted by key."""
    rng = random.Random(NAME)
    keys: set[str] = set()
    while len(keys) < N_FACTS:
        keys.add("".join(rng.choice(_KEY_LETTERS) for _ in range(_KEY_LEN)))
    return [(k, rng.randint(10, 99)) for k in sorted(keys)]


def _encoded_lines(tokenizer: Any, table: list[tuple[str, int]]) -> list[tuple[list[int], list[int]]]:
    """Ids of each ``? key: value\n`` line and its labels (the value's tokens; -100 elsewhere). Prompt, value
    and newline are tokenised apart (in one batched call each), so the value's tokens are known without
    offsets, for any tokenizer."""
    prompts = tokenizer([f"? {k}:" for k, _ in table], add_special_tokens=False)["input_ids"]
    values = tokenizer([f" {v}" for _, v in table], add_special_tokens=False)["input_ids"]
    newline = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    return [(list(p) + list(v) + newline, [-100] * len(p) + list(v) + [-100] * len(newline))
            for p, v in zip(prompts, values)]


def fact_rows(tokenizer: Any, seq_len: int, samples: int, rng: random.Random) -> list[tuple]:
    """``samples`` rows ``(input_ids, labels, attention_mask)`` of whole fact lines packed to ``seq_len``
    tokens (right-padded), facts drawn without repeats in ``rng``'s order while they last."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = facts()
    rng.shuffle(order)
    lines = _encoded_lines(tokenizer, order[: samples * seq_len])  # a line holds > 1 token: enough
    rows, at = [], 0
    while len(rows) < samples and at < len(lines):
        ids: list[int] = []
        labels: list[int] = []
        while at < len(lines):
            line_ids, line_labels = lines[at]
            if len(ids) + len(line_ids) > seq_len:
                break
            ids, labels, at = ids + line_ids, labels + line_labels, at + 1
        if not ids:
            raise ProbeError(f"seq_len={seq_len} is shorter than one fact line of {NAME}; raise seq_len")
        fill = seq_len - len(ids)
        rows.append((ids + [pad] * fill, labels + [-100] * fill, [1] * len(ids) + [0] * fill))
    warn_short(NAME, len(rows), samples)
    return rows
