"""Hub conventions (issue 17 item 5): ``--revision``, the commit hash in the plan, and ``HF_HUB_OFFLINE``
honoured without a single network request, even when set after import (as in a notebook).

A hub cache is built in a temporary folder (``models--acme--tiny/snapshots/<commit>/`` holding the shipped
reference model), and every socket lookup is recorded: offline, none may happen.
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest

import allocator
from allocator.commands.cli import main
from allocator.errors import InputError
from allocator.reference import reference_model_path
from probes.settings import DataSettings, ProbeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"  # a second snapshot, tagged v1


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--acme--tiny"
    for commit in (COMMIT, OTHER):
        shutil.copytree(reference_model_path(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(OTHER)
    return root


@pytest.fixture()
def offline(hub_cache, monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported; the cache above; every lookup recorded."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lookups: list[str] = []

    def refuse(host, *args, **kwargs):
        lookups.append(str(host))
        raise OSError(f"no network in this test ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return lookups


def _allocate(model: str, **kw):
    data = [{"text": "def f(x):\n    return x + 1\n" * 4}] * 2
    return allocator.allocate(
        model,
        data=data,
        budget="r4",
        probe_settings=ProbeSettings(progress=False, max_rank=8),
        data_settings=DataSettings(seq_len=32, samples=2, batch_size=2),
        **kw,
    )


def test_an_offline_hub_id_loads_from_the_cache_without_a_request_and_records_its_commit(offline):
    plan = _allocate("acme/tiny")
    assert plan.model_id == "acme/tiny" and plan.provenance["model_revision"] == COMMIT
    assert _allocate("acme/tiny", revision="v1").provenance["model_revision"] == OTHER
    assert offline == []  # not one lookup: no retries, no waiting


def test_an_offline_hub_id_not_in_the_cache_fails_at_once(offline):
    with pytest.raises(InputError, match=r"could not find model 'acme/gone' offline; pass a local folder"):
        _allocate("acme/gone")
    with pytest.raises(InputError, match=r"'acme/tiny' at revision 'v9' offline"):
        _allocate("acme/tiny", revision="v9")
    assert offline == []


def test_allocate_and_inspect_take_revision_on_the_command_line(offline, tmp_path, capsys):
    assert main(["inspect", "acme/tiny", "--revision", OTHER]) == 0
    assert "decoder layers" in capsys.readouterr().out
    out = tmp_path / "plan"
    assert (
        main(
            [
                "acme/tiny",
                "--revision",
                "v1",
                "--budget",
                "r2",
                "--data-samples",
                "2",
                "--data-seq-len",
                "32",
                "--probe-max-rank",
                "8",
                "-q",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    provenance = json.loads((out / "allocation.json").read_text())["provenance"]
    assert provenance["model_revision"] == OTHER and provenance["config"]["values"]["revision"] == "v1"
    assert main([str(reference_model_path()), "--revision", "v1", "-o", str(tmp_path / "x")]) == 2
    assert "--revision picks a commit of a hub model" in capsys.readouterr().err
    assert offline == []
