"""The one safe folder writer (probes.folders): atomic, marked, and never removing what the tool did not
write."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from probes.folders import MANIFEST, FolderError, clean_stale_temporaries, write_file, write_folder


def _files(**contents):
    def fill(folder):
        for name, text in contents.items():
            path = folder / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    return fill


def test_manifest_lists_what_was_written_and_an_overwrite_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    write_folder(out, _files(a="1", sub__b="2"))
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a", "sub/b"]
    (out / "mine.txt").write_text("user")
    (out / "sub" / "theirs.txt").write_text("user too")
    write_folder(out, _files(c="3"), overwrite=True)  # a and sub/b were ours: gone; the user's files stay
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == \
        [MANIFEST, "c", "mine.txt", "sub", "sub/theirs.txt"]
    assert json.loads((out / MANIFEST).read_text())["files"] == ["c"]


def test_a_new_file_may_not_replace_a_file_of_the_users(tmp_path):
    out = tmp_path / "out"
    write_folder(out, _files(a="1"))
    (out / "b").write_text("user")
    with pytest.raises(FolderError, match="was not written by this tool"):
        write_folder(out, _files(a="2", b="mine now"), overwrite=True)
    assert (out / "a").read_text() == "1" and (out / "b").read_text() == "user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary folder went too


def test_legacy_folder_counts_as_ours_only_when_it_holds_exactly_those_files(tmp_path):
    legacy = [{"x.json", "y.json"}]
    old = tmp_path / "old"
    old.mkdir()
    (old / "x.json").write_text("{}")
    (old / "y.json").write_text("{}")
    write_folder(old, _files(x__json="new"), overwrite=True, legacy=legacy)
    assert sorted(p.name for p in old.iterdir()) == [MANIFEST, "x"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("x.json", "y.json", "z.txt"):
        (mixed / name).write_text("{}")
    with pytest.raises(FolderError, match="did not write"):
        write_folder(mixed, _files(x="1"), overwrite=True, legacy=legacy)
    assert sorted(p.name for p in mixed.iterdir()) == ["x.json", "y.json", "z.txt"]


def test_links_empty_names_and_home_are_refused(tmp_path, monkeypatch):
    target = tmp_path / "target"
    write_folder(target, _files(a="1"))
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FolderError, match="symbolic link"):
        write_folder(link, _files(a="2"), overwrite=True)
    assert (target / "a").read_text() == "1"
    with pytest.raises(FolderError, match="empty"):
        write_folder("", _files(a="2"), overwrite=True)
    home = tmp_path / "home"
    write_folder(home, _files(a="1"))
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(FolderError, match="home"):
        write_folder(home, _files(a="2"), overwrite=True)


def test_stale_temporaries_of_dead_runs_go_and_others_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / ".allocator-tmp").touch()
    unmarked = tmp_path / f".out.tmp-{dead}-zzz999"  # no mark: not provably ours
    unmarked.mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-abc123"
    live.mkdir()
    (live / ".allocator-tmp").touch()
    other = tmp_path / f".other.tmp-{dead}-abc123"  # another folder's
    other.mkdir()
    (other / ".allocator-tmp").touch()
    assert clean_stale_temporaries(tmp_path, "out") == [stale]
    write_folder(tmp_path / "out", _files(a="1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", unmarked.name, live.name, other.name])


def test_new_folders_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = write_folder(tmp_path / "deep" / "out", _files(a="1"))
        single = write_file(tmp_path / "report.md", "text")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o750 and ((tmp_path / "deep").stat().st_mode & 0o777) == 0o750
    assert (single.stat().st_mode & 0o777) == 0o640 and single.read_text() == "text"


def test_write_file_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    seen = []
    write_file(tmp_path / "plot.png", lambda path: (seen.append(path.suffix), path.write_bytes(b"png")))
    assert seen == [".png"] and (tmp_path / "plot.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
