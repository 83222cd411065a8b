"""`allocate` command line: registers subcommands and dispatches. No logic lives here.

    allocate [MODEL] [options]        plan a LoRA config (default: the built-in reference model)
    allocate inspect MODEL [--json]   list adaptable modules by layer, family and kind
    allocate tune MODEL ...           Optuna study over budget and allocation settings
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from allocator.commands import allocate, inspect, tune

SUBCOMMANDS = ("inspect", "tune")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 success, 1 failure, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        name, rest = argv[0], argv[1:]
    else:
        name, rest = "allocate", argv
    command = {"inspect": inspect, "tune": tune}.get(name, allocate)
    return command.main(rest)


if __name__ == "__main__":
    sys.exit(main())
