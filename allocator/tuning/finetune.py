"""A short LoRA (or full) fine-tune with a fixed step count: the objective of the benchmark and the tuner.

Input: a causal LM, a ``peft.LoraConfig`` (or ``None`` for a full fine-tune), train and eval batches (dicts of
``input_ids`` / ``attention_mask`` / ``labels`` tensors, labels ``-100`` where no loss is taken). Output: a
frozen :class:`FinetuneResult`.

Why a plain loop and not ``transformers.Trainer``: the runs are a few hundred steps on a tiny model, so the
Trainer's setup (accelerate state, logging, callbacks, output dirs) costs as much as the training; the step
count is fixed rather than epoch-derived; every random draw (LoRA init, data order, dropout) comes from one
explicit seed inside a forked RNG, so two calls with the same arguments give the same numbers and the caller's
RNG is left alone; and the intermediate eval feeds a ``callback`` that an Optuna objective uses to report and
prune.

The caller's model is never mutated: the loop trains a deep copy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from allocator.errors import InputError
from allocator.output.export import get_peft_model_quietly
from probes.padding import model_mask
from probes.settings import Range, check_ranges, ranged

Batch = Mapping[str, torch.Tensor]
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class FinetuneResult:
    """What one fine-tune run measured."""

    eval_loss: float = field(metadata={"help": "token-weighted eval loss after the last step (nats/token)"})
    initial_eval_loss: float = field(metadata={"help": "eval loss of the untrained adapter (step 0)"})
    eval_curve: tuple[tuple[int, float], ...] = field(
        metadata={"help": "(step, eval loss) at step 0, every `eval_every` steps and at the end"}
    )
    train_losses: tuple[float, ...] = field(metadata={"help": "per-step mean train loss over label tokens"})
    trainable_params: int = field(metadata={"help": "trainable parameters as PEFT counts them"})
    steps: int = field(metadata={"help": "steps run (fewer than asked when the callback stopped the run)"})
    stopped_early: bool = field(metadata={"help": "True when the callback returned True"})
    wall_time_s: float = field(metadata={"help": "wall time of the whole call, evals included"})
    metrics: Mapping[str, float] = field(
        default_factory=dict, metadata={"help": "what `metrics_fn` returned on the trained model"}
    )
    model: Any = field(
        default=None,
        compare=False,
        repr=False,
        metadata={"help": "the trained model (a PeftModel for LoRA), only with `return_model=True`"},
    )


def lr_at(step: int, *, steps: int, lr: float, warmup_steps: int, schedule: str = "cosine") -> float:
    """Learning rate for 0-based ``step``: linear warmup to ``lr``, then ``schedule`` down to 0 at ``steps``.

    >>> lr_at(0, steps=10, lr=1.0, warmup_steps=2), lr_at(2, steps=10, lr=1.0, warmup_steps=2)
    (0.5, 1.0)
    """
    if step < warmup_steps:  # 1) warmup: reach lr at the end of step warmup_steps - 1
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)  # 2) 0 -> 1 over the rest
    assert 0.0 <= progress <= 1.0
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # 3) cosine to 0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the label tokens of ``batch`` (labels -100 skipped), and their
    count."""
    device = _device(model)
    input_ids = batch["input_ids"].to(device)
    labels = batch.get("labels", batch["input_ids"]).to(device)
    mask = model_mask(model, batch.get("attention_mask"))  # None on right-padded batches: probes.padding
    logits = model(input_ids=input_ids, attention_mask=None if mask is None else mask.to(device)).logits
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    n_tokens = int((targets != -100).sum())
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, n_tokens


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """Token-weighted mean next-token loss (nats/token) over all label tokens of ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            loss, n = token_loss_sum(model, batch)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise InputError("evaluate_loss got no label tokens; pass batches whose `labels` are not all -100")
    return total / count


def pool_rows(batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """Concatenate batches into one pool of rows, right-padding shorter ones (pad labels are -100)."""
    if not batches:
        raise InputError("finetune got no train batches; pass at least one batch")
    width = max(b["input_ids"].shape[1] for b in batches)
    parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for b in batches:
        ids = b["input_ids"]
        pad = width - ids.shape[1]
        mask = b.get("attention_mask", torch.ones_like(ids))
        labels = b.get("labels", ids)
        parts["input_ids"].append(F.pad(ids, (0, pad), value=0))
        parts["attention_mask"].append(F.pad(mask, (0, pad), value=0))
        parts["labels"].append(F.pad(labels, (0, pad), value=-100))
    return {k: torch.cat(v) for k, v in parts.items()}


def _trainable(model: torch.nn.Module, lora_config: Any, seed: int) -> tuple[torch.nn.Module, int]:
    """A deep copy of ``model`` ready to train, and its trainable parameter count."""
    model = copy.deepcopy(model)
    if lora_config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, sum(p.numel() for p in model.parameters())
    torch.manual_seed(seed)  # LoRA A matrices are drawn here
    model = get_peft_model_quietly(model, lora_config)  # not a FutureWarning per tuning trial
    return model, int(model.get_nb_trainable_parameters()[0])


@dataclass(frozen=True)
class FinetuneSettings:
    """One short fine-tune run: the optimiser (AdamW, betas (0.9, 0.999)), its schedule and the eval
    cadence."""

    steps: int = ranged(60, "optimizer steps", Range(1, integer=True))
    lr: float = ranged(3e-3, "peak learning rate", Range(0, lo_open=True))
    seed: int = ranged(0, "seed of the LoRA init (torch.manual_seed before get_peft_model), data order and "
                          "dropout",
                       Range(0, integer=True))
    batch_size: int = ranged(8, "rows per step, drawn from a permutation of the pooled rows, a new one per "
                                "pass",
                             Range(1, integer=True))
    eval_every: int | None = ranged(None, "steps between intermediate evals (None: at the start and the end "
                                          "only)",
                                    Range(1, integer=True))
    weight_decay: float = ranged(0.0, "AdamW weight decay", Range(0))
    warmup: float = ranged(0.1, "fraction of steps spent in linear warmup", Range(0, 1, hi_open=True))
    schedule: str = field(default="cosine", metadata={"help": f"after warmup, one of {SCHEDULES} (to 0 at "
                                                              "steps)"})
    max_grad_norm: float | None = ranged(1.0, "clip the global gradient norm (None: no clipping)",
                                         Range(0, lo_open=True))

    def __post_init__(self) -> None:
        check_ranges(self, InputError)
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _train(trained: torch.nn.Module, pool: dict[str, torch.Tensor], eval_batches: Sequence[Batch],
           s: FinetuneSettings, callback: Callable[[int, float], bool | None] | None
           ) -> tuple[list[tuple[int, float]], list[float], bool]:
    """The AdamW loop: (eval curve, per-step train losses, stopped by the callback)."""
    n_rows = pool["input_ids"].shape[0]
    warmup_steps = int(s.warmup * s.steps)
    order = torch.Generator().manual_seed(s.seed)  # data order, independent of model code's draws
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    curve = [(0, evaluate_loss(trained, eval_batches))]
    train_losses: list[float] = []
    perm, cursor = torch.randperm(n_rows, generator=order), 0
    trained.train()
    for step in range(s.steps):
        if cursor + s.batch_size > n_rows:  # a new pass; rows of the short tail wait for it
            perm, cursor = torch.randperm(n_rows, generator=order), 0
        rows = perm[cursor : cursor + s.batch_size]
        cursor += s.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps=s.steps, lr=s.lr, warmup_steps=warmup_steps, schedule=s.schedule)
        loss_sum, n_tokens = token_loss_sum(trained, {k: v[rows] for k, v in pool.items()})
        loss = loss_sum / max(1, n_tokens)
        loss.backward()
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        done = step + 1
        if s.eval_every and done % s.eval_every == 0 and done < s.steps:
            curve.append((done, evaluate_loss(trained, eval_batches)))
            if callback is not None and callback(done, curve[-1][1]):
                return curve, train_losses, True
    if curve[-1][0] != len(train_losses):
        curve.append((len(train_losses), evaluate_loss(trained, eval_batches)))
    return curve, train_losses, False


def finetune(
    model: torch.nn.Module,
    lora_config: Any,
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    settings: FinetuneSettings | None = None,
    *,
    callback: Callable[[int, float], bool | None] | None = None,
    metrics_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    return_model: bool = False,
    init: Callable[[torch.nn.Module], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` for ``settings.steps`` AdamW steps and report eval losses.

    Args:
        model: a causal LM; left untouched (a deep copy is trained).
        lora_config: a ``peft.LoraConfig`` (``rank_pattern`` / ``alpha_pattern`` honoured), or ``None`` to
        train
            every parameter.
        train_batches: rows are pooled and re-batched (see :class:`FinetuneSettings`).
        eval_batches: scored by :func:`evaluate_loss` at step 0, every ``eval_every`` steps, and at the end.
        settings: the run (:class:`FinetuneSettings`; its defaults when None).
        callback: ``callback(step, eval_loss)`` after each intermediate eval; returning True stops the run
            (an exception, such as a pruned trial's, propagates).
        metrics_fn: called on the trained model; its mapping is stored in ``FinetuneResult.metrics``.
        return_model: keep the trained model in ``FinetuneResult.model``.
        init: ``init(peft_model)`` right after the adapters are built, before the first eval and step: sets
            their initial weights, e.g. EVA's lora_A at the plan's ranks
            (``allocator.output.lora_init.init_lora_a``).

    Raises:
        InputError: batches without label tokens (the settings check themselves when built).
    """
    s = settings or FinetuneSettings()
    start = time.perf_counter()
    pool = pool_rows(train_batches)
    device = _device(model)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        trained, n_trainable = _trainable(model, lora_config, s.seed)
        if init is not None:
            init(trained)
        torch.manual_seed(s.seed)  # dropout
        curve, train_losses, stopped = _train(trained, pool, eval_batches, s, callback)
        trained.eval()
        metrics = dict(metrics_fn(trained)) if metrics_fn is not None else {}
    return FinetuneResult(
        eval_loss=curve[-1][1],
        initial_eval_loss=curve[0][1],
        eval_curve=tuple(curve),
        train_losses=tuple(train_losses),
        trainable_params=n_trainable,
        steps=len(train_losses),
        stopped_early=stopped,
        wall_time_s=time.perf_counter() - start,
        metrics=metrics,
        model=trained if return_model else None,
    )
