"""One flag vocabulary and config files (issue 17 items 2-3): a setting has one name in `allocate` and
`allocate tune`, the name follows from the API name by the documented rule, old names work for one release
with a note, booleans are switches, and a config file gives the plan the same flags give."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import allocator
from allocator.commands import _options
from allocator.commands import allocate as allocate_command
from allocator.commands import tune as tune_command
from allocator.commands.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "--quiet"]


def _keys(module) -> dict[str, str]:
    module.build_parser()
    return dict(_options.KEYS)


def _print_config(argv: list[str], capsys) -> tuple[str, str]:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_a_setting_has_the_same_flag_in_allocate_and_tune():
    alloc, tune = _keys(allocate_command), _keys(tune_command)
    shared = alloc.keys() & tune.keys()
    assert {"data.seq_len", "probes.max_rank", "solver.granularity", "utility.family_priors",
            "lora.init", "revision"} <= shared
    assert {k: alloc[k] for k in shared} == {k: tune[k] for k in shared}
    for keys in (alloc, tune):  # one key per flag: no name means two things
        assert len(set(keys.values())) == len(keys)


def test_flags_follow_the_documented_rule():
    """--PREFIX-FIELD for a settings field, the group's prefix from the table; the rule's exceptions are the
    run arguments and the data sources."""
    for module in (allocate_command, tune_command):
        keys = _keys(module)
        for key, flag in keys.items():
            group, _, name = key.rpartition(".")
            if group and not name.endswith("source"):
                prefix = _options.GROUPS[group].prefix
                assert flag == f"--{prefix + '-' if prefix else ''}{name.replace('_', '-')}", key
            elif not group:
                assert flag == f"--{name.replace('_', '-')}", key
    assert _keys(tune_command)["tune.granularity"] == "--tune-granularity"  # the search space ...
    assert _keys(tune_command)["solver.granularity"] == "--solver-granularity"  # ... and the base value


def test_old_names_work_with_one_note_naming_the_new_flag(capsys):
    new, _ = _print_config(["--data-seq-len", "32", "--solver-presolve", "--use-rslora", "-o", "x"], capsys)
    old, err = _print_config(["--seq-len", "32", "--presolve", "true", "--rslora", "--output", "x",
                              "--seq-len", "32"], capsys)
    assert old == new
    notes = err.strip().splitlines()
    assert notes == [
        "note: --seq-len is deprecated and goes in the next release; use --data-seq-len",
        "note: --presolve true is deprecated and goes in the next release; use --solver-presolve",
        "note: --rslora is deprecated and goes in the next release; use --use-rslora",
        "note: --output is deprecated and goes in the next release; use --out-dir",
    ]  # once each, though --seq-len was given twice
    tune_new, _ = _print_config(["tune", "--tune-trials", "9", "--tune-granularity", "module",
                                 "--tune-batch-size", "2", "--study-name", "s"], capsys)
    tune_old, err = _print_config(["tune", "--trials", "9", "--granularity", "module", "--batch-size", "2",
                                   "--study", "s"], capsys)
    assert tune_old == tune_new and err.count("note:") == 4 and "use --tune-granularity" in err


def test_booleans_are_switches_and_version_prints(capsys):
    on, _ = _print_config(["--solver-presolve", "--no-probe-progress", "--no-fused-kernels"], capsys)
    assert "presolve: true" in on and "progress: false" in on and "fused_kernels: false" in on
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"allocate {allocator.__version__}"


def test_help_puts_the_most_used_options_first_and_groups_the_rest(capsys):
    for argv in (["--help"], ["tune", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        sections = re.findall(r"(?m)^(\S[^\n]*):\n", text)
        assert sections[0] == "most used options", sections
        first = text.split("most used options:\n", 1)[1].split("\n\n", 1)[0]
        assert 8 <= len(re.findall(r"(?m)^  (?:-|model)", first)) <= 14
        assert {"run", "calibration data (config: data)", "probes (config: probes)"} <= set(sections)
        assert text.index("examples:") > text.index("probes (config: probes)")
        assert "--no-solver-presolve" in text and "--version" in text


def test_cli_message_names_the_new_flags():
    allocate_command.build_parser()
    assert _options.cli_message("set ProbeSettings(skip_nonfinite=True)") == "set --probe-skip-nonfinite"
    assert _options.cli_message("DataSettings.seq_len must be") == "--data-seq-len must be"
    assert _options.cli_message("pass retention_data, or data.") == "pass --retention-data, or data."
    tune_command.build_parser()
    assert _options.cli_message("TuneSettings.granularity 'x'") == "--tune-granularity 'x'"


def _plan(out) -> dict:
    data = json.loads((out / "allocation.json").read_text())
    data["provenance"]["config"].pop("file")
    data["provenance"]["config"]["values"].pop("out_dir")
    return data


def test_a_config_file_gives_the_plan_the_same_flags_give(saved_tiny_model, corpus_file, tmp_path, capsys):
    model = str(saved_tiny_model("qwen3_5"))
    flags = [model, "--data", str(corpus_file), "--budget", "r4", "--solver-granularity", "module",
             "--solver-share-bounds", "attention=0.1:0.6", "--probe-max-rank", "8", "--alpha-ratio", "1.5",
             *FAST]
    assert main([*flags, "-o", str(tmp_path / "by-flags")]) == 0
    printed, _ = _print_config(flags, capsys)
    (tmp_path / "plan.yaml").write_text(printed)
    assert main(["--config", str(tmp_path / "plan.yaml"), "-o", str(tmp_path / "by-file")]) == 0
    by_flags, by_file = _plan(tmp_path / "by-flags"), _plan(tmp_path / "by-file")
    assert by_file["modules"] == by_flags["modules"] and by_file["cost"] == by_flags["cost"]
    assert by_file["provenance"]["config"] == by_flags["provenance"]["config"]
    recorded = by_file["provenance"]["config"]["values"]
    assert recorded["solver"]["granularity"] == "module" and recorded["lora"]["alpha_ratio"] == 1.5
    # JSON works too, and a flag overrides the file
    config = {"model": model, "budget": "r2", "data": {"source": str(corpus_file), "seq_len": 32,
                                                        "samples": 4, "batch_size": 2}}
    (tmp_path / "plan.json").write_text(json.dumps(config))
    assert main(["--config", str(tmp_path / "plan.json"), "--budget", "r4", "-q", "-o",
                 str(tmp_path / "json")]) == 0
    overridden = _plan(tmp_path / "json")
    assert overridden["provenance"]["budget_spec"] == "r4"
    assert overridden["provenance"]["config"]["values"]["data"]["seq_len"] == 32
    capsys.readouterr()


def test_the_cli_page_names_every_flag():
    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for module in (allocate_command, tune_command):
        for flag in _keys(module).values():
            assert f"`{flag}`" in page, flag
