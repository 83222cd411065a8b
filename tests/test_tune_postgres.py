"""`allocate tune` on a real PostgreSQL server (issue 17 item 4), started here with ``pgserver``: two workers
with folders of their own (as on two machines) share one study through the server and keep sqlite's
guarantees (exactly N finished trials, no configuration twice, a resumed study grows by what is asked); the
study is readable by optuna-dashboard (every user attribute is JSON; its API lists the study and its trials).
"""

from __future__ import annotations

import json
import subprocess
import sys
import wsgiref.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'hybrid-lora-allocator[dev]'")
pgserver = pytest.importorskip("pgserver", reason="starts a PostgreSQL server: pip install pgserver")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg")
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")
        uri = server.get_uri()
    except Exception as exc:  # no binary for this platform, no shared memory, a sandbox refusing sockets
        pytest.skip(f"pgserver could not start a PostgreSQL server here ({type(exc).__name__}: {exc})")
    yield uri.replace("postgresql://", "postgresql+psycopg://", 1)
    server.cleanup()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    from probes.testing import byte_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("pg-tune")
    tiny_model("llama", hidden=32, layers=2).save_pretrained(folder / "model")
    byte_tokenizer().save_pretrained(folder / "model")
    (folder / "train.txt").write_text((ROOT / "probes" / "data.py").read_text() * 2)
    (folder / "eval.txt").write_text((ROOT / "probes" / "runner.py").read_text())
    (folder / "study.yaml").write_text(  # the study's settings as a config file, the same for every worker
        f"model: {folder / 'model'}\n"
        f"data: {{source: {folder / 'train.txt'}, eval_source: {folder / 'eval.txt'}, seq_len: 32, "
        "samples: 4, batch_size: 2}\n"
        "probes: {max_rank: 8, progress: false}\n"
        "tune: {steps: 4, eval_every: 0, batch_size: 2, train_samples: 8, eval_samples: 4, budget: r4,\n"
        "       max_rank: '8,16', baselines: [uniform], heartbeat_interval: 1, grace_period: 10}\n"
    )
    return {"config": str(folder / "study.yaml")}


def _worker(setup, url: str, out: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "allocator.commands.cli", "tune", "--config", setup["config"], "--storage",
            url, "--study-name", "pg", "--tune-trials", str(trials), "-o", str(out)]


def _trials(url: str):
    import optuna

    return optuna.load_study(study_name="pg", storage=url).get_trials()


@pytest.fixture(scope="module")
def shared_study(postgres, setup, tmp_path_factory) -> Path:
    """Two workers, each with a folder of its own (two machines), run one 5-trial study on the server."""
    root = tmp_path_factory.mktemp("machines")
    workers = [subprocess.Popen(_worker(setup, postgres, root / f"machine{i}", 5), cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [log[-3000:] for log in logs]
    return root


def test_two_workers_on_one_postgres_study_keep_sqlites_guarantees_and_resume(postgres, setup, shared_study):
    trials = _trials(postgres)
    assert [t.number for t in trials] == list(range(5)), [t.state for t in trials]  # none lost, none extra
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert sum(t.user_attrs.get("baseline") == "uniform" for t in trials) == 1  # enqueued once for both
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)  # no configuration evaluated twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials
    for out in (shared_study / "machine0", shared_study / "machine1"):
        assert (out / "best" / "adapter_config.json").is_file()
        assert json.loads((out / "tune.json").read_text())["study"] == "pg"

    resumed = subprocess.run(_worker(setup, postgres, shared_study / "machine0", 6), cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [t.number for t in _trials(postgres)] == list(range(6))  # resumed: one more trial, not a new study


def test_the_study_reads_in_optuna_dashboard(postgres, shared_study):
    import optuna

    study = optuna.load_study(study_name="pg", storage=postgres)
    json.dumps(study.user_attrs, allow_nan=False)  # raises on anything a browser's JSON.parse would refuse
    for trial in study.trials:
        json.dumps(trial.user_attrs, allow_nan=False)
    dashboard = pytest.importorskip("optuna_dashboard", reason="pip install optuna-dashboard for its API")
    app = dashboard.wsgi(postgres)
    summaries = json.loads(_get(app, "/api/studies"))["study_summaries"]
    listed = {s["study_name"]: s["study_id"] for s in summaries}
    assert "pg" in listed
    detail = json.loads(_get(app, f"/api/studies/{listed['pg']}"))
    assert len(detail["trials"]) == len(study.trials)


def _get(app, path: str) -> str:
    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status and status[0].startswith("200"), (path, status, body[:300])
    return body.decode()


def test_the_server_lock_lets_one_worker_claim_at_a_time(postgres):
    """What keeps workers on two machines from both claiming the last trial: the second waits on the
    server's lock until the first lets go, and a lock let go is not kept by a pooled connection."""
    import threading

    import sqlalchemy

    from allocator.tuning.storage import ServerLock

    engine = sqlalchemy.create_engine(postgres)
    first, second = ServerLock(engine, "pg"), ServerLock(engine, "pg")
    got = threading.Event()
    first.acquire()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    assert not got.wait(1.0)  # blocked while the first holds it
    first.release()
    assert got.wait(30)  # ... and claims it once released
    second.release()
    waiter.join()
    with ServerLock(engine, "pg"), ServerLock(engine, "other"):  # another study's lock is another lock
        pass
    engine.dispose()
