"""`allocate tune`, the worker: an Optuna study over the budget, allocation settings, LoRA alpha and the lr.

Stage: the whole chain of ``docs/design.md`` in a loop. Input: a model, training ``data``, ``eval_data``.
Output: :class:`~allocator.tuning.report.TuneResult`, and in ``out_dir`` the best plan (``best/``, as
``allocate -o`` writes it), ``study.md`` and ``study.png``. Each trial (:mod:`allocator.tuning.objective`)::

    Optuna suggests -> compute_utilities(cached probe report) -> solve -> Plan -> finetune(steps) -> loss

Probes run once per study (``probes.run_cached`` in ``out_dir/probes``, under the folder's lock so that
workers sharing ``out_dir`` wait for the first). Baselines (uniform, attention-/recurrent-/mlp-only at the
same budget, lr and alpha, and the allocator's defaults) are enqueued first, once per study, and are never
pruned; the last trial slot scores uniform at the winner's settings (:mod:`allocator.tuning.attribution`). The
search and its reasons: ``docs/tuning.md``. With :mod:`allocator.tuning.storage`, the only module that imports
Optuna.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

import probes
from allocator.api import (
    DataSource,
    check_source,
    library_versions,
    load_or_check_model,
    model_commit,
    read_chat_template,
    resolve_model_ref,
    settings_or_default,
    template_record,
    tokenizer_for,
    uniform_rank,
    unprobed_experts_off,
    warmup_for,
)
from allocator.discovery.components import architecture_of, find_components
from allocator.errors import AllocatorError, InputError, as_failure, as_input_error
from allocator.output.lora_init import check_init
from allocator.output.plan import Plan
from allocator.scoring.utility import UtilitySettings
from allocator.solver.settings import SolverSettings
from allocator.tuning import attribution
from allocator.tuning import storage as store
from allocator.tuning.folder import (
    LOCK_NAME,
    Claim,
    FileLock,
    check_out_dir,
    default_storage,
    prepare_out_dir,
    redact,
    write_record,
)
from allocator.tuning.objective import Objective, Pruned
from allocator.tuning.report import TuneResult, summarize, write_outputs
from allocator.tuning.search import Search
from allocator.tuning.settings import TuneSettings
from probes.errors import ProbeError, ProbeRunError
from probes.folders import FolderError, resolve_target
from probes.settings import DataSettings, ProbeSettings

log = logging.getLogger("allocator")

SIGNATURE_SKIPS = ("trials", "pruner", "heartbeat_interval", "grace_period", "max_retry")
LATER_DATA = {"encoding": "utf-8", "assistant_only_loss": False, "completion_only_loss": True}


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
    data_settings: DataSettings | None = None,
    probe_settings: ProbeSettings | None = None,
    utility_settings: UtilitySettings | None = None,
    solver_settings: SolverSettings | None = None,
    retention_data: DataSource | None = None,
    fused_kernels: bool = True,
    use_rslora: bool = False,
    init: str = "default",
    init_data: DataSource | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    objective: Callable[[Plan, Any], float] | None = None,
    revision: str | None = None,
    config: Mapping[str, Any] | None = None,
    chat_template: str | os.PathLike[str] | None = None,
) -> TuneResult:
    """Run (or join, or resume) the study ``study_name`` until it holds ``settings.trials`` finished trials.

    Args:
        model, data, retention_data, fused_kernels, trust_remote_code, tokenizer: as
            :func:`allocator.allocate`; ``data`` also gives the fine-tune's training sequences (a path,
            ``"builtin"`` or token batches).
        eval_data: data scored by the built-in fine-tune, in any form ``data`` takes (required unless
            ``objective`` is given).
        settings: study size, mode, fine-tune and search space (:class:`TuneSettings`).
        out_dir: probe cache, default storage ``sqlite:///OUT_DIR/study.db``, ``best/``, ``study.md``,
            ``study.png``. An existing ``out_dir`` of the same study is resumed; any other needs
            ``overwrite``.
        storage: any database URL Optuna's RDBStorage takes; workers given the same URL and ``study_name``
            share the study. The exact trial bound and the one probe run hold for workers sharing ``out_dir``.
        overwrite: start over: remove what tune wrote in ``out_dir`` and delete the study its record names.
        data_settings, probe_settings, utility_settings, solver_settings: base settings (parts a space leaves
            at ``""`` keep their value; the ``default`` baseline uses them).
        init: lora_A init of every trial's fine-tune, recorded in each plan: ``"default"`` (PEFT's),
            ``"eva"`` (EVA's top input principal directions at the trial's ranks) or ``"gradient"`` (the top
            right singular vectors of each module's calibration-loss gradient at its rank), computed on the
            calibration ``data`` by each worker as its trials need them (``allocator.output.lora_init``). With
            either the study picks the placement that does best under that init, and ``best/`` is a plan to
            apply with ``Plan.apply(model, init_data=...)``.
        init_data: the init's calibration data in any form ``data`` takes (default: ``data``'s calibration
            rows); both count only labelled tokens, so data whose labels mark few tokens (answers only) may
            need its own.
        objective: ``objective(plan, trial) -> float`` (minimised) replaces the built-in fine-tune; read
            ``trial.params["lr"]``; ``trial.report``/``should_prune`` work in single mode.
        revision, config, chat_template: as :func:`allocator.allocate` (the hub revision; the configuration
            recorded in every plan's provenance, which ``allocate tune`` passes; a Jinja chat template file).

    Raises:
        InputError: bad input, an out_dir holding another study, resumed with different settings.
        AllocatorError: a trial failed (the study stays resumable), or too many trials failed.
    """
    settings = settings_or_default(settings, TuneSettings, "settings")
    if not isinstance(study_name, str) or not study_name.strip():
        raise InputError(f"the study name {study_name!r} is empty; give one (--study-name NAME)")
    if objective is None and eval_data is None:
        raise InputError("the built-in fine-tune needs eval data; pass eval_data (--eval-data) or an "
                         "objective")
    init = check_init(init)
    if init_data is not None and init == "default":
        raise InputError("init_data is the lora_A init's calibration data; pass init='eva' or 'gradient' "
                         "(--init eva, --init gradient) with it, or drop it")
    data_settings = settings_or_default(data_settings, DataSettings, "data_settings")
    probe_settings = settings_or_default(probe_settings, ProbeSettings, "probe_settings")
    utility_settings = settings_or_default(utility_settings, UtilitySettings, "utility_settings")
    solver_settings = settings_or_default(solver_settings, SolverSettings, "solver_settings")
    template = read_chat_template(chat_template)
    for name, source in (("data", data), ("eval_data", eval_data), ("retention_data", retention_data),
                         ("init_data", init_data)):
        if source is not None:
            check_source(source, name, data_settings)
    with as_input_error(ProbeError):
        probes.check_device(probe_settings.device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with as_input_error(FolderError):
        out = resolve_target(out_dir)
    url = storage or default_storage(out)
    worker = Worker(settings, out, url, study_name, use_rslora, init)
    check_out_dir(out, study_name, url, overwrite)  # before any work
    worker.load(model, data, eval_data, retention_data, tokenizer, trust_remote_code, fused_kernels,
                (data_settings, probe_settings, utility_settings, solver_settings), init_data, objective,
                (revision, config, template))
    # once every input has been read
    worker.open_folder(explicit_storage=storage is not None, overwrite=overwrite)
    try:
        with worker.lock:
            worker.probe(data, retention_data, init_data)
            study = worker.open_study()
            worker.enqueue_baselines(study)
        worker.run_trials(study)
        with worker.lock:
            result = summarize(
                study,
                worker.objective.plan_for_params,
                storage=redact(url),
                mode=settings.mode,
                probe_seconds=worker.probe_seconds,
                importances=lambda rows, params: store.importances(study, rows, params),
                training=worker.training,
            )
            return write_outputs(result, out)
    except store.STORAGE_ERRORS as exc:  # the database failed mid-study
        raise store.storage_error(url, exc) from None


class Worker:
    """One worker's share of a study: the folder, the model and data, the probe reports and the trial loop."""

    def __init__(
        self,
        settings: TuneSettings,
        out: Path,
        url: str,
        study_name: str,
        use_rslora: bool,
        init: str = "default",
    ) -> None:
        self.settings, self.out, self.url, self.study_name = settings, out, url, study_name
        self.use_rslora, self.init = use_rslora, init
        self.lock, self.probe_seconds = FileLock(out / LOCK_NAME), 0.0
        self.storage: store.Storage | None = None

    def open_folder(self, *, explicit_storage: bool, overwrite: bool) -> None:
        """Prepare (re-checked under the lock) and mark the study folder; a given --storage is opened first,
        so a wrong one leaves no record. A folder this call created is removed again if that fails."""
        created = not self.out.exists()
        try:
            with self.lock:
                for line in prepare_out_dir(
                    self.out, self.study_name, self.url, overwrite, store.delete_study
                ):
                    log.warning("overwrite: %s", line)
                if explicit_storage:
                    self.connect()
                write_record(self.out, self.study_name, self.url)
        except BaseException:
            if created and self.out.is_dir() and {p.name for p in self.out.iterdir()} <= {LOCK_NAME}:
                shutil.rmtree(self.out, ignore_errors=True)  # leave no trace of a run that never began
            raise

    def connect(self) -> None:
        """The storage, and the claim lock: this folder's file lock, then the database server's lock, so
        that workers on other machines (with other folders) claim one trial at a time too."""
        s = self.settings
        self.storage = store.Storage(self.url, heartbeat_interval=s.heartbeat_interval,
                                     grace_period=s.grace_period, max_retry=s.max_retry)
        self.server_lock = store.ServerLock(self.storage.rdb.engine, self.study_name)
        self.claim = Claim(self.lock, self.server_lock)

    def load(
        self,
        model: Any,
        data: Any,
        eval_data: Any,
        retention_data: Any,
        tokenizer: Any,
        trust_remote_code: bool,
        fused_kernels: bool,
        base: tuple,
        init_data: Any,
        objective: Callable[[Plan, Any], float] | None,
        hub: tuple[str | None, Mapping[str, Any] | None, str | None] = (None, None, None),
    ) -> None:
        """Model, components and fine-tune batches; the base settings and the study's signature. No probes
        yet."""
        s = self.settings
        self.data_settings, self.probe_settings, self.utility, self.solver = base
        self.user_objective = objective
        revision, config, template = hub  # the hub revision, the config to record, a chat template's text
        self.model, self.model_id = load_or_check_model(model, trust_remote_code, revision)
        self.tokenizer = tokenizer_for(self.model_id, trust_remote_code, revision, tokenizer, template)
        self.components = tuple(
            unprobed_experts_off(c) for c in find_components(self.model, fused_kernels=fused_kernels)
        )
        self.eligible = [c for c in self.components if c.eligible]
        if not self.eligible:
            raise AllocatorError(f"no adaptable modules found in {self.model_id}; see `allocate inspect`")
        self.train, self.evals, self.training = (), (), {}
        if objective is None:
            self.training = dict(steps=s.steps, batch_size=s.batch_size, seq_len=self.data_settings.seq_len)
            self.train = tuple(self._batches(data, s.train_samples, s.batch_size, s.seed))
            self.evals = tuple(self._batches(eval_data, s.eval_samples, s.batch_size, s.seed))
        fmt = self.data_settings.record_format()
        self.signature = _jsonable(
            {
                "settings": {k: v for k, v in s.to_dict().items() if k not in SIGNATURE_SKIPS},
                "model": _where(self.model_id),
                "data": _where(data, fmt),
                "eval_data": _where(eval_data, fmt),
                "retention_data": _where(retention_data, fmt),
                "objective": "finetune" if objective is None else getattr(objective, "__name__", "custom"),
                "data_settings": {
                    k: v
                    for k, v in dataclasses.asdict(self.data_settings).items()
                    if k not in LATER_DATA or v != LATER_DATA[k]
                },  # fields added later are left out at their defaults, so studies begun before them resume
                "probe_settings": self.probe_settings.result_key(),
                "utility_settings": self.utility.to_dict(),
                "solver_settings": self.solver.to_dict(),
                "fused_kernels": fused_kernels,
                "use_rslora": self.use_rslora,
                **({"init": self.init, "init_data": _where(init_data, fmt)} if self.init != "default"
                   else {}),
                **template_record(template),  # init and template keys absent by default: older studies resume
            }
        )
        self.provenance = {
            "model_id": self.model_id,
            "model_revision": model_commit(self.model, self.model_id, revision,
                                           from_ref=isinstance(resolve_model_ref(model), str)),
            "data": self.signature["data"],
            "retention_data": self.signature["retention_data"],
            "data_settings": self.signature["data_settings"],
            "probe_settings": self.probe_settings.to_dict(),
            "fused_kernels": fused_kernels,
            "versions": library_versions(),
            **template_record(template),
            **({"config": dict(config)} if config is not None else {}),
        }

    def _batches(self, source: Any, samples: int, batch_size: int, seed: int) -> list:
        d = self.data_settings
        with as_input_error(ProbeError):
            kwargs = {**dataclasses.asdict(d), "samples": samples, "batch_size": batch_size, "seed": seed}
            batches = list(probes.load_batches(source, self.tokenizer, **kwargs))
            probes.check_token_ids(self.model, batches)
        return batches

    def probe(self, data: Any, retention_data: Any, init_data: Any = None) -> None:
        """Probe reports from ``OUT_DIR/probes`` (run once per study; the caller holds the lock), then the
        trial objective and the up-front feasibility check."""
        started, d = time.perf_counter(), self.data_settings
        names = [c.name for c in self.eligible]
        meta = {"model_id": self.model_id, "model_revision": self.provenance["model_revision"]}

        def report(batches: list, warmup: Any = None) -> Any:
            with as_input_error(ProbeError), as_failure(ProbeRunError):
                return probes.run_cached(self.model, batches, names, self.probe_settings,
                                         cache_dir=self.out / "probes", key_meta=meta, warmup=warmup)

        def calibration(source: Any) -> list:
            return self._batches(source, d.samples, d.batch_size, d.seed)

        batches = calibration(data)
        n_base, budget = sum(p.numel() for p in self.model.parameters()), self.settings.spaces["budget"]
        spec = budget.base if budget.base is not None else budget.values[0]  # warm up at its uniform rank
        rank, c = uniform_rank(self.components, spec.resolve(self.components, n_base)), self.components
        main = report(batches, warmup_for(data, self.tokenizer, c, rank, d, self.probe_settings))
        init_rows = [] if self.init == "default" else batches if init_data is None else calibration(init_data)
        risk = None if retention_data is None else report(calibration(retention_data))
        self.provenance["data_hash"] = main.meta.get("data_fingerprint")
        self.probe_seconds = time.perf_counter() - started
        families = sorted({c.family for c in self.eligible if c.name in main.modules})
        search = Search(
            self.settings,
            self.utility,
            self.solver,
            families,
            lambda b: b.resolve(self.components, n_base),
            risk is not None,
        )
        self.objective = Objective(
            settings=self.settings,
            study_name=self.study_name,
            model=self.model,
            model_id=self.model_id,
            components=self.components,
            architecture=architecture_of(self.model),
            report=main,
            risk=risk,
            search=search,
            provenance=self.provenance,
            use_rslora=self.use_rslora,
            init=self.init,
            train=self.train,
            evals=self.evals,
            calibration=init_rows,
            user_objective=self.user_objective,
        )
        self.objective.check_feasible()

    def open_study(self) -> optuna.Study:
        """The study, created or loaded (the default sqlite file only now, once the inputs are read)."""
        if self.storage is None:
            self.connect()
        s, single = self.settings, self.settings.mode == "single"
        n_enqueued = len(s.baselines)
        sampler = store.Sampler(s.seed, store.n_random_trials(s.trials, n_enqueued))
        return self.storage.open_study(
            self.study_name,
            sampler=sampler,
            pruner=store.pruner(s, n_enqueued),
            n_objectives=1 if single else 2,
            signature=self.signature,
        )

    def enqueue_baselines(self, study: optuna.Study) -> None:
        """Enqueue each baseline unless a trial of it exists that did not fail (the caller holds the folder's
        lock; the server's is taken here, so workers on other machines enqueue none twice)."""
        with self.server_lock:
            seen = store.baselines_seen(study)
            for name in self.settings.baselines:
                params = self.objective.baseline_params(name)
                if name not in seen and params is not None:
                    study.enqueue_trial(params, user_attrs={"baseline": name})

    def _trial(self, trial: optuna.Trial) -> float | tuple[float, float]:
        """One trial (it releases the claim locks first); a :class:`Pruned` trial is Optuna's
        ``TrialPruned``."""
        self.claim.release()
        try:
            return self.objective(trial)
        except Pruned as exc:
            raise optuna.TrialPruned(str(exc)) from None

    def run_trials(self, study: optuna.Study) -> None:
        """Claim and run trials until the study holds ``trials`` finished ones (COMPLETE + PRUNED).

        The count and the claim (Optuna's ``ask``) happen under the claim locks (the folder's, and on a
        server database the server's), so workers never overshoot, as ``MaxTrialsCallback`` alone can by one
        trial per worker. While the trials running elsewhere would complete the study, this worker waits: one
        of them may belong to a killed worker, and goes stale after ``grace_period``, is failed and
        re-enqueued (``RetryHeartbeatStaleTrialCallback``), and is run here. The last slot waits for every
        other trial, then scores uniform at the winner's settings when the study lacks that
        (:mod:`allocator.tuning.attribution`).
        """
        n, unbeating = self.settings.trials, {}
        while True:
            with self.claim:
                self.storage.fail_stale(study, unbeating)
                counts = store.trial_counts(study)
                done = counts["complete"] + counts["pruned"]
                if done >= n:
                    return
                if counts["fail"] > n + self.settings.max_retry * n:
                    raise AllocatorError(
                        f"more trials of study {self.study_name!r} failed than it asks "
                        "for; see the failures in the storage (optuna-dashboard) and fix "
                        "their cause"
                    )
                free = n - done - counts["running"]
                last = free == 1 and not counts["waiting"]
                if free > 0 and not (last and counts["running"]):  # the last slot waits for a final winner
                    if last:
                        attribution.enqueue_if_wanted(study, self.objective.uniform_fits)
                    study.optimize(self._trial, n_trials=1)  # _trial releases the locks once claimed
                    continue
            time.sleep(min(store.IDLE_POLL_S, self.settings.heartbeat_interval))


def _where(ref: Any, fmt: Any = None) -> str | None:
    """A data or model reference as the study records it: local paths absolute, token batches by count and
    fingerprint (``probes.describe_source``), anything else as given."""
    if ref is None:
        return None
    if probes.source_kind(ref, fmt) not in ("path", "builtin"):
        return probes.describe_source(ref, fmt)
    return str(Path(ref).resolve()) if Path(str(ref)).exists() else str(ref)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
