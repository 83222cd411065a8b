"""EVA init at a plan's ranks: exact ranks and count, lora_A on the input's principal directions, base output
kept."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from transformers import AutoTokenizer

import probes
from allocator.commands.cli import main
from allocator.discovery.components import find_components
from allocator.errors import InputError
from allocator.output.plan import Plan
from tests.tiny_models import uneven_plan

FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "--quiet"]


def _setup(saved_tiny_model, corpus_file, model_type="qwen3_5"):
    return uneven_plan(saved_tiny_model(model_type), corpus_file, "eva", samples=16)


def _inputs(model, name, batches):
    rows = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, args, out: rows.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle.remove()
    return torch.cat(rows).double()


@pytest.mark.parametrize("model_type", ["qwen3_5", "falcon_h1", "qwen3_next"])  # qwen3_next: ParamWrappers
def test_eva_init_keeps_ranks_and_count_and_starts_at_the_base_model(
    model_type, saved_tiny_model, corpus_file
):
    model, batches, plan = _setup(saved_tiny_model, corpus_file, model_type)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft_model = plan.apply(model, init_data=batches)
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    torch.testing.assert_close(after, before)  # lora_B = 0: training starts from the base model
    for name, r in plan.targets.items():
        layer = peft_model.base_model.model.get_submodule(name)
        a = layer.lora_A["default"].weight.detach().double()
        assert a.shape[0] == r == layer.r["default"]
        # orthonormal
        torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=torch.float64), atol=1e-4, rtol=0)


def test_eva_rows_span_the_top_principal_directions_of_the_input(saved_tiny_model, corpus_file):
    model, batches, plan = _setup(saved_tiny_model, corpus_file)
    name, r = max(plan.targets.items(), key=lambda kv: kv[1])
    x = _inputs(model, name, batches)
    peft_model = plan.apply(model, init_data=batches)
    a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.detach().double()
    # PEFT's EVA counts only label tokens: every token here carries a loss (packed text), so it is the same
    # input
    cov = torch.cov(x.T)
    top = torch.linalg.eigh(cov).eigenvectors[:, -r:]  # (d_in, r)
    captured = torch.trace(a @ cov @ a.T) / torch.trace(top.T @ cov @ top)
    random_rows = torch.linalg.qr(torch.randn(x.shape[1], r, dtype=torch.float64)).Q.T
    assert captured > 0.95
    assert torch.trace(random_rows @ cov @ random_rows.T) / torch.trace(top.T @ cov @ top) < captured


@pytest.mark.parametrize("model_type", ["qwen3_next", "granitemoehybrid"])
def test_eva_init_on_moe_hybrids_covers_linears_and_leaves_expert_parameters_to_peft(model_type):
    """MoE blocks flatten tokens before their shared expert ((batch * seq, d) inputs, which PEFT's EVA cannot
    index), and routed experts are adapted as 3-D parameters (no single input to take directions from)."""
    from tiny_models import build

    torch.manual_seed(0)
    model = build(model_type).eval()
    components = find_components(model)
    plan = Plan(
        model_id=model_type,
        components=tuple(components),
        budget=10**9,
        init="eva",
        ranks={c.name: 2 for c in components if c.eligible},
    )
    experts = [c.name for c in components if c.eligible and c.is_parameter]
    shared = [n for n in plan.targets if "shared_expert" in n]
    assert experts and (shared or model_type != "qwen3_next")
    ids = torch.randint(0, 100, (4, 32))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft_model = plan.apply(model, init_data=batches)
    assert peft_model.get_nb_trainable_parameters()[0] == plan.cost
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before)  # lora_B = 0 everywhere
    for name in [n for n in plan.targets if n not in experts]:  # shared experts included: EVA's rows
        a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.detach().double()
        torch.testing.assert_close(a @ a.T, torch.eye(2, dtype=torch.float64), atol=1e-4, rtol=0)


def test_eva_plan_without_data_names_the_fix(saved_tiny_model, corpus_file):
    model, _, plan = _setup(saved_tiny_model, corpus_file)
    with pytest.raises(InputError, match="init_data"):
        plan.apply(model)


def test_eva_with_too_few_labelled_tokens_per_batch_names_the_fix_instead_of_looping(
    saved_tiny_model, corpus_file
):
    """PEFT skips batches with fewer counted tokens than components and cycles the data until convergence:
    with every batch too small that never ends. Labels on 2 tokens per row, 2 rows a batch: 4 < rank 8."""
    model, batches, plan = _setup(saved_tiny_model, corpus_file)
    plan = Plan(
        model_id=plan.model_id,
        components=plan.components,
        budget=10**9,
        init="eva",
        ranks={n: 8 for n in plan.targets},
    )
    sparse = []
    for b in probes.load_batches(
        str(corpus_file),
        AutoTokenizer.from_pretrained(saved_tiny_model("qwen3_5")),
        seq_len=32,
        samples=4,
        batch_size=2,
    ):
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, -2:] = b["input_ids"][:, -2:]
        sparse.append({**b, "labels": labels})
    with pytest.raises(InputError, match="at least 8 tokens that carry a label; the largest has 4"):
        plan.apply(model, init_data=sparse)
    assert (
        plan.apply(model, init_data=[{k: v for k, v in b.items() if k != "labels"} for b in sparse])
        is not None
    )


def test_unknown_init_is_refused():
    with pytest.raises(InputError, match="eva"):
        Plan(model_id="m", components=(), ranks={}, budget=1, init="pissa")


def test_cli_records_eva_init_in_both_files(saved_tiny_model, corpus_file, tmp_path, capsys):
    folder = saved_tiny_model("falcon_h1")
    out = tmp_path / "plan"
    assert (
        main(
            [
                str(folder),
                "--data",
                str(corpus_file),
                "--budget",
                "r2",
                "--init",
                "eva",
                "-o",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    assert "init_data" in capsys.readouterr().out
    config = LoraConfig.from_pretrained(str(out))
    assert config.init_lora_weights == "eva" and config.eva_config.rho == 1.0
    plan = Plan.load(out)
    assert plan.init == "eva" and json.loads((out / "allocation.json").read_text())["init"] == "eva"
