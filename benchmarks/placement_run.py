"""One run of the placement benchmark: the model setup (tasks, probes, EVA, AdaLoRA pilot) and ``run_one``.

``ModelSetup`` loads a reference model once with its task batches, calibration rows and cached probe reports;
``run_one`` builds a condition's adapter (``placement_conditions``), fine-tunes it with
:func:`allocator.tuning.finetune.finetune`, checks the budget and returns the CSV row. Used by
``benchmarks.placement`` and ``benchmarks.lr_sweep``; the grid and its conditions come from
``benchmarks.grid``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoTokenizer

import allocator.tuning.finetune as ft
import probes
from allocator.api import warmup_targets
from allocator.discovery.components import find_components
from allocator.discovery.modelio import load_model
from allocator.output.export import to_lora_config
from allocator.reference import reference_model_path
from allocator.scoring.utility import UtilitySettings
from allocator.solver.budget import params_per_uniform_rank
from allocator.solver.settings import SolverSettings
from allocator.tuning.finetune import FinetuneSettings, evaluate_loss, finetune, pool_rows
from benchmarks import gradient_inits as gi
from benchmarks import placement_conditions as pc
from benchmarks import tasks
from benchmarks.grid import (
    FAMILIES,
    OWN_LR,
    PILOT_FRACTION,
    RETENTION_WEIGHT,
    SIGNALS,
    TUNE_STEP_FACTOR,
    V1_TUNE_TRIALS,
    V1_UTILITY,
    VARIANTS,
    WARM,
    Grid,
    run_key,
)
from benchmarks.log import log


class ModelSetup:
    """A reference model with its tasks, calibration probes and per-budget EVA components (computed once)."""

    def __init__(self, name: str, grid: Grid, cache_dir: Path, model: Any = None, tokenizer: Any = None, *,
                 zoo_dir: Path | None = None):
        self.name, self.grid, self.cache_dir = name, grid, cache_dir
        if model is None:
            path = reference_model_path(name) if zoo_dir is None else zoo_dir / name
            model, tokenizer = load_model(str(path)), AutoTokenizer.from_pretrained(path)
            self.weights_id = _file_id(path / "model.safetensors")
        else:
            self.weights_id = f"in-memory:{name}"
        self.model, self.tokenizer = model.eval(), tokenizer
        self.components = tuple(find_components(model, fused_kernels=False))  # CPU training: torch paths run
        # routed experts (3-D parameters, PEFT target_parameters) included: what `allocate` and rN budget
        self.eligible = [c for c in self.components if c.eligible]
        self.comps = {c.name: c for c in self.eligible}
        sizes = {"fact_recall": {"n_train": grid.n_facts, "n_eval": None}}
        self.tasks = {t: tasks.TASKS[t](tokenizer, seed=0, **sizes.get(t, {"n_train": grid.n_train,
                                                                         "n_eval": grid.n_eval}))
                      for t in grid.tasks}
        # The tasks' eval rows are the first windows of the sorted eval files (one or two files at 64 rows);
        # spread them over every eval file instead, so the score is the domain's and not one file's.
        _, domain_eval = tasks.domain_files()
        _, general_eval = tasks.pretraining_files()
        if "text_domain" in self.tasks:
            self.tasks["text_domain"] = replace(self.tasks["text_domain"],
                                                eval_batches=_spread(tokenizer, domain_eval, grid.n_eval))
        self.retention = replace(tasks.retention_task(tokenizer, n_eval=1),
                                 eval_batches=_spread(tokenizer, general_eval, grid.n_eval))
        self.base_retention = evaluate_loss(model, self.retention.eval_batches)
        self.settings = probes.ProbeSettings(max_rank=64, progress=False)
        train_files, _ = tasks.pretraining_files()
        general = tasks.token_windows(tokenizer, train_files[:: max(1, len(train_files) // 64)],
                                      max_windows=grid.n_calib)
        self.general_calib = tasks.lm_batches(general, 4)  # pretraining-like text, disjoint from eval files
        self.setup_ids = {t: _setup_id(self.weights_id, grid, {t: self.tasks[t]}, self.retention)
                          for t in self.tasks}
        self._reports: dict[str, Any] = {}
        # (task, rank, steps) -> (rank units, final params)
        self.adalora_pilot: dict[tuple, tuple[int, int]] = {}
        self._eva: dict[tuple, Any] = {}
        self._validation: dict[str, Any] = {}

    def validation_task(self, task: str) -> Any:
        """The task scored on rows to choose settings on, disjoint from its eval rows: the text-domain windows
        halfway between the eval windows, or the facts in a third order and grouping."""
        if task not in self._validation:
            if task == "text_domain":
                _, domain_eval = tasks.domain_files()
                self._validation[task] = replace(self.tasks[task], eval_batches=_spread(
                    self.tokenizer, domain_eval, self.grid.n_eval, between=True))
            elif task == "fact_recall":
                self._validation[task] = tasks.fact_recall_task(self.tokenizer, seed=0,
                                                                n_train=self.grid.n_facts, split="validation")
            elif task == "instruction":  # the facts in their validation phrasings, the skills' own items
                self._validation[task] = tasks.TASKS[task](self.tokenizer, seed=0, n_train=self.grid.n_train,
                                                           n_eval=self.grid.n_eval, split="validation")
            else:
                raise ValueError(f"no validation split for task {task!r}")
        return self._validation[task]

    def calib(self, task: str) -> list[dict]:
        """The first ``n_calib`` rows of the task's TRAIN split, in micro-batches of 4 (never eval rows)."""
        pool = pool_rows(self.tasks[task].train_batches)
        n = min(self.grid.n_calib, pool["input_ids"].shape[0])
        return [{k: v[i:min(i + 4, n)] for k, v in pool.items()} for i in range(0, n, 4)]

    def report(self, kind: str) -> Any:
        """Probe report on the task's train split (``kind`` = task name) or on general text
        (``"general"``)."""
        if kind not in self._reports:
            batches = self.general_calib if kind == "general" else self.calib(kind)
            names = [c.name for c in self.eligible]
            meta = {"model_id": self.name, "weights": self.weights_id, "calibration": kind}
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._reports[kind] = probes.run_cached(self.model, batches, names, self.settings,
                                                        cache_dir=self.cache_dir, key_meta=meta)
            log(f"{self.name}: probes on {kind} ready ({time.perf_counter() - t0:.1f} s)")
        return self._reports[kind]

    def warm_report(self, task: str, rank: int) -> Any:
        """Probe report on the task's calibration rows after the probes' default warm-up (``allocate``'s
        path): uniform LoRA at ``rank`` trained ``warmup_steps`` steps on the train rows after the calibration
        rows."""
        key = f"{task}-warm-r{rank}"
        if key not in self._reports:
            settings = probes.ProbeSettings(max_rank=64, progress=False)
            pool = pool_rows(self.tasks[task].train_batches)
            n, b = self.grid.n_calib, 4
            rows = range(n, min(pool["input_ids"].shape[0], n + settings.warmup_steps * b), b)
            warm = [{k: v[i:i + b] for k, v in pool.items()} for i in rows] or self.calib(task)
            # `allocate`'s warm-up targets (linears and routed experts)
            config = to_lora_config(warmup_targets(self.components, rank), self.components, alpha_ratio=2.0)
            meta = {"model_id": self.name, "weights": self.weights_id, "calibration": task}
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._reports[key] = probes.run_cached(
                    self.model, self.calib(task), [c.name for c in self.eligible], settings,
                    cache_dir=self.cache_dir, key_meta=meta, warmup=probes.Warmup(config, warm))
            log(f"{self.name}: warmed-up probes on {task} r{rank} ready ({time.perf_counter() - t0:.1f} s)")
        return self._reports[key]

    def warmup_record(self, task: str, rank: int) -> str:
        w = self.warm_report(task, rank).meta.get("warmup", {})
        return f"{w.get('steps')} steps at lr {w.get('lr', 0):.3g}, {w.get('seconds', 0):.1f} s"

    def eva_components(self, task: str, k: int) -> Any:
        """EVA's top ``k`` input directions per module (rho = 1), for EVA-initialised placements."""
        return self._cached((task, "components", k), pc.eva_components, k)

    def gradient_components(self, task: str, k: int) -> Any:
        """The gradient init's top ``k`` lora_A rows per module, for gradient-initialised placements."""
        return self._cached((task, "gradient", k), pc.gradient_components, k)

    def eva(self, task: str, rank: int, budget: int) -> Any:
        """EVA's parameter-matched ranks and lora_A init at ``budget`` (rho 2)."""
        return self._cached((task, rank), pc.eva_ranks, budget, rank)

    def _cached(self, key: tuple, fn: Any, *args: Any) -> Any:
        """``fn(model, eligible, calibration rows of task key[0], *args)``, computed once per key."""
        if key not in self._eva:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._eva[key] = fn(self.model, self.eligible, self.calib(key[0]), *args)
        return self._eva[key]


def _spread(tokenizer: Any, files: Any, n: int, *, between: bool = False) -> tuple:
    """``n`` windows of 128 tokens evenly spaced over all of ``files``, in batches of 16; ``between`` takes
    the n - 1 windows halfway between those (a validation split disjoint from the eval windows, to choose the
    lr on)."""
    windows = tasks.token_windows(tokenizer, files)
    pos = torch.linspace(0, windows.shape[0] - 1, min(n, windows.shape[0]))
    if between:  # the n - 1 midpoints
        pos = (pos[1:] + pos[:-1]) / 2
    return tuple(tasks.lm_batches(windows[pos.round().long()], 16))


def _setup_id(weights_id: str, grid: Grid, by_name: dict, retention: Any) -> str:
    """Fingerprint of everything a run's numbers depend on besides its condition: weights, the task's train
    and eval rows, the retention rows and the fine-tune settings. Rows of one model and task in a CSV must
    share it (``--resume``)."""
    h = hashlib.sha256(weights_id.encode())
    h.update(json.dumps([grid.lr, grid.full_lr, grid.batch_size, grid.n_train, grid.n_eval,
                         grid.n_calib]).encode())
    if grid.lrs:  # per (model, budget) lrs (left out when empty, so older setups keep their fingerprint)
        h.update(json.dumps(sorted(grid.lrs)).encode())
    for name in sorted(by_name):
        for batch in (*by_name[name].train_batches, *by_name[name].eval_batches):
            for key in sorted(batch):
                h.update(key.encode() + batch[key].numpy().tobytes())
    for batch in retention.eval_batches:
        h.update(batch["input_ids"].numpy().tobytes())
    return h.hexdigest()[:12]


def _file_id(path: Path) -> str:
    """The weights file's identity: its size and the sha256 of its whole content. No modification time, so a
    fresh checkout (or a byte-identical rebuild) of the same weights keeps its setup ids."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{path.stat().st_size}:{h.hexdigest()[:16]}"


# the note's measured parts (instruction task, per kind), carried over when a deterministic run is reused
MEASURED_NOTES = ("exact match", "answer loss")


def plan_condition(setup: ModelSetup, task: str, condition: str, rank: int, budget: int, seed: int,
                   steps: int):
    """``(lora_config or None, init_fn, adalora_target_bgt, ranks, fill_params, note)`` for one run."""
    eligible, note, init, target_bgt = setup.eligible, "", None, None
    if condition == "full":
        return None, None, None, {}, 0, "every weight trained (lr = full_lr)"
    if condition == "adalora":
        config, target_bgt = pc.adalora_config(eligible, budget, rank, steps)
        pilot = setup.adalora_pilot.get((task, rank, steps))
        note = f"init_r {config.init_r}, final rank budget {target_bgt}"
        if pilot is not None:  # rescaled by the pilot's final count so the final parameters land near budget
            target_bgt = max(1, round(pilot[0] * budget / pilot[1]))
            note = (f"init_r {config.init_r}, final rank budget {target_bgt} (pilot: {pilot[0]} units -> "
                    f"{pilot[1]})")
        return config, None, target_bgt, {}, 0, note
    added = 0
    if condition == "uniform":
        ranks = pc.uniform(eligible, rank)
    elif condition.endswith("_only"):
        ranks, added = pc.single_family(eligible, condition.removesuffix("_only"), budget)
    elif condition == "random":
        ranks, added = pc.random_placement(eligible, budget, seed)
    elif condition in ("eva", "eva_ranks"):  # eva_ranks: EVA's placement with PEFT's default lora_A init
        ranks, a_init, info = setup.eva(task, rank, budget)
        init = pc.eva_init(a_init) if condition == "eva" else None
        note = f"EVA rank units {info['eva_rank_units']} (PEFT would use {info['eva_rank_units_peft']})"
    elif condition.endswith(("_eva_init", "_gradient_init")):  # a placement's ranks, a data-driven lora_A
        kind = "eva" if condition.endswith("_eva_init") else "gradient"  # EVA's (rho = 1), the gradient's
        base = condition.removesuffix(f"_{kind}_init")
        if base in ("alloc_tuned", "alloc_tuned_v1"):  # `allocate tune --init X`: pilots from that init
            v1 = base.endswith("v1")
            ranks, added, note = _tuned(setup, task, rank, budget, seed, steps, init=kind, v1=v1)
            config = to_lora_config(ranks, setup.components, alpha_ratio=2.0)
        else:
            config, _, _, ranks, added, note = plan_condition(setup, task, base, rank, budget, seed, steps)
        directions = setup.eva_components if kind == "eva" else setup.gradient_components
        rows = directions(task, max(ranks.values()))
        init = pc.eva_init({n: rows[n][:r] for n, r in ranks.items() if r > 0})
        if kind == "gradient":  # its own tag: a plan of the same ranks under EVA's init is another run
            init = gi.Init(tag="gradient-init", apply=init)
        what = "EVA init (rho 1)" if kind == "eva" else "gradient init"
        return config, init, None, ranks, added, f"{note}; {what}".lstrip("; ")
    elif condition in gi.BASELINES:  # GoRA (its ranks and init), PEFT LoRA-GA and PiSSA at uniform's ranks
        config, init, ranks, added, note = gi.plan(
            condition, eligible, setup.components, rank, budget,
            lambda: setup._cached((task, "gradients"), gi.calibration_gradients),
            lambda: setup._cached((task, "loraga"), gi.loraga_gradients),
            {c.name: setup.model.get_submodule(c.name).weight.detach() for c in eligible})
        return config, init, None, ranks, added, note
    elif condition in ("alloc_tuned", "alloc_tuned_v1"):  # `allocate tune`: pilots choose placement, priors
        ranks, added, note = _tuned(setup, task, rank, budget, seed, steps, v1=condition.endswith("v1"))
    elif condition in WARM:  # probes after a uniform-LoRA warm-up, read by the capacity signal
        u = UtilitySettings(**{"capacity_start": rank, **WARM[condition]})
        ranks, added, info = pc.allocator_ranks(
            setup.warm_report(task, rank), eligible, setup.components, budget, u, SolverSettings()
        )
        note = (
            f"solver cost {info['solver_cost']} ({info['status']}); warm-up {setup.warmup_record(task, rank)}"
        )
    elif condition.startswith("alloc"):
        kind = condition.removeprefix("alloc").lstrip("_")
        solver = SolverSettings()
        u = UtilitySettings(**V1_UTILITY)  # alloc_v1, and the base of every other step-0 condition
        if condition in VARIANTS:  # named settings: utility and solver overrides
            u = UtilitySettings(**{**V1_UTILITY, **VARIANTS[condition][0]})
            solver = SolverSettings(**VARIANTS[condition][1])
        elif kind in SIGNALS:
            u = UtilitySettings(**{**V1_UTILITY, "signal": kind})
        elif kind == "retention":
            u = UtilitySettings(**V1_UTILITY, retention_weight=RETENTION_WEIGHT)
        risk = setup.report("general") if kind == "retention" else None
        ranks, added, info = pc.allocator_ranks(
            setup.report(task), eligible, setup.components, budget, u, solver, risk_report=risk
        )
        note = f"solver cost {info['solver_cost']} ({info['status']})"
    else:
        raise ValueError(f"unknown condition {condition!r}")
    config = to_lora_config(ranks, setup.components, alpha_ratio=2.0)
    return config, init, target_bgt, ranks, added, note


def _tuned(
    setup: ModelSetup,
    task: str,
    rank: int,
    budget: int,
    seed: int,
    steps: int,
    init: str = "default",
    v1: bool = False,
) -> tuple[dict, int, str]:
    """``allocate tune`` at the cell's budget and lr (``pc.tuned_ranks``): its ranks, fill and note. ``v1``:
    as before issue 14 (step-0 probes, the v1 utility, ``V1_TUNE_TRIALS`` pilots of half the fine-tune)."""
    g, pilot_steps = setup.grid, max(2, round(steps * PILOT_FRACTION))
    # pilots pruned by successive halving at every quarter of their length; the default and uniform run whole
    trials, probe_settings, utility = g.tune_trials, setup.settings, None
    every, pruner, step_budget = max(1, pilot_steps // 4), "halving", TUNE_STEP_FACTOR * steps
    if v1:  # half-length pilots, every one whole, step-0 probes, no step budget
        trials, utility, every, pruner = V1_TUNE_TRIALS, UtilitySettings(**V1_UTILITY), 0, "none"
        step_budget = 0
        probe_settings, pilot_steps = replace(setup.settings, warmup_steps=0), max(2, steps // 2)
    with warnings.catch_warnings():  # e.g. the fact task has fewer train rows than n_calib: known, not news
        warnings.simplefilter("ignore")
        ranks, added, info = pc.tuned_ranks(
            setup.model,
            setup.tokenizer,
            setup.eligible,
            setup.tasks[task].train_batches,
            setup.validation_task(task).eval_batches,
            budget,
            lr=g.lr_for(setup.name, rank),
            steps=pilot_steps,
            batch_size=g.batch_size,
            seed=seed,
            trials=trials,
            n_calib=g.n_calib,
            probe_settings=probe_settings,
            utility_settings=utility,
            eval_every=every,
            pruner=pruner,
            step_budget=step_budget,
            init=init,
            out_dir=setup.cache_dir
            / "tune"
            / f"{setup.name}-{task}-r{rank}-seed{seed}{'' if init == 'default' else f'-{init}'}",
        )
    chosen = ", ".join(f"{k} {v}" for k, v in info["params"].items() if k not in ("lr", "alpha_ratio"))
    return (
        ranks,
        added,
        (
            f"tuned: {info['placement']}{f' ({chosen})' if chosen else ''}; {info['pilots']} "
            f"pilots of {pilot_steps} steps, {info['pilot_steps']} steps in all, {info['pilot_s']:.0f} s"
        ),
    )


def run_one(
    setup: ModelSetup,
    task: str,
    rank: int,
    condition: str,
    seed: int,
    *,
    frontier: str = "",
    lr_factor: float = 1.0,
    steps_factor: float = 1.0,
    rank_factor: float = 1.0,
    reuse: dict | None = None,
    _pilot: bool = False,
) -> dict:
    """Fine-tune one condition and return its CSV row (asserting the budget for exactly-matched conditions).

    ``reuse`` maps a plan key to a finished row: a plain-LoRA condition whose ranks equal an already trained
    plan (same model, task, seed, steps, lr) would train bit-identically (``finetune`` is deterministic), so
    that row's results are copied and the note says so."""
    g = setup.grid
    if condition == "adalora" and not _pilot:
        _adalora_pilot(setup, task, rank, seed, steps_factor)
    run_rank = max(1, round(rank * rank_factor))
    run_budget = run_rank * params_per_uniform_rank(setup.components)
    steps = max(2, round(g.steps * steps_factor))
    lr = g.lr_for(setup.name, rank, condition) * lr_factor
    config, init, target_bgt, ranks, added, note = plan_condition(
        setup, task, condition.split(OWN_LR)[0], run_rank, run_budget, seed, steps
    )
    plan_hash = _plan_hash(condition, ranks, init)
    cond = condition if not frontier else f"{condition}[{frontier}]"
    key = (setup.name, task, plan_hash, seed, steps, f"{lr:g}", g.batch_size, setup.setup_ids[task])
    if plan_hash and reuse is not None and key in reuse:
        row = dict(reuse[key])
        measured = [p for p in row["note"].split("; ") if p.startswith(MEASURED_NOTES)]  # identical too
        same = f"{note}; same plan as {row['condition']}: its deterministic result reused"
        reused = "; ".join([same, *measured])
        row.update(
            condition=cond,
            frontier=frontier,
            budget=f"r{rank}",
            fill_params=added,
            wall_s="0.0",
            note=reused.lstrip("; "),
        )
        row["run_id"] = run_key(row)
        return row
    res, state = _finetune(setup, task, condition, config, init, target_bgt, steps=steps, lr=lr, seed=seed)
    extra = dict(res.metrics)
    trainable = res.trainable_params
    effective = int(extra.get("effective_params", trainable))
    if condition not in ("full", "adalora"):
        note = _check_budget(setup, condition, ranks, trainable, run_budget, note)
    for prefix, what in zip(("match_", "answer_loss_"), MEASURED_NOTES, strict=True):  # instruction, per kind
        kinds = ", ".join(f"{k.removeprefix(prefix)} {v:.3f}" for k, v in extra.items()
                          if k.startswith(prefix))
        note = f"{note}; {what} {kinds}".lstrip("; ") if kinds else note
    shares = _shares(setup, ranks, state)
    note = "; ".join(x for x in (note, _moe_note(setup, ranks)) if x)
    row = {
        "model": setup.name,
        "task": task,
        "budget": f"r{rank}",
        "condition": cond,
        "frontier": frontier,
        "seed": seed,
        "steps": steps,
        "lr": f"{lr:g}",
        "batch_size": g.batch_size,
        "budget_params": run_budget,
        "trainable_params": trainable,
        "effective_params": effective,
        "budget_ratio": f"{effective / run_budget:.4f}" if condition != "full" else "",
        "fill_params": added,
        "target_loss": f"{res.eval_loss:.5f}",
        "initial_target_loss": f"{res.initial_eval_loss:.5f}",
        "retention_loss": f"{extra['retention_loss']:.5f}",
        "base_retention_loss": f"{setup.base_retention:.5f}",
        "target_accuracy": extra.get("target_accuracy", ""),
        "target_chance": extra.get("target_chance", ""),
        **shares,
        "plan_hash": plan_hash,
        "setup_id": setup.setup_ids[task],
        "wall_s": f"{res.wall_time_s:.1f}",
        "note": note,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    row["run_id"] = run_key(row)
    if plan_hash and reuse is not None:
        reuse[key] = row
    return row


def _plan_hash(condition: str, ranks: dict, init: Any) -> str:
    """The plan's identity for ``reuse``: its ranks and what starts it ("" for full and AdaLoRA). An init is
    deterministic given the ranks: EVA's own (rho 2), EVA components at the plan's ranks, or a gradient
    baseline's or the gradient init's (``gradient_inits.Init.tag``)."""
    if not ranks:
        return ""
    tag = [] if init is None else [getattr(init, "tag", "eva-rho2" if condition == "eva" else "eva-init")]
    return hashlib.sha256(json.dumps(sorted(ranks.items()) + tag).encode()).hexdigest()[:12]


def _finetune(
    setup: ModelSetup,
    task: str,
    condition: str,
    config: Any,
    init: Any,
    target_bgt: int | None,
    *,
    steps: int,
    lr: float,
    seed: int,
) -> tuple[Any, dict]:
    """:func:`allocator.tuning.finetune.finetune` of one planned run, scored on the task's eval rows and on
    retention (accuracy tasks: their scorer's accuracy and chance; AdaLoRA: its final unmasked parameters).
    Returns the result and the state :func:`_prepared` kept (the PEFT model)."""
    t = setup.tasks[task]
    ret = setup.retention.eval_batches

    def metrics(model):
        out = {"retention_loss": evaluate_loss(model, ret)}
        if task != "text_domain":  # accuracy tasks: their scorer's accuracy and chance level
            scores = t.evaluate(model)
            out.update(
                {
                    f"target_{kind}": v
                    for k, v in scores.items()
                    for kind in ("accuracy", "chance")
                    if k.endswith(f"_{kind}")
                }
            )
            out.update({k: v for k, v in scores.items() if k.startswith(("match_", "answer_loss_"))})
        if condition == "adalora":
            out["effective_params"] = pc.adalora_effective_params(model)
        return out

    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = stack.enter_context(_prepared(init, target_bgt))
        res = finetune(
            setup.model,
            config,
            t.train_batches,
            t.eval_batches,
            FinetuneSettings(steps=steps, lr=lr, seed=seed, batch_size=setup.grid.batch_size),
            metrics_fn=metrics,
        )
    return res, state


def _check_budget(
    setup: ModelSetup, condition: str, ranks: dict, trainable: int, run_budget: int, note: str
) -> str:
    """Assert PEFT's trainable count equals the placement's cost and lies within 1% of ``run_budget`` (one
    family alone: within one rank step below it, the note saying so when over 1% short); returns the note."""
    expected = pc.cost(ranks, setup.comps)
    assert trainable == expected, f"PEFT counts {trainable} but the placement costs {expected}"
    adapted = {setup.comps[n].family for n, r in ranks.items() if r > 0}
    # one family's integer ranks may not reach within 1% of a tight budget (`*_only`, or alloc_tuned choosing
    # one family)
    if len(adapted) == 1 and condition != "uniform":
        (family,) = adapted
        step = min(c.n_params_per_rank for c in setup.comps.values() if c.family == family and c.eligible)
        assert 0 <= run_budget - trainable < step, (
            f"{condition}: {trainable} trainable vs budget {run_budget}"
        )
        if run_budget - trainable > 0.01 * run_budget:
            note = (
                f"{note}; {trainable / run_budget:.1%} of the budget: the closest integer ranks on "
                f"{family} alone come"
            ).lstrip("; ")
    else:
        assert abs(trainable - run_budget) <= 0.01 * run_budget, (
            f"{condition}: {trainable} trainable vs budget {run_budget} (more than 1% apart)"
        )
    return note


def _adalora_pilot(setup: ModelSetup, task: str, rank: int, seed: int, steps_factor: float) -> None:
    """AdaLoRA's budget is in rank units, and where it keeps ranks sets its final parameter count. One pilot
    run (seed 0, discarded) measures the count its naive rank budget ends at; the runs then rescale it."""
    steps = max(2, round(setup.grid.steps * steps_factor))
    if (task, rank, steps) in setup.adalora_pilot:
        return
    row = run_one(setup, task, rank, "adalora", 0, steps_factor=steps_factor, _pilot=True)
    units = int(row["note"].split("final rank budget ")[1].split()[0])
    setup.adalora_pilot[(task, rank, steps)] = (units, int(row["effective_params"]))
    log(
        f"{setup.name}: AdaLoRA pilot: {units} rank units end at {row['effective_params']} parameters "
        f"(budget {row['budget_params']})"
    )


def _shares(setup: ModelSetup, ranks: dict, state: dict) -> dict:
    if not ranks:  # full / AdaLoRA: shares of what ended up trained with rank > 0
        model = state.get("model")
        ranks = {}
        if model is not None:
            for name, m in model.named_modules():
                base = name.removeprefix("base_model.model.")
                if base in setup.comps and hasattr(m, "lora_E"):
                    ranks[base] = int((m.lora_E["default"] != 0).sum())
    total = pc.cost(ranks, setup.comps) if ranks else 0
    out = {f"share_{f}": "" for f in FAMILIES}
    if total:
        for f in FAMILIES:  # share_mlp: the channel mixers, an MoE model's experts included (pc.MEMBERS)
            part = pc.cost({n: r for n, r in ranks.items() if setup.comps[n].family in pc.MEMBERS[f]},
                           setup.comps)
            out[f"share_{f}"] = f"{part / total:.3f}"
    out["n_adapted"] = sum(1 for r in ranks.values() if r > 0) if ranks else ""
    return out


def _moe_note(setup: ModelSetup, ranks: dict) -> str:
    """On an MoE model, the routed and the shared experts' shares of the plan (both inside ``share_mlp``),
    for the note: the CSV has no column of their own."""
    total = pc.cost(ranks, setup.comps) if ranks else 0
    if not total or not any(c.family == "moe" for c in setup.comps.values()):
        return ""
    part = {k: pc.cost({n: r for n, r in ranks.items() if setup.comps[n].kind == k}, setup.comps) / total
            for k in ("expert", "shared_expert")}
    return f"share_mlp = routed experts {part['expert']:.3f} + shared experts {part['shared_expert']:.3f}"


def _prepared(init, target_bgt):
    """Within the block, ``finetune`` builds its model as usual, then: ``init(peft_model)`` (EVA), or
    AdaLoRA's final budget is set and ``update_and_allocate(step)`` runs after every optimizer step (before
    zero_grad). The training loop itself is untouched."""

    @contextlib.contextmanager
    def ctx():
        original, state = ft._trainable, {}

        def trainable(model, lora_config, seed):
            attach = getattr(init, "attach", None)  # LoRA-GA: its gradients on the modules while PEFT builds
            with attach(model) if attach is not None else contextlib.nullcontext():
                m, n = original(model, lora_config, seed)
            if init is not None:
                init(m)
            if target_bgt is not None:
                m.base_model.rankallocator.target_bgt = target_bgt
            state["model"], state["step"] = m, 0
            return m, n

        def after_step(optimizer, args, kwargs):
            state["model"].base_model.update_and_allocate(state["step"])
            state["step"] += 1

        ft._trainable = trainable
        handle = register_optimizer_step_post_hook(after_step) if target_bgt else None
        try:
            yield state
        finally:
            ft._trainable = original
            if handle is not None:
                handle.remove()

    return ctx()
