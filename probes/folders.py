"""The one safe writer of output folders: atomic, marked as ours, and never removing what the tool did not
write.

Every folder the project writes (a plan, a tune study's ``best/`` and ``pareto/``, a cached probe report, a
benchmark's results) goes through :func:`write_folder`; single files (reports beside other files) through
:func:`write_file`. The rules, as ``git clean`` keeps them, the tool removes only what it wrote:

- A folder the tool wrote holds a manifest, ``.allocator-files.json``, listing every file it wrote there. A
  folder counts as *ours* when it holds that manifest, or (written before the manifest existed) when it holds
  exactly one of the file sets the caller names as ``legacy`` and nothing else.
- A new or empty folder is written. A non-empty one needs ``overwrite``, and then it must be ours: the files
  the manifest lists are replaced or removed, anything else in it is kept. A folder that is not ours is
  refused, naming what is in it. ``""``, ``/``, the home folder and symbolic links are refused as targets of
  an overwrite (a link is never followed to delete); the current folder only when it is ours.
- Files are written to a temporary sibling ``.NAME.tmp-PID-XXXX`` first, then moved into place: a folder that
  held only our files is swapped whole (one rename), otherwise file by file (each rename atomic). A temporary
  sibling left by a killed run (its process gone) is removed by the next write to the same folder.
- New folders get the permissions the umask allows (``tempfile.mkdtemp`` alone would make them 0700).

It lives in ``probes`` because ``probes`` is the lowest layer: ``allocator`` imports it from here, and
``probes`` (the probe cache) may use it without importing ``allocator``. Errors are :class:`FolderError` (a
``ValueError``); ``allocator`` turns them into its ``InputError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

MANIFEST = ".allocator-files.json"
TOOL = "hybrid-lora-allocator"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+(?:\.[A-Za-z0-9]+)?$")
_TMP_MARK = ".allocator-tmp"  # inside every temporary folder of ours, so cleanup never touches anyone else's
_UMASK_LOCK = threading.Lock()


class FolderError(ValueError):
    """An output folder cannot be written as asked; the message names the folder and the fix."""


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in folder.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _files_under(folder: Path) -> list[str]:
    """Relative paths of the regular files below ``folder`` (links are not followed), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files
                if not (rel == Path(".") and f == MANIFEST) and not (Path(root) / f).is_symlink()]
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
    return sorted(out)


def _entries_under(folder: Path) -> list[str]:
    """Relative paths of everything below ``folder`` but folders: files, links (not followed) and the like."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files if not (rel == Path(".") and f == MANIFEST)]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
    return out


def read_manifest(folder: Path) -> list[str] | None:
    """The files the tool wrote in ``folder`` by its manifest, or None when it has no (readable) manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("tool") == TOOL else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return [f for f in files if _inside(f)]


def _inside(rel: str) -> bool:
    """A manifest entry that names a path inside the folder (no absolute path, no '..')."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def owned_files(folder: Path, legacy: Iterable[Collection[str]] = ()) -> list[str] | None:
    """What the tool wrote in ``folder`` (relative paths), or None when the folder is not ours (see module
    doc)."""
    listed = read_manifest(folder)
    if listed is not None:
        return listed
    present = {p.name for p in folder.iterdir()}
    for files in legacy:
        plain = all((folder / f).is_file() and not (folder / f).is_symlink() for f in files)
        if present == set(files) and plain:
            return sorted(files)
    return None


def resolve_target(target: str | os.PathLike[str], *, flag: str = "-o") -> Path:
    """The absolute folder path of ``target``, its last part not resolved (a link there is seen, not
    followed)."""
    text = os.fspath(target)
    if not str(text).strip():
        raise FolderError(f"{flag} is empty; give a folder name such as {flag} plans/run1")
    path = Path(text).expanduser()
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def check_target(
    target: str | os.PathLike[str],
    *,
    overwrite: bool,
    legacy: Iterable[Collection[str]] = (),
    flag: str = "-o",
    overwrite_flag: str = "--overwrite",
) -> Path:
    """Fail now, before any work, if ``target`` cannot be written as asked; return its absolute path.

    Raises:
        FolderError: the target is a file or a link, a non-empty folder without ``overwrite``, a folder the
            tool did not write (with ``overwrite``), ``/``, the home folder, or the current folder without our
            mark.
    """
    out = resolve_target(target, flag=flag)
    if out.is_symlink():
        raise FolderError(
            f"{flag} {out} is a symbolic link (to {os.path.realpath(out)}); give the folder "
            f"itself or another {flag}: a link is never followed to write or delete"
        )
    if out.exists() and not out.is_dir():
        raise FolderError(f"{flag} {out} exists and is not a folder; choose another {flag}")
    if out.is_dir() and any(out.iterdir()):
        ours = owned_files(out, legacy) is not None
        if not overwrite:
            hint = (
                f"pass {overwrite_flag} to replace what this tool wrote there"
                if ours
                else "it holds files this tool did not write; choose a new or empty folder"
            )
            raise FolderError(
                f"output folder {out} already exists ({_listing(out)}); {hint}, or choose another {flag}"
            )
        if out == Path(out.anchor) or out == Path.home().resolve():
            raise FolderError(
                f"refusing {overwrite_flag} on {out} (the "
                f"{'root' if out == Path(out.anchor) else 'home'} folder); choose a dedicated "
                f"{flag} folder"
            )
        if not ours:
            where = " (the current folder)" if out == Path.cwd().resolve() else ""
            raise FolderError(
                f"{overwrite_flag} refused: {out}{where} holds files this tool did not write "
                f"({_listing(out)}); it removes only what it wrote, so choose a new or empty "
                f"{flag}"
            )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FolderError(f"{parent} is a file, so {out} cannot be created; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FolderError(f"cannot write to {parent}; choose a {flag} in a writable folder")
    return out


def clean_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Remove temporary siblings ``.NAME.tmp-PID-*`` of ours whose process is gone (a killed run); return
    them."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _TMP.match(entry.name)
        if not match or match["name"] != name or entry.is_symlink() or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and (entry / _TMP_MARK).is_file():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and ".tmp-" in entry.name:  # a single file of write_file's
            entry.unlink()
        else:
            continue
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _temporary(parent: Path, name: str, kind: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    (tmp / _TMP_MARK).touch()
    return tmp


def write_folder(
    target: str | os.PathLike[str],
    fill: Callable[[Path], object],
    *,
    overwrite: bool = False,
    legacy: Iterable[Collection[str]] = (),
    flag: str = "-o",
    overwrite_flag: str = "--overwrite",
) -> Path:
    """Write a folder: ``fill(tmp)`` writes the files into a fresh temporary folder, which then takes
    ``target``'s place as the module docstring describes. Returns the absolute path written.

    Args:
        target: the folder; created with its parents.
        fill: writes every file of the folder into the path it is given (subfolders allowed, no links).
        overwrite: replace what the tool wrote in an existing folder of ours (foreign files are kept).
        legacy: file sets that mark a folder written before manifests existed (e.g. the plan files).
        flag, overwrite_flag: how the caller's user names the target and the overwrite in messages.

    Raises:
        FolderError: see :func:`check_target`; also when a new file would replace something the tool did not
            write. Nothing in ``target`` changes then.
    """
    out = check_target(target, overwrite=overwrite, legacy=legacy, flag=flag, overwrite_flag=overwrite_flag)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in made:
        os.chmod(folder, 0o777 & ~_umask())
    clean_stale_temporaries(out.parent, out.name)
    tmp = _temporary(out.parent, out.name, "tmp")
    try:
        fill(tmp)
        (tmp / _TMP_MARK).unlink()
        files = _files_under(tmp)
        _write_json(tmp / MANIFEST, {"tool": TOOL, "files": files})
        if not out.exists():
            os.replace(tmp, out)  # one rename: the folder appears whole
        elif (
            set(_entries_under(out)) <= set(old := owned_files(out, legacy) or [])
            and out != Path.cwd().resolve()
        ):
            _swap(tmp, out)
        else:  # files of the user's stay, and so does the folder itself (the current folder keeps its inode)
            _merge(tmp, out, files, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only the empty parents this call created
        raise
    return out


def _swap(new: Path, out: Path) -> None:
    """``out`` holds nothing but our files: replace it whole (two renames); the old one goes afterwards."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    (old / _TMP_MARK).touch()  # a run killed before the rmtree below leaves it for the next run to clean
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _merge(new: Path, out: Path, files: list[str], old: list[str]) -> None:
    """Move our files into ``out`` one by one (each rename atomic), remove our stale ones, keep everything
    else."""
    ours = set(old)
    for rel in files:
        dest = out / rel
        if (dest.exists() or dest.is_symlink()) and (rel not in ours or dest.is_symlink() or dest.is_dir()):
            raise FolderError(f"{dest} exists and was not written by this tool; move it away and run again")
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / rel, out / rel)
    for rel in sorted(ours - set(files), reverse=True):
        path = out / rel
        if path.is_file() and not path.is_symlink():
            path.unlink()
        with contextlib.suppress(OSError):  # a subfolder of ours left empty
            path.parent.rmdir() if path.parent != out else None
    os.replace(new / MANIFEST, out / MANIFEST)
    shutil.rmtree(new, ignore_errors=True)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_file(path: str | os.PathLike[str], data: str | bytes | Callable[[Path], object]) -> Path:
    """Write one file atomically: to a temporary sibling, then renamed over ``path`` (never half-written).

    ``data`` is the text (UTF-8), the bytes, or a function that writes the file at the path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent, path.name)
    # the suffix stays last: writers such as matplotlib's savefig pick the format from it
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
