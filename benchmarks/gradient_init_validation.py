"""The gradient init (`--init gradient`) against PEFT's on the validation split: ``python -m
benchmarks.gradient_init_validation``.

Each (model, task, budget) cell runs ``uniform``, ``allocator`` and the same ranks under the gradient init
(``uniform_gradient_init``, ``allocator_gradient_init``) with the placement grid's settings (steps, batch,
alpha, data, the cell's lr; ``--lr-factor`` scales it), scored on the task's **validation** split
(``ModelSetup.validation_task``: the text windows between the eval windows, the facts in a third order), never
on the eval rows. Rows go to ``docs/results/gradient_init_validation.csv`` (``--resume`` keeps those there);
the report, ``gradient_init_validation.md``, gives the paired (same seed) Δ validation loss against uniform at
the cell's lr, per seed and in mean.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import stats
from benchmarks.grid import CACHE_DIR, GRIDS, RESULTS, append_row, read_rows
from benchmarks.log import log
from benchmarks.placement_report import header, write_markdown

CONDITIONS = ("uniform", "allocator", "uniform_gradient_init", "allocator_gradient_init")
CELLS = ("qwen3_5_tiny:fact_recall:4", "qwen3_5_tiny:text_domain:4")
COLUMNS = ("model", "task", "budget", "condition", "seed", "lr", "lr_factor", "validation_loss",
           "initial_validation_loss", "retention_loss", "base_retention_loss", "accuracy", "plan_hash",
           "wall_s", "note")
CSV_NAME, MD_NAME = "gradient_init_validation.csv", "gradient_init_validation.md"


def grid_for(task: str):
    """The full grid's part that holds the task at r4 (its lrs): the core grid (text) or the fact part."""
    return next(p for p in GRIDS["full"] if task in p.tasks and 4 in p.budgets)


def run(cells: list[tuple[str, str, int]], conditions: tuple[str, ...], seeds: tuple[int, ...],
        lr_factor: float, cache_dir: Path, csv_path: Path) -> None:
    """Every (cell, seed, condition) not yet in the CSV, scored on the validation split; rows appended."""
    from benchmarks.placement_run import ModelSetup, run_one  # loads torch, transformers and PEFT

    done = {(r["model"], r["task"], r["budget"], r["condition"], r["seed"], r["lr_factor"])
            for r in read_rows(csv_path)}
    for model, task, rank in cells:
        setup = None
        for seed in seeds:
            for condition in conditions:
                key = (model, task, f"r{rank}", condition, str(seed), f"{lr_factor:g}")
                if key in done:
                    continue
                if setup is None:
                    setup = ModelSetup(model, replace(grid_for(task), tasks=(task,)), cache_dir)
                    setup.tasks[task] = setup.validation_task(task)  # never the eval rows
                row = run_one(setup, task, rank, condition, seed, lr_factor=lr_factor)
                out = {"model": model, "task": task, "budget": f"r{rank}", "condition": condition,
                       "seed": seed, "lr": row["lr"], "lr_factor": f"{lr_factor:g}",
                       "validation_loss": row["target_loss"],
                       "initial_validation_loss": row["initial_target_loss"],
                       **{k: row[k] for k in ("retention_loss", "base_retention_loss", "plan_hash", "wall_s",
                                              "note")},
                       "accuracy": row["target_accuracy"]}
                append_row(csv_path, out, COLUMNS)
                log(f"{model} {task} r{rank} {condition} seed {seed} lr {row['lr']}: validation "
                    f"{row['target_loss']} retention {row['retention_loss']} ({row['wall_s']} s)")


def report(rows: list[dict], command: str, wall_s: float) -> list[str]:
    """Per cell and (condition, lr): mean validation loss and accuracy, then the paired Δ validation loss
    against uniform at the cell's lr (lr factor 1) per seed and in mean ± 95% t, and the paired Δ retention
    loss (what the model forgets) in mean."""
    md = [*header("Gradient init (`--init gradient`) on the validation split", command, wall_s),
          f"- Runs in the CSV ({CSV_NAME}): {len(rows)}, "
          f"{sum(float(r['wall_s']) for r in rows) / 60:.1f} min of fine-tuning",
          "- Validation split only (the text windows between the eval windows; the facts in a third order "
          "and grouping); the benchmark's eval rows are never read. Δ = condition − uniform at the cell's "
          "lr, same seed; negative = lower loss than uniform (Δ retention: forgets less); **bold** = the "
          "95% t-interval excludes 0.", ""]
    order = {c: i for i, c in enumerate(CONDITIONS)}
    for cell in sorted({(r["model"], r["task"], r["budget"]) for r in rows}):
        sub = [r for r in rows if (r["model"], r["task"], r["budget"]) == cell]
        base = {int(r["seed"]): r for r in sub if r["condition"] == "uniform" and r["lr_factor"] == "1"}
        md += [f"## {' / '.join(cell)}", "",
               "| condition | lr | validation loss | accuracy | Δ validation per seed | Δ validation | "
               "Δ retention |", "|---|---|---|---|---|---|---|"]
        for condition, lr in sorted({(r["condition"], r["lr"]) for r in sub},
                                    key=lambda c: (order.get(c[0], 9), -float(c[1]))):
            these = sorted((r for r in sub if (r["condition"], r["lr"]) == (condition, lr)),
                           key=lambda r: int(r["seed"]))
            acc = [float(r["accuracy"]) for r in these if r["accuracy"] != ""]
            paired = [(int(r["seed"]), r, base[int(r["seed"])]) for r in these if int(r["seed"]) in base]
            deltas = {key: [float(r[key]) - float(b[key]) for _, r, b in paired]
                      for key in ("validation_loss", "retention_loss")}
            per_seed = ", ".join(f"s{s}: {d:+.4f}" for (s, _, _), d in zip(paired, deltas["validation_loss"],
                                                                             strict=True))
            cols = [_bold(stats.t_interval(deltas[key])) for key in deltas]
            if all(r is b for _, r, b in paired):  # the reference itself
                per_seed, cols = "", ["", ""]
            md.append(f"| {condition} | {lr} | "
                      f"{stats.t_interval(float(r['validation_loss']) for r in these).fmt(4)} | "
                      f"{stats.t_interval(acc).fmt(3) if acc else ''} | {per_seed} | {' | '.join(cols)} |")
        md.append("")
    return md


def _bold(interval: stats.Interval) -> str:
    return f"**{interval.fmt(4)}**" if interval.excludes_zero() else interval.fmt(4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gradient_init_validation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated model:task:rank")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr-factor", type=float, default=1.0, help="scale of the cell's lr (e.g. 0.5)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="keep the CSV and skip runs already in it")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the CSV")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    try:
        cells = [(m, t, int(r)) for m, t, r in (c.split(":") for c in args.cells.split(","))]
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError as exc:
        parser.error(f"--cells takes model:task:rank, --seeds integers ({exc})")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / CSV_NAME
    if not (args.resume or args.report_only) and csv_path.exists():
        csv_path.unlink()
    start = time.time()
    if not args.report_only:
        run(cells, tuple(args.conditions.split(",")), seeds, args.lr_factor, args.cache_dir, csv_path)
    command = "python -m benchmarks.gradient_init_validation " + " ".join(argv if argv is not None else
                                                                           sys.argv[1:])
    md = report(read_rows(csv_path), command.strip(), time.time() - start)
    log(f"wrote {write_markdown(args.out / MD_NAME, md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
