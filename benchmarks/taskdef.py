"""The record every fine-tune task of the benchmarks returns (``benchmarks.tasks``,
``benchmarks.instruction``), kept apart so each task module imports it without importing the others."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """A fine-tune task: batches for :func:`allocator.tuning.finetune.finetune` and a scorer for the trained
    model."""

    name: str
    description: str
    train_batches: tuple[Batch, ...]
    eval_batches: tuple[Batch, ...]
    evaluate: Callable[[torch.nn.Module], Mapping[str, float]] = field(repr=False)
