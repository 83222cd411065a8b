"""The memory model (allocator/memory.py, probes/footprint.py): the meta-device trace equals the live tensor
bytes of a real run, `allocate` warns or refuses before probing when the prediction exceeds the free memory,
`allocate inspect --probe-memory` prints it, and a bf16 model probes in its own dtype."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import allocator
import probes
from allocator.commands.cli import main
from allocator.discovery.components import find_components
from allocator.discovery.modelio import load_skeleton
from allocator.errors import AllocatorWarning, InputError
from allocator.memory import FREE_MEMORY_ENV, estimate
from probes.footprint import probe_pass_peak
from probes.testing import linear_names, random_batches, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = {"seq_len": 64, "samples": 4, "batch_size": 2}


@pytest.mark.parametrize("family", ["qwen3_5", "falcon_h1"])
def test_meta_trace_equals_the_live_bytes_of_a_real_run(family):
    """The prediction (nothing computed) is within 10% of the peak of live tensors when the same pass really
    runs on CPU; checkpointing lowers both."""
    model = tiny_model(family, hidden=64, layers=2)
    names = linear_names(model)
    for ckpt in (False, True):
        settings = probes.ProbeSettings(progress=False, gradient_checkpointing=ckpt)
        real = probe_pass_peak(model, names, settings, batch_size=2, seq_len=64)["cpu"]
        meta = probe_pass_peak(copy.deepcopy(model).to("meta"), names, settings, batch_size=2, seq_len=64)
        assert math.isclose(meta["meta"], real, rel_tol=0.10), (ckpt, meta, real)
        if not ckpt:
            full = real
    assert real < 0.8 * full


def _need(model_dir, ckpt: bool) -> int:
    model = load_skeleton(str(model_dir))
    settings = probes.ProbeSettings(gradient_checkpointing=ckpt)
    got = estimate(
        model,
        find_components(model),
        settings,
        batch_size=DATA["batch_size"],
        seq_len=DATA["seq_len"],
        lora=False,
    )
    return got.probe_increase


def test_allocate_warns_or_refuses_before_probing(saved_tiny_model, corpus_file, monkeypatch):
    folder = saved_tiny_model("qwen3_5")
    full, ckpt = _need(folder, False), _need(folder, True)
    assert ckpt < full
    monkeypatch.setenv(FREE_MEMORY_ENV, str((full + ckpt) // 2))
    kwargs = dict(
        data=str(corpus_file),
        budget="r4",
        data_settings=probes.DataSettings(**DATA),
        probe_settings=probes.ProbeSettings(progress=False, max_rank=8),
    )
    with pytest.warns(AllocatorWarning, match="would fit: --probe-gradient-checkpointing") as caught:
        plan = allocator.allocate(str(folder), **kwargs)
    assert "--probe-modules-per-pass" in str(caught[0].message)  # the option that keeps the micro-batch
    assert plan.cost <= plan.budget
    monkeypatch.setenv(FREE_MEMORY_ENV, "1KiB")
    calls = []
    monkeypatch.setattr(probes, "run", lambda *a, **k: calls.append(1))  # must not be reached
    with pytest.raises(InputError, match="does not fit even with --probe-gradient-checkpointing") as exc:
        allocator.allocate(str(folder), **kwargs)
    assert "\n" not in str(exc.value) and not calls
    monkeypatch.setenv(FREE_MEMORY_ENV, "lots")
    with pytest.raises(InputError, match="is not a size"):
        allocator.allocate(str(folder), **kwargs)


def test_inspect_prints_the_memory_model(saved_tiny_model, capsys):
    folder = str(saved_tiny_model("falcon_h1"))
    assert main(["inspect", folder, "--probe-memory", "--data-batch-size", "2", "--data-seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "predicted peak memory on one device" in text and "LoRA r16 step" in text
    runs = {}
    for extra in ([], ["--devices", "2"], ["--probe-gradient-checkpointing"], ["--dtype", "bfloat16"]):
        assert main(["inspect", folder, "--probe-memory", "--json", "--data-seq-len", "64", *extra]) == 0
        runs[" ".join(extra)] = json.loads(capsys.readouterr().out)["memory"]
    one, two = runs[""], runs["--devices 2"]
    assert two["probe_peak_per_device_bytes"] < one["probe_peak_per_device_bytes"]
    assert runs["--probe-gradient-checkpointing"]["probe_increase_bytes"] < one["probe_increase_bytes"]
    assert runs["--dtype bfloat16"]["weights_bytes"] * 2 == one["weights_bytes"]
    assert main(["inspect", folder, "--probe-memory", "--json", "--data-seq-len", "64",
                 "--probe-modules-per-pass", "4"]) == 0
    split = json.loads(capsys.readouterr().out)["memory"]
    assert split["probe_state_bytes"] < one["probe_state_bytes"] / 2
    assert split["probe_increase_bytes"] < one["probe_increase_bytes"]
    assert one["lora_params"] > 0 and one["lora_increase_bytes"] > one["lora_params"] * 12
    assert main(["inspect", folder, "--probe-memory", "--devices", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_bf16_model_probes_in_its_own_dtype_with_fp32_statistics():
    names = None
    reports = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("qwen3_5", hidden=64, layers=2, dtype=dtype)
        names = names or linear_names(model)
        settings = probes.ProbeSettings(
            progress=False, max_rank=8, grad_sketch="sketch", sketch_threshold=48, sketch_dim=16
        )
        reports[dtype] = probes.run(model, random_batches(4, seed=1), names, settings)
        assert next(model.parameters()).dtype == dtype  # probed in its own dtype, left as it came
        assert reports[dtype].meta["model_dtype"] == str(dtype).removeprefix("torch.")
    for name in names:
        low, ref = reports[torch.bfloat16][name], reports[torch.float32][name]
        sv, sv_ref = low.grad_singular_values, ref.grad_singular_values
        assert sv.dtype.itemsize >= 4 and all(map(math.isfinite, sv)), name
        assert abs(sv[0] - sv_ref[0]) <= 0.1 * sv_ref[0], name
        assert math.isclose(low.act_trace, ref.act_trace, rel_tol=0.05), name
