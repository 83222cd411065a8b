"""Probe state lives on each module's device (a model split by ``device_map`` keeps every module's sketches,
moments and test matrices beside its weights). A CPU-only machine has one compute device, so the second
"device" here is ``meta``: tensors there have shapes and devices but no data, and every hook, sketch and
accumulator update runs on them exactly as on a second GPU (the GPU check: docs/probes.md)."""

import pytest
import torch
from torch import nn

from probes.hooks import ModuleProbe, Prober
from probes.settings import ProbeSettings

SKETCHED = ProbeSettings(progress=False, max_rank=8, sketch_threshold=16, sketch_dim=8, grad_sketch="sketch")
EXACT = ProbeSettings(progress=False, max_rank=8, grad_sketch="exact")


def _tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor an accumulator holds, through nested objects, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item, seen)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item, seen)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("probes"):
        return [t for item in vars(obj).values() for t in _tensors(item, seen)]
    return []


class TwoStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(96, 80), nn.Linear(80, 72)


@pytest.mark.parametrize("settings", [SKETCHED, EXACT], ids=["sketch", "exact"])
def test_each_module_keeps_its_state_on_its_own_device(settings):
    model = TwoStages()
    model.second.to("meta")
    for p in model.parameters():
        p.requires_grad_(False)
    probed = [ModuleProbe(["first"], model.first, torch.float32),
              ModuleProbe(["second"], model.second, torch.float32)]
    prober = Prober(probed, torch.float32, settings.sketch_threshold, settings.sketch_dim, settings.seed,
                    settings)
    prober.attach(model)
    try:
        for i in range(2):  # the first batch allocates the state, the second adds to it in place
            prober.begin_batch(i, torch.ones(2, 5, dtype=torch.long))
            losses = [model.first(torch.randn(2, 5, 96, requires_grad=True)).square().sum(),
                      model.second(torch.randn(2, 5, 80, device="meta", requires_grad=True)).square().sum()]
            prober.end_forward()
            prober.in_backward = True
            for loss in losses:
                loss.backward()
            prober.in_backward = False
            prober.end_batch()
    finally:
        prober.detach()
    for probe, device in zip(probed, ("cpu", "meta")):
        held = _tensors(probe.grad) + _tensors(probe.act)
        assert held and {t.device.type for t in held} == {device}, probe.names
        assert probe.n_tokens == 2 * 10
    assert probed[0].sketched == probed[1].sketched == (settings is SKETCHED)
    matrices = {**prober._omegas, **prober._psis}
    assert all(t.device.type == device for (_, device), t in matrices.items())
    assert {device for _, device in matrices} == ({"cpu", "meta"} if settings is SKETCHED else set())
