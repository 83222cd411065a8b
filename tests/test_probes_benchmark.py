"""Smoke test of benchmarks/probe_overhead.py: a seconds-long in-process run writes its markdown table, and
what it reports is what it measured: the smoke model's parameters, probed modules and tokens, ratios that are
the quotients of the two phases' measurements, memory in bytes, and the table printing those numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from probes import load_batches
from probes.testing import byte_tokenizer, tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_overhead.py"
MIB = 2**20


def test_probe_overhead_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("probe_overhead", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "probes.md"
    result = bench.main(["--smoke", "--out", str(out)])
    (title, rows), = result["sections"]
    (row,) = rows
    assert row["model"] == "qwen3_5-smoke" and row["repeats"] == 1
    # the model and batches measured are the smoke spec's: every nn.Linear but the LM head is probed
    family, overrides, (seq_len, samples, batch_size) = bench.SMOKE["qwen3_5-smoke"]
    model = tiny_model(family, **overrides)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    batches = load_batches("builtin", byte_tokenizer(), seq_len=seq_len, samples=samples,
                           batch_size=batch_size)
    assert row["n_params"] == sum(p.numel() for p in model.parameters())
    assert row["n_modules"] == len(linears) > 0
    assert row["n_batches"] == len(batches) and row["tokens"] == sum(int(b["attention_mask"].sum())
                                                                     for b in batches)
    plain, probes = row["plain"], row["probes"]
    # one repeat: each phase's median is its one run, each ratio the quotient of the two runs
    assert {k: v for k, v in row["walls"].items() if k in ("plain", "probes")} == {
        "plain": [plain["wall_s"]], "probes": [probes["wall_s"]]}
    assert row["cpus"]["plain"] == [plain["cpu_s"]] and row["cpus"]["probes"] == [probes["cpu_s"]]
    # the LoRA r16 comparison: each phase against the LoRA run of the same repeat
    lora = row["lora"]
    assert set(row["versus_lora"]) == {"probes", "plain", "probes-exact"}
    assert row["versus_lora"]["probes"]["wall_ratio"] == probes["wall_s"] / lora["wall_s"]
    assert row["versus_lora"]["probes"]["peak_ratio"] == probes["rss_peak"] / lora["rss_peak"]
    assert row["wall_ratio"] == probes["wall_s"] / plain["wall_s"] == row["min_wall_ratio"]
    assert row["cpu_ratio"] == probes["cpu_s"] / plain["cpu_s"]
    assert row["peak_ratio"] == probes["rss_peak"] / plain["rss_peak"]
    assert row["delta_ratio"] == ((probes["rss_peak"] - probes["rss_before"])
                                  / max(plain["rss_peak"] - plain["rss_before"], 1))
    for phase in (plain, probes):  # memory in bytes: the process holds at least the model's own weights
        assert phase["rss_peak"] >= phase["rss_before"] >= 4 * row["n_params"]
        assert phase["ru_maxrss"] >= 0.9 * phase["rss_peak"]  # the kernel's lifetime peak, in bytes too
    text = out.read_text()
    assert "nproc" in text and "--smoke" in text and f"## {title}" in text
    line, *lora_lines = [line for line in text.splitlines() if line.startswith("| qwen3_5-smoke |")]
    assert [row.split("|")[4].strip() for row in lora_lines] == ["probes", "plain", "probes-exact"]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == [
        "qwen3_5-smoke", f"{row['n_params'] / 1e6:.1f}M", str(len(linears)),
        f"{len(batches)} x {row['tokens'] // len(batches)}", f"{plain['wall_s']:.2f}",
        f"{probes['wall_s']:.2f}", f"**{row['wall_ratio']:.2f}**", f"{row['cpu_ratio']:.2f}",
        f"{plain['rss_peak'] / MIB:.0f}",
        f"{probes['rss_peak'] / MIB:.0f}", f"**{row['peak_ratio']:.2f}**", f"{row['delta_ratio']:.2f}"]
