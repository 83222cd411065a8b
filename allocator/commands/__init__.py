"""One module per `allocate` subcommand: ``build_parser()``, ``run(args) -> int`` and ``main(argv) -> int``.

Exit codes, the same for every subcommand (and listed in ``allocate --help`` and the README):
0 success; 1 a run that failed for a stated reason (solver time limit, non-finite loss, storage unreachable);
2 bad input (argument, data, model, budget); 3 an unexpected error, a bug to report; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator

from allocator.commands import _options
from allocator.errors import AllocatorError
from probes.errors import ProbeError, ProbeRunError
from probes.folders import FolderError

EXIT_OK, EXIT_FAILURE, EXIT_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = ("exit codes: 0 success; 1 a run that failed for a stated reason (solver time limit, "
              "non-finite loss, storage unreachable); 2 bad input (argument, data, model, budget); 3 an "
              "unexpected error (a bug: please report it); 130 interrupted.")
DEBUG_ENV = "ALLOCATE_DEBUG"  # set to 1 to see the traceback of an unexpected error


def run_guarded(
    run: Callable[[argparse.Namespace], int], args: argparse.Namespace, *, interrupted: str
) -> int:
    """Run a command; every outcome is one ``error:`` line and its exit code, never a traceback (see the
    module docstring). Messages name command-line flags where the library names settings fields. With ``-q``
    (``args.quiet``) the libraries' own progress bars and notices are silenced too
    (:func:`quiet_libraries`)."""
    try:
        with quiet_libraries(bool(getattr(args, "quiet", False))):
            return run(args)
    except AllocatorError as exc:
        print(f"error: {_options.cli_message(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except (ProbeError, FolderError) as exc:  # the lower layer's own errors, should one slip through
        print(f"error: {_options.cli_message(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(exc, ProbeRunError) else EXIT_INPUT
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("error: out of memory; lower --data-batch-size or --data-seq-len, or pass "
              "--probe-gradient-checkpointing", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # a bug: say so, and how to get the traceback, instead of printing it
        if "OutOfMemoryError" in type(exc).__name__:  # torch.cuda.OutOfMemoryError and kin
            print(f"error: {type(exc).__name__} on the device; lower --data-batch-size or --data-seq-len, or "
                  "pass --probe-gradient-checkpointing", file=sys.stderr)
            return EXIT_FAILURE
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: unexpected {type(exc).__name__}: {first}. This is a bug: please "
            f"report it with the command line (run again with {DEBUG_ENV}=1 to print the "
            "traceback)",
            file=sys.stderr,
        )
        return EXIT_BUG


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Silence transformers' weight-loading bars and notices (the ``[transformers] ... falling back to its
    reference PyTorch implementation`` kernel notices are warnings of its logger) and the hub's download bars
    while the block runs; restored after, so a caller in the same process keeps its settings."""
    if not enabled:
        yield
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = not hub.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


def usage_line(folder: object, init: str) -> str:
    """How to apply a plan written to ``folder``: PEFT alone, or ``Plan.apply`` where lora_A takes a
    data-driven init (EVA's or the gradient's)."""
    if init != "default":
        what = "EVA" if init == "eva" else "calibration-gradient"
        return (
            f"use:  Plan.load({str(folder)!r}).apply(model, init_data=probes.load_batches(DATA, "
            f"tokenizer))  ({what} init of lora_A at these ranks)"
        )
    return f"use:  get_peft_model(model, LoraConfig.from_pretrained({str(folder)!r}))"
