"""The exception and warning raised by the probes; ``allocator`` maps :class:`ProbeError` to its own error."""


class ProbeError(ValueError):
    """Bad calibration input or a failed probe run. The message is one line and names the fix."""


class ProbeWarning(UserWarning):
    """Warned when the probes had to fall back or drop data; the message says how to make it go away."""


class ProbeRunError(ProbeError):
    """A probe run that failed on well-formed input (every loss non-finite, say): a failure, not bad input."""
