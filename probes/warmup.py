"""Probes at a warmed-up point: a few AdamW steps of uniform LoRA first, then :func:`probes.run` on the base
layers of the adapted model, then the adapters removed again.

Why (docs/probes.md, "Warm-up"): at step 0 the gradient says which modules respond to the task's easy part
(format, frequent tokens); after a few steps of uniform LoRA that part is learned and the gradient shows where
a LoRA's capacity binds, e.g. how much gradient energy lies beyond the current rank (many independent facts
give high-rank gradients, a style shift low-rank ones). Measured on the placement benchmark (docs/results/).

The model is adapted in place (no copy: probing must fit wherever a LoRA fine-tune fits) with PEFT, trained,
probed and unwrapped with ``PeftModel.unload()``: its weights, ``requires_grad`` flags and mode are as they
came, also on failure. Only the caller's LoRA config says what is adapted, so ``probes`` stays free of
``allocator``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from probes.data import data_fingerprint
from probes.errors import ProbeError, ProbeRunError
from probes.experts import check_layouts
from probes.padding import model_inputs
from probes.report import ProbeReport
from probes.runner import _accepts, check_token_ids, run
from probes.settings import ProbeSettings

BASE_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Warmup:
    """What a warm-up adapts and trains on: a PEFT ``LoraConfig`` (uniform rank over the probed modules, built
    by the caller) and its micro-batches (rows of the same data as the calibration, drawn apart)."""

    lora_config: Any
    batches: Sequence[Mapping[str, torch.Tensor]]

    @property
    def rank(self) -> int:
        return int(getattr(self.lora_config, "r", 0))

    def key(self) -> dict[str, Any]:
        """What a cached report made after this warm-up depends on (with the probe settings)."""
        config = self.lora_config
        targets = sorted(config.target_modules or []) + sorted(
            getattr(config, "target_parameters", None) or []
        )
        return {
            "rank": self.rank,
            "alpha": getattr(config, "lora_alpha", None),
            "targets": targets,
            "rank_pattern": dict(sorted((config.rank_pattern or {}).items())),
            "data": data_fingerprint(self.batches),
        }


def auto_lr(model: nn.Module, rank: int) -> float:
    """``2 * sqrt(4 / rank) / hidden``: about twice the LoRA lr that trains a model of this width at this rank
    (the placement benchmark's validated lrs follow ``sqrt(4 / r) / hidden`` on its reference models, and
    common LoRA lrs for 4096-wide models, 1e-4 to 2e-4 at rank 16, sit close to it)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hidden = getattr(embeddings, "embedding_dim", None) or getattr(
        getattr(model, "config", None), "hidden_size", 0
    )
    if not hidden:
        raise ProbeError(
            "cannot tell the model's hidden size for the warm-up's auto lr; set ProbeSettings("
            "warmup_lr=...) to the lr you fine-tune with, times 2"
        )
    return 2.0 * math.sqrt(4.0 / max(1, rank)) / int(hidden)


@contextlib.contextmanager
def warmed_up(
    model: nn.Module,
    lora_config: Any,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    skip_nonfinite: bool = False,
    progress: bool = False,
) -> Iterator[tuple[PeftModel, dict[str, Any]]]:
    """``model`` wrapped with ``lora_config`` and trained ``steps`` AdamW steps (constant ``lr``, one
    micro-batch per step, cycling ``batches``); yields the PEFT model and a record of the warm-up (steps, lr,
    losses, seconds). A non-finite loss is a :class:`ProbeRunError`, or with ``skip_nonfinite`` a skipped
    step (NaN in ``losses``). On exit the adapters are removed and the model is exactly as it came."""
    if steps < 1 or not batches or not lr > 0:
        raise ProbeError(
            f"a warm-up needs steps >= 1, batches and lr > 0, got {steps} steps, {len(batches)} batches, lr "
            f"{lr}"
        )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # PEFT 0.21 checks pattern keys against target_modules only, yet
            # applies them to target_parameters (routed experts)
            warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
            peft_model = get_peft_model(model, lora_config)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        losses, accepts_cache = [], _accepts(model, "use_cache")
        peft_model.train()
        bar = tqdm(total=steps, disable=not progress, unit="step", desc="warm-up", dynamic_ncols=True)
        for batch in itertools.islice(itertools.cycle(batches), steps):
            bar.update()
            inputs = model_inputs(model, {k: v.to(device) for k, v in batch.items()})
            if accepts_cache:  # as the probe pass: no KV cache to build (some linear-attention caches break)
                inputs["use_cache"] = False
            loss = peft_model(**inputs).loss
            if not torch.isfinite(loss):
                if skip_nonfinite:  # as the probe pass: the batch is skipped, the run goes on
                    losses.append(float("nan"))
                    continue
                raise ProbeRunError(
                    f"the warm-up's loss is {float(loss)} at step {len(losses)}"
                    + ("" if losses else " (before any update: the model or this batch)")
                    + "; lower ProbeSettings.warmup_lr, set ProbeSettings.warmup_steps to 0, or set "
                    "ProbeSettings.skip_nonfinite to skip such batches"
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        bar.close()
        peft_model.eval()
        yield (
            peft_model,
            {"steps": steps, "lr": lr, "losses": losses, "seconds": time.perf_counter() - started},
        )
    finally:
        peft_model.unload()  # every LoRA layer replaced by the module it wrapped, in place
        for attr in ("peft_config",):
            if attr in vars(model):
                delattr(model, attr)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def base_name(table: Mapping[str, nn.Module], name: str) -> str:
    """The name under which the probes see ``name`` (a module or a 3-D expert parameter of the PEFT model)
    without its adapter: a LoRA layer's ``base_layer``, or the parameter on the innermost base layer of PEFT's
    nested ``ParamWrapper``s (one per adapted parameter of a module), whose forward PEFT runs with the weight
    parametrized as W + ΔW, so the probes measure the gradient at the warmed-up point."""
    if name in table:
        return f"{name}.base_layer" if f"{name}.base_layer" in table else name
    owner, _, leaf = name.rpartition(".")
    while f"{owner}.base_layer" in table:
        owner = f"{owner}.base_layer"
    return f"{owner}.{leaf}"


def run_warm(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    modules: Sequence[str],
    settings: ProbeSettings,
    lora_config: Any,
    warmup_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    meta: Mapping[str, Any] | None = None,
) -> ProbeReport:
    """:func:`probes.run` on ``modules`` after a warm-up of ``settings.warmup_steps`` steps of ``lora_config``
    on ``warmup_batches``; the report is keyed by the original module names and its meta records the
    warm-up."""
    check_layouts(model, modules)  # an unknown expert layout: the probes' own message, not the forward's
    check_token_ids(model, [*batches, *warmup_batches])  # not an IndexError from the forward
    with warmed_up(
        model,
        lora_config,
        warmup_batches,
        steps=settings.warmup_steps,
        lr=settings.warmup_lr or auto_lr(model, int(getattr(lora_config, "r", 1))),
        seed=settings.seed,
        skip_nonfinite=settings.skip_nonfinite,
        progress=settings.progress,
    ) as (peft_model, record):
        table = dict(peft_model.named_modules())
        names = {base_name(table, f"{BASE_PREFIX}{name}"): name for name in modules}
        report = run(peft_model, batches, list(names), settings, meta=meta)
    record["rank"] = int(getattr(lora_config, "r", 0))
    return ProbeReport(
        {names[k]: v for k, v in report.modules.items()}, {**dict(report.meta), "warmup": record}
    )
