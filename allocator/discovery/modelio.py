"""Model input: a hub id, a local folder or a path to a config.json -> config, meta skeleton or loaded model.

``HF_HUB_OFFLINE`` (read when a model is located, so setting it after import counts too) is honoured without
a single request: :func:`locate` turns a hub id into its cached snapshot folder, which transformers then reads
like any local folder (``local_files_only`` alone still lets transformers 5 ask the hub for an adapter
config, five retries, ~26 s, before it fails). ``revision`` (a branch, tag or commit) picks the snapshot;
:func:`commit_of` reads the commit hash back from the cache for the plan's provenance. Nothing here lets a
transformers exception escape: every failure is an :class:`~allocator.errors.InputError` naming the fix.

``load_skeleton`` builds the causal LM on the meta device (no memory, seconds even for 50B configs), which is
all that ``find_components`` and counting parameters need; ``load_model`` loads real weights through
``AutoModelForCausalLM.from_pretrained``. Composite configs (``qwen3_5``: ``text_config`` + ``vision_config``)
build the causal LM of their text part.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from allocator.errors import AllocatorError, InputError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

# Raw-config formats transformers 5 would build wrong or not at all, and what to do about them.
LEGACY_HINTS = {
    "minimax_text_01": "it is MiniMax's remote-code format: rename model_type to 'minimax', attn_type_list "
                       "to layer_types (1 -> 'full_attention', 0 -> 'linear_attention') and "
                       "layernorm_*_alpha/beta to *_alpha_factor/*_beta_factor, or pass a folder holding "
                       "its code with --trust-remote-code",
}


def locate(ref: str | os.PathLike, revision: str | None = None) -> str:
    """What transformers should load for ``ref``: a local path as it is; a hub id offline, its cached
    snapshot folder at ``revision`` (no request at all); a hub id online, the id itself.

    Raises:
        InputError: ``revision`` with a local path, or a hub id offline that is not in the cache.
    """
    text = os.path.expanduser(str(ref))
    if Path(text).exists() or _looks_local(text):
        if revision is not None:
            raise InputError(f"--revision picks a commit of a hub model; {text} is a local path: drop "
                             "--revision or pass the hub id")
        return text
    if not _offline():
        return text
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for a hub id

    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(text, revision=revision, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError (not a repo id), ...
        why = "" if "LocalEntryNotFound" in type(exc).__name__ else f" ({_first_line(exc)})"
        raise InputError(f"could not find model '{text}'{at} offline; pass a local folder, or download it "
                         f"once online (HF_HUB_OFFLINE is set and the hub cache holds no snapshot of it){why}"
                         ) from None


def commit_of(ref: str | os.PathLike, revision: str | None = None) -> str | None:
    """The commit hash of the snapshot ``ref`` was loaded from: a hub id's cached ``config.json`` at
    ``revision`` (``snapshots/<commit>/``), or a local folder inside the hub cache; None for other paths."""
    text = os.path.expanduser(str(ref))
    folder = Path(text)
    if folder.exists() or _looks_local(text):
        folder = folder if folder.is_dir() else folder.parent
        return folder.name if folder.parent.name == "snapshots" else None
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    try:
        cached = try_to_load_from_cache(text, "config.json", revision=revision)
    except Exception:  # not a repo id: nothing cached under it
        return None
    if not isinstance(cached, str) or Path(cached).parent.parent.name != "snapshots":
        return None
    return Path(cached).parent.name


def load_config(
    ref: str | os.PathLike, trust_remote_code: bool = False, revision: str | None = None
) -> PretrainedConfig:
    """The config behind ``ref``: a path to a config.json, a local model folder, or a hub id (cache first).

    Raises:
        InputError: missing file or folder, no config.json in the folder, hub id unavailable offline, a
            model_type transformers does not know (without remote code), or a config transformers rejects.
    """
    where = locate(ref, revision)
    hub = _hub_kwargs(revision) if where == os.path.expanduser(str(ref)) else {}
    ref = where
    raw, source = _raw_config(ref, trust_remote_code, hub)
    _check_legacy(raw, source)
    model_type = raw.get("model_type")
    try:

        # a bare config.json; folders go through from_pretrained
        if Path(os.path.expanduser(str(ref))).is_file():
            if model_type not in CONFIG_MAPPING:
                raise InputError(_unknown_type(model_type, source))
            data = {k: v for k, v in raw.items() if k != "model_type"}
            return CONFIG_MAPPING[model_type].from_dict(data)
        return AutoConfig.from_pretrained(str(ref), trust_remote_code=trust_remote_code, **hub)
    except AllocatorError:
        raise
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, validation errors, ...
        if model_type and not _known(model_type):
            raise InputError(_unknown_type(model_type, source)) from exc
        raise InputError(f"transformers could not read the config in {source}: {_first_line(exc)}") from exc


def load_skeleton(ref: Any, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedModel:
    """The causal LM of ``ref`` (or of an already loaded config) built on the meta device, without weights."""

    config = load_config(ref, trust_remote_code, revision) if isinstance(ref, (str, os.PathLike)) else ref
    errors = []
    for candidate in (config, _text_part(config)):
        if candidate is None:
            continue
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(candidate, trust_remote_code=trust_remote_code)
        except Exception as exc:  # unknown architecture, bad sub-config, missing optional dependency
            errors.append(f"{candidate.model_type}: {_first_line(exc)}")
    raise InputError(f"could not build a causal LM from this config ({'; '.join(errors)}); check its "
                     "model_type, or pass --trust-remote-code for a model with its own code")


def load_model(
    ref: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Real weights through ``AutoModelForCausalLM.from_pretrained`` (a local folder behaves like a hub id).

    ``dtype``: ``"bfloat16"``, a ``torch.dtype``, ``"auto"``, or None for transformers' default. Extra keyword
    arguments (``device_map="auto"``, ...) go to ``from_pretrained``.
    """

    path = Path(os.path.expanduser(str(ref)))
    if path.is_file():
        raise InputError(f"{ref} is a file; load_model needs a model folder or hub id with weights "
                         "(a bare config.json only supports load_skeleton / `allocate inspect`)")
    load_config(ref, trust_remote_code, revision)  # same clear errors for a missing folder / unknown id
    where = locate(ref, revision)
    hub = _hub_kwargs(revision) if where == os.path.expanduser(str(ref)) else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return AutoModelForCausalLM.from_pretrained(where, trust_remote_code=trust_remote_code, **hub,
                                                    **kwargs)
    except Exception as exc:
        raise InputError(f"could not load weights for '{ref}': {_first_line(exc)}") from exc


def count_base_params(model: torch.nn.Module) -> int:
    """Parameters of the model, each shared tensor counted once (tied embeddings, Zamba shared blocks)."""
    return sum(p.numel() for p in model.parameters())


def _raw_config(
    ref: str | os.PathLike, trust_remote_code: bool, hub: dict[str, Any]
) -> tuple[dict, str]:
    """The config.json as a dict, and where it was found."""
    text = os.path.expanduser(str(ref))
    path = Path(text)
    if path.is_file():
        return _read_json(path), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"no config.json in {path}; pass a model folder or a path to a config.json")
        return _read_json(path / "config.json"), str(path / "config.json")
    if _looks_local(text):
        raise InputError(f"no such file or folder: {text}")
    try:

        raw, _ = PretrainedConfig.get_config_dict(text, trust_remote_code=trust_remote_code, **hub)
    except Exception as exc:
        if _network_failure(exc):  # the hub could not be reached: not the user's input at fault
            raise AllocatorError(f"could not reach the Hugging Face hub for '{text}' "
                                 f"({_first_line(exc)}); check the network, or set "
                                 "HF_HUB_OFFLINE=1 to use the local cache only") from None
        where = "offline" if _offline() else "in the cache or on the hub"
        raise InputError(f"could not find model '{text}' {where}; pass a local folder or a path to its "
                         f"config.json ({_first_line(exc)})") from None
    return raw, text


def _network_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a connection or timeout error, as opposed to 'no such model'."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or name in (
                "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout", "ConnectionError", "ProxyError"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise InputError(f"could not read {path} as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not a config object; pass a model's "
                         "config.json")
    return data


def _check_legacy(raw: dict, source: str) -> None:
    model_type = raw.get("model_type")
    blocks = raw.get("layers_block_type")
    if model_type == "zamba2" and isinstance(blocks, list) and set(blocks) <= {"m", "g"}:
        raise InputError(
            f"{source} is a pre-integration Zyphra config (layers_block_type 'm'/'g', state_size, "
            "ffn_hidden_size, lora_rank): transformers would build every layer as Mamba with no shared "
            "block. Use the model's current revision, or convert the keys (m -> mamba, g -> hybrid, "
            "state_size -> mamba_d_state, ffn_hidden_size -> intermediate_size, lora_rank -> adapter_rank)")
    if model_type in LEGACY_HINTS and not _known(model_type):
        raise InputError(f"{source}: model_type '{model_type}' is not built into transformers; "
                         f"{LEGACY_HINTS[model_type]}")


def _text_part(config: Any) -> Any:
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return text if text is not None and text is not config else None


def _known(model_type: str) -> bool:

    return model_type in CONFIG_MAPPING


def _unknown_type(model_type: str | None, source: str) -> str:
    hint = LEGACY_HINTS.get(model_type or "", "pass a folder holding the model's code with "
                                              "--trust-remote-code, or upgrade transformers")
    return f"model_type '{model_type}' in {source} is not built into this transformers; {hint}"


def _looks_local(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or text.endswith(".json") or text.count("/") > 1
            or os.sep in text and os.sep != "/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_kwargs(revision: str | None = None) -> dict[str, Any]:
    """from_pretrained's keywords for a hub id: the revision, and no download when offline."""
    out: dict[str, Any] = {"revision": revision} if revision else {}
    return {**out, "local_files_only": True} if _offline() else out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
