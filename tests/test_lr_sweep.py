"""The lr sweep (``benchmarks.lr_sweep``) on the smoke grid's settings: real fine-tunes of the tiny reference
model, scored on a validation split that never overlaps the placement benchmark's eval windows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from allocator.errors import AllocatorError
from allocator.reference import reference_model_path
from benchmarks import lr_sweep, tasks
from benchmarks.grid import read_rows
from benchmarks.placement_run import _spread

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer():
    try:
        path = reference_model_path("qwen3_5_tiny")
    except AllocatorError:
        pytest.skip("reference model qwen3_5_tiny not built (python -m benchmarks.zoo --only qwen3_5_tiny)")
    return AutoTokenizer.from_pretrained(path)


def test_validation_windows_are_disjoint_from_eval_windows():
    tokenizer = _tokenizer()
    _, files = tasks.domain_files()
    evals = torch.cat([b["input_ids"] for b in _spread(tokenizer, files, 64)])
    validation = torch.cat([b["input_ids"] for b in _spread(tokenizer, files, 64, between=True)])
    assert evals.shape == (64, 128) and validation.shape == (63, 128)
    seen = {tuple(row.tolist()) for row in evals}
    assert not any(tuple(row.tolist()) in seen for row in validation)


def test_sweep_runs_each_lr_and_marks_the_best(tmp_path):
    _tokenizer()
    out = tmp_path / "out"
    assert lr_sweep.main(["--smoke", "--models", "qwen3_5_tiny", "--condition", "uniform", "--lrs",
                          "0.001,0.01", "--seeds", "1", "--out", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]) == 0
    rows = read_rows(out / "lr_sweep_runs.csv")
    assert sorted((r["budget"], r["lr"]) for r in rows) == [(b, lr) for b in ("r1", "r16", "r4")
                                                           for lr in ("0.001", "0.01")]
    losses = {(r["budget"], r["lr"]): float(r["validation_loss"]) for r in rows}
    assert len(set(losses.values())) == len(losses)  # the lr reaches the run
    text = (out / "lr_sweep.md").read_text()
    best = min(("0.001", "0.01"), key=lambda lr: losses[("r4", lr)])
    assert f"uniform qwen3_5_tiny r4: {best}" in text
    with pytest.raises(SystemExit):  # throwaway smoke numbers never overwrite docs/results
        lr_sweep.main(["--smoke", "--models", "qwen3_5_tiny"])


def test_instruction_task_takes_the_fact_tasks_lr_rule():
    """Lowest validation loss among the lrs that raise retention by less than 0.5 nats over the base."""
    def row(lr, validation, retention):
        return {"condition": "uniform", "model": "m", "budget": "r4", "lr": lr, "seed": "0",
                "validation_loss": validation, "retention_loss": retention, "base_retention_loss": "3.5"}

    rows = [row("0.004", "2.0", "3.7"), row("0.008", "1.5", "3.9"), row("0.016", "1.0", "4.1")]
    assert lr_sweep.chosen_lr(rows, "uniform", "m", "r4", "instruction") == "0.008"
    assert lr_sweep.chosen_lr(rows, "uniform", "m", "r4", "text_domain") == "0.016"  # no retention rule
