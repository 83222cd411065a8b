"""Budget-matched LoRA placement benchmark: ``python -m benchmarks.placement [--grid core|full|smoke]``.

Every condition trains the same trainable-parameter budget ``B`` (uniform rank ``r`` on every eligible target,
PEFT's count asserted within 1% per run) with :func:`allocator.tuning.finetune.finetune` (fixed steps, lr,
batch; the seed sets LoRA init and data order), on a reference model of ``allocator/zoo``; then scores the
target task and retention (loss on held-out pretraining text). Conditions
(``benchmarks/placement_conditions.py``): uniform, attention-/recurrent-/MLP-only, random (a new draw per
seed), PEFT EVA (rho 2), AdaLoRA, the allocator with default settings, each probe signal alone, the
retention-aware allocator, full fine-tuning (the ceiling), and GoRA, PEFT LoRA-GA and PEFT PiSSA (each at
the cell's lr and at its own, ``X@lr``); plus uniform at smaller budget / lower lr /
fewer steps to trace its target-vs-retention frontier.

Outputs (``--out``, default ``docs/results``): ``placement_runs.csv`` (one row per run, appended as each
finishes; ``--resume`` skips rows already there), ``placement.md`` (tables, paired verdicts, machine, command)
and ``placement.png``. Probe reports are cached (``--cache-dir``), once per model and task. This module is the
command and the grid runner; the grids, conditions and CSV helpers live in ``benchmarks/grid.py``, one run
(setup, adapter, fine-tune, budget check) in ``benchmarks/placement_run.py``, the report in
``placement_report.py``, the statistics in ``benchmarks/stats.py``; method and findings in ``docs/method.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.grid import (
    CACHE_DIR,
    CONDITIONS,
    CSV_NAME,
    EXTRA,
    GRADIENT_CONDITIONS,
    GRIDS,
    INIT,
    MD_NAME,
    PNG_NAME,
    RESULTS,
    TUNED_EVA,
    Grid,
    append_row,
    check_setup,
    model_ready,
    planned_runs,
    read_rows,
    reuse_key,
    run_key,
    subset,
)
from benchmarks.log import log
from benchmarks.placement_report import write_report


def run_grid(grid: Grid, out: Path, *, resume: bool, cache_dir: Path, models: dict | None = None,
             deadline: float | None = None, poll_s: float = 30.0, zoo_dir: Path | None = None) -> list[dict]:
    """Run every planned run (skipping finished ones with ``resume``) and return all CSV rows.

    Runs of a reference model not built yet wait until it is (polled every ``poll_s``) or until ``deadline``.
    ``zoo_dir`` loads the reference models from another folder (default ``allocator/zoo``), e.g. a second
    pretraining seed built by ``python -m benchmarks.zoo --seed 1 --out DIR``."""
    # imported here, not at the top: it loads transformers and peft, which main() loads only after setting
    # HF_HUB_OFFLINE, and which `--report-only` never needs
    from benchmarks.placement_run import ModelSetup, run_one

    out.mkdir(parents=True, exist_ok=True)
    path = out / CSV_NAME
    if not resume and path.exists():
        path.unlink()
    done = {r["run_id"] for r in read_rows(path)}
    reuse = _reusable(path)
    setups: dict[str, ModelSetup] = {}
    todo = planned_runs(grid)
    n_all = len(todo)
    while todo:
        waiting = []
        for i, (model, task, rank, cond, seed, label, rf, lf, sf) in enumerate(todo):
            steps = max(2, round(grid.steps * sf))
            lr = grid.lr_for(model, rank, cond) * lf
            key = run_key({"model": model, "task": task, "budget": f"r{rank}",
                           "condition": cond if not label else f"{cond}[{label}]", "seed": seed,
                           "steps": steps, "lr": f"{lr:g}", "batch_size": grid.batch_size})
            if key in done or key in {r["run_id"] for r in read_rows(path)}:  # another process may share it
                continue
            if deadline is not None and time.time() > deadline:
                log("deadline reached; stopping (rerun with --resume to continue)")
                return read_rows(path)
            given = (models or {}).get(model)
            if given is None and model not in setups and not model_ready(model, zoo_dir):
                waiting.append(todo[i])
                continue
            if model not in setups:  # tiny models: every setup stays in memory
                setups[model] = ModelSetup(model, grid, cache_dir, *(given or (None, None)), zoo_dir=zoo_dir)
                for t, setup_id in setups[model].setup_ids.items():
                    check_setup(path, model, t, setup_id)
            reuse.update(_reusable(path))
            row = run_one(setups[model], task, rank, cond, seed, frontier=label, lr_factor=lf,
                          steps_factor=sf, rank_factor=rf, reuse=reuse)
            append_row(path, row)
            done.add(key)
            log(f"[{len(done)}/{n_all}] {key}: target {row['target_loss']} retention {row['retention_loss']} "
                f"params {row['trainable_params']} ({row['wall_s']} s)")
        if waiting:
            names = sorted({w[0] for w in waiting})
            log(f"waiting for reference models {names} ({len(waiting)} runs)")
            time.sleep(poll_s)
        todo = waiting
    return read_rows(path)


def _reusable(path: Path) -> dict[tuple, dict]:
    """The CSV's trained rows by plan (:func:`benchmarks.grid.reuse_key`); rows copied from others are left
    out."""
    return {reuse_key(r): r for r in read_rows(path) if r.get("plan_hash") and "reused" not in r["note"]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.placement",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="core")
    parser.add_argument("--resume", action="store_true",
                        help="keep the CSV and skip runs already in it (without it the CSV starts empty; the "
                        "full grid shares the core grid's runs, so extend with --grid full --resume)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default docs/results; for --grid smoke a new temporary folder)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--zoo", type=Path, default=None,
                        help="folder of reference models (default allocator/zoo); e.g. a second pretraining "
                        "seed from `python -m benchmarks.zoo --seed 1 --out build/zoo-seed1` (use another "
                        "--out)")
    parser.add_argument("--steps", type=int, default=None, help="override the grid's fine-tune steps")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds to run (e.g. 2): split a "
                        "grid over processes sharing the CSV (use --resume in each)")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of the grid's reference models")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the grid's tasks")
    parser.add_argument("--budgets", default=None, help="comma-separated uniform-rank budgets (e.g. 1,16), "
                        "replacing the grid's")
    parser.add_argument("--conditions", default=None, help="comma-separated subset of the grid's conditions "
                        f"(known: {', '.join(CONDITIONS + EXTRA + INIT + TUNED_EVA + GRADIENT_CONDITIONS)})")
    parser.add_argument("--no-frontier", action="store_true",
                        help="skip the frontier runs (lr/steps/rank variants)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting runs after this long")
    parser.add_argument("--command", default=None,
                        help="with --report-only: the command(s) that made the CSV")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the CSV")
    return parser


def _parts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Grid, ...]:
    """The chosen grid's parts with the command line's overrides and filters applied."""
    parts = GRIDS[args.grid]
    if args.steps:
        parts = tuple(replace(p, steps=args.steps) for p in parts)
    if args.seeds:
        parts = tuple(replace(p, seeds=tuple(range(args.seeds))) for p in parts)
    if args.seed_list:
        parts = tuple(replace(p, seeds=tuple(int(x) for x in args.seed_list.split(","))) for p in parts)
    try:
        parts = subset(parts, models=args.models, tasks=args.tasks, budgets=args.budgets,
                       conditions=args.conditions, frontier=not args.no_frontier)
    except ValueError as e:
        parser.error(str(e))
    if not parts:
        parser.error("the filters leave nothing to run in this grid")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="placement-smoke-")) if args.grid == "smoke" else RESULTS
    parts = _parts(args, parser)
    start = time.time()
    deadline = start + 60 * args.max_minutes if args.max_minutes else None
    rows = read_rows(args.out / CSV_NAME)
    if not args.report_only:
        for i, part in enumerate(parts):  # later parts extend the CSV the first one started
            rows = run_grid(part, args.out, resume=args.resume or i > 0, cache_dir=args.cache_dir,
                            deadline=deadline, zoo_dir=args.zoo)
    command = args.command or "python -m benchmarks.placement " + " ".join(
        argv if argv is not None else sys.argv[1:])
    # the report's lr line: every lr the grid gives the first part's tasks, also in parts the filters dropped
    lrs = {x for p in GRIDS[args.grid] if p.tasks == parts[0].tasks for x in p.lrs}
    write_report(rows, args.out, grid=replace(parts[0], lrs=tuple(sorted(lrs))), grid_name=args.grid,
                 command=command.strip(), wall_s=time.time() - start, threads=args.threads)
    log(f"wrote {args.out / MD_NAME}, {args.out / CSV_NAME}, {args.out / PNG_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
