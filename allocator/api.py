"""The main job as one call: model + a little data + a budget -> :class:`~allocator.output.plan.Plan`.

    plan = allocator.allocate("Qwen/Qwen3.5-0.8B", data="train.jsonl", budget="r8")
    peft_model = plan.apply(model)

Each stage is its own function (see docs/design.md); this module only chains them and records provenance.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy
import peft
import scipy
import torch
import transformers
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import allocator
import probes
from allocator.discovery.component import Component
from allocator.discovery.components import architecture_of, find_components
from allocator.discovery.experts import idle_family_warning
from allocator.discovery.modelio import commit_of, count_base_params, load_model, locate
from allocator.errors import AllocatorError, AllocatorWarning, InputError, as_failure, as_input_error
from allocator.memory import check_fits
from allocator.output import evidence
from allocator.output.export import check_alpha_ratio, to_lora_config
from allocator.output.lora_init import check_init
from allocator.output.plan import Plan
from allocator.reference import DEFAULT_MODEL, reference_model_path
from allocator.scoring.utility import UtilitySettings, compute_utilities
from allocator.solver.budget import Budget, params_per_uniform_rank
from allocator.solver.settings import SolverSettings
from allocator.solver.solve import check_budget, solve
from probes.errors import ProbeError, ProbeRunError, ProbeWarning
from probes.report import ProbeReport
from probes.settings import DataSettings, ProbeSettings

# Calibration (and tuning) data: a path, "builtin", records or token batches (lists of dicts), a
# datasets.Dataset / IterableDataset or a torch DataLoader of token batches (probes.sources)
DataSource = str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Any


def resolve_model_ref(model: Any) -> Any:
    """``None`` -> the built-in reference model's folder; anything else unchanged."""
    if model is None:

        return str(reference_model_path(DEFAULT_MODEL))
    if isinstance(model, os.PathLike):
        return os.fspath(model)
    return model


def settings_or_default(value: Any, cls: type, name: str) -> Any:
    """``value`` if it is a ``cls``, ``cls()`` for None; anything else is an InputError naming the class."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise InputError(f"{name} must be a {cls.__name__} (allocator.{cls.__name__}(...)), got "
                         f"{type(value).__name__}")
    return value


def check_source(source: Any, name: str, data_settings: DataSettings | None = None) -> None:
    """InputError now, before any model loads, unless ``source`` is a form data can take (a dataset with a
    column of a known record form; a path that exists)."""

    fmt = (data_settings or DataSettings()).record_format()
    with as_input_error(ProbeError):
        probes.check_source(source, fmt, name)
    if probes.source_kind(source) != "path":
        return
    if not Path(source).expanduser().exists():
        raise InputError(f"{name} {str(source)!r} not found; pass an existing .txt/.jsonl file, a datasets "
                         "folder or 'builtin'")


def load_or_check_model(model: Any, trust_remote_code: bool, revision: str | None = None) -> tuple[Any, str]:
    """(loaded model, id it is recorded under) from a hub id (at ``revision``), a folder, None (the built-in
    model) or a model object; an object that is not a transformers causal LM is an InputError."""

    ref = resolve_model_ref(model)
    if isinstance(ref, str):
        return load_model(ref, trust_remote_code=trust_remote_code, revision=revision), ref
    if revision is not None:
        raise InputError("revision picks a commit of a hub model; pass the hub id with it, not a loaded "
                         "model")

    if not isinstance(ref, nn.Module) or getattr(ref, "config", None) is None:
        raise InputError("model must be a hub id, a model folder, None (the built-in reference model) or a "
                         "loaded transformers model (AutoModelForCausalLM.from_pretrained), got "
                         f"{type(ref).__name__}")
    return ref, getattr(ref.config, "_name_or_path", "") or type(ref).__name__


def model_commit(model: Any, model_id: str, revision: str | None, *, from_ref: bool) -> str | None:
    """The commit hash the weights came from: for a model loaded here (``from_ref``), the hub cache's
    snapshot of ``model_id`` at ``revision``; for a model object, what its config recorded, or the snapshot
    folder it was loaded from. None for a plain folder."""
    if from_ref:
        return commit_of(model_id, revision)
    recorded = getattr(getattr(model, "config", None), "_commit_hash", None)
    return recorded or (commit_of(model_id) if model_id and Path(model_id).exists() else None)


def library_versions() -> dict[str, str]:


    return {
        "allocator": allocator.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "scipy": scipy.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def allocate(
    model: str | os.PathLike[str] | PreTrainedModel | None = None,
    data: DataSource = "builtin",
    budget: str | int | Budget = "r8",
    *,
    data_settings: DataSettings | None = None,
    probe_settings: ProbeSettings | None = None,
    utility_settings: UtilitySettings | None = None,
    solver_settings: SolverSettings | None = None,
    retention_data: DataSource | None = None,
    fused_kernels: bool = True,
    alpha_ratio: float = 2.0,
    use_rslora: bool = False,
    init: str = "default",
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    revision: str | None = None,
    config: Mapping[str, Any] | None = None,
    chat_template: str | os.PathLike[str] | None = None,
) -> Plan:
    """Measure where LoRA parameters pay off on ``data`` and choose ranks under ``budget``.

    Args:
        model: a hub id, a local folder, or a loaded ``PreTrainedModel``; ``None`` takes the built-in
            reference model (a small pretrained Qwen3.5-architecture model shipped with the package).
        data: calibration data: a ``.txt``/``.jsonl`` file, a ``datasets`` folder, ``"builtin"``, or token
            batches you have tokenised already (mappings of ``input_ids``, optionally ``labels`` and
            ``attention_mask``; taken in order, see :func:`probes.load_batches`).
        budget: trainable LoRA parameters: ``"2.5M"``, ``"0.5%"`` of the base model, or ``"r16"`` (what
            uniform rank 16 on every eligible target costs).
        retention_data: general text whose probes give each module a retention risk (used when the utility
            settings' retention weight is > 0); ``"builtin"`` is the package's general corpus,
            ``"builtin-facts"`` the demo task (:mod:`probes.facts`).
        fused_kernels: assume fused Mamba kernels (GPU training): modules they bypass get no adapter.
        init: lora_A initialisation recorded in the plan: ``"default"`` (PEFT's), ``"eva"`` (top principal
            directions of each module's input at the plan's ranks) or ``"gradient"`` (top right singular
            vectors of each module's calibration-loss gradient at its rank); apply either with
            ``plan.apply(model, init_data=batches)``.
        cache_dir: reuse probe reports whose model, data and settings match.
        revision: a hub model's branch, tag or commit hash (default: its main branch); the plan records the
            commit the weights came from (``provenance["model_revision"]``).
        config: the configuration this call was made from (``allocate --print-config``'s form), recorded as
            ``provenance["config"]``; the CLI passes its resolved config.
        chat_template: the path of a Jinja chat template file, for chat records when the model's tokenizer
            has no template (or to replace its own); the plan records its hash
            (``provenance["chat_template"]``).

    Returns:
        A :class:`~allocator.output.plan.Plan`; ``plan.cost <= plan.budget`` always.

    Raises:
        InputError: bad input (unknown model, empty data, malformed or infeasible budget), naming the fix.
        AllocatorError: the run failed (non-finite loss, solver failure).
    """

    check_init(init)
    alpha_ratio = check_alpha_ratio(alpha_ratio)
    data_settings = settings_or_default(data_settings, DataSettings, "data_settings")
    probe_settings = settings_or_default(probe_settings, probes.ProbeSettings, "probe_settings")
    utility_settings = settings_or_default(utility_settings, UtilitySettings, "utility_settings")
    solver_settings = settings_or_default(solver_settings, SolverSettings, "solver_settings")
    parsed_budget = Budget.parse(budget)
    template = read_chat_template(chat_template)
    check_source(data, "data", data_settings)
    if retention_data is not None:
        check_source(retention_data, "retention_data", data_settings)
    with as_input_error(ProbeError):  # before the model loads: these need nothing of it
        probes.check_device(probe_settings.device)
        if cache_dir is not None:
            probes.check_cache_dir(cache_dir)

    model_obj, model_id = load_or_check_model(model, trust_remote_code, revision)
    tokenizer = tokenizer_for(model_id, trust_remote_code, revision, tokenizer, template)

    components = [unprobed_experts_off(c) for c in find_components(model_obj, fused_kernels=fused_kernels)]
    eligible = [c for c in components if c.eligible]
    if not eligible:
        raise AllocatorError(f"no adaptable modules found in {model_id}; see `allocate inspect {model_id}`")
    budget_params = parsed_budget.resolve(components, count_base_params(model_obj))
    check_budget(components, budget_params, solver_settings)  # before minutes of probing

    names = [c.name for c in eligible]
    rank0 = uniform_rank(components, budget_params)
    with as_input_error(ProbeError):  # before minutes of probing: does the pass fit its device's free memory?
        message = check_fits(model_obj, eligible, probe_settings, batch_size=data_settings.batch_size,
                             seq_len=data_settings.seq_len)
    if message:
        warnings.warn(message, AllocatorWarning, stacklevel=2)
    warmup = warmup_for(data, tokenizer, components, rank0, data_settings, probe_settings, alpha_ratio)
    report = _probe(model_obj, model_id, data, tokenizer, names, data_settings, probe_settings, cache_dir,
                    warmup)
    risk_report = None
    if retention_data is not None and getattr(utility_settings, "retention_weight", 0.0) > 0:
        risk_report = _probe(model_obj, model_id, retention_data, tokenizer, names, data_settings,
                             replace(probe_settings, warmup_steps=0), cache_dir)
    provenance = {
        "model_id": model_id,
        "model_revision": model_commit(model_obj, model_id, revision,
                                       from_ref=isinstance(resolve_model_ref(model), str)),
        "data": report.meta["data"],  # probes.describe_source(data), recorded by _probe
        "data_hash": report.meta.get("data_fingerprint"),
        "retention_data": None if retention_data is None else probes.describe_source(
            retention_data, data_settings.record_format()),
        "budget_spec": str(parsed_budget),
        "data_settings": asdict(data_settings),
        "probe_settings": _settings_dict(probe_settings),
        "fused_kernels": fused_kernels,
        "versions": library_versions(),
        **template_record(template),
        **({"config": dict(config)} if config is not None else {}),
    }
    return solve_plan(
        model_id,
        components,
        report,
        budget_params,
        utility_settings,
        solver_settings,
        risk_report=risk_report,
        provenance=provenance,
        alpha_ratio=alpha_ratio,
        use_rslora=use_rslora,
        init=init,
        architecture=architecture_of(model_obj),
    )


def solve_plan(
    model_id: str,
    components: Sequence[Component],
    report: ProbeReport,
    budget: int,
    utility_settings: UtilitySettings,
    solver_settings: SolverSettings,
    *,
    risk_report: ProbeReport | None = None,
    provenance: dict[str, Any] | None = None,
    alpha_ratio: float = 2.0,
    use_rslora: bool = False,
    init: str = "default",
    architecture: Mapping[str, Any] | None = None,
) -> Plan:
    """Utilities from a probe report, the integer program, and the :class:`~allocator.output.plan.Plan` they
    make.

    The part of :func:`allocate` after probing; ``allocator.tune`` calls it once per trial on a cached report.
    """

    if utility_settings.capacity_start == 0:  # the capacity signal counts the energy beyond the budget's rank
        utility_settings = replace(utility_settings, capacity_start=uniform_rank(components, budget))
    table = compute_utilities(report, components, solver_settings.ranks, utility_settings,
                              risk_report=risk_report)
    allocation = solve(components, table, budget, solver_settings)
    statuses = {name: str(stats.status) for name, stats in report.modules.items()}
    idle = idle_family_warning(components, allocation.ranks, budget, statuses, solver_settings.ranks)
    if idle:
        warnings.warn(idle, AllocatorWarning, stacklevel=2)
    row, col = table.index(), {r: j for j, r in enumerate(table.ranks)}
    ranks = allocation.ranks
    utility = {n: float(table.values[row[n], col[r]]) for n, r in ranks.items() if n in row}
    risk = {}
    if table.risk is not None:
        risk = {n: float(table.risk[row[n], col[r]]) for n, r in ranks.items() if n in row}
    provenance = dict(provenance or {})
    provenance.update(
        utility_settings=_settings_dict(utility_settings),
        solver_settings=_settings_dict(solver_settings),
    )
    found = evidence.gather(report, components, budget, ranks, utility_settings, solver_settings, risk_report)
    return Plan(
        model_id=model_id,
        components=tuple(components),
        ranks=dict(ranks),
        budget=int(budget),
        utility=utility,
        risk=risk,
        solver={
            "status": allocation.status,
            "mip_gap": float(allocation.mip_gap),
            "granularity": allocation.granularity,
            "groups": {k: list(v) for k, v in allocation.groups.items()},
        },
        provenance=provenance,
        alpha_ratio=alpha_ratio,
        use_rslora=use_rslora,
        init=init,
        architecture=dict(architecture or {}),
        marginal=evidence.marginal_values(table, ranks, components),
        evidence=found,
    )


def unprobed_experts_off(component: Any) -> Any:
    """2-D parameters of router classes that are not ``nn.Linear`` are not probed (the probes see linears and
    3-D routed-expert parameters, ``probes.experts``), so they stay out of the budget and the program even
    when asked for; routed experts are components like any other."""
    if not component.is_parameter or component.n_experts > 1 or component.kind == "expert":
        return component
    if not component.default_target:
        return component
    note = "a 2-D router parameter is not probed; add it by hand with LoraConfig(target_parameters=...)"
    return replace(
        component, default_target=False, note=(component.note + "; " if component.note else "") + note
    )


def _settings_dict(settings: Any) -> dict[str, Any]:
    if hasattr(settings, "to_dict"):
        return settings.to_dict()
    return asdict(settings)


def read_chat_template(path: Any) -> str | None:
    """The text of the Jinja chat template file ``path`` (None: none given), read before any model loads."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"chat_template must be the path of a Jinja file, got {type(path).__name__}")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"could not read the chat template {os.fspath(path)!r} ({type(exc).__name__}); give "
                         "the path of a UTF-8 Jinja file (chat_template)") from None
    if not text.strip():
        raise InputError(f"the chat template {os.fspath(path)!r} is empty; give a Jinja file such as a "
                         "model's chat_template.jinja (chat_template)")
    return text


def tokenizer_for(model_id: str, trust_remote_code: bool, revision: str | None, tokenizer: Any = None,
                  chat_template: str | None = None) -> Any:
    """``tokenizer`` (default: the model's), with ``chat_template``'s text as its chat template when given
    (on a copy: a tokenizer the caller passed keeps its own)."""
    tokenizer = tokenizer or _load_tokenizer(model_id, trust_remote_code, revision)
    if chat_template is None:
        return tokenizer
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = chat_template
    return tokenizer


def template_record(chat_template: str | None) -> dict[str, str]:
    """``{"chat_template": "sha256:..."}`` for a given template (what provenance and a study's signature
    record), ``{}`` without one, so plans and studies made before the option stay as they were."""
    if chat_template is None:
        return {}
    return {"chat_template": "sha256:" + hashlib.sha256(chat_template.encode("utf-8")).hexdigest()[:16]}


def _load_tokenizer(model_id: str, trust_remote_code: bool, revision: str | None = None) -> Any:
    where = locate(model_id, revision)
    hub = {"revision": revision} if revision and where == model_id else {}
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"could not load a tokenizer for {model_id!r} ({type(exc).__name__}); pass tokenizer=... or a "
            "folder that holds tokenizer files"
        ) from None


def uniform_rank(components: Sequence[Component], budget: int) -> int:
    """The rank uniform LoRA over every eligible target would have at ``budget`` (at least 1)."""
    per_rank = params_per_uniform_rank(components)
    return max(1, budget // per_rank) if per_rank else 1


def warmup_targets(components: Sequence[Component], rank: int) -> dict[str, int]:
    """The warm-up's uniform LoRA: ``rank`` on every eligible linear and routed-expert parameter."""
    return {c.name: rank for c in components if c.eligible and (not c.is_parameter or c.kind == "expert")}


def warmup_for(data: DataSource, tokenizer: Any, components: Sequence[Component], rank: int,
               data_settings: DataSettings, probe_settings: ProbeSettings, alpha_ratio: float = 2.0
               ) -> probes.Warmup | None:
    """The probes' warm-up: uniform LoRA at ``rank`` over the probed modules and routed experts (PEFT's
    ``target_parameters``), trained on ``warmup_steps x batch_size`` rows of ``data`` apart from the
    calibration rows (another seed; token batches: the rows after them); None when
    ``probe_settings.warmup_steps`` is 0."""
    if not probe_settings.warmup_steps:
        return None
    config = to_lora_config(warmup_targets(components, rank), components, alpha_ratio=alpha_ratio)
    d, n = data_settings, probe_settings.warmup_steps * data_settings.batch_size
    token_rows = probes.is_token_source(data)  # taken in order: skip the calibration rows
    with as_input_error(ProbeError), warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeWarning)  # fewer rows than asked: the warm-up cycles them
        kwargs = {**asdict(d), "samples": n + d.samples * token_rows, "seed": d.seed + 1}
        batches = probes.load_batches(data, tokenizer, **kwargs)
    if token_rows and sum(len(b["input_ids"]) for b in batches) > d.samples:
        batches = batches[math.ceil(d.samples / d.batch_size):] or batches
    return probes.Warmup(config, batches)


def _probe(model, model_id, data, tokenizer, names, data_settings, probe_settings, cache_dir, warmup=None):

    with as_input_error(ProbeError), as_failure(ProbeRunError):
        batches = probes.load_batches(data, tokenizer, **asdict(data_settings))
        meta = {"model_id": model_id, "data": probes.describe_source(data, data_settings.record_format()),
                **asdict(data_settings)}
        if cache_dir is not None:
            return probes.run_cached(
                model, batches, names, probe_settings, cache_dir=Path(cache_dir), key_meta=meta, warmup=warmup
            )
        if warmup is not None:
            return probes.run_warm(
                model, batches, names, probe_settings, warmup.lora_config, warmup.batches, meta=meta
            )
        return probes.run(model, batches, names, probe_settings, meta=meta)
