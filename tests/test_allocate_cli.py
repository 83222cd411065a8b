"""End to end: `allocate` arguments -> files -> a PeftModel whose trainable parameters equal the plan's
cost."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from allocator.commands.cli import main

HYBRIDS = (
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_next",
    "olmo_hybrid",
    "falcon_h1",
    "bamba",
    "granitemoehybrid",
    "nemotron_h",
    "jamba",
    "zamba",
    "zamba2",
    "lfm2",
    "lfm2_moe",
    "kimi_linear",
    "bailing_hybrid",
    "minimax",
    "recurrent_gemma",
)
FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "--quiet"]


def _forward_backward(model) -> None:
    ids = torch.randint(4, 128, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_cli_plan_applies_with_exact_trainable_params(
    model_type, saved_tiny_model, corpus_file, tmp_path, capsys
):
    folder = saved_tiny_model(model_type)
    out = tmp_path / "plan"
    code = main([str(folder), "--data", str(corpus_file), "--budget", "r2", "-o", str(out), *FAST])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "wrote" in printed.out and "family" in printed.out
    allocation = json.loads((out / "allocation.json").read_text())
    assert 0 < allocation["cost"] <= allocation["budget"]

    config = LoraConfig.from_pretrained(str(out))
    assert config.base_model_name_or_path == str(folder)
    model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    peft_model = get_peft_model(model, config)  # PEFT's own path, without this package: the planned count
    assert peft_model.get_nb_trainable_parameters()[0] == allocation["cost"]
    _forward_backward(peft_model)


def test_cli_summary_and_report_name_every_family(saved_tiny_model, corpus_file, tmp_path, capsys):
    folder = saved_tiny_model("falcon_h1")
    out = tmp_path / "plan"
    assert main([str(folder), "--data", str(corpus_file), "--budget", "r4", "-o", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    for family in ("attention", "recurrent", "mlp"):
        assert family in printed
    report = (out / "report.md").read_text()
    assert "By family" in report and "By layer" in report and "uniform config of equal cost" in report
    assert (out / "heatmap.png").stat().st_size > 1000


def test_same_inputs_give_byte_identical_allocation(saved_tiny_model, corpus_file, tmp_path):
    folder = saved_tiny_model("qwen3_5")
    outs = []
    for i in range(2):
        out = tmp_path / f"plan{i}"
        assert main([str(folder), "--data", str(corpus_file), "--budget", "r2", "-o", str(out), *FAST]) == 0
        data = json.loads((out / "allocation.json").read_text())
        data["provenance"].pop("wall_time_s", None)
        outs.append(data)
    assert outs[0]["modules"] == outs[1]["modules"]


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["tune", "--help"]])
def test_help_teaches_by_example(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "example" in capsys.readouterr().out.lower()


def test_token_batches_give_the_plan_of_the_file_they_came_from(
    saved_tiny_model, corpus_file, tiny_tokenizer
):
    """Data already tokenised by the caller (``allocate(data=batches)``) is probed as is: the batches that
    ``probes.load_batches`` draws from a file give that file's plan, rank for rank (without the warm-up, whose
    rows differ by design: another draw from a file, the rows after the calibration ones from batches)."""
    import allocator
    import probes
    from probes.settings import DataSettings

    folder = saved_tiny_model("qwen3_5")
    settings = DataSettings(seq_len=32, samples=4, batch_size=2)
    quiet = probes.ProbeSettings(progress=False, warmup_steps=0)
    from_file = allocator.allocate(
        str(folder), data=str(corpus_file), budget="r4", data_settings=settings, probe_settings=quiet
    )
    batches = probes.load_batches(str(corpus_file), tiny_tokenizer, seq_len=32, samples=4, batch_size=2)
    from_batches = allocator.allocate(
        str(folder), data=batches, budget="r4", data_settings=settings, probe_settings=quiet
    )
    assert from_batches.ranks == from_file.ranks and from_batches.cost == from_file.cost
    assert from_batches.provenance["data_hash"] == from_file.provenance["data_hash"]
    assert len(from_file.provenance["data_hash"]) == 64  # the batches' sha256 (probes.data_fingerprint)
    assert from_batches.provenance["data"].startswith("<4 tokenised sequences in 2 batches, sha256 ")
    shuffled = allocator.allocate(
        str(folder), data=batches[::-1], budget="r4", data_settings=settings, probe_settings=quiet
    )  # other data: another fingerprint
    assert shuffled.provenance["data_hash"] != from_file.provenance["data_hash"]
