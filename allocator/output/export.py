"""Stage 5: ranks -> a PEFT ``LoraConfig`` that ``get_peft_model`` takes unchanged.

PEFT matches ``target_modules`` (as a list) by exact name or ``.suffix``, and
``rank_pattern``/``alpha_pattern`` keys as the regex ``(.*\\.)?(KEY)$``, first match wins
(``peft.utils.other.get_pattern_key``). We therefore list exactly the modules with rank > 0 by their full
names and key both patterns by the escaped full name, so no key can match another module (``model.layers.1.``
never matches ``model.layers.11.``). :func:`check_matching` replays PEFT's own matching to prove it.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from allocator.discovery.component import Component
from allocator.errors import AllocatorError, InputError


def _pattern_key(name: str) -> str:
    return re.escape(name)


def check_alpha_ratio(alpha_ratio: Any) -> float:
    """``alpha_ratio`` as a float, or an :class:`InputError`: it must be a finite number > 0."""
    if isinstance(alpha_ratio, bool) or not isinstance(alpha_ratio, (int, float)) or not (
            math.isfinite(alpha_ratio) and alpha_ratio > 0):
        raise InputError(f"alpha_ratio must be a finite number > 0, got {alpha_ratio!r}; try 1 or 2")
    return float(alpha_ratio)


def lora_config_kwargs(
    ranks: Mapping[str, int],
    components: Sequence[Component],
    *,
    alpha_ratio: float = 2.0,
    use_rslora: bool = False,
    rslora_alpha: float | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of a ``peft.LoraConfig`` for ``ranks`` (module or parameter name -> rank).

    Alpha: by default ``alpha = alpha_ratio * r`` per module, so the LoRA scale alpha/r is the same everywhere
    and ranks change capacity, not step size. With ``use_rslora`` PEFT scales by alpha/sqrt(r) and one alpha
    (``rslora_alpha``, default ``alpha_ratio * median rank``) is used for every module.
    """
    alpha_ratio = check_alpha_ratio(alpha_ratio)
    by_name = {c.name: c for c in components}
    unknown = sorted(set(ranks) - set(by_name))
    if unknown:
        raise AllocatorError(f"ranks name modules the model does not have: {unknown[:5]}")
    chosen = {name: int(r) for name, r in sorted(ranks.items()) if int(r) > 0}
    if not chosen:
        raise AllocatorError("the allocation gives every module rank 0; raise the budget")
    as_parameter = {n for n in chosen if by_name[n].is_parameter or by_name[n].export_as_parameter}
    modules = [n for n in chosen if n not in as_parameter]
    parameters = [by_name[n].peft_name for n in chosen if n in as_parameter]
    common_rank = Counter(chosen.values()).most_common(1)[0][0]
    rank_pattern = {_pattern_key(by_name[n].peft_name): r for n, r in chosen.items()}
    if use_rslora:
        ranks_sorted = sorted(chosen.values())
        alpha = float(
            rslora_alpha if rslora_alpha is not None else alpha_ratio * ranks_sorted[len(ranks_sorted) // 2]
        )
        alpha_pattern: dict[str, float] = {}
    else:
        alpha = alpha_ratio * common_rank
        alpha_pattern = {_pattern_key(by_name[n].peft_name): alpha_ratio * r for n, r in chosen.items()}
    kwargs: dict[str, Any] = {
        "r": common_rank,
        "lora_alpha": alpha,
        "target_modules": modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if parameters:
        kwargs["target_parameters"] = parameters
    if base_model_name_or_path is not None:
        kwargs["base_model_name_or_path"] = base_model_name_or_path
    return kwargs


def to_lora_config(ranks: Mapping[str, int], components: Sequence[Component], **options: Any):
    """Build the ``peft.LoraConfig``; ``options`` are those of :func:`lora_config_kwargs` plus any LoraConfig
    field (``lora_dropout``, ``init_lora_weights``, ...) passed through unchanged."""

    own = {k: options.pop(k) for k in list(options) if k in _OWN_OPTIONS}
    kwargs = lora_config_kwargs(ranks, components, **own)
    overlap = sorted(
        set(options) & {"target_modules", "rank_pattern", "alpha_pattern", "r", "target_parameters"}
    )
    if overlap:
        raise InputError(f"{overlap} are set by the plan; pass only other LoraConfig fields")
    kwargs.update(options)
    refused = [k for k in ("lora_dropout", "use_dora", "lora_bias") if options.get(k)]
    if refused and kwargs.get("target_parameters"):
        params = kwargs["target_parameters"]
        raise InputError(
            f"PEFT adapts {params[0]} and {len(params) - 1} more as parameters "
            f"(target_parameters, lora.ParamWrapper), which refuses "
            f"{refused[0]}={options[refused[0]]!r}; leave it unset"
        )
    base = kwargs.pop("base_model_name_or_path", None)
    if not kwargs["target_modules"]:
        kwargs["target_modules"] = None  # PEFT needs None, not [], when only parameters are targeted
    config = LoraConfig(**kwargs)
    config.base_model_name_or_path = base
    return config


_OWN_OPTIONS = ("alpha_ratio", "use_rslora", "rslora_alpha", "base_model_name_or_path")


def check_matching(config: Any, ranks: Mapping[str, int], all_module_names: Sequence[str]) -> None:
    """Replay PEFT's own matching: every chosen module is targeted with its own rank, and nothing else is.

    Raises ``AllocatorError`` naming the first mismatch; used by tests and by ``Plan.to_lora_config``.
    """

    chosen = {n: r for n, r in ranks.items() if r > 0}
    targets = set(config.target_modules or ())
    for name in all_module_names:
        hit = bool(check_target_module_exists(config, name))
        if hit != (name in targets):
            raise AllocatorError(f"PEFT would {'target' if hit else 'skip'} {name!r} against the plan")
    for name in targets:
        key = get_pattern_key(list(config.rank_pattern), name)
        if config.rank_pattern.get(key) != chosen[name]:
            raise AllocatorError(
                f"PEFT would give {name!r} rank {config.rank_pattern.get(key)}, plan says {chosen[name]}"
            )


def get_peft_model_quietly(model: Any, config: Any) -> Any:
    """``peft.get_peft_model`` without two warnings that say nothing about the user's run: transformers'
    rename of ``is_gradient_checkpointing`` (PEFT reads the old name), and PEFT's memory advice for its own
    EVA pass (a plan with ``init="eva"`` records EVA in the config, but its directions come from
    ``allocator.output.lora_init``)."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*eva initialization used with low_cpu_mem_usage.*")
        if getattr(config, "target_parameters", None):  # PEFT 0.21 checks pattern keys against
            # target_modules only, yet applies them to target_parameters (lora_A has r * n_experts rows)
            warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
        return get_peft_model(model, config)


def adapted_shape(model: Any, name: str, is_parameter: bool) -> tuple[int, int, int] | None:
    """(n_experts, d_in, d_out) of the module or 3-D parameter ``name`` as a LoRA there sees it; None if
    absent."""

    if is_parameter:
        owner_name, _, leaf = name.rpartition(".")
        owner = dict(model.named_modules(remove_duplicate=False)).get(owner_name)
        param = getattr(owner, leaf, None) if owner is not None else None
        if not isinstance(param, nn.Parameter) or param.dim() not in (2, 3):
            return None
        if param.dim() == 2:
            return 1, int(param.shape[1]), int(param.shape[0])
        n, a, b = (int(v) for v in param.shape)
        return (n, a, b) if getattr(owner, "is_transposed", False) else (n, b, a)
    module = dict(model.named_modules(remove_duplicate=False)).get(name)
    if isinstance(module, nn.Linear):
        return 1, module.in_features, module.out_features
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return 1, int(d_in), int(d_out)
    return None


def snapshot_base_model(model: Any) -> dict[str, Any]:
    """What ``get_peft_model`` (and EVA's pass) change on the model: attributes, ``requires_grad`` flags,
    modes."""
    return {
        "attrs": set(vars(model)),
        "flags": [(p, p.requires_grad) for p in model.parameters()],
        "modes": [(m, m.training) for m in model.modules()],
    }


def restore_base_model(model: Any, snapshot: dict[str, Any]) -> None:
    """Undo a (possibly half-done) ``get_peft_model`` on ``model``: every LoRA layer PEFT swapped in is
    replaced by the module it wrapped, attributes PEFT added are removed and ``requires_grad`` flags
    restored."""

    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    # innermost first (nested wrappers)
    for name, layer in sorted(swapped, key=lambda item: -item[0].count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if getattr(parent, child, None) is layer:
            setattr(parent, child, layer.get_base_layer())
    for key in set(vars(model)) - snapshot["attrs"]:
        delattr(model, key)
    for param, flag in snapshot["flags"]:
        param.requires_grad_(flag)
    for module, training in snapshot["modes"]:
        module.training = training
