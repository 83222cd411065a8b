"""Hostile input, table-driven (issue 12): every row asserts the exit code (or the exact exception type), the
one line's key words, and that nothing but what the row expects the tool to write changed on disk.

Four tables: the ``allocate`` command, ``allocate inspect``, ``allocate tune`` and the Python API. CLI rows
run ``main(argv)`` in-process; the disk check hashes (sha256 of path + bytes, links recorded, never followed)
the test's tmp folder, the tiny model folder, the calibration file and any folder the row names, before and
after.

A row the product fails is kept, marked ``xfail(strict=True)`` with what the product does wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import torch

import allocator
from allocator.commands import EXIT_BUG, EXIT_INTERRUPTED, run_guarded
from allocator.commands import allocate as allocate_command
from allocator.commands.cli import main
from allocator.errors import InputError
from allocator.output.plan import ALLOCATION_FILE, PLAN_FILES, Plan
from probes.folders import MANIFEST
from probes.settings import DataSettings, ProbeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--data-samples", "4", "--data-seq-len", "32", "--data-batch-size", "2", "--quiet"]
TUNE_FAST = [
    *("--tune-trials", "2", "--tune-steps", "1", "--tune-eval-every", "0", "--tune-batch-size", "2"),
    *("--tune-train-samples", "4", "--tune-eval-samples", "2", "--tune-budget", "r4"),
    *("--tune-max-rank", "8,16", "--tune-baselines", "uniform"),
    *("--data-seq-len", "32", "--data-samples", "4", "--data-batch-size", "2", "--probe-max-rank", "8"),
    "--quiet",
]
PLAN_WRITES = ("out", "out/*")  # what a plan written to tmp/out may change
EXIT_CODE_LINES = (
    r"0 success",
    r"1 a run that failed",
    r"2 bad input",
    r"3 an unexpected error",
    r"130 interrupted",
)


# What the product does wrong, found by the rows below. Each: (the stages of the row that fail, what is
# observed). A row with ``bug=KEY`` is xfail(strict): it must fail in exactly those stages and pass every
# other one.
BUGS: dict[str, tuple[str, str]] = {}  # name -> (stages it fails, what the product does wrong); none open


# --- the disk check -----------------------------------------------------------------------------------------


def tree_digest(*roots: Path) -> dict[str, str]:
    """path -> sha256 of (path, bytes) for files, 'link -> target' for links, 'dir' for folders; no link
    followed."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if root.is_symlink() or not root.is_dir():
            out[str(root)] = _digest(root)
            continue
        out[str(root)] = "dir"
        for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is listed, not entered
            for name in dirs + files:
                path = Path(folder, name)
                out[str(path)] = _digest(path)
    return out


def _digest(path: Path) -> str:
    if path.is_symlink():
        return f"link -> {os.readlink(path)}"
    if path.is_dir():
        return "dir"
    if not path.exists():
        return "absent"
    return hashlib.sha256(str(path).encode() + b"\0" + path.read_bytes()).hexdigest()


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


# --- rows ---------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a row's setup and check see: the test's tmp folder, the shared inputs, and the folders to
    watch."""

    tmp: Path
    model: Path
    corpus: Path
    nan_model: Callable[[], Path]
    plan: Callable[[], Plan]
    capsys: Any
    monkeypatch: Any
    watch: list[Path] = field(default_factory=list)
    umask: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def alloc(self, *extra: Any, out: Any = None, data: Any = None, model: Any = None) -> list[str]:
        """argv of a fast `allocate` run on the tiny model into tmp/out (or ``out``)."""
        return [
            str(a)
            for a in (
                model or self.model,
                "--data",
                data or self.corpus,
                "-o",
                self.out if out is None else out,
                *FAST,
                *extra,
            )
        ]

    def tune(self, *extra: Any, out: Any = None, data: Any = None, eval_data: Any = None) -> list[str]:
        return [
            str(a)
            for a in (
                "tune",
                self.model,
                "--data",
                data or self.corpus,
                "--eval-data",
                eval_data or self.corpus,
                "-o",
                self.tmp / "study" if out is None else out,
                *TUNE_FAST,
                *extra,
            )
        ]

    def run(self, argv: list[str], expect: int = 0) -> None:
        """Run the CLI during a setup (its output discarded); it must exit ``expect``."""
        code = main([str(a) for a in argv])
        captured = self.capsys.readouterr()
        assert code == expect, (argv, captured.err[-2000:])

    def write(self, rel: str, data: str | bytes) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def foreign(self, rel: str) -> Path:
        """A folder of the user's: files the tool did not write."""
        self.write(f"{rel}/notes.txt", "my notes\n")
        self.write(f"{rel}/sub/data.csv", "a,b\n1,2\n")
        return self.tmp / rel


# --- issue 17: data forms and config files ------------------------------------------------------------------


def _no_datasets() -> str:
    return "" if _has_module("datasets") else "datasets is not installed (pip install datasets)"


def _dataset(rows: list[dict]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows)


def _dataset_folder(c: Ctx, rows: list[dict]) -> Path:
    folder = c.tmp / "ds"
    _dataset(rows).save_to_disk(str(folder))
    return folder


USER_ONLY = [{"role": "user", "content": "def f(x): return x"}]


def _reference() -> str:
    from allocator.reference import reference_model_path

    return str(reference_model_path())


def _config(c: Ctx, text: str, name: str = "plan.yaml") -> list[str]:
    return ["--config", str(c.write(name, text))]


@dataclass
class Row:
    """One hostile input. ``setup(ctx)`` prepares the disk and returns the argv (CLI) or a thunk (API);
    ``code`` the exit code (CLI) or ``exc`` the exact exception type (API); ``needle`` a case-insensitive
    regex the one ``error:`` line (or, for a success, stdout + stderr + warnings) must hold; ``writes``
    fnmatch patterns, relative to the tmp folder, of what the tool may change; ``check(ctx)`` anything more
    (``ctx.data["error"]`` holds the error line or the exception's message)."""

    setup: Callable[[Ctx], Any]
    code: int | None = None
    needle: str | None = None
    writes: tuple[str, ...] = ()
    check: Callable[[Ctx], None] | None = None
    exc: type[BaseException] | None = InputError
    # API rows: a model the call must leave exactly as it was
    model: Callable[[], torch.nn.Module] | None = None
    skip_if: Callable[[], str] | None = None  # returns the reason to skip, or ""
    fails: tuple[str, ...] = ()  # xfail rows: the stages the product fails (see Verdict)


def row(id: str, setup, code=None, needle=None, *, bug: str | None = None, **kw) -> Any:  # noqa: A002
    """A table row; ``bug`` names an entry of BUGS: the row is then xfail(strict) on exactly the stages it
    names (CLI: traceback code lines message disk check; API: type lines message model disk check)."""
    fails, reason = BUGS[bug] if bug else ("", "")
    marks = [pytest.mark.xfail(strict=True, raises=ExpectedFailure, reason=f"{bug}: {reason}")] if bug else []
    return pytest.param(Row(setup, code, needle, fails=tuple(fails.split()), **kw), id=id, marks=marks)


def _cli(argv_or_call: Any) -> tuple[int, list[str]]:
    """(exit code, warnings) of one in-process CLI run: an argv for ``main``, or a thunk returning the
    code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = argv_or_call() if callable(argv_or_call) else main([str(a) for a in argv_or_call])
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code
    return code, [f"{w.category.__name__}: {w.message}" for w in caught]


class ExpectedFailure(AssertionError):
    """The stages an xfail row names failed, and only those (see :class:`Verdict`)."""


class Verdict:
    """Every stage of a row is checked, and all failures reported together. A row marked xfail names the
    stages the product fails (``fails``); its xfail accepts only :class:`ExpectedFailure`, raised when exactly
    those stages fail. Any other stage failing is a plain AssertionError, a real failure even on an xfail
    row."""

    def __init__(self, r: Row) -> None:
        self.r, self.failed = r, {}

    def expect(self, stage: str, ok: Any, detail: Any) -> bool:
        if not ok:
            self.failed.setdefault(stage, detail)
        return bool(ok)

    def run(self, stage: str, check: Callable[[], Any]) -> None:
        try:
            check()
        except Exception as exc:  # an assert in a check, or an error reading what the run left
            self.failed.setdefault(stage, f"{type(exc).__name__}: {exc}")

    def finish(self) -> None:
        report = "\n".join(f"[{stage}] {str(detail)[:3000]}" for stage, detail in self.failed.items())
        if set(self.failed) == set(self.r.fails) and self.failed:
            raise ExpectedFailure(report)
        if self.failed or self.r.fails:
            unexpected = sorted(set(self.failed) - set(self.r.fails))
            fixed = sorted(set(self.r.fails) - set(self.failed))
            raise AssertionError(
                f"stages failing unexpectedly: {unexpected}; named by the xfail but "
                f"passing now (update the row): {fixed}\n{report}"
            )


def _check_cli(r: Row, ctx: Ctx, capsys, monkeypatch) -> None:
    if r.skip_if is not None and r.skip_if():
        pytest.skip(r.skip_if())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ALLOCATE_DEBUG", raising=False)
    argv = r.setup(ctx)
    capsys.readouterr()  # what the setup printed
    roots = [ctx.tmp, ctx.model, ctx.corpus, *ctx.watch]
    before = tree_digest(*roots)
    old_umask = os.umask(ctx.umask) if ctx.umask is not None else None
    try:
        code, caught = _cli(argv)
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    v = Verdict(r)
    v.expect("traceback", "Traceback" not in err + out, err[-3000:])
    v.expect("code", code == r.code, f"exit {code}, expected {r.code}: {errors or err[-2000:]}")
    if r.code in (0, EXIT_INTERRUPTED):
        v.expect("lines", errors == [], errors)
        if r.needle:
            v.expect(
                "message",
                re.search(r.needle, "\n".join([out, err, *caught]), re.I),
                (r.needle, out[-2000:], err[-2000:], caught),
            )
    elif v.expect("lines", len(errors) == 1, f"{len(errors)} error lines: {err[-3000:]}"):
        ctx.data["error"] = errors[0]
        v.expect("message", r.needle and re.search(r.needle, errors[0], re.I), (r.needle, errors[0]))
    _check_disk(v, ctx, before, roots)
    v.finish()


def _check_disk(v: Verdict, ctx: Ctx, before: dict[str, str], roots: list[Path]) -> None:
    after = tree_digest(*roots)
    unexpected = []
    for path in sorted(changed(before, after)):
        try:
            rel = Path(path).relative_to(ctx.tmp).as_posix()
        except ValueError:
            rel = None
        if rel is None or not any(fnmatch(rel, pattern) for pattern in v.r.writes):
            unexpected.append(f"{path}: {before.get(path, 'absent')} -> {after.get(path, 'absent')}")
    v.expect("disk", not unexpected, "changed beyond what the row expects:\n" + "\n".join(unexpected))
    if v.r.check is not None:
        v.run("check", lambda: v.r.check(ctx))


@pytest.fixture(scope="session")
def nan_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny qwen3_5 model with every weight NaN: every batch's loss is NaN."""
    from tiny_models import build

    folder = tmp_path_factory.mktemp("nan-model")
    model = build("qwen3_5")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_plan(saved_tiny_model, corpus_file):
    return allocator.allocate(
        str(saved_tiny_model("qwen3_5")),
        data=str(corpus_file),
        budget="r8",
        data_settings=DataSettings(seq_len=32, samples=4, batch_size=2),
        probe_settings=ProbeSettings(progress=False),
    )


@pytest.fixture()
def ctx(tmp_path, saved_tiny_model, corpus_file, request, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written relative to the current folder lands in the hashed tmp folder
    return Ctx(
        tmp=tmp_path,
        model=saved_tiny_model("qwen3_5"),
        corpus=corpus_file,
        nan_model=lambda: request.getfixturevalue("nan_model_dir"),
        plan=lambda: request.getfixturevalue("tiny_plan"),
        capsys=capsys,
        monkeypatch=monkeypatch,
    )


# --- setups and checks shared by rows -----------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _symlink_to_foreign(c: Ctx, *extra: str, tune: bool = False) -> list[str]:
    victim = c.tmp.parent / f"{c.tmp.name}-victim"  # outside the tmp folder: watched on its own
    shutil.rmtree(victim, ignore_errors=True)
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work\n")
    (victim / "figures").mkdir()
    (victim / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4 not really\n")
    c.watch.append(victim)
    link = c.tmp / "link"
    link.symlink_to(victim, target_is_directory=True)
    return c.tune(*extra, out=link) if tune else c.alloc(*extra, out=link)


def _plan_then_user_file(c: Ctx) -> list[str]:
    c.run(c.alloc("--budget", "r8"))
    c.write("out/mine.txt", "keep me\n")
    c.write("out/sub/also-mine.txt", "keep me too\n")
    c.data["old"] = json.loads((c.out / ALLOCATION_FILE).read_text())
    return c.alloc("--overwrite", "--budget", "r4")


def _check_replaced_and_kept(c: Ctx) -> None:
    new = json.loads((c.out / ALLOCATION_FILE).read_text())
    assert new["budget"] < c.data["old"]["budget"]  # the plan was replaced (r4 < r8)...
    # ...the user's files kept (the hash check says so too)
    assert (c.out / "mine.txt").read_text() == "keep me\n"
    assert (c.out / "sub" / "also-mine.txt").read_text() == "keep me too\n"
    assert sorted(json.loads((c.out / MANIFEST).read_text())["files"]) == sorted(PLAN_FILES)


def _legacy(c: Ctx, *extra_files: str) -> Path:
    for name in PLAN_FILES:
        c.write(f"out/{name}", "{}" if name.endswith(".json") else "old")
    for name in extra_files:
        c.write(f"out/{name}", "the user's")
    return c.out


def _check_real_plan(c: Ctx) -> None:
    plan = Plan.load(c.out)
    assert plan.cost <= plan.budget
    assert sorted(json.loads((c.out / MANIFEST).read_text())["files"]) == sorted(PLAN_FILES)


def _check_no_nan_written(c: Ctx) -> None:
    for path in c.tmp.rglob("adapter_config.json"):
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text(), path


def _corrupt_cache(c: Ctx) -> list[str]:
    c.run(c.alloc("--cache-dir", c.tmp / "cache", out=c.tmp / "first"))
    (arrays,) = list((c.tmp / "cache").glob("probe-*/probe_report.safetensors"))
    arrays.write_bytes(b"\x00garbage, not safetensors" * 3)
    c.data["arrays"] = arrays
    return c.alloc("--cache-dir", c.tmp / "cache")


def _check_reprobed(c: Ctx) -> None:
    from probes.report import ProbeReport

    ProbeReport.load(c.data["arrays"].parent)  # the corrupt report was replaced by a readable one
    assert (c.out / ALLOCATION_FILE).is_file()


def _text_with_bad_byte(c: Ctx, name: str = "bad.txt") -> Path:
    """The corpus with a latin-1 line inserted after its first ~200 bytes: valid UTF-8 up to a lone 0xe9."""
    text = c.corpus.read_bytes()
    cut = text.index(b"\n", 200) + 1
    inserted = b"caf\xc3\xa9 \xe9t\xe9\n"  # UTF-8 'cafe' with an accent, then latin-1 bytes
    c.data["line"] = text[:cut].count(b"\n") + 1
    c.data["offset"] = cut + inserted.index(b" \xe9") + 1
    return c.write(name, text[:cut] + inserted + text[cut:])


def _bad_jsonl(c: Ctx) -> list[str]:
    path = c.write(
        "bad.jsonl", b'{"text": "def f(x): return x"}\n{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n'
    )
    c.data["offset"], c.data["line"] = path.read_bytes().index(b"\xe9"), 3
    return c.alloc(data=path)


def _check_offset_and_line(c: Ctx) -> None:
    """The needle names an offset and a line; this pins both numbers."""
    assert f"offset {c.data['offset']}, line {c.data['line']})" in c.data["error"], (c.data, c.data["error"])


def _records(c: Ctx, *records: Any) -> Path:
    return c.write("records.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _stale_sibling(c: Ctx, *, marker: bool, pid: int) -> list[str]:
    stale = c.tmp / f".out.tmp-{pid}-abc"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    if marker:
        (stale / ".allocator-tmp").touch()
    c.data["stale"] = stale
    return c.alloc()


def _check_gone(c: Ctx) -> None:
    assert not c.data["stale"].exists()
    assert (c.out / ALLOCATION_FILE).is_file()


def _check_kept(c: Ctx) -> None:
    assert (c.data["stale"] / "adapter_config.json").read_text() == "{}"
    assert (c.out / ALLOCATION_FILE).is_file()


def _with_umask(mask: int) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        c.umask = mask
        return c.alloc(out=c.tmp / "new" / "plan")  # the parent is created too

    return setup


def _check_modes(folder_mode: int, file_mode: int) -> Callable[[Ctx], None]:
    def check(c: Ctx) -> None:
        for folder in (c.tmp / "new", c.tmp / "new" / "plan"):
            assert folder.stat().st_mode & 0o777 == folder_mode, (folder, oct(folder.stat().st_mode))
        for path in (c.tmp / "new" / "plan").iterdir():
            assert path.stat().st_mode & 0o777 == file_mode, (path, oct(path.stat().st_mode))

    return check


def _guarded(tamper: Callable[[argparse.Namespace], None]) -> Callable[[Ctx], Callable[[], int]]:
    """The real `allocate` runner on a real parse whose namespace was tampered afterwards."""

    def setup(c: Ctx) -> Callable[[], int]:
        args = allocate_command.build_parser().parse_args(c.alloc())
        tamper(args)
        return lambda: run_guarded(allocate_command.run, args, interrupted="interrupted; nothing was written")

    return setup


class _InterruptingPath(os.PathLike):
    """A data path whose reading is interrupted (Ctrl-C while the check runs)."""

    def __fspath__(self) -> str:
        raise KeyboardInterrupt

    def __str__(self) -> str:
        raise KeyboardInterrupt


def _cwd_plan_folder(c: Ctx) -> list[str]:
    """The current folder is an empty folder; the plan is written to `-o .`."""
    return c.alloc(out=".")


def _check_plan_visible_in_cwd(c: Ctx) -> None:
    assert (c.tmp / "cwd" / ALLOCATION_FILE).is_file()
    # the user's shell sits in the current folder: the plan must be there, not in a folder that replaced it
    assert ALLOCATION_FILE in os.listdir("."), f"cwd lists {os.listdir('.')}; the folder was swapped under it"


def _cwd_carries_the_mark(c: Ctx) -> list[str]:
    """The current folder is a plan folder (with a file of the user's beside the plan): ours, so accepted."""
    c.run(c.alloc(out=c.tmp / "cwd"))
    # the write above may have replaced the folder (see BUGS["cwd-swapped"])
    c.monkeypatch.chdir(c.tmp / "cwd")
    c.write("cwd/mine.txt", "keep me\n")
    return c.alloc("--overwrite", "--budget", "r4", out=".")


def _check_cwd_overwritten(c: Ctx) -> None:
    assert {ALLOCATION_FILE, "mine.txt"} <= set(os.listdir(".")), os.listdir(".")
    assert json.loads(Path(ALLOCATION_FILE).read_text())["provenance"]["budget_spec"] == "r4"


def _home_is_a_plan_folder(c: Ctx) -> list[str]:
    home = c.tmp / "home"
    c.run(c.alloc(out=home))  # the home folder holds only a plan: ours, so only the home rule can refuse it
    c.monkeypatch.setenv("HOME", str(home))
    return c.alloc("--overwrite", out="~")


def _plan(c: Ctx) -> Path:
    c.run(c.alloc())
    return c.out


def _corrupt_manifest(c: Ctx) -> list[str]:
    (_plan(c) / MANIFEST).write_text("{not json")
    return c.alloc("--overwrite")


def _manifest_naming_outside(c: Ctx) -> list[str]:
    manifest = _plan(c) / MANIFEST
    data = json.loads(manifest.read_text())
    outside = c.write("outside.txt", "the user's\n")
    data["files"] += ["../outside.txt", str(outside), "sub/../../outside.txt"]
    manifest.write_text(json.dumps(data))
    return c.alloc("--overwrite")


def _victim_file(c: Ctx) -> Path:
    victim = c.tmp.parent / f"{c.tmp.name}-victim"
    shutil.rmtree(victim, ignore_errors=True)
    victim.mkdir()
    (victim / "report.md").write_text("the user's own report\n")
    c.watch.append(victim)
    return victim / "report.md"


def _plan_file_is_a_link(c: Ctx, *, user_file: bool) -> list[str]:
    out = _plan(c)
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(_victim_file(c))
    if user_file:
        (out / "notes.txt").write_text("mine\n")
    return c.alloc("--overwrite")


def _plan_file_is_a_user_folder(c: Ctx) -> list[str]:
    out = _plan(c)
    (out / "report.md").unlink()
    c.write("out/report.md/draft.txt", "the user's draft\n")
    return c.alloc("--overwrite")


# --- the `allocate` table -----------------------------------------------------------------------------------

NONFINITE_EXIT = 1  # `allocate --help`: "1 a run that failed for a stated reason (..., non-finite loss, ...)"

ALLOCATE = [
    # 1. --overwrite and data loss
    row(
        "overwrite-foreign-folder",
        lambda c: c.foreign("out") and c.alloc("--overwrite"),
        2,
        r"--overwrite refused.*did not write.*notes\.txt",
    ),
    row(
        "foreign-folder-no-overwrite",
        lambda c: c.foreign("out") and c.alloc(),
        2,
        r"already exists.*did not write",
    ),
    row(
        "overwrite-current-folder-with-foreign-files",
        lambda c: c.write("cwd/keep.txt", "mine\n") and c.alloc("--overwrite", out="."),
        2,
        r"refused.*\(the current folder\).*did not write",
    ),
    row(
        "plan-into-empty-current-folder",
        _cwd_plan_folder,
        0,
        r"wrote .*allocation\.json",
        writes=("cwd", "cwd/*"),
        check=_check_plan_visible_in_cwd,
    ),
    row(
        "overwrite-current-folder-that-carries-the-mark",
        _cwd_carries_the_mark,
        0,
        r"wrote",
        writes=tuple(f"cwd/{n}" for n in (*PLAN_FILES, MANIFEST)),
        check=_check_cwd_overwritten,
    ),
    row("empty-output-name", lambda c: c.alloc(out=""), 2, r"-o is empty"),
    row("empty-output-name-overwrite", lambda c: c.alloc("--overwrite", out=""), 2, r"-o is empty"),
    row(
        "overwrite-symlink-to-foreign-folder",
        lambda c: _symlink_to_foreign(c, "--overwrite"),
        2,
        r"symbolic link.*never followed",
    ),
    row("symlink-output-no-overwrite", lambda c: _symlink_to_foreign(c), 2, r"symbolic link"),
    row(
        "output-is-a-file",
        lambda c: c.write("out", "a file\n") and c.alloc("--overwrite"),
        2,
        r"exists and is not a folder",
    ),
    row("overwrite-home-folder", _home_is_a_plan_folder, 2, r"refusing --overwrite on .*\(the home folder\)"),
    row("overwrite-plan-with-corrupt-manifest", _corrupt_manifest, 2, r"refused.*did not write"),
    row(
        "manifest-naming-paths-outside-the-folder",
        _manifest_naming_outside,
        0,
        r"wrote",
        writes=PLAN_WRITES,
        check=lambda c: _check_real_plan(c) or None,
    ),
    row(
        "plan-file-is-a-link-out",
        lambda c: _plan_file_is_a_link(c, user_file=False),
        0,
        r"wrote",
        writes=PLAN_WRITES,
    ),  # the link goes, never what it points to (watched)
    row(
        "plan-file-is-a-link-out-beside-user-file",
        lambda c: _plan_file_is_a_link(c, user_file=True),
        2,
        r"report\.md exists and was not written by this tool",
    ),
    row(
        "plan-file-replaced-by-user-folder",
        _plan_file_is_a_user_folder,
        2,
        r"report\.md exists and was not written by this tool",
    ),
    row(
        "overwrite-plan-keeps-user-files",
        _plan_then_user_file,
        0,
        r"wrote .*out",
        writes=(*(f"out/{n}" for n in (*PLAN_FILES, MANIFEST)),),
        check=_check_replaced_and_kept,
    ),
    row(
        "overwrite-legacy-plan-folder",
        lambda c: _legacy(c) and c.alloc("--overwrite"),
        0,
        r"wrote",
        writes=PLAN_WRITES,
        check=_check_real_plan,
    ),
    row("legacy-plan-folder-no-overwrite", lambda c: _legacy(c) and c.alloc(), 2, r"pass --overwrite"),
    row(
        "legacy-plan-folder-plus-user-file",
        lambda c: _legacy(c, "notes.txt") and c.alloc("--overwrite"),
        2,
        r"refused.*did not write",
    ),
    # 2. NaN / inf / out of range: exit 2 naming the flag, nothing written
    row(
        "alpha-ratio-nan",
        lambda c: c.alloc("--alpha-ratio", "nan"),
        2,
        r"--alpha-ratio.*finite",
        check=_check_no_nan_written,
    ),
    row(
        "alpha-ratio-inf",
        lambda c: c.alloc("--alpha-ratio", "inf"),
        2,
        r"--alpha-ratio.*finite",
        check=_check_no_nan_written,
    ),
    row("alpha-ratio-zero", lambda c: c.alloc("--alpha-ratio", "0"), 2, r"--alpha-ratio.*> 0"),
    row(
        "utility-uniform-prior-nan",
        lambda c: c.alloc("--utility-uniform-prior", "nan"),
        2,
        r"--utility-uniform-prior must be .*got nan",
    ),
    row(
        "time-limit-inf",
        lambda c: c.alloc("--solver-time-limit", "inf"),
        2,
        r"--solver-time-limit must be a finite number",
    ),
    row(
        "mip-rel-gap-nan",
        lambda c: c.alloc("--solver-mip-rel-gap", "nan"),
        2,
        r"--solver-mip-rel-gap must be",
    ),
    row(
        "share-nan",
        lambda c: c.alloc("--solver-share-bounds", "attention=nan:0.5"),
        2,
        r"--solver-share-bounds\b.*nan",
    ),
    row(
        "utility-family-priors-nan",
        lambda c: c.alloc("--utility-family-priors", "attention=nan"),
        2,
        r"--utility-family-priors must be a finite number",
    ),
    row(
        "utility-weights-inf",
        lambda c: c.alloc("--utility-weights", "fisher=inf"),
        2,
        r"--utility-weights must be a finite number",
    ),
    row("budget-1e400", lambda c: c.alloc("--budget", "1e400"), 2, r"budget '1e400'"),
    row(
        "samples-zero", lambda c: c.alloc("--data-samples", "0"), 2, r"--data-samples must be an integer >= 1"
    ),
    row(
        "seq-len-one", lambda c: c.alloc("--data-seq-len", "1"), 2, r"--data-seq-len must be an integer >= 2"
    ),
    row("probe-max-rank-zero", lambda c: c.alloc("--probe-max-rank", "0"), 2, r"--probe-max-rank must be"),
    row(
        "ranks-not-integers",
        lambda c: c.alloc("--solver-ranks", "0,a"),
        2,
        r"--solver-ranks: invalid literal",
    ),
    row(
        "skip-nonfinite-not-a-bool",
        lambda c: c.alloc("--probe-skip-nonfinite", "maybe"),
        2,
        r"unrecognized arguments: maybe",
    ),
    row("probe-svd-unknown", lambda c: c.alloc("--probe-svd", "bogus"), 2, r"--probe-svd must be one of"),
    row(
        "probe-sketch-dim-above-threshold",
        lambda c: c.alloc("--probe-sketch-dim", "8192"),
        2,
        r"--probe-sketch-threshold \(512\) must be >= sketch_dim \(8192\)",
    ),
    row(
        "ranks-not-from-zero",
        lambda c: c.alloc("--solver-ranks", "4,8"),
        2,
        r"--solver-ranks must be strictly increasing",
    ),
    # 4. no tracebacks
    row(
        "probe-device-foo",
        lambda c: c.alloc("--probe-device", "foo"),
        2,
        r"--probe-device 'foo' is not a torch",
    ),
    row(
        "probe-device-cuda-without-cuda",
        lambda c: c.alloc("--probe-device", "cuda"),
        2,
        r"--probe-device 'cuda'.*no usable cuda",
        skip_if=lambda: "CUDA is available" if torch.cuda.is_available() else "",
    ),
    row(
        "cache-dir-is-a-file",
        lambda c: c.write("cache", "x") and c.alloc("--cache-dir", c.tmp / "cache"),
        2,
        r"is a file, not a folder.*--cache-dir",
    ),
    row("cache-dir-empty-name", lambda c: c.alloc("--cache-dir", ""), 2, r"probe cache folder is empty"),
    row(
        "cache-dir-equals-output",
        lambda c: c.alloc("--cache-dir", c.out),
        2,
        r"--cache-dir and -o are the same",
    ),
    row(
        "corrupt-cached-probe-report",
        _corrupt_cache,
        0,
        r"ProbeWarning: cached probe report .* unreadable.*"
        r"probing again",
        writes=(*PLAN_WRITES, "cache/*"),
        check=_check_reprobed,
    ),
    row(
        "data-folder-without-datasets",
        lambda c: c.write("ds/data.arrow", b"x") and c.alloc(data=c.tmp / "ds"),
        2,
        r"datasets",
        skip_if=lambda: "datasets is installed" if _has_module("datasets") else "",
    ),
    row("data-dev-null", lambda c: c.alloc(data="/dev/null"), 2, r"/dev/null is empty"),
    row(
        "retention-data-missing",
        lambda c: c.alloc("--retention-data", c.tmp / "gone.txt"),
        2,
        r"retention.data '.*gone\.txt' not found",
    ),
    row("missing-data-file", lambda c: c.alloc(data=c.tmp / "nope.txt"), 2, r"nope\.txt.*not found"),
    # 5. text data
    row(
        "txt-invalid-utf8",
        lambda c: c.alloc(data=_text_with_bad_byte(c)),
        2,
        r"not valid utf-8 \(byte 0xe9 at offset \d+, line \d+\).*--data-encoding",
        check=_check_offset_and_line,
    ),
    row(
        "jsonl-invalid-utf8",
        _bad_jsonl,
        2,
        r"not valid utf-8 \(byte 0xe9 at offset \d+, line 3\)",
        check=_check_offset_and_line,
    ),
    row(
        "txt-binary",
        lambda c: c.alloc(data=c.write("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")),
        2,
        r"looks binary \(a NUL byte at offset 8, line 3\)",
    ),
    row(
        "txt-with-nul-byte",
        lambda c: c.alloc(data=c.write("nul.txt", c.corpus.read_bytes()[:300] + b"\x00x")),
        2,
        r"looks binary \(a NUL byte at offset 300, line \d+\)",
    ),
    row(
        "txt-latin-1-encoding",
        lambda c: c.alloc("--data-encoding", "latin-1", data=_text_with_bad_byte(c)),
        0,
        r"wrote",
        writes=PLAN_WRITES,
    ),
    row(
        "jsonl-latin-1-encoding",
        lambda c: _bad_jsonl(c) + ["--data-encoding", "latin-1"],
        0,
        r"wrote",
        writes=PLAN_WRITES,
    ),
    row(
        "unknown-encoding",
        lambda c: c.alloc("--data-encoding", "klingon"),
        2,
        r"--data-encoding 'klingon' is not a text "
        r"encoding",
    ),
    row(
        "jsonl-line-not-json",
        lambda c: c.alloc(data=c.write("r.jsonl", '{"text": "a"}\n{"text": oops}\n')),
        2,
        r"r\.jsonl:2 is not valid JSON",
    ),
    # 8. misleading messages
    row(
        "jsonl-text-null",
        lambda c: c.alloc(data=_records(c, {"text": "def f(): pass"}, {"text": None})),
        2,
        r"'text': null, not a string",
    ),
    row(
        "all-batches-nonfinite-skipped",
        lambda c: c.alloc("--probe-skip-nonfinite", model=c.nan_model()),
        NONFINITE_EXIT,
        r"every calibration batch \(2\) had a non-finite loss",
    ),
    row(
        "nonfinite-loss-names-the-flag",
        lambda c: c.alloc(model=c.nan_model()),
        NONFINITE_EXIT,
        r"loss is nan.*--probe-skip-nonfinite\b",
    ),
    # 10. issue 17: data forms, config files
    row(
        "datasets-folder-without-a-usable-column",
        lambda c: c.alloc(data=_dataset_folder(c, [{"body": "def f(): pass"}] * 3)),
        2,
        r"record \d+ of .*ds has none of 'text' \(text\), 'messages'.*its keys are \['body'\]"
        r".*--data-text-field",
        writes=("ds", "ds/*"),
        skip_if=_no_datasets,
    ),
    row(
        "chat-record-without-assistant-turn-under-assistant-only-loss",
        lambda c: c.alloc(
            "--data-assistant-only-loss", model=_reference(), data=_records(c, {"messages": USER_ONLY})
        ),
        2,
        r"record 0 of .* has no assistant turn; assistant-only loss needs one.*--no-data-assistant-only-loss",
    ),
    row(
        "text-records-under-assistant-only-loss",
        lambda c: c.alloc("--data-assistant-only-loss", data=_records(c, {"text": "def f(): pass"})),
        2,
        r"not a conversation.*--no-data-assistant-only-loss",
    ),
    # issue 18: --chat-template
    row(
        "chat-records-for-a-tokenizer-without-a-chat-template",
        lambda c: c.alloc(
            data=_records(c, {"messages": [*USER_ONLY, {"role": "assistant", "content": "x"}]})
        ),
        2,
        r"holds chat messages but the tokenizer has no chat template; give --chat-template FILE",
    ),
    row(
        "chat-template-file-missing",
        lambda c: c.alloc("--chat-template", c.tmp / "nope.jinja"),
        2,
        r"could not read the chat template '.*nope\.jinja' \(FileNotFoundError\).*\(--chat-template\)",
    ),
    row(
        "chat-template-file-empty",
        lambda c: c.alloc("--chat-template", c.write("t.jinja", " \n")),
        2,
        r"the chat template '.*t\.jinja' is empty.*\(--chat-template\)",
    ),
    row(
        "chat-template-a-folder",
        lambda c: c.alloc("--chat-template", c.tmp),
        2,
        r"could not read the chat template .*IsADirectoryError.*--chat-template",
    ),
    row(
        "config-unknown-keys-named-with-the-closest",
        lambda c: c.alloc(*_config(c, "solver:\n  granularty: module\nmax_rank: 8\n")),
        2,
        r"plan\.yaml: unknown keys solver\.granularty \(closest: solver\.granularity\), max_rank "
        r"\(closest: probes\.max_rank\)",
    ),
    row(
        "config-value-of-the-wrong-type",
        lambda c: c.alloc(*_config(c, "data:\n  seq_len: long\n")),
        2,
        r"plan\.yaml: data\.seq_len must be an integer, got 'long' \(str\)",
    ),
    row(
        "config-switch-not-a-bool",
        lambda c: c.alloc(*_config(c, '{"solver": {"presolve": "maybe"}}', "plan.json")),
        2,
        r"plan\.json: solver\.presolve must be true or false, got 'maybe'",
    ),
    row(
        "config-group-not-a-mapping",
        lambda c: c.alloc(*_config(c, "data: train.jsonl\n")),
        2,
        r"data must be a mapping of data settings",
    ),
    row("config-not-yaml", lambda c: c.alloc(*_config(c, "data: [1, 2\n")), 2, r"not valid YAML or JSON"),
    row("config-a-list", lambda c: c.alloc(*_config(c, "- 1\n- 2\n")), 2, r"holds a list; a config file"),
    row("config-missing", lambda c: c.alloc("--config", c.tmp / "nope.yaml"), 2, r"cannot read the config"),
    row(
        "config-value-out-of-range",
        lambda c: c.alloc(*_config(c, "probes:\n  max_rank: 0\n")),
        2,
        r"--probe-max-rank must be an integer >= 1, got 0",
    ),
    row(
        "print-config-writes-nothing",
        lambda c: c.alloc("--print-config"),
        0,
        r"(?s)^model: .*\nprobes:\n",
    ),
    # 9. exit codes
    row("help-lists-exit-codes", lambda c: ["--help"], 0, ".*".join(EXIT_CODE_LINES)),
    row(
        "unexpected-error-is-exit-3",
        _guarded(lambda a: setattr(a, "out_dir", 5)),
        EXIT_BUG,
        r"unexpected TypeError.*This is a bug.*ALLOCATE_DEBUG=1",
    ),
    row(
        "interrupted-is-exit-130",
        _guarded(lambda a: setattr(a, "data.source", _InterruptingPath())),
        EXIT_INTERRUPTED,
        r"(?m)^interrupted; nothing was written$",
    ),
    # 7. leftovers and modes
    row(
        "stale-temporary-of-dead-run-removed",
        lambda c: _stale_sibling(c, marker=True, pid=_dead_pid()),
        0,
        r"wrote",
        writes=(*PLAN_WRITES, ".out.tmp-*"),
        check=_check_gone,
    ),
    row(
        "stale-temporary-without-marker-kept",
        lambda c: _stale_sibling(c, marker=False, pid=_dead_pid()),
        0,
        r"wrote",
        writes=PLAN_WRITES,
        check=_check_kept,
    ),
    row(
        "temporary-of-live-process-kept",
        lambda c: _stale_sibling(c, marker=True, pid=os.getppid()),
        0,
        r"wrote",
        writes=PLAN_WRITES,
        check=_check_kept,
    ),
    row(
        "umask-022",
        _with_umask(0o022),
        0,
        r"wrote",
        writes=("new", "new/*"),
        check=_check_modes(0o755, 0o644),
    ),
    row(
        "umask-077",
        _with_umask(0o077),
        0,
        r"wrote",
        writes=("new", "new/*"),
        check=_check_modes(0o700, 0o600),
    ),
]


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("r", ALLOCATE)
def test_allocate(r: Row, ctx: Ctx, capsys, monkeypatch):
    _check_cli(r, ctx, capsys, monkeypatch)


# --- the `allocate inspect` table ---------------------------------------------------------------------------

INSPECT = [
    row(
        "config-json-is-a-list",
        lambda c: ["inspect", c.write("cfg/config.json", "[1, 2, 3]")],
        2,
        r"config\.json.*(list|object)",
    ),
    row(
        "folder-config-json-is-a-list",
        lambda c: c.write("cfg/config.json", "[]") and ["inspect", c.tmp / "cfg"],
        2,
        r"config\.json.*(list|object)",
    ),
    row(
        "config-json-not-json",
        lambda c: ["inspect", c.write("cfg/config.json", "{model_type: qwen3_5")],
        2,
        r"config\.json.*JSON",
    ),
    row(
        "config-json-invalid-utf8",
        lambda c: ["inspect", c.write("cfg/config.json", b'{"model_type": "qw\xe9n"}')],
        2,
        r"config\.json",
    ),
    row(
        "config-json-unknown-model-type",
        lambda c: ["inspect", c.write("cfg/config.json", '{"model_type": "nope"}')],
        2,
        r"nope",
    ),
    row(
        "config-json-without-model-type",
        lambda c: ["inspect", c.write("cfg/config.json", "{}")],
        2,
        r"model_type",
    ),
    row(
        "folder-without-config",
        lambda c: (c.tmp / "empty").mkdir() or ["inspect", c.tmp / "empty"],
        2,
        r"no config\.json",
    ),
    row("missing-path", lambda c: ["inspect", c.tmp / "nope" / "config.json"], 2, r"nope"),
    row("rank-zero", lambda c: ["inspect", c.model, "--rank", "0"], 2, r"--rank must be >= 1"),
    row("good-folder", lambda c: ["inspect", c.model], 0, r"decoder layers"),
    row("help-lists-exit-codes", lambda c: ["inspect", "--help"], 0, ".*".join(EXIT_CODE_LINES)),
]


@pytest.mark.parametrize("r", INSPECT)
def test_inspect(r: Row, ctx: Ctx, capsys, monkeypatch):
    _check_cli(r, ctx, capsys, monkeypatch)


# --- the `allocate tune` table ------------------------------------------------------------------------------

STUDY_WRITES = ("study", "study/*")


def _check_no_record_then_rerun(c: Ctx) -> None:
    assert not (c.tmp / "study").exists()  # no tune.json, no folder: the run never began
    c.run(c.tune("--storage", f"sqlite:///{c.tmp / 'study' / 'x.db'}"))
    assert json.loads((c.tmp / "study" / "tune.json").read_text())["study"] == "tune"


def _moved_study(c: Ctx) -> list[str]:
    c.run(c.tune(out=c.tmp / "first"))
    shutil.move(c.tmp / "first", c.tmp / "study")
    return [*c.tune(), "--tune-trials", "3"]  # one more trial than the first run: resumed, not restarted


def _check_resumed(c: Ctx) -> None:
    import optuna

    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{c.tmp / 'study' / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2], [t.number for t in study.trials]
    assert json.loads((c.tmp / "study" / "tune.json").read_text()) == {"storage": "default", "study": "tune"}


def _read_only_db(c: Ctx) -> list[str]:
    c.run(c.tune())
    db = c.tmp / "study" / "study.db"
    db.chmod(0o444)
    return c.tune()


def _root_writes_anyway() -> str:
    return "running as root: a 0o444 file stays writable" if os.geteuid() == 0 else ""


def _other_settings(c: Ctx) -> list[str]:
    c.run(c.tune())
    return [*c.tune(), "--tune-steps", "2"]


def _tune_bad_eval(c: Ctx) -> list[str]:
    return c.tune(eval_data=_text_with_bad_byte(c, "eval.txt"))


def _study_plus_user_file(c: Ctx) -> list[str]:
    c.run(c.tune())
    c.write("study/mine.txt", "keep me\n")
    c.write("study/notes/also-mine.txt", "keep me too\n")
    return [*c.tune("--overwrite"), "--tune-steps", "2"]  # other settings: only a fresh study accepts them


def _check_study_restarted(c: Ctx) -> None:
    import optuna

    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{c.tmp / 'study' / 'study.db'}")
    assert study.user_attrs["tune"]["settings"]["steps"] == 2 and len(study.trials) == 2


# what tune may write in its folder (allocator.tuning.folder.TUNE_ENTRIES), and nothing else there
TUNE_OWN = tuple(
    f"study/{name}"
    for name in (
        "tune.json",
        ".tune.lock",
        "study.db*",
        "probes*",
        "best*",
        "pareto*",
        "study.md",
        "study.png",
        "study.json",
    )
)


def _storage_under_a_file(c: Ctx) -> list[str]:
    c.write("file.txt", "a file, not a folder\n")
    return c.tune("--storage", f"sqlite:///{c.tmp / 'file.txt' / 'x.db'}")


def _other_study_name(c: Ctx) -> list[str]:
    c.run(c.tune())
    return c.tune("--study-name", "other")


def _no_study_folder(c: Ctx) -> None:
    assert not (c.tmp / "study").exists(), sorted(p.name for p in (c.tmp / "study").iterdir())


TUNE = [
    row(
        "overwrite-foreign-folder",
        lambda c: c.foreign("study") and c.tune("--overwrite"),
        2,
        r"holds no tune study but files this tool did not write",
    ),
    row("foreign-folder-no-overwrite", lambda c: c.foreign("study") and c.tune(), 2, r"did not write"),
    row(
        "overwrite-symlink-to-foreign-folder",
        lambda c: _symlink_to_foreign(c, "--overwrite", tune=True),
        2,
        r"symbolic link",
    ),
    row("empty-output-name", lambda c: c.tune(out=""), 2, r"-o is empty"),
    row("lr-nan", lambda c: [*c.tune(), "--tune-lr", "nan"], 2, r"--tune-lr\b.*not a finite number"),
    row(
        "alpha-ratio-inf",
        lambda c: [*c.tune(), "--tune-alpha-ratio", "inf"],
        2,
        r"--tune-alpha-ratio.*not a finite number",
    ),
    row("steps-zero", lambda c: [*c.tune(), "--tune-steps", "0"], 2, r"--tune-steps must be an integer >= 1"),
    row(
        "solver-ranks-not-from-zero",
        lambda c: [*c.tune(), "--solver-ranks", "4,8"],
        2,
        r"--solver-ranks must be",
    ),
    row("probe-device-foo", lambda c: [*c.tune(), "--probe-device", "foo"], 2, r"--probe-device 'foo'"),
    row(
        "invalid-utf8-eval-data",
        _tune_bad_eval,
        2,
        r"not valid utf-8 \(byte 0xe9 at offset \d+, line \d+\)",
        check=_check_offset_and_line,
    ),
    row(
        "storage-in-missing-folder",
        lambda c: c.tune("--storage", "sqlite:////nonexistent-dir/x.db"),
        1,
        r"could not open or use storage sqlite:////nonexistent-dir/x\.db",
        check=_check_no_record_then_rerun,
    ),
    row(
        "storage-unknown-dialect",
        lambda c: c.tune("--storage", "foo://x"),
        2,
        r"could not open storage foo://x.*pass a database URL",
        check=_no_study_folder,
    ),
    row(
        "moved-study-folder-resumes",
        _moved_study,
        0,
        r"study\s+tune in .*\ntrials\s+3 complete",
        writes=STUDY_WRITES,
        check=_check_resumed,
    ),
    row(
        "read-only-study-db",
        _read_only_db,
        1,
        r"study\.db is read-only",
        skip_if=_root_writes_anyway,
        writes=STUDY_WRITES,
    ),
    row(
        "resume-with-other-settings",
        _other_settings,
        2,
        r"started with other settings.*settings\.steps: 1 \(now 2\)",
        writes=("study/study.db*",),
    ),
    row(
        "overwrite-study-keeps-user-files",
        _study_plus_user_file,
        0,
        r"trials\s+2 complete",
        writes=TUNE_OWN,
        check=_check_study_restarted,
    ),
    row(
        "other-study-name-in-a-study-folder",
        _other_study_name,
        2,
        r"holds study 'tune'.*pass that --study-name",
    ),
    row(
        "storage-path-under-a-file",
        _storage_under_a_file,
        2,
        r"file\.txt.*(is a file|not a folder)",
        check=_no_study_folder,
    ),
    row(
        "storage-missing-driver",
        lambda c: c.tune("--storage", "postgresql+psycopg2://user@127.0.0.1:1/db"),
        2,
        r"needs the Python package 'psycopg2-binary'",
        check=_no_study_folder,
        skip_if=lambda: "psycopg2 is installed" if _has_module("psycopg2") else "",
    ),
    row(
        "storage-missing-default-driver",
        lambda c: c.tune("--storage", "mysql://user@127.0.0.1:1/db"),
        2,
        r"needs the Python package 'mysqlclient'",
        check=_no_study_folder,
        skip_if=lambda: "MySQLdb is installed" if _has_module("MySQLdb") else "",
    ),
    row(
        "storage-sqlite-in-memory",
        lambda c: c.tune("--storage", "sqlite:///:memory:"),
        2,
        r"in.memory",
        check=_no_study_folder,
    ),
    row(
        "trials-below-baselines",
        lambda c: [*c.tune(), "--tune-trials", "1"],
        2,
        r"trials=1 leaves no searched trial",
    ),
    row(
        "eval-data-missing",
        lambda c: c.tune(eval_data=c.tmp / "gone.txt"),
        2,
        r"eval.data '.*gone\.txt' not found",
    ),
    row(
        "config-unknown-key-in-tune",
        lambda c: c.tune(*_config(c, "tune:\n  trails: 3\n")),
        2,
        r"unknown key tune\.trails \(closest: tune\.trials\)",
        check=_no_study_folder,
    ),
    row(
        "config-lora-alpha-ratio-is-searched-in-tune",
        lambda c: c.tune(*_config(c, "lora:\n  alpha_ratio: 2\n")),
        2,
        r"unknown key lora\.alpha_ratio \(closest: tune\.alpha_ratio\)",
        check=_no_study_folder,
    ),
    row(
        "chat-template-file-missing-in-tune",
        lambda c: c.tune("--chat-template", c.tmp / "nope.jinja"),
        2,
        r"could not read the chat template '.*nope\.jinja'.*\(--chat-template\)",
        check=_no_study_folder,
    ),
    row("help-lists-exit-codes", lambda c: ["tune", "--help"], 0, ".*".join(EXIT_CODE_LINES)),
]


@pytest.mark.parametrize("r", TUNE)
def test_tune(r: Row, ctx: Ctx, capsys, monkeypatch):
    _check_cli(r, ctx, capsys, monkeypatch)


# --- the Python API table -----------------------------------------------------------------------------------


def _allocate(c: Ctx, **kw: Any) -> Callable[[], Any]:
    kw.setdefault("data", str(c.corpus))
    kw.setdefault("data_settings", DataSettings(seq_len=32, samples=4, batch_size=2))
    kw.setdefault("probe_settings", ProbeSettings(progress=False))
    model = kw.pop("model", str(c.model))
    return lambda: allocator.allocate(model, **kw)


def _tampered(edit: Callable[[dict], Any] | None = None, *, text: str | bytes | None = None) -> Callable:
    """Plan.load of the tiny plan's allocation.json after ``edit(data)`` (or replaced by ``text``)."""

    def setup(c: Ctx) -> Callable[[], Any]:
        data = c.plan().to_dict()
        if edit is not None:
            edit(data)  # in place
        body = text if text is not None else json.dumps(data, indent=1)  # NaN stays the JSON token NaN
        c.write(f"plan/{ALLOCATION_FILE}", body)
        return lambda: Plan.load(c.tmp / "plan")

    return setup


def _first_ranked(data: dict) -> dict:
    return next(m for m in data["modules"] if m.get("rank", 0) > 0)


def _apply(c: Ctx) -> Callable[[], Any]:
    model = c.data["model"]  # built by the row's ``model``
    return lambda: c.plan().apply(model)


def _falcon() -> torch.nn.Module:
    from tiny_models import build

    return build("falcon_h1")


def _deeper_qwen() -> torch.nn.Module:
    from tiny_models import build

    return build("qwen3_5", num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2)


def _same_qwen() -> torch.nn.Module:
    from tiny_models import build

    return build("qwen3_5")


def _eva_without_data(c: Ctx) -> Callable[[], Any]:
    import dataclasses

    plan = dataclasses.replace(c.plan(), init="eva")
    model = c.data["model"]
    return lambda: plan.apply(model)


def _tampered_settings(c: Ctx) -> Callable[[], Any]:
    settings = DataSettings(seq_len=32, samples=4, batch_size=2)
    object.__setattr__(settings, "samples", float("nan"))
    return lambda: allocator.allocate(
        str(c.model), data=str(c.corpus), data_settings=settings, probe_settings=ProbeSettings(progress=False)
    )


def _eva_bad_ids(c: Ctx) -> Callable[[], Any]:
    import dataclasses

    plan, model = dataclasses.replace(c.plan(), init="eva"), c.data["model"]
    return lambda: plan.apply(
        model, init_data=[{"input_ids": torch.full((2, 32), 500), "labels": torch.full((2, 32), 5)}]
    )


def _apply_twice(c: Ctx) -> Callable[[], Any]:
    peft_model = c.plan().apply(_same_qwen())
    return lambda: c.plan().apply(peft_model)


def _apply_bad_dropout(c: Ctx) -> Callable[[], Any]:
    """A LoraConfig field PEFT rejects only while injecting: the adapters half made must be taken out
    again."""
    model = c.data["model"]
    return lambda: c.plan().apply(model, lora_dropout=5.0)


def _save_tampered_nan(c: Ctx) -> Callable[[], Any]:
    import dataclasses

    plan = dataclasses.replace(c.plan())
    object.__setattr__(plan, "alpha_ratio", float("nan"))  # past the constructor's check
    # the disk check: nothing written, so no NaN in adapter_config
    return lambda: plan.save(c.tmp / "nan-plan")


API = [
    row(
        "dataset-without-a-usable-column",
        lambda c: _allocate(c, data=_dataset([{"body": "x", "n": 1}])),
        needle=r"data: the Dataset has columns \['body', 'n'\], none of them 'text' \(text\), 'messages'",
        skip_if=_no_datasets,
    ),
    row(
        "dataset-chat-without-assistant-turn",
        lambda c: _allocate(
            c,
            model=None,
            data=_dataset([{"messages": USER_ONLY}]),
            data_settings=DataSettings(seq_len=32, samples=1, assistant_only_loss=True),
        ),
        needle=r"record 0 of \(the Dataset\) has no assistant turn",
        skip_if=_no_datasets,
    ),
    row(
        "data-a-generator",
        lambda c: _allocate(c, data=(r for r in [{"text": "x"}])),
        needle=r"data must be a file or folder path.*a torch DataLoader, got generator",
    ),
    row("data-int", lambda c: _allocate(c, data=123), needle=r"data must be a file or folder path.*got int"),
    row(
        "data-none",
        lambda c: _allocate(c, data=None),
        needle=r"data must be a file or folder path.*got NoneType",
    ),
    row("data-list-of-ints", lambda c: _allocate(c, data=[1, 2, 3]), needle=r"token batch 0 is a int"),
    row(
        "model-not-transformers",
        lambda c: _allocate(c, model=torch.nn.Linear(2, 2)),
        needle=r"model must be a hub id.*got Linear",
    ),
    row(
        "token-ids-beyond-vocab",
        lambda c: _allocate(c, data=[{"input_ids": torch.full((2, 32), 500)}]),
        needle=r"token id 500, outside the model's vocabulary of 128",
    ),
    row(
        "negative-token-ids",
        lambda c: _allocate(c, data=[{"input_ids": torch.full((2, 32), -3)}]),
        needle=r"token id -3, outside the model's vocabulary",
    ),
    row(
        "alpha-ratio-nan",
        lambda c: _allocate(c, alpha_ratio=float("nan")),
        needle=r"alpha_ratio must be a finite",
    ),
    row(
        "alpha-ratio-string", lambda c: _allocate(c, alpha_ratio="2"), needle=r"alpha_ratio must be a finite"
    ),
    row(
        "settings-of-wrong-type",
        lambda c: _allocate(c, solver_settings={"ranks": (0, 4)}),
        needle=r"solver_settings must be a SolverSettings",
    ),
    row("settings-tampered-after-construction", _tampered_settings, needle=r"samples must be a positive int"),
    row(
        "cache-dir-is-a-file",
        lambda c: _allocate(c, cache_dir=c.write("cache", "x")),
        needle=r"is a file, not a folder",
    ),
    row(
        "probe-device-foo",
        lambda c: _allocate(c, probe_settings=ProbeSettings(device="foo", progress=False)),
        needle=r"device 'foo' is not a torch device",
    ),
    row("budget-nonsense", lambda c: _allocate(c, budget="lots"), needle=r"lots"),
    row(
        "tune-out-dir-empty",
        lambda c: lambda: allocator.tune(str(c.model), str(c.corpus), str(c.corpus), out_dir=""),
        needle=r"-o is empty",
    ),
    row("cache-dir-int", lambda c: _allocate(c, cache_dir=123), needle=r"cache"),
    row("data-bytes", lambda c: _allocate(c, data=b"train.txt"), needle=r"data must be a file.*got bytes"),
    row(
        "token-batch-without-input-ids",
        lambda c: _allocate(c, data=[{}]),
        needle=r"token batch 0 has no 'input_ids'",
    ),
    row(
        "token-batch-labels-wrong-shape",
        lambda c: _allocate(c, data=[{"input_ids": [[5] * 32], "labels": [1, 2]}]),
        needle=r"labels has shape \(2,\), input_ids \(1, 32\)",
    ),
    row("token-batch-ids-a-string", lambda c: _allocate(c, data=[{"input_ids": "abc"}]), needle=r"input_ids"),
    row(
        "token-batch-ragged",
        lambda c: _allocate(c, data=[{"input_ids": [[1, 2, 3], [1]]}]),
        needle=r"input_ids",
    ),
    row(
        "token-ids-beyond-int64",
        lambda c: _allocate(c, data=[{"input_ids": [[2**70] * 32]}]),
        needle=r"token id|vocabulary|input_ids",
    ),
    row("model-empty-string", lambda c: _allocate(c, model=""), needle=r"no config\.json"),
    row(
        "tune-settings-a-dict",
        lambda c: (
            lambda: allocator.tune(
                str(c.model), str(c.corpus), str(c.corpus), settings={"trials": 3}, out_dir=c.tmp / "t"
            )
        ),
        needle=r"settings must be a TuneSettings",
    ),
    # 3. a plan applied to the wrong model: refused, the model left exactly as it was
    row(
        "apply-to-falcon-h1",
        _apply,
        needle=r"made for another model.*model_type 'qwen3_5\w*' \(model: 'falcon_h1'\)",
        model=_falcon,
    ),
    row(
        "apply-to-deeper-qwen3_5",
        _apply,
        needle=r"made for another model.*n_layers 2 \(model: 4\)",
        model=_deeper_qwen,
    ),
    row("apply-eva-plan-without-init-data", _eva_without_data, needle=r"pass init_data", model=_same_qwen),
    row(
        "apply-eva-plan-with-ids-beyond-vocab",
        _eva_bad_ids,
        needle=r"token id 500, outside the model's vocabulary",
        model=_same_qwen,
    ),
    row(
        "apply-to-a-linear-layer",
        lambda c: lambda: c.plan().apply(torch.nn.Linear(2, 2)),
        needle=r"made for another model",
    ),
    row("apply-to-none", lambda c: lambda: c.plan().apply(None), needle=r"the model is a NoneType"),
    row("apply-twice", _apply_twice, needle=r"already holds PEFT adapters"),
    row(
        "apply-failing-inside-peft-restores-the-model",
        _apply_bad_dropout,
        exc=ValueError,
        # PEFT's own error, passed on
        needle=r"dropout probability has to be between 0 and 1",
        model=_same_qwen,
    ),
    # 4. tampered allocation.json
    row(
        "plan-rank-abc",
        _tampered(lambda d: _first_ranked(d).update(rank="abc")),
        needle=r"rank of .* must be a whole number, got 'abc'",
    ),
    row(
        "plan-rank-negative",
        _tampered(lambda d: _first_ranked(d).update(rank=-1)),
        needle=r"ranks must be integers >= 0",
    ),
    row(
        "plan-rank-fraction",
        _tampered(lambda d: _first_ranked(d).update(rank=2.5)),
        needle=r"must be a whole number, got 2\.5",
    ),
    row("plan-no-modules", _tampered(lambda d: d.pop("modules")), needle=r"not a plan: modules missing"),
    row("plan-modules-not-a-list", _tampered(lambda d: d.update(modules={"a": 1})), needle=r"not a plan"),
    row(
        "plan-module-entry-a-string",
        _tampered(lambda d: d["modules"].append("model.layers.0")),
        needle=r"malformed plan",
    ),
    row(
        "plan-module-without-shape",
        _tampered(lambda d: d["modules"].append({"name": "x", "rank": 1})),
        needle=r"malformed plan",
    ),
    row("plan-json-list", _tampered(text="[1, 2, 3]"), needle=r"a plan is a JSON object, got list"),
    row("plan-not-json", _tampered(text="this is not JSON {"), needle=r"could not read .* as JSON"),
    row("plan-invalid-utf8", _tampered(text=b'{"model_id": "caf\xe9"}'), needle=r"could not read .* as JSON"),
    row("plan-empty-file", _tampered(text=""), needle=r"could not read .* as JSON"),
    row(
        "plan-budget-negative",
        _tampered(lambda d: d.update(budget=-5)),
        needle=r"budget must be a whole number of "
        r"parameters >= 1, got -5",
    ),
    row(
        "plan-budget-string",
        _tampered(lambda d: d.update(budget="lots")),
        needle=r"budget must be a whole number",
    ),
    row(
        "plan-alpha-ratio-nan-token",
        _tampered(lambda d: d.update(alpha_ratio=float("nan"))),
        needle=r"alpha_ratio must be a finite number > 0, got nan",
    ),
    row(
        "plan-alpha-ratio-infinity-token",
        _tampered(lambda d: d.update(alpha_ratio=float("inf"))),
        needle=r"alpha_ratio must be a finite number > 0, got inf",
    ),
    row(
        "plan-schema-from-the-future", _tampered(lambda d: d.update(schema=99)), needle=r"schema 99.*upgrade"
    ),
    row("plan-unknown-init", _tampered(lambda d: d.update(init="magic")), needle=r"unknown init 'magic'"),
    row(
        "plan-architecture-a-string",
        _tampered(lambda d: d.update(architecture="qwen3_5")),
        needle=r"malformed plan",
    ),
    row(
        "plan-cost-above-budget",
        _tampered(lambda d: _first_ranked(d).update(rank=64)),
        needle=r"cost .* exceeds its budget",
    ),
    row(
        "plan-duplicate-module-name",
        _tampered(lambda d: d["modules"].append(dict(_first_ranked(d), rank=1))),
        needle=r"(duplicate|twice|more than once)",
    ),
    row(
        "save-plan-with-tampered-nan-alpha", _save_tampered_nan, needle=r"alpha_ratio must be a finite number"
    ),
    row(
        "plan-missing-file",
        lambda c: lambda: Plan.load(c.tmp / "no-plan-here"),
        needle=r"no allocation\.json",
    ),
]


def _model_state(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "types": [type(m) for m in model.modules()],
        "names": [n for n, _ in model.named_modules()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "peft": hasattr(model, "peft_config"),
        "training": model.training,
    }


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["types"] == b["types"] and a["names"] == b["names"], (
        "the module tree changed (adapters left in?)"
    )
    flipped = sorted(n for n in a["grad"] if a["grad"][n] != b["grad"].get(n))
    assert a["grad"].keys() == b["grad"].keys() and not flipped, f"requires_grad changed: {flipped[:3]}"
    assert not b["peft"], "the model has a peft_config attribute"
    assert a["training"] == b["training"], f"training mode {a['training']} -> {b['training']}"
    assert a["tensors"].keys() == b["tensors"].keys(), "state_dict keys changed"
    changed_tensors = [k for k, v in a["tensors"].items() if not torch.equal(v, b["tensors"][k])]
    assert not changed_tensors, f"weights changed: {changed_tensors[:3]}"


@pytest.mark.parametrize("r", API)
def test_api(r: Row, ctx: Ctx, capsys, monkeypatch):
    if r.skip_if is not None and r.skip_if():
        pytest.skip(r.skip_if())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if r.model is not None:
        ctx.data["model"] = r.model()
        before_model = _model_state(ctx.data["model"])
    call = r.setup(ctx)
    roots = [ctx.tmp, ctx.model, ctx.corpus]
    before = tree_digest(*roots)
    v = Verdict(r)
    raised: Exception | None = None
    try:
        result = call()
    except Exception as exc:  # the row says which type, exactly
        raised = exc
    message = "" if raised is None else str(raised)
    ctx.data["error"] = message
    v.expect(
        "type",
        type(raised) is r.exc,
        f"{type(raised).__name__}: {message}"
        if raised is not None
        else f"nothing raised; returned a {type(result).__name__}",
    )
    v.expect("lines", "\n" not in message.strip(), message)
    v.expect("message", re.search(r.needle, message, re.I), (r.needle, message))
    if r.model is not None:
        v.run("model", lambda: _same_state(before_model, _model_state(ctx.data["model"])))
    _check_disk(v, ctx, before, roots)
    v.finish()


def test_the_plan_applies_to_the_model_it_was_made_for(tiny_plan):
    """The control of the apply rows: the same architecture is accepted, so their refusals are not vacuous."""
    from tiny_models import build

    peft_model = tiny_plan.apply(build("qwen3_5"))
    assert peft_model.get_nb_trainable_parameters()[0] == tiny_plan.cost


def test_tables_hold_at_least_sixty_rows():
    assert len(ALLOCATE) + len(INSPECT) + len(TUNE) + len(API) >= 60
