"""Stage 2, routed experts: statistics of 3-D expert parameters from the tokens routed to each expert.

transformers stores the routed experts of every MoE family it ships (mixtral, qwen3_moe, qwen3_next,
qwen3_5_moe, granitemoehybrid, nemotron_h, jamba, lfm2_moe, minimax, kimi_linear, bailing_hybrid,
deepseek_v3, ...) in one ``*Experts`` module holding ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` of
shape (E, d_out, d_in), (E, d_in, d_out) when ``is_transposed``, laid out as
``transformers.integrations.moe.use_experts_implementation`` declares (``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``, ``_apply_gate``). While probing, :class:`ExpertProber` runs the
module's forward expert by expert in that layout (the same function as transformers' ``batched_mm``/
``grouped_mm`` paths; a test checks equal outputs), so each expert's input X_e and output gradient δ_e are
seen by hooks, and the weights stay frozen: no expert gradient is ever formed.

Per 3-D parameter (its E experts pooled) the state is O(s · d_in), s = k + oversample, independent of E:

- the stacked gradient S = [G_1; ...; G_E] (E·d_out, d_in), G_e = Σ_b δ_eᵀ X_e, is kept as the co-range sketch
  W = Ψᵀ S = Σ_e (δ_e Ψ_e)ᵀ X_e (s, d_in), Ψ_e Gaussian (d_out, s) regenerated from a seed per expert, per
  calibration half (even/odd batch). ``grad_singular_values`` are the top σ of W, which estimate those of S.
  By Ky Fan, Σ_{i<=r} σ_i(S)² <= Σ_e Σ_{i<=r} σ_i(G_e)²: the pooled curve is what rank-r adapters sharing one
  input subspace reach, a lower bound of PEFT's per-expert rank-r adapters, with the same total energy ‖S‖² =
  Σ_e ‖G_e‖²;
- ``heldout_capture``: the share of the odd half's sketch captured by the even half's top right singular
  subspace (and back), as for linears;
- ``grad_norm_sum``/``grad_sq_sum``: exact, ‖G_b‖_F² = Σ_e ‖δ_eᵀX_e‖_F² from token Gram matrices
  (n_e × n_e) or the expert's d_out × d_in product, whichever is smaller, one expert at a time;
- input second moment of the routed rows, pooled over experts (exact up to ``sketch_threshold``, Nyström above
  it);
- tokens routed per expert: experts the calibration never reached are counted in ``n_unrouted``; a
  parameter none of whose experts was reached has status ``no_input``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from probes.errors import ProbeError
from probes.report import UNMEASURED, ModuleStats

LAYOUT_ATTRS = ("has_gate", "has_bias", "is_transposed")  # set by use_experts_implementation


def split_names(model: nn.Module, names: Any) -> tuple[list[str], Any]:
    """(3-D expert parameter names, the other names) of ``names``; anything not a list passes unchanged."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        return [], names
    table = dict(model.named_modules(remove_duplicate=False))
    experts, rest = [], []
    for name in names:
        owner, _, leaf = name.rpartition(".")
        param = getattr(table.get(owner), leaf, None) if name not in table else None
        (experts if isinstance(param, nn.Parameter) and param.dim() == 3 else rest).append(name)
    return experts, rest


def check_layout(module: nn.Module, name: str, model: nn.Module) -> None:
    """ProbeError unless ``module`` declares the layout of transformers' experts interface."""
    missing = [a for a in LAYOUT_ATTRS if not hasattr(module, a)]
    if missing or not hasattr(module, "down_proj"):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ProbeError(
            f"{name} is a {type(module).__name__} (model_type {model_type!r}) without the expert layout of "
            f"transformers' use_experts_implementation (missing {missing or ['down_proj']}); its experts "
            "cannot be probed: leave them out with SolverSettings(exclude=('experts',)) (--solver-exclude "
            "experts), or load the model with transformers >= 5 so its experts are 3-D parameters"
        )


def check_layouts(model: nn.Module, names: Any) -> None:
    """:func:`check_layout` for the owner of every 3-D expert parameter among ``names`` (before any pass that
    would fail inside the model's own forward, as a warm-up does)."""
    table = dict(model.named_modules(remove_duplicate=False))
    for name in split_names(model, names)[0]:
        owner = name.rpartition(".")[0]
        check_layout(table[owner], owner, model)


class _ParamState:
    """Sketches and counts of one 3-D expert parameter (all its experts pooled)."""

    def __init__(
        self,
        name: str,
        param: nn.Parameter,
        d_in: int,
        d_out: int,
        dtype: torch.dtype,
        settings: Any,
        index: int,
    ) -> None:
        self.name, self.d_in, self.d_out, self.dtype = name, d_in, d_out, dtype
        self.n_experts, self.device = int(param.shape[0]), param.device
        self.k = min(settings.max_rank, d_in, d_out)
        self.s = min(self.k + settings.svd_oversample, self.n_experts * d_out)
        self.seed = settings.seed * 1_000_003 + index * 4099
        self.halves = torch.zeros((2, self.s, d_in), dtype=dtype, device=self.device)  # W of even/odd
        self.tokens = torch.zeros(self.n_experts, dtype=torch.float64, device=self.device)
        self.norm_sum = self.sq_sum = 0.0
        self.batch_sq: torch.Tensor | None = None
        self.n_batches = self.n_calls = 0
        sketch = d_in > settings.sketch_threshold
        self.omega = (
            _gaussian(d_in, settings.sketch_dim, self.seed + 1, self.device, dtype) if sketch else None
        )
        self.moment = torch.zeros(
            (d_in, d_in if self.omega is None else self.omega.shape[1]), dtype=dtype, device=self.device
        )
        self.trace = 0.0

    def psi(self, expert: int) -> torch.Tensor:
        """Ψ_e (d_out, s), entries N(0, 1/s): regenerated, never stored."""
        return _gaussian(self.d_out, self.s, self.seed + 2 + expert, self.device, self.dtype)

    def add_input(self, x: torch.Tensor, expert: int) -> None:
        """Routed rows x (n_e, d_in) of one expert: token count and input second moment."""
        self.tokens[expert] += x.shape[0]
        x = x.to(self.dtype)
        self.moment.addmm_(x.T, x if self.omega is None else x @ self.omega)
        self.trace += float(x.square().sum(dtype=torch.float64))

    def add_grad(self, x: torch.Tensor, delta: torch.Tensor, expert: int, half: int) -> None:
        """One expert's share of this batch: x (n_e, d_in), δ (n_e, d_out)."""
        x, delta = x.to(self.dtype), delta.to(self.dtype)
        n = x.shape[0]
        if n * n <= self.d_in * self.d_out:  # ‖δᵀx‖² = <δδᵀ, xxᵀ> on the token Gram matrices
            sq = ((delta @ delta.T) * (x @ x.T)).sum(dtype=torch.float64)
        else:
            sq = (delta.T @ x).square().sum(dtype=torch.float64)
        self.batch_sq = sq if self.batch_sq is None else self.batch_sq + sq
        self.halves[half].addmm_((delta @ self.psi(expert)).T, x)  # (s, d_in)

    def end_batch(self) -> None:
        if self.batch_sq is not None:
            sq = float(self.batch_sq)
            self.norm_sum += math.sqrt(sq)
            self.sq_sum += sq
            self.n_batches += 1
        self.batch_sq = None

    def all_reduce(self) -> None:
        scalars = torch.tensor(
            [self.norm_sum, self.sq_sum, self.n_batches, self.n_calls, self.trace],
            dtype=torch.float64,
            device=self.device,
        )
        for tensor in (self.halves, self.tokens, self.moment, scalars):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self.norm_sum, self.sq_sum, n_batches, n_calls, self.trace = scalars.tolist()
        self.n_batches, self.n_calls = int(n_batches), int(n_calls)

    def finalize(self) -> ModuleStats:
        n_tokens = int(self.tokens.sum())
        unrouted = int((self.tokens == 0).sum())
        out: dict[str, Any] = {
            **UNMEASURED,
            "status": "ok",
            "n_tokens": n_tokens,
            "n_batches": self.n_batches,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "n_calls": self.n_calls,
            "n_experts": self.n_experts,
            "n_unrouted": unrouted,
        }
        if n_tokens == 0:
            return ModuleStats(**{**out, "status": "no_input"})
        finite = all(bool(torch.isfinite(t).all()) for t in (self.halves, self.moment))
        if not (finite and math.isfinite(self.sq_sum)):
            return ModuleStats(**{**out, "status": "nonfinite"})
        out.update(
            act_eigenvalues=(_eigenvalues(self.moment, self.omega) / n_tokens).cpu().numpy(),
            act_trace=self.trace / n_tokens,
            act_sketched=self.omega is not None,
        )
        if self.n_batches == 0:
            return ModuleStats(**{**out, "status": "no_gradient"})
        even, odd = self.halves.to(torch.float64)
        total = even + odd
        out.update(
            grad_norm_sum=self.norm_sum,
            grad_sq_sum=self.sq_sum,
            fisher_trace=self.sq_sum / self.n_batches,
            grad_total_sq=float(total.square().sum()),
            grad_singular_values=torch.linalg.svdvals(total)[: self.k].cpu().numpy(),
            heldout_capture=_heldout(even, odd, self.k).cpu().numpy(),
        )
        return ModuleStats(**out)


class ExpertProber:
    """Runs probed ``*Experts`` modules expert by expert during the probe pass and keeps their sketches.

    Lifecycle (called by :func:`probes.run` beside the linear prober): ``attach``, then per batch
    ``begin_batch`` / ``end_batch`` (or ``discard_batch``), ``detach``, ``finalize``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], dtype: torch.dtype, settings: Any,
                 seed_order: Sequence[str] | None = None) -> None:
        """``seed_order``: every expert parameter probed over all passes (default ``names``): a parameter's
        test matrices are seeded by its place there, so splitting the probing into passes changes nothing."""
        table = dict(model.named_modules(remove_duplicate=False))
        self.model, self.states, self.owners = model, {}, {}
        place = {name: i for i, name in enumerate(sorted(set(seed_order or names)))}
        for name in sorted(set(names)):
            index = place[name]
            owner_name, _, leaf = name.rpartition(".")
            owner = table[owner_name]
            check_layout(owner, owner_name, model)
            param = getattr(owner, leaf)
            if param.device.type == "meta":
                raise ProbeError(
                    f"{name} has no weights in memory (meta device); load the model without disk/CPU offload"
                )
            e, a, b = (int(v) for v in param.shape)
            d_in, d_out = (a, b) if owner.is_transposed else (b, a)
            self.states[name] = _ParamState(name, param, d_in, d_out, dtype, settings, index)
            self.owners.setdefault(owner_name, (owner, {}))[1][leaf] = self.states[name]
        self.in_backward = False
        self.half, self.serial, self.mask = 0, 0, None
        self._saved: list[tuple[nn.Module, Any]] = []

    def attach(self) -> None:
        for owner, probed in self.owners.values():
            self._saved.append((owner, owner.__dict__.get("forward")))
            owner.forward = types.MethodType(_probe_forward(self, probed), owner)

    def detach(self) -> None:
        for owner, forward in self._saved:
            if forward is None:
                owner.__dict__.pop("forward", None)
            else:
                owner.forward = forward
        self._saved = []

    def begin_batch(self, batch_index: int, attention_mask: torch.Tensor) -> None:
        self.serial += 1
        self.half = batch_index % 2
        real = attention_mask.bool().reshape(-1)
        self.mask = None if bool(real.all()) else real

    def end_batch(self) -> None:
        for state in self.states.values():
            state.end_batch()

    def discard_batch(self) -> None:
        self.serial += 1
        for state in self.states.values():
            state.batch_sq = None

    def finalize(self, world: int) -> dict[str, ModuleStats]:
        if world > 1:
            for name in sorted(self.states):
                self.states[name].all_reduce()
        return {name: state.finalize() for name, state in self.states.items()}

    def real_rows(self, n_rows: int, device: torch.device) -> torch.Tensor | None:
        """(n_rows,) bool of real (unpadded) tokens when the experts see the batch's flattened tokens."""
        if self.mask is None or self.mask.numel() != n_rows:
            return None
        return self.mask.to(device)

    def capture(
        self, state: _ParamState, expert: int, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor | None
    ) -> None:
        """Count x's rows, and pair x with the gradient of y when it arrives (real tokens only)."""
        if state is None or self.in_backward:
            return
        x = x.detach() if real is None else x.detach()[real]
        state.add_input(x, expert)
        state.n_calls += 1
        if y.requires_grad and torch.is_grad_enabled():
            serial, half = self.serial, self.half

            def on_grad(delta: torch.Tensor) -> None:
                if serial == self.serial:
                    state.add_grad(x, delta if real is None else delta[real], expert, half)

            y.register_hook(on_grad)


def _probe_forward(prober: ExpertProber, probed: dict[str, _ParamState]):
    """The experts' forward, one expert at a time, in the layout ``use_experts_implementation`` declares."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        up_name = "gate_up_proj" if self.has_gate else "up_proj"
        up, down = getattr(self, up_name), self.down_proj
        up_bias = getattr(self, f"{up_name}_bias", None) if self.has_bias else None
        down_bias = getattr(self, "down_proj_bias", None) if self.has_bias else None
        mask = prober.real_rows(hidden_states.shape[0], hidden_states.device)
        out = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)  # (tokens, hidden)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < up.shape[0]:  # expert-parallel sentinels
                continue
            token, slot = torch.where(top_k_index == expert)  # (n_e,)
            real = None if mask is None else mask[token]
            x = hidden_states[token]  # (n_e, d_in)
            h = _linear(x, up[expert], None if up_bias is None else up_bias[expert], self.is_transposed)
            prober.capture(probed.get(up_name), expert, x, h, real)
            a = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (n_e, intermediate)
            y = _linear(a, down[expert], None if down_bias is None else down_bias[expert], self.is_transposed)
            prober.capture(probed.get("down_proj"), expert, a, y, real)
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out.to(hidden_states.dtype)

    return forward


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else F.linear(x, w)  # (n, d_out)
    return y if b is None else y + b


def _gaussian(rows: int, cols: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows, cols) entries N(0, 1/cols), reproducible from ``seed`` on any device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))
    return (torch.randn(rows, cols, generator=gen, dtype=torch.float32) / math.sqrt(cols)).to(device, dtype)


def _eigenvalues(moment: torch.Tensor, omega: torch.Tensor | None) -> torch.Tensor:
    """Descending eigenvalues of the exact moment, or Nyström estimates from the sketch C Ω."""
    m = moment.to(torch.float64)
    if omega is None:
        return torch.linalg.eigvalsh((m + m.T) / 2).flip(0).clamp_min(0)
    om = omega.to(torch.float64)
    nu = 1e-10 * float(torch.linalg.matrix_norm(m)) + 1e-300
    y = m + nu * om  # (d, s)
    core = om.T @ y
    vals, vecs = torch.linalg.eigh((core + core.T) / 2)
    keep = vals > vals.max() * 1e-12
    b = y @ vecs[:, keep] / vals[keep].sqrt()  # (d, s'): C ≈ B Bᵀ
    return (torch.linalg.svdvals(b).square() - nu).clamp_min(0)


def _heldout(even: torch.Tensor, odd: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) symmetric held-out capture from the two halves' sketches; empty when a half is empty."""
    curves = []
    for fit, test in ((even, odd), (odd, even)):
        energy = float(test.square().sum())
        if not energy > 0 or not float(fit.square().sum()) > 0:
            return torch.zeros(0)
        v = torch.linalg.svd(fit, full_matrices=False).Vh[:k].T  # (d_in, k)
        captured = (test @ v).square().sum(dim=0).cumsum(0) / energy  # (k,)
        curves.append(captured)
    n = min(c.shape[0] for c in curves)
    return ((curves[0][:n] + curves[1][:n]) / 2).clamp(0, 1)
