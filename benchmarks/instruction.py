"""The instruction task: chat rows with the loss on the assistant turn only, the format TRL's ``SFTTrainer``
trains on (``messages``, ``assistant_only_loss``), generated deterministically.

Each row is one user turn and one assistant turn, tokenised by :func:`probes.formats.encode_record` (the
probes' and TRL's tokenisation: the tokenizer's chat template, the assistant tokens marked by its ``{%
generation %}`` block; the reference models' template marks the answer and its EOS). Kinds of request:

- string transformations of 3-5 letters spelt with spaces (reverse, uppercase, sort) and small arithmetic
  (``a+b``, a one-digit step from a number below 90; ``a*b`` from the table 2..19 x 2..9): skills, scored on
  items never trained on;
- ``lookup``: the capital of one of ``N_COUNTRIES`` made-up countries, a table that exists nowhere but in the
  train rows, so it must be stored in the weights (where a LoRA's capacity binds).

Splits are disjoint as conversations: words and number pairs are split by a hash of the item (80% train,
10% validation, 10% eval); every fact is asked in every split, but each country's question in a phrasing of
its own per split (the eval and validation phrasings of a country never occur in its train rows, and every
phrasing is trained on other countries). Scored by answer loss (mean token loss over the assistant tokens,
EOS included) and exact match: the teacher-forced argmax equals every assistant token (cheaper than greedy
decoding and deterministic; an answer that is right but does not stop counts as wrong), overall and per
kind.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence
from typing import Any

import torch

from allocator.tuning.finetune import evaluate_loss
from benchmarks.taskdef import Batch, Task
from probes.formats import IGNORE_INDEX, RecordFormat, encode_record

KINDS = ("lookup", "reverse", "uppercase", "sort", "add", "mul")
# The capitals: words the reference tokenizer (trained on Python sources) keeps as one token, so an answer is
# one token and its EOS, as the fact task's values are
CAPITALS = ("Base", "Codec", "Context", "Decimal", "Decoder", "Encoder", "Error", "Exception", "File",
            "Handler", "Implemented", "Incremental", "Name", "Reader", "Return", "Set", "Stream", "Test",
            "Type", "Writer", "Int", "Par", "Pro", "Cont")
N_COUNTRIES = len(CAPITALS)
SPLITS = ("train", "validation", "eval")
# half the train rows ask the table (each fact about 27 times in a 40-step run of 32 rows; the fact task's
# 20), the rest spread evenly over the skills
TRAIN_WEIGHTS = (5, 1, 1, 1, 1, 1)
LOOKUP_PHRASINGS = (
    "What is the capital of {}?",
    "Name the capital city of {}.",
    "Which city is the capital of {}?",
    "{}: what is its capital?",
)
ASK = {
    "reverse": "Reverse the letters: {}",
    "uppercase": "Write in capital letters: {}",
    "sort": "Sort the letters: {}",
    "add": "What is {}+{}?",
    "mul": "What is {}*{}?",
}
FORMAT = RecordFormat(assistant_only_loss=True)
# Letters a reference tokenizer keeps whole, alone and after a space, in both cases: the skills' words are
# spelt with spaces ("k e l o"), so each transformation acts on whole tokens
LETTERS = "abcdefghijklmnoprstvwxyz"
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeio"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _split_of(item: str) -> str:
    """``train`` / ``validation`` / ``eval`` by a hash of the item: stable whatever else is drawn."""
    bucket = int(hashlib.sha256(item.encode()).hexdigest(), 16) % 10
    return "eval" if bucket == 0 else "validation" if bucket == 1 else "train"


@functools.cache
def country_table() -> tuple[tuple[str, str], ...]:
    """The made-up (country, capital) pairs, one per capital; no country repeats. Independent of every
    seed."""
    rng = random.Random("instruction-table")
    countries: list[str] = []
    while len(countries) < N_COUNTRIES:
        country = _word(rng, 3).capitalize() + rng.choice(("ia", "land", "stan", "or"))
        if country not in countries:
            countries.append(country)
    capitals = list(CAPITALS)
    rng.shuffle(capitals)
    return tuple(zip(countries, capitals))


@functools.cache
def _items(kind: str, split: str) -> tuple[Any, ...]:
    """The items of a skill in one split, in a fixed order: 3-5 letter strings, or (a, b) pairs."""
    if kind in ("reverse", "uppercase", "sort"):
        rng = random.Random("instruction-words")
        pool: list[Any] = sorted({"".join(rng.choices(LETTERS, k=rng.randint(3, 5))) for _ in range(8000)})
    elif kind == "add":  # a one-digit step from a number below 90
        pool = [(a, b) for a in range(90) for b in range(1, 10)]
    else:  # the small multiplication table
        pool = [(a, b) for a in range(2, 20) for b in range(2, 10)]
    return tuple(x for x in pool if _split_of(f"{kind}:{x}") == split)


def _qa(kind: str, item: Any) -> tuple[str, str]:
    """(user turn, assistant answer) of a skill item; letters spelt with spaces."""
    if kind in ("reverse", "uppercase", "sort"):
        out = {"reverse": item[::-1], "uppercase": item.upper(), "sort": "".join(sorted(item))}[kind]
        return ASK[kind].format(" ".join(item)), " ".join(out)
    a, b = item
    return ASK[kind].format(a, b), str(a + b if kind == "add" else a * b)


def _lookup(index: int, split: str, variant: int) -> tuple[str, str]:
    """Country ``index``'s question: in its eval phrasing, its validation phrasing, or (train) one of the two
    others (``variant``)."""
    country, capital = country_table()[index]
    held = {"eval": index % len(LOOKUP_PHRASINGS), "validation": (index + 1) % len(LOOKUP_PHRASINGS)}
    if split in held:
        phrasing = held[split]
    else:
        phrasing = [p for p in range(len(LOOKUP_PHRASINGS)) if p not in held.values()][variant % 2]
    return LOOKUP_PHRASINGS[phrasing].format(country), capital


def conversations(split: str, *, seed: int = 0, n_rows: int | None = None,
                  per_kind: int | None = None) -> list[tuple[str, str, str]]:
    """``(kind, user, answer)`` rows of a split. ``train``: ``n_rows`` drawn by ``seed`` (kinds by
    ``TRAIN_WEIGHTS``, items with replacement); ``validation`` / ``eval``: every country once, then up to
    ``per_kind`` distinct items of each skill (all with None; fixed, independent of ``seed``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    items = {k: _items(k, split) for k in KINDS[1:]}
    if split == "train":
        if n_rows is None:
            raise ValueError("the train split needs n_rows")
        rng = random.Random(f"instruction-train-{seed}")
        rows = []
        for _ in range(n_rows):  # row by row, so fewer rows are a prefix of more
            (kind,) = rng.choices(KINDS, weights=TRAIN_WEIGHTS)
            if kind == "lookup":
                rows.append((kind, *_lookup(rng.randrange(N_COUNTRIES), split, rng.randrange(2))))
            else:
                rows.append((kind, *_qa(kind, rng.choice(items[kind]))))
        return rows
    rng = random.Random(f"instruction-{split}")
    rows = [("lookup", *_lookup(i, split, 0)) for i in range(N_COUNTRIES)]
    for kind in KINDS[1:]:
        chosen = rng.sample(items[kind], min(per_kind or len(items[kind]), len(items[kind])))
        rows += [(kind, *_qa(kind, x)) for x in chosen]
    return rows


def chat_batches(tokenizer: Any, rows: Sequence[tuple[str, str, str]], batch_size: int) -> list[Batch]:
    """Rows tokenised by :func:`probes.formats.encode_record` (assistant-only loss), right-padded to the
    longest of their batch; ``kind`` holds each row's index in ``KINDS``."""
    encoded = []
    for i, (kind, user, answer) in enumerate(rows):
        record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        ids, labels = encode_record(record, i, tokenizer, FORMAT, "the instruction task")
        encoded.append((ids, labels, KINDS.index(kind)))
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batches.append({
            "input_ids": _padded([ids for ids, _, _ in chunk], tokenizer.pad_token_id),
            "attention_mask": _padded([[1] * len(ids) for ids, _, _ in chunk], 0),
            "labels": _padded([lab for _, lab, _ in chunk], IGNORE_INDEX),
            "kind": torch.tensor([k for _, _, k in chunk]),
        })
    return batches


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


@torch.no_grad()
def answer_scores(model: torch.nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Exact match, the share of rows whose every assistant token is the teacher-forced argmax
    (``instruction_accuracy`` overall, ``match_<kind>`` per kind present), and each kind's answer loss
    (``answer_loss_<kind>``, nats per assistant token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: dict[int, list[bool]] = {}
    loss: dict[int, list[float]] = {}  # kind -> [summed loss, tokens]
    try:
        for b in batches:
            logits = model(input_ids=b["input_ids"].to(device),
                           attention_mask=b["attention_mask"].to(device)).logits[:, :-1].float().cpu()
            target = b["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
            ok = ((logits.argmax(-1) == target) | (target == IGNORE_INDEX)).all(-1)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none",
                                                    ignore_index=IGNORE_INDEX).sum(-1)
            for kind, hit, row_loss, n in zip(b["kind"].tolist(), ok.tolist(), nll.tolist(),
                                              (target != IGNORE_INDEX).sum(-1).tolist()):
                hits.setdefault(kind, []).append(hit)
                acc = loss.setdefault(kind, [0.0, 0])
                acc[0], acc[1] = acc[0] + row_loss, acc[1] + n
    finally:
        model.train(was_training)
    every = [h for v in hits.values() for h in v]
    out = {"instruction_accuracy": sum(every) / len(every)}
    out.update({f"match_{KINDS[k]}": sum(v) / len(v) for k, v in sorted(hits.items())})
    out.update({f"answer_loss_{KINDS[k]}": total / n for k, (total, n) in sorted(loss.items())})
    return out


def instruction_task(tokenizer: Any, *, seed: int = 0, n_train: int = 4096, n_eval: int | None = 64,
                     batch_size: int = 16, split: str = "eval") -> Task:
    """``n_train`` train conversations drawn by ``seed``; scored on ``split`` (``eval``, or ``validation`` to
    choose settings on): all ``N_COUNTRIES`` facts and ``n_eval`` skill rows (split evenly over the skills;
    every item with None)."""
    if split not in ("eval", "validation"):
        raise ValueError(f"split must be 'eval' or 'validation', got {split!r}")
    train = chat_batches(tokenizer, conversations("train", seed=seed, n_rows=n_train), batch_size)
    per_kind = None if n_eval is None else max(1, n_eval // (len(KINDS) - 1))
    evals = chat_batches(tokenizer, conversations(split, per_kind=per_kind), batch_size)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {**answer_scores(model, evals), "instruction_loss": evaluate_loss(model, evals)}

    return Task(
        "instruction",
        f"chat rows, loss on the assistant turn: lookups over {N_COUNTRIES} made-up capitals (in the "
        "weights), string transformations and small arithmetic; answer loss and exact match",
        tuple(train),
        tuple(evals),
        evaluate,
    )
