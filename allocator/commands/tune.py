"""`allocate tune [MODEL] --data PATH --eval-data PATH --trials N -o OUT_DIR`: one API call,
``allocator.tune``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from allocator.commands import EXIT_CODES, run_guarded, usage_line
from allocator.commands._options import Parser, add_settings_options, settings_from_args
from allocator.scoring.utility import UtilitySettings
from allocator.solver.settings import SolverSettings
from allocator.tuning.settings import TuneSettings
from probes.settings import DataSettings, ProbeSettings

EXAMPLES = """\
examples:
  allocate tune --data train.txt --eval-data eval.txt --trials 20 -o tune-out
      20 trials on the built-in reference model at budget r8: lr, alpha and the allocation settings searched
      jointly; baselines (uniform, attention-/recurrent-/mlp-only, the allocator's defaults) run first
  allocate tune ./my-model --data train.jsonl --eval-data eval.jsonl --mode pareto --budget r2..r12 -o out
      eval loss against trainable parameters; the Pareto front's plans land in out/pareto/
  allocate tune ./my-model --data d.txt --eval-data e.txt --lr 3e-3 --granularity layer-type -o out
      fix the learning rate and the granularity, search the rest
  allocate tune ./my-model --data d.txt --eval-data e.txt --init eva -o out
      every trial starts lora_A on EVA's input principal directions at its ranks; out/best records init 'eva'
  allocate tune ... --storage postgresql://host/db --study qwen-r8      (run on several machines)
      workers given the same --storage and --study share one study; on one machine, start the same command
      several times with the same -o (the default storage is sqlite:///OUT_DIR/study.db)

search parts: lo..hi (a range), a,b,c (a list), v (fixed), '' (keep the base --utility-*/--solver-* value);
append @v to set the base point the baselines use. A killed study resumes: run the same command again.
then: LoraConfig.from_pretrained("out/best") is the winning plan.
--overwrite starts over: it removes what tune wrote in OUT_DIR (other files stay) and deletes the study from
the storage that OUT_DIR's own record (tune.json) names, nowhere else.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="allocate tune",
        description="Run (or join, or resume) an Optuna study over the budget, the allocation settings, "
        "LoRA alpha and the learning rate; each trial solves from probes run once per study and "
        "scores a short LoRA fine-tune. Writes OUT_DIR/best (the winning plan), study.md and "
        "study.png.",
        epilog=EXAMPLES + EXIT_CODES + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local folder, or omitted for the built-in reference model",
    )
    parser.add_argument(
        "--data",
        default="builtin",
        help="calibration and fine-tune training data: .txt, .jsonl, a datasets folder or 'builtin'",
    )
    parser.add_argument(
        "--eval-data", required=True, help="text the fine-tuned adapters are scored on (eval loss)"
    )
    parser.add_argument(
        "--retention-data",
        default=None,
        help="general text for the retention risk; enables the lambda search",
    )
    parser.add_argument(
        "-o",
        "--output",
        default="tune-study",
        help="study folder: probe cache, default storage, results (default: ./tune-study)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna database URL shared by workers (default: sqlite:///OUTPUT/study.db)",
    )
    parser.add_argument("--study", default="tune", help="study name in the storage (default: tune)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove what tune wrote in the output folder and delete the study its record names",
    )
    parser.add_argument("--rslora", action="store_true", help="use rsLoRA scaling alpha/sqrt(r)")
    parser.add_argument(
        "--init",
        choices=("default", "eva"),
        default="default",
        help="lora_A init of every trial's fine-tune, recorded in the plans: PEFT's "
        "default, or 'eva' (top principal directions of each module's input at the "
        "trial's ranks; the study then picks the placement for that init)",
    )
    parser.add_argument(
        "--init-data",
        default=None,
        help="EVA's calibration data (default: --data); PEFT's "
        "EVA counts only labelled tokens, so data "
        "labelled on answers only may need its own",
    )
    parser.add_argument(
        "--no-fused-kernels", action="store_true", help="training runs without fused Mamba kernels"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own code from the hub"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_settings_options(parser, TuneSettings, title="study and search space")
    add_settings_options(parser, DataSettings, prefix="data", title="calibration data")
    add_settings_options(parser, UtilitySettings, prefix="utility", title="base utility settings")
    add_settings_options(parser, SolverSettings, prefix="solver", title="base solver settings")
    add_settings_options(parser, ProbeSettings, prefix="probe", title="probes")
    for action in parser._actions:  # a bare '%' in a settings help breaks argparse's help formatting
        try:
            (action.help or "") % {**vars(action), "prog": parser.prog}
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")
    return parser


def run(args: argparse.Namespace) -> int:
    from allocator.tuning.run import (
        tune,  # imported when the command runs (Optuna, torch): --help stays instant
    )

    started = time.perf_counter()
    result = tune(
        args.model,
        args.data,
        args.eval_data,
        settings=settings_from_args(args, TuneSettings),
        out_dir=args.output,
        storage=args.storage,
        study_name=args.study,
        overwrite=args.overwrite,
        data_settings=settings_from_args(args, DataSettings, prefix="data"),
        probe_settings=settings_from_args(
            args, ProbeSettings, prefix="probe", **({"progress": False} if args.quiet else {})
        ),
        utility_settings=settings_from_args(args, UtilitySettings, prefix="utility"),
        solver_settings=settings_from_args(args, SolverSettings, prefix="solver"),
        retention_data=args.retention_data,
        fused_kernels=not args.no_fused_kernels,
        use_rslora=args.rslora,
        init=args.init,
        init_data=args.init_data,
        trust_remote_code=args.trust_remote_code,
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
