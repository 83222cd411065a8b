"""The one progress logger of the benchmarks: ``log(msg)`` prints ``[tag HH:MM:SS] msg`` and flushes.

``tag`` names the stage writing (``placement`` for the placement benchmark and the runs it shares with
``lr_sweep`` and ``pretrain_seeds``, ``zoo`` for the reference-model builder), so an interleaved log of a
long job still says who wrote each line.
"""

from __future__ import annotations

import time


def log(msg: str, tag: str = "placement") -> None:
    """Print ``msg`` with ``tag`` and the wall-clock time, flushed at once (a stopped job keeps its log)."""
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
