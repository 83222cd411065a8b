"""`allocate [MODEL] --data PATH --budget B -o OUT_DIR`: plan a LoRA config. One API call:
``allocator.allocate``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import allocator
from allocator.commands import EXIT_CODES, run_guarded, usage_line
from allocator.commands._config import dump, resolve
from allocator.commands._options import (
    CHAT_TEMPLATE,
    DATA_FORMS,
    FUSED,
    GROUPS,
    MODEL,
    OVERWRITE,
    QUIET,
    REMOTE,
    REVISION,
    Arg,
    Parser,
    make_parser,
)
from allocator.errors import InputError

EXAMPLES = """\
examples:
  allocate
      the built-in demo: the shipped Qwen3.5-architecture reference model, built-in calibration text, budget
      r8, written to ./lora-plan
  allocate Qwen/Qwen3.5-0.8B --data train.jsonl --budget r16 -o plans/qwen-r16
      ranks for your data at the cost of uniform rank 16 over all eligible targets
  allocate ./my-model --data chat.jsonl --data-assistant-only-loss --budget 0.5% -o out
      chat records tokenised as TRL's SFTTrainer does, loss on the assistant turns
  allocate ./base-model --data chat.jsonl --chat-template chat_template.jinja -o out
      chat records for a model whose tokenizer has no chat template (a base model)
  allocate ./my-model --data notes.txt --budget 2.5M --solver-granularity module \\
      --solver-share-bounds attention=0.1:0.5 -o out
      2.5M trainable parameters, one rank per module, attention gets 10-50% of the budget
  allocate --config plan.yaml --budget r4
      settings from a YAML/JSON file, the budget from the command line (flags override the file);
      allocate ... --print-config > plan.yaml writes every setting, resolved

then, in Python:
  from peft import LoraConfig, get_peft_model
  model = get_peft_model(model, LoraConfig.from_pretrained("out"))  # trainable == allocation.json "cost"
  # or TRL: SFTTrainer(model, train_dataset=ds, peft_config=LoraConfig.from_pretrained("out"))

budgets: an absolute count (2500000, 2.5M, 800k), a share of the base model (0.5%), or a uniform
equivalent (r16 = what rank 16 on every eligible target costs).
flags: --GROUP-FIELD for a settings field (data, probe, utility, solver; lora's without a prefix); every
name, its config key and its API argument: docs/cli.md.
--overwrite replaces only the files a plan writes (a folder this tool wrote); files of yours beside them stay.
"""

ARGS = (
    MODEL,
    Arg("data.source", ("--data",), f"calibration data: {DATA_FORMS}", "builtin", api="data", metavar="DATA"),
    Arg("budget", ("--budget",), "trainable LoRA parameters: 2.5M | 0.5% | r16", "r8"),
    Arg("out_dir", ("-o", "--out-dir"), "output folder", "lora-plan"),
    OVERWRITE,
    REVISION,
    Arg("data.retention_source", ("--retention-data",), "general text for the retention risk ('builtin' "
        "for the package corpus)", api="retention_data", metavar="DATA"),
    Arg("cache_dir", ("--cache-dir",), "reuse probe reports stored here when model, data and settings match"),
    CHAT_TEMPLATE,
    FUSED,
    REMOTE,
    QUIET,
)
SETTINGS = tuple(GROUPS[k] for k in ("data", "lora", "solver", "utility", "probes"))
MAIN = ("model", "data.source", "budget", "out_dir", "overwrite", "data.samples", "data.seq_len",
        "data.assistant_only_loss", "solver.granularity", "lora.init")


def build_parser() -> Parser:
    return make_parser(
        "allocate", ARGS, SETTINGS, MAIN,
        usage="allocate [MODEL] [options]          (this help)\n"
        "       allocate inspect [MODEL] [options]  (what can be adapted: allocate inspect --help)\n"
        "       allocate tune [MODEL] --eval-data DATA [options]  (pilot fine-tunes: allocate tune --help)",
        description="Measure where LoRA parameters pay off in a (hybrid) causal LM and choose per-layer, "
        "per-component ranks under an exact trainable-parameter budget. Writes a PEFT adapter_config.json, "
        "allocation.json, report.md and heatmap.png.",
        epilog=EXAMPLES + EXIT_CODES + "\n",
    )


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args, ARGS, SETTINGS)
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    # imported when the command runs (torch, peft): --help and argument errors stay instant
    from allocator.output.plan import check_output_dir

    out = check_output_dir(cfg["out_dir"], overwrite=args.overwrite)  # fail before the expensive part
    if cfg["cache_dir"] is not None and Path(cfg["cache_dir"]).expanduser().resolve() == out:
        raise InputError(
            f"--cache-dir and -o are the same folder ({out}); give the probe cache a folder of its own"
        )
    started, lora = time.perf_counter(), cfg.settings["lora"]
    plan = allocator.allocate(
        cfg["model"],
        data=cfg["data.source"],
        budget=cfg["budget"],
        data_settings=cfg.settings["data"],
        probe_settings=cfg.settings["probes"],
        utility_settings=cfg.settings["utility"],
        solver_settings=cfg.settings["solver"],
        retention_data=cfg["data.retention_source"],
        fused_kernels=cfg["fused_kernels"],
        alpha_ratio=lora.alpha_ratio,
        use_rslora=lora.use_rslora,
        init=lora.init,
        cache_dir=cfg["cache_dir"],
        trust_remote_code=cfg["trust_remote_code"],
        revision=cfg["revision"],
        config=cfg.record(),
        chat_template=cfg["chat_template"],
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
        *textwrap.wrap(f"data    {plan.provenance.get('data', 'not recorded')}", 110,
                       subsequent_indent="          "),
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
