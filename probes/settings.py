"""``ProbeSettings``: what one probe run does; ``DataSettings``: how calibration batches are drawn from data.

Every field documents itself in ``metadata["help"]``.

Numeric fields of every settings class of the project also declare the values they accept,
``metadata["range"]``
(a :class:`Range`), and :func:`check_ranges` enforces them: finite, of the right type, inside the range. The
allocator's settings reuse both (``probes`` is the lower layer).
"""

from __future__ import annotations

import codecs
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from probes.errors import ProbeError
from probes.formats import RecordFormat


@dataclass(frozen=True)
class Range:
    """The values a numeric settings field accepts: finite numbers from ``lo`` to ``hi`` (ends open or
    closed), whole numbers only when ``integer``. A mapping or tuple field's range applies to each of its
    values."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.hi == math.inf:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        return (
            f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        )

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.integer and not (isinstance(value, numbers.Integral) or float(value).is_integer()):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below


# noqa: A002
def ranged(default: Any = None, help: str = "", range: Range | None = None, **kwargs: Any) -> Any:
    """``dataclasses.field`` with ``metadata={"help": help, "range": range}`` (``default_factory`` via
    kwargs)."""
    if "default_factory" not in kwargs:
        kwargs["default"] = default
    return field(metadata={"help": help, "range": range}, **kwargs)


def check_ranges(settings: Any, error: type[Exception]) -> None:
    """Raise ``error`` naming the first field of ``settings`` whose value is outside its declared ``Range``.

    Integer fields holding a whole float (``4.0`` from a YAML file) are set to the int.
    """
    for f in fields(settings):
        spec = f.metadata.get("range")
        if spec is None:
            continue
        value = getattr(settings, f.name)
        if value is None:  # an optional field left unset
            continue
        if isinstance(value, Mapping):
            items = list(value.values())
        elif isinstance(value, (tuple, list)):
            items = list(value)
        else:
            items = [value]
        for item in items:
            if not spec.admits(item):
                shown = repr(value) if len(items) == 1 and item is value else f"{item!r} in {value!r}"
                raise error(f"{type(settings).__name__}.{f.name} must be {spec}, got {shown}")
        if spec.integer and isinstance(value, float):
            object.__setattr__(settings, f.name, int(value))


DTYPES = ("float32", "float64")
SVD_METHODS = ("auto", "exact", "randomized")
GRAD_SKETCH_MODES = ("auto", "exact", "sketch")


@dataclass(frozen=True)
class ProbeSettings:
    """Settings of :func:`probes.run`, validated at construction (see ``docs/probes.md``)."""

    max_rank: int = field(
        default=64,
        metadata={
            "help": "k: how many gradient singular values and "
            "held-out capture points (r = 1..k) to keep per "
            "module; capped by min(d_in, d_out).",
            "range": Range(1, integer=True),
        },
    )
    sketch_threshold: int = field(
        default=512,
        metadata={
            "help": "Width above which statistics are sketched: modules with d_in above it keep a Nystrom "
            "sketch of the input second moment instead of the exact d_in x d_in matrix, and (grad_sketch "
            "'auto') modules with d_in or d_out above it keep gradient sketches instead of the gradient.",
            "range": Range(2, integer=True),
        },
    )
    sketch_dim: int = field(
        default=48,
        metadata={
            "help": "Columns s of the Nystrom sketch (memory d_in x s); eigenvalues beyond s are not kept. "
            "Its test matrix is the first s columns of the gradient sketch's (max_rank + sketch_oversample "
            "wide), so one projection X Omega serves both sketches.",
            "range": Range(2, integer=True),
        },
    )
    grad_sketch: str = field(
        default="auto",
        metadata={
            "help": f"How the calibration gradient is kept, one of {GRAD_SKETCH_MODES}: 'sketch' (two-sided "
            "random sketches per calibration half, never a full weight gradient), 'exact' (the full "
            "gradient halves: 8 bytes per weight in float32; the test oracle), 'auto' (sketch where d_in or "
            "d_out exceeds sketch_threshold and the sketch is smaller than the gradient, exact elsewhere)."
        },
    )
    sketch_oversample: int = field(
        default=8,
        metadata={
            "help": "Range width of the gradient sketch beyond max_rank: k = max_rank + sketch_oversample "
            "columns (capped by min(d_in, d_out)).",
            "range": Range(0, integer=True),
        },
    )
    corange_oversample: int = field(
        default=48,
        metadata={
            "help": "Co-range width of the gradient sketch beyond its range width: l = k + "
            "corange_oversample (capped by max(d_in, d_out)); larger l makes the recovery more accurate.",
            "range": Range(0, integer=True),
        },
    )
    svd: str = field(
        default="auto",
        metadata={
            "help": f"How the top-k SVDs of the gradient sums are taken, one of {SVD_METHODS}: "
            "'exact' (Gram matrix + eigh in float64), 'randomized' (subspace iteration, see "
            "svd_power_iters), 'auto' (exact while min(d_in, d_out) <= 2 * (max_rank + "
            "svd_oversample), randomized above)."
        },
    )
    svd_oversample: int = field(
        default=32,
        metadata={
            "help": "Extra random directions of the randomized SVD beyond max_rank.",
            "range": Range(0, integer=True),
        },
    )
    svd_power_iters: int = field(
        default=3,
        metadata={
            "help": "Power iterations q of the randomized SVD; the error of sigma_j shrinks like "
            "(sigma_{k+p+1} / sigma_j)^(2q+1).",
            "range": Range(0, integer=True),
        },
    )
    skip_nonfinite: bool = field(
        default=False,
        metadata={
            "help": "Skip a micro-batch whose loss is NaN/inf (counted in meta['n_skipped']) instead "
            "of raising ProbeError."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute decoder layers in backward (non-reentrant torch checkpoint) to save "
            "memory; the probed inputs are still kept, so the saving is smaller than in "
            "training."
        },
    )
    modules_per_pass: int = ranged(
        0,
        "probe at most this many modules (or routed-expert parameters) per pass over the calibration batches "
        "(0: all in one pass); a pass holds only its modules' statistics and kept inputs, so fewer per pass "
        "lowers probing's peak memory, at one forward + backward per pass. Results are the same",
        Range(0, integer=True),
    )
    progress: bool = field(
        default=True,
        metadata={"help": "Show a tqdm bar with tokens/s and ETA (rank 0 only). Does not change results."},
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the Gaussian test matrices of the sketches (same on every rank).",
            "range": Range(0, integer=True),
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": f"Accumulator dtype, one of {DTYPES}; inputs and output gradients are cast to it "
            "before every product, whatever the model dtype (bf16, fp16, fp32)."
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "'auto': a model entirely on CPU runs on CUDA when available and is moved back "
            "afterwards; a model already on an accelerator or split by device_map stays where it is. "
            "'model': never move. Any torch device string ('cpu', 'cuda:1'): move there for the run."
        },
    )
    warmup_steps: int = ranged(
        20,
        "AdamW steps of uniform LoRA (at the budget's uniform rank) before the statistics are taken, so "
        "they show where the adapter's capacity binds rather than the task's easy first step (0: probe the "
        "base model)",
        Range(0, integer=True),
    )
    warmup_lr: float = ranged(
        0.0,
        "learning rate of the warm-up; 0 = auto: 2 * sqrt(4 / r) / hidden size, about twice the LoRA lr that "
        "trains such a model at rank r",
        Range(0),
    )
    distributed: bool = field(
        default=True,
        metadata={
            "help": "When torch.distributed is initialised, probe batch i on rank i % world_size and "
            "all-reduce the accumulators, so every rank returns the same report."
        },
    )

    def __post_init__(self) -> None:
        check_ranges(self, ProbeError)
        if self.svd not in SVD_METHODS:
            raise ProbeError(f"ProbeSettings.svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.grad_sketch not in GRAD_SKETCH_MODES:
            raise ProbeError(
                f"ProbeSettings.grad_sketch must be one of {GRAD_SKETCH_MODES}, got {self.grad_sketch!r}"
            )
        if self.sketch_threshold < self.sketch_dim:
            raise ProbeError(
                f"ProbeSettings.sketch_threshold ({self.sketch_threshold}) must be >= sketch_dim "
                f"({self.sketch_dim}); a sketch wider than the input is no sketch"
            )
        for name in ("skip_nonfinite", "gradient_checkpointing", "progress", "distributed"):
            if not isinstance(getattr(self, name), bool):
                raise ProbeError(f"ProbeSettings.{name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ProbeError(f"ProbeSettings.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ProbeError(
                f"ProbeSettings.device must be 'auto', 'model' or a torch device string, got {self.device!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sketch_widths(self, d_in: int, d_out: int) -> tuple[int, int]:
        """(k, l): range and co-range widths of a module's gradient sketch, capped by its shape."""
        k = min(self.max_rank + self.sketch_oversample, d_in, d_out)
        return k, min(k + self.corange_oversample, max(d_in, d_out))

    def sketches_gradient(self, d_in: int, d_out: int) -> bool:
        """Whether a module of this shape keeps gradient sketches (True) or the exact gradient halves."""
        if self.grad_sketch != "auto":
            return self.grad_sketch == "sketch"
        k, width = self.sketch_widths(d_in, d_out)
        long, short = max(d_in, d_out), min(d_in, d_out)
        return long > self.sketch_threshold and k * long + width * short < d_in * d_out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeSettings:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ProbeError(
                f"unknown ProbeSettings fields {unknown}; known: {sorted(f.name for f in fields(cls))}"
            )
        return cls(**data)

    def result_key(self) -> dict[str, Any]:
        """The fields that can change a report (all but ``progress`` and ``modules_per_pass``, which gives the
        same report: tests/test_probes_passes.py): the cache key part."""
        out = self.to_dict()
        out.pop("progress")
        out.pop("modules_per_pass")
        return out


@dataclass(frozen=True)
class DataSettings:
    """How calibration batches are drawn from ``data``."""

    seq_len: int = ranged(256, "Tokens per calibration sequence.", Range(2, integer=True))
    samples: int = ranged(32, "Calibration sequences in all.", Range(1, integer=True))
    batch_size: int = ranged(4, "Sequences per forward/backward micro-batch.", Range(1, integer=True))
    seed: int = ranged(0, "Seed for drawing and ordering calibration samples.", Range(0, integer=True))
    text_field: str = field(
        default="text",
        metadata={"help": "Record field holding plain text (TRL's dataset_text_field)."},
    )
    encoding: str = field(
        default="utf-8",
        metadata={
            "help": "Text encoding of .txt/.jsonl data, decoded strictly (a bad byte is an error naming its "
            "offset)."
        },
    )

    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "Chat records: labels on the assistant turns only, the tokens the chat template marks "
            "with {% generation %} (TRL's SFTConfig.assistant_only_loss); off: every token, as TRL."
        },
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "prompt + completion records: labels on the completion only (TRL's default for them); "
            "off: every token."
        },
    )

    def record_format(self) -> RecordFormat:
        """How records become labels (:mod:`probes.formats`)."""
        return RecordFormat(self.text_field, self.assistant_only_loss, self.completion_only_loss)

    def __post_init__(self) -> None:
        check_ranges(self, ProbeError)
        for name in ("assistant_only_loss", "completion_only_loss"):
            if not isinstance(getattr(self, name), bool):
                raise ProbeError(f"DataSettings.{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ProbeError(f"DataSettings.text_field must be a column name, got {self.text_field!r}")
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise ProbeError(
                f"DataSettings.encoding {self.encoding!r} is not a text encoding Python knows; "
                "try utf-8, utf-16 or latin-1"
            ) from None
