"""Choose the placement benchmark's learning rate on uniform LoRA alone: ``python -m benchmarks.lr_sweep``.

Fine-tunes uniform LoRA (every eligible target at rank ``r``) of each reference model at several learning
rates with the placement grid's other settings (steps, batch, alpha, data), and scores the target task on a
**validation** split: the windows halfway between the eval windows of the held-out files
(``placement_run._spread(..., between=True)``), so the lr is never chosen on the rows the benchmark reports.
Writes ``docs/results/lr_sweep.md`` and ``lr_sweep_runs.csv``. Uniform's lr is every LoRA condition's lr in
the benchmark, which if anything favours the baseline the allocator must beat. The gradient- and weight-driven
baselines (``--condition gora,loraga,pissa``: GoRA, PEFT LoRA-GA, PEFT PiSSA) are swept the same way: an init
changes the effective step, so each also runs at its own best lr (``benchmarks.grid.OWN_LRS``, ``X@lr``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import stats
from benchmarks.grid import CACHE_DIR, GRADIENT, GRIDS, INSTRUCTION_PART, RESULTS, Grid, append_row, read_rows
from benchmarks.log import log
from benchmarks.placement_report import header, write_markdown

LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
FACT_LRS = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
PLAN = {"qwen3_5_tiny": (1, 4, 16), "falcon_h1_tiny": (1, 4, 16), "qwen3_5_deep": (4,),
        "granite_moe_tiny": (4,)}
# The fact task runs at r4 on the tiny models, and at r1 (the tight budget) on qwen3_5_tiny, the model that
# learns the facts (benchmarks.grid.FACT_PART)
FACT_PLAN = {"qwen3_5_tiny": (1, 4), "falcon_h1_tiny": (4,)}
# The instruction task runs at r4 on the tiny models (benchmarks.grid.INSTRUCTION_PART), at its settings
INSTR_PLAN = {"qwen3_5_tiny": (4,), "falcon_h1_tiny": (4,)}
# Tasks scored by the fact task's rule (their higher lrs wreck the model, as the fact task's do)
RETENTION_RULE_TASKS = ("fact_recall", "instruction")
FULL_LRS = (1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3)  # full fine-tuning: the tiny models only
FULL_MODELS = ("qwen3_5_tiny", "falcon_h1_tiny")
COLUMNS = ("model", "task", "condition", "budget", "lr", "seed", "validation_loss", "retention_loss",
           "wall_s", "accuracy", "base_retention_loss")
SWEPT = ("uniform", "full", *GRADIENT)
# The fact task's rule: the lowest validation answer loss among the lrs that raise the retention loss by less
# than this (nats) over the base model's (higher lrs wreck the model; docs/method.md)
FACT_RETENTION_RISE = 0.5


def sweep(plan: dict[str, tuple[int, ...]], lrs: tuple[float, ...], seeds: tuple[int, ...], task: str,
          cache_dir: Path, csv_path: Path, condition: str = "uniform",
          grid: Grid | None = None) -> list[dict]:
    """Every (model, budget, lr, seed) of ``condition`` (uniform LoRA, or ``full`` fine-tuning) scored on the
    validation split; rows appended to ``csv_path`` as they finish (runs already there are skipped). ``grid``:
    the settings (default: the core grid's)."""
    # imported here, not at the top: it loads transformers and peft, which main() loads only after setting
    # HF_HUB_OFFLINE
    from benchmarks.placement_run import ModelSetup, run_one

    grid = replace(grid or GRIDS["core"][0], tasks=(task,))
    _migrate(csv_path)
    done = {(r["model"], r["condition"], r["budget"], r["lr"], r["seed"]) for r in read_rows(csv_path)}
    if condition == "full":  # no budget: one cell per model
        plan = {m: budgets[:1] for m, budgets in plan.items()}
    for model, budgets in plan.items():
        setup = None
        for rank in budgets:
            for lr in lrs:
                for seed in seeds:
                    if (model, condition, _budget(condition, rank), f"{lr:g}", str(seed)) in done:
                        continue
                    if setup is None:  # scored on the validation split, never on the benchmark's eval rows
                        setup = ModelSetup(model, grid, cache_dir)
                        setup.tasks[task] = setup.validation_task(task)
                        _backfill(csv_path, model, f"{setup.base_retention:.5f}")
                    row = run_one(setup, task, rank, condition, seed,
                                  lr_factor=lr / grid.lr_for(model, rank, condition))
                    out = {"model": model, "task": task, "condition": condition,
                           "budget": _budget(condition, rank), "lr": f"{lr:g}", "seed": seed,
                           "validation_loss": row["target_loss"], "retention_loss": row["retention_loss"],
                           "wall_s": row["wall_s"], "accuracy": row["target_accuracy"],
                           "base_retention_loss": f"{setup.base_retention:.5f}"}
                    append_row(csv_path, out, COLUMNS)
                    log(f"{model} {condition} {out['budget']} lr {lr:g} seed {seed}: validation "
                        f"{row['target_loss']} retention {row['retention_loss']}")
    return read_rows(csv_path)


def report(rows: list[dict], *, command: str, wall_s: float, task: str = "text_domain") -> list[str]:
    """Markdown: per model and budget, mean validation and retention loss per lr, the best lr marked."""
    total = sum(float(r["wall_s"]) for r in rows) / 60
    md = [*header("Learning rate for the placement benchmark, chosen on uniform LoRA (and the gradient "
                  "baselines' own)", command, wall_s),
          f"- Runs in the CSV: {len(rows)}, {total:.1f} min of fine-tuning in all (`--resume` keeps finished "
          "runs, so a rerun of the command completes or rewrites the report)",
          "- Uniform LoRA on every eligible target at rank r (alpha 2r), and full fine-tuning (the "
          "benchmark's ceiling), with the placement grid's steps, batch and data; the gradient baselines "
          "GoRA, PEFT LoRA-GA and PEFT PiSSA (`gora`, `loraga`, `pissa`: `benchmarks/gradient_inits.py`) "
          "likewise, for their own lr (`OWN_LRS`, their `X@lr` runs); "
          + ("validation = the text-domain windows halfway between the benchmark's eval windows (never "
             "reported). "
             if task == "text_domain" else
             "validation = the same facts in a third order and grouping (neither the train rows' nor the "
             "eval rows'; `fact_recall_task(split=\"validation\")`), so a fact is scored outside its "
             "training context and the eval rows are never used. "
             if task == "fact_recall" else
             "validation = every made-up country's capital asked in its validation phrasing (neither its "
             "train nor its eval phrasing) and the skills' validation items (disjoint from train and eval "
             "by hash; `instruction_task(split=\"validation\")`); loss = mean over the assistant tokens, "
             "accuracy = exact match of the assistant turn (teacher-forced argmax). ") +
          "Mean over seeds ± 95% t half-width; **bold** (in both tables) = the lr with the lowest mean "
          "validation loss of the row.", "",
          "The chosen lrs (`benchmarks.grid.LRS`, `FACT_LRS` for the fact task, `INSTR_LRS` for the "
          "instruction task) and the rule behind them: "
          "`docs/method.md`.", ""]
    best: dict[tuple, str] = {}
    for condition in sorted({r["condition"] for r in rows}, key=lambda c: (c != "uniform", c)):
        sub = [r for r in rows if r["condition"] == condition]
        cells = sorted({(r["model"], r["budget"]) for r in sub}, key=lambda c: (c[0], _rank(c[1])))
        lrs = sorted({r["lr"] for r in sub}, key=float)
        head = ["| model | budget | " + " | ".join(f"lr {x}" for x in lrs) + " |",
                "|---|---|" + "---|" * len(lrs)]
        tables = {"validation_loss": [], "retention_loss": [], "accuracy": []}
        for cell in cells:
            for metric, lines in tables.items():
                ivs = {}
                for lr in lrs:
                    vals = [float(r[metric]) for r in sub
                            if (r["model"], r["budget"], r["lr"]) == (*cell, lr) and r.get(metric, "") != ""]
                    if vals:
                        ivs[lr] = stats.t_interval(vals)
                if metric == "validation_loss":
                    best[(condition, *cell)] = min(ivs, key=lambda lr: ivs[lr].mean)
                cols = [("**{}**" if lr == best[(condition, *cell)] else "{}").format(ivs[lr].fmt(4))
                        if lr in ivs else "" for lr in lrs]
                lines.append(f"| {cell[0]} | {cell[1]} | " + " | ".join(cols) + " |")
        md += [f"## {condition}: validation loss (target task)", "", *head, *tables["validation_loss"], "",
               f"## {condition}: retention loss (held-out pretraining text; what the model forgets)", "",
               *head, *tables["retention_loss"], ""]
        if any(r.get("accuracy") for r in sub):  # tasks scored by accuracy
            md += [f"## {condition}: answer accuracy (target task)", "", *head, *tables["accuracy"], ""]
    md += ["Lowest validation loss per cell: "
           + ", ".join(f"{c} {m} {b}: {lr}" for (c, m, b), lr in best.items()) + "."]
    if task in RETENTION_RULE_TASKS:
        md += ["", f"Chosen by the fact task's rule (the lowest validation loss among the lrs that raise the "
               f"retention loss by less than {FACT_RETENTION_RISE} nats over the base model's): "
               + ", ".join(f"{c} {m} {b}: {chosen_lr(rows, c, m, b, task) or 'none qualifies'}"
                           for c, m, b in best) + "."]
    return md


def _rank(budget: str) -> int:
    return int(budget[1:]) if budget.startswith("r") else 0


def _budget(condition: str, rank: int) -> str:
    return "all weights" if condition == "full" else f"r{rank}"


def _rewrite(csv_path: Path, rows: list[dict]) -> None:
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a stopped rewrite
    for row in rows:
        append_row(tmp, row, COLUMNS)
    tmp.replace(csv_path)


def _migrate(csv_path: Path) -> None:
    """A CSV written before a column existed gets it (empty) in its header, so new rows line up."""
    if csv_path.is_file():
        with csv_path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header and tuple(header) != COLUMNS:
            _rewrite(csv_path, [{k: r.get(k) or "" for k in COLUMNS} for r in read_rows(csv_path)])


def _backfill(csv_path: Path, model: str, base: str) -> None:
    """Rows of ``model`` written before ``base_retention_loss`` was recorded get it (the base model's loss on
    the same retention rows; it does not depend on the task or the run)."""
    rows = read_rows(csv_path)
    if any(r["model"] == model and not r.get("base_retention_loss") for r in rows):
        _rewrite(csv_path, [{**r, "base_retention_loss": r.get("base_retention_loss") or base}
                            if r["model"] == model else r for r in rows])


def chosen_lr(rows: list[dict], condition: str, model: str, budget: str, task: str) -> str | None:
    """The lr the task's rule picks for a condition in one cell: the lowest mean validation loss; on the fact
    task only among the lrs whose mean retention loss lies less than :data:`FACT_RETENTION_RISE` above the
    base model's (None when no lr qualifies or the base is not recorded)."""
    sub = [r for r in rows if (r["condition"], r["model"], r["budget"]) == (condition, model, budget)]
    by_lr: dict[str, list[dict]] = {}
    for r in sub:
        by_lr.setdefault(r["lr"], []).append(r)
    mean = {lr: {k: sum(float(r[k]) for r in rs) / len(rs) for k in ("validation_loss", "retention_loss")}
            for lr, rs in by_lr.items()}
    if task in RETENTION_RULE_TASKS:
        bases = {r.get("base_retention_loss") for r in sub} - {"", None}
        if len(bases) != 1:
            return None
        base = float(bases.pop())
        mean = {lr: m for lr, m in mean.items() if m["retention_loss"] - base < FACT_RETENTION_RISE}
    return min(mean, key=lambda lr: mean[lr]["validation_loss"]) if mean else None


def _grid(task: str, smoke: bool) -> Grid | None:
    """The settings a task's runs use: its own part of the full grid, or the smoke grid's (None: the core
    grid's)."""
    if smoke:
        return next(p for p in GRIDS["smoke"] if task in p.tasks)
    return INSTRUCTION_PART if task == "instruction" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lr_sweep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default=None, help="comma-separated learning rates (default "
                        f"{','.join(f'{x:g}' for x in LRS)})")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per (model, budget, lr)")
    parser.add_argument("--models", default=None,
                        help="comma-separated reference models (default: all of the task's)")
    parser.add_argument("--task", "--tasks", default="text_domain",
                        choices=["text_domain", "fact_recall", "instruction"],
                        help="text_domain: scored on the validation windows; fact_recall (r4 on the tiny "
                        "models, r1 on qwen3_5_tiny; not full fine-tuning; writes lr_sweep_fact_recall.md): "
                        "scored on the facts in a third order and grouping; instruction (r4 on the tiny "
                        "models at its grid's settings; not full fine-tuning): scored on its validation "
                        "split")
    parser.add_argument("--condition", default="all",
                        help="comma-separated: uniform LoRA (per model and budget), full fine-tuning (the "
                        f"tiny models; default lrs {','.join(f'{x:g}' for x in FULL_LRS)}), the gradient "
                        f"baselines {', '.join(GRADIENT)} (LoRA's lrs); all = uniform,full (default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="keep the CSV and skip runs already in it")
    parser.add_argument("--smoke", action="store_true",
                        help="the placement smoke grid's settings (a few steps), for the tests; needs --out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.smoke and args.out == RESULTS:
        parser.error("--smoke writes throwaway numbers: give another --out")
    conditions = ("uniform", "full") if args.condition == "all" else tuple(args.condition.split(","))
    if set(conditions) - set(SWEPT) or not conditions:
        parser.error(f"--condition: choose from all, {', '.join(SWEPT)} (got {args.condition!r})")
    if args.lrs and "full" in conditions and len(conditions) > 1 and args.task == "text_domain":
        parser.error("--lrs needs full fine-tuning alone or LoRA conditions alone (their lr ranges differ)")
    try:
        task_plan = {"fact_recall": FACT_PLAN, "instruction": INSTR_PLAN}.get(args.task, PLAN)
        plan = {m: task_plan[m] for m in (args.models or ",".join(task_plan)).split(",")}
        given = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else None
    except (ValueError, KeyError) as e:
        parser.error(f"bad --lrs or --models ({e}); models: {', '.join(task_plan)}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "lr_sweep" if args.task == "text_domain" else f"lr_sweep_{args.task}"
    csv_path = args.out / f"{stem}_runs.csv"
    if not args.resume and csv_path.exists():
        csv_path.unlink()
    start = time.time()
    grid = _grid(args.task, args.smoke)
    seeds = tuple(range(args.seeds))
    rows = read_rows(csv_path)
    for condition in conditions:
        if condition != "full":
            default = FACT_LRS if args.task in RETENTION_RULE_TASKS else LRS
            rows = sweep(plan, given or default, seeds, args.task, args.cache_dir, csv_path, condition, grid)
        elif args.task == "text_domain":
            full_plan = {m: b for m, b in plan.items() if m in FULL_MODELS}
            rows = sweep(full_plan, given or FULL_LRS, seeds, args.task, args.cache_dir, csv_path, "full",
                         grid)
    command = "python -m benchmarks.lr_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    md = report(rows, command=command.strip(), wall_s=time.time() - start, task=args.task)
    log(f"wrote {write_markdown(args.out / f'{stem}.md', md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
