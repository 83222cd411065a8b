"""How much placement results move between two pretraining seeds of the reference models.

``python -m benchmarks.pretrain_seeds`` builds the tiny reference models again from pretraining seed 1
(``python -m benchmarks.zoo --seed 1``, into ``--zoo``, not shipped), runs the placement benchmark's core
conditions on them (``python -m benchmarks.placement --zoo ... --out ...``) and compares each condition's
paired Δ against uniform with the same cells of the shipped (seed 0) models'
``docs/results/placement_runs.csv``.
Writes ``docs/results/pretrain_seeds.md``. ``--compare-only`` rewrites the comparison from both CSVs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import stats
from benchmarks.grid import CSV_NAME, RESULTS, ROOT, TUNED_EVA, model_ready, read_rows
from benchmarks.log import log
from benchmarks.placement_report import header, write_markdown

MODELS = ("qwen3_5_tiny", "falcon_h1_tiny")
CONDITIONS = ("uniform", "attention_only", "recurrent_only", "mlp_only", "random", "eva", "allocator",
              "alloc_tuned", "uniform_eva_init", "allocator_eva_init")


def deltas(rows: Sequence[dict], metric: str) -> dict[tuple, stats.Interval]:
    """``{(model, task, budget, condition): paired Δ metric vs uniform}`` over the main (non-frontier)
    runs."""
    table = stats.by_seed([r for r in rows if not r["frontier"]], metric)
    out = {}
    for key, seeds in table.items():
        base = table.get((*key[:3], "uniform"))
        if key[3] != "uniform" and base:
            out[key] = stats.paired(seeds, base)
    return out


def compare(rows_a: Sequence[dict], rows_b: Sequence[dict], labels: tuple[str, str]) -> list[str]:
    """Markdown tables: uniform's losses and each condition's Δ vs uniform under both pretraining seeds, the
    shift between them, and whether the verdict (interval excludes 0, which sign) is the same."""
    md = []
    for metric, title in (("target_loss", "target loss"), ("retention_loss", "retention loss")):
        da, db = deltas(rows_a, metric), deltas(rows_b, metric)
        ua = stats.by_seed(rows_a, metric)
        ub = stats.by_seed(rows_b, metric)
        md += [f"## Δ {title} against uniform (paired over fine-tune seeds, 95% t)", "",
               f"| cell | condition | {labels[0]} | {labels[1]} | shift | same verdict |",
               "|---|---|---|---|---|---|"]
        cells = sorted({k[:3] for k in da} & {k[:3] for k in db})
        shifts, flips, n = [], 0, 0
        for cell in cells:
            a, b = ua.get((*cell, "uniform")), ub.get((*cell, "uniform"))
            if a and b:
                ma, mb = stats.t_interval(a.values()), stats.t_interval(b.values())
                md.append(f"| {' '.join(cell)} | uniform (absolute) | {ma.fmt(4)} | {mb.fmt(4)} | "
                          f"{mb.mean - ma.mean:+.4f} | — |")
            for cond in (*CONDITIONS[1:], *TUNED_EVA):  # TUNED_EVA: run on the fact cells by placement's CLI
                key = (*cell, cond)
                if key not in da or key not in db:
                    continue
                a, b = da[key], db[key]
                same = _verdict(a) == _verdict(b)
                shifts.append(abs(b.mean - a.mean))
                flips += not same
                n += 1
                md.append(f"| {' '.join(cell)} | {cond} | {a.fmt(4)} | {b.fmt(4)} | {b.mean - a.mean:+.4f} | "
                          f"{'yes' if same else '**no**'} |")
        if shifts:
            shifts.sort()
            md += ["", f"{title}: {n} condition-cells; median |shift| of Δ {shifts[len(shifts) // 2]:.4f}, "
                   f"largest {shifts[-1]:.4f}; verdict changed in {flips} of {n}.", ""]
    return md


def _verdict(d: stats.Interval) -> int:
    if d.n < 2 or not math.isfinite(d.half_width) or not d.excludes_zero():
        return 0
    return 1 if d.mean > 0 else -1


def write(rows_a: Sequence[dict], rows_b: Sequence[dict], out: Path, command: str, wall_s: float) -> Path:
    md = [*header("Placement results under a second pretraining seed", command, wall_s),
          "- Seed 0: the shipped reference models (`docs/results/placement_runs.csv`); seed 1: the same "
          "recipe, data and tokenizer with pretraining seed 1 (init and data order), built by "
          "`python -m benchmarks.zoo --seed 1`. Fine-tune seeds, conditions and settings are the same in "
          "both.",
          "- A verdict is the sign of a Δ whose 95% interval excludes 0, else 'indistinguishable'; 'same "
          "verdict' compares them across the two pretraining seeds.", ""]
    md += compare(rows_a, rows_b, ("pretraining seed 0", "pretraining seed 1"))
    return write_markdown(out / "pretrain_seeds.md", md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_seeds",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "build" / "zoo-seed1",
                        help="where the seed-1 reference models are built (not shipped)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pretrain_seed1",
                        help="placement results on the seed-1 models")
    parser.add_argument("--budgets", default="4", help="comma-separated uniform-rank budgets")
    parser.add_argument("--tasks", default="text_domain,fact_recall",
                        help="comma-separated tasks of the placement grid")
    parser.add_argument("--resume", action="store_true", help="keep finished seed-1 runs")
    parser.add_argument("--compare-only", action="store_true", help="only rewrite the comparison")
    parser.add_argument("--command", default=None,
                        help="with --compare-only: the command(s) that made the CSVs")
    args = parser.parse_args(argv)
    start = time.time()
    if not args.compare_only:
        # the runs load torch, transformers and peft: imported only when there are runs to make, and after
        # HF_HUB_OFFLINE is set (placement.main sets it too, but zoo loads transformers when imported)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from benchmarks import placement, zoo

        missing = [m for m in MODELS if not model_ready(m, args.zoo)]
        if missing:
            log(f"pretraining {missing} with seed 1 into {args.zoo}")
            zoo.main([*(x for m in missing for x in ("--only", m)), "--seed", "1", "--out", str(args.zoo),
                      "--threads", "2"])
        placement.main(["--grid", "full", "--zoo", str(args.zoo), "--out", str(args.out), "--models",
                        ",".join(MODELS), "--tasks", args.tasks, "--budgets", args.budgets, "--conditions",
                        ",".join(CONDITIONS), "--no-frontier", *(["--resume"] if args.resume else [])])
    seed0 = [r for r in read_rows(RESULTS / CSV_NAME) if r["model"] in MODELS]
    seed1 = read_rows(args.out / CSV_NAME)
    if not seed1:
        parser.error(f"no seed-1 runs in {args.out / CSV_NAME}; run without --compare-only")
    command = args.command or "python -m benchmarks.pretrain_seeds " + " ".join(
        argv if argv is not None else sys.argv[1:])
    path = write(seed0, seed1, RESULTS, command.strip(), time.time() - start)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
