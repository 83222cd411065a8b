"""`allocate tune`: an Optuna study over the budget, the allocation settings, LoRA alpha and the learning rate.

Stage: the whole chain of ``docs/design.md`` in a loop. Input: a model, training ``data``, ``eval_data``.
Output: :class:`~allocator.tune_report.TuneResult`, and in ``out_dir`` the best plan (``best/``, as ``allocate -o``
writes it), ``study.md`` and ``study.png``. Each trial::

    Optuna suggests -> compute_utilities(cached probe report) -> solve -> Plan -> finetune(fixed steps) -> eval loss

Probes run once per study (``probes.run_cached`` in ``out_dir/probes``, under a lock file so that workers sharing
``out_dir`` wait for the first). Every search part is one string, parsed once in :class:`TuneSettings`::

    "lo..hi"  searched in [lo, hi] (log scale for budget, lr, alpha_ratio, family_priors, max_rank)
    "a,b,c"   searched among the listed values          "v"  fixed at v
    ""        fixed at the base settings' value (utility_settings / solver_settings)
    "...@v"   base value v: what the enqueued baselines and the `default` trial use; without it, the base
              settings' value when inside the space, else the middle of the range / the first choice

Baselines (uniform, attention-/recurrent-/mlp-only at the same budget, lr and alpha, and the allocator's own
defaults) are enqueued first, once per study, and are never pruned. The search and its reasons: ``docs/tuning.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.api import DataSource
from allocator.budget import Budget
from allocator.errors import AllocatorError, InputError, as_input_error
from allocator.lora_init import check_init
from allocator.solve import GRANULARITIES
from allocator.tune_report import LOCK_NAME, FileLock, redact
from probes.settings import Range, check_ranges, ranged

if TYPE_CHECKING:
    from allocator.plan import Plan
    from allocator.tune_report import TuneResult

__all__ = ["BASELINES", "PLACEMENTS", "Space", "TuneSettings", "parse_space", "tune"]

log = logging.getLogger("allocator")

FAMILY_BASELINES = ("attention", "recurrent", "mlp")
BASELINES = ("default", "uniform", *FAMILY_BASELINES)
PLACEMENTS = ("solver", "uniform", *FAMILY_BASELINES)  # the categorical `placement` parameter
MODES, PRUNERS = ("single", "pareto"), ("median", "hyperband", "none")
WEIGHTED_SIGNALS = ("activation_rank", "fisher", "gradient_spectrum", "heldout_capture")
# part -> (value type, log scale, lowest allowed value, highest allowed value, strict lower bound)
_PARTS: dict[str, tuple[type, bool, float, float, bool]] = {
    "budget": (Budget, True, 0, math.inf, True),
    "lr": (float, True, 0, 1, True),
    "alpha_ratio": (float, True, 0, math.inf, True),
    "weights": (float, False, 0, math.inf, False),
    "uniform_prior": (float, False, 0, 1, False),
    "family_priors": (float, True, 0, math.inf, True),
    "retention_weight": (float, False, 0, math.inf, False),
    "granularity": (str, False, 0, 0, False),
    "max_rank": (int, True, 1, math.inf, False),
}


@dataclass(frozen=True)
class Space:
    """One search part, parsed: ``kind`` is ``fixed | range | choices | inherit`` (see the module docstring)."""

    kind: str
    values: tuple[Any, ...] = ()
    base: Any = None  # explicit ``@v``; None: decided once the base settings are known
    log: bool = False

    @property
    def searched(self) -> bool:
        return self.kind in ("range", "choices")

    def base_value(self, inherited: Any = None) -> Any:
        """The base point: ``@v``, else ``inherited`` when inside the space, else the middle / the first choice."""
        if self.base is not None:
            return self.base
        if self.kind in ("fixed", "inherit"):
            return self.values[0] if self.kind == "fixed" else inherited
        if self.kind == "choices":
            if inherited in self.values or not isinstance(inherited, (int, float)):
                return inherited if inherited in self.values else self.values[0]
            return min(self.values, key=lambda v: (abs(v - inherited), v))
        lo, hi = self.values
        if isinstance(inherited, (int, float)) and lo <= inherited <= hi:
            return inherited
        mid = math.sqrt(lo * hi) if self.log else (lo + hi) / 2
        return round(mid) if isinstance(lo, int) else mid


def parse_space(part: str, text: str) -> Space:
    """``"1e-3..1e-2@3e-3"`` -> ``Space("range", (0.001, 0.01), 0.003, log=True)``; InputError naming the part.

    >>> parse_space("granularity", "module,type")
    Space(kind='choices', values=('module', 'type'), base=None, log=False)
    """
    cast, log, lo_ok, hi_ok, strict = _PARTS[part]
    body, _, base_text = str(text).replace(" ", "").partition("@")

    def value(item: str) -> Any:
        try:
            out = Budget.parse(item) if cast is Budget else cast(item)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{part}={text!r}: {item!r} is not a {cast.__name__} ({exc}); see docs/tuning.md") from None
        if cast is str and out not in GRANULARITIES:
            raise InputError(f"{part}={text!r}: {item!r} is not one of {GRANULARITIES}")
        if cast in (int, float) and not math.isfinite(out):
            raise InputError(f"{part}={text!r}: {item!r} is not a finite number")
        if cast in (int, float) and not (lo_ok < out <= hi_ok if strict else lo_ok <= out <= hi_ok):
            raise InputError(f"{part}={text!r}: {item!r} lies outside {'(' if strict else '['}{lo_ok}, {hi_ok}]")
        return out

    base = value(base_text) if base_text else None
    if not body:
        if base is not None:
            raise InputError(f"{part}={text!r}: a base (@v) needs a space before it, e.g. 1..4@2")
        return Space("inherit", log=log)
    if ".." in body:
        if cast is str:
            raise InputError(f"{part}={text!r}: {part} takes a list (a,b) or one value, not a range")
        lo, hi = (value(v) for v in body.split("..", 1))
        if cast is not Budget and not lo < hi:
            raise InputError(f"{part}={text!r}: the range needs lo < hi")
        if base is not None and cast is not Budget and not lo <= base <= hi:
            raise InputError(f"{part}={text!r}: the base {base} lies outside the range")
        return Space("range", (lo, hi), base, log)
    items = tuple(value(v) for v in body.split(",") if v)
    if len(items) > 1:
        if len(set(map(str, items))) != len(items):
            raise InputError(f"{part}={text!r}: the list repeats a value")
        if base is not None and str(base) not in map(str, items):
            raise InputError(f"{part}={text!r}: the base {base} is not in the list")
        return Space("choices", items, base, log)
    return Space("fixed", items, None, log)


def _space_field(default: str, what: str) -> Any:
    return field(default=default, metadata={"help": f"{what} (lo..hi | a,b | v | '' = base settings; @v = base)"})


@dataclass(frozen=True)
class TuneSettings:
    """One study: its size and mode, the fine-tune every trial runs, and the search space. Validated here."""

    trials: int = ranged(20, "finished trials (complete + pruned) of the study, all workers together", Range(1, integer=True))
    mode: str = field(default="single", metadata={"help": "single: min eval loss at one budget | pareto: min (eval loss, trainable params)"})
    pruner: str = field(default="median", metadata={"help": "median | hyperband | none (single mode; baselines are never pruned)"})
    baselines: tuple[str, ...] = field(default=BASELINES, metadata={"help": f"trials enqueued first, once per study: any of {BASELINES}"})
    steps: int = ranged(60, "optimizer steps of every trial's LoRA fine-tune", Range(1, integer=True))
    batch_size: int = ranged(8, "sequences per fine-tune step", Range(1, integer=True))
    eval_every: int = ranged(10, "steps between intermediate eval losses (reported for pruning; 0: end only)", Range(0, integer=True))
    train_samples: int = ranged(256, "fine-tune training sequences drawn from --data", Range(1, integer=True))
    eval_samples: int = ranged(64, "eval sequences drawn from --eval-data", Range(1, integer=True))
    seed: int = ranged(0, "seed of every fine-tune (data order, LoRA init) and of the sampler", Range(0, integer=True))
    heartbeat_interval: int = ranged(30, "seconds between a running trial's heartbeats", Range(1, integer=True))
    grace_period: int = ranged(90, "a trial silent this many seconds is failed and retried", Range(1, integer=True))
    max_retry: int = ranged(2, "times a killed (stale) trial is re-run", Range(0, integer=True))
    budget: str = field(default="", metadata={"help": "trainable-parameter budget: v (single mode), lo..hi or a,b "
                                               "(pareto mode); '' = r8 in single mode, r2..r12 in pareto mode"})
    lr: str = _space_field("1e-3..1e-2@3e-3", "learning rate")
    alpha_ratio: str = _space_field("1..4@2", "lora_alpha / r")
    weights: str = _space_field("0..1", "weight of each signal mixed by signal=combined")
    uniform_prior: str = _space_field("0..1", "uniform prior blended into the utility")
    family_priors: str = _space_field("0.5..2", "utility multiplier of each family")
    retention_weight: str = _space_field("0..2", "retention weight lambda (searched only with retention data)")
    granularity: str = _space_field(",".join(GRANULARITIES), "solver granularity")
    max_rank: str = _space_field("16,32,64", "largest rank of the solver's grid")

    def __post_init__(self) -> None:
        check_ranges(self, InputError)
        if self.grace_period < self.heartbeat_interval:
            raise InputError(f"grace_period {self.grace_period}s is shorter than heartbeat_interval "
                             f"{self.heartbeat_interval}s; raise it (Optuna suggests twice the interval)")
        if self.mode not in MODES or self.pruner not in PRUNERS:
            raise InputError(f"mode {self.mode!r} / pruner {self.pruner!r}: choose mode from {MODES}, pruner from {PRUNERS}")
        baselines = tuple(str(b) for b in self.baselines)
        if set(baselines) - set(BASELINES) or len(set(baselines)) != len(baselines):
            raise InputError(f"baselines {baselines} must be distinct names from {BASELINES} (or empty)")
        object.__setattr__(self, "baselines", baselines)
        if not self.budget:
            object.__setattr__(self, "budget", "r8" if self.mode == "single" else "r2..r12")
        spaces = {part: parse_space(part, getattr(self, part)) for part in _PARTS}
        if spaces["lr"].kind == "inherit":
            raise InputError("lr has no base setting to keep; give a value (3e-3) or a range (1e-3..1e-2)")
        if self.trials <= len(baselines):
            raise InputError(f"trials={self.trials} leaves no searched trial after the {len(baselines)} baselines; "
                             "raise trials or drop baselines")
        if self.mode == "single" and spaces["budget"].searched:
            raise InputError(f"mode=single compares allocations at one budget, got budget={self.budget!r}; "
                             "give one budget (e.g. r8) or use mode=pareto")
        object.__setattr__(self, "_spaces", spaces)

    @property
    def spaces(self) -> Mapping[str, Space]:
        """Every search part, parsed."""
        return self._spaces  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuneSettings:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"unknown TuneSettings fields {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def tune(
    model: Any = None,
    data: DataSource = "builtin",
    eval_data: DataSource | None = None,
    *,
    settings: TuneSettings | None = None,
    out_dir: str | os.PathLike[str] = "tune-study",
    storage: str | None = None,
    study_name: str = "tune",
    overwrite: bool = False,
    data_settings: Any = None,
    probe_settings: Any = None,
    utility_settings: Any = None,
    solver_settings: Any = None,
    retention_data: DataSource | None = None,
    fused_kernels: bool = True,
    use_rslora: bool = False,
    init: str = "default",
    init_data: DataSource | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    objective: Callable[[Plan, Any], float] | None = None,
) -> TuneResult:
    """Run (or join, or resume) the study ``study_name`` until it holds ``settings.trials`` finished trials.

    Args:
        model, data, retention_data, fused_kernels, trust_remote_code, tokenizer: as :func:`allocator.allocate`;
            ``data`` also gives the fine-tune's training sequences (a path, ``"builtin"`` or token batches).
        eval_data: data scored by the built-in fine-tune, in any form ``data`` takes (required unless
            ``objective`` is given).
        settings: study size, mode, fine-tune and search space (:class:`TuneSettings`).
        out_dir: probe cache, default storage ``sqlite:///OUT_DIR/study.db``, ``best/``, ``study.md``,
            ``study.png``. An existing ``out_dir`` of the same study is resumed; any other needs ``overwrite``.
        storage: any database URL Optuna's RDBStorage takes; workers given the same URL and ``study_name`` share
            the study. The exact trial bound and the one probe run hold for workers sharing ``out_dir``.
        overwrite: start over: clear ``out_dir`` and delete ``study_name`` from ``storage``.
        data_settings, probe_settings, utility_settings, solver_settings: base settings (parts a space leaves
            at ``""`` keep their value; the ``default`` baseline uses them).
        init: lora_A init of every trial's fine-tune, recorded in each plan: ``"default"`` (PEFT's) or ``"eva"``
            (EVA's top input principal directions at the trial's ranks, computed on the calibration ``data`` by
            each worker as its trials need them; ``allocator.lora_init``). With ``"eva"`` the study picks the
            placement that does best under that init, and ``best/`` is a plan to apply with
            ``Plan.apply(model, init_data=...)``.
        init_data: EVA's calibration data in any form ``data`` takes (default: ``data``'s calibration rows); PEFT's
            EVA counts only labelled tokens, so data whose labels mark few tokens (answers only) may need its own.
        objective: ``objective(plan, trial) -> float`` (minimised) replaces the built-in fine-tune; read
            ``trial.params["lr"]``; ``trial.report``/``should_prune`` work in single mode.

    Raises:
        InputError: bad input, an out_dir holding another study, resumed with different settings.
        AllocatorError: a trial failed (the study stays resumable), or too many trials failed.
    """
    import optuna

    import probes
    from allocator.api import DataSettings, check_source, settings_or_default
    from allocator.solve import SolverSettings
    from allocator.tune_report import (
        check_out_dir,
        default_storage,
        prepare_out_dir,
        summarize,
        write_outputs,
        write_record,
    )
    from allocator.utility import UtilitySettings
    from probes.errors import ProbeError
    from probes.folders import FolderError, resolve_target

    settings = settings_or_default(settings, TuneSettings, "settings")
    if objective is None and eval_data is None:
        raise InputError("the built-in fine-tune needs eval data; pass eval_data (--eval-data) or an objective")
    init = check_init(init)
    if init_data is not None and init != "eva":
        raise InputError("init_data is EVA's calibration data; pass init='eva' (--init eva) with it, or drop it")
    data_settings = settings_or_default(data_settings, DataSettings, "data_settings")
    probe_settings = settings_or_default(probe_settings, probes.ProbeSettings, "probe_settings")
    utility_settings = settings_or_default(utility_settings, UtilitySettings, "utility_settings")
    solver_settings = settings_or_default(solver_settings, SolverSettings, "solver_settings")
    for name, source in (("data", data), ("eval_data", eval_data), ("retention_data", retention_data),
                         ("init_data", init_data)):
        if source is not None:
            check_source(source, name)
    with as_input_error(ProbeError):
        probes.check_device(probe_settings.device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with as_input_error(FolderError):
        out = resolve_target(out_dir)
    url = storage or default_storage(out)
    run = _Run(settings, out, url, study_name, objective, use_rslora, init)
    check_out_dir(out, study_name, url, overwrite)  # before any work, and before the lock file is created
    created = not out.exists()
    try:
        with run.lock:
            for line in prepare_out_dir(out, study_name, url, overwrite):
                log.warning("overwrite: %s", line)
            if storage is not None:
                run.connect()  # a wrong --storage fails here, before the folder is marked as this study's
            write_record(out, study_name, url)
    except BaseException:
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:  # leave no trace
            shutil.rmtree(out, ignore_errors=True)
        raise
    run.load(model, data, eval_data, retention_data, tokenizer, trust_remote_code, fused_kernels,
             data_settings, probe_settings, utility_settings, solver_settings, init_data)
    try:
        with run.lock:
            run.probe(data, retention_data, init_data)
            study = run.open_study()
            run.enqueue_baselines(study)
        run.run_trials(study)
        with run.lock:
            result = summarize(study, run.plan_for_params, storage=redact(url), mode=settings.mode,
                               probe_seconds=run.probe_seconds)
            return write_outputs(result, out)
    except (optuna.exceptions.StorageInternalError, _sqlalchemy_errors()) as exc:  # the database failed mid-study
        cause = exc.__cause__ or exc
        raise storage_error(url, cause) from None


class _BaseTrial:
    """Stands in for an Optuna trial: every searched part takes its base value, recorded in ``params``."""

    def __init__(self, placement: str) -> None:
        self.placement, self.params = placement, {"placement": placement}


class _Search:
    """Optuna suggestions -> one trial's configuration (placement, budget, lr, alpha, utility and solver settings)."""

    def __init__(self, settings: TuneSettings, utility: Any, solver: Any, families: list[str],
                 resolve: Callable[[Budget], int], has_risk: bool) -> None:
        self.spaces, self.utility, self.solver = dict(settings.spaces), utility, solver
        self.families, self.has_risk = families, has_risk
        b = self.spaces["budget"]  # budgets become parameter counts once the model is known
        b = self.spaces["budget"] = Space(b.kind, tuple(resolve(v) for v in b.values),
                                          None if b.base is None else resolve(b.base), True)
        if b.kind == "range" and not (b.values[0] < b.values[1] and b.values[0] <= b.base_value() <= b.values[1]):
            raise InputError(f"budget range {settings.budget!r} is {b.values[0]:,}..{b.values[1]:,} parameters on "
                             "this model; give lo < hi and a base (@v) inside")

    def _pick(self, trial: Any, name: str, space: Space, inherited: Any = None) -> Any:
        if isinstance(trial, _BaseTrial) or not space.searched:
            value = space.base_value(inherited)
            if isinstance(trial, _BaseTrial) and space.searched:
                trial.params[name] = value
            return value
        if space.kind == "choices":
            return trial.suggest_categorical(name, list(space.values))
        lo, hi = space.values
        if isinstance(lo, int):
            return trial.suggest_int(name, lo, hi, log=space.log)
        return trial.suggest_float(name, lo, hi, log=space.log)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The configuration of ``trial`` (an Optuna trial, ``FixedTrial`` or :class:`_BaseTrial`)."""
        sp, u, s = self.spaces, self.utility, self.solver
        placement = trial.placement if isinstance(trial, _BaseTrial) else trial.suggest_categorical(
            "placement", list(PLACEMENTS))
        cfg = {"placement": placement, "budget": self._pick(trial, "budget", sp["budget"]),
               "lr": self._pick(trial, "lr", sp["lr"]), "alpha_ratio": self._pick(trial, "alpha_ratio",
                                                                                     sp["alpha_ratio"], 2.0)}
        if placement != "solver":
            return cfg
        weights = dict(u.weights)
        if u.signal == "combined":
            mixed = {k: self._pick(trial, f"weight.{k}", sp["weights"], u.weights.get(k, 0.0)) for k in WEIGHTED_SIGNALS}
            weights = {**weights, **mixed} if any(v > 0 for v in mixed.values()) else weights
        priors = {f: self._pick(trial, f"prior.{f}", sp["family_priors"], u.family_priors.get(f, 1.0))
                  for f in self.families}
        lam = self._pick(trial, "retention_weight", sp["retention_weight"], u.retention_weight) if self.has_risk \
            else u.retention_weight
        cfg["utility"] = dataclasses.replace(
            u, weights=weights, family_priors=priors, retention_weight=lam,
            uniform_prior=self._pick(trial, "uniform_prior", sp["uniform_prior"], u.uniform_prior))
        top = self._pick(trial, "max_rank", sp["max_rank"], s.ranks[-1])
        cfg["solver"] = dataclasses.replace(s, granularity=self._pick(trial, "granularity", sp["granularity"],
                                                                      s.granularity),
                                            ranks=_grid(s.ranks, top))
        return cfg


class _Run:
    """One worker's share of a study: the model, the cached probe reports, the search and the trial loop."""

    def __init__(self, settings: TuneSettings, out: Path, url: str, study_name: str,
                 objective: Callable[[Plan, Any], float] | None, use_rslora: bool, init: str = "default") -> None:
        self.settings, self.out, self.url, self.study_name = settings, out, url, study_name
        self.objective, self.use_rslora, self.init = objective, use_rslora, init
        self.calibration: list = []
        self._eva: dict[str, Any] = {}  # EVA components per module, computed as trials need them
        self.lock, self.probe_seconds = FileLock(out / LOCK_NAME), 0.0
        self.storage: Any = None

    def load(self, model, data, eval_data, retention_data, tokenizer, trust_remote_code, fused_kernels,
             data_settings, probe_settings, utility_settings, solver_settings, init_data=None) -> None:
        """Model, components and fine-tune batches; the base settings. No probes yet."""
        from allocator.api import _load_tokenizer, library_versions, load_or_check_model, unprobed_experts_off
        from allocator.components import architecture_of, find_components

        s = self.settings
        self.data_settings, self.probe_settings = data_settings, probe_settings
        self.utility, self.solver = utility_settings, solver_settings
        self.model, self.model_id = load_or_check_model(model, trust_remote_code)
        self.tokenizer = tokenizer or _load_tokenizer(self.model_id, trust_remote_code)
        self.components = tuple(unprobed_experts_off(c) for c in find_components(self.model, fused_kernels=fused_kernels))
        self.architecture = architecture_of(self.model)
        self.eligible = [c for c in self.components if c.eligible]
        if not self.eligible:
            raise AllocatorError(f"no adaptable modules found in {self.model_id}; see `allocate inspect`")
        self.train = self.evals = ()
        if self.objective is None:
            self.train = tuple(self._batches(data, s.train_samples, s.batch_size, s.seed))
            self.evals = tuple(self._batches(eval_data, s.eval_samples, s.batch_size, s.seed))
        self.signature = _jsonable({
            "settings": {k: v for k, v in s.to_dict().items()
                         if k not in ("trials", "pruner", "heartbeat_interval", "grace_period", "max_retry")},
            "model": _where(self.model_id), "data": _where(data), "eval_data": _where(eval_data),
            "retention_data": _where(retention_data),
            "objective": "finetune" if self.objective is None else getattr(self.objective, "__name__", "custom"),
            "data_settings": {k: v for k, v in dataclasses.asdict(self.data_settings).items()
                              if not (k == "encoding" and v == "utf-8")},  # studies begun before it resume
            "probe_settings": self.probe_settings.result_key(),
            "utility_settings": self.utility.to_dict(), "solver_settings": self.solver.to_dict(),
            "fused_kernels": fused_kernels, "use_rslora": self.use_rslora,
            **({"init": self.init, "init_data": _where(init_data)} if self.init != "default" else {})})
        # (init keys absent by default, so studies begun before they existed still resume)
        self.provenance = {"model_id": self.model_id, "model_revision": getattr(self.model.config, "_commit_hash", None),
                           "data": self.signature["data"], "retention_data": self.signature["retention_data"],
                           "data_settings": self.signature["data_settings"],
                           "probe_settings": self.probe_settings.to_dict(), "fused_kernels": fused_kernels,
                           "versions": library_versions()}

    def _batches(self, source: Any, samples: int, batch_size: int, seed: int) -> list:
        import probes
        from probes.errors import ProbeError

        d = self.data_settings
        with as_input_error(ProbeError):
            batches = list(probes.load_batches(source, self.tokenizer, seq_len=d.seq_len, samples=samples,
                                               batch_size=batch_size, seed=seed, text_field=d.text_field,
                                               encoding=d.encoding))
            probes.check_token_ids(self.model, batches)
        return batches

    def probe(self, data: Any, retention_data: Any, init_data: Any = None) -> None:
        """Probe reports from ``OUT_DIR/probes`` (run once per study; the caller holds the lock)."""
        import probes
        from probes.errors import ProbeError

        started, d, names = time.perf_counter(), self.data_settings, [c.name for c in self.eligible if not c.is_parameter]
        meta = {"model_id": self.model_id, "model_revision": self.provenance["model_revision"]}

        def report(batches: list) -> Any:
            try:
                return probes.run_cached(self.model, batches, names, self.probe_settings,
                                         cache_dir=self.out / "probes", key_meta=meta)
            except ProbeError as exc:
                raise InputError(str(exc)) from None

        def calibration(source: Any) -> list:
            return self._batches(source, d.samples, d.batch_size, d.seed)

        batches = calibration(data)
        self.report = report(batches)
        if self.init == "eva":  # EVA's data, as Plan.apply(init_data=...) takes it
            self.calibration = batches if init_data is None else calibration(init_data)
        self.risk = None if retention_data is None else report(calibration(retention_data))
        self.provenance["data_hash"] = self.report.meta.get("data_fingerprint")
        self.probe_seconds = time.perf_counter() - started
        families = sorted({c.family for c in self.eligible if c.name in self.report.modules})
        self.search = _Search(self.settings, self.utility, self.solver, families,
                              lambda b: b.resolve(self.components, sum(p.numel() for p in self.model.parameters())),
                              self.risk is not None)
        self._check_feasible()

    def _check_feasible(self) -> None:
        """The smallest and the largest budget must solve at the smallest grid top, and with EVA's init its data
        must hold the uniform baseline's ranks; else InputError up front."""
        sp, base = self.search.spaces, self.search.suggest(_BaseTrial("solver"))
        top = min(sp["max_rank"].values) if sp["max_rank"].searched else base["solver"].ranks[-1]
        base["solver"] = dataclasses.replace(base["solver"], ranks=_grid(self.solver.ranks, top))
        for budget in sorted({min(sp["budget"].values), max(sp["budget"].values)}):
            try:
                self.plan({**base, "budget": budget})
            except InputError as exc:
                raise InputError(f"the search space reaches an infeasible corner (budget {budget:,}, max_rank {top})"
                                 f": {exc}; narrow --budget or raise --max-rank") from None
        if self.init == "eva":  # EVA's data must hold the uniform baseline's ranks: find out before any trial runs
            self._eva_init(self.plan({**self.search.suggest(_BaseTrial("uniform")), "budget": max(sp["budget"].values)}))

    def connect(self) -> None:
        """Open the storage (``self.storage``): a bad URL, a missing driver, an unreachable server, or a locked or
        read-only sqlite file is an error naming the fix, before anything is marked or probed."""
        import optuna
        from optuna.storages import RDBStorage

        try:  # renamed in Optuna 4.9; the old name is a deprecated alias
            from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
            hook = "heartbeat_stale_trial_callback"
        except ImportError:
            from optuna.storages import RetryFailedTrialCallback as Retry
            hook = "failed_trial_callback"

        s = self.settings
        sqlite = self.url.startswith("sqlite")
        if sqlite:
            check_sqlite_writable(self.url)
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.retry = Retry(max_retry=s.max_retry)  # re-enqueues a stale trial's parameters, max_retry times
                storage = RDBStorage(self.url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if
                                     sqlite else None, heartbeat_interval=s.heartbeat_interval,
                                     grace_period=s.grace_period, **{hook: self.retry})
            if sqlite:
                _fast_sqlite(storage)
            self.storage = storage
        except Exception as exc:  # SQLAlchemy: bad URL, missing driver, unreachable server, locked file
            raise storage_error(self.url, exc) from None

    def open_study(self) -> Any:
        import optuna

        if self.storage is None:  # the default sqlite file is made only now, once the inputs have all been read
            self.connect()
        s, single = self.settings, self.settings.mode == "single"
        n_enqueued = len(s.baselines)
        pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=max(5, n_enqueued),
                                                        n_warmup_steps=s.steps // 3),
                  "hyperband": optuna.pruners.HyperbandPruner(min_resource=max(1, s.eval_every),
                                                              max_resource=s.steps),
                  "none": optuna.pruners.NopPruner()}[s.pruner if single else "none"]
        sampler = _Sampler(s.seed, n_enqueued + max(3, (s.trials - n_enqueued) // 3))
        try:
            study = optuna.create_study(storage=self.storage, study_name=self.study_name, sampler=sampler,
                                        pruner=pruner, directions=["minimize"] * (1 if single else 2),
                                        load_if_exists=True)
            stored = study.user_attrs.get("tune")
            if stored is None:
                study.set_user_attr("tune", self.signature)
        except Exception as exc:
            raise storage_error(self.url, exc) from None
        if stored is not None and stored != self.signature:
            keys = sorted(k for k in set(stored) | set(self.signature) if stored.get(k) != self.signature.get(k))
            differ = "; ".join(_differences(stored, self.signature)[:4])
            raise InputError(f"study {self.study_name!r} was started with other {', '.join(keys)} ({differ}); pass "
                             "the same settings to resume it, or --overwrite / another --study to start a new one")
        return study

    def enqueue_baselines(self, study: Any) -> None:
        """Enqueue each baseline unless a trial of it exists that did not fail (the caller holds the lock)."""
        from optuna.trial import TrialState

        seen = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL}
        for name in self.settings.baselines:
            placement = "solver" if name == "default" else name
            base = _BaseTrial(placement)
            self.search.suggest(base)
            if name not in seen and (placement == "solver" or self._baseline_rank(placement, base.params) > 0):
                study.enqueue_trial(base.params, user_attrs={"baseline": name})

    def _baseline_rank(self, placement: str, params: Mapping[str, Any]) -> int:
        members = [c for c in self.eligible if placement == "uniform" or c.family == placement]
        per_rank = sum(c.n_params_per_rank for c in members)
        budget = params.get("budget", self.search.spaces["budget"].base_value())
        return budget // per_rank if per_rank else 0

    def plan(self, cfg: Mapping[str, Any], number: int | None = None) -> Plan:
        """The plan of one configuration: solved from the cached probe report, or a baseline's uniform ranks."""
        from allocator.api import solve_plan
        from allocator.plan import Plan

        placement, budget = cfg["placement"], int(cfg["budget"])
        prov = dict(self.provenance)
        prov["budget_spec"] = str(budget)
        prov["tune"] = {"study": self.study_name, "trial": number, "placement": placement, "lr": cfg["lr"]}
        if placement == "solver":
            return solve_plan(self.model_id, self.components, self.report, budget, cfg["utility"], cfg["solver"],
                              risk_report=self.risk, provenance=prov, alpha_ratio=float(cfg["alpha_ratio"]),
                              use_rslora=self.use_rslora, init=self.init, architecture=self.architecture)
        rank = self._baseline_rank(placement, {"budget": budget})
        ranks = {c.name: rank if placement == "uniform" or c.family == placement else 0 for c in self.eligible}
        solver = {"status": f"baseline ({placement})", "mip_gap": 0.0, "granularity": "type", "groups": {}}
        return Plan(model_id=self.model_id, components=self.components, ranks=dict(ranks), budget=budget,
                    solver=solver, provenance=prov, alpha_ratio=float(cfg["alpha_ratio"]),
                    use_rslora=self.use_rslora, init=self.init, architecture=self.architecture)

    def plan_for_params(self, params: Mapping[str, Any], number: int | None = None) -> Plan:
        """Rebuild a finished trial's plan from its parameters (solving is deterministic)."""
        import optuna

        return self.plan(self.search.suggest(optuna.trial.FixedTrial(dict(params), number or 0)), number)

    def objective_fn(self, trial: Any) -> float | tuple[float, float]:
        """One trial: suggest, solve, fine-tune (or the user's objective), report. Releases the claim lock."""
        import optuna

        from allocator.finetune import finetune

        self.lock.release()
        started, s = time.perf_counter(), self.settings
        cfg = self.search.suggest(trial)
        try:
            plan = self.plan(cfg, trial.number)
        except InputError as exc:  # e.g. share bounds this grid cannot meet: not this study's fault to crash on
            trial.set_user_attr("note", f"infeasible: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("cost", plan.cost)
        trial.set_user_attr("budget", plan.budget)
        trial.set_user_attr("worker", f"{platform.node()}:{os.getpid()}")
        setup = time.perf_counter() - started
        if self.objective is not None:
            value = float(self.objective(plan, trial))
            work = time.perf_counter() - started - setup
        else:
            single = s.mode == "single"
            prunable = single and s.pruner != "none" and "baseline" not in trial.user_attrs
            config = plan.to_lora_config(base_model_name_or_path=None)  # PEFT fills in the model's own
            result = finetune(self.model, config, self.train, self.evals, steps=s.steps, lr=cfg["lr"], seed=s.seed,
                              batch_size=s.batch_size, eval_every=(s.eval_every or None) if single else None,
                              callback=_reporter(trial, prunable) if single else None,
                              init=self._eva_init(plan) if plan.init == "eva" else None)
            value, work = result.eval_loss, result.wall_time_s
            trial.set_user_attr("initial_eval_loss", result.initial_eval_loss)
        trial.set_user_attr("timing", {"setup_s": setup, "objective_s": work})
        return value if s.mode == "single" else (value, float(plan.cost))

    def _eva_init(self, plan: Plan) -> Callable[[Any], None]:
        """The fine-tune's ``init``: EVA's components copied into lora_A at ``plan``'s ranks, as ``Plan.apply``
        does. Components are kept per module; one EVA pass computes those a plan needs beyond what earlier trials
        asked for, at its largest such rank, and a module takes their first ``r`` rows."""
        from allocator.lora_init import eva_components, eva_targets, init_lora_a

        targets, cache = eva_targets(plan.components, plan.targets), self._eva
        need = {n: r for n, r in targets.items() if n not in cache or cache[n].shape[0] < r}
        if need:
            cache.update(eva_components(self.model, sorted(need), self.calibration, max(need.values())))
        return lambda peft_model: init_lora_a(peft_model, cache, targets)

    def run_trials(self, study: Any) -> None:
        """Claim and run trials until the study holds ``trials`` finished ones (COMPLETE + PRUNED).

        The count and the claim (Optuna's ``ask``) happen under the lock, so workers sharing ``out_dir`` never
        overshoot, as ``MaxTrialsCallback`` alone can by one trial per worker. While the trials running elsewhere
        would complete the study, this worker waits: one of them may belong to a killed worker, and goes stale
        after ``grace_period``, is failed and re-enqueued (``RetryHeartbeatStaleTrialCallback``), and is run here.
        """
        import optuna
        from optuna.trial import TrialState

        n, unbeating = self.settings.trials, {}
        while True:
            with self.lock:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                self._fail_orphans(study, unbeating)
                states = [t.state for t in study.get_trials(deepcopy=False)]
                done = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)
                if done >= n:
                    return
                if states.count(TrialState.FAIL) > n + self.settings.max_retry * n:
                    raise AllocatorError(f"more trials of study {self.study_name!r} failed than it asks for; see "
                                         "the failures in the storage (optuna-dashboard) and fix their cause")
                if done + states.count(TrialState.RUNNING) < n:
                    study.optimize(self.objective_fn, n_trials=1)  # objective_fn releases the lock once claimed
                    continue
            time.sleep(min(5.0, self.settings.heartbeat_interval))

    def _fail_orphans(self, study: Any, first_seen: dict[int, float]) -> None:
        """Fail (and so retry) RUNNING trials that never recorded a heartbeat for ``grace_period`` of this worker.

        A worker killed between claiming a trial (``ask``) and its first heartbeat leaves a trial that Optuna's
        ``fail_stale_trials`` never fails: it only ages heartbeats, and a trial without one is left alone (a
        user's ask-and-tell trial may legitimately have none). Every trial of this study is run with heartbeats,
        so one without any after the grace period is an orphan. The grace period is timed on this worker's own
        clock (``first_seen``: trial id -> when it was first seen so), so clock skew between hosts cannot fail a
        live trial.
        """
        import copy

        import sqlalchemy
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        query = sqlalchemy.text("SELECT trial_id FROM trials WHERE study_id = :study AND state = 'RUNNING' AND "
                                "trial_id NOT IN (SELECT trial_id FROM trial_heartbeats)")
        with self.storage.engine.connect() as connection:
            orphans = {row[0] for row in connection.execute(
                query, {"study": self.storage.get_study_id_from_name(self.study_name)})}
        now = time.monotonic()
        for trial_id in set(first_seen) - orphans:
            del first_seen[trial_id]
        for trial_id in orphans:
            if now - first_seen.setdefault(trial_id, now) <= self.settings.grace_period:
                continue
            del first_seen[trial_id]
            try:
                if not study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:  # another worker failed it first
                continue
            self.retry(study, copy.deepcopy(study._storage.get_trial(trial_id)))


SQLITE_TIMEOUT_S = 60  # a worker waits this long for another's write lock before sqlite reports "locked"


def check_sqlite_writable(url: str) -> None:
    """A sqlite study file (or its folder) that cannot be written fails later inside Optuna with a misleading
    message ("invalid data in the commit"); say what it is now."""
    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    if path is None or str(path) in ("", ":memory:"):
        return
    if path.exists() and not os.access(path, os.W_OK):
        raise AllocatorError(f"the study database {path} is read-only; make it writable (chmod u+w) or choose "
                             "another -o / --storage")
    if not path.exists() and path.parent.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise AllocatorError(f"cannot create the study database in {path.parent} (read-only folder); choose "
                             "another -o / --storage")


def storage_error(url: str, exc: BaseException) -> AllocatorError:
    """The one-line error for a storage that did not open or answer, naming the cause and the fix."""
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    low = text.lower()
    if "database is locked" in low:
        return AllocatorError(f"the study database {redact(url)} is locked by another process for over "
                              f"{SQLITE_TIMEOUT_S} s; wait for it or use a server database (--storage postgresql://...)")
    if "readonly" in low or "read-only" in low:
        return AllocatorError(f"the study database {redact(url)} is read-only; make it writable or choose another "
                              "-o / --storage")
    driver = re.search(r"No module named '([\w.]+)'", str(exc))
    if driver or isinstance(exc, ModuleNotFoundError):
        module = driver[1] if driver else str(exc)
        hint = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pymysql": "pymysql",
                "MySQLdb": "mysqlclient"}.get(module.split(".")[0], module.split(".")[0])
        return InputError(f"the --storage URL {redact(url)} needs the Python package {hint!r}: pip install {hint}")
    if "could not parse" in low or "argumenterror" in low or "no such module" in low or "can't load plugin" in low:
        return InputError(f"could not open storage {redact(url)} ({text}); pass a database URL Optuna takes, e.g. "
                          "sqlite:///study.db or postgresql://user@host/db")
    return AllocatorError(f"could not open or use storage {redact(url)} ({text}); check that the database is "
                          "reachable and writable")


def _sqlalchemy_errors() -> type[BaseException]:
    from sqlalchemy.exc import OperationalError

    return OperationalError


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``['settings.steps: 60 (now 80)', ...]``: the leaves where two signatures differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path}: {old!r} (now {new!r})"]


def _fast_sqlite(storage: Any) -> None:
    """WAL journal, ``synchronous=NORMAL``: a commit stops waiting for fsync (17 ms -> 0.01 ms on the benchmark
    machine; a trial makes ~20). Still safe across processes of one host; only an OS crash can lose commits."""
    from sqlalchemy import event

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        except Exception:  # another process holds the file: keep its journal mode
            pass
        finally:
            cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect with the pragmas


def _grid(ranks: tuple[int, ...], top: int) -> tuple[int, ...]:
    """The solver's rank grid cut at ``top``: ``(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ...)`` at 16 -> ``(0, 1, 2, 3, 4, 6, 8,
    12, 16)``."""
    return tuple(r for r in ranks if r < top) + (top,)


def _reporter(trial: Any, prunable: bool) -> Callable[[int, float], None]:
    """The fine-tune callback: report each intermediate eval loss; raise ``TrialPruned`` when the pruner says so."""

    def callback(step: int, loss: float) -> None:
        import optuna

        trial.report(loss, step)
        if prunable and trial.should_prune():
            raise optuna.TrialPruned(f"eval loss {loss:.4f} at step {step} lags the other trials")

    return callback


def _where(ref: Any) -> str | None:
    """A data or model reference as the study records it: local paths absolute, token batches by count and
    fingerprint (``probes.describe_source``), anything else as given."""
    import probes

    if ref is None:
        return None
    if probes.is_token_source(ref):
        return probes.describe_source(ref)
    return str(Path(ref).resolve()) if Path(str(ref)).exists() else str(ref)


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _sampler_base() -> type:
    import optuna

    return optuna.samplers.BaseSampler


class _Sampler(_sampler_base()):  # type: ignore[misc]
    """TPE seeded by ``seed`` and the trial number, so workers never repeat each other's draws and a one-worker
    study is reproducible; ``placement`` is always ``solver`` unless the trial was enqueued (a baseline)."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed, self.n_startup_trials, self._tpe = seed, n_startup_trials, (-1, None)

    def _for(self, number: int) -> Any:
        import optuna

        if self._tpe[0] != number:
            self._tpe = (number, optuna.samplers.TPESampler(
                seed=self.seed * 1_000_003 + number, n_startup_trials=self.n_startup_trials,
                constant_liar=True))
        return self._tpe[1]

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        if param_name == "placement":
            return "solver"
        return self._for(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._for(trial.number).before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._for(trial.number).after_trial(study, trial, state, values)
