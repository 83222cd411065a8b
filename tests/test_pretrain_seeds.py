"""The pretraining-seed comparison (``benchmarks.pretrain_seeds``): paired Δs against uniform under two sets
of reference-model weights, the shift between them and whether each verdict survives."""

from __future__ import annotations

import pytest

from benchmarks import pretrain_seeds


def _rows(losses: dict[str, list[float]]) -> list[dict]:
    return [{"model": "qwen3_5_tiny", "task": "text_domain", "budget": "r4", "condition": cond,
             "frontier": "", "seed": str(seed), "target_loss": str(v), "retention_loss": str(3.5 + v / 100)}
            for cond, values in losses.items() for seed, v in enumerate(values)]


def test_shift_and_verdicts_across_pretraining_seeds(tmp_path):
    uniform = [3.60, 3.62, 3.61]
    seed0 = _rows({"uniform": uniform, "mlp_only": [u + 0.05 for u in uniform],
                   "random": [u + d for u, d in zip(uniform, (0.01, -0.01, 0.0))]})
    # under the other weights mlp_only's loss to uniform halves and stays significant; random now loses
    # clearly
    seed1 = _rows({"uniform": [u + 0.2 for u in uniform], "mlp_only": [u + 0.2 + 0.025 for u in uniform],
                   "random": [u + 0.2 + d for u, d in zip(uniform, (0.03, 0.031, 0.029))]})
    deltas = pretrain_seeds.deltas(seed0, "target_loss")
    assert deltas[("qwen3_5_tiny", "text_domain", "r4", "mlp_only")].mean == pytest.approx(0.05)
    md = "\n".join(pretrain_seeds.compare(seed0, seed1, ("a", "b")))
    mlp = next(line for line in md.splitlines() if "| mlp_only |" in line)
    assert "-0.0250" in mlp and mlp.rstrip().endswith("| yes |")
    rand = next(line for line in md.splitlines() if "| random |" in line)
    assert rand.rstrip().endswith("| **no** |")  # indistinguishable -> worse than uniform
    assert "verdict changed in 1 of 2" in md
    assert "| uniform (absolute) |" in md and "+0.2000" in md
