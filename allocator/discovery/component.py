"""The output of stage 1: :class:`Component`, one adaptable call site of a model, and the families it belongs
to.

Pure data (no torch), so scoring and the solver can read components without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FAMILIES = ("attention", "recurrent", "mlp", "moe", "other")


@dataclass(frozen=True)
class Component:
    """One adaptable call site of a model.

    ``lora_params(d_in, d_out, r) * n_experts`` is its LoRA cost at rank ``r`` (see
    ``allocator.solver.budget``).
    """

    name: str  # full name as in model.named_modules() (or named_parameters() for 3-D expert weights)
    layer: int | None  # decoder-layer index, None outside the stack
    family: str  # one of FAMILIES
    # finer label: softmax, mla, gated_deltanet, kda, lightning, mamba, mamba2, rglru, short_conv, dense,
    # expert, shared_expert, router, ...
    kind: str
    d_in: int
    d_out: int
    module_class: str  # class name of the module (or of the owner of a 3-D parameter)
    # lora_effective False: a LoRA here would never run (bypassed forward, dead entry), PEFT refuses it, or a
    # merge would not reproduce it (a weight shared by distinct modules); the reason is in ``note``
    lora_effective: bool = True
    note: str = ""  # why not effective, or what was guessed
    tied_to: str | None = None  # first call site of the same module object, listed under several names
    is_parameter: bool = False  # a 3-D expert parameter: needs PEFT's target_parameters
    n_experts: int = 1  # experts stored in one 3-D parameter (cost multiplies by this)
    default_target: bool = True  # False for routers and other modules excluded unless asked for
    export_as_parameter: bool = False  # an nn.Linear exported as target_parameters "<name>.weight"

    @property
    def peft_name(self) -> str:
        """The name in the exported LoraConfig: ``name``, or ``name.weight`` if ``export_as_parameter``."""
        return f"{self.name}.weight" if self.export_as_parameter else self.name

    @property
    def n_params_per_rank(self) -> int:
        """LoRA parameters one rank unit costs here: n_experts * (d_in + d_out)."""
        return self.n_experts * (self.d_in + self.d_out)

    @property
    def eligible(self) -> bool:
        """Offered to the solver by default."""
        return self.lora_effective and self.default_target and self.tied_to is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Component:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Component fields {sorted(unknown)}")
        return cls(**data)
