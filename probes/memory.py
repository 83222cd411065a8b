"""What the probes hold: per-module probe state from shapes alone (the meta device is enough).

``probe_state(model, modules, settings)`` counts, at the given settings, every tensor the probes keep across
batches: the gradient halves or their sketches (:mod:`probes.sketch`), the input-moment accumulators (exact or
Nystrom) and the shared test matrices. It takes the same decisions as :class:`probes.hooks.Prober`
(``ProbeSettings.sketches_gradient``, ``sketch_widths``, ``sketch_threshold``) from ``in_features`` /
``out_features``, so a model built on the meta device is enough (``tests/test_probes_memory.py`` checks it
against the tensors a real run allocates).

Inputs shared by several modules (q/k/v, gate/up) are only known once the model runs; here modules with the
same parent module and the same ``in_features`` are taken to read one input, except the parent's last
``nn.Linear`` (``o_proj``, ``out_proj``, ``down_proj``: it reads the block's inner result). That is what the
hooks find in the transformers hybrids we ship; ``shared_inputs=False`` counts one per module (an upper
bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from probes.settings import ProbeSettings

_BYTES = {"float32": 4, "float64": 8}


@dataclass(frozen=True)
class ProbeState:
    """Bytes the probes hold across batches, by kind (``total`` = their sum)."""

    gradient: int  # gradient halves (exact) or their two-sided sketches
    inputs: int  # input second moments (exact d_in², or d_in x s Nystrom)
    test_matrices: int  # shared Ω / Ψ, one per (width, device)
    n_sketched: int  # modules whose gradient is sketched
    n_exact: int  # modules whose gradient halves are kept exactly

    @property
    def total(self) -> int:
        return self.gradient + self.inputs + self.test_matrices


def module_state(d_in: int, d_out: int, settings: ProbeSettings) -> tuple[int, bool]:
    """(numbers held across batches for one module's gradient statistics, whether they are sketches)."""
    if settings.sketches_gradient(d_in, d_out):
        k, width = settings.sketch_widths(d_in, d_out)
        return 2 * (k * max(d_in, d_out) + width * min(d_in, d_out)), True
    return 2 * d_in * d_out, False


def probe_state(
    model: nn.Module,
    modules: Sequence[str],
    settings: ProbeSettings | None = None,
    *,
    shared_inputs: bool = True,
) -> ProbeState:
    """Probe state of ``modules`` (``nn.Linear`` names of ``model``, on any device, meta included)."""
    settings = settings or ProbeSettings()
    size = _BYTES[settings.dtype]
    table = dict(model.named_modules(remove_duplicate=False))
    seen: set[int] = set()
    inputs: set[tuple] = set()
    omegas: dict[tuple, int] = {}
    psis: dict[tuple, int] = {}
    width = max(settings.sketch_dim, settings.max_rank + settings.sketch_oversample)
    corange = settings.max_rank + settings.sketch_oversample + settings.corange_oversample
    grad = act = n_sketched = 0
    last: dict[str, str] = {}  # parent -> name of its last nn.Linear child, in registration order
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "." in name:
            last[name.rsplit(".", 1)[0]] = name
    for name in sorted(set(modules)):
        module = table[name]
        if id(module) in seen:  # aliases share one probe
            continue
        seen.add(id(module))
        d_in, d_out = module.in_features, module.out_features
        numbers, sketched = module_state(d_in, d_out, settings)
        grad += numbers * size
        n_sketched += sketched
        if sketched:
            long, short = max(d_in, d_out), min(d_in, d_out)
            omegas[(short,)] = short * min(width, short)
            psis[(long,)] = long * min(corange, long)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        key = (parent, d_in) if shared_inputs and name != last.get(parent) else (name,)
        if key in inputs:
            continue
        inputs.add(key)
        if d_in > settings.sketch_threshold:
            act += d_in * min(settings.sketch_dim, d_in) * size
            omegas[(d_in,)] = d_in * min(width, d_in)
        else:
            act += d_in * d_in * size
    mats = (sum(omegas.values()) + sum(psis.values())) * size
    return ProbeState(grad, act, mats, n_sketched, len(seen) - n_sketched)


def weight_bytes(model: nn.Module, bytes_per_param: int = 2) -> int:
    """Bytes of every parameter of ``model`` (each shared tensor once) at ``bytes_per_param`` (bf16: 2)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * bytes_per_param
    return total
