"""After the pass: sum the accumulators over ranks, then turn each module's into ``ModuleStats``.

Collectives run on the calling thread in sorted-module order (every rank issues the same sequence). The
spectra (Gram matrices, ``eigh``/``eigvalsh``) of CPU accumulators are computed by a pool of one-thread
workers, one module each: LAPACK's tridiagonal reductions synchronise threads at every step, and with several
OpenMP threads on a busy machine a single 1024 x 1024 ``eigh`` was measured 50x slower than on one thread, so
modules are spread over cores instead of threads over one matrix. CUDA accumulators are finalised in turn on
the caller's thread.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from probes.accumulators import ActAccumulator
from probes.hooks import ModuleProbe, Prober
from probes.report import UNMEASURED, ModuleStats
from probes.settings import ProbeSettings


def reduce_counts(probes: list[ModuleProbe], run_counts: list[int], world: int) -> dict:
    """Global (n_calls, n_tokens, n_batches) per probe and (n_skipped, n_tokens) of the run."""
    rows = [[p.n_calls, p.n_tokens, p.grad.n_batches] for p in probes]
    table = torch.tensor(rows + [run_counts + [0]], dtype=torch.float64)  # (n_probes + 1, 3)
    if world > 1:
        table = table.to(_collective_device())
        torch.distributed.all_reduce(table)
        table = table.cpu()
    values = [[int(v) for v in row] for row in table.tolist()]
    return {"probes": values[:-1], "run": values[-1][:2]}


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def finalize_all(probes: list[ModuleProbe], prober: Prober, settings: ProbeSettings, world: int,
                 counts: list[list[int]]) -> dict[int, ModuleStats]:
    """``{id(probe): ModuleStats}``; frees each probe's accumulators once its statistics are out."""
    threads = torch.get_num_threads()
    workers = threads if threads > 1 and all(p.device.type == "cpu" for p in probes) else 0
    results: dict[int, ModuleStats] = {}
    spectra: dict[int, Future] = {}  # shared input accumulators: one eigen-decomposition per group
    pending: deque = deque()
    pool = ThreadPoolExecutor(workers) if workers else None
    if pool is not None:
        torch.set_num_threads(1)
    try:
        for probe, (n_calls, n_tokens, n_batches) in zip(probes, counts, strict=True):
            probe.n_calls, probe.n_tokens = n_calls, n_tokens  # global: every rank takes the same branches
            act = _reduce(probe, prober, world, n_batches)
            if act is not None and world == 1 and id(act) not in spectra and n_tokens:
                spectra[id(act)] = _submit(pool, act.spectrum)
            shared = spectra.get(id(act)) if act is not None and world == 1 else None
            pending.append((probe, _submit(pool, _finalize, probe, act, shared, settings, n_batches)))
            while len(pending) > 2 * max(workers, 1):  # bound the memory held by finished-but-unread work
                _collect(pending.popleft(), results)
        while pending:
            _collect(pending.popleft(), results)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
            torch.set_num_threads(threads)
    return results


def _submit(pool: ThreadPoolExecutor | None, fn, *args) -> Future:
    if pool is not None:
        return pool.submit(fn, *args)
    future: Future = Future()
    future.set_result(fn(*args))
    return future


def _collect(item: tuple[ModuleProbe, Future], results: dict[int, ModuleStats]) -> None:
    probe, future = item
    results[id(probe)] = future.result()
    probe.grad = probe.act = None  # free as we go


def _reduce(probe: ModuleProbe, prober: Prober, world: int, n_batches: int) -> ActAccumulator | None:
    """Under torch.distributed, sum this probe's accumulators over ranks (on the calling thread, in order)."""
    if probe.n_calls == 0 or world == 1:
        return probe.act
    # a private copy: accumulators shared in-process (q/k/v) must not be summed twice
    act = probe.act.clone() if probe.act is not None else prober.new_act(probe)
    act.all_reduce()
    if n_batches:
        probe.grad.all_reduce()
    return act


def _finalize(probe: ModuleProbe, act: ActAccumulator | None, shared: Future | None, settings: ProbeSettings,
              n_batches: int) -> ModuleStats:
    k = min(settings.max_rank, probe.d_in, probe.d_out)
    out: dict[str, Any] = {
        **UNMEASURED,
        "status": "ok",
        "n_tokens": probe.n_tokens,
        "n_batches": n_batches,
        "d_in": probe.d_in,
        "d_out": probe.d_out,
        "n_calls": probe.n_calls,
    }
    if probe.n_calls == 0:
        return ModuleStats(**{**out, "status": "no_input"})
    if not (act.finite() and probe.grad.finite()):
        return ModuleStats(**{**out, "status": "nonfinite"})
    if probe.n_tokens:
        out.update(act.finalize(probe.n_tokens, shared.result() if shared is not None else None))
    if n_batches == 0:
        return ModuleStats(**{**out, "status": "no_gradient"})
    out.update(
        probe.grad.finalize(
            k,
            settings.svd,
            oversample=settings.svd_oversample,
            power_iters=settings.svd_power_iters,
            seed=settings.seed,
        )
    )
    return ModuleStats(**out)
