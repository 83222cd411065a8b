"""Every causal LM transformers ships, built on the meta device: find_components never crashes, and for the
families the allocator claims to know no decoder-layer linear is left "other" and nothing is guessed.

Hybrid families and pure SSMs use their tiny config from tests/tiny_models.py (some defaults do not build);
everything else uses its default config on the meta device, which costs no memory. A family the allocator
knows must build: its build failure is a test failure, never a skip. Other build failures are skipped (and
counted in pytest's summary).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import TINY, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from allocator.discovery.architectures import ARCHITECTURES
from allocator.discovery.components import find_components
from allocator.errors import AllocatorWarning

# Pure transformers (and MoE transformers) the allocator is checked against, on top of the architecture table.
KNOWN_TRANSFORMERS = {
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
    "olmo2", "granite", "opt", "falcon", "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2",
    "deepseek_v3", "gpt_oss", "granitemoe", "llama4_text", "glm4_moe", "olmoe", "minicpm3", "longcat_flash",
}
KNOWN = set(ARCHITECTURES) | set(TINY) | KNOWN_TRANSFORMERS | {"qwen3_5_text", "qwen3_5_moe_text"}
MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build_on_meta(model_type: str) -> torch.nn.Module:
    base = model_type.removesuffix("_text")
    config = tiny_config(base) if base in TINY else AutoConfig.for_model(model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_every_known_family_is_a_causal_lm_of_this_transformers():
    assert KNOWN <= set(MODEL_TYPES) | {"qwen3_5_text", "qwen3_5_moe_text"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_decoder_layer_linears_of_known_families_are_never_other(model_type):
    known = model_type in KNOWN
    try:
        model = build_on_meta(model_type)
    except Exception as exc:  # needs timm, remote code, or a default config that does not validate
        if known:
            raise
        pytest.skip(f"{model_type} does not build from its default config: {type(exc).__name__}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AllocatorWarning)
        components = find_components(model)
    in_stack = [c for c in components if c.layer is not None]
    assert components and in_stack, f"{model_type}: no decoder stack found"
    if not known:
        return
    other = [c.name for c in in_stack if c.family == "other" or c.kind == "unknown"]
    assert not other, f"{model_type}: left 'other': {other[:5]}"
    guesses = [str(w.message) for w in caught if issubclass(w.category, AllocatorWarning)]
    assert not guesses, f"{model_type}: structural guesses: {guesses}"
    n_linear = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules(remove_duplicate=False))
    assert sum(not c.is_parameter and c.module_class != "Conv1D" for c in components) == n_linear
