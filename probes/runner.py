"""Stage 2b: ``run(model, batches, modules, settings) -> ProbeReport``.

One forward + backward of the model's own causal-LM loss per micro-batch, weights frozen, statistics gathered
by the hooks of :mod:`probes.hooks`; then (under torch.distributed) an all-reduce, then the spectra. The model
is returned exactly as it came: same weights bit for bit, same ``requires_grad`` flags, mode and device.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import platform
import time
from collections.abc import Mapping, Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from probes.data import data_fingerprint
from probes.errors import ProbeError, ProbeRunError
from probes.experts import ExpertProber, split_names
from probes.finalize import finalize_all, reduce_counts
from probes.hooks import ModuleProbe, Prober
from probes.padding import model_inputs
from probes.records import IGNORE_INDEX
from probes.report import ProbeReport
from probes.settings import ProbeSettings


def run(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    modules: Sequence[str],
    settings: ProbeSettings | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
) -> ProbeReport:
    """Probe ``modules`` (names from ``model.named_modules()``, each an ``nn.Linear``) over ``batches``.

    Args:
        model: a causal LM returning ``.loss`` when given ``labels`` (any transformers ``*ForCausalLM``).
        batches: dicts with ``input_ids``, ``labels`` and optionally ``attention_mask`` (see
        ``load_batches``).
        modules: module names; aliases of one module object share its statistics.
        settings: ``ProbeSettings()`` when None.
        meta: extra provenance merged into ``report.meta`` (e.g. ``model_id``, ``model_revision``).

    Raises:
        ProbeError: unknown or non-Linear module names, bad batches, a non-finite loss (unless
            ``settings.skip_nonfinite``), a model that returns no loss.
    """
    settings = settings or ProbeSettings()
    check_device(settings.device)
    every_expert, _ = split_names(model, modules)
    size = settings.modules_per_pass
    if not size or isinstance(modules, str) or len(modules) <= size:
        return _run_pass(model, batches, modules, settings, meta, every_expert)
    passes = [list(modules[i : i + size]) for i in range(0, len(modules), size)]
    reports = [_run_pass(model, batches, names, settings, meta, every_expert, (k, len(passes)))
               for k, names in enumerate(passes)]
    info = {**reports[0].meta, "n_passes": len(passes)}
    return ProbeReport({name: s for r in reports for name, s in r.modules.items()}, info)


def _run_pass(model, batches, modules, settings: ProbeSettings, meta, every_expert, pass_of=(0, 1)):
    """One forward + backward per micro-batch over ``batches``, probing ``modules`` (:func:`run`'s
    arguments; ``every_expert``: the routed-expert parameters of all passes; ``pass_of``: (this pass, of how
    many), for the progress bar)."""
    dtype = getattr(torch, settings.dtype)
    expert_names, modules = split_names(model, modules)  # 3-D routed-expert parameters: probes.experts
    linear = bool(modules) or not expert_names

    def probers():  # the state is made on each module's device: call after any move of the model
        probes, by_name = _resolve(model, modules, dtype) if linear else ([], {})
        experts = ExpertProber(model, expert_names, dtype, settings, seed_order=every_expert)
        return probes, by_name, experts

    probers()  # bad names and expert layouts fail before the model is touched
    _check_batches(batches)
    check_token_ids(model, batches)
    world, rank = _world(settings)
    mine = [i for i in range(len(batches)) if i % world == rank]
    n_skipped = n_tokens = 0
    with _probing_state(model, settings) as device:
        probes, by_name, experts = probers()
        prober = Prober(probes, dtype, settings.sketch_threshold, settings.sketch_dim, settings.seed,
                        settings)
        accepts_cache = _accepts(model, "use_cache")
        prober.attach(model)
        experts.attach()
        try:
            bar = _progress(len(mine), settings.progress and rank == 0, pass_of)
            start = time.perf_counter()
            for i in mine:
                value, real = probe_batch(model, batches[i], i, device, prober, experts, accepts_cache)
                if not math.isfinite(value):
                    if not settings.skip_nonfinite:
                        raise ProbeRunError(
                            f"loss is {value} on batch {i}; check that batch and the model dtype, or set "
                            "ProbeSettings(skip_nonfinite=True) to skip such batches"
                        )
                    n_skipped += 1
                    continue
                n_tokens += real
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            bar.close()
        finally:
            prober.detach()
            experts.detach()
        counts = reduce_counts(probes, [n_skipped, n_tokens], world)
        if counts["run"][0] == len(batches):
            raise ProbeRunError(f"every calibration batch ({len(batches)}) had a non-finite loss and was "
                                "skipped; check the model's dtype and weights (a float16 model may "
                                "overflow: load it in bfloat16 or float32)")
        per_probe = finalize_all(probes, prober, settings, world, counts["probes"])
    info = _meta(model, batches, settings, world, counts["run"], device)
    info.update(meta or {})
    stats = {name: per_probe[id(probe)] for name, probe in by_name.items()}
    return ProbeReport({**stats, **experts.finalize(world)}, info)


def probe_batch(model: nn.Module, raw: Mapping[str, torch.Tensor], index: int, device: torch.device,
                prober: Prober, experts: ExpertProber | None = None, accepts_cache: bool = True
                ) -> tuple[float, int]:
    """One probed micro-batch: ``raw`` on ``device``, the forward (the hooks told of the batch and its mask;
    the model called per :func:`probes.padding.model_inputs`) and the backward. A non-finite loss skips the
    backward and discards the batch from the probers. Returns (the loss, the batch's real tokens)."""
    batch = {k: v.to(device) for k, v in raw.items()}
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    if accepts_cache:
        batch["use_cache"] = False
    probers = [prober] if experts is None else [prober, experts]
    for p in probers:
        p.begin_batch(index, batch["attention_mask"])
    with torch.enable_grad():  # the hooks select tokens by the mask; the model may go without
        loss = _loss(model(**model_inputs(model, batch)))
    value = float(loss.detach())
    if not math.isfinite(value):
        for p in probers:
            p.discard_batch()
        return value, 0
    prober.end_forward()
    for p in probers:
        p.in_backward = True
    try:
        loss.backward()
    finally:
        for p in probers:
            p.in_backward = False
    del loss
    for p in probers:
        p.end_batch()
    return value, int(batch["attention_mask"].sum())


# --- setup
# ---------------------------------------------------------------------------------------------------


def _resolve(model: nn.Module, names: Sequence[str], dtype: torch.dtype):
    if isinstance(names, str) or not names:
        raise ProbeError(f"modules must be a non-empty list of module names, got {names!r}")
    table = dict(model.named_modules(remove_duplicate=False))
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ProbeError(
            f"{len(unknown)} module names not in the model, e.g. {unknown[:3]}; use names from "
            "model.named_modules(), such as 'model.layers.0.mlp.up_proj'"
        )
    wrong = [(n, type(table[n]).__name__) for n in names if not isinstance(table[n], nn.Linear)]
    if wrong:
        raise ProbeError(
            f"only torch.nn.Linear modules can be probed; {wrong[0][0]} is a {wrong[0][1]} "
            f"({len(wrong)} such names); drop them from modules"
        )
    offloaded = [n for n in names if table[n].weight.device.type == "meta"]
    if offloaded:
        raise ProbeError(
            f"{offloaded[0]} has no weights in memory (meta device: offloaded or not loaded; "
            f"{len(offloaded)} such modules); load the model without disk/CPU offload"
        )
    by_id: dict[int, ModuleProbe] = {}
    by_name = {}
    for name in sorted(set(names)):
        module = table[name]
        if id(module) not in by_id:
            by_id[id(module)] = ModuleProbe([], module, dtype)
        by_id[id(module)].names.append(name)
        by_name[name] = by_id[id(module)]
    return list(by_id.values()), by_name


def _check_batches(batches) -> None:
    if not batches:
        raise ProbeError("no calibration batches; pass the output of probes.load_batches(...)")
    for i, batch in enumerate(batches):
        missing = {"input_ids", "labels"} - set(batch)
        if missing:
            raise ProbeError(f"batch {i} lacks {sorted(missing)}; batches need input_ids and labels "
                             "(load_batches)")
        if not bool((batch["labels"][..., 1:] != IGNORE_INDEX).any()):
            raise ProbeError(f"batch {i} has every label masked (-100), so its loss is undefined; drop it")


def check_token_ids(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise ProbeError when a batch holds a token id outside the model's vocabulary (its input embedding
    rows):
    the embedding lookup would fail with an IndexError deep in the forward."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    if not isinstance(size, int):
        return
    for i, batch in enumerate(batches):
        ids = torch.as_tensor(batch["input_ids"])
        if ids.numel() and (int(ids.max()) >= size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= size else int(ids.min())
            raise ProbeError(f"batch {i} holds token id {bad}, outside the model's vocabulary of {size:,}; "
                             "tokenise the data with the model's own tokenizer")


def check_device(device: str) -> None:
    """Raise ProbeError unless ``device`` ('auto', 'model' or a torch device string) can run here."""
    if device in ("auto", "model"):
        return
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ProbeError(f"ProbeSettings.device {device!r} is not a torch device; use auto, model, cpu or "
                         "cuda[:N]") \
            from None
    available = {"cpu": True, "meta": False, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
                 "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}.get(target.type, False)
    if not available:
        raise ProbeError(f"ProbeSettings.device {device!r}: this torch ({torch.__version__}) has no usable "
                         f"{target.type} device; use device 'auto' or 'cpu'")
    count = {"cuda": torch.cuda.device_count}.get(target.type)
    if count is not None and target.index is not None and target.index >= count():
        raise ProbeError(f"ProbeSettings.device {device!r}: only {count()} {target.type} device(s) here; use "
                         f"{target.type}:0..{count() - 1}")


@contextlib.contextmanager
def _probing_state(model: nn.Module, settings: ProbeSettings):
    """Freeze weights, eval mode, optional checkpointing and device move; undo all of it on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    home, target = _placement(model, settings.device)
    restore_checkpointing = None
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        if target is not None:
            model.to(target)
        if settings.gradient_checkpointing:
            restore_checkpointing = _enable_checkpointing(model)
        yield _input_device(model)
    finally:
        if restore_checkpointing is not None:
            restore_checkpointing()
        if target is not None:
            model.to(home)
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def _placement(model: nn.Module, device: str):
    """(home device, device to run on) or (None, None) when the model stays where it is."""
    devices = {p.device for p in model.parameters()}
    if device == "model" or len(devices) != 1 or len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return None, None
    home = next(iter(devices))
    if device == "auto":
        if home.type != "cpu" or not torch.cuda.is_available():
            return None, None
        device = "cuda"
    target = torch.device(device)
    return (None, None) if target == home else (home, target)


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Module) and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _enable_checkpointing(model: nn.Module):
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers too old
        raise ProbeError("gradient_checkpointing needs transformers >= 4.52; set "
                         "gradient_checkpointing=False") from None
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ProbeError(f"{type(model).__name__} has no checkpointable layers; set "
                         "gradient_checkpointing=False")
    missing = object()
    saved = [
        (m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func", missing), m.training)
        for m in layers
    ]
    for m in layers:  # the layer itself in training mode (HF checks it), its children (dropout) stay in eval
        m.gradient_checkpointing, m.training = True, True
        m._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def restore():
        for m, flag, func, training in saved:
            m.gradient_checkpointing, m.training = flag, training
            if func is missing:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func

    return restore


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _loss(output) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0] if output[0].dim() == 0 else None
    if not isinstance(loss, torch.Tensor):
        raise ProbeError(
            "the model returned no loss; probe a *ForCausalLM model and pass labels in the batches"
        )
    return loss


def _world(settings: ProbeSettings) -> tuple[int, int]:
    if settings.distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _progress(total: int, enabled: bool, pass_of: tuple[int, int] = (0, 1)):
    desc = "probing" if pass_of[1] == 1 else f"probing (pass {pass_of[0] + 1}/{pass_of[1]})"
    return tqdm(total=total, disable=not enabled, unit="batch", desc=desc, dynamic_ncols=True)


# --- finish
# --------------------------------------------------------------------------------------------------


def _meta(model, batches, settings, world, run_counts, device) -> dict[str, Any]:
    config = getattr(model, "config", None)
    first = next(model.parameters())
    return {
        "model_id": str(getattr(config, "name_or_path", "") or type(model).__name__),
        "model_revision": getattr(config, "_commit_hash", None),
        "model_class": type(model).__name__,
        "model_dtype": str(first.dtype).removeprefix("torch."),
        "device": str(device),
        "data_fingerprint": data_fingerprint(batches),
        "n_batches": len(batches),
        "n_skipped": run_counts[0],
        "n_tokens": run_counts[1],
        "world_size": world,
        "settings": settings.to_dict(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "numpy": np.__version__,
            "probes": _version("hybrid-lora-allocator"),
        },
    }


def _version(distribution: str) -> str:

    try:
        return version(distribution)
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"
