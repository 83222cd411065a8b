"""``ProbeSettings``: what one probe run does. Every field documents itself in ``metadata["help"]``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from probes.errors import ProbeError

DTYPES = ("float32", "float64")
SVD_METHODS = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class ProbeSettings:
    """Settings of :func:`probes.run`, validated at construction (see ``docs/probes.md``)."""

    max_rank: int = field(
        default=64,
        metadata={"help": "k: how many gradient singular values and held-out capture points (r = 1..k) to keep "
                  "per module; capped by min(d_in, d_out)."},
    )
    sketch_threshold: int = field(
        default=4096,
        metadata={"help": "Modules whose input width d_in exceeds this keep a Nystrom sketch of the input second "
                  "moment instead of the exact d_in x d_in matrix."},
    )
    sketch_dim: int = field(
        default=512,
        metadata={"help": "Columns s of the Nystrom sketch (memory d_in x s); eigenvalues beyond s are not kept."},
    )
    svd: str = field(
        default="auto",
        metadata={"help": f"How the top-k SVDs of the gradient sums are taken, one of {SVD_METHODS}: 'exact' (Gram "
                  "matrix + eigh in float64), 'randomized' (subspace iteration, see svd_power_iters), 'auto' (exact "
                  "while min(d_in, d_out) <= 2 * (max_rank + svd_oversample), randomized above)."},
    )
    svd_oversample: int = field(
        default=32,
        metadata={"help": "Extra random directions of the randomized SVD beyond max_rank."},
    )
    svd_power_iters: int = field(
        default=3,
        metadata={"help": "Power iterations q of the randomized SVD; the error of sigma_j shrinks like "
                  "(sigma_{k+p+1} / sigma_j)^(2q+1)."},
    )
    skip_nonfinite: bool = field(
        default=False,
        metadata={"help": "Skip a micro-batch whose loss is NaN/inf (counted in meta['n_skipped']) instead of "
                  "raising ProbeError."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute decoder layers in backward (non-reentrant torch checkpoint) to save memory; "
                  "the probed inputs are still kept, so the saving is smaller than in training."},
    )
    progress: bool = field(
        default=True,
        metadata={"help": "Show a tqdm bar with tokens/s and ETA (rank 0 only). Does not change results."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the Gaussian test matrix of the Nystrom sketch (same on every rank)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": f"Accumulator dtype, one of {DTYPES}; inputs and output gradients are cast to it "
                  "before every product, whatever the model dtype (bf16, fp16, fp32)."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto': a model entirely on CPU runs on CUDA when available and is moved back "
                  "afterwards; a model already on an accelerator or split by device_map stays where it is. "
                  "'model': never move. Any torch device string ('cpu', 'cuda:1'): move there for the run."},
    )
    distributed: bool = field(
        default=True,
        metadata={"help": "When torch.distributed is initialised, probe batch i on rank i % world_size and "
                  "all-reduce the accumulators, so every rank returns the same report."},
    )

    def __post_init__(self) -> None:
        for name in ("max_rank", "sketch_threshold", "sketch_dim", "seed", "svd_oversample", "svd_power_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProbeError(f"ProbeSettings.{name} must be an int, got {value!r}")
        if self.max_rank < 1:
            raise ProbeError(f"ProbeSettings.max_rank must be >= 1, got {self.max_rank}")
        if self.svd not in SVD_METHODS:
            raise ProbeError(f"ProbeSettings.svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.svd_oversample < 0 or self.svd_power_iters < 0:
            raise ProbeError(
                f"ProbeSettings.svd_oversample and svd_power_iters must be >= 0, got {self.svd_oversample} and "
                f"{self.svd_power_iters}"
            )
        if self.sketch_dim < 2:
            raise ProbeError(f"ProbeSettings.sketch_dim must be >= 2, got {self.sketch_dim}")
        if self.sketch_threshold < self.sketch_dim:
            raise ProbeError(
                f"ProbeSettings.sketch_threshold ({self.sketch_threshold}) must be >= sketch_dim ({self.sketch_dim}); "
                "a sketch wider than the input is no sketch"
            )
        for name in ("skip_nonfinite", "gradient_checkpointing", "progress", "distributed"):
            if not isinstance(getattr(self, name), bool):
                raise ProbeError(f"ProbeSettings.{name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ProbeError(f"ProbeSettings.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ProbeError(f"ProbeSettings.device must be 'auto', 'model' or a torch device string, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeSettings:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ProbeError(f"unknown ProbeSettings fields {unknown}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**data)

    def result_key(self) -> dict[str, Any]:
        """The fields that can change a report (everything but ``progress``): the cache key part."""
        out = self.to_dict()
        out.pop("progress")
        return out
