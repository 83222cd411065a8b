"""Shared fixtures: a tiny word-piece tokenizer trained here, and tiny hybrid models saved as hub-like
folders."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

VOCAB = 128


def _corpus_text(n_files: int = 3) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:n_files]
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A few standard-library sources as one text file (exists on every machine)."""
    path = tmp_path_factory.mktemp("data") / "calibration.txt"
    path.write_text(_corpus_text())
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE tokenizer with VOCAB entries trained on stdlib text, so tiny models (vocab 128) can read real
    text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator([_corpus_text()], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory, tiny_tokenizer):
    """``saved_tiny_model(model_type) -> folder`` holding config, weights and tokenizer, like a hub
    snapshot."""
    from tiny_models import build

    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type)
            model = build(model_type)
            model.save_pretrained(folder)
            tiny_tokenizer.save_pretrained(folder)
            cache[model_type] = folder
        return cache[model_type]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a
    shared CPU, two threads spin on every tiny op and run up to ~50x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
