"""TRL and transformers' Trainer on the same data as `allocate` (issue 17): the probes see the very token
batches TRL's SFTTrainer trains on (TRL's own dataset preparation and collator are the oracle), and a plan
trains under SFTTrainer(peft_config=plan.to_lora_config()) and Trainer(plan.apply(model)) with trainable ==
plan.cost, on the built-in reference model (its shipped chat template)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import allocator
import probes
from allocator.reference import CHAT_TEMPLATE, ZOO_DIR, reference_model_path
from probes.settings import DataSettings, ProbeSettings

datasets = pytest.importorskip("datasets", reason="pip install 'hybrid-lora-allocator[trl]' for these tests")
trl = pytest.importorskip("trl", reason="pip install 'hybrid-lora-allocator[trl]' for these tests")

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::probes.ProbeWarning")]  # TRL drops the same short rows
datasets.disable_progress_bars()

SEQ_LEN = 48
CHATS = [
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"},
     {"role": "user", "content": "and sub?"}, {"role": "assistant", "content": "return a - b"}],
    [{"role": "user", "content": "import os\nprint(os.getcwd())"},
     {"role": "assistant", "content": "It prints the working directory, " * 6}],  # truncated at SEQ_LEN
]
FORMS = {
    "text": ([{"text": "def f(x):\n    return x * 2\n"}, {"text": "class A:\n    pass"},
              {"text": "for i in range(10):\n    print(i) " * 4}], {}),
    "messages": ([{"messages": m} for m in CHATS], {}),
    "messages-assistant-only": ([{"messages": m} for m in CHATS], {"assistant_only_loss": True}),
    "sharegpt-conversations": ([{"conversations": [{"from": x["role"], "value": x["content"]} for x in m]}
                                for m in CHATS], {}),
    "prompt-completion": ([{"prompt": "x = 1\ny =", "completion": " x + 1"},
                           {"prompt": "import", "completion": " sys\nprint(sys.argv)"}], {}),
    "prompt-completion-full-loss": ([{"prompt": "x = 1\ny =", "completion": " x + 1"}],
                                    {"completion_only_loss": False}),
    "chat-prompt-completion": ([{"prompt": m[:-1], "completion": m[-1:]} for m in CHATS], {}),
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference_model_path())


@pytest.fixture(scope="module")
def model_factory():
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(reference_model_path())


def _sft_config(tmp_path, **kw):
    return trl.SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", use_cpu=True,
                         gradient_checkpointing=False, dataset_num_proc=None, save_strategy="no",
                         disable_tqdm=True, **kw)


def _rows(batch) -> list[tuple]:
    keys = ("input_ids", "labels", "attention_mask")
    n = batch["input_ids"].shape[0]
    return sorted(tuple(tuple(batch[k][i].tolist()) for k in keys) for i in range(n))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_probe_batches_equal_what_trl_collates_for_the_same_rows(form, tokenizer, model_factory, tmp_path):
    """TRL prepares the Dataset (chat template, EOS, masks, truncation) and its collator pads it; the probes'
    batches of the same rows must be the same rows, token for token and label for label."""
    records, loss = FORMS[form]
    dataset = datasets.Dataset.from_list(records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(
            model=model_factory(), processing_class=tokenizer, train_dataset=dataset,
            args=_sft_config(tmp_path, max_length=SEQ_LEN, pad_to_multiple_of=SEQ_LEN, **loss),
        )
    oracle = trainer.data_collator(list(trainer.train_dataset))
    ours = probes.load_batches(dataset, tokenizer, seq_len=SEQ_LEN, samples=len(records),
                               batch_size=len(records), **loss)
    assert len(ours) == 1 and ours[0]["input_ids"].shape == oracle["input_ids"].shape
    assert _rows(ours[0]) == _rows(oracle)
    if form == "messages-assistant-only":  # the masks are really there: not every token is a label
        assert (ours[0]["labels"] == -100).sum() > (ours[0]["attention_mask"] == 0).sum()


def test_an_iterable_dataset_and_a_dataloader_give_the_batches_of_the_dataset(tokenizer):
    dataset = datasets.Dataset.from_list([{"messages": m} for m in CHATS])
    kwargs = {"seq_len": SEQ_LEN, "samples": 3, "batch_size": 3}
    from_list = probes.load_batches(dataset, tokenizer, **kwargs)
    streamed = probes.load_batches(dataset.to_iterable_dataset(), tokenizer, **kwargs)
    assert _rows(streamed[0]) == _rows(from_list[0])  # same rows; an iterable dataset keeps its order
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in from_list[0].items()} for i in range(3)],
                                         batch_size=2)
    loaded = probes.load_batches(loader, tokenizer, **kwargs)
    assert torch.equal(loaded[0]["input_ids"], from_list[0]["input_ids"])  # a DataLoader keeps its order
    assert probes.describe_source(loader).startswith("<torch DataLoader of 2 batches")


def test_the_reference_models_ship_the_chat_template(tokenizer):
    for folder in sorted(ZOO_DIR.iterdir()):
        assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE, folder.name
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert trl.chat_template_utils.is_chat_template_stop_token_trained(tokenizer)  # EOS inside the mask


@pytest.fixture(scope="module")
def chat_plan():
    dataset = datasets.Dataset.from_list([{"messages": m} for m in CHATS * 2])
    plan = allocator.allocate(
        None, data=dataset, budget="r4",
        data_settings=DataSettings(seq_len=SEQ_LEN, samples=6, batch_size=3, assistant_only_loss=True),
        probe_settings=ProbeSettings(progress=False, max_rank=8),
    )
    return plan, dataset


def test_allocate_takes_the_dataset_sfttrainer_trains_and_records_it(chat_plan):
    plan, dataset = chat_plan
    assert plan.provenance["data"].startswith("<datasets.Dataset: 6 rows, columns ['messages']")
    assert plan.provenance["data_settings"]["assistant_only_loss"] is True


def test_sfttrainer_trains_the_plan_with_trainable_equal_to_its_cost(chat_plan, model_factory, tmp_path):
    from allocator.integrations import PlanCallback

    plan, dataset = chat_plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(
            model=model_factory(), train_dataset=dataset, peft_config=plan.to_lora_config(),
            args=_sft_config(tmp_path, max_steps=2, per_device_train_batch_size=2, max_length=SEQ_LEN,
                             assistant_only_loss=True, logging_steps=1),
            callbacks=[PlanCallback(plan)],
        )
    assert trainer.model.get_nb_trainable_parameters()[0] == plan.cost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not [w for w in caught if issubclass(w.category, allocator.AllocatorWarning)]
    logged = trainer.state.log_history[0]["lora_plan"]
    assert logged["cost"] == plan.cost and set(logged["families"]) == {"attention", "mlp", "recurrent"}
    assert logged["provenance"]["data_hash"] == plan.provenance["data_hash"]
    saved = json.loads((tmp_path / "sft" / "lora_plan" / "allocation.json").read_text())
    assert saved["cost"] == plan.cost


def test_trainer_trains_plan_apply_and_the_callback_warns_on_another_model(chat_plan, model_factory,
                                                                           tokenizer, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from allocator.integrations import PlanCallback

    plan, _ = chat_plan
    texts = datasets.Dataset.from_list([{"text": "def f(x):\n    return x\n" * 3}] * 4)
    tokenised = texts.map(lambda r: tokenizer(r["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = plan.apply(model_factory())
    trainer = Trainer(model=model, args=args, train_dataset=tokenised, data_collator=collator,
                      callbacks=[PlanCallback(plan, save=False)])
    assert model.get_nb_trainable_parameters()[0] == plan.cost
    assert trainer.train().global_step == 2
    other = Trainer(model=model_factory(), args=args, train_dataset=tokenised, data_collator=collator,
                    callbacks=[PlanCallback(plan, save=False)])
    other.args.max_steps = 1
    with pytest.warns(allocator.AllocatorWarning, match=r"trains .* parameters but the plan costs"):
        other.train()


def test_axolotl_keys_and_a_saved_adapter_rebuild_the_plan_exactly(chat_plan, model_factory, tmp_path):
    """axolotl builds its LoraConfig from these keys (as axolotl/loaders/adapter.py does); LLaMA-Factory
    resumes a saved adapter with PeftModel.from_pretrained(is_trainable=True): both train plan.cost."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from allocator.integrations import axolotl_config

    plan, _ = chat_plan  # ranks varied by hand: a uniform plan would hide a lost rank_pattern
    varied = {n: (1, 2, 4, 8)[i % 4] for i, n in enumerate(plan.ranks)}
    plan = dataclasses.replace(plan, budget=10**9, ranks=varied)
    keys = axolotl_config(plan)
    assert len(set(keys["lora_rank_pattern"].values())) == 4
    json.dumps(keys)  # YAML-able: plain types only
    config = LoraConfig(r=keys["lora_r"], lora_alpha=keys["lora_alpha"], lora_dropout=keys["lora_dropout"],
                        target_modules=keys["lora_target_modules"],
                        target_parameters=keys.get("lora_target_parameters") or [],
                        rank_pattern=keys["lora_rank_pattern"], alpha_pattern=keys["lora_alpha_pattern"],
                        use_rslora=keys.get("peft_use_rslora", False), bias="none", task_type="CAUSAL_LM")
    assert get_peft_model(model_factory(), config).get_nb_trainable_parameters()[0] == plan.cost
    plan.apply(model_factory()).save_pretrained(tmp_path / "initial-adapter")
    resumed = PeftModel.from_pretrained(model_factory(), tmp_path / "initial-adapter", is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == plan.cost


def test_tune_takes_in_memory_chat_datasets(tmp_path):
    """allocate tune's fine-tunes and probes read the same Dataset objects (assistant-only labels), and the
    study records them by size and fingerprint."""
    from probes.testing import byte_tokenizer, tiny_model

    train = datasets.Dataset.from_list([{"messages": m} for m in CHATS * 3])
    result = allocator.tune(
        tiny_model("qwen3_5", hidden=32, layers=2), train, train.select(range(3)), tokenizer=byte_tokenizer(),
        settings=allocator.TuneSettings(trials=2, steps=1, eval_every=0, batch_size=2, train_samples=4,
                                        eval_samples=2, baselines=("uniform",), max_rank="16", budget="r4"),
        data_settings=DataSettings(seq_len=SEQ_LEN, samples=4, batch_size=2, assistant_only_loss=True),
        probe_settings=ProbeSettings(max_rank=8, progress=False), out_dir=tmp_path / "study")
    assert [t.state for t in result.trials] == ["complete", "complete"]
    assert result.best_plan.provenance["data"].startswith("<datasets.Dataset: 9 rows")
