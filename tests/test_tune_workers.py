"""`allocate tune` as separate processes: two workers share one sqlite study; a killed study resumes.

The workers run the real CLI on a tiny random-init Llama saved to a folder (hidden 32, 2 layers, byte
tokenizer).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    from probes.testing import byte_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("tune-workers")
    tiny_model("llama", hidden=32, layers=2).save_pretrained(folder / "model")
    byte_tokenizer().save_pretrained(folder / "model")
    (folder / "train.txt").write_text((ROOT / "probes" / "data.py").read_text() * 2)
    (folder / "eval.txt").write_text((ROOT / "probes" / "runner.py").read_text())
    return {k: str(folder / v) for k, v in (("model", "model"), ("train", "train.txt"), ("eval", "eval.txt"))}


def _command(setup: dict[str, str], out: Path, trials: int, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "allocator.commands.cli", "tune", setup["model"], "--data", setup["train"],
            "--eval-data", setup["eval"], "-o", str(out), "--tune-trials", str(trials),
            "--tune-steps", str(steps), "--tune-eval-every", "0", "--tune-batch-size", "2",
            "--tune-train-samples", "8", "--tune-eval-samples", "4", "--tune-budget", "r4",
            "--tune-max-rank", "8,16", "--tune-baselines", "uniform", "--tune-heartbeat-interval", "1",
            "--tune-grace-period", "2", "--data-seq-len", "32", "--data-samples", "4",
            "--data-batch-size", "2", "--probe-max-rank", "8", "--quiet", *extra]


def _trials(out: Path):
    import optuna

    return optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}").get_trials()


def _finished(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


def test_two_workers_share_one_study_without_losing_or_duplicating_trials(setup, tmp_path):
    out = tmp_path / "study"
    # with EVA's init (each worker computes the directions it needs): the CLI records it in the winning plan
    workers = [subprocess.Popen(_command(setup, out, 6, 4, "--init", "eva"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = _trials(out)
    assert len(_finished(trials)) == 6 and len(trials) == 6, [t.state for t in trials]  # none lost, no extra
    assert [t.number for t in trials] == list(range(6))
    assert sum(t.user_attrs.get("baseline") == "uniform" for t in trials) == 1  # enqueued once for both
    # the last slot scores uniform at the winner's lr and alpha, once for both workers (unless the winner is
    # uniform at the base settings already)
    extra = [t for t in trials if t.user_attrs.get("baseline") == "uniform@winner"]
    complete = [t for t in trials if t.state.name == "COMPLETE" and t not in extra]
    winner = min(complete, key=lambda t: (t.value, t.user_attrs["cost"], t.number))  # before the last slot
    if winner.params.get("placement") != "uniform":
        assert len(extra) == 1 and extra[0].number == 5, [t.user_attrs for t in trials]
        assert {k: extra[0].params[k] for k in ("lr", "alpha_ratio")} == {
            k: winner.params[k] for k in ("lr", "alpha_ratio")
        }
    else:
        assert extra == []
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)  # no configuration evaluated twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials
    assert len(list((out / "probes").glob("probe-*"))) == 1  # probes ran once for the study
    assert json.loads((out / "best" / "allocation.json").read_text())["init"] == "eva"
    assert all("Plan.load(" in log and "init_data=" in log for log in logs)  # how to apply an EVA plan


def test_study_killed_mid_trial_resumes_and_finishes(setup, tmp_path):
    out = tmp_path / "study"
    # long enough trials (seconds, even on a fast machine) that the kill lands inside one
    command = _command(setup, out, trials=3, steps=1500)
    worker = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
            if (out / "study.db").is_file():
                try:
                    with sqlite3.connect(out / "study.db", timeout=30) as db:
                        rows = db.execute("SELECT number FROM trials WHERE state = 'RUNNING'").fetchall()
                except sqlite3.OperationalError:  # the file exists before Optuna has created its tables
                    rows = []
                if rows and rows[0][0] >= 1:  # a searched trial
                    worker.kill()  # SIGKILL: no cleanup, the trial stays RUNNING in the storage
                    killed = rows[0][0]
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    assert killed is not None, "the worker finished or never started a trial before it could be killed"
    assert [t.state.name for t in _trials(out)].count("RUNNING") == 1

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = _trials(out)
    states = {t.number: t.state.name for t in trials}
    assert len(_finished(trials)) == 3 and states[killed] == "FAIL"
    assert "RUNNING" not in states.values() and "WAITING" not in states.values()
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"  # the killed trial was re-run, same params
    # same params as far as the killed trial had suggested them (a kill can land between two suggestions; the
    # retry then draws the rest)
    killed_params = next(t for t in trials if t.number == killed).params
    assert killed_params and killed_params.items() <= retry[0].params.items()
    assert (out / "best" / "adapter_config.json").is_file() and (out / "study.md").is_file()


def test_trial_orphaned_before_its_first_heartbeat_is_failed_and_rerun(setup, tmp_path):
    """A worker killed between claiming a trial and its first heartbeat leaves a RUNNING trial Optuna never
    calls stale (it has no heartbeat to age); the next worker must fail and rerun it, not wait for it
    forever."""
    import optuna

    out = tmp_path / "study"
    first = subprocess.run(_command(setup, out, trials=2, steps=4), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    # what the killed worker left: ``ask`` committed the trial as RUNNING, no heartbeat thread ever started
    orphan = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}").ask().number

    resumed = subprocess.run(
        _command(setup, out, trials=3, steps=4), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = _trials(out)
    states = {t.number: t.state.name for t in trials}
    assert states[orphan] == "FAIL" and len(_finished(trials)) == 3, states
    assert "RUNNING" not in states.values() and "WAITING" not in states.values()
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
