"""Stage 5's settings: :class:`LoraSettings`, how the plan's adapters are scaled and initialised.

Pure (no torch, no PEFT): the CLI and config files read it without loading the output stage. The fields are
``allocator.allocate``'s keyword arguments ``alpha_ratio``, ``use_rslora`` and ``init`` (``allocator.tune``
takes the last two; it searches the alpha ratio), written ``lora:`` in a config file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from allocator.errors import InputError
from probes.settings import Range, check_ranges, ranged

INITS = ("default", "eva", "gradient")


@dataclass(frozen=True)
class LoraSettings:
    """The plan's LoRA scaling and lora_A init, validated at construction."""

    alpha_ratio: float = ranged(2.0, "lora_alpha = alpha_ratio * r per module (PEFT's alpha_pattern)",
                                Range(0, lo_open=True))
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA scaling alpha/sqrt(r) with one alpha "
                                                              "(PEFT's use_rslora)"})
    init: str = field(
        default="default",
        metadata={"help": f"lora_A init recorded in the plan, one of {INITS}: PEFT's default, 'eva' (top "
                          "principal directions of each module's input at the plan's ranks) or 'gradient' "
                          "(top right singular vectors of each module's calibration-loss gradient at its "
                          "rank); apply either with Plan.apply(model, init_data=batches)"},
    )

    def __post_init__(self) -> None:
        check_ranges(self, InputError)
        object.__setattr__(self, "alpha_ratio", float(self.alpha_ratio))
        if not isinstance(self.use_rslora, bool):
            raise InputError(f"LoraSettings.use_rslora must be True or False, got {self.use_rslora!r}")
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; choose one of {list(INITS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
