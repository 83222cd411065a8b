"""`allocate tune [MODEL] --data PATH --eval-data PATH --tune-trials N -o OUT_DIR`: one API call,
``allocator.tune``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from allocator.commands import EXIT_CODES, run_guarded, usage_line
from allocator.commands._config import dump, resolve
from allocator.commands._options import (
    CHAT_TEMPLATE,
    DATA_FORMS,
    FUSED,
    GROUPS,
    MODEL,
    QUIET,
    REMOTE,
    REVISION,
    Arg,
    Group,
    Parser,
    make_parser,
)

EXAMPLES = """\
examples:
  allocate tune --data train.txt --eval-data eval.txt --tune-trials 20 -o tune-out
      20 trials on the built-in reference model at budget r8: lr, alpha and the allocation settings searched
      jointly; baselines (uniform, attention-/recurrent-/mlp-only, the allocator's defaults) run first
  allocate tune ./my-model --data train.jsonl --eval-data eval.jsonl --tune-mode pareto \\
      --tune-budget r2..r12 -o out
      eval loss against trainable parameters; the Pareto front's plans land in out/pareto/
  allocate tune ./my-model --data d.txt --eval-data e.txt --tune-lr 3e-3 --tune-granularity layer-type -o out
      fix the learning rate and the solver granularity, search the rest
  allocate tune ./my-model --data d.txt --eval-data e.txt --init eva -o out
      every trial starts lora_A on EVA's input principal directions at its ranks; out/best records init 'eva'
      (--init gradient: on the top right singular vectors of each module's calibration-loss gradient)
  allocate tune --config study.yaml --storage postgresql+psycopg://host/db --study-name qwen-r8
      settings from a file; workers given the same --storage and --study-name share one study (several
      machines); on one machine, start the same command several times with the same -o (the default storage is
      sqlite:///OUT_DIR/study.db)

search parts (--tune-lr, --tune-granularity, ...): lo..hi (a range), a,b,c (a list), v (fixed), '' (keep the
base --utility-*/--solver-* value); append @v to set the base point the baselines use. --tune-granularity
searches what --solver-granularity fixes; --tune-max-rank searches the largest rank of --solver-ranks.
A killed study resumes: run the same command again. Every flag, its config key and API argument:
docs/cli.md. Watch a study: optuna-dashboard STORAGE_URL.
then: LoraConfig.from_pretrained("out/best") is the winning plan.
--overwrite starts over: it removes what tune wrote in OUT_DIR (other files stay) and deletes the study from
the storage that OUT_DIR's own record (tune.json) names, nowhere else.
"""

ARGS = (
    MODEL,
    Arg("data.source", ("--data",), f"calibration and fine-tune training data: {DATA_FORMS}", "builtin",
        api="data", metavar="DATA"),
    Arg("data.eval_source", ("--eval-data",), "data the fine-tuned adapters are scored on (eval loss); "
        "required", api="eval_data", metavar="DATA"),
    Arg("out_dir", ("-o", "--out-dir"), "study folder: probe cache, default storage, results", "tune-study"),
    Arg("storage", ("--storage",), "Optuna database URL shared by workers (default: "
        "sqlite:///OUT_DIR/study.db)"),
    Arg("study_name", ("--study-name",), "study name in the storage", "tune"),
    Arg("overwrite", ("--overwrite",), "start over: remove what tune wrote in the output folder and delete "
        "the study its record names", False, "action"),
    REVISION,
    Arg("data.retention_source", ("--retention-data",), "general text for the retention risk; enables the "
        "lambda search", api="retention_data", metavar="DATA"),
    Arg("data.init_source", ("--init-data",), "calibration data of --init eva or gradient (default: --data); "
        "both count only labelled tokens, so data labelled on answers only may need its own", api="init_data",
        metavar="DATA"),
    CHAT_TEMPLATE,
    FUSED,
    REMOTE,
    QUIET,
)
# tune searches the alpha ratio (--tune-alpha-ratio): the lora group without it
LORA = Group("lora", "", GROUPS["lora"].cls, GROUPS["lora"].title, skip=("alpha_ratio",))
SETTINGS = (GROUPS["tune"], GROUPS["data"], LORA, GROUPS["solver"], GROUPS["utility"], GROUPS["probes"])
MAIN = ("model", "data.source", "data.eval_source", "tune.trials", "tune.budget", "tune.steps", "out_dir",
        "storage", "study_name", "overwrite", "lora.init")


def build_parser() -> Parser:
    return make_parser(
        "allocate tune", ARGS, SETTINGS, MAIN,
        usage="allocate tune [MODEL] --eval-data DATA [options]",
        description="Run (or join, or resume) an Optuna study over the budget, the allocation settings, "
        "LoRA alpha and the learning rate; each trial solves from probes run once per study and "
        "scores a short LoRA fine-tune. Writes OUT_DIR/best (the winning plan), study.md and "
        "study.png.",
        epilog=EXAMPLES + EXIT_CODES + "\n",
    )


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args, ARGS, SETTINGS)
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    from allocator.tuning.run import tune  # imported when the command runs (Optuna, torch)

    started = time.perf_counter()
    result = tune(
        cfg["model"],
        cfg["data.source"],
        cfg["data.eval_source"],
        settings=cfg.settings["tune"],
        out_dir=cfg["out_dir"],
        storage=cfg["storage"],
        study_name=cfg["study_name"],
        overwrite=args.overwrite,
        data_settings=cfg.settings["data"],
        probe_settings=cfg.settings["probes"],
        utility_settings=cfg.settings["utility"],
        solver_settings=cfg.settings["solver"],
        retention_data=cfg["data.retention_source"],
        fused_kernels=cfg["fused_kernels"],
        use_rslora=cfg.settings["lora"].use_rslora,
        init=cfg.settings["lora"].init,
        init_data=cfg["data.init_source"],
        trust_remote_code=cfg["trust_remote_code"],
        revision=cfg["revision"],
        config=cfg.record(),
        chat_template=cfg["chat_template"],
    )
    print(format_summary(result, time.perf_counter() - started))
    return 0


def format_summary(result, seconds: float) -> str:
    import textwrap

    from allocator.tuning.report import attribution_lines, recipe_text  # with the result: its stage is loaded

    states = [r.state for r in result.trials]
    lines = [
        f"study   {result.study_name} in {result.storage} ({result.mode} mode)",
        f"trials  {states.count('complete')} complete, {states.count('pruned')} pruned, "
        f"{states.count('fail')} failed",
    ]
    if result.best is not None:
        b = result.best
        placement = "identical to uniform" if result.attribution.get("identical_to_uniform") else "solved"
        lines.append(
            f"winner  trial {b.number} ({b.baseline or b.placement}): eval loss {b.value:.4f}, "
            f"{b.cost:,} params; placement {placement}"
        )
    for name, delta in result.versus.items():
        lines.append(f"        vs {name:<10} {result.baselines[name].value:.4f}  ({delta:+.4f})")
    for sentence in attribution_lines(result)[1:]:
        lines += textwrap.wrap(sentence, 110, initial_indent="        ", subsequent_indent="          ")
    folder = Path(result.out_dir) if result.out_dir else Path(".")
    recipe = recipe_text(result)
    lines += [
        "",
        f"wrote {folder}/best, study.md, study.png ({seconds:.0f} s)",
        usage_line(folder / "best", result.best_plan.init if result.best_plan else "default")
        + (f"; {recipe}" if recipe else ""),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_guarded(
        run,
        build_parser().parse_args(argv),
        interrupted="interrupted; run the same command again to resume the study",
    )
