"""Peak memory per device of probing and of a LoRA step, predicted on the meta device (`allocate inspect
--probe-memory`, and `allocate`'s check before it probes).

Probing: the model's weights, plus what :func:`probes.footprint.probe_pass_peak` traces (activations, probed
inputs, probe state, test matrices, loss logits). A LoRA step: the weights, plus the adapters (PEFT on the
modules `allocate` offers), their AdamW moments (two float32 tensors per adapter parameter) and what a
forward + backward with only the adapters trainable traces (activations, adapter gradients).

Several devices (``devices`` > 1, ``device_map`` placement): decoder layers are spread evenly, the embeddings,
LM head and loss logits stay on one device, so the busiest device holds ``(total - head) / devices + head``.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from allocator.errors import InputError
from probes.footprint import probe_pass_peak, step_peak
from probes.memory import probe_state, weight_bytes
from probes.settings import ProbeSettings

FREE_MEMORY_ENV = "ALLOCATE_FREE_MEMORY"  # override the free memory `allocate` checks against (e.g. "2GiB")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes for one configuration; ``*_peak`` = weights + the increase, on the busiest device."""

    batch_size: int
    seq_len: int
    dtype: str
    devices: int
    gradient_checkpointing: bool
    weights: int  # every parameter at the model dtype
    head: int  # embeddings + LM head weights and the loss logits: on one device whatever `devices`
    probe_increase: int  # traced peak of a probe pass over the loaded model (all devices together)
    probe_state: int  # of which the accumulators and test matrices (probes.memory.probe_state)
    lora_params: int  # adapter parameters (PEFT, rank `rank` on every offered module)
    lora_increase: int  # adapters + AdamW moments + traced forward/backward peak over the loaded model
    rank: int

    def per_device(self, total: int) -> int:
        return int((total - self.head) / self.devices + self.head) if self.devices > 1 else total

    @property
    def probe_peak(self) -> int:
        return self.per_device(self.weights + self.probe_increase)

    @property
    def lora_peak(self) -> int:
        return self.per_device(self.weights + self.lora_increase)


def estimate(
    skeleton: nn.Module,
    components: Sequence,
    settings: ProbeSettings | None = None,
    *,
    batch_size: int = 4,
    seq_len: int = 256,
    dtype: torch.dtype | None = None,
    devices: int = 1,
    rank: int = 16,
    lora: bool = True,
) -> MemoryEstimate:
    """Predict probing (and, with ``lora``, a LoRA step) for a model built on the meta device."""
    settings = settings or ProbeSettings()
    if devices < 1 or batch_size < 1 or seq_len < 2:
        raise InputError(
            f"devices, batch size and seq len must be >= 1, >= 1, >= 2, got {devices}, "
            f"{batch_size}, {seq_len}"
        )
    model = skeleton.to(dtype) if dtype is not None else skeleton
    dtype = next(model.parameters()).dtype
    size = torch.finfo(dtype).bits // 8
    names = [c.name for c in components if c.eligible and not c.is_parameter]
    per_pass = settings.modules_per_pass or len(names) or 1  # probes.run's passes: consecutive names
    passes = [names[i : i + per_pass] for i in range(0, len(names), per_pass)] or [names]
    probe = max((max(probe_pass_peak(model, chunk, settings, batch_size=batch_size, seq_len=seq_len).values(),
                     default=0) for chunk in passes), default=0)
    state = max(probe_state(model, chunk, settings).total for chunk in passes)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    outer = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    head = sum(weight_bytes(m, size) for m in {id(m): m for m in outer}.values())
    head += batch_size * seq_len * vocab * (size + 8)  # logits, their float32 copy and its gradient
    n_lora = lora_increase = 0
    if lora:
        targets = [c.name for c in components if c.eligible and c.lora_effective and not c.is_parameter]
        n_lora, lora_increase = _lora_step(model, targets, rank, batch_size, seq_len)
    return MemoryEstimate(
        batch_size,
        seq_len,
        str(dtype).removeprefix("torch."),
        devices,
        settings.gradient_checkpointing,
        weight_bytes(model, size),
        head,
        probe,
        state,
        n_lora,
        lora_increase,
        rank,
    )


def _lora_step(model: nn.Module, targets: list[str], rank: int, batch_size: int, seq_len: int):
    """(adapter parameters, peak bytes a LoRA step adds): PEFT on a copy of the meta model."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    if not targets:
        return 0, 0
    copied = copy.deepcopy(model)
    pattern = "^(" + "|".join(map(re.escape, targets)) + ")$"
    with warnings.catch_warnings():  # PEFT's deprecation notes about transformers' names: not the user's
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(
            copied, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern)
        )
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    adapters = sum(p.numel() * p.element_size() for p in trainable)
    adam = 2 * sum(p.numel() * 4 for p in trainable)  # exp_avg, exp_avg_sq (float32 master copies)
    peak = step_peak(peft_model, batch_size=batch_size, seq_len=seq_len)
    return n, adapters + adam + max(peak.values(), default=0)


def parse_bytes(text: str) -> int:
    """'2GiB', '500M', '1.5e9' -> bytes; InputError naming the form otherwise."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m[2].lower() if m else ""
    try:
        if m is None or unit not in _UNITS:
            raise ValueError
        return int(float(m[1]) * _UNITS[unit])
    except ValueError:
        raise InputError(
            f"{FREE_MEMORY_ENV}={text!r} is not a size; use a number of bytes or e.g. 2GiB, 500MB"
        ) from None


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` ($ALLOCATE_FREE_MEMORY when set), or None where it cannot be told."""
    forced = os.environ.get(FREE_MEMORY_ENV)
    if forced:
        return parse_bytes(forced)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu" and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def fitting(
    skeleton,
    components,
    settings: ProbeSettings,
    free: int,
    *,
    batch_size: int,
    seq_len: int,
    devices: int = 1,
) -> tuple[MemoryEstimate, list[str]]:
    """(the estimate at these settings, the changes that would fit in ``free`` bytes, cheapest first):
    gradient checkpointing, then halved micro-batches down to 1; or, keeping the micro-batch, fewer modules
    per pass (down to an eighth of them: each pass is one more forward + backward)."""
    base = estimate(
        skeleton, components, settings, batch_size=batch_size, seq_len=seq_len, devices=devices, lora=False
    )
    if base.probe_increase <= free:
        return base, []
    options: list[str] = []
    flags = []
    if not settings.gradient_checkpointing:
        settings = replace(settings, gradient_checkpointing=True)
        flags.append("--probe-gradient-checkpointing")
    b = batch_size
    while True:
        trial = estimate(
            skeleton, components, settings, batch_size=b, seq_len=seq_len, devices=devices, lora=False
        )
        if trial.probe_increase <= free:
            shown = flags + ([f"--data-batch-size {b}"] if b != batch_size else [])
            options.append(" ".join(shown) + f" (needs {gib(trial.probe_increase)})")
            break
        if b == 1:
            break
        b = max(1, b // 2)
    n = len([c for c in components if c.eligible and not c.is_parameter])
    per = n
    while per > max(1, n // 8):
        per = -(-per // 2)
        trial = estimate(skeleton, components, replace(settings, modules_per_pass=per), batch_size=batch_size,
                         seq_len=seq_len, devices=devices, lora=False)
        if trial.probe_increase <= free:
            options.append(" ".join([*flags, f"--probe-modules-per-pass {per}"])
                           + f" ({-(-n // per)} passes, needs {gib(trial.probe_increase)})")
            break
    return base, options


def _probing_device(model: nn.Module, settings: ProbeSettings) -> tuple[torch.device, bool]:
    """(the device probing runs on, whether the weights move there first), as ``probes.run`` decides."""
    devices = {p.device for p in model.parameters()}
    home = next(iter(devices))
    if settings.device not in ("auto", "model"):
        target = torch.device(settings.device)
        return target, target != home
    if settings.device == "auto" and devices == {torch.device("cpu")} and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), True
    return home, False


def check_fits(
    model: nn.Module, components: Sequence, settings: ProbeSettings, *, batch_size: int, seq_len: int
) -> str | None:
    """Before probing: None when the pass fits the free memory of its device; a warning naming the settings
    that would fit when it does not; InputError when it does not fit even with gradient checkpointing at
    micro-batch 1. A cheap upper bound first, so models far below the free memory are not traced."""
    device, moves = _probing_device(model, settings)
    free = free_memory(device)
    if free is None:
        return None
    config = model.config
    size = next(model.parameters()).element_size()
    width = int(getattr(config, "hidden_size", 0) or 0) * int(getattr(config, "num_hidden_layers", 0) or 0)
    tokens = batch_size * seq_len
    names = [c.name for c in components if c.eligible and not c.is_parameter]
    weights = weight_bytes(model, size) if moves else 0
    bound = (
        weights
        + probe_state(model, names, settings).total
        + tokens * (128 * width * size + int(getattr(config, "vocab_size", 0) or 0) * (size + 12))
    )
    if bound <= free:
        return None
    from allocator.discovery.modelio import load_skeleton  # noqa: PLC0415

    skeleton = load_skeleton(config).to(next(model.parameters()).dtype)
    meta = {c.name: c for c in components}
    base, options = fitting(
        skeleton, list(meta.values()), settings, free - weights, batch_size=batch_size, seq_len=seq_len
    )
    need = gib(base.probe_increase + weights)
    if base.probe_increase + weights <= free:
        return None
    if options:
        return (
            f"probing is predicted to need {need} on {device} where {gib(free)} is free; settings that "
            f"would fit: {'; '.join(options)}"
        )
    shorter = _fitting_seq_len(skeleton, list(meta.values()), settings, free - weights, seq_len)
    fix = f"--data-seq-len {shorter} fits with them" if shorter else "no --data-seq-len fits"
    raise InputError(
        f"probing needs {need} on {device} but {gib(free)} is free, and does not fit even with "
        f"--probe-gradient-checkpointing --data-batch-size 1 ({fix}); use a device with more "
        "memory, or split the model over several (device_map='auto')"
    )


def _fitting_seq_len(skeleton, components, settings: ProbeSettings, free: int, seq_len: int) -> int | None:
    """The longest of seq_len / 2, / 4, ... (down to 16) that fits with checkpointing at micro-batch 1."""
    settings = replace(settings, gradient_checkpointing=True)
    length = seq_len // 2
    while length >= 16:
        trial = estimate(skeleton, components, settings, batch_size=1, seq_len=length, lora=False)
        if trial.probe_increase <= free:
            return length
        length //= 2
    return None
