"""probes.load_batches: every source, determinism, and the errors that name their fix."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from probes import ProbeError, ProbeWarning, data_fingerprint, load_batches
from probes.testing import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _check_shapes(batches, n_rows, seq_len, batch_size):
    assert sum(b["input_ids"].shape[0] for b in batches) == n_rows
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] == seq_len and b["input_ids"].shape[0] <= batch_size
        assert all(t.dtype == torch.long for t in b.values())
        assert torch.all(b["labels"][b["attention_mask"] == 0] == -100)


def test_builtin_corpus_is_packed_and_deterministic_under_seed(tok):
    a = load_batches("builtin", tok, seq_len=64, samples=6, batch_size=4, seed=1)
    b = load_batches("builtin", tok, seq_len=64, samples=6, batch_size=4, seed=1)
    c = load_batches("builtin", tok, seq_len=64, samples=6, batch_size=4, seed=2)
    _check_shapes(a, 6, 64, 4)
    assert [x["input_ids"].shape[0] for x in a] == [4, 2]
    assert data_fingerprint(a) == data_fingerprint(b) != data_fingerprint(c)
    assert all(torch.equal(x["labels"], x["input_ids"]) and bool(x["attention_mask"].all()) for x in a)


def test_plain_text_file_is_packed_into_windows(tok, tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("alpha beta gamma\n" * 200, encoding="utf-8")
    batches = load_batches(path, tok, seq_len=32, samples=5, batch_size=2)
    _check_shapes(batches, 5, 32, 2)
    text = tok.decode(batches[0]["input_ids"][0])
    assert "beta" in text


def test_a_file_longer_than_the_tokenizer_maximum_loads_without_its_indexing_warning(tmp_path, capfd):
    """transformers warns that a text longer than ``model_max_length`` "will result in indexing errors"; the
    text is cut into ``seq_len`` windows, so the warning is wrong here and must not reach the user."""
    short = byte_tokenizer()
    short.model_max_length = 64
    path = tmp_path / "long.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 40)
    assert len(load_batches(str(path), short, seq_len=32, samples=4, batch_size=2)) == 2
    assert "indexing errors" not in capfd.readouterr().err


def test_jsonl_text_records_are_padded_with_masked_labels(tok, tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl", [{"text": "short one"}, {"text": "x" * 100}, {"body": "b", "text": "z z"}]
    )
    batches = load_batches(path, tok, seq_len=16, samples=3, batch_size=2)
    _check_shapes(batches, 3, 16, 2)
    mask = torch.cat([b["attention_mask"] for b in batches])
    assert sorted(mask.sum(1).tolist()) == [4, 10, 16]  # EOS appended (as TRL), truncated or padded
    ids = torch.cat([b["input_ids"] for b in batches])
    assert torch.all(ids[mask == 0] == tok.pad_token_id)


def test_prompt_response_records_take_loss_on_response_only(tok, tmp_path):
    path = _write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Q: 1+1?", "response": " 2"}])
    (batch,) = load_batches(path, tok, seq_len=24, samples=1)
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    n_prompt = len(tok("Q: 1+1?")["input_ids"])
    assert torch.all(labels[:n_prompt] == -100)
    assert labels[n_prompt : n_prompt + 3].tolist() == ids[n_prompt : n_prompt + 3].tolist()  # " 2" + eos
    assert labels[n_prompt + 2].item() == tok.eos_token_id and torch.all(labels[n_prompt + 3 :] == -100)


def test_chat_records_take_loss_on_assistant_turns_when_asked(tok, tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (batch,) = load_batches(path, tok, seq_len=64, samples=1, assistant_only_loss=True)
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(kept) == "yo<eos>"
    (batch,) = load_batches(path, tok, seq_len=64, samples=1)  # TRL's default: loss on every token
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(kept) == "<|user|>hi<eos><|assistant|>yo<eos>"
    user_only = _write_jsonl(tmp_path / "user.jsonl", [{"messages": msgs[:1]}])
    with pytest.raises(ProbeError, match="record 0 .* has no assistant turn"):
        load_batches(user_only, tok, seq_len=64, samples=1, assistant_only_loss=True)
    unmarked = byte_tokenizer()
    unmarked.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ProbeError, match=r"marks assistant turns with \{% generation %\}"):
        load_batches(path, unmarked, seq_len=64, samples=1, assistant_only_loss=True)
    with pytest.raises(ProbeError, match="no chat template"):
        load_batches(path, byte_tokenizer(chat_template=False), seq_len=64, samples=1)


def test_json_list_file_is_read_as_records(tok, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two two"}]), encoding="utf-8")
    batches = load_batches(path, tok, seq_len=8, samples=2)
    assert sorted(batches[0]["attention_mask"].sum(1).tolist()) == [4, 8]  # with EOS, as TRL


def test_fewer_sequences_than_samples_warns(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.warns(ProbeWarning, match="fewer than samples=8"):
        batches = load_batches(path, tok, seq_len=8, samples=8)
    assert sum(b["input_ids"].shape[0] for b in batches) == 2


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        (None, ".txt", "not found"),
        ("", ".txt", "is empty"),
        ("   \n", ".txt", "is empty"),
        ("tiny", ".txt", "fewer than one sequence of seq_len=64"),
        ("", ".jsonl", "is empty"),
        ('{"prompt": "' + "p" * 80 + '", "response": "r"}\n', ".jsonl", "every label in .* is masked"),
        ('{"other": 1}\n', ".jsonl", "record 0 .* has none of 'text'"),
        ("{not json\n", ".jsonl", "not valid JSON"),
    ],
)
def test_bad_input_raises_one_line_error_naming_the_fix(tok, tmp_path, content, suffix, match):
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ProbeError, match=match) as info:
        load_batches(path, tok, seq_len=64, samples=2)
    assert "\n" not in str(info.value)


def test_datasets_folder_without_datasets_names_the_install(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ProbeError, match="pip install datasets"):
        load_batches(tmp_path, tok)


def test_settings_are_checked(tok):
    for kwargs in ({"seq_len": 1}, {"samples": 0}, {"batch_size": -1}):
        with pytest.raises(ProbeError):
            load_batches("builtin", tok, **kwargs)


def test_fingerprint_sees_every_tensor():
    base = [{"input_ids": torch.arange(6).view(2, 3), "labels": torch.arange(6).view(2, 3)}]
    changed = [{"input_ids": torch.arange(6).view(2, 3), "labels": torch.tensor([[0, 1, 2], [3, 4, -100]])}]
    assert data_fingerprint(base) == data_fingerprint([dict(base[0])]) != data_fingerprint(changed)


def test_token_batches_pass_through_in_order_padded_and_rebatched(tok, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    loaded = load_batches(str(text), tok, seq_len=16, samples=6, batch_size=4, seed=3)
    # seed: token batches keep order
    again = load_batches(loaded, tok, seq_len=16, samples=6, batch_size=4, seed=99)
    assert data_fingerprint(again) == data_fingerprint(loaded)
    rebatched = load_batches(loaded, tok, seq_len=16, samples=5, batch_size=2)
    _check_shapes(rebatched, 5, 16, 2)
    assert torch.equal(
        torch.cat([b["input_ids"] for b in rebatched]), torch.cat([b["input_ids"] for b in loaded])[:5]
    )
    # 1-D rows as lists, no labels: labels = ids, rows padded (masked) or truncated to seq_len
    rows = load_batches(
        [{"input_ids": [5, 6, 7]}, {"input_ids": list(range(10, 30))}],
        tok,
        seq_len=8,
        samples=2,
        batch_size=4,
    )
    _check_shapes(rows, 2, 8, 4)
    assert rows[0]["labels"][0].tolist() == [5, 6, 7] + [-100] * 5
    assert rows[0]["input_ids"][1].tolist() == list(range(10, 18))
    # given labels (a prompt masked out) and attention masks are kept
    masked = load_batches(
        [{"input_ids": [[1, 2, 3, 4]], "labels": [[-100, -100, 3, 4]], "attention_mask": [[1, 1, 1, 1]]}],
        tok,
        seq_len=4,
        samples=1,
    )
    assert masked[0]["labels"].tolist() == [[-100, -100, 3, 4]]


@pytest.mark.parametrize(
    "source, match",
    [
        ([{"ids": [1, 2]}], "has no 'input_ids'"),
        ([[1, 2, 3]], "not a mapping"),
        ([{"input_ids": [[0.5, 1.5]]}], "integer ids"),
        ([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}], "no sequence has a loss token"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], "labels has shape"),
    ],
)
def test_bad_token_batches_name_the_fix(tok, source, match):
    with pytest.raises(ProbeError, match=match):
        load_batches(source, tok, seq_len=4, samples=1)


def test_token_batches_are_described_by_count_and_fingerprint(tok):
    from probes import describe_source

    batches = [{"input_ids": torch.arange(8).reshape(2, 4)}]
    text = describe_source(batches)
    assert text.startswith("<2 tokenised sequences in 1 batches, sha256 ")
    assert describe_source([{"input_ids": torch.arange(8).reshape(2, 4) + 1}]) != text
    assert describe_source("builtin") == "builtin"
