"""The Optuna adapter of `allocate tune`: storage, study, sampler and pruner (with the worker, the only code
that imports Optuna).

Opening a database URL (sqlite by default, PostgreSQL and the like for many machines), creating or loading a
study and checking its signature, failing stale and orphaned trials so they are retried, deleting a study, and
the parameter importances. Errors come out as one line naming the fix (:func:`storage_error`). The trial loop
itself lives in :mod:`allocator.tuning.run`; everything else in the package is Optuna-free.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from allocator.errors import AllocatorError, InputError
from allocator.tuning.folder import redact
from allocator.tuning.settings import TuneSettings

SQLITE_TIMEOUT_S = 60  # a worker waits this long for another's write lock before sqlite reports "locked"
# The study's Optuna set-up, each number with its reason:
# the median pruner compares against at least this many finished trials (Optuna's default)
MEDIAN_MIN_STARTUP = 5
HALVING_FACTOR = 2  # successive halving keeps the best half of the trials at each eval step
MEDIAN_WARMUP_DIVISOR = 3  # no pruning in the first steps // 3: early eval losses rank runs poorly
TPE_MIN_RANDOM = 3  # TPE draws at least this many searched trials at random before it models the space...
TPE_RANDOM_SHARE = 3  # ...or a third of the searched trials, so small studies still explore
# a prime: per-trial sampler seeds seed * stride + number never collide across studies
SEED_STRIDE = 1_000_003
IDLE_POLL_S = 5.0  # how often a worker waiting on trials running elsewhere looks again (at most)
# may change on resume
MIN_IMPORTANCE_TRIALS = 8  # fANOVA on fewer completed searched trials says more about noise than parameters
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)

try:  # renamed in Optuna 4.9; the old name is a deprecated alias
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _Retry

    _RETRY_HOOK = "heartbeat_stale_trial_callback"
except ImportError:  # pragma: no cover - Optuna < 4.9
    from optuna.storages import RetryFailedTrialCallback as _Retry

    _RETRY_HOOK = "failed_trial_callback"


class Storage:
    """One worker's connection to the study database, with heartbeats and the retry of stale trials."""

    def __init__(self, url: str, *, heartbeat_interval: int, grace_period: int, max_retry: int) -> None:
        self.url, self.grace_period = url, grace_period
        sqlite = url.startswith("sqlite")
        if sqlite:
            check_sqlite_writable(url)
        try:
            # workers starting together on a fresh server database would race to create Optuna's tables
            # (PostgreSQL: duplicate key in pg_type); the server's lock lets one create them, then the rest
            engine = None if sqlite else sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            with warnings.catch_warnings(), ServerLock(engine, "schema"):
                # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # re-enqueues a stale trial's parameters, max_retry times
                self.retry = _Retry(max_retry=max_retry)
                self.rdb = RDBStorage(
                    url,
                    engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else None,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    **{_RETRY_HOOK: self.retry},
                )
            if engine is not None:
                engine.dispose()
            if sqlite:
                _fast_sqlite(self.rdb)
        except Exception as exc:  # SQLAlchemy: bad URL, missing driver, unreachable server, locked file
            raise storage_error(url, exc) from None

    def open_study(
        self, name: str, *, sampler: Any, pruner: Any, n_objectives: int, signature: Mapping[str, Any]
    ) -> optuna.Study:
        """Create or load study ``name``; refuse one started with another ``signature`` (naming the
        differences)."""
        try:
            study = optuna.create_study(
                storage=self.rdb,
                study_name=name,
                sampler=sampler,
                pruner=pruner,
                directions=["minimize"] * n_objectives,
                load_if_exists=True,
            )
            stored = study.user_attrs.get("tune")
            if stored is None:
                study.set_user_attr("tune", dict(signature))
        except Exception as exc:
            raise storage_error(self.url, exc) from None
        if stored is not None and stored != signature:
            keys = sorted(k for k in set(stored) | set(signature) if stored.get(k) != signature.get(k))
            differ = "; ".join(differences(stored, signature)[:4])
            raise InputError(
                f"study {name!r} was started with other {', '.join(keys)} ({differ}); pass the "
                "same settings to resume it, or --overwrite / another --study-name to start a new "
                "one"
            )
        return study

    def fail_stale(self, study: optuna.Study, first_seen: dict[int, float]) -> None:
        """Fail (so that they are retried) trials whose worker died: Optuna's stale heartbeats, and the
        orphans."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        self._fail_orphans(study, first_seen)

    def _fail_orphans(self, study: optuna.Study, first_seen: dict[int, float]) -> None:
        """Fail RUNNING trials that never recorded a heartbeat for ``grace_period`` of this worker's clock.

        A worker killed between claiming a trial (``ask``) and its first heartbeat leaves a trial that
        Optuna's ``fail_stale_trials`` never fails: it only ages heartbeats, and a trial without one is left
        alone (a user's ask-and-tell trial may legitimately have none). Every trial of this study runs with
        heartbeats, so one without any after the grace period is an orphan. ``first_seen`` (trial id -> when
        first seen so) keeps the clock this worker's own, so clock skew between hosts cannot fail a live
        trial.

        Optuna has no public call for "trials without a heartbeat", so this reads its schema (tables
        ``trials`` and ``trial_heartbeats``, Optuna 4-5) and sets the state through ``study._storage``: the
        one place either is done.
        """
        query = sqlalchemy.text(
            "SELECT trial_id FROM trials WHERE study_id = :study AND state = 'RUNNING' "
            "AND trial_id NOT IN (SELECT trial_id FROM trial_heartbeats)"
        )
        with self.rdb.engine.connect() as connection:
            orphans = {
                row[0]
                for row in connection.execute(
                    query, {"study": self.rdb.get_study_id_from_name(study.study_name)}
                )
            }
        now = time.monotonic()
        for trial_id in set(first_seen) - orphans:
            del first_seen[trial_id]
        for trial_id in orphans:
            if now - first_seen.setdefault(trial_id, now) <= self.grace_period:
                continue
            del first_seen[trial_id]
            try:
                if not study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:  # another worker failed it first
                continue
            self.retry(study, copy.deepcopy(study._storage.get_trial(trial_id)))


class ServerLock:
    """An exclusive lock held by the database server, so that workers on different machines (each with its
    own ``-o``) count and claim trials one at a time, as the folder's file lock makes workers on one machine
    do: PostgreSQL's session advisory lock (``pg_advisory_lock``), MySQL's ``GET_LOCK``; a no-op for sqlite,
    whose workers share a machine (and for ``engine=None``). Keyed by ``name``. Like ``FileLock``, ``release``
    may be called when not held; a lock is held on a connection of its own, unlocked before that connection
    goes back."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine, self.name, self._connection = engine, f"allocator-tune:{name}", None
        self.key = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "big", signed=True)
        dialect = engine.dialect.name if engine is not None else ""
        self._sql = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
                     "mysql": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)"),
                     "mariadb": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)")}.get(dialect)

    def acquire(self) -> None:
        if self._sql is None or self._connection is not None:
            return
        connection = self.engine.connect()
        connection.execute(sqlalchemy.text(self._sql[0]), {"key": self.key, "name": self.name})
        connection.commit()  # the lock is the session's: it outlives the transaction
        self._connection = connection

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(sqlalchemy.text(self._sql[1]), {"key": self.key, "name": self.name})
            connection.commit()
        except Exception:  # the server went away: the lock went with the session; never pool that session
            connection.invalidate()
        finally:
            connection.close()

    def __enter__(self) -> ServerLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """{"complete", "pruned", "fail", "running", "waiting"}: how many trials of the study are in each
    state."""
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    return {name: states.count(name) for name in ("complete", "pruned", "fail", "running", "waiting")}


def baselines_seen(study: optuna.Study) -> set[str]:
    """Names of the baselines enqueued already in a trial that did not fail."""
    return {
        t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL
    }


def delete_study(url: str, name: str) -> bool:
    """Delete study ``name`` from the storage at ``url``; False when there was none."""
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:  # no such study (a run that never started one)
        return False
    return True


def importances(
    study: optuna.Study, searched: Sequence[Any], params: Sequence[str]
) -> tuple[dict[str, float], str]:
    """Importances of ``params`` for the eval loss over the complete ``searched`` trials: fANOVA (seeded;
    needs scikit-learn), else PED-ANOVA (numpy/scipy only). The note names the method, or why there are
    none."""
    if len(searched) < MIN_IMPORTANCE_TRIALS:
        return (
            {},
            f"importances need {MIN_IMPORTANCE_TRIALS} complete searched trials; the study has "
            f"{len(searched)}",
        )
    if not params:
        return {}, "the searched trials share no parameter"
    note = ""
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("fANOVA", lambda: optuna.importance.FanovaImportanceEvaluator(seed=0)),
        ("PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator),
    ]
    for method, make in makers:
        try:
            values = optuna.importance.get_param_importances(
                study, evaluator=make(), params=list(params), target=lambda t: t.values[0]
            )
            return {k: float(v) for k, v in values.items()}, f"{method} over {len(searched)} searched trials"
        except Exception as exc:  # no scikit-learn, too little variation, ...: report, never fail the study
            first = str(exc).splitlines()[0] if str(exc) else ""
            note = f"importances unavailable ({type(exc).__name__}: {first})"
    return {}, note


def check_sqlite_writable(url: str) -> None:
    """A sqlite study file (or its folder) that cannot be written fails later inside Optuna with a misleading
    message ("invalid data in the commit"); say what it is now. An in-memory database is refused: its study
    would vanish with this process, so no other worker could join it and no run could resume it."""
    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    if path is None or str(path) in ("", ":memory:", "%3Amemory%3A") or url.rstrip("/") == "sqlite:":
        raise InputError(
            f"--storage {url} is an in-memory database: the study would vanish with this run; "
            "give a file (sqlite:///study.db), or leave --storage out for OUT_DIR/study.db"
        )
    parent = next((p for p in path.parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise InputError(
            f"--storage {url}: {parent} is a file, so the study database cannot be created "
            "there; choose another path"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise AllocatorError(
            f"the study database {path} is read-only; make it writable (chmod u+w) or "
            "choose another -o / --storage"
        )
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise AllocatorError(
            f"cannot create the study database in {parent} (read-only folder); choose another -o / --storage"
        )


_DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary]",
    "pymysql": "pymysql",
    "MySQLdb": "mysqlclient",
    "mysqldb": "mysqlclient",
}


def _default_driver(url: str) -> str:
    """The driver a URL names, or the one this SQLAlchemy picks for its dialect (postgresql:// is psycopg2
    before SQLAlchemy 2.1 and psycopg from 2.1 on)."""
    scheme = url.split("://", 1)[0]
    dialect, _, driver = scheme.partition("+")
    if driver:
        return driver
    try:
        return sqlalchemy.engine.make_url(url).get_dialect().driver
    except Exception:  # an unknown dialect: its name is all there is
        return dialect


def storage_error(url: str, exc: BaseException) -> AllocatorError:
    """The one-line error for a storage that did not open or answer, naming the cause and the fix."""
    cause = (
        exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ else exc
    )
    text = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    low = text.lower()
    if "database is locked" in low:
        return AllocatorError(
            f"the study database {redact(url)} is locked by another process for over "
            f"{SQLITE_TIMEOUT_S} s; wait for it or use a server database (--storage "
            "postgresql://...)"
        )
    if "readonly" in low or "read-only" in low:
        return AllocatorError(
            f"the study database {redact(url)} is read-only; make it writable or choose "
            "another -o / --storage"
        )
    driver = re.search(r"No module named '([\w.]+)'", str(cause))
    if driver or isinstance(cause, ImportError):  # Optuna re-raises a missing driver as a plain ImportError
        module = (driver[1] if driver else _default_driver(url)).split(".")[0]
        package = _DRIVER_PACKAGES.get(module, module)
        return InputError(
            f"the --storage URL {redact(url)} needs the Python package {package!r}: pip install '{package}'"
        )
    if any(s in low for s in ("could not parse", "argumenterror", "no such module", "can't load plugin")):
        return InputError(
            f"could not open storage {redact(url)} ({text}); pass a database URL Optuna "
            "takes, e.g. sqlite:///study.db or postgresql://user@host/db"
        )
    return AllocatorError(
        f"could not open or use storage {redact(url)} ({text}); check that the database is "
        "reachable and writable"
    )


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``['settings.steps: 60 (now 80)', ...]``: the leaves where two signatures differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path}: {old!r} (now {new!r})"]


def _fast_sqlite(storage: RDBStorage) -> None:
    """WAL journal, ``synchronous=NORMAL``: a commit stops waiting for fsync (17 ms -> 0.01 ms on the
    benchmark machine; a trial makes ~20). Still safe across processes of one host; only an OS crash can lose
    commits."""

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        except Exception:  # another process holds the file: keep its journal mode
            pass
        finally:
            cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect with the pragmas


def pruner(s: TuneSettings, n_enqueued: int) -> optuna.pruners.BasePruner:
    """Single mode: successive halving (a trial goes on past each eval step only while it is among the best
    ``1 / HALVING_FACTOR`` of the trials that reached it), the median, or Hyperband; the default and uniform
    baselines are never pruned (``PROTECTED_BASELINES``)."""
    if s.mode != "single" or s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=max(MEDIAN_MIN_STARTUP, n_enqueued),
            n_warmup_steps=s.steps // MEDIAN_WARMUP_DIVISOR,
        )
    if s.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, s.eval_every), reduction_factor=HALVING_FACTOR, min_early_stopping_rate=0
        )
    return optuna.pruners.HyperbandPruner(min_resource=max(1, s.eval_every), max_resource=s.steps)


def n_random_trials(trials: int, n_enqueued: int) -> int:
    """Trials TPE draws at random before it models the space (the baselines, then the searched share)."""
    return n_enqueued + max(TPE_MIN_RANDOM, (trials - n_enqueued) // TPE_RANDOM_SHARE)


class Sampler(optuna.samplers.BaseSampler):
    """TPE seeded by ``seed`` and the trial number, so workers never repeat each other's draws and a
    one-worker study is reproducible; ``placement`` is always ``solver`` unless the trial was enqueued (a
    baseline)."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed, self.n_startup_trials, self._tpe = seed, n_startup_trials, (-1, None)

    def _for(self, number: int) -> Any:
        if self._tpe[0] != number:
            self._tpe = (
                number,
                optuna.samplers.TPESampler(
                    seed=self.seed * SEED_STRIDE + number,
                    n_startup_trials=self.n_startup_trials,
                    constant_liar=True,
                ),
            )
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
