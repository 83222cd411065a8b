"""Bad input: one clear line naming the fix, the right exit code, and nothing written or lost."""

from __future__ import annotations

import pytest

from allocator.commands.cli import main

FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "--quiet"]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    return code, errors


@pytest.fixture()
def model_dir(saved_tiny_model):
    return saved_tiny_model("qwen3_5")


def _assert_nothing_written(parent):
    leftovers = [p.name for p in parent.iterdir()]
    assert leftovers == [], leftovers


def test_unknown_model_id_offline(tmp_path, capsys, monkeypatch, corpus_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, errors = _run(
        ["no-such-org/no-such-model", "--data", corpus_file, "-o", tmp_path / "out", *FAST], capsys
    )
    assert code == 2 and len(errors) == 1
    assert "no-such-org/no-such-model" in errors[0] and "local folder" in errors[0]
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path, capsys, corpus_file):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, errors = _run([empty, "--data", corpus_file, "-o", tmp_path / "out", *FAST], capsys)
    assert code == 2 and len(errors) == 1 and "no config.json" in errors[0]
    assert not (tmp_path / "out").exists()


def test_empty_data_file(tmp_path, capsys, model_dir):
    data = tmp_path / "empty.txt"
    data.write_text("")
    code, errors = _run([model_dir, "--data", data, "-o", tmp_path / "out", *FAST], capsys)
    assert code == 2 and len(errors) == 1 and "empty" in errors[0].lower()
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tmp_path, capsys, model_dir):
    code, errors = _run([model_dir, "--data", tmp_path / "nope.jsonl", "-o", tmp_path / "out", *FAST], capsys)
    assert code == 2 and len(errors) == 1 and "nope.jsonl" in errors[0]


@pytest.mark.parametrize(
    "budget, needle",
    [
        ("lots", "accepted|use an absolute count"),
        ("r0", "positive"),
        ("1", "below|feasible|at least"),
        ("100B", "above|feasible|at most"),
    ],
)
def test_bad_budgets(tmp_path, capsys, model_dir, corpus_file, budget, needle):
    import re

    code, errors = _run(
        [model_dir, "--data", corpus_file, "--budget", budget, "-o", tmp_path / "out", *FAST], capsys
    )
    assert code == 2 and len(errors) == 1, errors
    assert re.search(needle, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", ["1", "100B"])
def test_infeasible_budget_fails_before_the_data_is_read(tmp_path, capsys, model_dir, budget):
    unreadable = tmp_path / "binary.txt"  # reading it would fail: the budget error must come first
    unreadable.write_bytes(b"\xff\xfe\x00binary")
    code, errors = _run(
        [model_dir, "--data", unreadable, "--budget", budget, "-o", tmp_path / "out", *FAST], capsys
    )
    assert code == 2 and len(errors) == 1 and "feasible range" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_unknown_family_in_share(tmp_path, capsys, model_dir, corpus_file):
    code, errors = _run(
        [
            model_dir,
            "--data",
            corpus_file,
            "--solver-share-bounds",
            "atention=0.1:0.5",
            "-o",
            tmp_path / "out",
            *FAST,
        ],
        capsys,
    )
    assert code == 2 and len(errors) == 1 and "atention" in errors[0] and "attention" in errors[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_dir_is_kept(tmp_path, capsys, model_dir, corpus_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    code, errors = _run([model_dir, "--data", corpus_file, "-o", out, *FAST], capsys)
    assert code == 2 and len(errors) == 1 and "already exists" in errors[0] and "did not write" in errors[0]
    assert (out / "adapter_config.json").read_text() == "{}"


def test_output_path_that_cannot_be_a_folder(tmp_path, capsys, model_dir, corpus_file):
    """Writable by nobody, root included: the parent of -o is a regular file."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, errors = _run([model_dir, "--data", corpus_file, "-o", blocker / "out", *FAST], capsys)
    assert code == 2 and len(errors) == 1 and "file.txt" in errors[0]
    assert blocker.read_text() == "x"


def test_malformed_option_is_a_usage_error(tmp_path, capsys, model_dir):
    code, errors = _run([model_dir, "--data-samples", "many", "-o", tmp_path / "out"], capsys)
    assert code == 2 and len(errors) == 1 and "--data-samples" in errors[0]
    assert not (tmp_path / "out").exists()


def test_unknown_flag_is_a_usage_error(tmp_path, capsys, model_dir):
    with pytest.raises(SystemExit) as exc:
        main([str(model_dir), "--budgte", "r4", "-o", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--budgte" in capsys.readouterr().err
