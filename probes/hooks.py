"""Per-call-site hooks: pair each call's input X with the gradient δ of that call's output.

A forward hook on every probed ``nn.Linear`` keeps a reference to the input X (no copy) and registers a tensor
hook on the call's output Y. In backward that hook receives δ = ∂loss/∂Y for exactly this call, forms
δᵀX (d_out, d_in) over the real tokens and adds it to the module's micro-batch gradient G_b; G_b goes to the
accumulator once every call of the module has reported (or at the end of the batch). No ``.grad`` is ever
read:
all weights stay frozen.

Input second moments are added once per distinct input tensor after the forward (q/k/v read one tensor, so
XᵀX is formed once and, while they keep reading the same tensor, they share one accumulator).
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import nn

from probes.accumulators import ActAccumulator, GradAccumulator
from probes.spectra import gaussian_test_matrix


class ModuleProbe:
    """State of one probed module (one weight; all its call sites)."""

    def __init__(self, names: list[str], module: nn.Linear, dtype: torch.dtype) -> None:
        self.names, self.module = names, module
        self.d_in, self.d_out = module.in_features, module.out_features
        self.device = module.weight.device
        self.grad = GradAccumulator(self.d_out, self.d_in, self.device, dtype)
        self.act: ActAccumulator | None = None
        self.n_calls = self.n_tokens = 0
        self.keys: list[tuple] = []  # input keys of this batch's calls, in call order
        self.pending = 0  # calls of this batch whose δ has not arrived
        self.partial: torch.Tensor | None = None  # G_b summed over the calls that reported so far


class _Slot:
    __slots__ = ("x",)

    def __init__(self, x: torch.Tensor) -> None:
        self.x: torch.Tensor | None = x


def _key(x: torch.Tensor) -> tuple:
    """Identity of an input tensor's values (held alive for the batch, so addresses cannot be reused)."""
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, str(x.device), x._version)


class Prober:
    """Installs the hooks and turns one forward/backward into accumulator updates."""

    def __init__(self, probes: list[ModuleProbe], dtype: torch.dtype, sketch_threshold: int, sketch_dim: int,
                 seed: int) -> None:
        self.probes, self.dtype = probes, dtype
        self.sketch_threshold, self.sketch_dim, self.seed = sketch_threshold, sketch_dim, seed
        self.handles: list = []
        self.in_backward = False
        self.serial = 0  # bumps every batch; stale tensor hooks compare against it
        self.batch_index = 0
        self.mask: torch.Tensor | None = None  # (B, T) bool, None when every position is real
        self.shape: tuple[int, int] = (0, 0)
        self._masks: dict[str, torch.Tensor] = {}
        self._inputs: dict[tuple, torch.Tensor] = {}
        self._omegas: dict[tuple, torch.Tensor] = {}

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
        """(…, d) -> (real tokens, d): flatten, and drop padding when the leading dims are the batch's (B,
        T)."""
        flat = t.reshape(-1, t.shape[-1])
        if self.mask is None:
            return flat
        if tuple(t.shape[:-1]) == self.shape or (t.dim() == 2 and t.shape[0] == self.mask.numel()):
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
            output.register_hook(partial(self._on_grad, probe, _Slot(x), self.serial))
        return replaced

    def _on_grad(self, probe: ModuleProbe, slot: _Slot, serial: int, delta: torch.Tensor) -> None:
        if serial != self.serial or slot.x is None:
            return None
        x, slot.x = slot.x, None
        d2 = self._rows(delta).to(self.dtype)  # (tokens, d_out)
        x2 = self._rows(x).to(self.dtype)  # (tokens, d_in)
        grad = d2.T @ x2  # (d_out, d_in): this call's share of the weight gradient
        probe.partial = grad if probe.partial is None else probe.partial.add_(grad)
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
        rows = {}
        for key, accs in uses.items():
            x2 = self._rows(self._inputs[key]).to(self.dtype)  # (tokens, d_in)
            rows[key] = x2.shape[0]
            for acc in accs:  # one accumulator per key, except right after a split
                acc.update(x2)
            del x2
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
        self._masks = {}

    def discard_batch(self) -> None:
        """Forget a skipped batch (non-finite loss): nothing of it reaches the accumulators."""
        self.serial += 1
        for probe in self.probes:
            probe.keys, probe.pending, probe.partial = [], 0, None
        self._inputs, self._masks = {}, {}

    def new_act(self, probe: ModuleProbe) -> ActAccumulator:
        """An empty input-moment accumulator for ``probe`` (sketched when d_in > sketch_threshold)."""
        return ActAccumulator(probe.d_in, probe.device, self.dtype, self._omega(probe))

    def _omega(self, probe: ModuleProbe) -> torch.Tensor | None:
        if probe.d_in <= self.sketch_threshold:
            return None
        key = (probe.d_in, str(probe.device))
        if key not in self._omegas:
            self._omegas[key] = gaussian_test_matrix(
                probe.d_in, self.sketch_dim, self.seed, probe.device, self.dtype
            )
        return self._omegas[key]
