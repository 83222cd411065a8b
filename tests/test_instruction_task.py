"""The instruction task (``benchmarks.instruction``): chat rows whose labels keep exactly the assistant turn,
disjoint splits, and exact match scored on those labels."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from allocator.errors import AllocatorError
from allocator.reference import reference_model_path
from benchmarks import instruction as ins
from benchmarks import tasks


@pytest.fixture(scope="module")
def tokenizer():
    try:
        path = reference_model_path("qwen3_5_tiny")
    except AllocatorError:
        pytest.skip("reference model qwen3_5_tiny not built (python -m benchmarks.zoo --only qwen3_5_tiny)")
    return AutoTokenizer.from_pretrained(path)


def test_labels_keep_the_assistant_answer_and_nothing_else(tokenizer):
    rows = ins.conversations("train", seed=1, n_rows=48)
    assert {k for k, _, _ in rows} == set(ins.KINDS)  # every kind drawn
    (batch,) = ins.chat_batches(tokenizer, rows, batch_size=48)
    for r, (kind, user, answer) in enumerate(rows):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        kept = (labels != -100).nonzero().flatten()
        assert kept.numel() and torch.equal(kept, torch.arange(kept[0], kept[-1] + 1))  # one contiguous span
        assert torch.equal(labels[kept], ids[kept])
        assert tokenizer.decode(labels[kept]) == answer + tokenizer.eos_token  # the answer and its EOS
        text = tokenizer.decode(ids[batch["attention_mask"][r].bool()])
        assert user in text and text.index(user) < text.rindex(answer)  # the prompt is in, unlabelled
        assert ins.KINDS[int(batch["kind"][r])] == kind


def test_splits_are_disjoint_and_every_fact_is_asked_in_each(tokenizer):
    train = ins.conversations("train", seed=0, n_rows=4000)
    held = {s: ins.conversations(s, per_kind=None) for s in ("validation", "eval")}
    users = {"train": {u for _, u, _ in train}, **{s: {u for _, u, _ in rows} for s, rows in held.items()}}
    assert not users["train"] & users["validation"]
    assert not users["train"] & users["eval"] and not users["validation"] & users["eval"]
    capitals = {c for _, c in ins.country_table()}
    for rows in (train, *held.values()):  # the same facts everywhere: what is learnt is the table itself
        assert {a for k, _, a in rows if k == "lookup"} == capitals
    for phrasing in ins.LOOKUP_PHRASINGS:  # every phrasing is trained, on other countries than it is scored
        stem = phrasing.split("{}")[0] or phrasing.split("{}")[1]
        assert any(stem in u for k, u, _ in train if k == "lookup")
    assert ins.conversations("train", seed=0, n_rows=50) == train[:50]  # deterministic under the seed
    assert ins.conversations("train", seed=1, n_rows=50) != train[:50]
    a = tasks.TASKS["instruction"](tokenizer, seed=0, n_train=8, n_eval=5, batch_size=4)
    b = tasks.TASKS["instruction"](tokenizer, seed=5, n_train=8, n_eval=5, batch_size=4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.eval_batches, b.eval_batches))
    assert sum(len(x["input_ids"]) for x in a.eval_batches) == ins.N_COUNTRIES + 5  # every fact, 5 skill rows


class _Oracle(torch.nn.Module):
    """Logits whose argmax is the true next token of the row (``input_ids`` shifted)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.w = vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float() + self.w})()


def test_exact_match_needs_every_answer_token(tokenizer):
    rows = ins.conversations("eval", per_kind=4)
    batches = ins.chat_batches(tokenizer, rows, batch_size=8)
    oracle = _Oracle(len(tokenizer))
    scores = ins.answer_scores(oracle, batches)
    assert scores["instruction_accuracy"] == 1.0 and {f"match_{k}" for k in ins.KINDS} <= set(scores)
    losses = [scores[f"answer_loss_{k}"] for k in ins.KINDS]  # the oracle's logits: one-hot, margin 1
    assert all(x == pytest.approx(losses[0]) for x in losses) and 0 < losses[0] < math.log(len(tokenizer))
    wrong = [dict(b) for b in batches]  # one answer token of the first row replaced: that row misses
    labels = wrong[0]["labels"].clone()
    pos = int((labels[0] != -100).nonzero()[0])
    labels[0, pos] = (labels[0, pos] + 1) % len(tokenizer)
    wrong[0]["labels"] = labels
    scores = ins.answer_scores(oracle, wrong)
    assert scores["instruction_accuracy"] == pytest.approx(1 - 1 / len(rows))
    assert scores[f"match_{rows[0][0]}"] < 1.0
