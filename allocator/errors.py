"""The one exception root and the one warning category of the project."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class AllocatorError(Exception):
    """Raised for an impossible request or a failed run. The message names the fix.

    ``exit_code`` is what the CLI exits with: 1 for a failure, 2 for bad input (see :class:`InputError`).
    """

    exit_code = 1


class InputError(AllocatorError, ValueError):
    """Bad user input: a malformed budget, a missing file, an unknown family. CLI exit code 2."""

    exit_code = 2


class AllocatorWarning(UserWarning):
    """Warned when the allocator had to guess; the message says how to make it go away."""


@contextlib.contextmanager
def as_input_error(*types: type[BaseException]) -> Iterator[None]:
    """Re-raise ``types`` (e.g. ``probes.ProbeError``, ``probes.folders.FolderError``) as :class:`InputError`
    with the same one-line message: the layers below ``allocator`` have their own exceptions."""
    try:
        yield
    except types as exc:
        raise InputError(str(exc)) from None


@contextlib.contextmanager
def as_failure(*types: type[BaseException]) -> Iterator[None]:
    """Re-raise ``types`` (e.g. ``probes.errors.ProbeRunError``) as :class:`AllocatorError`: a run that failed
    for a stated reason (CLI exit 1), not bad input."""
    try:
        yield
    except types as exc:
        raise AllocatorError(str(exc)) from None
