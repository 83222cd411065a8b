"""Gradient- and weight-driven LoRA baselines of the placement benchmark, each at the budget ``B`` exactly.

- ``gora``: GoRA (He et al. 2025, "GoRA: Gradient-driven Adaptive Low Rank Adaptation", arXiv 2502.12171),
  implemented here from the paper, with the authors' code (github.com/hhnqqq/MyTransformers,
  ``common/lora_modules/gora.py``) and their experiment scripts read for its defaults. Its **ranks**: each
  module's importance is ``mean(|W ⊙ G|)`` (the paper's default score), ``G`` the calibration gradient of the
  module's base weight accumulated over the calibration micro-batches; importances are normalised to shares
  ``a_i``, and module ``i`` gets ``a_i * B`` parameters, i.e. rank ``round(a_i * B / (d_in + d_out))``,
  clipped to ``[r // 2, 4 r]`` (the authors' r_min = r_ref / 2, r_max = 4 r_ref; also at most
  ``min(d_in, d_out)``). Rounding and clipping leave the total off ``B``; the shares are rescaled by the
  largest factor that keeps it ``<= B`` and the rest closed with ``placement_conditions.fill`` (rank + 1 where
  the rounded rank falls furthest below its share). Its **init** (the paper's gradient compression): lora_A
  keeps PEFT's random (Kaiming) draw, lora_B is the least-squares solution that makes the adapter's product a
  descent step along the gradient compressed into lora_A's row space, ``s B0 A0 = -xi sqrt(d_in / r) G A0^T
  (A0 A0^T)^-1 A0`` (``s`` = alpha / r; ``sqrt(d_in / r)`` restores the norm a random r-dimensional projection
  removes, as the authors' "scale by lr" option; ``xi`` = :data:`GORA_STEP`, their ``--gora-lr``). As in the
  paper, the base weights are left alone, so the model starts one small gradient step from the base model;
  ``gora_keep_output`` (``keep_output=True``) subtracts ``s B0 A0`` from them instead (output unchanged at
  init, LoRA-GA's way).
- ``loraga``: PEFT's LoRA-GA (Wang et al. 2024, arXiv 2407.05000; ``init_lora_weights="lora_ga"``, PEFT's
  default ``LoraGAConfig``), gradients from ``peft.tuners.lora.loraga.preprocess_loraga`` with a train step
  over the same calibration micro-batches; it needs ``2 r`` singular directions of the gradient.
- ``pissa``: PEFT's PiSSA (Meng et al. 2024, arXiv 2404.02948; ``init_lora_weights="pissa"``, full SVD): the
  top ``r`` singular directions of each weight, which it needs ``r`` of.

LoRA-GA and PiSSA run at uniform's ranks; where a module has fewer directions than its rank needs (qwen3_5's
8-wide ``in_proj_a``/``in_proj_b`` at r16), its rank is capped there and the freed parameters are closed with
``fill`` in module order, so the budget stays exact. Both change the base weights so the model's output is
unchanged at init.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraGAConfig
from peft.tuners.lora.loraga import preprocess_loraga

from allocator.discovery.component import Component
from allocator.output.export import to_lora_config
from allocator.tuning.finetune import token_loss_sum
from benchmarks.placement_conditions import Ranks, cost, fill

BASELINES = ("gora", "gora_keep_output", "loraga", "pissa")
GORA_STEP = 5e-2  # xi: the norm of the init's gradient step (the authors' --gora-lr in their Llama scripts)
ALPHA_RATIO = 2.0  # LoRA alpha = 2r, the benchmark's constant scale


@dataclass
class Init:
    """What a baseline does beyond its LoraConfig: ``tag`` (the plan's identity for reuse), ``apply`` on the
    built PeftModel, and ``grads`` attached to the base model's modules while PEFT builds the adapters
    (LoRA-GA's ``_peft_loraga_grad``)."""

    tag: str
    apply: Callable[[torch.nn.Module], None] | None = None
    grads: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, peft_model: torch.nn.Module) -> None:
        if self.apply is not None:
            self.apply(peft_model)

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block, each module of ``grads`` carries its gradient where PEFT's LoRA-GA init reads it
        (a deep copy made in the block keeps it); removed from ``model`` afterwards."""
        modules = {n: model.get_submodule(n) for n in self.grads}
        try:
            for n, m in modules.items():
                m._peft_loraga_grad = self.grads[n]
            yield
        finally:
            for m in modules.values():
                if hasattr(m, "_peft_loraga_grad"):
                    del m._peft_loraga_grad


def _train_step(model: torch.nn.Module, batches: Sequence[Mapping]) -> Callable[[], None]:
    def step() -> None:  # one backward of the mean token loss per micro-batch; gradients accumulate
        for b in batches:
            loss_sum, n = token_loss_sum(model, b)
            (loss_sum / max(1, n)).backward()

    return step


def calibration_gradients(model: torch.nn.Module, eligible: Sequence[Component],
                          batches: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """``{name: G}``: the gradient of the mean token loss with respect to each module's base weight (d_out x
    d_in, float32), averaged over the calibration micro-batches; only those weights require grad meanwhile,
    and the model's flags, grads and mode are restored."""
    modules = {c.name: model.get_submodule(c.name) for c in eligible}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was = model.training
    grads = {n: torch.zeros(m.weight.shape) for n, m in modules.items()}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        model.train()
        for b in batches:
            _train_step(model, [b])()
            for n, m in modules.items():
                if m.weight.grad is not None:
                    grads[n] += m.weight.grad.detach().float()
                m.weight.grad = None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)
    return {n: g / max(1, len(batches)) for n, g in grads.items()}


def gora_ranks(eligible: Sequence[Component], weights: Mapping[str, torch.Tensor],
               grads: Mapping[str, torch.Tensor], budget: int, rank: int) -> tuple[Ranks, int, dict]:
    """GoRA's ranks at exactly ``budget`` parameters (module docstring): importance ``mean(|W ⊙ G|)``,
    normalised, spent proportionally in parameters, clipped to ``[rank // 2, 4 rank]`` (and ``min(d_in,
    d_out)``), rescaled to fit and closed by ``fill``. Returns ranks, parameters ``fill`` added, and info."""
    comps = {c.name: c for c in eligible}
    importance = {n: float((weights[n].float() * grads[n]).abs().mean()) for n in comps}
    total = sum(importance.values())
    if not total > 0:
        raise ValueError("GoRA: every calibration gradient is zero")
    target = {n: importance[n] / total * budget / comps[n].n_params_per_rank for n in comps}  # rank, real
    cap = {n: max(1, min(4 * rank, comps[n].d_in, comps[n].d_out)) for n in comps}
    low = {n: min(rank // 2, cap[n]) for n in comps}

    def place(scale: float) -> Ranks:
        return {n: min(cap[n], max(low[n], round(scale * t))) for n, t in target.items()}

    lo, hi = 0.0, 1.0
    while cost(place(hi), comps) <= budget and hi < 1e6:  # the caps may leave budget at scale 1
        lo, hi = hi, 2 * hi
    for _ in range(60):  # the largest scale whose rounded, clipped ranks cost <= budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(place(mid), comps) <= budget else (lo, mid)
    ranks = place(lo)
    order = sorted(comps, key=lambda n: (ranks[n] - lo * target[n], n))  # furthest below its share first
    out, added = fill(ranks, comps, budget, order, cap=lambda c: cap[c.name])
    info = {"scale": lo, "importance": importance}
    return out, added, info


def gora_init(grads: Mapping[str, torch.Tensor], ranks: Mapping[str, int], *, step: float = GORA_STEP,
              keep_output: bool = False) -> Init:
    """GoRA's init on a PeftModel built with PEFT's default lora_A: lora_B = the least-squares ``B`` with
    ``s B A = -step sqrt(d_in / r) G A^T (A A^T)^-1 A`` (``s`` the module's LoRA scale). ``keep_output``:
    subtract ``s B A`` from the base weight (the output unchanged at init; not the paper's choice)."""

    def apply(peft_model: torch.nn.Module) -> None:
        done = set()
        with torch.no_grad():
            for name, module in peft_model.named_modules():
                base = name.removeprefix("base_model.model.")
                if ranks.get(base, 0) <= 0 or "default" not in getattr(module, "lora_A", {}):
                    continue
                a = module.lora_A["default"].weight  # (r, d_in): PEFT's seeded Kaiming draw
                lora_b = module.lora_B["default"].weight  # (d_out, r)
                s, (r, d_in) = module.scaling["default"], a.shape
                g = grads[base].to(torch.float64)  # (d_out, d_in)
                x = torch.linalg.lstsq(a.T.to(torch.float64), g.T).solution  # (r, d_out) = (A A^T)^-1 A G^T
                b = -(step / s) * (d_in / r) ** 0.5 * x.T
                lora_b.copy_(b.to(lora_b.dtype))
                if keep_output:
                    weight = module.get_base_layer().weight
                    weight.sub_((s * b @ a.to(torch.float64)).to(weight.dtype))
                done.add(base)
        missing = sorted(n for n, r in ranks.items() if r > 0 and n not in done)
        if missing:
            raise ValueError(f"GoRA init reached no adapter for {missing[:3]}")

    return Init(tag=f"gora-{step:g}{'-keep' * keep_output}", apply=apply)


def init_ranks(eligible: Sequence[Component], rank: int, budget: int, need: int) -> tuple[Ranks, int]:
    """Uniform rank, capped where a module has fewer than ``need x rank`` directions (``need`` 1: PiSSA, 2:
    LoRA-GA), the freed parameters closed by ``fill`` in module order; uniform's ranks where nothing is
    capped."""
    comps = {c.name: c for c in eligible}
    cap = {n: max(1, min(c.d_in, c.d_out) // need) for n, c in comps.items()}
    ranks = {n: min(rank, cap[n]) for n in comps}
    if ranks == {n: rank for n in comps}:
        return ranks, 0
    return fill(ranks, comps, budget, list(comps), cap=lambda c: cap[c.name])


def loraga_gradients(model: torch.nn.Module, eligible: Sequence[Component],
                     batches: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """PEFT's ``preprocess_loraga`` with a train step over ``batches``; the gradients it attached to the
    modules, taken off them (``Init.attach`` puts them back while a run builds its adapters)."""
    config = to_lora_config({c.name: 1 for c in eligible}, eligible, alpha_ratio=ALPHA_RATIO,
                            init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    preprocess_loraga(model, config, _train_step(model, batches))
    out = {}
    for c in eligible:
        module = model.get_submodule(c.name)
        out[c.name] = module._peft_loraga_grad
        del module._peft_loraga_grad
    return out


def plan(condition: str, eligible: Sequence[Component], components: Sequence[Component], rank: int,
         budget: int, gradients: Callable[[], Mapping], loraga_grads: Callable[[], Mapping],
         weights: Mapping[str, torch.Tensor]) -> tuple[Any, Init, Ranks, int, str]:
    """``(lora_config, init, ranks, fill_params, note)`` of a baseline; ``gradients()`` /
    ``loraga_grads()`` give the (cached) calibration gradients, ``weights`` the base weights by module."""
    if condition in ("gora", "gora_keep_output"):  # the latter: base weights offset, output unchanged at init
        ranks, added, info = gora_ranks(eligible, weights, gradients(), budget, rank)
        init = gora_init(gradients(), ranks, keep_output=condition == "gora_keep_output")
        config = to_lora_config(ranks, components, alpha_ratio=ALPHA_RATIO)
        return config, init, ranks, added, (f"GoRA: shares x {info['scale']:.3f}, ranks "
                                            f"{min(ranks.values())}-{max(ranks.values())}, init step "
                                            f"{GORA_STEP:g}")
    need = {"pissa": 1, "loraga": 2}[condition]
    ranks, added = init_ranks(eligible, rank, budget, need)
    capped = sorted(n for n, r in ranks.items() if r < rank)
    note = f"{len(capped)} modules capped at {need} x rank <= min(d_in, d_out)" if capped else ""
    if condition == "pissa":
        config = to_lora_config(ranks, components, alpha_ratio=ALPHA_RATIO, init_lora_weights="pissa")
        return config, Init(tag="pissa"), ranks, added, note
    config = to_lora_config(ranks, components, alpha_ratio=ALPHA_RATIO, init_lora_weights="lora_ga",
                            lora_ga_config=LoraGAConfig())
    grads = loraga_grads()
    init = Init(tag="lora_ga", grads={n: grads[n] for n, r in ranks.items() if r > 0})
    return config, init, ranks, added, note
