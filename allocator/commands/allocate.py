"""`allocate [MODEL] --data PATH --budget B -o OUT_DIR`: plan a LoRA config. One API call:
``allocator.allocate``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import allocator
from allocator.commands import EXIT_CODES, run_guarded, usage_line
from allocator.commands._options import Parser, add_settings_options, settings_from_args
from allocator.errors import InputError
from allocator.scoring.utility import UtilitySettings
from allocator.solver.settings import SolverSettings
from probes.settings import DataSettings, ProbeSettings

EXAMPLES = """\
examples:
  allocate
      the built-in demo: the shipped Qwen3.5-architecture reference model, built-in calibration text,
      budget r8, written to ./lora-plan
  allocate Qwen/Qwen3.5-0.8B --data train.jsonl --budget r16 -o plans/qwen-r16
      ranks for your data at the cost of uniform rank 16 over all eligible targets
  allocate ./my-model --data notes.txt --budget 2.5M --granularity module --share attention=0.1:0.5 -o out
      2.5M trainable parameters, one rank per module, attention gets 10-50% of the budget
  allocate ./my-model --data chat.jsonl --budget 0.5% --retention-data builtin \
      --utility-retention-weight 0.5 -o out
      trade target fit against damage to general ability (probes on general text)

then, in Python:
  from peft import LoraConfig, get_peft_model
  model = get_peft_model(model, LoraConfig.from_pretrained("out"))  # trainable == allocation.json "cost"

budgets: an absolute count (2500000, 2.5M, 800k), a share of the base model (0.5%), or a uniform
equivalent (r16 = what rank 16 on every eligible target costs).
--overwrite replaces only the files a plan writes (a folder this tool wrote); files of yours beside them stay.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="allocate",
        description="Measure where LoRA parameters pay off in a (hybrid) causal LM and choose per-layer, "
        "per-component ranks under an exact trainable-parameter budget. Writes a PEFT adapter_config.json, "
        "allocation.json, report.md and heatmap.png.",
        epilog=EXAMPLES + EXIT_CODES + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="calibration data: .txt, .jsonl, a datasets folder, or 'builtin' (default)",
    )
    parser.add_argument(
        "--budget", default="r8", help="trainable LoRA parameters: 2.5M | 0.5%% | r16 (default: r8)"
    )
    parser.add_argument("-o", "--output", default="lora-plan", help="output folder (default: ./lora-plan)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the plan files in an output folder this tool wrote (other files are kept)",
    )
    parser.add_argument(
        "--retention-data",
        default=None,
        help="general text for the retention risk ('builtin' for the package corpus)",
    )
    parser.add_argument(
        "--alpha-ratio", type=float, default=2.0, help="lora_alpha = ratio * r per module (default: 2)"
    )
    parser.add_argument(
        "--rslora", action="store_true", help="use rsLoRA scaling alpha/sqrt(r) with one alpha"
    )
    parser.add_argument(
        "--init",
        choices=("default", "eva"),
        default="default",
        help="lora_A init recorded in the plan: PEFT's default, or 'eva' (top principal "
        "directions of each module's input at the plan's ranks; apply with "
        "Plan.apply(model, init_data=batches))",
    )
    parser.add_argument(
        "--no-fused-kernels",
        action="store_true",
        help="training runs without fused Mamba kernels: adapters on modules they bypass do work",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="reuse probe reports stored here when model, data and settings match",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own code from the hub (off by default)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_settings_options(parser, DataSettings, title="calibration data")
    add_settings_options(parser, SolverSettings, title="solver", aliases={"share_bounds": "--share"})
    add_settings_options(
        parser, UtilitySettings, prefix="utility", title="utility (how probe signals become rank values)"
    )
    add_settings_options(parser, ProbeSettings, prefix="probe", title="probes")
    return parser


def run(args: argparse.Namespace) -> int:
    # imported when the command runs (torch, peft): --help and argument errors stay instant
    from allocator.output.plan import check_output_dir

    out = check_output_dir(args.output, overwrite=args.overwrite)  # fail before the expensive part
    if args.cache_dir is not None and Path(args.cache_dir).expanduser().resolve() == out:
        raise InputError(
            f"--cache-dir and -o are the same folder ({out}); give the probe cache a folder of its own"
        )
    started = time.perf_counter()
    plan = allocator.allocate(
        args.model,
        data=args.data,
        budget=args.budget,
        data_settings=settings_from_args(args, DataSettings),
        probe_settings=settings_from_args(
            args, ProbeSettings, prefix="probe", **({"progress": False} if args.quiet else {})
        ),
        utility_settings=settings_from_args(args, UtilitySettings, prefix="utility"),
        solver_settings=settings_from_args(args, SolverSettings),
        retention_data=args.retention_data,
        fused_kernels=not args.no_fused_kernels,
        alpha_ratio=args.alpha_ratio,
        use_rslora=args.rslora,
        init=args.init,
        cache_dir=args.cache_dir,
        trust_remote_code=args.trust_remote_code,
    )
    folder = plan.save(out, overwrite=args.overwrite)
    print(format_summary(plan, folder, time.perf_counter() - started))
    return 0


def format_summary(plan, folder: Path, seconds: float) -> str:
    import textwrap

    # with the plan: its stage is loaded
    from allocator.output.report import family_rows, marginal_text, uniform_comparison, verdict_lines

    uniform = uniform_comparison(plan)
    lines = []
    for i, sentence in enumerate(verdict_lines(plan)):
        lines += textwrap.wrap(sentence, 110, initial_indent="verdict " if i == 0 else "        ",
                               subsequent_indent="          " if i else "        ")
    compare = (
        f"uniform rank {uniform.rank} on all {uniform.n_targets} targets would cost {uniform.cost:,}"
        if not uniform.below_r1
        else f"your budget ({plan.budget:,}) is below uniform r1 ({uniform.per_rank:,}); uniform r1 over "
        f"{' + '.join(uniform.families) or 'no family'} ({uniform.n_targets} modules) would cost "
        f"{uniform.cost:,}"
    )
    lines += [
        "",
        f"model   {plan.model_id}",
        f"budget  {plan.budget:,} parameters; plan cost {plan.cost:,} "
        f"({plan.cost / max(plan.budget, 1):.1%})",
        f"        {compare}",
        "",
        f"{'family':<10} {'adapted':>9} {'ranks':<20} {'parameters':>12} {'budget':>7} "
        f"{'next rank buys':>15}",
    ]
    for row in family_rows(plan):
        lines.append(
            f"{row.family:<10} {row.adapted:>4}/{row.modules:<4} {row.ranks:<20} {row.params:>12,} "
            f"{row.share_budget:>7.1%} {marginal_text(row.marginal):>15}"
        )
    lines += [
        "(next rank buys: utility per million parameters of the next grid rank; the solver equalises it)",
        "",
        f"wrote {folder}/adapter_config.json, allocation.json, report.md, heatmap.png ({seconds:.0f} s)",
        usage_line(folder, plan.init),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_guarded(run, build_parser().parse_args(argv), interrupted="interrupted; nothing was written")
