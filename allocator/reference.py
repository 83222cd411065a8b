"""Built-in reference models: small hybrids with the exact transformers architectures, pretrained on the
Python standard library and shipped in ``allocator/zoo/<name>/`` (rebuilt by ``python -m benchmarks.zoo``).

Torch-free at import. Each folder loads with ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)``, the same path a hub id takes; see ``docs/reference-models.md``.
"""

from __future__ import annotations

from pathlib import Path

from allocator.errors import AllocatorError, InputError

ZOO_DIR = Path(__file__).resolve().parent / "zoo"

REFERENCE_MODELS: dict[str, str] = {
    "qwen3_5_tiny": "Qwen3.5 text (qwen3_5_text): 3 Gated DeltaNet + 1 gated softmax-attention layers, "
                    "hidden 128",
    "falcon_h1_tiny": "Falcon-H1 (falcon_h1): 4 layers, Mamba-2 beside attention in each, hidden 128",
    "qwen3_5_deep": "Qwen3.5 text (qwen3_5_text): 9 Gated DeltaNet + 3 gated softmax-attention layers, "
                    "hidden 128",
    "granite_moe_tiny": "Granite-4.0-H (granitemoehybrid): 5 Mamba-2 + 1 attention layers, each with 8 "
                        "routed experts (top-2) beside a shared MLP, hidden 128",
}
DEFAULT_MODEL = "qwen3_5_tiny"

# The chat template the reference tokenizers ship (zoo/<name>/chat_template.jinja; benchmarks.zoo writes it):
# plain-text role markers (the 2048-token vocabulary has no special tokens for them), EOS closing every turn,
# assistant turns inside {% generation %} so that assistant-only loss (TRL's assistant_only_loss, probes'
# DataSettings.assistant_only_loss) finds them, EOS included. Prefix-stable: a conversation renders as its
# first turns' rendering followed by the rest, and the generation prompt is where an assistant turn begins.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


def reference_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of the reference model ``name``.

    Raises:
        InputError: ``name`` is not a reference model (the message lists them).
        AllocatorError: the folder has no weights; rebuild with ``python -m benchmarks.zoo --only NAME``.
    """
    if name not in REFERENCE_MODELS:
        raise InputError(f"unknown reference model {name!r}; choose one of {', '.join(REFERENCE_MODELS)}")
    path = ZOO_DIR / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AllocatorError(
            f"reference model {name!r} has no weights in {path}; build it with "
            f"`python -m benchmarks.zoo --only {name}` from a source checkout"
        )
    return path
