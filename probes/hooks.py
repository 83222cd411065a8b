"""Per-call-site hooks: pair each call's input X with the gradient δ of that call's output.

A forward hook on every probed ``nn.Linear`` keeps a reference to the input X (no copy) and registers a tensor
hook on the call's output Y. In backward that hook receives δ = ∂loss/∂Y for exactly this call and adds the
call's share of the module's micro-batch statistics: δᵀX (d_out, d_in) on the exact path, or the sketches
δᵀ(XΩ) (d_out, k) and (δΨ)ᵀX (l, d_in) on the sketched path (:mod:`probes.sketch`; no d_out × d_in product is
formed). They go to the accumulator once every call of the module has reported (or at the end of the batch).
No ``.grad`` is ever read: all weights stay frozen.

Input second moments are added once per distinct input tensor after the forward (q/k/v read one tensor, so
XᵀX, or X Ω, is formed once and, while they keep reading the same tensor, they share one accumulator). The
projection X Ω of that step is kept until the backward, where the gradient range sketches reuse it.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import nn

from probes.accumulators import ActAccumulator, GradAccumulator, SketchedGradAccumulator
from probes.sketch import corange_matrix, range_matrix


class ModuleProbe:
    """State of one probed module (one weight; all its call sites)."""

    def __init__(self, names: list[str], module: nn.Linear, dtype: torch.dtype) -> None:
        self.names, self.module = names, module
        self.d_in, self.d_out = module.in_features, module.out_features
        self.device = module.weight.device
        # exact until the Prober decides (allocates nothing before the first batch)
        self.grad: GradAccumulator | SketchedGradAccumulator = GradAccumulator(
            self.d_out, self.d_in, self.device, dtype
        )
        self.act: ActAccumulator | None = None
        self.n_calls = self.n_tokens = 0
        self.keys: list[tuple] = []  # input keys of this batch's calls, in call order
        self.pending = 0  # calls of this batch whose δ has not arrived
        self.partial = None  # G_b (or its sketches) summed over the calls that reported so far

    @property
    def sketched(self) -> bool:
        return isinstance(self.grad, SketchedGradAccumulator)

    @property
    def reuses_projection(self) -> bool:
        """Its gradient range sketch is G Ω with Ω on the input side: X Ω from the input moments serves it."""
        return self.sketched and not self.grad.transposed


class _Slot:
    __slots__ = ("x", "key")

    def __init__(self, x: torch.Tensor, key: tuple) -> None:
        self.x: torch.Tensor | None = x
        self.key = key


def _add(total, part):
    """Sum of two micro-batch contributions: tensors, or tuples of tensors (sketches), in place."""
    if total is None:
        return part
    if isinstance(total, tuple):
        return tuple(a.add_(b) for a, b in zip(total, part, strict=True))
    return total.add_(part)


def _key(x: torch.Tensor) -> tuple:
    """Identity of an input tensor's values (held alive for the batch, so addresses cannot be reused)."""
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, str(x.device), x._version)


class Prober:
    """Installs the hooks and turns one forward/backward into accumulator updates."""

    def __init__(self, probes: list[ModuleProbe], dtype: torch.dtype, sketch_threshold: int, sketch_dim: int,
                 seed: int, settings=None) -> None:
        """``settings`` (a ``ProbeSettings``) decides which modules keep gradient sketches; without it every
        module keeps the exact gradient halves."""
        self.probes, self.dtype = probes, dtype
        self.sketch_threshold, self.sketch_dim, self.seed = sketch_threshold, sketch_dim, seed
        self.width = sketch_dim  # columns of the shared Ω per input width: the widest any user needs
        self.handles: list = []
        self.in_backward = False
        self.serial = 0  # bumps every batch; stale tensor hooks compare against it
        self.batch_index = 0
        self.mask: torch.Tensor | None = None  # (B, T) bool, None when every position is real
        self.shape: tuple[int, int] = (0, 0)
        self._masks: dict[str, torch.Tensor] = {}
        self._inputs: dict[tuple, torch.Tensor] = {}
        self._omegas: dict[tuple, torch.Tensor] = {}
        self._psis: dict[tuple, torch.Tensor] = {}
        self._projected: dict[tuple, torch.Tensor] = {}  # input key -> X Ω (real tokens, width) this batch
        self.corange_width = 0
        if settings is not None:
            self.width = max(sketch_dim, settings.max_rank + settings.sketch_oversample)
            self.corange_width = settings.max_rank + settings.sketch_oversample + settings.corange_oversample
            for probe in probes:
                if settings.sketches_gradient(probe.d_in, probe.d_out):
                    k, width = settings.sketch_widths(probe.d_in, probe.d_out)
                    transposed = probe.d_in > probe.d_out  # range along the long side (less memory)
                    long, short = (probe.d_in, probe.d_out) if transposed else (probe.d_out, probe.d_in)
                    omega = self._full_omega(short, probe.device)  # range test matrix on the short side
                    psi = self._psi(long, width, probe.device)  # co-range test matrix on the long side
                    probe.grad = SketchedGradAccumulator(omega, psi, k, transposed)

    # --- installation -------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        for probe in self.probes:
            self.handles.append(
                probe.module.register_forward_hook(partial(self._on_forward, probe), with_kwargs=True)
            )
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(embeddings, nn.Module):  # makes every block's input require grad, as PEFT does
            self.handles.append(embeddings.register_forward_hook(self._on_embeddings))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_embeddings(self, module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            output.requires_grad_(True)

    # --- one batch ----------------------------------------------------------------------------------------

    def begin_batch(self, batch_index: int, attention_mask: torch.Tensor) -> None:
        self.serial += 1
        self.batch_index = batch_index
        self.shape = tuple(attention_mask.shape)
        real = attention_mask.bool()
        self.mask = None if bool(real.all()) else real
        self._masks = {}

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """(…, d) -> (real tokens, d): flatten, and drop padding when the leading dims are the batch's (B, T),
        also with singleton dims between (MLA's latent, (B, 1, T, d), deepseek_v3's kv_b_proj)."""
        flat = t.reshape(-1, t.shape[-1])
        if self.mask is None:
            return flat
        batch_like = [n for n in t.shape[:-1] if n != 1] == [n for n in self.shape if n != 1]
        if batch_like or (t.dim() == 2 and t.shape[0] == self.mask.numel()):
            key = str(t.device)
            if key not in self._masks:
                self._masks[key] = self.mask.reshape(-1).to(t.device)
            return flat[self._masks[key]]
        return flat  # tokens already routed or reshaped: every row is taken as real

    def _on_forward(self, probe: ModuleProbe, module, args, kwargs, output):
        if self.in_backward:  # recomputation under gradient checkpointing: the first forward already recorded
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return None
        x = x.detach()
        key = _key(x)
        self._inputs.setdefault(key, x)
        probe.keys.append(key)
        replaced = None
        if not output.requires_grad and torch.is_grad_enabled():
            # input does not depend on the embeddings: start the graph here (clone: in-place ops stay legal)
            replaced = output = output.detach().requires_grad_(True).clone()
        if output.requires_grad:
            probe.pending += 1
            output.register_hook(partial(self._on_grad, probe, _Slot(x, key), self.serial))
        return replaced

    def _on_grad(self, probe: ModuleProbe, slot: _Slot, serial: int, delta: torch.Tensor) -> None:
        if serial != self.serial or slot.x is None:
            return None
        x, slot.x = slot.x, None
        d2 = self._rows(delta).to(self.dtype)  # (tokens, d_out)
        x2 = self._rows(x).to(self.dtype)  # (tokens, d_in)
        x_omega = self._projected.get(slot.key) if probe.reuses_projection else None  # (tokens, width)
        # this call's share: δᵀX (d_out, d_in), or its sketches (δᵀXΩ (d_out, k), (δΨ)ᵀX (l, d_in))
        probe.partial = _add(probe.partial, probe.grad.contribution(d2, x2, x_omega))
        probe.pending -= 1
        if probe.pending == 0:
            self._flush(probe)
        return None

    def _flush(self, probe: ModuleProbe) -> None:
        if probe.partial is not None:
            probe.grad.update(probe.partial, self.batch_index)
            probe.partial = None

    def end_forward(self) -> None:
        """The loss is finite: count calls and tokens, add every distinct input's XᵀX to its accumulators."""
        parts: dict[tuple, list[ModuleProbe]] = defaultdict(list)
        for probe in self.probes:
            keys = tuple(probe.keys)
            if keys or probe.act is not None:
                parts[(id(probe.act) if probe.act is not None else None, keys)].append(probe)
        owned: set[int] = set()
        uses: dict[tuple, list[ActAccumulator]] = defaultdict(list)
        for (_, keys), members in parts.items():
            acc = members[0].act
            if acc is None:
                acc = self.new_act(members[0])
            elif id(acc) in owned:  # members that shared it read different inputs now: split, history intact
                acc = acc.clone()
            owned.add(id(acc))
            for probe in members:
                probe.act = acc
            for key in keys:
                uses[key].append(acc)
        sketched_keys = {key for probe in self.probes if probe.reuses_projection for key in probe.keys}
        rows = {}
        for key, accs in uses.items():
            x2 = self._rows(self._inputs[key]).to(self.dtype)  # (tokens, d_in)
            rows[key] = x2.shape[0]
            x_omega = None
            if key in sketched_keys or any(acc.sketched for acc in accs):
                x_omega = x2 @ self._omegas[(x2.shape[1], str(x2.device))]  # (tokens, width), once per input
                if key in sketched_keys:
                    self._projected[key] = x_omega  # for the gradient range sketches in backward
            for acc in accs:  # one accumulator per key, except right after a split
                acc.update(x2, x_omega)
            del x2, x_omega
        for probe in self.probes:
            probe.n_calls += len(probe.keys)
            probe.n_tokens += sum(rows[k] for k in probe.keys)
            probe.keys = []
        self._inputs = {}

    def end_batch(self) -> None:
        """After backward: flush gradients of calls whose siblings never got a δ (their share is exactly
        0)."""
        for probe in self.probes:
            self._flush(probe)
            probe.pending = 0
        self._masks, self._projected = {}, {}

    def discard_batch(self) -> None:
        """Forget a skipped batch (non-finite loss): nothing of it reaches the accumulators."""
        self.serial += 1
        for probe in self.probes:
            probe.keys, probe.pending, probe.partial = [], 0, None
        self._inputs, self._masks, self._projected = {}, {}, {}

    def new_act(self, probe: ModuleProbe) -> ActAccumulator:
        """An empty input-moment accumulator for ``probe`` (sketched when d_in > sketch_threshold)."""
        return ActAccumulator(probe.d_in, probe.device, self.dtype, self._omega(probe))

    def _omega(self, probe: ModuleProbe) -> torch.Tensor | None:
        """The Nystrom test matrix (d_in, s): the first s columns of the shared Ω, or None (exact moment)."""
        if probe.d_in <= self.sketch_threshold:
            return None
        return self._full_omega(probe.d_in, probe.device)[:, : min(self.sketch_dim, probe.d_in)]

    def _full_omega(self, dim: int, device: torch.device) -> torch.Tensor:
        """Ω (dim, width) shared by every sketch acting on a side of this width on this device (the first
        columns of a wider seeded matrix are a valid narrower one: QR keeps the leading columns' span)."""
        key = (dim, str(device))
        if key not in self._omegas:
            self._omegas[key] = range_matrix(dim, min(self.width, dim), self.seed, device, self.dtype)
        return self._omegas[key]

    def _psi(self, dim: int, width: int, device: torch.device) -> torch.Tensor:
        """Ψ (dim, l) shared by every co-range sketch on a side of this width on this device."""
        key = (dim, str(device))
        if key not in self._psis:  # one width per dim, whatever order the modules come in
            full = min(max(self.corange_width, width), dim)
            self._psis[key] = corange_matrix(dim, full, self.seed, device, self.dtype)
        return self._psis[key][:, :width]

    @property
    def n_test_matrix_bytes(self) -> int:
        """Bytes of the shared test matrices (held for the whole run)."""
        mats = list(self._omegas.values()) + list(self._psis.values())
        return sum(m.numel() * m.element_size() for m in mats)
