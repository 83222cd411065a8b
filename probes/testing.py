"""Tiny models and a byte-level tokenizer for tests and benchmarks: no downloads, built from configs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<eos>{% endgeneration %}{% else %}{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer(chat_template: bool = True):
    """A 258-token byte-level BPE without merges (256 bytes, ``<eos>`` = 256, ``<pad>`` = 257)."""

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<eos>": 256, "<pad>": 257}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str, *, hidden: int = 64, layers: int = 4, vocab: int = 260, **overrides: Any):
    """A scaled-down config of ``family`` ("qwen3_5" hybrid GatedDeltaNet/attention, "falcon_h1", "llama")."""

    heads = max(2, hidden // 16)
    if family == "qwen3_5":
        kinds = ["linear_attention", "full_attention"]
        kw = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=2 * hidden,
            vocab_size=vocab,
            layer_types=[kinds[i % 2] for i in range(layers)],
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=16,
            linear_num_key_heads=max(1, heads // 2),
            linear_num_value_heads=heads,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        )
        return AutoConfig.for_model("qwen3_5_text", **(kw | overrides))
    if family == "falcon_h1":
        kw = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=2 * hidden,
            vocab_size=vocab,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=16,
            mamba_d_ssm=hidden,
            mamba_n_heads=hidden // 8,
            mamba_d_head=8,
            mamba_d_state=16,
            mamba_chunk_size=16,
            pad_token_id=0,
        )
        return AutoConfig.for_model("falcon_h1", **(kw | overrides))
    if family == "llama":
        kw = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=2 * hidden,
            vocab_size=vocab,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
        )
        return AutoConfig.for_model("llama", **(kw | overrides))
    raise ValueError(f"unknown tiny family {family!r}; use qwen3_5, falcon_h1 or llama")


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_config(tiny_config(...))`` with weights drawn from ``seed``."""

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=dtype)


def linear_names(model: nn.Module, *, include_head: bool = False) -> list[str]:
    """Every ``nn.Linear`` of the model (the LM head only when asked), sorted."""
    return sorted(
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (include_head or not n.endswith("lm_head"))
    )


def random_batches(n: int, batch: int = 2, seq: int = 32, vocab: int = 258, seed: int = 0, pad_last: int = 0):
    """``n`` batches of random tokens; the last ``pad_last`` positions of row 0 are padding."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[0, seq - pad_last :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class ToyBlock(nn.Module):
    """Causal running mean over real tokens (a stand-in mixer) + gated MLP, both residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.gate, self.up, self.down = (
            nn.Linear(dim, 2 * dim),
            nn.Linear(dim, 2 * dim),
            nn.Linear(2 * dim, dim),
        )

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        mean = (h * m).cumsum(1) / m.cumsum(1).clamp_min(1)  # (B, T, dim)
        h = h + self.mix(mean)
        return h + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class ToyCausalLM(nn.Module):
    """A pure-torch causal LM (no transformers import): fast to build in subprocesses.

    ``shared`` is applied after every block (one weight, ``layers`` call sites), ``dead_end`` runs but its
    output is dropped (no gradient), ``unused`` never runs.
    """

    def __init__(self, vocab: int = 260, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(ToyBlock(dim) for _ in range(layers))
        self.shared, self.unused, self.dead_end = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )
        self.head = nn.Linear(dim, vocab, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.embed(input_ids)
        self.dead_end(h)
        for layer in self.layers:
            h = layer(h, mask)
            h = h + torch.tanh(self.shared(h))
        logits = self.head(h)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss, logits=logits)
