"""The placement benchmark's grid and conditions, and its CSV: what every placement script shares.

``benchmarks.placement`` (the command and grid runner), ``placement_run`` (one run), ``placement_report`` (the
report), ``lr_sweep`` and ``pretrain_seeds`` import from here and never from each other's command modules, so
the imports run one way. Here: the conditions and named allocator settings, :class:`Grid` and the grids
(``GRIDS``, with the per-budget lrs ``LRS`` / ``FACT_LRS`` / ``INSTR_LRS``), :func:`subset` (the CLI
filters), the CSV (its columns, :func:`read_rows`, :func:`append_row`, :func:`run_key`, :func:`reuse_key`),
the run order (:func:`planned_runs`) and the conditions of a run (:func:`check_setup`, :func:`model_ready`).
Never imports torch.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from allocator.reference import ZOO_DIR
from allocator.solver.settings import COARSE_RANKS, DENSE_RANKS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
CSV_NAME, MD_NAME, PNG_NAME = "placement_runs.csv", "placement.md", "placement.png"
# the benchmark scripts' probe cache (--cache-dir), shared so that their runs reuse each other's probes
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "allocator-placement"
FAMILIES = ("attention", "recurrent", "mlp")
SIGNALS = ("gradient_spectrum", "heldout_capture", "fisher", "activation_rank")
CONDITIONS = ("uniform", "attention_only", "recurrent_only", "mlp_only", "random", "eva", "adalora",
              "allocator", "alloc_v1", *(f"alloc_{s}" for s in SIGNALS), "alloc_retention", "full")
# The allocator's default before issue 14 (alloc_v1): step-0 probes read by the combined signal with half the
# uniform prior. Every step-0 condition (alloc_<signal>, VARIANTS, alloc_retention) keeps these settings, so
# its rows stay what they were when the default changed; alloc_tuned_v1: `allocate tune` before issue 14.
V1_UTILITY: dict[str, Any] = {"signal": "combined", "uniform_prior": 0.5}
V1_TUNE_TRIALS = 10
# alloc_tuned's pilot length, a fraction of the fine-tune's steps (6 pilots pruned at quarters: <= 2x it)
PILOT_FRACTION = 0.4
# alloc_tuned's pilots together train at most this many times the fine-tune's steps (TuneSettings.step_budget)
TUNE_STEP_FACTOR = 2
# alloc_coarse: the solver's earlier default grid (0, 4, 8, 16, 32, 64), replaced by the dense one on this
# benchmark (at uniform's best lr the coarse plan was worse in mean at Falcon-H1 r1, the dense one beat
# uniform on the qwen fact task; docs/method.md). alloc_tuned: `allocate tune`, pilot fine-tunes choosing the
# placement and the priors.
EXTRA = ("alloc_coarse", "alloc_evidence", "alloc_tuned", "alloc_tuned_v1")
# Named allocator settings (utility overrides, solver overrides). alloc_ev: EVA's explained-variance criterion
# (the `explained_variance` signal) on the dense grid per module, the allocator's version of EVA's placement.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "alloc_ev": ({"signal": "explained_variance", "uniform_prior": 0.0},
                 {"ranks": DENSE_RANKS, "granularity": "module"}),
    "alloc_coarse": ({}, {"ranks": COARSE_RANKS}),
    "alloc_evidence": ({"uniform_prior": 0.0}, {}),  # the probes' evidence alone, without the uniform prior
}
# Probes after the default warm-up (20 steps of uniform LoRA): "allocator" is `allocate`'s default (the
# capacity signal, demand read per family as the more cautious of the share and the energy reading, exponent
# e = 1); alloc_energy: the default before the routed-MoE cell (the energy reading alone); alloc_share: the
# share reading alone; the others change e: a family's budget share grows like its capacity demand to the
# power 2e (docs/utility.md)
WARM: dict[str, dict[str, Any]] = {
    "allocator": {},
    "alloc_energy": {"capacity_measure": "energy"},
    "alloc_share": {"capacity_measure": "share"},
    "alloc_warm_e2": {"capacity_measure": "energy", "capacity_exponent": 2.0},
    "alloc_warm_e05": {"capacity_measure": "energy", "capacity_exponent": 0.5},
    "alloc_share_e2": {"capacity_measure": "share", "capacity_exponent": 2.0},
}
# EVA's gain may come from its data-driven lora_A rather than its placement: the same init on other placements
INIT = ("uniform_eva_init", "allocator_eva_init", "eva_ranks", "eva_ranks_eva_init", "alloc_ev",
        "alloc_ev_eva_init")
# `allocate tune --init eva` (pilots from EVA's init too), then EVA's init: core and fact cells
TUNED_EVA = ("alloc_tuned_eva_init",)
# Gradient- and weight-driven inits as baselines (benchmarks/gradient_inits.py): GoRA (its ranks and init),
# PEFT LoRA-GA and PiSSA at uniform's ranks; each at the cell's lr (uniform's) and, as X@lr, at its own best
# lr on the validation split (`own_lrs`, chosen by `python -m benchmarks.lr_sweep --condition X` as uniform's)
OWN_LR = "@lr"
GRADIENT = ("gora", "loraga", "pissa")
# gora_keep_output: GoRA with its init subtracted from the base weights (output unchanged at init); cell lr
GRADIENT_CONDITIONS = GRADIENT + tuple(f"{c}{OWN_LR}" for c in GRADIENT) + ("gora_keep_output",)
# The allocator's own gradient init (`--init gradient`: lora_A on the top right singular vectors of each
# module's calibration gradient, lora_B = 0, Kaiming's row norm), on uniform's and the allocator's ranks
GRADIENT_INIT = ("uniform_gradient_init", "allocator_gradient_init")
RETENTION_WEIGHT = 1.0  # lambda of the retention-aware condition
COLUMNS = ("run_id", "model", "task", "budget", "condition", "frontier", "seed", "steps", "lr", "batch_size",
           "budget_params", "trainable_params", "effective_params", "budget_ratio", "fill_params",
           "target_loss", "initial_target_loss", "retention_loss", "base_retention_loss", "target_accuracy",
           "target_chance", "share_attention", "share_recurrent", "share_mlp", "n_adapted", "plan_hash",
           "wall_s", "note", "finished", "setup_id")


@dataclass(frozen=True)
class Grid:
    """One benchmark grid; ``frontier`` holds variants (label, rank factor, lr factor, steps factor) of the
    ``varied`` conditions (uniform: its target-vs-retention frontier)."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    budgets: tuple[int, ...]  # uniform-rank equivalents
    seeds: tuple[int, ...]
    conditions: tuple[str, ...] = CONDITIONS
    steps: int = 40  # sized so the core grid fits an hour on 2 shared cores (docs/method.md)
    lr: float = 1e-3  # LoRA lr of budgets not in ``lrs``
    lrs: tuple[tuple[str, int, float], ...] = ()  # (model, budget, LoRA lr): uniform's best (lr_sweep)
    full_lr: float = 2e-4
    batch_size: int = 8
    n_train: int = 4096  # rows of 128 tokens; no row repeats within a run
    n_eval: int = 64
    n_calib: int = 32
    n_facts: int = 128  # fact_recall: facts to store (16 train rows of 8); scored on all of them elsewhere
    tune_trials: int = 6  # alloc_tuned: trials of its study (5 enqueued baselines + searched ones)
    # lr*2: whether a larger effective step (EVA init's unit-norm lora_A) explains a gain
    frontier: tuple[tuple[str, float, float, float], ...] = (
        ("lr/4", 1, 0.25, 1), ("lr/16", 1, 0.0625, 1), ("steps/4", 1, 1, 0.25), ("rank/4", 0.25, 1, 1),
        ("lr*2", 1, 2, 1))
    varied: tuple[str, ...] = ("uniform",)  # the conditions the frontier variants are run for
    # (condition, model, budget, lr): a condition's own best lr on validation, for its `X@lr` runs
    own_lrs: tuple[tuple[str, str, int, float], ...] = ()

    def lr_for(self, model: str, budget: int, condition: str = "") -> float:
        """The lr of a run of ``model`` at uniform-rank ``budget`` (full fine-tuning: ``full_lr``; ``X@lr``:
        X's own lr from ``own_lrs``, an error where it has none); ``lr`` where ``lrs`` has no entry."""
        if condition == "full":
            return self.full_lr
        if condition.endswith(OWN_LR):
            base = condition.removesuffix(OWN_LR)
            own = {(c, m, b): lr for c, m, b, lr in self.own_lrs}
            if (base, model, budget) not in own:
                raise ValueError(f"{condition}: no own lr for {model} r{budget} in this grid's own_lrs "
                                 f"(sweep it: python -m benchmarks.lr_sweep --condition {base})")
            return own[(base, model, budget)]
        return {(m, b): lr for m, b, lr in self.lrs}.get((model, budget), self.lr)


# LoRA lr per budget and the full fine-tuning lr, chosen on uniform (resp. full fine-tuning) alone by
# `python -m benchmarks.lr_sweep` on a validation split (docs/results/lr_sweep.md, docs/method.md)
LRS = (("qwen3_5_tiny", 1, 1.6e-2), ("qwen3_5_tiny", 4, 8e-3), ("qwen3_5_tiny", 16, 4e-3),
       ("falcon_h1_tiny", 1, 3.2e-2), ("falcon_h1_tiny", 4, 1.6e-2), ("falcon_h1_tiny", 16, 8e-3),
       ("qwen3_5_deep", 4, 8e-3))
FULL_LR = 8e-4
CORE = Grid(("qwen3_5_tiny", "falcon_h1_tiny"), ("text_domain",), (4,), (0, 1, 2),
            conditions=CONDITIONS + EXTRA + INIT + TUNED_EVA,
            lrs=LRS, full_lr=FULL_LR)
# The second task (storing new facts in the weights, scored by accuracy against chance): every condition at
# r4. Its lr: uniform's lowest answer loss among the lrs that raise the retention loss by less than 0.5 nats
# (`python -m benchmarks.lr_sweep --task fact_recall`; higher lrs wreck the model, docs/method.md)
FACT_LRS = (("qwen3_5_tiny", 1, 8e-3), ("qwen3_5_tiny", 4, 8e-3), ("falcon_h1_tiny", 4, 2e-3))
FACT_PART = replace(CORE, tasks=("fact_recall",), lrs=FACT_LRS,
                    conditions=CONDITIONS + EXTRA + ("uniform_eva_init", "allocator_eva_init") + TUNED_EVA,
                    frontier=(("lr/4", 1, 0.25, 1), ("steps/4", 1, 1, 0.25), ("rank/4", 0.25, 1, 1)))
# Tight and generous budgets, and the 12-layer model: the conditions that answer the questions there
# (EVA's init is left to the core grid: at uniform's best lr it tied uniform there and forgot more)
BUDGET_CONDITIONS = ("uniform", "attention_only", "recurrent_only", "mlp_only", "random", "eva", "allocator",
                     "alloc_energy", "alloc_share", "alloc_retention", *EXTRA)
DEEP_CONDITIONS = ("uniform", "attention_only", "recurrent_only", "mlp_only", "random", "eva", "allocator",
                   "alloc_energy", "alloc_share", "alloc_evidence")
BUDGET_PART = replace(CORE, conditions=BUDGET_CONDITIONS,
                      frontier=(("lr/4", 1, 0.25, 1), ("steps/4", 1, 1, 0.25), ("rank/4", 0.25, 1, 1)))
# The fact task at the tight budget, on the model that stores facts (Falcon-H1 stores none at r4)
FACT_TIGHT = replace(FACT_PART, models=("qwen3_5_tiny",), budgets=(1,),
                     conditions=BUDGET_CONDITIONS + ("uniform_eva_init",) + TUNED_EVA,
                     frontier=(("lr/4", 1, 0.25, 1), ("steps/4", 1, 1, 0.25)))
# EVA's data-driven lora_A acts like a larger step (docs/method.md): is its best lr lower than uniform's?
LR_CONDITIONS = ("uniform", "uniform_eva_init", "allocator_eva_init", "eva")
LR_PART = replace(CORE, conditions=LR_CONDITIONS, frontier=(("lr/2", 1, 0.5, 1),), varied=LR_CONDITIONS)
# The gradient baselines' own lrs: their lowest mean validation loss over the lr sweep's grid (text), the
# fact task's rule for the fact cells (docs/results/lr_sweep.md, lr_sweep_fact_recall.md)
OWN_LRS: tuple[tuple[str, str, int, float], ...] = ()
FACT_OWN_LRS: tuple[tuple[str, str, int, float], ...] = ()
# Every cell of the full grid, at 3 seeds: text r1/r4/r16 on the tiny models, the 12-layer model at r4, the
# fact task at r4 and (qwen) r1
GRADIENT_PARTS = (
    replace(CORE, budgets=(1, 4, 16), conditions=GRADIENT_CONDITIONS, frontier=(), own_lrs=OWN_LRS),
    replace(CORE, models=("qwen3_5_deep",), conditions=GRADIENT_CONDITIONS, frontier=(), own_lrs=OWN_LRS),
    replace(FACT_PART, conditions=GRADIENT_CONDITIONS, frontier=(), own_lrs=FACT_OWN_LRS),
    replace(FACT_TIGHT, conditions=GRADIENT_CONDITIONS, frontier=(), own_lrs=FACT_OWN_LRS))
# Routed MoE (issue 14): the Granite-4.0-H-style model on the text task at r4, 5 seeds: the fixed placements
# (mlp_only = its channel mixers, routed and shared experts: placement_conditions.MEMBERS) and the allocator's
# default. Its lr: uniform's lowest mean validation loss (`python -m benchmarks.lr_sweep --models
# granite_moe_tiny`, docs/results/lr_sweep.md), in a part of its own so the other parts' setup ids stay
MOE_LRS = (("granite_moe_tiny", 4, 1.6e-2),)
MOE_PART = replace(CORE, models=("granite_moe_tiny",), seeds=(0, 1, 2, 3, 4), frontier=(), lrs=MOE_LRS,
                   conditions=("uniform", "allocator", "alloc_energy", "alloc_share", "attention_only",
                               "recurrent_only", "mlp_only"))
# The instruction task (benchmarks/instruction.py: chat rows, loss on the assistant turn only; full grid
# only). Its rows are ~36 tokens, so 32 to a step see about the tokens of the text task's 8 x 128; calibration
# keeps the grid's 32 rows, `allocate`'s default sample count. Its lr: the fact task's rule on its validation
# split (`python -m benchmarks.lr_sweep --task instruction`, docs/results/lr_sweep_instruction.md)
INSTR_LRS = (("qwen3_5_tiny", 4, 2e-3), ("falcon_h1_tiny", 4, 2e-3))
INSTR_CONDITIONS = ("uniform", "allocator", "alloc_energy", "alloc_share", "attention_only", "recurrent_only",
                    "mlp_only")
INSTRUCTION_PART = replace(CORE, tasks=("instruction",), seeds=(0, 1, 2, 3, 4), lrs=INSTR_LRS, batch_size=32,
                           conditions=INSTR_CONDITIONS, frontier=())
# A grid is one or more parts run in order into one CSV (each part: every model x task x budget x condition x
# seed)
GRIDS: dict[str, tuple[Grid, ...]] = {
    "smoke": (Grid(("qwen3_5_tiny",), ("text_domain", "fact_recall"), (4,), (0,), steps=3, batch_size=2,
                   n_train=8, n_eval=4, n_calib=4, n_facts=16, tune_trials=6,
                   frontier=(("lr/4", 1, 0.25, 1),),
                   conditions=(*CONDITIONS, *EXTRA, *INIT, *TUNED_EVA, *GRADIENT, "pissa@lr",
                               "gora_keep_output"),
                   own_lrs=(("pissa", "qwen3_5_tiny", 4, 2e-3),)),
              Grid(("qwen3_5_tiny",), ("instruction",), (4,), (0,), steps=3, batch_size=4, n_train=16,
                   n_eval=4, n_calib=4, conditions=INSTR_CONDITIONS, frontier=())),
    "core": (CORE,),
    # in order of what the claims need most: the tight budget and the deep model before r16 and the lr part
    "full": (CORE, FACT_PART, replace(BUDGET_PART, budgets=(1,)),
             replace(CORE, models=("qwen3_5_deep",), conditions=DEEP_CONDITIONS, frontier=()),
             replace(BUDGET_PART, budgets=(16,)), LR_PART, FACT_TIGHT,
             replace(CORE, models=("qwen3_5_deep",), conditions=("alloc_tuned",), frontier=()),
             *GRADIENT_PARTS,
             replace(CORE, conditions=GRADIENT_INIT, frontier=()),
             replace(FACT_PART, conditions=GRADIENT_INIT, frontier=()), MOE_PART, INSTRUCTION_PART,
             replace(CORE, conditions=("alloc_energy", "alloc_share"), frontier=()),
             replace(FACT_PART, conditions=("alloc_energy", "alloc_share"), frontier=())),
}


# ------------------------------------------------------------------------------------------- the runs


def run_key(row: dict) -> str:
    return "|".join(str(row[k]) for k in ("model", "task", "budget", "condition", "seed", "steps", "lr",
                                         "batch_size"))


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict, columns: tuple[str, ...] = COLUMNS) -> None:
    """Append ``row`` to the CSV at ``path`` (header first when new), synced to disk: a stopped run keeps
    it."""
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def reuse_key(row: dict) -> tuple:
    return (row["model"], row["task"], row["plan_hash"], int(row["seed"]), int(row["steps"]), row["lr"],
            int(row["batch_size"]), row.get("setup_id", ""))


def planned_runs(grid: Grid) -> list[tuple]:
    """(model, task, rank, condition, seed, frontier label, rank factor, lr factor, steps factor), seed-major
    so that a run stopped early (``--max-minutes``) leaves every condition with the same seeds; frontier runs
    last."""
    main, frontier = [], []
    for s in grid.seeds:
        for task in grid.tasks:
            for rank in grid.budgets:
                for model in grid.models:
                    main += [(model, task, rank, cond, s, "", 1, 1, 1) for cond in grid.conditions]
                    frontier += [(model, task, rank, cond, s, label, rf, lf, sf) for cond in grid.varied
                                 for label, rf, lf, sf in grid.frontier if rank * rf >= 1]
    return main + frontier  # the frontier (uniform variants) after every condition


def check_setup(path: Path, model: str, task: str, setup_id: str) -> None:
    """Refuse to extend a CSV whose rows of ``model`` on ``task`` came from other weights, data or fine-tune
    settings: their numbers are not comparable with new runs (and resuming would skip runs that must be
    redone)."""
    stale = [r for r in read_rows(path)
             if (r["model"], r["task"]) == (model, task) and r.get("setup_id", "") != setup_id]
    if stale:
        raise SystemExit(f"{len(stale)} rows of {model} on {task} in {path} were made with other weights, "
                         f"data or fine-tune settings (setup {stale[0].get('setup_id') or 'unrecorded'} vs "
                         f"{setup_id}); rerun without --resume (a fresh CSV) or with another --out")


def model_ready(name: str, zoo_dir: Path | None = None) -> bool:
    """The reference model is fully written: ``training.json`` comes last in ``benchmarks.zoo``."""
    folder = (zoo_dir or ZOO_DIR) / name
    return (folder / "model.safetensors").is_file() and (folder / "training.json").is_file()


# -------------------------------------------------------------------------------- the CLI filters


def subset(parts: tuple[Grid, ...], *, models: str | None = None, tasks: str | None = None,
           budgets: str | None = None, conditions: str | None = None,
           frontier: bool = True) -> tuple[Grid, ...]:
    """The grid's parts restricted to comma-separated ``models``, ``tasks`` and ``conditions`` (each must be
    in some part; parts left empty are dropped) and run at ``budgets`` (positive uniform-rank equivalents);
    ``frontier=False`` drops the frontier runs."""

    def pick(given: str | None, what: str) -> set[str] | None:
        if given is None:
            return None
        known = {x for p in parts for x in getattr(p, what)}
        chosen = {x.strip() for x in given.split(",") if x.strip()}
        unknown = sorted(chosen - known)
        if unknown or not chosen:
            raise ValueError(f"--{what}: {', '.join(unknown) or 'nothing given'} not in this grid "
                             f"(choose from {', '.join(sorted(known))})")
        return chosen

    want = {what: pick(given, what) for what, given in (("models", models), ("tasks", tasks),
                                                           ("conditions", conditions))}
    ranks = None
    if budgets is not None:
        try:
            ranks = tuple(int(x) for x in budgets.split(","))
        except ValueError:
            ranks = ()
        if not ranks or min(ranks) < 1:
            raise ValueError(f"--budgets: expected positive integers like 1,4,16, got {budgets!r}")
    out = []
    for part in parts:
        for what, chosen in want.items():
            if chosen is not None:
                part = replace(part, **{what: tuple(x for x in getattr(part, what) if x in chosen)})
        part = part if ranks is None else replace(part, budgets=ranks)
        part = part if frontier else replace(part, frontier=())
        if part.models and part.tasks and part.conditions:
            out.append(part)
    return tuple(out)

