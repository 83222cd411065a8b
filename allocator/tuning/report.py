"""The result of `allocate tune`: a study's trials -> :class:`TuneResult`, and the files in ``OUT_DIR``.

``summarize(study, rebuild, ...)`` gathers rows (data, testable); ``render_markdown`` and ``write_plot`` only
format them; ``write_outputs`` writes, each file atomically::

    OUT_DIR/best/        the winner's plan, as `allocate -o` writes it (adapter_config.json, allocation.json,
    ...)
    OUT_DIR/pareto/      pareto mode: trial-NNNN/ per point of the front (adapter_config.json,
    allocation.json)
    OUT_DIR/study.md     trials, baselines vs winner, Pareto front, parameter importances
    OUT_DIR/study.png    history (single mode) or Pareto front (pareto mode); study.json: TuneResult.to_dict()

``check_out_dir`` / ``prepare_out_dir`` keep one study per folder (``tune.json`` names it) and ``FileLock`` is
the lock file the workers sharing the folder serialise on. The winner is the lowest-loss complete trial.
Against each baseline it is compared with the best trial that costs no more than that baseline's budget (in
single mode every trial shares the budget), so every difference is <= 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.errors import as_input_error
from allocator.output.verdict import short_verdict, uniform_comparison, verdict_lines
from allocator.tuning.attribution import UNIFORM_AT_WINNER, attribute, training_key
from probes.folders import FolderError, write_file, write_folder

if TYPE_CHECKING:
    from allocator.output.plan import Plan



@dataclass(frozen=True)
class TrialRow:
    """One trial as the report shows it."""

    number: int
    state: str  # complete | pruned | fail | running | waiting
    placement: str  # solver | uniform | attention | recurrent | mlp
    baseline: str | None  # the enqueued baseline this trial is, if any
    value: float | None  # eval loss (or the user objective); last reported value of a pruned trial
    cost: int | None  # trainable parameters of the trial's plan
    budget: int | None
    params: Mapping[str, Any]
    duration_s: float | None
    note: str = ""
    steps: int | None = None  # optimizer steps its pilot fine-tune ran (fewer when pruned)


@dataclass(frozen=True)
class TuneResult:
    """What a study found, as of the end of this worker's run."""

    study_name: str = field(metadata={"help": "Optuna study name"})
    storage: str = field(metadata={"help": "storage URL, password hidden"})
    mode: str = field(metadata={"help": "single | pareto"})
    trials: tuple[TrialRow, ...] = field(metadata={"help": "every trial of the study, by number"})
    best: TrialRow | None = field(metadata={"help": "the lowest-loss complete trial"})
    best_plan: Plan | None = field(repr=False, metadata={"help": "its plan (saved to OUT_DIR/best)"})
    pareto: tuple[TrialRow, ...] = field(metadata={"help": "pareto mode: the front, by cost"})
    pareto_plans: Mapping[int, Plan] = field(repr=False, metadata={"help": "trial number -> plan of the "
                                                                           "front"})
    baselines: Mapping[str, TrialRow] = field(metadata={"help": "complete baseline trials by name"})
    versus: Mapping[str, float] = field(
        metadata={"help": "baseline -> loss of the best trial within its budget minus its loss (<= 0)"})
    importances: Mapping[str, float] = field(metadata={"help": "importance of each searched parameter "
                                                               "(eval loss)"})
    importance_note: str = field(metadata={"help": "the importance method used, or why there are none"})
    probe_seconds: float = field(metadata={"help": "this worker's probe time (a cache hit is ~0)"})
    out_dir: Path | None = field(default=None, metadata={"help": "where the files were written"})
    attribution: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the winner's gain over uniform split into placement and training settings "
                          "(allocator.tuning.attribution.attribute)"})
    recipe: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "how to train the winner as its pilot was: lr, alpha_ratio, steps, batch_size, "
                          "seq_len, init (steps and sizes only with the built-in fine-tune)"})

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("best_plan", "pareto_plans")}
        out["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        return out


def _row(t: Any) -> TrialRow:
    value = t.values[0] if t.values else (t.intermediate_values[max(t.intermediate_values)]
                                          if t.intermediate_values else None)
    return TrialRow(
        number=t.number,
        state=t.state.name.lower(),
        placement=t.params.get("placement", "?"),
        baseline=t.user_attrs.get("baseline"),
        value=None if value is None else float(value),
        cost=t.user_attrs.get("cost"),
        budget=t.user_attrs.get("budget"),
        params={k: v for k, v in sorted(t.params.items()) if k != "placement"},
        duration_s=None if t.duration is None else t.duration.total_seconds(),
        note=t.user_attrs.get("note", ""),
        steps=t.user_attrs.get("steps"),
    )


def summarize(
    study: Any,
    rebuild: Callable[[Mapping[str, Any], int], Plan],
    *,
    storage: str,
    mode: str,
    probe_seconds: float = 0.0,
    importances: Callable[[list[TrialRow], list[str]], tuple[dict[str, float], str]] | None = None,
    training: Mapping[str, Any] | None = None,
) -> TuneResult:
    """Rows, winner, Pareto front, baselines and importances of ``study`` (anything with ``get_trials``,
    ``best_trials`` and ``study_name``, such as an Optuna study); ``rebuild(params, number)`` remakes a
    trial's plan (solving is deterministic, so plans are not stored in the database); ``importances(searched
    rows, shared params)`` gives the parameter importances and a note on their method; ``training`` (steps,
    batch size, sequence length of the built-in fine-tune) completes the winner's recipe."""
    trials = study.get_trials(deepcopy=False)
    rows = tuple(_row(t) for t in trials)
    done = [r for r in rows if r.state == "complete" and r.value is not None and math.isfinite(r.value)]
    best = min(done, key=lambda r: (r.value, r.cost or 0, r.number), default=None)
    pareto: tuple[TrialRow, ...] = ()
    if mode == "pareto" and done:
        numbers = {t.number for t in study.best_trials}
        pareto = tuple(sorted((r for r in done if r.number in numbers), key=lambda r: (r.cost or 0, r.value)))
    baselines = {r.baseline: r for r in done if r.baseline and r.baseline != UNIFORM_AT_WINNER}
    versus = {}
    for name, b in sorted(baselines.items()):
        within = [r for r in done if (r.cost or 0) <= (b.budget or 0)] if mode == "pareto" else done
        versus[name] = min(r.value for r in within) - b.value
    searched = [r for r in done if r.placement == "solver" and r.baseline is None]
    shared = sorted(set.intersection(*(set(r.params) for r in searched))) if searched else []
    importance, note = importances(searched, shared) if importances is not None else ({}, "not computed")
    by_number = {t.number: t for t in trials}
    wanted = {r.number: r for r in (*pareto, *([best] if best else []))}
    plans = {n: rebuild(by_number[n].params, n) for n in wanted}
    best_plan = plans.get(best.number) if best else None
    uniform_rank = uniform_comparison(best_plan).rank if best_plan is not None else 0
    identical = uniform_rank > 0 and set(best_plan.ranks.values()) == {uniform_rank}
    recipe = {} if best_plan is None else {
        "lr": (best_plan.provenance.get("tune") or {}).get("lr"), "alpha_ratio": best_plan.alpha_ratio,
        **dict(training or {}), "init": best_plan.init}
    return TuneResult(
        study_name=study.study_name,
        storage=storage,
        mode=mode,
        trials=rows,
        best=best,
        best_plan=best_plan,
        pareto=pareto,
        pareto_plans={r.number: plans[r.number] for r in pareto},
        baselines=baselines,
        versus=versus,
        importances=importance,
        importance_note=note,
        probe_seconds=probe_seconds,
        attribution=attribute(done, best, baselines.get("uniform"), identical),
        recipe=recipe,
    )


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _settings_diff(best: TrialRow, other: TrialRow) -> str:
    """``'lr 7.8e-03 vs 3e-03, alpha_ratio 1.58 vs 2'``: the training settings in which two trials differ."""
    a, b = training_key(best.params), training_key(other.params)
    return ", ".join(f"{k} {_g(a[k])} vs {_g(b[k])}" for k in a if k in b and a[k] != b[k]) or "none"


def _g(value: Any) -> str:
    """``113,024``, ``1.58``, ``7.80e-03``: counts with separators, small floats (an lr) in exponent form."""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}" if 0.01 <= abs(value) < 1e4 else f"{value:.2e}"


def attribution_lines(result: TuneResult) -> list[str]:
    """The winner's gain over uniform split into placement and training settings, in plain language."""
    b, a = result.best, result.attribution
    if b is None or not a:
        return []
    same = "identical to uniform" if a["identical_to_uniform"] else "differs from uniform"
    if result.best_plan is not None and not a["identical_to_uniform"]:
        same = short_verdict(result.best_plan)
    lines = [f"winner: trial {b.number} ({b.baseline or b.placement}), eval loss {b.value:.4f}; "
             f"placement {same}"]
    at = a.get("uniform_at_winner")
    at_text = (f"uniform at the winner's settings: trial {at}, {a['uniform_at_winner_loss']:.4f}"
               if at is not None else "")
    if "total" in a:
        u, n = result.baselines["uniform"], sum(r.state in ("complete", "pruned") for r in result.trials)
        if at is None:
            lines.append(f"against uniform (trial {u.number}, {u.value:.4f}): {a['total']:+.4f}, not split: "
                         "uniform at the winner's lr and alpha was not scored (the study's last trial won); "
                         f"resume with --tune-trials {n + 1} to score it")
        else:
            what = "training settings" + (" and budget" if b.budget != u.budget else "")
            lines.append(f"against uniform (trial {u.number}, {u.value:.4f}): {a['total']:+.4f} = placement "
                         f"{a['placement']:+.4f} + {what} {a['settings']:+.4f} ({at_text}; "
                         f"settings that differ: {_settings_diff(b, u)})")
    elif at is not None:
        lines.append(f"placement: {a['placement']:+.4f} against {at_text}")
    return lines


def recipe_text(result: TuneResult) -> str:
    """How to train the winner as its pilot was: ``'train at lr 7.8e-03 for 60 steps of 8 x 128 tokens
    (lora_alpha = 1.58 x rank, in the config)'``; empty without a winner."""
    r = result.recipe
    if not r:
        return ""
    lr = "the lr your objective used" if r.get("lr") is None else f"lr {_g(float(r['lr']))}"
    steps = (f" for {r['steps']} steps of {r['batch_size']} x {r['seq_len']} tokens" if "steps" in r else "")
    return f"train at {lr}{steps} (lora_alpha = {_g(float(r['alpha_ratio']))} x rank, in the config)"


def render_markdown(result: TuneResult, plot_name: str = "study.png") -> str:
    """``study.md``: summary, winner vs baselines, Pareto front, importances, every trial."""
    states = [r.state for r in result.trials]
    init = {"eva": "EVA's", "gradient": "the gradient's"}.get(getattr(result.best_plan, "init", 0))
    lines = [
        f"# Tune study `{result.study_name}` ({result.mode} mode)",
        "",
        f"- storage: `{result.storage}`",
        *(
            [f"- lora_A init of every trial: {init} (apply `best/` with `Plan.apply(model, init_data=...)`)"]
            if init
            else []
        ),
        f"- trials: {states.count('complete')} complete, {states.count('pruned')} pruned, "
        f"{states.count('fail')} failed, {states.count('running') + states.count('waiting')} "
        "unfinished",
        "",
    ]
    if result.best is not None:
        b = result.best
        verdict = attribution_lines(result)
        if result.best_plan is not None:  # its verdict, less the advice to run a study
            plan_lines = [line for line in verdict_lines(result.best_plan) if not line.startswith("next:")]
            verdict += [f"the winning plan: {line}" if i == 0 else line for i, line in enumerate(plan_lines)]
        verdict.append(f"reproduce: `LoraConfig.from_pretrained(\"best\")`, {recipe_text(result)}")
        lines[1:1] = ["", "## Verdict", "", *(f"- {v[0].upper()}{v[1:]}" for v in verdict), "", "## Study"]
        lines += [
            "## Winner",
            "",
            f"Trial {b.number} ({b.baseline or b.placement}): eval loss "
            f"**{b.value:.4f}**, {b.cost:,} trainable parameters (budget "
            f"{b.budget:,}); plan in `best/`.",
            "",
            f"Parameters: {_params_text(b.params) or '(all at base values)'}",
            "",
        ]
    if result.versus:
        lines += [
            "## Against the baselines",
            "",
            "| baseline | trial | eval loss | parameters | winner − baseline |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, delta in result.versus.items():
            r = result.baselines[name]
            lines.append(f"| {name} | {r.number} | {r.value:.4f} | {r.cost:,} | {delta:+.4f} |")
        at = next((r for r in result.trials if r.number == result.attribution.get("uniform_at_winner")), None)
        if at is not None and at.baseline == UNIFORM_AT_WINNER:
            lines.append(f"| uniform at the winner's lr and alpha | {at.number} | {at.value:.4f} | "
                         f"{at.cost:,} | {result.attribution['placement']:+.4f} |")
        lines.append("")
    if result.pareto:
        lines += [
            "## Pareto front",
            "",
            "| trial | eval loss | parameters | placement | parameters of the trial |",
            "|---:|---:|---:|---|---|",
        ]
        lines += [
            f"| {r.number} | {r.value:.4f} | {r.cost:,} | {r.baseline or r.placement} | "
            f"{_params_text(r.params)} |"
            for r in result.pareto
        ]
        lines += ["", "Plans: `pareto/trial-NNNN/`.", ""]
    lines += ["## Parameter importances (eval loss)", "", f"_{result.importance_note}_", ""]
    lines += [f"- `{k}`: {v:.3f}" for k, v in result.importances.items()]
    lines += [
        "",
        f"![study]({plot_name})",
        "",
        "## Trials",
        "",
        "| # | state | placement | eval loss | parameters | seconds | settings |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    for r in result.trials:
        lines.append(
            f"| {r.number} | {r.state} | {r.baseline or r.placement} | {_fmt(r.value)} | "
            f"{_fmt(r.cost, ',') if r.cost is not None else '–'} | {_fmt(r.duration_s, '.1f')} | "
            f"{_params_text(r.params)}{' — ' + r.note if r.note else ''} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(result: TuneResult, path: Path) -> None:
    """History (single) or loss vs trainable parameters with the front (pareto); baselines are labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in result.trials if r.state == "complete" and r.value is not None]
    pruned = [r for r in result.trials if r.state == "pruned" and r.value is not None]
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    if result.mode == "pareto":
        ax.scatter([r.cost for r in done], [r.value for r in done], s=18, c="0.6", label="trials")
        front = list(result.pareto)
        ax.step([r.cost for r in front], [r.value for r in front], where="post", c="C0", lw=1.5)
        ax.scatter([r.cost for r in front], [r.value for r in front], s=30, c="C0", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
    else:
        ax.scatter([r.number for r in done], [r.value for r in done], s=18, c="C0", label="complete")
        if pruned:
            ax.scatter(
                [r.number for r in pruned],
                [r.value for r in pruned],
                s=18,
                marker="x",
                c="0.6",
                label="pruned (last report)",
            )
        ordered = sorted(done, key=lambda r: r.number)
        running = [min(r.value for r in ordered[: i + 1]) for i in range(len(ordered))]
        ax.step([r.number for r in ordered], running, where="post", c="C1", label="best so far")
        ax.set_xlabel("trial")
    for i, (name, r) in enumerate(sorted(result.baselines.items(), key=lambda kv: kv[1].value)):
        x = r.cost if result.mode == "pareto" else r.number
        ax.scatter([x], [r.value], s=40, marker="D", c="C3")
        ax.annotate(
            name,
            (x, r.value),
            textcoords="offset points",
            xytext=(5, -11 if i % 2 else 4),
            fontsize=8,
            color="C3",
        )
    ax.set_ylabel("eval loss")
    ax.set_title(f"{result.study_name}: {len(done)} complete trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: TuneResult, out: Path) -> TuneResult:
    """Write ``best/``, ``pareto/``, ``study.md``, ``study.png`` and ``study.json`` (the caller holds the
    lock), each through the safe writer of :mod:`probes.folders` (atomic; only the tool's own files are
    replaced)."""
    if result.best_plan is not None:
        result.best_plan.save(out / "best", overwrite=True)
    if result.pareto_plans:

        def fill(tmp: Path) -> None:
            for number, plan in sorted(result.pareto_plans.items()):
                plan.save(tmp / f"trial-{number:04d}", report=False)

        with as_input_error(FolderError):
            write_folder(out / "pareto", fill, overwrite=True)
    write_file(out / "study.png", lambda path: write_plot(result, path))
    result = replace(result, out_dir=out)
    write_file(out / "study.md", render_markdown(result))
    write_file(out / "study.json", json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    return result
