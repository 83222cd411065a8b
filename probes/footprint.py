"""Peak memory of a probe pass (or any forward + backward), predicted by running it on the meta device.

A model built on the meta device (``allocator.discovery.modelio.load_skeleton``) runs its forward and backward
with the probes attached, on meta tensors of the real shapes: nothing is computed, but every tensor autograd,
the model and the probes create is, with its true size, and is freed when the real run would free it.
:class:`LiveBytes` (a ``TorchDispatchMode``) adds up the storage of every tensor created under it while it
lives, per device, and keeps the peak. So the prediction follows the model's own code: activations saved for
backward, the probed inputs the hooks hold, the accumulators and test matrices, the loss's float32 logits.

What it does not see: memory a kernel takes outside torch tensors (workspaces, the CPU allocator's
fragmentation, the CUDA context), and fused kernels the meta device lacks. Attention runs as the fused
(flash) kernel the real device picks, not the T x T math path the meta device would otherwise take
(:func:`_fused_attention_on_meta`). Data-dependent Python branches (``.item()`` on a meta tensor) see 0 /
False. ``docs/results/memory_model.md`` compares the prediction with measured peaks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from probes.hooks import ModuleProbe, Prober
from probes.settings import ProbeSettings

_SCALAR = torch.ops.aten._local_scalar_dense.default


class LiveBytes(TorchDispatchMode):
    """Storage bytes of the tensors created under this mode that are still alive, per device, and the peak.

    Storages that exist before the mode starts (``known``: the model's weights and buffers) are not counted.
    """

    def __init__(self, known: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for t in known:
            self.seen[t.untyped_storage()] = None
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)

    def _freed(self, device: str, n: int) -> None:
        self.live[device] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR and args[0].device.type == "meta":  # a data-dependent branch: take 0 / False
            return args[0].dtype.is_floating_point and 0.0 or (False if args[0].dtype == torch.bool else 0)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self.seen:
                    n, device = storage.nbytes(), str(t.device)
                    self.seen[storage] = n
                    self.live[device] += n
                    weakref.finalize(storage, self._freed, device, n)
                    self.peak[device] = max(self.peak[device], self.live[device])
        return out


def _flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention through the fused (flash) kernel, as CUDA and CPU run it: O(T) memory."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    return op(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def _fused_attention_on_meta():
    """Within: ``F.scaled_dot_product_attention`` on meta tensors takes the fused kernel's memory path."""
    original = nn.functional.scaled_dot_product_attention

    def sdpa(query, *args, **kwargs):
        if query.device.type == "meta":
            return _flash(query, *args, **kwargs)
        return original(query, *args, **kwargs)

    nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        nn.functional.scaled_dot_product_attention = original


def traced_peak(model: nn.Module, step: Callable[[], None]) -> dict[str, int]:
    """Peak bytes per device that ``step()`` adds to ``model`` (its weights and buffers not counted)."""
    known = [*model.parameters(), *model.buffers()]
    with _fused_attention_on_meta(), LiveBytes(known) as live:
        step()
    return dict(live.peak)


def _tokens(model: nn.Module, batch_size: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "labels": ids}


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


def probe_pass_peak(
    model: nn.Module,
    modules: Sequence[str],
    settings: ProbeSettings | None = None,
    *,
    batch_size: int = 4,
    seq_len: int = 256,
    n_batches: int = 2,
) -> dict[str, int]:
    """Peak bytes per device a probe pass adds to ``model`` (best on the meta device: nothing is computed).

    Runs what :func:`probes.run` runs per micro-batch (the same hooks, accumulators, test matrices and,
    with ``settings.gradient_checkpointing``, recomputation) over ``n_batches`` batches of
    ``batch_size`` x ``seq_len`` tokens; the finalisation (spectra of the state) is not included.
    """
    from probes.runner import _probing_state  # noqa: PLC0415 - the runner's own freeze/checkpoint setup

    settings = settings or ProbeSettings()
    dtype = getattr(torch, settings.dtype)
    table = dict(model.named_modules(remove_duplicate=False))
    by_id: dict[int, ModuleProbe] = {}
    for name in sorted(set(modules)):
        by_id.setdefault(id(table[name]), ModuleProbe([name], table[name], dtype))

    def step() -> None:
        prober = Prober(
            list(by_id.values()),
            dtype,
            settings.sketch_threshold,
            settings.sketch_dim,
            settings.seed,
            settings,
        )
        with _probing_state(model, ProbeSettings(**{**settings.to_dict(), "device": "model"})) as device:
            prober.attach(model)
            try:
                for i in range(n_batches):
                    batch = _tokens(model, batch_size, seq_len, device)
                    prober.begin_batch(i, torch.ones(batch_size, seq_len, dtype=torch.long))
                    with torch.enable_grad():
                        loss = model(**batch, use_cache=False).loss
                    prober.end_forward()
                    prober.in_backward = True
                    try:
                        loss.backward()
                    finally:
                        prober.in_backward = False
                    del loss
                    prober.end_batch()
            finally:
                prober.detach()

    return traced_peak(model, step)


def step_peak(
    model: nn.Module, *, batch_size: int = 4, seq_len: int = 256, n_steps: int = 2
) -> dict[str, int]:
    """Peak bytes per device that ``n_steps`` forward + backward passes of the model's loss add to it, with
    ``requires_grad`` as the caller set it (LoRA: the adapters only); gradients are dropped after each."""
    device = _input_device(model)

    def step() -> None:
        for _ in range(n_steps):
            batch = _tokens(model, batch_size, seq_len, device)
            model(**batch, use_cache=False).loss.backward()
            for p in model.parameters():
                if p.grad is not None:
                    del p.grad  # set_to_none, as optimizer.zero_grad() does

    return traced_peak(model, step)
