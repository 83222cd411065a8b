"""The attention mask a causal LM is called with: none for right-padded batches.

The tool's own batches are right-padded (every row's real tokens first, :func:`probes.records.padded_row`, as
TRL's collator pads), with labels -100 on the pads. In a causal LM a real token at position t reads positions
<= t only, all of them real in such a row, so its output and its loss are the same with or without the mask;
pads after it change pad outputs only, which carry no loss and which the hooks leave out (they select tokens
by the batch's own mask, kept). Recurrent and convolutional mixers are causal as well: padding after the real
tokens cannot reach them. So every model is called without the mask on right-padded batches (one code path,
exact), which also avoids model-specific bugs in the padded-mask path: transformers' MLA attention
(kimi_linear, bailing_hybrid) repeats its keys by ``num_attention_heads // num_key_value_heads`` only when a
mask is given, a shape error on configs where the two differ.

Kept: a mask with a pad before a real token (left padding, holes), and any mask on models whose loss adds a
router auxiliary loss (``config.output_router_logits``): transformers' load-balancing loss reads the mask to
leave pads out. Probe statistics with the mask dropped equal those with it kept on every tiny model family
of the tests (docs/moe.md; ``tests/test_padding.py`` checks qwen3_5, falcon_h1, qwen3_5_moe); ``allocate``
runs end to end on kimi_linear and bailing_hybrid on padded rows (``tests/test_moe_experts.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row of ``mask`` (batch, seq) is its real tokens first, then pads only."""
    real = mask.bool()
    if real.dim() != 2:
        return False
    return bool((real[:, 1:] <= real[:, :-1]).all())  # no real token after a pad


def model_mask(model: nn.Module, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The ``attention_mask`` to call ``model`` with for a batch whose mask is ``mask``: None when the batch
    is right-padded (see the module docstring), else ``mask``."""
    if mask is None:
        return None
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        return mask
    return None if right_padded(mask) else mask


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` as keyword arguments for ``model``: the attention mask per :func:`model_mask`."""
    inputs = dict(batch)
    mask = model_mask(model, inputs.pop("attention_mask", None))
    if mask is not None:
        inputs["attention_mask"] = mask
    return inputs
