"""`allocate inspect [MODEL]`: print what LoRA could adapt, layer by layer. One API call:
``inspect_model``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import resources

import allocator
from allocator.commands import EXIT_CODES, run_guarded
from allocator.commands._options import REVISION, Parser
from allocator.errors import InputError

DEFAULT_CONFIG = "qwen3_5-0.8b.config.json"  # allocator/data: the Qwen3.5-0.8B architecture, config only

EXAMPLES = """\
examples:
  allocate inspect
      the built-in Qwen3.5-0.8B config (allocator/data/qwen3_5-0.8b.config.json): 18 GatedDeltaNet layers, 6
      attention layers, 24 MLPs
  allocate inspect ./Falcon-H1-0.5B/config.json --rank 16
      any config.json: built on the meta device in seconds, no weights needed
  allocate inspect tiiuae/Falcon-H1-0.5B-Instruct --no-fused-kernels
      a hub id (HF cache first); count Mamba-2 out_proj as adaptable, as on a CPU-only or kernel-free run
  allocate inspect ./my-model --json > components.json
      machine-readable: totals, per-kind and per-layer groups, and every component
  allocate inspect Qwen/Qwen3.5-0.8B --probe-memory --data-batch-size 2 --data-seq-len 1024 --dtype bfloat16
      predicted peak memory per device of probing and of a LoRA step (traced on the meta device)

columns: modules / LoRA parameters per rank unit (Σ d_in + d_out, times experts). Multiply by a rank
to get a cost: "at r=16" does it for you. "not effective" modules are never offered: their forward
is bypassed (fused Mamba kernels, dt_proj), they never run (dead Zamba2 adapter entries), or PEFT
refuses them (out_proj on falcon_h1 / mamba / nemotron_h).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="allocate inspect",
        description="List every module a LoRA could adapt, labelled by decoder layer, family (attention, "
        "recurrent, mlp, moe, other) and kind (softmax, gated_deltanet, mamba2, expert, ...), with the "
        "LoRA cost of one rank unit per group.",
        epilog=EXAMPLES + EXIT_CODES + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, model folder or path to a config.json (default: the built-in "
        "Qwen3.5-0.8B config, allocator/data/qwen3_5-0.8b.config.json)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--revision", default=None, help=REVISION.help)
    parser.add_argument(
        "--fused-kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="training runs with fused Mamba kernels (default); --no-fused-kernels: "
        "without them (CPU, no mamba_ssm), adapters only those kernels bypass count as "
        "effective",
    )
    parser.add_argument(
        "--trust-remote-code",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="allow a model folder's own modeling code (transformers trust_remote_code; default: off)",
    )
    parser.add_argument(
        "--rank", type=int, default=16, help="rank used for the 'at r=R' column (default: 16)"
    )
    parser.add_argument("--modules", action="store_true", help="also list every component, one per line")
    _add_memory_flags(parser.add_argument_group("memory (--probe-memory)"))
    parser.add_argument(
        "--version",
        action="version",
        version=f"allocate {allocator.__version__}",
        help="print the version and exit",
    )
    return parser


def _add_memory_flags(memory) -> None:
    """--probe-memory and the settings it predicts for (the names `allocate` gives the same settings)."""
    memory.add_argument(
        "--probe-memory",
        action="store_true",
        help="predict peak memory per device of probing (weights, activations, probe state) "
        "and of a LoRA step at --rank (weights, adapters + AdamW, activations)",
    )
    memory.add_argument(
        "--data-batch-size",
        type=int,
        default=4,
        metavar="BATCH_SIZE",
        help="sequences per micro-batch, as allocate's --data-batch-size (default: 4)",
    )
    memory.add_argument(
        "--data-seq-len",
        type=int,
        default=256,
        metavar="SEQ_LEN",
        help="tokens per sequence, as allocate's --data-seq-len (default: 256)",
    )
    memory.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="model dtype (default: the config's torch_dtype, else float32)",
    )
    memory.add_argument(
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="devices the model is split over (device_map placement; default: 1)",
    )
    memory.add_argument(
        "--probe-gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="probe with gradient checkpointing, as in allocate (default: off)",
    )
    memory.add_argument(
        "--probe-modules-per-pass",
        type=int,
        default=0,
        metavar="N",
        help="probe at most N modules per pass over the data, as in allocate (default: 0, all in one pass)",
    )


def run(args: argparse.Namespace) -> int:
    from allocator.discovery.inspect import inspect_model  # torch, transformers: loaded when the command runs

    if args.rank < 1:
        raise InputError(f"--rank must be >= 1, got {args.rank}")
    ref, name = args.model, args.model
    if ref is None:
        ref = str(resources.files("allocator") / "data" / DEFAULT_CONFIG)
        name = f"{DEFAULT_CONFIG} (built-in)"
    report = inspect_model(
        ref,
        fused_kernels=args.fused_kernels,
        trust_remote_code=args.trust_remote_code,
        name=name,
        revision=args.revision,
    )
    for message in report.warnings:
        print(f"warning: {message}", file=sys.stderr)
    estimate = _memory(ref, args) if args.probe_memory else None
    if args.json:
        data = report.to_dict() | ({"memory": memory_dict(estimate)} if estimate else {})
        print(json.dumps(data, indent=1, sort_keys=True))
    else:
        print(format_report(report, rank=args.rank, modules=args.modules))
        if estimate is not None:
            print("\n" + "\n".join(format_memory(estimate)))
    return 0


def _memory(ref: str, args: argparse.Namespace):
    import torch  # noqa: PLC0415

    from allocator.discovery.components import find_components  # noqa: PLC0415
    from allocator.discovery.modelio import load_skeleton  # noqa: PLC0415
    from allocator.memory import estimate  # noqa: PLC0415
    from probes.settings import ProbeSettings  # noqa: PLC0415

    for flag, value, low in (
        ("--data-batch-size", args.data_batch_size, 1),
        ("--data-seq-len", args.data_seq_len, 2),
        ("--devices", args.devices, 1),
        ("--probe-modules-per-pass", args.probe_modules_per_pass, 0),
    ):
        if value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    skeleton = load_skeleton(ref, trust_remote_code=args.trust_remote_code, revision=args.revision)
    named = args.dtype or str(getattr(skeleton.config, "dtype", None) or "float32").removeprefix("torch.")
    dtype = getattr(torch, named) if named in ("float32", "bfloat16", "float16") else torch.float32
    settings = ProbeSettings(gradient_checkpointing=args.probe_gradient_checkpointing, progress=False,
                             modules_per_pass=args.probe_modules_per_pass)
    return estimate(
        skeleton,
        find_components(skeleton, fused_kernels=args.fused_kernels),
        settings,
        batch_size=args.data_batch_size,
        seq_len=args.data_seq_len,
        dtype=dtype,
        devices=args.devices,
        rank=args.rank,
    )


def memory_dict(e) -> dict:
    return {
        "batch_size": e.batch_size,
        "seq_len": e.seq_len,
        "dtype": e.dtype,
        "devices": e.devices,
        "gradient_checkpointing": e.gradient_checkpointing,
        "weights_bytes": e.weights,
        "probe_increase_bytes": e.probe_increase,
        "probe_state_bytes": e.probe_state,
        "probe_peak_per_device_bytes": e.probe_peak,
        "lora_rank": e.rank,
        "lora_params": e.lora_params,
        "lora_increase_bytes": e.lora_increase,
        "lora_peak_per_device_bytes": e.lora_peak,
    }


def format_memory(e) -> list[str]:
    from allocator.memory import gib  # noqa: PLC0415

    where = "one device" if e.devices == 1 else f"the busiest of {e.devices} devices (device_map)"
    return [
        f"predicted peak memory on {where}: micro-batch {e.batch_size} x {e.seq_len} tokens, {e.dtype}, "
        f"gradient checkpointing {'on' if e.gradient_checkpointing else 'off'} (traced on the meta device; "
        "allocator overhead and the CUDA context not included)",
        f"  probing        {gib(e.probe_peak):>10}  = weights {gib(e.weights)} + activations and probe state "
        f"{gib(e.probe_increase)} (probe state {gib(e.probe_state)})",
        f"  LoRA r{e.rank} step  {gib(e.lora_peak):>10}  = weights {gib(e.weights)} + adapters, AdamW and "
        f"activations {gib(e.lora_increase)} ({e.lora_params:,} adapter parameters)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    return run_guarded(run, build_parser().parse_args(argv), interrupted="interrupted")


def format_report(report, rank: int = 16, modules: bool = False) -> str:
    totals = report.totals()
    lines = [
        f"{report.model}: {report.architecture} (model_type {report.model_type})",
        f"{report.n_layers} decoder layers, typed by "
        f"{('config field ' + report.layer_field) if report.layer_field else 'module classes'}; "
        f"{report.n_base_params:,} base parameters; fused kernels "
        f"{'assumed' if report.fused_kernels else 'not assumed (--no-fused-kernels)'}",
        "",
    ]
    lines += _layer_table(report) + [""] + _kind_table(report, rank, totals) + [""]
    lines += _expert_lines(report, rank, totals)
    lines += _group_lines("not effective, never offered", report.not_effective())
    lines += _group_lines("tied call sites (adapt the first)", report.tied())
    lines += _group_lines("left out unless asked for", report.not_default())
    if modules:
        lines += ["", "components:"] + [
            f"  {c.name}  layer={c.layer} {c.family}/{c.kind} {c.d_in}->{c.d_out}"
            f"{' x' + str(c.n_experts) if c.n_experts > 1 else ''}"
            f"{'' if c.eligible else '  [' + (c.note or 'not targeted by default') + ']'}"
            for c in report.components
        ]
    return "\n".join(lines)


def _layer_table(report) -> list[str]:
    """Rows of layers (consecutive identical layers merged), columns family/kind, cells modules / per rank."""
    columns = [f"{f}/{k}" for f, k in report.kinds()]
    rows: list[tuple[str, list[str]]] = []
    start = None
    for row in report.per_layer():
        cells = [
            "-" if col not in row["cells"] else f"{row['cells'][col][0]} / {row['cells'][col][1]:,}"
            for col in columns
        ]
        if rows and rows[-1][1] == cells and start is not None:
            rows[-1] = (f"{start}-{row['layer']}", cells)
        else:
            start = row["layer"]
            rows.append((str(row["layer"]), cells))
    header = ["layers", *columns]
    table = [header] + [[label, *cells] for label, cells in rows]
    title = "per layer: modules / LoRA parameters per rank unit"
    return [title] + _align(table)


def _kind_table(report, rank: int, totals: dict) -> list[str]:
    table = [["family/kind", "layers", "modules", "params/rank", f"at r={rank}"]]
    for row in report.per_kind():
        table.append(
            [
                f"{row['family']}/{row['kind']}",
                str(row["n_layers"]),
                str(row["n_modules"]),
                f"{row['params_per_rank']:,}",
                f"{row['params_per_rank'] * rank:,}",
            ]
        )
    per_rank = totals["params_per_rank"]
    table.append(["total offered", "", str(totals["n_eligible"]), f"{per_rank:,}", f"{per_rank * rank:,}"])
    lines = ["per kind"] + _align(table)
    if report.n_base_params:
        lines.append(
            f"uniform rank {rank} on every offered module: "
            f"{100 * per_rank * rank / report.n_base_params:.2f}% of the base parameters"
        )
    return lines


def _expert_lines(report, rank: int, totals: dict) -> list[str]:
    """Routed experts per layer: each 3-D parameter's experts, shape and LoRA cost per rank unit (PEFT's
    target_parameters: every expert its own rank-r pair)."""
    rows = report.experts()
    if not rows:
        return []
    table = [["parameter", "layers", "experts", "d_in -> d_out", "params/rank/layer", "params/rank",
              f"at r={rank}"]]
    for row in rows:
        shape = f"{row['d_in']} -> {row['d_out']}"
        table.append([row["leaf"], str(row["n_layers"]), str(row["n_experts"]), shape,
                      f"{row['per_layer']:,}",
                      f"{row['params_per_rank']:,}",
                      f"{row['params_per_rank'] * rank:,}"])
    share = sum(r["params_per_rank"] for r in rows) / max(totals["params_per_rank"], 1)
    title = "routed experts (target_parameters; params/rank/layer = experts x (d_in + d_out))"
    held = f"routed experts hold {share:.1%} of the offered LoRA parameters per rank"
    return [title, *_align(table), held, ""]


def _group_lines(title: str, groups: list[dict]) -> list[str]:
    if not groups:
        return [f"{title}: none"]
    n = sum(g["n_modules"] for g in groups)
    out = [f"{title}: {n} module{'s' if n != 1 else ''}"]
    for g in groups:
        out.append(f"  {g['n_modules']:>4} x {g['pattern']} ({g['family']}/{g['kind']}): {g['reason']}")
    return out


def _align(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]


if __name__ == "__main__":
    sys.exit(main())
