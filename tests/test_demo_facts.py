"""The built-in demo task ``builtin-facts`` (probes/facts.py): what ``make demo`` calibrates on."""

import re
import warnings

import pytest
from transformers import AutoTokenizer

import probes
from allocator.reference import ZOO_DIR
from probes import facts


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ZOO_DIR / "qwen3_5_tiny")


def test_labels_are_exactly_the_facts_values_and_rows_are_right_padded(tokenizer):
    batches = probes.load_batches("builtin-facts", tokenizer, seq_len=64, samples=6, batch_size=3)
    table = dict(facts.facts())
    seen = 0
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()  # right-padded
            assert (labels[n:] == -100).all()
            text = tokenizer.decode(ids[:n])
            pairs = re.findall(r"\? ([n-z]{5}): (\d+)", text)
            assert pairs and all(table[k] == int(v) for k, v in pairs)
            answers = tokenizer.decode(labels[labels != -100]).split()
            assert answers == [v for _, v in pairs]
            seen += len(pairs)
    assert seen >= 6 * 4  # several whole facts per 64-token row


def test_seed_picks_other_facts_and_the_source_is_labelled_as_the_demo(tokenizer):
    a = probes.load_batches("builtin-facts", tokenizer, seq_len=64, samples=2, batch_size=2, seed=0)
    b = probes.load_batches("builtin-facts", tokenizer, seq_len=64, samples=2, batch_size=2, seed=1)
    assert not (a[0]["input_ids"] == b[0]["input_ids"]).all()
    assert "demo task" in probes.describe_source("builtin-facts")
    assert probes.describe_source("builtin") == "builtin"


def test_too_short_a_sequence_names_the_fix_and_running_out_of_facts_warns(tokenizer):
    with pytest.raises(probes.ProbeError, match="raise seq_len"):
        probes.load_batches("builtin-facts", tokenizer, seq_len=3, samples=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = probes.load_batches("builtin-facts", tokenizer, seq_len=2048, samples=400, batch_size=100)
    assert sum(len(b["input_ids"]) for b in rows) < 400
    assert any("fewer than samples" in str(w.message) for w in caught)
