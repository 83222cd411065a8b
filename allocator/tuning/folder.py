"""The study folder of `allocate tune`: one study per folder, its record, and the lock its workers share.

``OUT_DIR/tune.json`` (the record) names the study and its storage (``"default"``: this folder's ``study.db``,
so a moved folder resumes); ``OUT_DIR/.tune.lock`` is the file lock workers sharing the folder serialise on.
:func:`check_out_dir` refuses, without side effects, a folder that holds anything else;
:func:`prepare_out_dir` implements ``--overwrite``: it removes only what tune writes there and deletes only
the study its record names.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from allocator.errors import InputError
from probes.folders import write_file

MARKER, LOCK_NAME = "tune.json", ".tune.lock"


class FileLock:
    """An exclusive lock on a file (``fcntl.flock``; a no-op where fcntl is missing, e.g. Windows).

    ``release`` may be called when not held: a trial releases the claim its worker made before the trial
    began.
    """

    def __init__(self, path: Path) -> None:
        self.path, self._fd = path, None

    def acquire(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except ImportError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Claim:
    """Several locks taken in order and released in reverse (the folder's, then the server's)."""

    def __init__(self, *locks: Any) -> None:
        self.locks = locks

    def acquire(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def redact(url: str) -> str:
    """A database URL with its password hidden."""
    try:

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: RDBStorage will say so
        return url


DEFAULT_STORAGE = "default"  # the record's name for sqlite:///OUT_DIR/study.db: a moved folder still resumes
# what `allocate tune` writes in its folder; --overwrite removes these and nothing else
TUNE_ENTRIES = frozenset(
    {
        MARKER,
        LOCK_NAME,
        "study.db",
        "study.db-wal",
        "study.db-shm",
        "study.db-journal",
        "probes",
        "best",
        "pareto",
        "study.md",
        "study.png",
        "study.json",
    }
)
_SETUP_ENTRIES = frozenset({LOCK_NAME, "study.db", "study.db-wal", "study.db-shm", "study.db-journal"})


def default_storage(out: Path) -> str:
    return f"sqlite:///{out / 'study.db'}"


def read_record(out: Path) -> dict[str, str] | None:
    """The folder's record (``tune.json``: study name and storage), or None when it has none (or an unreadable
    one)."""
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("study"), str)
        or not isinstance(data.get("storage"), str)
    ):
        return None
    storage = data["storage"]
    # an older record: its own folder's db
    if storage.startswith("sqlite:///") and storage.endswith("/study.db"):
        storage = DEFAULT_STORAGE
    return {"study": data["study"], "storage": storage}


def _record_of(out: Path, study_name: str, url: str) -> dict[str, str]:
    return {"study": study_name, "storage": DEFAULT_STORAGE if url == default_storage(out) else redact(url)}


def check_out_dir(out: Path, study_name: str, url: str, overwrite: bool) -> None:
    """Refuse, without side effects, a folder that holds anything but this study (``overwrite``: anything but
    a study of this tool's), a file, or a link."""
    if out.is_symlink():
        raise InputError(
            f"-o {out} is a symbolic link (to {os.path.realpath(out)}); give the folder "
            "itself: a link is never followed to write or delete"
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder; choose another -o")
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if entries <= _SETUP_ENTRIES:  # empty, or a first run that stopped before its record was written
        return
    record = read_record(out)
    if record is None:
        raise InputError(
            f"output folder {out} holds no tune study but files this tool did not write "
            f"({', '.join(sorted(entries)[:5])}{'...' if len(entries) > 5 else ''}); choose a "
            "new or empty -o"
        )
    if overwrite:
        if out == Path(out.anchor) or out == Path.home().resolve():
            raise InputError(f"refusing --overwrite on {out}; choose a dedicated -o folder")
        return
    mine = _record_of(out, study_name, url)
    if record != mine:
        where = "this folder's study.db" if record["storage"] == DEFAULT_STORAGE else record["storage"]
        raise InputError(
            f"{out} holds study {record['study']!r} in {where}; pass that --study-name and "
            "--storage to resume it, --overwrite to start over, or choose another -o"
        )


def prepare_out_dir(
    out: Path, study_name: str, url: str, overwrite: bool, delete_study: Callable[[str, str], bool]
) -> list[str]:
    """Check again under the lock; ``overwrite`` removes what tune wrote in ``out`` (nothing else) and deletes
    the study that the folder's own record names from the storage it names (``delete_study(url, name)``).
    Returns what was done, for the user."""
    check_out_dir(out, study_name, url, overwrite)
    record = read_record(out)
    if not overwrite or record is None:
        return []
    done = []
    if record["storage"] != DEFAULT_STORAGE:
        if record["storage"] == redact(url):
            if delete_study(url, record["study"]):
                done.append(f"deleted study {record['study']!r} from {record['storage']}")
        else:
            done.append(
                f"study {record['study']!r} in {record['storage']} was NOT deleted (this run uses "
                "another storage); pass that --storage with --overwrite to delete it"
            )
    removed = []
    for name in sorted(TUNE_ENTRIES - {LOCK_NAME}):
        path = out / name
        if path.is_symlink() or not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(name)
    if removed:
        db = " (with the study it held)" if "study.db" in removed else ""
        done.append(f"removed {', '.join(removed)} from {out}{db}; other files there were kept")
    return done


def write_record(out: Path, study_name: str, url: str) -> None:
    """Mark ``out`` as this study's folder; written once the storage has opened (a wrong --storage leaves
    none)."""
    write_file(out / MARKER, json.dumps(_record_of(out, study_name, url), sort_keys=True) + "\n")
