"""ProbeReport round trips, the disk cache, and the import boundaries of ``probes``."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import probes
from probes import ModuleStats, ProbeReport, ProbeSettings
from probes.report import ARRAYS_NAME, JSON_NAME
from probes.testing import random_batches

PROBES_DIR = Path(probes.__file__).parent
SETTINGS = ProbeSettings(progress=False, max_rank=4)


class TinyLM(nn.Module):
    def __init__(self, vocab=40, dim=12):
        super().__init__()
        self.embed, self.mid, self.idle, self.head = (nn.Embedding(vocab, dim), nn.Linear(dim, dim),
                                                       nn.Linear(dim, dim), nn.Linear(dim, vocab))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels, attention_mask=None):
        logits = self.head(torch.relu(self.mid(self.embed(input_ids))))
        return {"loss": nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())}


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    return probes.run(TinyLM(), random_batches(3, vocab=40, seq=10), ["head", "idle", "mid"], SETTINGS,
                      meta={"model_id": "tiny/lm", "model_revision": "abc"})


def test_report_dict_round_trip(report):
    data = report.to_dict()
    json.dumps(data)  # plain data
    back = ProbeReport.from_dict(data)
    assert back == report
    assert back.names == ("head", "idle", "mid") and back.meta["model_id"] == "tiny/lm"
    assert report["idle"].status == "no_input" and math.isnan(report["idle"].grad_norm_sum)


def test_report_save_load_round_trip_without_pickle(report, tmp_path):
    report.save(tmp_path / "a")
    report.save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ARRAYS_NAME, JSON_NAME])
    for name in (ARRAYS_NAME, JSON_NAME):  # deterministic bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = (tmp_path / "a" / JSON_NAME).read_text()
    data = json.loads(text)
    assert data["meta"]["settings"]["max_rank"] == 4 and "versions" in data["meta"]
    assert data["meta"]["data_fingerprint"] and data["meta"]["model_revision"] == "abc"
    loaded = ProbeReport.load(tmp_path / "a")
    assert loaded == report
    assert loaded["mid"].grad_singular_values.flags.writeable is False


def test_module_stats_validate_and_derive():
    with pytest.raises(ValueError, match="status"):
        ModuleStats("bad", 0, 0, 0.0, 0.0, 0.0, [], [], [])
    stats = ModuleStats(
        "ok",
        10,
        2,
        1.0,
        0.5,
        0.25,
        [2.0, 1.0],
        [4.0, 0.0, 0.0, 0.0],
        [0.5, 0.9],
        d_in=4,
        d_out=2,
        grad_total_sq=5.0,
        act_trace=4.0,
    )
    assert stats.act_effective_rank == pytest.approx(1.0)
    assert stats.rank_for_variance(0.99) == 1
    np.testing.assert_allclose(stats.grad_energy_curve, [0.8, 1.0])
    uniform = ModuleStats("ok", 10, 2, 1.0, 0.5, 0.25, [], [1.0] * 4, [], d_in=4, act_trace=4.0)
    assert uniform.act_effective_rank == pytest.approx(4.0)
    sketched = ModuleStats(
        "ok", 10, 2, 1.0, 0.5, 0.25, [], [1.0, 1.0], [], d_in=4, act_trace=4.0, act_sketched=True
    )
    assert sketched.act_effective_rank == pytest.approx(4.0)  # missing mass spread over the unseen directions


def test_cached_run_reuses_the_report_without_running_the_model(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    batches = random_batches(2, vocab=40, seq=10)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    key = {"model_id": "tiny/lm", "model_revision": "r1"}
    first = probes.run_cached(model, batches, ["mid", "head"], SETTINGS, cache_dir=tmp_path, key_meta=key)
    assert len(calls) == 2
    second = probes.run_cached(model, batches, ["head", "mid"], SETTINGS, cache_dir=tmp_path, key_meta=key)
    assert len(calls) == 2 and second == first
    quiet = ProbeSettings(progress=True, max_rank=4)  # progress does not change results: still a hit
    probes.run_cached(model, batches, ["mid", "head"], quiet, cache_dir=tmp_path, key_meta=key)
    assert len(calls) == 2
    probes.run_cached(
        model,
        batches,
        ["mid", "head"],
        ProbeSettings(progress=False, max_rank=3),
        cache_dir=tmp_path,
        key_meta=key,
    )
    assert len(calls) == 4
    probes.run_cached(
        model,
        batches,
        ["mid", "head"],
        SETTINGS,
        cache_dir=tmp_path,
        key_meta={**key, "model_revision": "r2"},
    )
    assert len(calls) == 6
    probes.run_cached(model, batches[:1], ["mid", "head"], SETTINGS, cache_dir=tmp_path, key_meta=key)
    assert len(calls) == 7
    for folder in tmp_path.iterdir():  # a damaged cache entry is recomputed, not trusted
        (folder / JSON_NAME).write_text("{broken")
    probes.run_cached(model, batches, ["mid", "head"], SETTINGS, cache_dir=tmp_path, key_meta=key)
    assert len(calls) == 9


def test_settings_validate_and_round_trip():
    settings = ProbeSettings(max_rank=8, dtype="float64")
    assert ProbeSettings.from_dict(settings.to_dict()) == settings
    assert all(f.metadata.get("help") for f in ProbeSettings.__dataclass_fields__.values())
    for bad in (
        {"max_rank": 0},
        {"dtype": "bf16"},
        {"sketch_dim": 1},
        {"sketch_threshold": 8, "sketch_dim": 16},
        {"progress": "yes"},
        {"max_rank": 2.5},
    ):
        with pytest.raises(probes.ProbeError):
            ProbeSettings(**bad)
    with pytest.raises(probes.ProbeError, match="unknown ProbeSettings fields \\['rank'\\]"):
        ProbeSettings.from_dict({"rank": 3})


def _run_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_report_module_loads_without_torch():
    out = _run_python(
        "import sys, probes.report, probes.settings, probes.errors; print('torch' in sys.modules)"
    )
    assert out == "False"


def test_probes_never_imports_allocator():
    modules = sorted(p.stem for p in PROBES_DIR.glob("*.py") if p.stem != "__init__")
    code = "import sys, importlib\n" + "".join(f"importlib.import_module('probes.{m}')\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'allocator'))"
    assert _run_python(code) == "[]"
    for path in PROBES_DIR.glob("*.py"):  # and not lazily either
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n.split(".")[0] == "allocator" for n in names), path
