"""`allocate inspect` on every reference config: fast, correct table, parseable --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from allocator.commands import inspect as command

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
KINDS = {
    "qwen3_5__Qwen__Qwen3.5-0.8B.RECONSTRUCTED.json": {
        "attention/softmax",
        "recurrent/gated_deltanet",
        "mlp/dense",
    },
    "qwen3_5__Qwen__Qwen3.5-27B.json": {"attention/softmax", "recurrent/gated_deltanet", "mlp/dense"},
    "qwen3_5_moe__Qwen__Qwen3.5-35B-A3B.json": {
        "attention/softmax",
        "recurrent/gated_deltanet",
        "moe/expert",
        "moe/shared_expert",
    },
    "qwen3_next__Qwen__Qwen3-Next-80B-A3B-Thinking.json": {
        "attention/softmax",
        "recurrent/gated_deltanet",
        "moe/expert",
        "moe/shared_expert",
    },
    "falcon_h1__tiiuae__Falcon-H1-0.5B.RECONSTRUCTED.json": {
        "attention/softmax",
        "recurrent/mamba2",
        "mlp/dense",
    },
    "jamba__ai21labs__Jamba-v0.1.json": {"attention/softmax", "recurrent/mamba", "mlp/dense", "moe/expert"},
    "zamba2__Zyphra__Zamba2-2.7B-Instruct-v2.PARTIAL.json": {
        "attention/softmax",
        "recurrent/mamba2",
        "mlp/dense",
    },
    "bamba__ibm-fms__Bamba-9B.json": {"attention/softmax", "recurrent/mamba2", "mlp/dense"},
    "nemotron_h__nvidia__Nemotron-H-56B-Base-8K.json": {"attention/softmax", "recurrent/mamba2", "mlp/dense"},
    "nemotron_h__nvidia__NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json": {
        "attention/softmax",
        "recurrent/mamba2",
        "moe/expert",
        "moe/shared_expert",
    },
    "lfm2__LiquidAI__LFM2-350M.MIRROR.json": {"attention/softmax", "recurrent/short_conv", "mlp/dense"},
    "kimi_linear__moonshotai__Kimi-Linear-48B-A3B-Instruct.RECONSTRUCTED.json": {
        "attention/mla",
        "recurrent/kda",
        "mlp/dense",
        "moe/expert",
        "moe/shared_expert",
    },
    "recurrent_gemma__google__recurrentgemma-2b-it.MIRROR.json": {
        "attention/softmax",
        "recurrent/rglru",
        "mlp/dense",
    },
    "minimax__MiniMaxAI__MiniMax-Text-01.CONVERTED.json": {
        "attention/softmax",
        "recurrent/lightning",
        "moe/expert",
    },
}
REFUSED = {
    "zamba2__Zyphra__Zamba2-1.2B.LEGACY-4f8e85cd.json": "pre-integration Zyphra config",
    "minimax_text_01__MiniMaxAI__MiniMax-Text-01.RECONSTRUCTED.json": "not built into transformers",
}


def test_every_fixture_config_is_covered():
    assert set(KINDS) | set(REFUSED) == {p.name for p in CONFIGS.glob("*.json")}


def kind_rows(text: str) -> set[str]:
    """family/kind labels of the 'per kind' table."""
    block = text.split("\nper kind\n", 1)[1].split("\ntotal offered", 1)[0]
    return {line.split()[0] for line in block.splitlines()[1:]}


@pytest.mark.parametrize("filename", sorted(KINDS))
def test_inspect_prints_each_reference_config_within_ten_seconds(filename, capsys):
    start = time.perf_counter()
    assert command.main([str(CONFIGS / filename)]) == 0
    assert time.perf_counter() - start < 10
    out = capsys.readouterr().out
    assert kind_rows(out) == KINDS[filename]
    assert "per layer: modules / LoRA parameters per rank unit" in out and "uniform rank 16" in out


@pytest.mark.parametrize("filename", sorted(KINDS))
def test_inspect_json_parses_and_its_totals_add_up(filename, capsys):
    assert command.main([str(CONFIGS / filename), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    eligible = [
        c
        for c in report["components"]
        if c["lora_effective"] and c["default_target"] and c["tied_to"] is None
    ]
    per_rank = sum(c["n_experts"] * (c["d_in"] + c["d_out"]) for c in eligible)
    assert (
        report["totals"]["params_per_rank"]
        == per_rank
        == sum(r["params_per_rank"] for r in report["per_kind"])
    )
    assert {f"{r['family']}/{r['kind']}" for r in report["per_kind"]} == KINDS[filename]
    assert len(report["per_layer"]) == report["n_layers"]


def test_default_model_is_the_built_in_qwen3_5_config_with_the_study_numbers(capsys):
    assert command.main([]) == 0
    out = capsys.readouterr().out
    assert "qwen3_5-0.8b.config.json (built-in): Qwen3_5ForCausalLM" in out
    for row in (
        "attention/softmax  6  24  67,584  1,081,344",
        "recurrent/gated_deltanet  18  90  277,056  4,432,896",
        "4,432,896",
        "mlp/dense  24  72  331,776  5,308,416",
    ):
        assert _squeezed(row) in _squeezed(out)


def _squeezed(text: str) -> str:
    return " ".join(text.split())


def test_layer_table_merges_runs_of_identical_layers(capsys):
    command.main([])
    out = capsys.readouterr().out
    assert _squeezed("0-2 - 5 / 15,392 3 / 13,824") in _squeezed(out)
    assert _squeezed("3 4 / 11,264 - 3 / 13,824") in _squeezed(out)


def test_not_effective_modules_are_listed_with_their_reason(capsys):
    command.main([str(CONFIGS / "falcon_h1__tiiuae__Falcon-H1-0.5B.RECONSTRUCTED.json")])
    out = capsys.readouterr().out
    assert "not effective, never offered: 36 modules" in out
    assert "36 x model.layers.*.mamba.out_proj (recurrent/mamba2): bypassed with fused kernels" in out


def test_no_fused_kernels_flag_relaxes_fused_only_bypasses(capsys):
    command.main([str(CONFIGS / "bamba__ibm-fms__Bamba-9B.json"), "--json"])
    fused = json.loads(capsys.readouterr().out)["totals"]["n_not_effective"]
    command.main([str(CONFIGS / "bamba__ibm-fms__Bamba-9B.json"), "--json", "--no-fused-kernels"])
    relaxed = json.loads(capsys.readouterr().out)["totals"]["n_not_effective"]
    assert (fused, relaxed) == (29, 0)  # bamba is not on PEFT's refusal list


@pytest.mark.parametrize("filename,message", sorted(REFUSED.items()))
def test_unusable_configs_print_one_error_line_and_exit_2(filename, message, capsys):
    assert command.main([str(CONFIGS / filename)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_missing_model_exits_2(tmp_path, capsys):
    assert command.main([str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.startswith("error: no such file or folder")


def test_help_teaches_by_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "allocate inspect ./my-model --json" in out and "built-in" in out


def test_cli_entry_point_dispatches_inspect():
    result = subprocess.run(
        [sys.executable, "-m", "allocator.commands.cli", "inspect", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["params_per_rank"] == 676_416
