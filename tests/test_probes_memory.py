"""Probe state (probes/memory.py): counted from shapes on the meta device, checked against a real run, and
within 10% of the bf16 weight bytes on the dense reference configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import probes
import probes.runner
from probes.memory import probe_state, weight_bytes
from probes.testing import linear_names, random_batches, tiny_model

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
DENSE = {
    "Qwen3.5-27B": "qwen3_5__Qwen__Qwen3.5-27B.json",
    "Bamba-9B": "bamba__ibm-fms__Bamba-9B.json",
    "Nemotron-H-56B": "nemotron_h__nvidia__Nemotron-H-56B-Base-8K.json",
}


def _probed(config: str):
    """(meta model, the module names `allocate` probes: eligible components, routed experts left out)."""
    from allocator.discovery.components import find_components
    from allocator.discovery.modelio import load_skeleton

    model = load_skeleton(str(CONFIGS / config))
    names = [c.name for c in find_components(model) if c.eligible and not c.is_parameter]
    return model, names


@pytest.mark.parametrize("label", list(DENSE))
def test_probe_state_is_at_most_a_tenth_of_the_bf16_weights(label):
    model, names = _probed(DENSE[label])
    state = probe_state(model, names)
    fraction = state.total / weight_bytes(model, 2)
    assert state.n_sketched > 0.5 * len(names)
    assert fraction <= 0.10, f"{label}: probe state {state.total / 2**30:.1f} GiB = {fraction:.3f} of bf16"
    assert probe_state(model, names, probes.ProbeSettings(grad_sketch="exact")).total > 4 * state.total


@pytest.mark.parametrize("mode", ["sketch", "exact"])
def test_probe_state_counts_what_a_run_holds(mode, monkeypatch):
    """The shape-only count equals the bytes of the accumulators and test matrices a real run allocated."""
    torch.manual_seed(0)
    model = tiny_model("qwen3_5", layers=2)
    names = linear_names(model)
    settings = probes.ProbeSettings(
        progress=False, max_rank=8, grad_sketch=mode, sketch_threshold=48, sketch_dim=16
    )
    held = {}
    real = probes.runner.finalize_all

    def record(probe_list, prober, *args):
        acts = {id(p.act): p.act for p in probe_list if p.act is not None}
        held["bytes"] = (
            sum(p.grad.n_bytes for p in probe_list)
            + sum(a.n_bytes for a in acts.values())
            + prober.n_test_matrix_bytes
        )
        return real(probe_list, prober, *args)

    monkeypatch.setattr(probes.runner, "finalize_all", record)
    probes.run(model, random_batches(2, seed=0), names, settings)
    assert probe_state(model, names, settings).total == held["bytes"]
