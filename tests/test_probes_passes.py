"""``ProbeSettings.modules_per_pass``: probing split into passes gives the one-pass report, with less held."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import probes
from allocator.discovery.components import find_components
from probes.testing import linear_names, random_batches, tiny_model
from tests.tiny_models import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ONE_PASS = probes.ProbeSettings(progress=False, max_rank=8, sketch_threshold=16, sketch_dim=8,
                                grad_sketch="sketch")


def _same_reports(a: probes.ProbeReport, b: probes.ProbeReport) -> None:
    assert a.names == b.names
    for name in a.names:
        left, right = a[name].to_dict(), b[name].to_dict()
        assert left.keys() == right.keys()
        for key, value in left.items():
            if isinstance(value, (list, float, int)):
                np.testing.assert_array_equal(np.asarray(value, dtype=float),
                                              np.asarray(right[key], dtype=float), err_msg=f"{name}.{key}")
            else:
                assert value == right[key], f"{name}.{key}"


def test_linear_modules_in_passes_of_three_give_the_one_pass_statistics():
    model = tiny_model("qwen3_5", layers=2)
    names = linear_names(model)
    batches = random_batches(4)
    whole = probes.run(model, batches, names, ONE_PASS)
    split = probes.run(model, batches, names, replace(ONE_PASS, modules_per_pass=3))
    assert len(names) > 6 and split.meta["n_passes"] == -(-len(names) // 3)
    assert "n_passes" not in whole.meta
    _same_reports(whole, split)


def test_routed_experts_split_over_passes_keep_their_sketches():
    """The expert sketches' test matrices are seeded by the parameter's place among all probed experts."""
    model = build("mixtral", num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                  intermediate_size=32).float()
    experts = [c.name for c in find_components(model) if c.is_parameter and c.kind == "expert"]
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (2, 16), generator=gen),
                "labels": torch.randint(3, 128, (2, 16), generator=gen)} for _ in range(4)]
    whole = probes.run(model, batches, experts, ONE_PASS)
    split = probes.run(model, batches, experts, replace(ONE_PASS, modules_per_pass=1))
    assert split.meta["n_passes"] == len(experts) >= 2
    _same_reports(whole, split)


def test_modules_per_pass_is_a_whole_number_of_at_least_zero():
    with pytest.raises(probes.ProbeError, match="modules_per_pass"):
        probes.ProbeSettings(modules_per_pass=-1)
