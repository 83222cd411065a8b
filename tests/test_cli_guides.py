"""The CLI guides (issue 18 items 5 and 6): `--help` names the subcommands first, every command has
`--version`, `--data`'s help names every accepted form, chat records run on the built-in model, and
`--chat-template FILE` gives chat records to a model whose tokenizer has no template."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

import allocator
from allocator.commands.cli import main
from probes.settings import DataSettings, ProbeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops on a shared CPU
FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "-q"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"What does f({i}) return?"},
            {"role": "assistant", "content": f"def f(x): return x * {i}  # so f({i}) is {i * i}"},
        ]
    }
    for i in range(12)
]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _chat_file(folder: Path) -> Path:
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    return path


def _allocation(folder: Path) -> dict:
    return json.loads((folder / "allocation.json").read_text())


def test_help_names_the_subcommands_in_its_first_lines(capsys):
    first = _help(["--help"], capsys).splitlines()[:3]
    assert any(line.lstrip().startswith("allocate inspect") for line in first), first
    assert any(line.lstrip().startswith("allocate tune") for line in first), first


@pytest.mark.parametrize("command", [[], ["inspect"], ["tune"]])
def test_every_command_prints_its_version(command, capsys):
    assert _help([*command, "--version"], capsys).strip().endswith(f" {allocator.__version__}")


@pytest.mark.parametrize("command", [[], ["tune"]])
def test_data_help_names_every_accepted_form(command, capsys):
    text = " ".join(_help([*command, "--help"], capsys).split())  # argparse wraps the help
    data = text.split("--data DATA", 1)[1].split(" --", 1)[0]
    forms = (".txt", ".jsonl", "text", "chat messages", "prompt + completion", "datasets folder", "'builtin'")
    for form in forms:
        assert form in data, (form, data)


def test_switches_and_chat_template_in_help(capsys):
    text = _help(["--help"], capsys)
    assert "--solver-presolve, --no-solver-presolve" in text and not re.search(r"--presolve PRESOLVE", text)
    assert "--chat-template FILE" in text


def test_chat_records_run_on_the_built_in_model(tmp_path, capsys):
    assert main(["--data", str(_chat_file(tmp_path)), "-o", str(tmp_path / "out"), *FAST]) == 0
    assert capsys.readouterr().out.startswith("verdict ")
    assert _allocation(tmp_path / "out")["provenance"]["data_hash"]


def test_chat_template_file_for_a_model_without_one(saved_tiny_model, tiny_tokenizer, tmp_path, capsys):
    """The tiny model's tokenizer has no template: its chat records fail with the flag to give, and with
    ``--chat-template FILE`` give the plan of the same tokenizer carrying that template (API), which the
    caller's tokenizer object keeps unchanged."""
    model, chats = saved_tiny_model("qwen3_5"), _chat_file(tmp_path)
    assert not tiny_tokenizer.chat_template
    capsys.readouterr()  # the fixture's own output
    assert main([str(model), "--data", str(chats), "-o", str(tmp_path / "none"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no chat template" in err and "--chat-template FILE" in err, err

    template = tmp_path / "chat_template.jinja"
    template.write_text(TEMPLATE)
    argv = [str(model), "--data", str(chats), "--chat-template", str(template), "--budget", "r4", *FAST]
    assert main([*argv, "-o", str(tmp_path / "cli")]) == 0
    cli = _allocation(tmp_path / "cli")
    digest = hashlib.sha256(TEMPLATE.encode()).hexdigest()[:16]
    assert cli["provenance"]["chat_template"] == f"sha256:{digest}"
    assert cli["provenance"]["config"]["values"]["chat_template"] == str(template)

    tokenizer = tiny_tokenizer.__class__.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    plan = allocator.allocate(
        str(model),
        str(chats),
        "r4",
        tokenizer=tokenizer,
        probe_settings=ProbeSettings(progress=False),
        data_settings=DataSettings(samples=4, seq_len=32, batch_size=2),
    )
    assert plan.provenance["data_hash"] == cli["provenance"]["data_hash"]
    assert allocator.Plan.load(tmp_path / "cli").ranks == plan.ranks

    other = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    (tmp_path / "other.jinja").write_text(other)
    replaced = allocator.allocate(
        str(model),
        str(chats),
        "r4",
        tokenizer=tokenizer,
        chat_template=tmp_path / "other.jinja",
        probe_settings=ProbeSettings(progress=False),
        data_settings=DataSettings(samples=4, seq_len=32, batch_size=2),
    )
    assert replaced.provenance["data_hash"] != plan.provenance["data_hash"]  # the file's template was used
    assert tokenizer.chat_template == TEMPLATE  # on a copy: the caller's tokenizer keeps its own
