"""The memory model (`allocator.memory`, `allocate inspect --probe-memory`) against measured peaks.

    python benchmarks/memory_model.py              # the small models of benchmarks/probe_overhead.py

For each model and phase, the predicted peak increase over the loaded model (traced on the meta device) next
to the measured one: the process's peak RSS (sampled every 5 ms) minus its RSS after the model was loaded and
ran one warm-up forward + backward, each phase in a fresh process, median over ``--repeats``. Measured twice:
with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns every freed tensor to the system, so RSS follows the
live tensors the model predicts) and with the default allocator (freed heap blocks stay in RSS).

- probes: ``probes.run`` with default settings on the modules `allocate` probes (spectra included);
- probes-ckpt: the same with ``gradient_checkpointing=True``;
- lora: PEFT LoRA r16 on the modules `allocate` offers, AdamW, one step per micro-batch.

Prints a Markdown table (command, machine, date); docs/results/memory_model.md holds the recorded run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("probes", "probes-ckpt", "lora")


def measure(phase: str, name: str) -> dict:
    """Measured and predicted peak increase (bytes) of one phase on one small model, in this process."""
    import torch  # noqa: PLC0415

    import probes  # noqa: PLC0415
    from allocator.discovery.components import find_components  # noqa: PLC0415
    from allocator.memory import estimate  # noqa: PLC0415
    from benchmarks.probe_overhead import SMALL, PeakRSS, build  # noqa: PLC0415

    model, batches, _ = build(name, SMALL)
    components = find_components(model)
    names = [c.name for c in components if c.eligible and not c.is_parameter]
    settings = probes.ProbeSettings(progress=False, gradient_checkpointing=phase == "probes-ckpt")
    shape = batches[0]["input_ids"].shape
    predicted = estimate(
        copy_to_meta(model), components, settings, batch_size=shape[0], seq_len=shape[1], lora=phase == "lora"
    )
    model.eval()
    warm = {k: v[:1, :64] for k, v in batches[0].items()}
    model(**warm, use_cache=False).loss.backward()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - imported before the measured section

    with PeakRSS() as rss:
        if phase == "lora":
            targets = [c.name for c in components if c.eligible and c.lora_effective and not c.is_parameter]
            model = get_peft_model(
                model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
            )
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            for batch in batches:
                model(**batch, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        else:
            probes.run(model, batches, names, settings)
    increase = predicted.lora_increase if phase == "lora" else predicted.probe_increase
    return {
        "phase": phase,
        "model": name,
        "measured": rss.peak - rss.start,
        "predicted": increase,
        "batch": list(shape),
    }


def copy_to_meta(model):
    import copy  # noqa: PLC0415

    return copy.deepcopy(model).to("meta")


# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so RSS also counts memory
# torch has freed; a fixed threshold returns every freed tensor above 128 KiB to the system at once
TRIMMED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _in_subprocess(phase: str, name: str, trimmed: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--model", name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(TRIMMED if trimmed else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{phase} on {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(measure(args.phase, args.model)))
        return
    from benchmarks.probe_overhead import SMALL, machine  # noqa: PLC0415

    info = machine()
    print(f"Command: `python benchmarks/memory_model.py --repeats {args.repeats}`  ")
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    print(f"Machine: {json.dumps(info)}  ")
    print(f"Load average at start: {os.getloadavg()}\n")
    print(
        "| model | phase | micro-batch | predicted MiB | measured MiB (median) | error | runs | "
        "default malloc: measured MiB (median) | error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SMALL:
        for phase in PHASES:
            runs = [_in_subprocess(phase, name, True) for _ in range(args.repeats)]
            plain = statistics.median(
                _in_subprocess(phase, name, False)["measured"] for _ in range(args.repeats)
            )
            measured = statistics.median(r["measured"] for r in runs)
            predicted = runs[0]["predicted"]
            b, t = runs[0]["batch"]
            shown = ", ".join(f"{r['measured'] / 2**20:.1f}" for r in runs)
            print(
                f"| {name} | {phase} | {b} x {t} | {predicted / 2**20:.1f} | {measured / 2**20:.1f} | "
                f"{(predicted - measured) / measured:+.1%} | "
                f"{shown} | {plain / 2**20:.1f} | {(predicted - plain) / plain:+.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
