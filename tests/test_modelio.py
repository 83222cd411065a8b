"""load_config / load_skeleton / load_model / count_base_params: every input form, every failure an
InputError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from allocator.discovery.modelio import count_base_params, load_config, load_model, load_skeleton
from allocator.errors import InputError

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
QWEN = CONFIGS / "qwen3_5__Qwen__Qwen3.5-0.8B.RECONSTRUCTED.json"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_config_json_path_and_folder_give_the_same_config(tmp_path):
    shutil.copy(QWEN, tmp_path / "config.json")
    from_file, from_folder = load_config(QWEN), load_config(tmp_path)
    # a folder goes through from_pretrained, which records where it came from; nothing else may differ
    assert from_folder.to_dict().pop("_name_or_path") == str(tmp_path)
    file_dict, folder_dict = from_file.to_dict(), from_folder.to_dict()
    file_dict.pop("_name_or_path"), folder_dict.pop("_name_or_path")
    assert file_dict == folder_dict
    assert from_file.model_type == "qwen3_5"


def test_composite_qwen3_5_config_builds_the_text_causal_lm():
    model = load_skeleton(QWEN)
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    assert model.config.model_type == "qwen3_5_text" and model.config.num_hidden_layers == 24
    assert next(model.parameters()).device.type == "meta"
    assert not any("visual" in name for name, _ in model.named_modules())


def test_count_base_params_counts_tied_weights_once():
    model = load_skeleton(QWEN)  # tie_word_embeddings: lm_head shares embed_tokens
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_base_params(model) == 752_393_024


def test_missing_path_names_it(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        load_config(tmp_path / "nope" / "config.json")


def test_folder_without_config_json_names_the_fix(tmp_path):
    with pytest.raises(InputError, match=f"no config.json in {tmp_path}"):
        load_config(tmp_path)


def test_unknown_hub_id_offline_asks_for_a_local_folder():
    with pytest.raises(InputError, match="could not find model 'nobody/no-such-model' offline; pass a "
                                         "local folder"):
        load_config("nobody/no-such-model")


def test_remote_code_model_type_is_a_clear_error():
    with pytest.raises(InputError, match="model_type 'minimax_text_01'.*rename model_type to 'minimax'"):
        load_config(CONFIGS / "minimax_text_01__MiniMaxAI__MiniMax-Text-01.RECONSTRUCTED.json")


def test_legacy_zamba2_config_is_refused_instead_of_built_wrong():
    with pytest.raises(InputError, match="pre-integration Zyphra config"):
        load_skeleton(CONFIGS / "zamba2__Zyphra__Zamba2-1.2B.LEGACY-4f8e85cd.json")


def test_invalid_json_and_rejected_values_are_input_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="could not read .* as JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen3_5_text", "layer_types": ["sideways"]})
    )
    with pytest.raises(InputError, match="transformers could not read the config"):
        load_config(tmp_path / "config.json")


def test_load_model_reads_a_saved_folder_like_a_hub_id(tmp_path):
    import torch
    from tiny_models import build

    model = build("qwen3_5")
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert type(loaded) is type(model)
    assert torch.equal(
        loaded.model.layers[0].linear_attn.in_proj_qkv.weight,
        model.model.layers[0].linear_attn.in_proj_qkv.weight,
    )
    with pytest.raises(InputError, match="needs a model folder or hub id with weights"):
        load_model(tmp_path / "config.json")
