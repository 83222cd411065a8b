"""Right-padded batches reach the model without their attention mask (probes.padding): exact for causal LMs.

Oracle: the same probe pass with the mask kept (the path every batch took before), on tiny models whose
padded-mask path works; rows of different lengths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build

import probes
import probes.padding as padding
from allocator.discovery.components import find_components

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = probes.ProbeSettings(progress=False, max_rank=8, warmup_steps=0)
LENGTHS = ((20, 9), (13, 5), (7, 16))
FIELDS = ("grad_sq_sum", "grad_norm_sum", "act_trace", "n_tokens")
CURVES = ("grad_singular_values", "act_eigenvalues", "heldout_capture")


def _batches(left: bool = False, seq: int = 20) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for lengths in LENGTHS:
        ids = torch.randint(3, 128, (len(lengths), seq), generator=gen)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            (mask[i, seq - n :] if left else mask[i, :n]).fill_(1)
        ids = ids.masked_fill(mask == 0, 0)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _probe(model, batches, monkeypatch, right_padded=None):
    """probes.run over every eligible module; ``right_padded`` forces the padding decision."""
    with monkeypatch.context() as patch:
        if right_padded is not None:
            patch.setattr(padding, "right_padded", lambda mask: right_padded)
        names = [c.name for c in find_components(model) if c.eligible]
        return probes.run(model, batches, names, SETTINGS)


def _worst_difference(a, b) -> float:
    worst = 0.0
    for name in a.names:
        x, y = a[name], b[name]
        assert x.status == y.status == "ok" and x.n_tokens == y.n_tokens
        for f in FIELDS:
            worst = max(worst, abs(getattr(x, f) - getattr(y, f)) / max(abs(getattr(y, f)), 1e-30))
        for f in CURVES:
            u, v = np.asarray(getattr(x, f)), np.asarray(getattr(y, f))
            worst = max(worst, float(np.abs(u - v).max() / max(np.abs(v).max(), 1e-30)))
    return worst


def test_the_mask_is_dropped_only_for_right_padded_batches():
    model = build("qwen3_5").float()
    right, left = _batches()[0]["attention_mask"], _batches(left=True)[0]["attention_mask"]
    holes = torch.ones_like(right)
    holes[0, 3] = 0
    assert padding.model_mask(model, right) is None and padding.model_mask(model, None) is None
    assert padding.model_mask(model, left) is left and padding.model_mask(model, holes) is holes
    assert "attention_mask" not in padding.model_inputs(model, {"input_ids": right, "attention_mask": right})
    model.config.output_router_logits = True  # its load-balancing loss reads the mask
    assert padding.model_mask(model, right) is right


@pytest.mark.parametrize("model_type", ["qwen3_5", "falcon_h1", "qwen3_5_moe"])
def test_probe_statistics_without_the_mask_equal_those_with_it(model_type, monkeypatch):
    """Gated DeltaNet + attention, Mamba2 + attention, and routed experts: every statistic the same with the
    mask dropped as kept; on left-padded rows dropping it would change them (the comparison can fail)."""
    model = build(model_type).float()
    batches = _batches()
    dropped = _probe(model, batches, monkeypatch)
    kept = _probe(model, batches, monkeypatch, right_padded=False)
    assert _worst_difference(dropped, kept) < 1e-5
    left = _batches(left=True)
    forced = _probe(model, left, monkeypatch, right_padded=True)
    assert _worst_difference(forced, _probe(model, left, monkeypatch)) > 1e-3


@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_linear"])
def test_every_module_counts_the_real_tokens_only(model_type, monkeypatch):
    """MLA's latent reaches kv_b_proj as (B, 1, T, d): its pads are left out like everyone's (they were
    counted as real tokens before), so the statistics do not depend on whether the mask reaches the model."""
    model = build(model_type).float()
    batches = _batches()
    report = _probe(model, batches, monkeypatch)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    for name in report.names:
        stats = report[name]
        if stats.n_experts > 1:  # every real token routed to top-k experts
            assert stats.n_tokens == real * model.config.num_experts_per_tok, name
        else:
            assert stats.n_tokens * stats.n_batches == real * stats.n_calls, name
