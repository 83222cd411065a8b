"""Placements compared by ``benchmarks.placement``, each at the same trainable-parameter budget ``B``.

Every function returns ``{module name: rank}`` over the eligible components (0 = no adapter). ``B`` is what
uniform rank ``r`` on every eligible target costs (``Budget("rN").resolve``). Integer ranks rarely cost
exactly ``B``, so every placement except uniform is closed with :func:`fill` (rank + 1 on modules in the
placement's own priority order while the cost stays <= ``B``); what ``fill`` added is recorded per run
(``fill_params``).

EVA and AdaLoRA count their budget in rank units, not parameters: :func:`eva_ranks` keeps PEFT's EVA
components and its global explained-variance ranking but stops at ``B`` parameters; :func:`adalora_config`
sets AdaLoRA's final rank budget to ``B`` over the mean module width (the actual final count depends on where
AdaLoRA puts the ranks and is recorded, not asserted).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from peft import AdaLoraConfig

from allocator.discovery.component import Component
from allocator.output import lora_init
from allocator.scoring.utility import compute_utilities
from allocator.solver.budget import lora_params
from allocator.solver.settings import COARSE_RANKS
from allocator.solver.solve import solve
from allocator.tuning import TuneSettings, tune
from probes.settings import DataSettings

Ranks = dict[str, int]
# The null draws each module's rank from the solver's coarse grid (its default until the benchmark chose the
# dense one; kept so the null stays the one measured)
GRID = COARSE_RANKS


def cost(ranks: Mapping[str, int], comps: Mapping[str, Component]) -> int:
    return sum(lora_params(comps[n].d_in, comps[n].d_out, r, comps[n].n_experts) for n, r in ranks.items())


def fill(ranks: Ranks, comps: Mapping[str, Component], budget: int, order: Sequence[str],
         cap: Callable[[Component], int] | None = None) -> tuple[Ranks, int]:
    """Rank + 1 on ``order``'s modules, pass after pass, while the total stays <= ``budget``; returns the
    ranks and the parameters added. ``cap(c)`` bounds a module's rank (default: none)."""
    out, before = dict(ranks), cost(ranks, comps)
    total, grew = before, True
    while grew:
        grew = False
        for n in order:
            c = comps[n]
            if total + c.n_params_per_rank <= budget and (cap is None or out[n] + 1 <= cap(c)):
                out[n] += 1
                total += c.n_params_per_rank
                grew = True
    return out, total - before


def uniform(eligible: Sequence[Component], rank: int) -> Ranks:
    return {c.name: rank for c in eligible}


# What a single-family placement adapts: ``mlp`` is the channel mixer, on an MoE model its routed experts and
# shared experts (family ``moe``) beside any dense MLP, so ``mlp_only`` means "the FFN only" on every model
MEMBERS = {"attention": ("attention",), "recurrent": ("recurrent",), "mlp": ("mlp", "moe")}


def single_family(eligible: Sequence[Component], family: str, budget: int) -> tuple[Ranks, int]:
    """Uniform rank on ``family`` (:data:`MEMBERS`) as close to ``budget`` as integers allow, then rank + 1 on
    modules by name."""
    members = [c for c in eligible if c.family in MEMBERS[family]]
    per_rank = sum(c.n_params_per_rank for c in members)
    if not per_rank:
        raise ValueError(f"{family}_only: the model has no eligible {family} module")
    r = budget // per_rank
    names = [c.name for c in members]
    ranks = {c.name: (r if c.name in names else 0) for c in eligible}
    return fill(ranks, {c.name: c for c in eligible}, budget, names)


def random_placement(eligible: Sequence[Component], budget: int, seed: int) -> tuple[Ranks, int]:
    """The null: each module's rank drawn from :data:`GRID`, scaled to ``budget``, closed by rank + 1 in
    random order. A different draw per seed."""
    rng = random.Random(f"random-placement-{seed}")
    comps = {c.name: c for c in eligible}
    draw = {c.name: rng.choice(GRID) for c in eligible}
    if not any(draw.values()):
        draw[eligible[0].name] = GRID[1]
    scale = budget / cost(draw, comps)
    ranks = {n: int(r * scale) for n, r in draw.items()}
    order = list(comps)
    rng.shuffle(order)
    return fill(ranks, comps, budget, order)


def allocator_ranks(report: Any, eligible: Sequence[Component], components: Sequence[Component], budget: int,
                    utility_settings: Any, solver_settings: Any,
                    risk_report: Any = None) -> tuple[Ranks, int, dict]:
    """The allocator's plan (``compute_utilities`` + ``solve``, exactly as ``allocate`` chains them), closed
    by rank + 1 on the modules it gave budget, highest marginal objective (utility minus weighted risk) per
    parameter first (capped at ``min(d_in, d_out)``), then on the others."""
    table = compute_utilities(report, components, solver_settings.ranks, utility_settings,
                              risk_report=risk_report)
    allocation = solve(components, table, budget, solver_settings)
    ranks = {c.name: int(allocation.ranks.get(c.name, 0)) for c in eligible}
    row, grid = table.index(), list(table.ranks)
    comps = {c.name: c for c in eligible}

    def slope(n: str) -> float:  # utility per parameter of the next grid step above the current rank
        if n not in row:
            return -1.0
        r = ranks[n]
        nxt = next((j for j, g in enumerate(grid) if g > r), None)
        if nxt is None:
            return 0.0
        prev = max(j for j, g in enumerate(grid) if g <= r)
        du = table.values[row[n], nxt] - table.values[row[n], prev]
        if table.risk is not None:  # the retention-aware objective: utility minus weighted risk
            du -= table.risk_weight * (table.risk[row[n], nxt] - table.risk[row[n], prev])
        return float(du) / ((grid[nxt] - grid[prev]) * comps[n].n_params_per_rank)

    order = sorted(comps, key=lambda n: (ranks[n] == 0, -slope(n), n))
    out, added = fill(ranks, comps, budget, order, cap=lambda c: min(c.d_in, c.d_out))
    info = {"solver_cost": allocation.cost, "status": allocation.status, "utility": allocation.utility}
    return out, added, info


# ---------------------------------------------------------------------------------------------- EVA


@torch.no_grad()
def _input_covariances(model: torch.nn.Module, names: Sequence[str], batches: Sequence[Mapping]) -> dict:
    """Centered covariance of each module's input over the label tokens of ``batches`` (as EVA's PCA sees
    them)."""
    acc: dict[str, list] = {n: [0, None, None] for n in names}
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (tokens, d_in)
            a = acc[name]
            a[0] += x.shape[0]
            a[1] = x.sum(0) if a[1] is None else a[1] + x.sum(0)
            a[2] = x.T @ x if a[2] is None else a[2] + x.T @ x
        return fn

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(hook(n)))
    try:
        was = model.training
        model.eval()
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (count, s, ss) in acc.items():
        mean = s / count
        out[n] = ss / count - torch.outer(mean, mean)
    return out


def eva_components(model: torch.nn.Module, eligible: Sequence[Component], batches: Sequence[Mapping],
                   k: int) -> dict[str, torch.Tensor]:
    """PEFT EVA's top ``k`` input principal directions of every target (``allocator.output.lora_init``), every
    token counted (recall rows label only the answers, too few tokens for EVA's PCA)."""
    return lora_init.eva_components(model, [c.name for c in eligible], batches, k, use_label_mask=False)


def gradient_components(model: torch.nn.Module, eligible: Sequence[Component], batches: Sequence[Mapping],
                        k: int) -> dict[str, torch.Tensor]:
    """The gradient init's top ``k`` lora_A rows of every target (``allocator.output.lora_init``): right
    singular vectors of its calibration-loss gradient at PEFT's default row norm; the rows' own labels decide
    which tokens carry the loss (recall rows: the answers, as in training)."""
    return lora_init.gradient_components(model, [c.name for c in eligible], batches, k)


def eva_ranks(model: torch.nn.Module, eligible: Sequence[Component], batches: Sequence[Mapping], budget: int,
              rank: int, rho: float = 2.0) -> tuple[Ranks, dict[str, torch.Tensor], dict]:
    """PEFT EVA (``get_eva_state_dict``) with its rank budget counted in parameters.

    PEFT computes up to ``rho * rank`` principal components of every target's input; EVA then keeps the
    globally largest explained-variance ratios until ``rank * n_modules`` components are taken. Here the same
    ranking stops at ``budget`` parameters (a component of module m costs d_in + d_out), so EVA is compared at
    the budget of every other condition. Returns ranks, the lora_A initialisations (rank x d_in) and counts
    for the record.
    """
    cap = max(1, round(rho * rank))
    names = [c.name for c in eligible]
    state = eva_components(model, eligible, batches, cap)  # every module: all `cap` components, every token
    cov = _input_covariances(model, names, batches)
    scored = []  # (ratio, module, index)
    for n in names:
        u = state[n].double()  # (k, d_in), rows = principal directions, by decreasing variance
        c = cov[n]
        ratios = torch.einsum("kd,de,ke->k", u, c, u) / torch.trace(c)
        scored += [(float(v), n, i) for i, v in enumerate(ratios.tolist())]
    scored.sort(key=lambda t: -t[0])
    comps = {c.name: c for c in eligible}
    ranks, total = dict.fromkeys(names, 0), 0
    for _, n, i in scored:  # EVA's global top-k, counted in parameters; a module's components stay a prefix
        p = comps[n].n_params_per_rank
        if i == ranks[n] and total + p <= budget:
            ranks[n] += 1
            total += p
    init = {n: state[n][:r].float().clone() for n, r in ranks.items() if r > 0}
    info = {"eva_components": cap, "eva_rank_units": sum(ranks.values()),
            "eva_rank_units_peft": rank * len(names)}
    return ranks, init, info


def eva_init(init: Mapping[str, torch.Tensor]) -> Callable[[torch.nn.Module], None]:
    """Copy lora_A rows (EVA's components, or the gradient init's) into a PeftModel built from the same ranks
    (lora_B stays zero)."""

    def apply(peft_model: torch.nn.Module) -> None:
        lora_init.init_lora_a(peft_model, init, {n: a.shape[0] for n, a in init.items()})

    return apply


# ---------------------------------------------------------------------------------------------- AdaLoRA


def adalora_config(eligible: Sequence[Component], budget: int, rank: int, steps: int) -> tuple[Any, int]:
    """AdaLoRA over every eligible target: init_r = 2 x the uniform-equivalent rank, pruned to a final rank
    budget of ``budget / mean(d_in + d_out + 1)`` rank units (PEFT's ``target_r * n`` made parameter-aware);
    schedule: 10% warm, budget falls until 80%, then frozen. Returns the config and that final rank budget."""
    init_r = max(2, 2 * rank)
    per_rank = [c.d_in + c.d_out + 1 for c in eligible]  # lora_A row + lora_B column + lora_E entry
    target_bgt = max(1, round(budget / (sum(per_rank) / len(per_rank))))
    config = AdaLoraConfig(
        init_r=init_r, target_r=rank, lora_alpha=2 * init_r, lora_dropout=0.0,
        target_modules=[c.name for c in eligible], tinit=max(1, steps // 10), tfinal=max(1, steps // 5),
        deltaT=max(1, steps // 40), total_step=steps, task_type="CAUSAL_LM",
    )
    return config, target_bgt


def adalora_effective_params(peft_model: torch.nn.Module) -> int:
    """Parameters AdaLoRA keeps at the end: per module, unmasked singular values x (d_in + d_out + 1)."""
    total = 0
    for module in peft_model.modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            e = module.lora_E["default"]
            a = module.lora_A["default"]
            b = module.lora_B["default"]
            total += int((e != 0).sum()) * (a.shape[1] + b.shape[0] + 1)
    return total


def tuned_ranks(model: torch.nn.Module, tokenizer: Any, eligible: Sequence[Component],
                train: Sequence[Mapping], validation: Sequence[Mapping], budget: int, *, lr: float,
                steps: int, batch_size: int, seed: int, trials: int, n_calib: int, probe_settings: Any,
                out_dir: Any, init: str = "default", utility_settings: Any = None, eval_every: int = 0,
                pruner: str = "none", step_budget: int = 0) -> tuple[Ranks, int, dict]:
    """``allocate tune`` (:func:`allocator.tuning.tune`) at the fixed budget, lr and alpha: Optuna chooses the
    placement (the solver's plan, or uniform / one family, the study's enqueued baselines) and the solver
    utility's family priors and uniform prior, each trial a ``steps``-step pilot fine-tune on ``train`` scored
    on ``validation`` (never the eval rows). The best trial's ranks: a family baseline as the benchmark's own
    ``single_family`` placement, any other plan closed by rank + 1 on its adapted modules first.
    ``init="eva"``: every pilot starts from EVA's lora_A (``allocate tune --init eva``), every token of the
    calibration rows counted as in :func:`eva_components` (``init_data`` without labels); ``init="gradient"``:
    from the gradient init's, on the calibration rows with their labels. ``step_budget``: the pilots' steps
    together (0: no cap)."""
    rows = sum(int(b["input_ids"].shape[0]) for b in train)
    seq_len = max(int(b["input_ids"].shape[1]) for b in (*train, *validation))
    settings = TuneSettings(
        trials=trials, steps=steps, batch_size=batch_size, eval_every=eval_every, pruner=pruner,
        step_budget=step_budget, train_samples=rows,
        eval_samples=sum(int(b["input_ids"].shape[0]) for b in validation), seed=seed, budget=str(budget),
        lr=f"{lr:g}", alpha_ratio="2", weights="", uniform_prior="0..1", family_priors="0.25..4",
        retention_weight="", granularity="", max_rank="")
    init_data = [{k: v for k, v in b.items() if k != "labels"} for b in train] if init == "eva" else None
    result = tune(model, data=list(train), eval_data=list(validation), tokenizer=tokenizer, settings=settings,
                  out_dir=out_dir, overwrite=True, fused_kernels=False, probe_settings=probe_settings,
                  init=init, init_data=init_data, utility_settings=utility_settings,
                  data_settings=DataSettings(seq_len=seq_len, samples=n_calib, batch_size=4))
    best, comps = result.best, {c.name: c for c in eligible}
    if best.placement in ("attention", "recurrent", "mlp"):  # a family baseline won: single_family's
        out, added = single_family(eligible, best.placement, budget)
    else:  # the solver's plan (or uniform, which fill leaves as is), closed like the allocator's
        ranks = {n: int(result.best_plan.ranks.get(n, 0)) for n in comps}
        order = sorted(comps, key=lambda n: (ranks[n] == 0, n))
        out, added = fill(ranks, comps, budget, order, cap=lambda c: min(c.d_in, c.d_out))
    info = {"placement": best.placement, "params": {k: round(v, 3) if isinstance(v, float) else v
                                                     for k, v in best.params.items()},
            "pilots": len(result.trials), "pilot_s": sum(t.duration_s or 0.0 for t in result.trials),
            "pilot_steps": sum(t.steps or 0 for t in result.trials)}
    return out, added, info
