"""``docs/results/placement.md`` and ``placement.png`` from the rows of ``placement_runs.csv``.

Per cell (model, task, budget): every condition's mean and 95% t-interval of the target and retention losses,
the paired difference against uniform with a verdict, the allocator's paired verdicts against every baseline,
and the gap of each condition to uniform's target-vs-retention frontier. Never imports torch.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import stats
from benchmarks.grid import CONDITIONS, MD_NAME, PNG_NAME

BASELINES = ("uniform", "attention_only", "recurrent_only", "mlp_only", "random", "eva", "adalora")
OURS = ("allocator", "alloc_retention", "alloc_tuned")
# Under EVA's lora_A init, does a placement beat uniform's? (ours, baselines)
INIT_PAIRS = (("allocator_eva_init", ("uniform_eva_init", "uniform", "eva")),
              ("alloc_ev_eva_init", ("uniform_eva_init", "allocator_eva_init", "eva")),
              ("alloc_tuned_eva_init",
               ("uniform_eva_init", "allocator_eva_init", "eva", "alloc_tuned", "uniform")),
              ("eva", ("uniform_eva_init",)), ("eva_ranks_eva_init", ("uniform_eva_init",)))
# The gradient init (`--init gradient`) against the same ranks under PEFT's init, and placements under it
GRADIENT_INIT_PAIRS = (("uniform_gradient_init", ("uniform",)),
                       ("allocator_gradient_init", ("allocator", "uniform_gradient_init", "uniform")))


def machine() -> str:
    nproc = os.cpu_count()
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{nproc} CPU cores (nproc), {cpu}, {platform.system()} {platform.release()}"


def _versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in ("torch", "transformers", "peft", "scipy"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def header(title: str, command: str, wall_s: float) -> list[str]:
    """The first lines of a benchmark report: title, date, command, machine, versions, wall time."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"# {title}", "", f"- Date: {now}", f"- Command: `{command}`", f"- Machine: {machine()}",
            f"- Versions: {_versions()}", f"- Wall time of this invocation: {wall_s / 60:.1f} min"]


def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    """Write a report atomically (a temporary sibling, then a rename): a stopped run never leaves half a
    file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _f(row: dict, key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def _cells(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    return sorted({(r["model"], r["task"], r["budget"]) for r in rows},
                  key=lambda c: (c[0], c[1], int(c[2][1:])))


def _in(rows: Sequence[dict], cell: tuple) -> list[dict]:
    return [r for r in rows if (r["model"], r["task"], r["budget"]) == cell]


def _order(conds: set[str]) -> list[str]:
    main = [c for c in CONDITIONS if c in conds]
    return main + sorted(c for c in conds if c not in main)


def cell_table(rows: Sequence[dict]) -> list[str]:
    """Markdown table of one cell: condition, n, params, target, Δ vs uniform, retention, Δ, verdict."""
    summary = {s["condition"]: s for s in stats.summarize(rows, ["target_loss", "retention_loss"])}
    tgt, ret = stats.by_seed(rows, "target_loss"), stats.by_seed(rows, "retention_loss")
    key = next(iter(tgt))[:3] if tgt else None
    uni_t = tgt.get((*key, "uniform"), {}) if key else {}
    uni_r = ret.get((*key, "uniform"), {}) if key else {}
    params: dict[str, list[int]] = {}
    plans: dict[str, set[str]] = {}
    for r in rows:
        params.setdefault(r["condition"], []).append(int(float(r["effective_params"] or 0)))
        plans.setdefault(r["condition"], set()).add(r.get("plan_hash", ""))
    lines = ["| condition | n | params (min–max) | target loss | Δ target vs uniform | retention loss "
             "| Δ retention vs uniform | target: vs uniform |",
             "|---|---|---|---|---|---|---|---|"]
    for cond in _order(set(summary)):
        s = summary[cond]
        t = tgt.get((*key, cond), {})
        rr = ret.get((*key, cond), {})
        dt = stats.paired(t, uni_t) if cond != "uniform" else None
        dr = stats.paired(rr, uni_r) if cond != "uniform" else None
        verdict = "—" if dt is None else stats.verdict(dt, cond, "uniform")
        p = params.get(cond, [0])
        same = (cond != "uniform" and "[" not in cond and plans.get(cond) == plans.get("uniform")
                and "" not in plans.get(cond, {""}))
        name = f"{cond} (= uniform's plan)" if same else cond
        lines.append(
            f"| {name} | {s['n']} | {min(p):,}–{max(p):,} | {s['target_loss'].fmt(4)} | "
            f"{'—' if dt is None else dt.fmt(4)} | {s['retention_loss'].fmt(4)} | "
            f"{'—' if dr is None else dr.fmt(4)} | {verdict} |")
    return lines


def overview(rows: Sequence[dict], baseline: str = "uniform", metric: str = "target_loss") -> list[str]:
    """One table across cells: each condition's paired Δ ``metric`` against ``baseline`` (bold where the 95%
    interval excludes 0); frontier variants left out."""
    cells = _cells(rows)
    table = stats.by_seed(rows, metric)
    conds = _order({r["condition"] for r in rows if not r["frontier"]})
    many = len({t for _, t, _ in cells}) > 1
    lines = ["| condition | " + " | ".join(f"{m} {t} {b}" if many else f"{m} {b}" for m, t, b in cells)
             + " |",
             "|---|" + "---|" * len(cells)]
    for cond in conds:
        out = []
        for cell in cells:
            ours, base = table.get((*cell, cond)), table.get((*cell, baseline))
            if not ours or not base:
                out.append("")
            elif cond == baseline:
                out.append(f"{stats.t_interval(ours.values()).mean:.4f}")
            else:
                d = stats.paired(ours, base)
                text = d.fmt(3)
                out.append(f"**{text}**" if d.n >= 2 and d.excludes_zero() else text)
        lines.append(f"| {cond} | " + " | ".join(out) + " |")
    return lines


def accuracy_lines(rows: Sequence[dict]) -> list[str]:
    """For tasks scored by accuracy (``target_accuracy``): each condition's accuracy, chance level and paired
    Δ accuracy against uniform (positive = more correct answers than uniform). Empty for loss-only tasks."""
    acc = [a for a in stats.summarize(rows, ["target_accuracy", "target_chance"]) if "target_accuracy" in a]
    if not acc:
        return []
    table = stats.by_seed(rows, "target_accuracy")
    lines = ["", "Answer accuracy (teacher-forced argmax; higher is better):", "",
             "| condition | accuracy | chance | Δ accuracy vs uniform |", "|---|---|---|---|"]
    for a in sorted(acc, key=lambda a: _order({x["condition"] for x in acc}).index(a["condition"])):
        key = (a["model"], a["task"], a["budget"])
        ours, base = table.get((*key, a["condition"])), table.get((*key, "uniform"))
        delta = "—"
        if a["condition"] != "uniform" and ours and base:
            d = stats.paired(ours, base)
            delta = f"**{d.fmt(3)}**" if d.n >= 2 and d.excludes_zero() else d.fmt(3)
        chance = f"{a['target_chance'].mean:.3f}" if "target_chance" in a else "—"  # exact match: none
        lines.append(f"| {a['condition']} | {a['target_accuracy'].fmt(3)} | {chance} | {delta} |")
    return lines


def frontier_points(rows: Sequence[dict]) -> list[tuple[str, float, float]]:
    """Uniform's (label, mean target, mean retention) points: the main run and its frontier variants."""
    pts = []
    for s in stats.summarize(rows, ["target_loss", "retention_loss"]):
        if s["condition"] == "uniform" or s["condition"].startswith("uniform["):
            pts.append((s["condition"], s["target_loss"].mean, s["retention_loss"].mean))
    return sorted(pts, key=lambda p: p[1])


def frontier_lines(rows: Sequence[dict]) -> list[str]:
    pts = frontier_points(rows)
    xy = [(x, y) for _, x, y in pts]
    lines = ["Uniform's frontier: " + ", ".join(f"{lab} ({x:.4f}, {y:.4f})" for lab, x, y in pts), "",
             "Gaps are between means; compare them with the paired Δ retention intervals in the table above.",
             "",
             "| condition | target | retention | retention minus uniform's frontier at equal target |",
             "|---|---|---|---|"]
    for s in stats.summarize(rows, ["target_loss", "retention_loss"]):
        if s["condition"].startswith("uniform"):
            continue
        x, y = s["target_loss"].mean, s["retention_loss"].mean
        gap = stats.frontier_gap(xy, x, y)
        if gap is None and pts and x < pts[0][1]:  # better target than the whole frontier: against its best
            label, _, retention = pts[0]
            where = ("lower target loss than the whole frontier, "
                     + (f"and less forgetting than {label} (dominates it in mean)" if y < retention else
                        f"at {y - retention:+.4f} retention against {label}"))
        elif gap is None:
            where = "outside the frontier's target range"
        elif abs(gap) < 5e-5:
            where = "on the frontier"
        else:
            where = f"{gap:+.4f} ({'below: less forgetting' if gap < 0 else 'above: more forgetting'})"
        lines.append(f"| {s['condition']} | {x:.4f} | {y:.4f} | {where} |")
    return lines


def plot(rows: Sequence[dict], path: Path) -> None:
    # matplotlib loads when a plot is drawn: the Agg backend is chosen before pyplot loads, and a process that
    # only imports this module (lr_sweep, pretrain_seeds: headers and markdown) keeps its own backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(rows)
    if not cells:
        return
    ncols = min(3, len(cells))
    nrows = -(-len(cells) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 5.2 * nrows), squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, cell in zip(axes.flat, cells):
        sub = _in(rows, cell)
        pts = frontier_points(sub)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "k--", lw=1, label="uniform frontier")
        for lab, x, y in pts:
            ax.annotate(lab.removeprefix("uniform"), (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        colors = plt.get_cmap("tab20").colors
        markers = "osD^v<>ph"
        for k, s in enumerate(stats.summarize(sub, ["target_loss", "retention_loss"])):
            c = s["condition"]
            if c.startswith("uniform["):
                continue
            t, r = s["target_loss"], s["retention_loss"]
            se = [_se(sub, c, "target_loss"), _se(sub, c, "retention_loss")]
            fmt, ms, color = {"uniform": ("s", 9, "k"), "allocator": ("*", 14, "r"),
                              "alloc_retention": ("*", 12, "m"), "alloc_tuned": ("P", 11, "b"),
                              "alloc_tuned_eva_init": ("P", 11, "c"), "full": ("x", 9, "k")}.get(
                c, (markers[k % len(markers)], 6, colors[k % len(colors)]))
            ax.errorbar([t.mean], [r.mean], xerr=[se[0]], yerr=[se[1]], fmt=fmt, ms=ms, color=color, lw=0.8,
                        capsize=2, label=c)
        ax.set_xlabel("target loss (nats/token, lower is better)")
        ax.set_ylabel("retention loss on held-out pretraining text")
        ax.set_title(" / ".join(cell) + "  (means over seeds, bars ±1 s.e.)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _se(rows: Sequence[dict], condition: str, metric: str) -> float:
    x = np.array([_f(r, metric) for r in rows if r["condition"] == condition])
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def _lrs(grid: Any) -> str:
    if not grid.lrs:
        return f"{grid.lr:g}"
    return "per model and budget, uniform's best on validation (" + ", ".join(
        f"{m} r{b} {lr:g}" for m, b, lr in sorted(grid.lrs)) + ")"


def write_report(rows: Sequence[dict], out: Path, *, grid: Any, grid_name: str, command: str, wall_s: float,
                 threads: int) -> Path:
    rows = list(rows)
    total = sum(_f(r, "wall_s") for r in rows)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    span = ""
    stamps = [(datetime.datetime.fromisoformat(r["finished"]), _f(r, "wall_s")) for r in rows
              if r.get("finished")]
    if stamps:
        first = min(t - datetime.timedelta(seconds=w) for t, w in stamps)
        last = max(t for t, _ in stamps)
        span = (f"; wall clock from the first run's start to the last run's end: "
                f"{(last - first).seconds / 60:.1f} min ({first:%H:%M}–{last:%H:%M} UTC)")
    md = ["# Placement benchmark: budget-matched LoRA placements on hybrid reference models", "",
          f"- Date: {now}", f"- Command: `{command}`", f"- Machine: {machine()}; torch threads {threads}",
          f"- Versions: {_versions()}",
          f"- Wall time of this invocation: {wall_s / 60:.1f} min; fine-tune time of all {len(rows)} runs in "
          f"the CSV: {total / 60:.1f} min{span}",
          f"- Runs in the CSV: models {', '.join(sorted({r['model'] for r in rows}))}; tasks "
          f"{', '.join(sorted({r['task'] for r in rows}))}; budgets "
          f"{', '.join(sorted({r['budget'] for r in rows}, key=lambda b: int(b[1:])))}; seeds "
          f"{sorted({int(r['seed']) for r in rows})}; grid `{grid_name}` settings: {grid.steps} steps × "
          f"{grid.batch_size} rows × 128 tokens, AdamW lr {_lrs(grid)} (full fine-tune {grid.full_lr:g}), "
          f"cosine, 10% warmup, LoRA alpha = 2r (constant scale); train {grid.n_train} rows, eval "
          f"{grid.n_eval} rows, calibration {grid.n_calib} train rows × 128 tokens",
          "- Budget: `rN` = the parameters of uniform rank N on every eligible target; every LoRA "
          "condition's PEFT count is asserted within 1% of it (AdaLoRA: `params` is its final unmasked "
          "count, not asserted; full fine-tuning has no budget).",
          "- Δ columns: paired (same seed) mean difference ± 95% t half-width; negative Δ target = better "
          "than uniform. Verdicts: the paired interval excludes 0, or indistinguishable.", "",
          "Raw runs: `placement_runs.csv`; plot: `placement.png`. Method and caveats: `docs/method.md`.", "",
          "## Overview: Δ target loss against uniform (paired, 95% t; bold = the interval excludes 0)", "",
          "The uniform row gives its mean target loss; negative = lower loss than uniform.", "",
          *overview(rows), "",
          "## Overview: Δ retention loss against uniform (what the model forgets; negative = forgets less)",
          "",
          *overview(rows, metric="retention_loss"), ""]
    for cell in _cells(rows):
        sub = _in(rows, cell)
        md += [f"## {' / '.join(cell)}", ""]
        base = {r["base_retention_loss"] for r in sub}
        init = {r["initial_target_loss"] for r in sub if not r["frontier"]}
        runs = ", ".join(sorted({f"{r['steps']} steps x {r['batch_size']} rows at lr {r['lr']}" for r in sub
                                 if r["condition"] == "uniform"}))
        md += [f"Before fine-tuning: target loss {', '.join(sorted(init))}, retention loss "
               f"{', '.join(sorted(base))}. Uniform's runs (the cell's lr): {runs or 'none'}.", ""]
        md += cell_table(sub) + [""]
        md += ["Paired verdicts on target loss (ours − baseline, 95% t-interval):", ""]
        for ours in OURS:
            for c in stats.compare(sub, "target_loss", ours, BASELINES + tuple(o for o in OURS if o != ours)):
                md.append(f"- {c['verdict']}: Δ {c['diff'].fmt(4)} (n={c['diff'].n})")
        for c in stats.compare(sub, "retention_loss", "alloc_retention", ("uniform", "allocator")):
            md.append(f"- retention: {c['verdict']}: Δ retention {c['diff'].fmt(4)} (n={c['diff'].n})")
        init_lines = [f"- {c['verdict']}: Δ {c['diff'].fmt(4)} (n={c['diff'].n})"
                      for ours, bases in INIT_PAIRS for c in stats.compare(sub, "target_loss", ours, bases)]
        if init_lines:
            md += ["", "With EVA's lora_A init (placement effects at equal init; target loss):", "",
                   *init_lines]
        gradient_lines = [f"- {c['verdict']}: Δ {c['diff'].fmt(4)} (n={c['diff'].n})"
                          for ours, bases in GRADIENT_INIT_PAIRS
                          for c in stats.compare(sub, "target_loss", ours, bases)]
        if gradient_lines:
            md += ["", "With the gradient lora_A init (`--init gradient`; target loss):", "", *gradient_lines]
        md += accuracy_lines(sub)
        md += ["", *frontier_lines(sub), ""]
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / PNG_NAME)
    md += [f"![target vs retention]({PNG_NAME})", "",
           "Plot: target loss (x) against retention loss (y), means over seeds with ±1 standard error; the "
           "dashed line joins uniform's runs at lower lr, fewer steps and a quarter of the budget (its "
           "frontier). A point below the line forgets less at equal target loss.", ""]
    return write_markdown(out / MD_NAME, md)
