"""One module per `allocate` subcommand: ``build_parser()``, ``run(args) -> int`` and ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from allocator.errors import AllocatorError


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, *, interrupted: str) -> int:
    """Run a command; an ``AllocatorError`` becomes one ``error:`` line and its exit code (1 failure, 2 bad input)."""
    try:
        return run(args)
    except AllocatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 1


def usage_line(folder: object, init: str) -> str:
    """How to apply a plan written to ``folder``: PEFT alone, or ``Plan.apply`` where lora_A takes EVA's init."""
    if init == "eva":
        return (f"use:  Plan.load({str(folder)!r}).apply(model, init_data=probes.load_batches(DATA, tokenizer))"
                "  (EVA init of lora_A at these ranks)")
    return f"use:  get_peft_model(model, LoraConfig.from_pretrained({str(folder)!r}))"
