"""Data-driven lora_A initialisation at a plan's ranks: EVA's or the gradient's directions, sliced per module.

Both start lora_A on directions measured once on calibration data at the plan's largest rank for every
target (no redistribution), each module taking its first ``r`` rows, and lora_B at zero, so the plan's ranks
and budget are exact and the adapted model starts equal to the base model. Expert weights adapted as
parameters (PEFT's ``target_parameters``, 3-D routed experts) keep PEFT's init under both: each expert reads
its own token subset, and no one input or gradient serves them.

- ``init="eva"``: PEFT's EVA components (``init_lora_weights="eva"``), the top principal directions of each
  target's input. EVA itself *redistributes* ranks (``rho > 1``), and even at ``rho = 1`` it equalises the
  candidates of modules that read the same input, so it can move a plan's ranks: here every candidate is kept.
  On the placement benchmark (``docs/method.md``), at uniform's best lr, it tied uniform on text and forgot
  more; on the fact-storing task, whose lr forgetting caps, it lowered the loss a lot, most with a placement
  chosen under it (``allocate tune --init eva``).
- ``init="gradient"``: the top right singular vectors of each module's calibration-loss weight gradient G
  (:func:`probes.gradient_subspace.gradient_subspaces`: one probe pass, sketched for wide modules, never a
  full gradient there). With B = 0 the first step's gradient on B is s G Aᵀ, so the first (SGD) update s ΔB
  A lies along U_r Σ_r V_rᵀ, the best rank-r approximation of full fine-tuning's first step: LoRA-GA's idea
  without changing the base weights, so PEFT's saved adapter is a standard LoRA. The rows are scaled to the
  row norm of PEFT's default (Kaiming-uniform) lora_A, so the effective step, and with it the lr, stays
  comparable with default LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from peft import EvaConfig, LoraConfig
from peft.tuners.lora.eva import get_eva_state_dict

from allocator.errors import AllocatorError, InputError, as_input_error
from allocator.output.settings import INITS
from probes.errors import ProbeError
from probes.gradient_subspace import gradient_subspaces
from probes.padding import model_inputs

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def check_init(init: str) -> str:
    if init not in INITS:
        raise InputError(f"unknown init {init!r}; choose one of {list(INITS)}")
    return init


def eva_components(model: Any, names: Sequence[str], batches: Iterable[Mapping[str, Any]], k: int, *,
                   use_label_mask: bool = True, show_progress: bool = False) -> dict[str, Any]:
    """``{name: (k, d_in) tensor}``: EVA's top ``k`` input principal directions of each module in ``names``.

    ``batches`` are the calibration micro-batches (dicts with ``input_ids``, ``attention_mask`` and, for
    ``use_label_mask``, ``labels``: only tokens that carry a loss count, as in PEFT's EVA). A module whose
    input has fewer than ``k`` usable directions raises :class:`InputError` (more calibration tokens are
    needed).
    """

    if k < 1 or not names:
        raise InputError("EVA init needs at least one target with rank >= 1")
    batches = [{key: b[key] for key in BATCH_KEYS if key in b} for b in batches]
    if not batches:
        raise InputError("EVA init needs calibration batches; pass init_data=probes.load_batches(...)")
    # PEFT skips a batch with fewer counted tokens than components, and cycles the data until every module has
    # converged: with no batch large enough it would loop forever
    largest = max(int(_token_mask(b, use_label_mask).sum()) for b in batches)
    if largest < k:
        raise InputError(f"EVA init at rank {k} needs a calibration batch with at least {k} tokens that "
                         f"{'carry a label' if use_label_mask else 'are attended'}; the largest has "
                         f"{largest}: use larger batches or longer sequences (--data-batch-size, "
                         "--data-seq-len), data with more such tokens (init_data, --init-data), or lower "
                         "ranks")
    config = LoraConfig(
        r=k,
        lora_alpha=2 * k,
        target_modules=list(names),
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=1.0, adjust_scaling_factors=False, use_label_mask=use_label_mask),
    )
    try:
        state = get_eva_state_dict(
            model,
            dataloader=batches,
            peft_config=config,
            show_progress_bar=show_progress,
            prepare_model_inputs_fn=lambda batch, _config: _token_mask(batch, use_label_mask),
            prepare_layer_inputs_fn=_counted_rows,
            forward_fn=lambda model, inputs: model(**model_inputs(model, inputs)),  # tokens: _token_mask
        )
    except ValueError as exc:  # PEFT: too few tokens for the components, non-converged layers
        raise InputError(f"EVA init failed: {exc}; use more calibration samples or a lower rank") from None
    missing = sorted(set(names) - set(state))
    short = sorted(n for n in names if n in state and state[n].shape[0] < k)
    if missing or short:
        raise InputError(
            f"EVA found fewer than {k} input directions for {(missing + short)[:3]}; use more "
            "calibration samples"
        )
    return state


def _token_mask(batch: Mapping[str, Any], use_label_mask: bool) -> Any:
    """``(batch, seq)`` bool: the tokens EVA's PCA sees, attended ones and with ``use_label_mask`` only
    labelled ones (as PEFT's ``prepare_model_inputs_fn_language_modeling``; -100 marks an unlabelled
    token)."""

    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if use_label_mask and "labels" in batch:
        mask = mask & (batch["labels"] != -100)
    return mask


def _counted_rows(layer_input: Any, mask: Any, layer_name: str) -> Any:
    """A module's input rows at the counted tokens. PEFT's own version indexes ``(batch, seq, d)`` inputs
    only; MoE blocks flatten tokens to ``(batch * seq, d)`` before their shared expert, in the same order."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
        return x[mask]
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    raise InputError(
        f"EVA cannot map the input of {layer_name} (shape {tuple(x.shape)}) to tokens of a "
        f"{tuple(mask.shape)} batch; use init 'default' for this model"
    )


def init_targets(components: Sequence[Any], ranks: Mapping[str, int]) -> dict[str, int]:
    """The planned modules a data-driven init starts: every adapted ``nn.Linear``. Expert weights adapted as
    parameters (PEFT's ``target_parameters``) read a different token subset per expert; they keep PEFT's
    init."""
    parameters = {c.name for c in components if c.is_parameter}
    return {n: r for n, r in ranks.items() if r > 0 and n not in parameters}


def kaiming_row_norm() -> float:
    """The row norm of PEFT's default lora_A: ``kaiming_uniform_(a=sqrt(5))`` draws U(-b, b), b = gain
    sqrt(3 / d_in) with gain = sqrt(2 / (1 + a²)) = sqrt(1/3), so E‖row‖² = d_in b² / 3 = gain², whatever
    d_in."""
    return torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))


def gradient_components(model: Any, names: Sequence[str], batches: Iterable[Mapping[str, Any]], k: int,
                        settings: Any = None) -> dict[str, Any]:
    """``{name: (k, d_in) tensor}``: the top ``k`` right singular vectors of each module's calibration-loss
    gradient (:func:`probes.gradient_subspace.gradient_subspaces`, ``settings`` its ``ProbeSettings``), each
    row scaled to :func:`kaiming_row_norm`. ``batches`` carry ``labels`` where only some tokens count (without
    them every attended token does)."""
    if k < 1 or not names:
        raise InputError("gradient init needs at least one target with rank >= 1")
    batches = list(batches)
    if not batches:
        raise InputError("gradient init needs calibration batches; pass init_data=probes.load_batches(...)")
    with as_input_error(ProbeError):
        vectors = gradient_subspaces(model, batches, list(names), k, settings)
    return {name: v * kaiming_row_norm() for name, v in vectors.items()}


def init_components(init: str, model: Any, names: Sequence[str], batches: Iterable[Mapping[str, Any]],
                    k: int) -> dict[str, Any]:
    """lora_A rows of ``init`` ("eva" or "gradient") for ``names`` at rank ``k``: ``{name: (k, d_in)}``."""
    if init == "eva":
        return eva_components(model, names, batches, k)
    if init == "gradient":
        return gradient_components(model, names, batches, k)
    raise InputError(f"init {init!r} takes no calibration data; use one of {list(INITS[1:])}")


def init_lora_a(
    peft_model: Any, components: Mapping[str, Any], ranks: Mapping[str, int], adapter_name: str = "default"
) -> None:
    """Copy the first ``ranks[name]`` rows of ``components[name]`` into lora_A of every planned module."""

    done = set()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            base = name.removeprefix("base_model.model.")
            if base in ranks and ranks[base] > 0 and adapter_name in getattr(module, "lora_A", {}):
                weight = module.lora_A[adapter_name].weight
                weight.copy_(components[base][: ranks[base]].to(weight.dtype))
                done.add(base)
    missing = sorted(n for n, r in ranks.items() if r > 0 and n not in done)
    if missing:
        raise AllocatorError(
            f"the lora_A init reached no lora_A for {missing[:3]}; the model lacks the planned modules"
        )
