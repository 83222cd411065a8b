"""Budget: the one place LoRA cost is computed, and the user's budget parsed once.

``lora_params(d_in, d_out, r, n_experts)`` is what PEFT counts for a LoRA of rank ``r`` on one module
(``lora_A``: r x d_in, ``lora_B``: d_out x r, per expert; no bias, no DoRA magnitude).

``Budget.parse(text)`` accepts three forms and rejects everything else with an :class:`InputError` that lists
them:

- an absolute count: ``2500000``, ``2_500_000``, ``2.5M``, ``800k``, ``1.2B``, ``2.5e6``;
- a fraction of the base model: ``0.5%`` (of ``n_base_params``, floored);
- a uniform-rank equivalent: ``r16`` = what PEFT counts for ``LoraConfig(r=16)`` over every eligible target,
  i.e. ``Σ 16 * n_experts * (d_in + d_out)``, *not* capped at ``min(d_in, d_out)`` (PEFT does not cap either),
  so a plan at ``r16`` is always compared with exactly the uniform config a user would have written.

``Budget.resolve(components, n_base_params)`` turns it into an ``int`` number of parameters.
Pure: numpy-free even; never imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from allocator.errors import InputError

if TYPE_CHECKING:
    from allocator.discovery.component import Component

KINDS = ("params", "fraction", "uniform_rank")
ACCEPTED_FORMS = (
    "an absolute count (2500000, 2.5M, 800k, 1.2B), a fraction of the base model (0.5%) "
    "or a uniform-rank equivalent (r16)"
)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_COUNT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?([kmbg]?)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)%$")
_RANK = re.compile(r"^r(\d+)$")
_MAX_EXPONENT = 18  # 1e18 parameters: past any model, and short of Decimal's slow huge powers


def lora_params(d_in: int, d_out: int, r: int, n_experts: int = 1) -> int:
    """LoRA parameters of rank ``r`` on a ``d_in -> d_out`` module: ``r * n_experts * (d_in + d_out)``.

    >>> lora_params(1024, 4096, 8)
    40960
    >>> lora_params(64, 32, 4, n_experts=8)
    3072
    """
    d_in, d_out, r, n_experts = int(d_in), int(d_out), int(r), int(n_experts)
    if min(d_in, d_out, r, n_experts) < 0:
        raise InputError(f"lora_params needs non-negative sizes, got d_in={d_in} d_out={d_out} r={r} "
                         f"n_experts={n_experts}")
    return r * n_experts * (d_in + d_out)


def eligible_components(components: Iterable[Component]) -> list[Component]:
    """The components a budget is spent on: ``c.eligible`` (effective, default target, not tied)."""
    return [c for c in components if c.eligible]


def params_per_uniform_rank(components: Iterable[Component]) -> int:
    """Parameters one unit of uniform rank costs over the eligible components (PEFT count, uncapped)."""
    return sum(lora_params(c.d_in, c.d_out, 1, c.n_experts) for c in eligible_components(components))


def uniform_rank_equivalent(n_params: int, components: Iterable[Component]) -> float:
    """``n_params`` expressed as a uniform rank over the eligible components (``r4.0`` = what r4 costs)."""
    per_rank = params_per_uniform_rank(components)
    return n_params / per_rank if per_rank else math.inf


def format_params(n: float) -> str:
    """``2500000 -> '2.5M'``: a short count for messages (exact counts are printed beside it where they
    matter)."""
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.0f}"


def describe_params(n: int, components: Sequence[Component] | None = None) -> str:
    """``'2,500,000 params (2.5M, ~r3.2 uniform)'``: a count in the user's units for error messages."""
    text = f"{int(n):,} params ({format_params(n)}"
    if components is not None and params_per_uniform_rank(components):
        text += f", ~r{uniform_rank_equivalent(n, components):.3g} uniform"
    return text + ")"


@dataclass(frozen=True)
class Budget:
    """A trainable-parameter budget as the user wrote it, parsed once (see the module docstring for the
    forms)."""

    kind: str = field(metadata={"help": "params | fraction | uniform_rank"})
    value: float = field(metadata={"help": "parameters, a fraction in (0, 1], or a uniform rank, by kind"})
    text: str = field(default="", metadata={"help": "the budget as the user wrote it"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"Budget kind {self.kind!r} is not one of {KINDS}; build budgets with "
                             "Budget.parse")
        value = float(self.value)
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"budget {self.text or self.value!r} must be positive; use {ACCEPTED_FORMS}")
        if self.kind == "fraction" and value > 1:
            raise InputError(f"budget {self.text!r} is more than the whole base model; use a fraction up to "
                             "100%")
        if self.kind in ("params", "uniform_rank") and value != int(value):
            raise InputError(f"budget {self.text!r} must be a whole number of {self.kind.replace('_', ' ')}s")
        if not self.text:
            object.__setattr__(self, "text", _default_text(self.kind, value))

    @classmethod
    def parse(cls, text: str | int | Budget) -> Budget:
        """Parse ``'2.5M' | '2500000' | '0.5%' | 'r16'`` (or an int count); anything else is an InputError."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls("params", int(text), str(text))
        if not isinstance(text, str):
            raise InputError(f"budget {text!r} is not understood; use {ACCEPTED_FORMS}")
        raw = text.strip()
        key = raw.lower().replace("_", "").replace(",", "").replace(" ", "")
        if m := _RANK.match(key):
            if len(m.group(1)) > _MAX_EXPONENT:
                raise InputError(f"budget {raw!r} is far beyond any model; use {ACCEPTED_FORMS}")
            return cls("uniform_rank", int(m.group(1)), raw)
        if m := _PERCENT.match(key):
            return cls("fraction", float(Decimal(m.group(1)) / 100), raw)
        if m := _COUNT.match(key):
            number, exponent, suffix = m.groups()
            if int(exponent or 0) > _MAX_EXPONENT or len(number.split(".")[0]) > _MAX_EXPONENT:
                raise InputError(f"budget {raw!r} is far beyond any model; use {ACCEPTED_FORMS}")
            count = Decimal(number) * 10 ** int(exponent or 0) * _SUFFIX[suffix]  # exact: 2.3k is 2300
            if count != count.to_integral_value():
                hint = "give a whole number of parameters" if suffix else f"did you mean {raw}M or {raw}%?"
                raise InputError(
                    f"budget {raw!r} is {count.normalize():f} parameters, not a whole number; {hint}"
                )
            return cls("params", int(count), raw)
        raise InputError(f"budget {raw!r} is not understood; use {ACCEPTED_FORMS}")

    def resolve(self, components: Sequence[Component], n_base_params: int | None = None) -> int:
        """The budget in LoRA parameters for this model.

        Args:
            components: every component of the model; only ``eligible`` ones count for ``rN``.
            n_base_params: parameters of the base model; needed for the ``0.5%`` form only.
        Raises:
            InputError: a fraction without ``n_base_params``, no eligible target for ``rN``, or a zero result.
        """
        if self.kind == "params":
            n = int(self.value)
        elif self.kind == "fraction":
            if not n_base_params or n_base_params <= 0:
                raise InputError(
                    f"budget {self.text!r} is a fraction of the base model; pass n_base_params > 0"
                )
            n = int(Decimal(repr(self.value)) * int(n_base_params))  # floored, exact for 0.5% of 1e9
        else:
            per_rank = params_per_uniform_rank(components)
            if per_rank == 0:
                raise InputError(f"budget {self.text!r} needs eligible targets, and the model has none")
            n = int(self.value) * per_rank
        if n <= 0:
            raise InputError(f"budget {self.text!r} resolves to 0 parameters; raise it")
        return n

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "text": self.text}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        unknown = set(data) - {"kind", "value", "text"}
        if unknown:
            raise InputError(f"unknown Budget fields {sorted(unknown)}; expected kind, value, text")
        if "kind" not in data:
            return cls.parse(data["text"])
        return cls(data["kind"], data["value"], data.get("text", ""))

    def __str__(self) -> str:
        return self.text


def _default_text(kind: str, value: float) -> str:
    if kind == "params":
        return str(int(value))
    if kind == "fraction":
        return f"{value * 100:g}%"
    return f"r{int(value)}"
