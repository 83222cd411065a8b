"""allocator.tuning.finetune on a tiny random-init Qwen3.5 (GatedDeltaNet + gated attention) built from a
config."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM

from allocator.errors import InputError
from allocator.tuning.finetune import FinetuneResult, FinetuneSettings, evaluate_loss, finetune, lr_at

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "qwen3_5_text",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _batches(seed: int, n: int, batch_size: int = 4, length: int = 24) -> list[dict[str, torch.Tensor]]:
    """A learnable task: each row counts up by a fixed stride from a random start (mod VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + 3 * torch.arange(length)) % VOCAB  # (n, length)
    return [
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
        for b in ids.split(batch_size)
    ]


LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "in_proj_qkv", "out_proj", "down_proj"],
    rank_pattern={"model.layers.0.linear_attn.in_proj_qkv": 8},
    alpha_pattern={"model.layers.1.mlp.down_proj": 2},
)


def _run(model: torch.nn.Module, seed: int = 0, **kw) -> FinetuneResult:
    hooks = {k: kw.pop(k) for k in ("callback", "metrics_fn", "return_model", "init") if k in kw}
    args = {"steps": 8, "lr": 5e-2, "seed": seed, "batch_size": 4, "eval_every": 4, **kw}
    return finetune(model, LORA, _batches(1, 16), _batches(2, 8), FinetuneSettings(**args), **hooks)


@pytest.fixture(scope="module")
def base(model) -> tuple[FinetuneResult, dict[str, torch.Tensor], float]:
    """One LoRA run, with the base model's state and eval loss from before it."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = evaluate_loss(model, _batches(2, 8))
    torch.manual_seed(123)
    return _run(model), state, loss


def test_finetune_reduces_eval_loss_and_counts_peft_params(model, base):
    from peft import get_peft_model

    result = base[0]
    assert result.eval_loss < result.initial_eval_loss - 0.1
    assert [s for s, _ in result.eval_curve] == [0, 4, 8]
    assert len(result.train_losses) == result.steps == 8 and not result.stopped_early
    peft_model = get_peft_model(__import__("copy").deepcopy(model), LORA)
    assert result.trainable_params == peft_model.get_nb_trainable_parameters()[0]
    assert result.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_finetune_is_deterministic_under_a_seed_and_leaves_global_rng(model, base):
    a = base[0]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    b = _run(model)
    after = torch.rand(1)
    assert a.eval_curve == b.eval_curve and a.train_losses == b.train_losses
    assert before == after  # the caller's RNG stream is untouched
    assert _run(model, seed=1, steps=2, eval_every=None).train_losses != a.train_losses[:2]


def test_finetune_does_not_mutate_the_base_model(model, base):
    _, state, base_loss = base
    finetune(
        model, None, _batches(1, 16), _batches(2, 8), FinetuneSettings(steps=2, lr=1e-1, seed=0, batch_size=4)
    )
    assert not hasattr(model, "peft_config")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert evaluate_loss(model, _batches(2, 8)) == base_loss


def test_full_finetune_trains_every_parameter(model):
    result = finetune(
        model, None, _batches(1, 16), _batches(2, 8), FinetuneSettings(steps=4, lr=1e-2, seed=0, batch_size=4)
    )
    assert result.trainable_params == sum(p.numel() for p in model.parameters())
    assert result.eval_loss < result.initial_eval_loss


def test_callback_can_stop_early_and_metrics_fn_sees_the_trained_model(model):
    seen = []
    result = _run(
        model,
        callback=lambda step, loss: seen.append((step, loss)) or step >= 4,
        metrics_fn=lambda m: {"loss": evaluate_loss(m, _batches(2, 8))},
        return_model=True,
    )
    assert [s for s, _ in seen] == [4] and result.stopped_early and result.steps == 4
    assert result.metrics["loss"] == pytest.approx(result.eval_loss)
    assert hasattr(result.model, "peft_config")


def test_evaluate_loss_is_token_weighted(model):
    batches = _batches(2, 8)
    masked = [dict(b, labels=b["labels"].clone()) for b in batches]
    masked[0]["labels"][:, :12] = -100  # fewer label tokens in the first batch
    whole = evaluate_loss(model, [{k: torch.cat([b[k] for b in masked]) for k in masked[0]}])
    assert evaluate_loss(model, masked) == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{"steps": 0}, {"schedule": "step"}, {"warmup": 1.0}, {"eval_every": 0}, {"batch_size": 0}]
)
def test_bad_settings_raise_input_error(kwargs):
    args = {"steps": 2, "lr": 1e-3, "seed": 0, "batch_size": 2, **kwargs}
    with pytest.raises(InputError):
        FinetuneSettings(**args)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, steps=10, lr=1.0, warmup_steps=2) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lr_at(5, steps=10, lr=1.0, warmup_steps=0, schedule="constant") == 1.0
