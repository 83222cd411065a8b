"""Two gloo ranks on CPU (launched the way torchrun does, through env://) give the one-process report."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

import probes
from probes import ProbeReport, ProbeSettings
from probes.testing import ToyCausalLM, linear_names, random_batches

SETTINGS = ProbeSettings(progress=False, max_rank=6)
N_BATCHES = 5  # odd: rank 0 gets batches 0, 2, 4 and rank 1 gets 1, 3

WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    import probes, probes.cache
    from probes import ProbeSettings
    from probes.testing import ToyCausalLM, linear_names, random_batches

    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = ToyCausalLM()
    model.load_state_dict(torch.load(os.path.join(out, "model.pt"), weights_only=True))
    batches = random_batches({n}, pad_last=4, seed=5)
    if rank != 0:
        def refuse(*args):
            raise AssertionError("only rank 0 may write the cache")
        probes.cache._save_atomic = refuse
    settings = ProbeSettings(progress=False, max_rank=6, grad_sketch=sys.argv[2])
    report = probes.run_cached(model, batches, linear_names(model), settings,
                               cache_dir=os.path.join(out, "cache"),
                               key_meta={{"model_id": "t", "model_revision": "0"}})
    report.save(os.path.join(out, f"rank{{rank}}"))  # the test's own copy of each rank's answer
    dist.destroy_process_group()
""").format(n=N_BATCHES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("grad_sketch", ["exact", "sketch"])
def test_two_gloo_ranks_equal_one_process(tmp_path, grad_sketch):
    torch.manual_seed(0)
    # pure torch: the two workers start in seconds (the hybrid models: test_probes_stats)
    model = ToyCausalLM()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path), grad_sketch],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-3000:]

    batches = random_batches(N_BATCHES, pad_last=4, seed=5)
    single = probes.run(model, batches, linear_names(model), replace(SETTINGS, grad_sketch=grad_sketch))
    rank0, rank1 = ProbeReport.load(tmp_path / "rank0"), ProbeReport.load(tmp_path / "rank1")
    assert rank0 == rank1  # the all-reduced sums are the same bits on every rank
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert rank0.meta["world_size"] == 2 and rank0.meta["n_tokens"] == single.meta["n_tokens"]
    assert single.status_counts() == {"ok": 10, "no_input": 1, "no_gradient": 1, "nonfinite": 0}
    assert single["shared"].n_calls == 2 * N_BATCHES
    for name in single.names:
        a, b = rank0[name], single[name]
        assert (a.status, a.n_tokens, a.n_batches, a.n_calls) == (
            b.status,
            b.n_tokens,
            b.n_batches,
            b.n_calls,
        )
        for field in ("grad_norm_sum", "grad_sq_sum", "fisher_trace", "grad_total_sq", "act_trace"):
            np.testing.assert_allclose(
                getattr(a, field), getattr(b, field), rtol=1e-5, err_msg=f"{name} {field}"
            )
        for field in ("grad_singular_values", "act_eigenvalues"):
            x, y = getattr(a, field), getattr(b, field)
            np.testing.assert_allclose(
                x, y, rtol=0, atol=1e-5 * (y[0] if y.size else 1), err_msg=f"{name} {field}"
            )
        np.testing.assert_allclose(a.heldout_capture, b.heldout_capture, atol=1e-4, err_msg=name)
