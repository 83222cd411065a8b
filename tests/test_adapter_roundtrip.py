"""A saved plan reloads exactly with plain PEFT, on every tiny family.

plan -> ``plan.save`` -> ``get_peft_model(model, LoraConfig.from_pretrained(dir))`` (trainable == plan.cost)
-> one training step -> ``save_pretrained`` -> ``PeftModel.from_pretrained`` (the same LoRA tensors, bit for
bit, and the same logits) -> ``merge_and_unload`` (logits within 1e-3 of the adapter's effect). The same chain
from ``plan.apply``.

Every eligible module is planned (experts included) and every lora_B is non-zero, so a module PEFT rewrites,
drops on reload or merges into other call sites shows up as a count, tensor or logit mismatch.

Reloaded logits are bit-identical only where MKL's results do not depend on memory alignment: a LoRA tensor
loaded into a buffer at another 256-byte offset can change the last bit of a matmul on a non-contiguous input
(Jamba's and Zamba's Mamba ``out_proj``), every tensor being equal. With ``MKL_CBWR=AUTO,STRICT`` the test
asserts bit-identical logits; otherwise they agree to 1e-5 of the largest logit.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import TINY, build

from allocator.discovery.components import find_components
from allocator.output.plan import Plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MERGE_TOLERANCE = 1e-3  # merged vs adapted logits, relative to the adapter's whole effect on the logits
# reloaded vs trained logits, relative to the largest logit; 0 (bit-identical) where MKL ignores alignment
RELOAD_TOLERANCE = 0.0 if os.environ.get("MKL_CBWR", "").upper().endswith("STRICT") else 1e-5


def _build(model_type: str) -> torch.nn.Module:
    """The tiny model in float32, eval mode; identical weights on every call (``build`` seeds)."""
    try:
        model = build(model_type)
    except Exception as exc:  # a family this transformers cannot build from the tiny config
        pytest.skip(f"{model_type} does not build with this transformers: {type(exc).__name__}: {exc}")
    return model.float().eval()


def _plan(model: torch.nn.Module) -> Plan:
    """Every eligible module at rank 1 or 2 (alternating, so rank_pattern matters)."""
    components = find_components(model)
    eligible = [c for c in components if c.eligible]
    assert eligible, "nothing eligible"
    ranks = {c.name: 1 + i % 2 for i, c in enumerate(eligible)}
    cost = Plan(model_id="tiny", components=tuple(components), ranks=ranks, budget=10**9).cost
    return Plan(model_id="tiny", components=tuple(components), ranks=ranks, budget=cost)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.detach().clone()


def _lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def _ranks_and_alphas(peft_model: torch.nn.Module) -> dict[str, tuple[int, float]]:
    """(r, lora_alpha) of every adapted module or parameter, by the name the plan exports it under."""
    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if "default" in (getattr(module, "r", None) or {}):
            name = re.sub(r"(\.base_layer)+$", "", name)  # ParamWrappers nest on a module with two parameters
            if hasattr(module, "parameter_name"):  # lora.ParamWrapper
                name = f"{name}.{module.parameter_name}"
            found[name] = (module.r["default"], module.lora_alpha["default"])
    return found


def _train_one_step(peft_model: torch.nn.Module) -> None:
    """lora_B gets random non-zero values (so every adapter matters to the logits), then one AdamW step."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(3, 128, (2, 16), generator=gen)
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    opt.step()
    opt.zero_grad()
    peft_model.eval()


@pytest.mark.parametrize("start", ["peft", "apply"])
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_saved_adapter_reloads_and_merges_exactly(model_type, start, tmp_path):
    base = _build(model_type)
    plan = _plan(base)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    base_logits = _logits(base, ids)
    plan_dir = plan.save(tmp_path / "plan")

    if start == "peft":  # plain PEFT, this package not involved
        peft_model = get_peft_model(_build(model_type), LoraConfig.from_pretrained(str(plan_dir)))
    else:
        peft_model = Plan.load(plan_dir).apply(_build(model_type))
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost
    _train_one_step(peft_model)
    adapted = _logits(peft_model, ids)
    effect = (adapted - base_logits).abs().max().item()
    assert effect > 1e-3, f"the adapter barely changes the logits ({effect:.2e})"

    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(_build(model_type), str(tmp_path / "adapter"))
    by_name = plan.by_name
    planned = {by_name[n].peft_name: (r, plan.alpha_ratio * r) for n, r in plan.targets.items()}
    assert _ranks_and_alphas(reloaded) == planned, "the reloaded adapter has other modules, ranks or alphas"
    trained, loaded = _lora_tensors(peft_model), _lora_tensors(reloaded)
    assert sorted(loaded) == sorted(trained), "the reloaded adapter wraps other modules"
    assert all(torch.equal(loaded[n], t) for n, t in trained.items()), "the reloaded LoRA tensors differ"
    error, scale = (_logits(reloaded, ids) - adapted).abs().max().item(), adapted.abs().max().item()
    assert error <= RELOAD_TOLERANCE * scale, f"reloaded logits differ by {error:.2e} (largest {scale:.2e})"

    merged = reloaded.merge_and_unload()
    assert not _lora_tensors(merged)
    error = (_logits(merged, ids) - adapted).abs().max().item()
    assert error <= MERGE_TOLERANCE * effect, f"merged logits differ by {error:.2e}; effect {effect:.2e}"
