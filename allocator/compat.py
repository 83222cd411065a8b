"""Every use of a third-party library's private internals, in one place, each with the version it was written
against: when a new PEFT or transformers changes one of them, this module is where the project breaks and
where it is mended. The architecture tables (``allocator.discovery.architectures``) read PEFT's own rules
through it.

- :func:`peft_refuses`: PEFT 0.21, ``peft.tuners.tuners_utils._check_lora_target_modules_mamba`` (private).
- :func:`peft_rewrites`: PEFT 0.21 with transformers 5.24, ``peft.utils.transformers_weight_conversion.
  convert_peft_config_for_transformers`` (a public function of an internal module; its rules are private).

Elsewhere, each with a comment: ``allocator.tuning.storage`` reads Optuna's schema and ``study._storage``
(Optuna 4-5; the storage adapter is the only Optuna-touching code), and ``probes.runner`` sets transformers'
``_gradient_checkpointing_func`` (transformers 5.24; ``probes`` never imports ``allocator``).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace


def peft_refuses(model_type: str | None, leaf: str) -> str | None:
    """PEFT's own refusal of this target for this model type, as a reason; None if PEFT accepts it.

    Asks ``peft.tuners.tuners_utils._check_lora_target_modules_mamba`` itself (out_proj/conv1d on falcon_h1,
    mamba, mamba2, falcon_mamba, nemotron_h in PEFT 0.21), so a newer PEFT's list is honoured.
    """
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # an older or newer PEFT without the guard
        return None
    fake_model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
    try:
        check(SimpleNamespace(peft_type="LORA"), fake_model, leaf)
    except ValueError:
        return f"PEFT refuses '{leaf}' on model_type '{model_type}' (_check_lora_target_modules_mamba)"
    return None


@functools.cache
def peft_rewrites(model_type: str | None, leaf: str) -> str | None:
    """PEFT's rewrite of a ``target_modules`` entry ending in ``.leaf`` on this model type, as a reason; None
    if PEFT keeps the entry as written.

    With transformers v5, ``BaseTuner.inject_adapter`` passes every LoRA config, including one read by
    ``LoraConfig.from_pretrained``, through ``peft.utils.transformers_weight_conversion.
    convert_peft_config_for_transformers``. For model types on the ``qwen2_moe``/``mixtral`` conversion
    pattern (qwen3_next, qwen3_moe, deepseek_v3, glm4_moe, minimax, ...) ``_convert_peft_config_moe`` turns
    every list target ending in ``.gate_proj``/``.up_proj``/``.down_proj``/``.gate`` (``.w1``/``.w2``/``.w3``)
    into the bare expert parameter name (``gate_up_proj``, ``down_proj``, ``gate.weight``) in
    ``target_parameters``, even the full name of a shared-expert or dense-MLP linear, doubles the rank of
    fused pairs and raises when only one of a pair is named. Such a linear is exported as the parameter
    ``<name>.weight`` instead (``Component.peft_name``), which PEFT leaves alone."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers as convert
    except ImportError:  # transformers < 5, or a PEFT without the conversion
        return None
    target = f"model.layers.0.mlp.{leaf}"
    config = LoraConfig(target_modules=[target])
    reason = (f"PEFT rewrites a target ending in '.{leaf}' on model_type '{model_type}' into expert "
              "target_parameters (convert_peft_config_for_transformers)")
    try:
        convert(config, SimpleNamespace(config=SimpleNamespace(model_type=model_type)), None)
    except ValueError:  # "Cannot convert PEFT target(s) gate_proj without also targeting up_proj"
        return reason
    return None if set(config.target_modules or ()) == {target} and not config.target_parameters else reason
