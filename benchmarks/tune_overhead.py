"""What `allocate tune` costs beyond the fine-tunes it runs, and that probes run once per study.

    python -m benchmarks.tune_overhead            # allocator/zoo/qwen3_5_tiny, 6 trials x 60 steps (minutes)
    python -m benchmarks.tune_overhead --smoke    # seconds, tiny random-init model (tests)
    python -m benchmarks.tune_overhead --texts DIR   # only the train/eval text files docs/tuning.md uses

One single-mode study with the default search space; every trial solves (the only baseline kept is
``default``, which solves too), so the overhead measured is the solver path's. Data: the stdlib ``test/``
package (the text-domain task of ``benchmarks/tasks.py``) as train/eval text files. Per trial, from Optuna's
timestamps:

- fine-tune: ``FinetuneResult.wall_time_s`` (deep copy, PEFT wrap, steps, evals), the work itself;
- setup: suggest + ``compute_utilities`` + ``solve`` + ``Plan`` (timed inside the trial);
- trial overhead: trial duration minus the fine-tune (setup, ``to_lora_config``, sampler, storage writes);
- claim overhead: the gap between one trial's end and the next one's start (lock, stale check, count, ask).

Probe runs are counted by wrapping ``probes.cache.run`` and ``run_warm``: the study must run them once, and a
resumed study never. Writes ``docs/results/tune.md`` (``--out``) with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from transformers import AutoTokenizer

import allocator.tuning as api
import probes
import probes.cache
from allocator.discovery.modelio import load_model
from allocator.reference import ZOO_DIR
from benchmarks.probe_overhead import machine
from benchmarks.tasks import domain_files, read_source
from probes.settings import DataSettings
from probes.testing import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def domain_texts(folder: Path, max_chars: int) -> tuple[Path, Path]:
    """train.txt / eval.txt: the stdlib ``test/`` package split as ``benchmarks.tasks.domain_files`` splits
    it."""
    paths = []
    for name, files in zip(("train.txt", "eval.txt"), domain_files(), strict=True):
        text, size = [], 0
        for f in files:
            if size >= max_chars:
                break
            text.append(read_source(f))
            size += len(text[-1])
        (folder / name).write_text("\n".join(text))
        paths.append(folder / name)
    return paths[0], paths[1]


def model_and_tokenizer(smoke: bool) -> tuple[object, object, str]:
    """The reference model if built, else a random-init model of its shape (the report says which)."""
    path = ZOO_DIR / "qwen3_5_tiny"
    if not smoke and (path / "model.safetensors").is_file():
        return load_model(str(path)), AutoTokenizer.from_pretrained(str(path)), "allocator/zoo/qwen3_5_tiny"
    hidden, layers = (32, 2) if smoke else (128, 4)
    model = tiny_model("qwen3_5", hidden=hidden, layers=layers)
    label = f"random-init qwen3_5_text hidden {hidden}, {layers} layers (zoo model not built)"
    return model, byte_tokenizer(), label


def measure(smoke: bool, trials: int, steps: int) -> dict:
    calls: list[int] = []
    real = {name: getattr(probes.cache, name) for name in ("run", "run_warm")}  # with or without a warm-up
    for name, fn in real.items():  # count probe runs, not cache hits
        setattr(probes.cache, name, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
    model, tokenizer, label = model_and_tokenizer(smoke)
    seq_len, samples, batch = (32, 4, 2) if smoke else (128, 32, 4)
    with tempfile.TemporaryDirectory() as tmp:
        train, evals = domain_texts(Path(tmp), 20_000 if smoke else 2_000_000)
        kw = dict(out_dir=Path(tmp) / "study", tokenizer=tokenizer,
                  data_settings=DataSettings(seq_len=seq_len, samples=samples, batch_size=batch),
                  probe_settings=probes.ProbeSettings(progress=False, max_rank=8 if smoke else 64))
        settings = dict(steps=steps, batch_size=batch, eval_every=max(1, steps // 3), baselines=("default",),
                        train_samples=4 * samples if smoke else 256, eval_samples=samples,
                        pruner="none", max_rank="16,32" if smoke else "16,32,64")
        started = time.perf_counter()
        result = api.tune(model, train, evals, settings=api.TuneSettings(trials=trials, **settings), **kw)
        study_s = time.perf_counter() - started
        probe_runs = len(calls)
        resumed = api.tune(model, train, evals, settings=api.TuneSettings(trials=trials + 1, **settings),
                           **kw)
        resumed_probe_runs = len(calls) - probe_runs
        study = optuna.load_study(study_name="tune",
                                  storage=f"sqlite:///{Path(tmp) / 'study' / 'study.db'}")
        frozen = [t for t in study.get_trials() if t.state.name == "COMPLETE"][:trials]
    for name, fn in real.items():
        setattr(probes.cache, name, fn)
    rows = []
    for prev, t in zip([None, *frozen], frozen):
        timing = t.user_attrs["timing"]
        duration = (t.datetime_complete - t.datetime_start).total_seconds()
        gap = None if prev is None else (t.datetime_start - prev.datetime_complete).total_seconds()
        rows.append({"trial": t.number, "finetune_s": timing["objective_s"], "setup_s": timing["setup_s"],
                     "overhead_s": duration - timing["objective_s"], "claim_s": gap})
    finetune = sum(r["finetune_s"] for r in rows)
    overhead = sum(r["overhead_s"] for r in rows) + sum(r["claim_s"] or 0.0 for r in rows)
    return {"model": label, "trials": trials, "steps": steps, "rows": rows, "study_s": study_s,
            "finetune": f"batch {batch} x {seq_len} tokens, {settings['train_samples']} train / "
                        f"{settings['eval_samples']} eval sequences, eval every {settings['eval_every']} "
                        "steps",
            "probe_runs": probe_runs, "resumed_probe_runs": resumed_probe_runs,
            "probe_s": result.probe_seconds,
            "resumed_trials": len(resumed.trials), "finetune_s": finetune, "overhead_s": overhead,
            "overhead_ratio": overhead / finetune,
            "median_trial_ratio": statistics.median(r["overhead_s"] / r["finetune_s"] for r in rows)}


def render(res: dict, command: str, info: dict) -> str:
    lines = [
        "# `allocate tune` overhead", "",
        f"Command: `{command}`  ", f"Date: {info['date']}  ",
        f"Machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}; load average at start "
        f"{info['load_avg']} (a shared machine: wall times are inflated, ratios less so).  ",
        f"Model: {res['model']}; {res['trials']} trials x {res['steps']} steps ({res['finetune']}), single "
        "mode, default search space, the stdlib `test/` package as train/eval text.", "",
        f"- probe runs: **{res['probe_runs']}** for the study ({res['probe_s']:.1f} s), "
        f"**{res['resumed_probe_runs']}** when the study was resumed for one more trial (cache hit in "
        "OUT_DIR/probes)",
        f"- fine-tunes: {res['finetune_s']:.1f} s in all; overhead beyond them (in trials + between trials): "
        f"{res['overhead_s']:.2f} s = **{100 * res['overhead_ratio']:.2f}%** (target <= 5%); median per "
        f"trial {100 * res['median_trial_ratio']:.2f}%",
        f"- whole study, probes, model load and the report included: {res['study_s']:.1f} s", "",
        "| trial | fine-tune s | setup s (suggest + utilities + solve + plan) | trial overhead s "
        "| claim gap s | overhead % |", "|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        claim = "–" if r["claim_s"] is None else f"{r['claim_s']:.3f}"
        share = 100 * (r["overhead_s"] + (r["claim_s"] or 0)) / r["finetune_s"]
        lines.append(f"| {r['trial']} | {r['finetune_s']:.2f} | {r['setup_s']:.3f} | {r['overhead_s']:.3f} | "
                     f"{claim} | {share:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long run on a tiny random model (tests)")
    parser.add_argument("--trials", type=int, default=6, help="trials of the study (default 6)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tune steps per trial (default 60)")
    parser.add_argument("--out", default=str(ROOT / "docs/results/tune.md"), help="markdown report path")
    parser.add_argument("--texts", metavar="DIR", help="only write DIR/train.txt and DIR/eval.txt (the "
                        "stdlib test/ package, as docs/tuning.md's study uses them) and exit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own; on a "
                        "shared machine 1 avoids OpenMP spinning against other jobs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.texts:
        Path(args.texts).mkdir(parents=True, exist_ok=True)
        train, evals = domain_texts(Path(args.texts), 2_000_000)
        print(f"wrote {train} ({train.stat().st_size:,} bytes) and {evals} ({evals.stat().st_size:,} bytes)")
        return {}
    info = machine()
    trials, steps = (3, 2) if args.smoke else (args.trials, args.steps)
    res = measure(args.smoke, trials, steps)
    command = "python -m benchmarks.tune_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(res, command.strip(), info))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))
    return res


if __name__ == "__main__":
    main()
