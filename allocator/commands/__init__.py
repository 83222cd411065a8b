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
