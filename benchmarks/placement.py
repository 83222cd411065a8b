"""Budget-matched LoRA placement benchmark: ``python -m benchmarks.placement [--grid core|full|smoke] [--resume]``.

Every condition trains the same trainable-parameter budget ``B`` (uniform rank ``r`` on every eligible target,
PEFT's count asserted within 1% per run) with :func:`allocator.finetune.finetune` (fixed steps, lr, batch; the
seed sets LoRA init and data order), on a reference model of ``allocator/zoo``; then scores the target task and
retention (loss on held-out pretraining text). Conditions (``benchmarks/placement_conditions.py``): uniform,
attention-/recurrent-/MLP-only, random (a new draw per seed), PEFT EVA (rho 2), AdaLoRA, the allocator with
default settings, each probe signal alone, the retention-aware allocator, and full fine-tuning (the ceiling);
plus uniform at smaller budget / lower lr / fewer steps to trace its target-vs-retention frontier.

Outputs (``--out``, default ``docs/results``): ``placement_runs.csv`` (one row per run, appended as each finishes;
``--resume`` skips rows already there), ``placement.md`` (tables, paired verdicts, machine, command) and
``placement.png``. Probe reports are cached (``--cache-dir``), once per model and task.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import placement_conditions as pc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
CSV_NAME, MD_NAME, PNG_NAME = "placement_runs.csv", "placement.md", "placement.png"
FAMILIES = ("attention", "recurrent", "mlp")
SIGNALS = ("gradient_spectrum", "heldout_capture", "fisher", "activation_rank")
CONDITIONS = ("uniform", "attention_only", "recurrent_only", "mlp_only", "random", "eva", "adalora", "allocator",
              *(f"alloc_{s}" for s in SIGNALS), "alloc_retention", "full")
# Tuning candidates beyond the defaults: the solver's default grid (0, 4, 8, ...) cannot leave uniform rank 4 at an
# r4 budget (one group at 8 must beat two at 4 by a factor the bounded signals never reach), so these variants
# give it the dense grid.
DENSE = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
EXTRA = ("alloc_dense", "alloc_retention_dense")
RETENTION_WEIGHT = 1.0  # lambda of the retention-aware condition
COLUMNS = ("run_id", "model", "task", "budget", "condition", "frontier", "seed", "steps", "lr", "batch_size",
           "budget_params", "trainable_params", "effective_params", "budget_ratio", "fill_params", "target_loss",
           "initial_target_loss", "retention_loss", "base_retention_loss", "recall_accuracy", "recall_chance",
           "share_attention", "share_recurrent", "share_mlp", "n_adapted", "plan_hash", "wall_s", "note", "finished")


@dataclass(frozen=True)
class Grid:
    """One benchmark grid; ``frontier`` holds uniform variants (label, rank factor, lr factor, steps factor)."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    budgets: tuple[int, ...]  # uniform-rank equivalents
    seeds: tuple[int, ...]
    conditions: tuple[str, ...] = CONDITIONS
    steps: int = 40  # sized so the core grid fits an hour on 2 shared cores (docs/method.md)
    lr: float = 1e-3  # chosen on uniform alone (docs/method.md): 2e-3 overfits the train files by step 20
    full_lr: float = 2e-4
    batch_size: int = 8
    n_train: int = 4096  # rows of 128 tokens; no row repeats within a run
    n_eval: int = 64
    n_calib: int = 32
    frontier: tuple[tuple[str, float, float, float], ...] = (
        ("lr/4", 1, 0.25, 1), ("lr/16", 1, 0.0625, 1), ("steps/4", 1, 1, 0.25), ("rank/4", 0.25, 1, 1))
    extra: dict[str, Any] = field(default_factory=dict)


GRIDS = {
    "smoke": Grid(("qwen3_5_tiny",), ("text_domain",), (4,), (0,), steps=3, batch_size=2, n_train=8, n_eval=4,
                  n_calib=4, frontier=(("lr/4", 1, 0.25, 1),)),
    "core": Grid(("qwen3_5_tiny", "falcon_h1_tiny"), ("text_domain",), (4,), (0, 1, 2),
                 conditions=CONDITIONS + EXTRA),
    "full": Grid(("qwen3_5_tiny", "falcon_h1_tiny", "qwen3_5_deep"), ("text_domain", "recall"), (1, 4, 16),
                 (0, 1, 2), conditions=CONDITIONS + EXTRA),
}


def _log(msg: str) -> None:
    print(f"[placement {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ the runs


def run_key(row: dict) -> str:
    return "|".join(str(row[k]) for k in ("model", "task", "budget", "condition", "seed", "steps", "lr",
                                         "batch_size"))


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


class ModelSetup:
    """A reference model with its tasks, calibration probes and per-budget EVA components (computed once)."""

    def __init__(self, name: str, grid: Grid, cache_dir: Path, model: Any = None, tokenizer: Any = None):
        import probes
        from allocator.components import find_components
        from benchmarks import tasks

        self.name, self.grid, self.cache_dir = name, grid, cache_dir
        if model is None:
            from transformers import AutoTokenizer

            from allocator.modelio import load_model
            from allocator.reference import reference_model_path

            path = reference_model_path(name)
            model, tokenizer = load_model(str(path)), AutoTokenizer.from_pretrained(path)
            self.weights_id = _file_id(path / "model.safetensors")
        else:
            self.weights_id = f"in-memory:{name}"
        self.model, self.tokenizer = model.eval(), tokenizer
        self.components = tuple(find_components(model, fused_kernels=False))  # CPU training: torch paths run
        self.eligible = [c for c in self.components if c.eligible and not c.is_parameter]
        self.comps = {c.name: c for c in self.eligible}
        self.tasks = {t: tasks.TASKS[t](tokenizer, seed=0, n_train=grid.n_train, n_eval=grid.n_eval)
                      for t in grid.tasks}
        # The tasks' eval rows are the first windows of the sorted eval files (one or two files at 64 rows); spread
        # them over every eval file instead, so the score is the domain's and not one file's.
        _, domain_eval = tasks.domain_files()
        _, general_eval = tasks.pretraining_files()
        if "text_domain" in self.tasks:
            self.tasks["text_domain"] = replace(self.tasks["text_domain"],
                                                eval_batches=_spread(tokenizer, domain_eval, grid.n_eval))
        self.retention = replace(tasks.retention_task(tokenizer, n_eval=1),
                                 eval_batches=_spread(tokenizer, general_eval, grid.n_eval))
        from allocator.finetune import evaluate_loss

        self.base_retention = evaluate_loss(model, self.retention.eval_batches)
        self.settings = probes.ProbeSettings(max_rank=64, progress=False)
        train_files, _ = tasks.pretraining_files()
        general = tasks.token_windows(tokenizer, train_files[:: max(1, len(train_files) // 64)],
                                      max_windows=grid.n_calib)
        self.general_calib = tasks.lm_batches(general, 4)  # pretraining-like text, disjoint from the eval files
        self._reports: dict[str, Any] = {}
        self.adalora_pilot: dict[tuple, tuple[int, int]] = {}  # (task, rank, steps) -> (rank units, final params)
        self._eva: dict[tuple, Any] = {}

    def calib(self, task: str) -> list[dict]:
        """The first ``n_calib`` rows of the task's TRAIN split, in micro-batches of 4 (never eval rows)."""
        from allocator.finetune import _pool_rows

        pool = _pool_rows(self.tasks[task].train_batches)
        n = min(self.grid.n_calib, pool["input_ids"].shape[0])
        return [{k: v[i:min(i + 4, n)] for k, v in pool.items()} for i in range(0, n, 4)]

    def report(self, kind: str) -> Any:
        """Probe report on the task's train split (``kind`` = task name) or on general text (``"general"``)."""
        import probes

        if kind not in self._reports:
            batches = self.general_calib if kind == "general" else self.calib(kind)
            names = [c.name for c in self.eligible]
            meta = {"model_id": self.name, "weights": self.weights_id, "calibration": kind}
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._reports[kind] = probes.run_cached(self.model, batches, names, self.settings,
                                                        cache_dir=self.cache_dir, key_meta=meta)
            _log(f"{self.name}: probes on {kind} ready ({time.perf_counter() - t0:.1f} s)")
        return self._reports[kind]

    def eva(self, task: str, rank: int, budget: int) -> Any:
        key = (task, rank)
        if key not in self._eva:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._eva[key] = pc.eva_ranks(self.model, self.eligible, self.calib(task), budget, rank)
        return self._eva[key]


def _spread(tokenizer: Any, files: Any, n: int) -> tuple:
    """``n`` windows of 128 tokens evenly spaced over all of ``files``, in batches of 16."""
    import torch

    from benchmarks import tasks

    windows = tasks.token_windows(tokenizer, files)
    idx = torch.linspace(0, windows.shape[0] - 1, min(n, windows.shape[0])).round().long()
    return tuple(tasks.lm_batches(windows[idx], 16))


def _file_id(path: Path) -> str:
    st = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"{st.st_size}:{int(st.st_mtime)}:{head}"


def plan_condition(setup: ModelSetup, task: str, condition: str, rank: int, budget: int, seed: int, steps: int):
    """``(lora_config or None, init_fn, adalora_target_bgt, ranks, fill_params, note)`` for one run."""
    from allocator.export import to_lora_config
    from allocator.solve import SolverSettings
    from allocator.utility import UtilitySettings

    eligible, note, init, target_bgt = setup.eligible, "", None, None
    if condition == "full":
        return None, None, None, {}, 0, "every weight trained (lr = full_lr)"
    if condition == "adalora":
        config, target_bgt = pc.adalora_config(eligible, budget, rank, steps)
        pilot = setup.adalora_pilot.get((task, rank, steps))
        note = f"init_r {config.init_r}, final rank budget {target_bgt}"
        if pilot is not None:  # rescaled by the pilot's final count so the final parameters land near the budget
            target_bgt = max(1, round(pilot[0] * budget / pilot[1]))
            note = f"init_r {config.init_r}, final rank budget {target_bgt} (pilot: {pilot[0]} units -> {pilot[1]})"
        return config, None, target_bgt, {}, 0, note
    added = 0
    if condition == "uniform":
        ranks = pc.uniform(eligible, rank)
    elif condition.endswith("_only"):
        ranks, added = pc.single_family(eligible, condition.removesuffix("_only"), budget)
    elif condition == "random":
        ranks, added = pc.random_placement(eligible, budget, seed)
    elif condition == "eva":
        ranks, a_init, info = setup.eva(task, rank, budget)
        init = pc.eva_init(a_init)
        note = f"EVA rank units {info['eva_rank_units']} (PEFT would use {info['eva_rank_units_peft']})"
    elif condition.startswith("alloc"):
        kind = condition.removeprefix("alloc").lstrip("_")
        solver = SolverSettings()
        if kind.endswith("dense") or kind == "dense":
            kind, solver = kind.removesuffix("dense").rstrip("_"), SolverSettings(ranks=DENSE)
        u = UtilitySettings()
        if kind in SIGNALS:
            u = UtilitySettings(signal=kind)
        elif kind == "retention":
            u = UtilitySettings(retention_weight=RETENTION_WEIGHT)
        for k, v in setup.grid.extra.get(condition, {}).items():
            u = replace(u, **{k: v})
        risk = setup.report("general") if kind == "retention" else None
        ranks, added, info = pc.allocator_ranks(setup.report(task), eligible, setup.components, budget, u,
                                                solver, risk_report=risk)
        note = f"solver cost {info['solver_cost']} ({info['status']})"
    else:
        raise ValueError(f"unknown condition {condition!r}")
    config = to_lora_config(ranks, setup.components, alpha_ratio=2.0)
    return config, init, target_bgt, ranks, added, note


def run_one(setup: ModelSetup, task: str, rank: int, condition: str, seed: int, *, frontier: str = "",
            lr_factor: float = 1.0, steps_factor: float = 1.0, rank_factor: float = 1.0,
            reuse: dict | None = None, _pilot: bool = False) -> dict:
    """Fine-tune one condition and return its CSV row (asserting the budget for exactly-matched conditions).

    ``reuse`` maps a plan key to a finished row: a plain-LoRA condition whose ranks equal an already trained plan
    (same model, task, seed, steps, lr) would train bit-identically (``finetune`` is deterministic), so that row's
    results are copied and the note says so."""
    import contextlib

    from allocator.budget import params_per_uniform_rank
    from allocator.finetune import evaluate_loss, finetune

    g = setup.grid
    if condition == "adalora" and not _pilot:
        _adalora_pilot(setup, task, rank, seed, steps_factor)
    run_rank = max(1, round(rank * rank_factor))
    run_budget = run_rank * params_per_uniform_rank(setup.components)
    steps = max(2, round(g.steps * steps_factor))
    lr = (g.full_lr if condition == "full" else g.lr) * lr_factor
    config, init, target_bgt, ranks, added, note = plan_condition(setup, task, condition, run_rank, run_budget,
                                                                  seed, steps)
    plan_hash = ""
    if ranks and init is None:
        plan_hash = hashlib.sha256(json.dumps(sorted(ranks.items())).encode()).hexdigest()[:12]
    cond = condition if not frontier else f"{condition}[{frontier}]"
    key = (setup.name, task, plan_hash, seed, steps, f"{lr:g}", g.batch_size)
    if plan_hash and reuse is not None and key in reuse:
        row = dict(reuse[key])
        row.update(condition=cond, frontier=frontier, budget=f"r{rank}", fill_params=added, wall_s="0.0",
                   note=f"{note}; same plan as {row['condition']}: its deterministic result reused".lstrip("; "))
        row["run_id"] = run_key(row)
        return row
    t = setup.tasks[task]
    ret = setup.retention.eval_batches
    extra: dict[str, float] = {}

    def metrics(model):
        out = {"retention_loss": evaluate_loss(model, ret)}
        if task == "recall":
            out.update(t.evaluate(model))
        if condition == "adalora":
            out["effective_params"] = pc.adalora_effective_params(model)
        return out

    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = stack.enter_context(_prepared(init, target_bgt))
        res = finetune(setup.model, config, t.train_batches, t.eval_batches, steps=steps, lr=lr, seed=seed,
                       batch_size=g.batch_size, metrics_fn=metrics)
    extra.update(res.metrics)
    trainable = res.trainable_params
    effective = int(extra.get("effective_params", trainable))
    if condition not in ("full", "adalora"):
        expected = pc.cost(ranks, setup.comps)
        assert trainable == expected, f"PEFT counts {trainable} but the placement costs {expected}"
        assert abs(trainable - run_budget) <= 0.01 * run_budget, \
            f"{condition}: {trainable} trainable vs budget {run_budget} (more than 1% apart)"
    shares = _shares(setup, ranks, state)
    row = {
        "model": setup.name, "task": task, "budget": f"r{rank}", "condition": cond, "frontier": frontier,
        "seed": seed, "steps": steps, "lr": f"{lr:g}", "batch_size": g.batch_size, "budget_params": run_budget,
        "trainable_params": trainable, "effective_params": effective,
        "budget_ratio": f"{effective / run_budget:.4f}" if condition != "full" else "",
        "fill_params": added, "target_loss": f"{res.eval_loss:.5f}",
        "initial_target_loss": f"{res.initial_eval_loss:.5f}",
        "retention_loss": f"{extra['retention_loss']:.5f}", "base_retention_loss": f"{setup.base_retention:.5f}",
        "recall_accuracy": extra.get("recall_accuracy", ""), "recall_chance": extra.get("recall_chance", ""),
        **shares, "plan_hash": plan_hash, "wall_s": f"{res.wall_time_s:.1f}", "note": note,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    row["run_id"] = run_key(row)
    if plan_hash and reuse is not None:
        reuse[key] = row
    return row


def _adalora_pilot(setup: ModelSetup, task: str, rank: int, seed: int, steps_factor: float) -> None:
    """AdaLoRA's budget is in rank units, and where it keeps ranks sets its final parameter count. One pilot run
    (seed 0, discarded) measures the count its naive rank budget ends at; the runs then rescale it."""
    steps = max(2, round(setup.grid.steps * steps_factor))
    if (task, rank, steps) in setup.adalora_pilot:
        return
    row = run_one(setup, task, rank, "adalora", 0, steps_factor=steps_factor, _pilot=True)
    units = int(row["note"].split("final rank budget ")[1].split()[0])
    setup.adalora_pilot[(task, rank, steps)] = (units, int(row["effective_params"]))
    _log(f"{setup.name}: AdaLoRA pilot: {units} rank units end at {row['effective_params']} parameters "
         f"(budget {row['budget_params']})")


def reuse_key(row: dict) -> tuple:
    return (row["model"], row["task"], row["plan_hash"], int(row["seed"]), int(row["steps"]), row["lr"],
            int(row["batch_size"]))


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
        for f in FAMILIES:
            part = pc.cost({n: r for n, r in ranks.items() if setup.comps[n].family == f}, setup.comps)
            out[f"share_{f}"] = f"{part / total:.3f}"
    out["n_adapted"] = sum(1 for r in ranks.values() if r > 0) if ranks else ""
    return out


def _prepared(init, target_bgt):
    """Within the block, ``finetune`` builds its model as usual, then: ``init(peft_model)`` (EVA), or AdaLoRA's
    final budget is set and ``update_and_allocate(step)`` runs after every optimizer step (before zero_grad).
    The training loop itself is untouched."""
    import contextlib

    from torch.optim.optimizer import register_optimizer_step_post_hook

    import allocator.finetune as ft

    @contextlib.contextmanager
    def ctx():
        original, state = ft._trainable, {}

        def trainable(model, lora_config, seed):
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


def planned_runs(grid: Grid) -> list[tuple]:
    """(model, task, rank, condition, seed, frontier label, rank factor, lr factor, steps factor), seed-major so
    that a run stopped early (``--max-minutes``) leaves every condition with the same seeds; frontier runs last."""
    main, frontier = [], []
    for s in grid.seeds:
        for task in grid.tasks:
            for rank in grid.budgets:
                for model in grid.models:
                    main += [(model, task, rank, cond, s, "", 1, 1, 1) for cond in grid.conditions]
                    frontier += [(model, task, rank, "uniform", s, label, rf, lf, sf)
                                 for label, rf, lf, sf in grid.frontier if rank * rf >= 1]
    return main + frontier  # the frontier (uniform variants) after every condition


def model_ready(name: str) -> bool:
    """The reference model is fully written: ``training.json`` comes last in ``benchmarks.zoo``."""
    from allocator.reference import ZOO_DIR

    folder = ZOO_DIR / name
    return (folder / "model.safetensors").is_file() and (folder / "training.json").is_file()


def run_grid(grid: Grid, out: Path, *, resume: bool, cache_dir: Path, models: dict | None = None,
             deadline: float | None = None, poll_s: float = 30.0) -> list[dict]:
    """Run every planned run (skipping finished ones with ``resume``) and return all CSV rows.

    Runs of a reference model not built yet wait until it is (polled every ``poll_s``) or until ``deadline``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CSV_NAME
    if not resume and path.exists():
        path.unlink()
    done = {r["run_id"] for r in read_rows(path)}
    reuse = {reuse_key(r): r for r in read_rows(path) if r.get("plan_hash") and "reused" not in r["note"]}
    setups: dict[str, ModelSetup] = {}
    todo = planned_runs(grid)
    n_all = len(todo)
    while todo:
        waiting = []
        for i, (model, task, rank, cond, seed, label, rf, lf, sf) in enumerate(todo):
            steps = max(2, round(grid.steps * sf))
            lr = (grid.full_lr if cond == "full" else grid.lr) * lf
            key = run_key({"model": model, "task": task, "budget": f"r{rank}",
                           "condition": cond if not label else f"{cond}[{label}]", "seed": seed, "steps": steps,
                           "lr": f"{lr:g}", "batch_size": grid.batch_size})
            if key in done or key in {r["run_id"] for r in read_rows(path)}:  # another process may share the CSV
                continue
            if deadline is not None and time.time() > deadline:
                _log("deadline reached; stopping (rerun with --resume to continue)")
                return read_rows(path)
            given = (models or {}).get(model)
            if given is None and model not in setups and not model_ready(model):
                waiting.append(todo[i])
                continue
            if model not in setups:  # tiny models: every setup stays in memory
                setups[model] = ModelSetup(model, grid, cache_dir, *(given or (None, None)))
            reuse.update({reuse_key(r): r for r in read_rows(path) if r.get("plan_hash") and "reused" not in r["note"]})
            row = run_one(setups[model], task, rank, cond, seed, frontier=label, lr_factor=lf, steps_factor=sf,
                          rank_factor=rf, reuse=reuse)
            append_row(path, row)
            done.add(key)
            _log(f"[{len(done)}/{n_all}] {key}: target {row['target_loss']} retention {row['retention_loss']} "
                 f"params {row['trainable_params']} ({row['wall_s']} s)")
        if waiting:
            names = sorted({w[0] for w in waiting})
            _log(f"waiting for reference models {names} ({len(waiting)} runs)")
            time.sleep(poll_s)
        todo = waiting
    return read_rows(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.placement", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="core")
    parser.add_argument("--resume", action="store_true", help="keep the CSV and skip runs already in it")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default docs/results)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "allocator-placement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=None, help="override the grid's fine-tune steps")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds to run (e.g. 2): split a grid "
                        "over processes sharing the CSV (use --resume in each)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting runs after this long")
    parser.add_argument("--command", default=None, help="with --report-only: the command(s) that made the CSV")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the CSV")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from benchmarks.placement_report import write_report

    torch.set_num_threads(args.threads)
    grid = GRIDS[args.grid]
    if args.steps:
        grid = replace(grid, steps=args.steps)
    if args.seeds:
        grid = replace(grid, seeds=tuple(range(args.seeds)))
    if args.seed_list:
        grid = replace(grid, seeds=tuple(int(x) for x in args.seed_list.split(",")))
    start = time.time()
    deadline = start + 60 * args.max_minutes if args.max_minutes else None
    if args.report_only:
        rows = read_rows(args.out / CSV_NAME)
    else:
        rows = run_grid(grid, args.out, resume=args.resume, cache_dir=args.cache_dir, deadline=deadline)
    command = args.command or "python -m benchmarks.placement " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(rows, args.out, grid=grid, grid_name=args.grid, command=command.strip(),
                 wall_s=time.time() - start, threads=args.threads)
    _log(f"wrote {args.out / MD_NAME}, {args.out / CSV_NAME}, {args.out / PNG_NAME}")
    return 0


def grid_json(grid: Grid) -> str:
    return json.dumps({k: v for k, v in grid.__dict__.items()}, default=str)


if __name__ == "__main__":
    sys.exit(main())
