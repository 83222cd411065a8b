"""Reference models (allocator.reference, benchmarks.zoo) and the benchmark tasks (benchmarks.tasks)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from allocator import reference
from allocator.errors import AllocatorError, InputError
from benchmarks import tasks, zoo

# the released configs, as shipped with the tests (tests/fixtures/configs/SOURCES.md)
RELEASED = Path(__file__).resolve().parent / "fixtures" / "configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference.reference_model_path())


@pytest.fixture(scope="module")
def default_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference.reference_model_path())


def test_reference_module_imports_without_torch():
    code = "import sys, allocator.reference; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_reference_model_is_an_input_error_listing_the_names():
    with pytest.raises(InputError, match="qwen3_5_tiny, falcon_h1_tiny, qwen3_5_deep"):
        reference.reference_model_path("qwen3_tiny")


def test_missing_weights_say_how_to_build_them(monkeypatch, tmp_path):
    monkeypatch.setattr(reference, "ZOO_DIR", tmp_path)
    with pytest.raises(AllocatorError, match=r"python -m benchmarks.zoo --only falcon_h1_tiny"):
        reference.reference_model_path("falcon_h1_tiny")


@pytest.mark.parametrize("name", list(reference.REFERENCE_MODELS))
def test_reference_model_loads_like_a_hub_id_and_beats_a_uniform_guess(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allocator.tuning.finetune import evaluate_loss

    folder = reference.reference_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    record = json.loads((folder / "training.json").read_text())
    assert model.dtype == torch.float32 and model.config.model_type == record["model_type"]
    assert type(model).__name__ == record["architecture"] == zoo.RECIPES[name].config["architectures"][0]
    assert model.num_parameters() == record["n_params"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, zoo.VOCAB_SIZE)
    _, held = tasks.pretraining_files()
    loss = evaluate_loss(model, tasks.lm_batches(tasks.token_windows(tok, held, max_windows=8), 8))
    assert math.isfinite(loss) and loss < math.log(zoo.VOCAB_SIZE) - 2.0


def test_recorded_heldout_loss_matches_a_recomputation(tokenizer, default_model):
    """The last loss-curve point (first N_CURVE_EVAL held-out windows) recomputed from the stored weights;
    ``python -m benchmarks.zoo --check`` does the same for the final loss over N_FINAL_EVAL windows."""
    from allocator.tuning.finetune import evaluate_loss

    record = json.loads((reference.reference_model_path() / "training.json").read_text())
    _, held = tasks.pretraining_files()
    windows = tasks.token_windows(tokenizer, held, max_windows=zoo.N_CURVE_EVAL)
    recorded = record["loss_curve"][-1]["heldout_loss"]
    assert record["loss_curve"][-1]["step"] == record["recipe"]["steps"]
    assert evaluate_loss(default_model, tasks.lm_batches(windows, 16)) == pytest.approx(recorded, abs=2e-3)


def test_layer_patterns_match_the_released_architectures():
    qwen = zoo.RECIPES["qwen3_5_tiny"].config["layer_types"]
    deep = zoo.RECIPES["qwen3_5_deep"].config["layer_types"]
    assert qwen == ["linear_attention"] * 3 + ["full_attention"] and deep == qwen * 3
    assert zoo.RECIPES["falcon_h1_tiny"].config["model_type"] == "falcon_h1"
    granite = zoo.RECIPES["granite_moe_tiny"].config  # Granite-4.0-H-Tiny's first 6 of 40 layers
    assert granite["layer_types"] == ["mamba"] * 5 + ["attention"]
    assert granite["num_local_experts"] > granite["num_experts_per_tok"] > 1


def test_moe_pretraining_adds_the_load_balancing_loss_and_leaves_the_config_as_it_was(tokenizer):
    """Two steps of the MoE recipe: every forward's router loss is recorded on the curve and the stored config
    does not ask for router logits (fine-tunes and probes run the plain forward)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = replace(zoo.RECIPES["granite_moe_tiny"], steps=2, warmup_steps=1, eval_every=2, batch_size=2)
    assert recipe.router_aux_loss > 0
    cfg = dict(recipe.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    train, held = tasks.pretraining_files()
    windows = tasks.token_windows(tokenizer, train[:2], max_windows=8)
    curve, _, _ = zoo._train("moe", model, recipe, tokenizer, windows, windows)
    # Switch loss: num_experts_per_tok when the routing is balanced, more when not
    assert 0.5 * recipe.config["num_experts_per_tok"] < curve[-1]["router_aux_loss"] < 100
    assert model.config.output_router_logits is False
    assert model(input_ids=windows[:1]).aux_loss is None


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("qwen3_5_tiny", "qwen3_5__Qwen__Qwen3.5-0.8B.RECONSTRUCTED.json"),
        ("falcon_h1_tiny", "falcon_h1__tiiuae__Falcon-H1-0.5B.RECONSTRUCTED.json"),
    ],
)
def test_tiny_configs_keep_the_released_fields(name, file):
    released = json.loads((RELEASED / file).read_text())
    released = released.get("text_config", released)
    dropped = {
        "dtype",
        "torch_dtype",
        "mtp_num_hidden_layers",
        "mtp_use_dedicated_embeddings",
        "mlp_only_layers",
        "mlp_expansion_factor",
        "rope_theta",
        "rope_scaling",
        "transformers_version",
    }
    ours = zoo.RECIPES[name].config
    assert set(released) - dropped - set(ours) == set()
    assert released["model_type"] == ours["model_type"]
    for key in ("hidden_act", "tie_word_embeddings", "attention_bias", "attn_output_gate", "layer_types"):
        if key in released and key != "layer_types":
            assert ours[key] == released[key], key
    if "layer_types" in released:  # the same repeating unit, fewer repeats
        assert ours["layer_types"] == released["layer_types"][: len(ours["layer_types"])]


def test_pretraining_split_is_disjoint_and_excludes_tests():
    train, held = tasks.pretraining_files()
    root = tasks.stdlib_root()
    assert set(train).isdisjoint(held) and 0.02 < len(held) / (len(train) + len(held)) < 0.10
    parts = {part for p in train + held for part in p.relative_to(root).parts[:-1]}
    assert parts.isdisjoint({"test", "tests", "idlelib", "site-packages"})
    d_train, d_eval = tasks.domain_files()
    assert set(d_train).isdisjoint(d_eval) and all(p.relative_to(root).parts[0] == "test" for p in d_eval)


def test_recall_episodes_are_deterministic_and_answers_are_marked(tokenizer):
    a = tasks.recall_episode(random.Random(5), tasks.SHIFTED_RECALL)
    assert a == tasks.recall_episode(random.Random(5), tasks.SHIFTED_RECALL)
    assert 10 <= a.n_pairs <= 14 and len(a.answer_spans) == 4
    (batch,) = tasks.recall_batches(tokenizer, tasks.SHIFTED_RECALL, n_rows=4, seed=5, batch_size=4)
    row, group = batch["input_ids"][0], batch["answer_group"][0]
    text = tokenizer.decode(row[batch["attention_mask"][0].bool()])
    assert text.startswith(a.text)
    for q, (s, e) in enumerate(a.answer_spans):
        assert tokenizer.decode(row[group == q]).strip() == a.text[s:e]
    assert torch.equal(batch["labels"] != -100, batch["answer_group"] >= 0)


def test_tasks_are_deterministic_under_a_seed(tokenizer):
    one = tasks.recall_task(tokenizer, seed=3, n_train=32, n_eval=16)
    two = tasks.recall_task(tokenizer, seed=3, n_train=32, n_eval=16)
    other = tasks.recall_task(tokenizer, seed=4, n_train=32, n_eval=16)
    assert all(
        torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(one.train_batches, two.train_batches)
    )
    assert not torch.equal(one.train_batches[0]["input_ids"], other.train_batches[0]["input_ids"])
    assert torch.equal(one.eval_batches[0]["input_ids"], other.eval_batches[0]["input_ids"])
    text = tasks.text_domain_task(tokenizer, seed=3, n_train=8, n_eval=4, batch_size=4)
    assert [b["input_ids"].shape for b in text.train_batches] == [(4, tasks.SEQ_LEN)] * 2
    assert tasks.retention_task(tokenizer, n_eval=4).train_batches == ()
    facts = tasks.fact_recall_task(tokenizer, seed=3, n_train=32, per_row=4, batch_size=4)
    again = tasks.fact_recall_task(tokenizer, seed=4, n_train=32, per_row=4, batch_size=4)
    assert len(facts.train_batches) == 2 and torch.equal(
        facts.eval_batches[0]["input_ids"], again.eval_batches[0]["input_ids"]
    )

    def answer_tokens(task):
        return sorted(torch.cat([b["labels"][b["labels"] != -100] for b in task.train_batches]).tolist())

    assert answer_tokens(facts) == answer_tokens(again)  # the same facts in another order
    # the validation split: the same facts (answer tokens) grouped in rows that neither train nor eval has
    validation = tasks.fact_recall_task(tokenizer, seed=3, n_train=32, per_row=4, batch_size=4,
                                        split="validation")
    assert torch.equal(validation.train_batches[0]["input_ids"], facts.train_batches[0]["input_ids"])
    rows = {name: {tuple(r.tolist()) for b in batches for r in b["input_ids"]}
            for name, batches in (("train", facts.train_batches), ("eval", facts.eval_batches),
                                  ("validation", validation.eval_batches))}
    assert not rows["validation"] & (rows["train"] | rows["eval"])
    assert answer_tokens(replace(facts, train_batches=validation.eval_batches)) == answer_tokens(facts)
    for name, build in tasks.TASKS.items():  # one call signature for every fine-tune task
        task = build(tokenizer, seed=0, n_train=16, n_eval=8, batch_size=8)
        assert task.name == name and task.train_batches and task.eval_batches


def test_recall_task_scores_against_chance(tokenizer, default_model):
    metrics = tasks.recall_task(tokenizer, n_train=16, n_eval=16).evaluate(default_model)
    assert 1 / 14 <= metrics["recall_chance"] <= 1 / 10
    assert 0.0 <= metrics["recall_accuracy"] <= 1.0 and math.isfinite(metrics["recall_loss"])


def test_fact_accuracy_measures_facts_stored_in_the_weights(tokenizer, default_model):
    """Above-chance fact accuracy needs the key -> value mapping in the weights: the untrained model and a
    model trained on the same rows with the values permuted among the keys (same format, same value
    distribution) stay near chance (1/90); training on the true facts lifts it far above."""
    from peft import LoraConfig

    from allocator.tuning.finetune import FinetuneSettings, finetune

    true = tasks.fact_recall_task(tokenizer, n_train=32, batch_size=8)
    control = tasks.fact_recall_task(tokenizer, n_train=32, batch_size=8, shuffle_values=True)
    assert sorted(torch.cat([b["labels"][b["labels"] != -100] for b in control.train_batches]).tolist()) == \
        sorted(torch.cat([b["labels"][b["labels"] != -100] for b in true.train_batches]).tolist())
    base = true.evaluate(default_model)
    assert base["fact_chance"] == pytest.approx(1 / 90) and base["fact_accuracy"] <= 0.1
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    scores = {}
    for name, task in (("true", true), ("control", control)):
        res = finetune(default_model, config, task.train_batches, task.eval_batches,
                       FinetuneSettings(steps=40, lr=1e-2, seed=0, batch_size=4),
                       metrics_fn=true.evaluate)  # both scored on the true facts
        scores[name] = res.metrics["fact_accuracy"]
    assert scores["true"] >= 0.4, scores
    assert scores["control"] <= 0.1, scores


def test_moe_reference_model_routes_to_every_expert_and_peft_counts_each_placements_cost():
    """The routed-MoE model: held-out text reaches every expert of every layer (the probes see them all), and
    the placement benchmark's placements on it, routed experts adapted through PEFT's target_parameters, train
    exactly the parameters they cost; ``mlp_only`` is its channel mixers, routed and shared experts."""
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allocator.discovery.components import find_components
    from allocator.output.export import to_lora_config
    from allocator.solver.budget import params_per_uniform_rank
    from benchmarks import placement_conditions as pc

    folder = reference.reference_model_path("granite_moe_tiny")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    counts = {}

    def count(name):
        def hook(module, args, output):  # GraniteMoeHybridTopKRouter: (logits, weights, top-k expert ids)
            counts[name] = torch.bincount(output[2].flatten(), minlength=module.num_experts)
        return hook

    routers = [(n, m) for n, m in model.named_modules() if n.endswith("block_sparse_moe.router")]
    handles = [m.register_forward_hook(count(n)) for n, m in routers]
    _, held = tasks.pretraining_files()
    with torch.no_grad():
        model(input_ids=tasks.token_windows(tok, held, max_windows=16))
    for h in handles:
        h.remove()
    assert len(counts) == model.config.num_hidden_layers
    assert all(int(c.min()) > 0 for c in counts.values()), counts
    comps = [c for c in find_components(model, fused_kernels=False) if c.eligible]
    assert {c.kind for c in comps if c.family == "moe"} == {"expert", "shared_expert"}
    budget = 4 * params_per_uniform_rank(comps)
    placements = {"uniform": pc.uniform(comps, 4)}
    placements.update({f: pc.single_family(comps, f, budget)[0] for f in ("attention", "recurrent", "mlp")})
    family = {c.name: c.family for c in comps}
    assert {family[n] for n, r in placements["mlp"].items() if r} == {"moe"}
    for name, ranks in placements.items():
        peft_model = get_peft_model(copy.deepcopy(model), to_lora_config(ranks, comps))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable == pc.cost(ranks, {c.name: c for c in comps}), name
        assert name == "uniform" or budget - pc.cost(ranks, {c.name: c for c in comps}) < 0.01 * budget
