"""Cost of the calibration probes next to a plain forward + backward over the same batches on the same model.

    python benchmarks/probe_overhead.py            # tiny Qwen3.5-style and Falcon-H1-style models
    python benchmarks/probe_overhead.py --full     # also the full-size Qwen3.5-0.8B architecture (minutes)

Each phase runs in a fresh Python process (so peak memory is the phase's own), alternating plain / probes
``--repeats`` times; ratios are medians over repeats of the within-repeat ratio probes / plain.

- lora: PEFT LoRA r16 (dropout 0) on every probed module, only the adapters require grad,
  ``model(**batch).loss.backward()`` per micro-batch, no optimizer step: the step a user can afford.
- plain: every weight requires grad, ``model(**batch).loss.backward()`` per micro-batch (standard autograd,
  weight gradients accumulated in ``.grad``), no optimizer step: the full-gradient comparison.
- probes: ``probes.run(model, batches, modules)`` over the same batches with default settings (weights frozen,
  all statistics on, gradient sketches where ``grad_sketch="auto"`` sketches, spectra computed at the end),
  modules = every ``nn.Linear`` except the LM head.
- probes-exact: the same with ``grad_sketch="exact"`` (full gradient halves: the test oracle).
- probes-ckpt (full size only): ``probes`` with ``gradient_checkpointing=True``, the setting for tight memory.

Wall time: ``time.perf_counter`` around the phase, after one untimed forward + backward on a slice of the
first batch (lazy kernel and autograd set-up; its gradients are dropped). CPU time (``time.process_time``, all
threads) is reported too: it is less disturbed by other jobs on a shared machine. Memory: the process's
resident set size (RSS), sampled every 5 ms by a thread with ``psutil`` during the timed section (tracemalloc
does not see torch's allocations); the kernel's lifetime peak ``ru_maxrss`` is recorded as a cross-check. Both
totals include the interpreter, torch and the model; ``delta`` is peak minus the RSS just before the phase.

Writes ``docs/results/probes.md`` (``--out``) with the command, the machine and the date of each section;
sections of an existing file that are not re-run now (e.g. the small models under ``--only-full``) are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# psutil, torch, transformers and probes are imported inside the functions that use them: run as a script
# (`python benchmarks/probe_overhead.py`, as every measured phase's child process is), the checkout joins
# sys.path only in the __main__ block at the end.
ROOT = Path(__file__).resolve().parents[1]
# The real Qwen3.5-0.8B config, shipped with the package (the `allocate inspect` default; byte for byte the
# tests' fixture tests/fixtures/configs/qwen3_5__Qwen__Qwen3.5-0.8B.RECONSTRUCTED.json)
FULL_CONFIG = ROOT / "allocator" / "data" / "qwen3_5-0.8b.config.json"

# name -> (family, config overrides, data: seq_len, samples, batch_size)
SMALL = {
    "qwen3_5-small": ("qwen3_5", dict(hidden=128, layers=4, vocab=2048), (256, 16, 4)),
    "falcon_h1-small": ("falcon_h1", dict(hidden=128, layers=4, vocab=2048), (256, 16, 4)),
}
SMOKE = {"qwen3_5-smoke": ("qwen3_5", dict(hidden=32, layers=2, vocab=260), (32, 4, 2))}
FULL = {"qwen3_5-0.8B": ("qwen3_5-full", {}, (512, 4, 1))}
SMALL_TITLE = "Small models (hidden 128, 4 layers, vocab 2048, 4 micro-batches x 4 x 256 tokens)"
FULL_TITLE = "Full-size Qwen3.5-0.8B architecture (random weights, fp32, 4 micro-batches x 1 x 512 tokens)"


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds in a daemon thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil  # noqa: PLC0415

        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def build(name: str, specs: dict):
    """(model, batches, module names) for one benchmark model, deterministic."""
    import torch  # noqa: PLC0415

    from probes import load_batches  # noqa: PLC0415
    from probes.testing import byte_tokenizer, linear_names, tiny_model  # noqa: PLC0415

    family, overrides, (seq_len, samples, batch_size) = specs[name]
    if family == "qwen3_5-full":
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

        text = json.loads(FULL_CONFIG.read_text())["text_config"]
        config = AutoConfig.for_model("qwen3_5_text", **{k: v for k, v in text.items() if k != "model_type"})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = tiny_model(family, **overrides)
    batches = load_batches("builtin", byte_tokenizer(), seq_len=seq_len, samples=samples,
                           batch_size=batch_size)
    return model, batches, linear_names(model)


def measure(phase: str, name: str, specs: dict) -> dict:
    """Run one phase on one model in this process; wall seconds and memory in bytes."""
    import probes  # noqa: PLC0415

    model, batches, modules = build(name, specs)
    model.eval()
    warm = {k: v[:1, : min(64, v.shape[1])] for k, v in batches[0].items()}
    model(**warm, use_cache=False).loss.backward()  # untimed warm-up (forward and backward), in every phase
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(phase == "plain")
    if phase == "lora":
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415

        # PEFT refuses LoRA on the Mamba mixers' out_proj (_check_lora_target_modules_mamba): those are
        # left out of the LoRA step, as `allocate` leaves them out of a plan
        from allocator.discovery.components import find_components  # noqa: PLC0415

        offered = {c.name for c in find_components(model) if c.lora_effective}
        targets = [n for n in modules if n in offered]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=targets))
    with PeakRSS() as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        if phase in ("plain", "lora"):
            for batch in batches:
                model(**batch, use_cache=False).loss.backward()
        else:
            settings = probes.ProbeSettings(progress=False, gradient_checkpointing=phase == "probes-ckpt",
                                            grad_sketch="exact" if phase == "probes-exact" else "auto")
            probes.run(model, batches, modules, settings)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"phase": phase, "model": name, "wall_s": wall, "cpu_s": cpu, "rss_before": rss.start,
            "rss_peak": rss.peak, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens": tokens, "n_batches": len(batches), "n_modules": len(modules),
            "n_params": sum(p.numel() for p in model.parameters())}


def _phase_in_subprocess(phase: str, name: str, spec_set: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--model", name,
           "--spec-set", spec_set]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{phase} on {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(names: list[str], spec_set: str, repeats: int, in_process: bool = False,
            extra: tuple[str, ...] = ()) -> list[dict]:
    """Alternate plain / probes (/ ``extra`` phases) ``repeats`` times per model; one summary row per
    model."""
    specs = _spec_sets()[spec_set]
    rows = []
    for name in names:
        runs = {phase: [] for phase in ("lora", "probes", "plain", "probes-exact", *extra)}
        for _ in range(repeats):
            for phase in runs:
                result = (measure(phase, name, specs) if in_process
                          else _phase_in_subprocess(phase, name, spec_set))
                runs[phase].append(result)
                print("raw " + json.dumps(result), file=sys.stderr, flush=True)
                print(f"{name:18s} {phase:6s} {result['wall_s']:8.2f} s  cpu {result['cpu_s']:8.2f} s  "
                      f"peak {result['rss_peak'] / 2**20:8.0f} MiB", file=sys.stderr, flush=True)
        # per phase: medians; ratios: the median over repeats of (probes / plain) within one repeat, whose two
        # phases ran back to back under similar load (robust to one lucky or unlucky run on a shared machine)
        med = {ph: {k: statistics.median(r[k] for r in rs)
                    for k in ("wall_s", "cpu_s", "rss_peak", "rss_before", "ru_maxrss")}
               for ph, rs in runs.items()}
        p, q = med["plain"], med["probes"]
        pairs = list(zip(runs["plain"], runs["probes"], strict=True))

        def paired(key, pairs=pairs):
            return statistics.median(b[key] / a[key] for a, b in pairs)

        def paired_delta(pairs=pairs):
            return statistics.median((b["rss_peak"] - b["rss_before"])
                                     / max(a["rss_peak"] - a["rss_before"], 1) for a, b in pairs)

        def versus(base, phase, key, runs=runs):  # median over repeats of phase / base within a repeat
            return statistics.median(b[key] / a[key] for a, b in zip(runs[base], runs[phase], strict=True))

        lora_rows = {ph: {"wall_ratio": versus("lora", ph, "wall_s"),
                          "cpu_ratio": versus("lora", ph, "cpu_s"),
                          "peak_ratio": versus("lora", ph, "rss_peak"), **med[ph]}
                     for ph in runs if ph != "lora"}
        rows.append({
            "lora": med["lora"], "versus_lora": lora_rows,
            "model": name, "n_params": runs["plain"][0]["n_params"],
            "n_modules": runs["plain"][0]["n_modules"], "tokens": runs["plain"][0]["tokens"],
            "n_batches": runs["plain"][0]["n_batches"], "repeats": repeats,
            "extra": {ph: med[ph] for ph in extra},
            "exact": med["probes-exact"], "exact_wall_ratio": versus("plain", "probes-exact", "wall_s"),
            "exact_peak_ratio": versus("plain", "probes-exact", "rss_peak"),
            "plain": p, "probes": q, "wall_ratio": paired("wall_s"), "cpu_ratio": paired("cpu_s"),
            "peak_ratio": paired("rss_peak"), "delta_ratio": paired_delta(),
            "min_wall_ratio": (min(r["wall_s"] for r in runs["probes"])
                               / min(r["wall_s"] for r in runs["plain"])),
            "walls": {ph: [r["wall_s"] for r in rs] for ph, rs in runs.items()},
            "cpus": {ph: [r["cpu_s"] for r in rs] for ph, rs in runs.items()},
        })
    return rows


def _spec_sets() -> dict:
    return {"small": SMALL, "smoke": SMOKE, "full": FULL}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover - not Linux
        cpu = platform.processor() or "unknown"
    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415

    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


HEADER = (
    "# Probe overhead\n\n"
    "Method (see `benchmarks/probe_overhead.py`): each phase in a fresh process, after an untimed warm-up "
    "forward + backward; *plain* = all weights require grad, `loss.backward()` per micro-batch; *lora* = "
    "PEFT LoRA r16 on the probed modules, `loss.backward()` per micro-batch; *probes* = `probes.run` with "
    "default settings (gradient sketches) on every `nn.Linear` but the LM head (spectra included); "
    "*probes-exact* = the same with `grad_sketch=\"exact\"`. Memory = "
    "process RSS sampled every 5 ms (psutil) during the phase; *delta* = peak minus RSS before the phase; "
    "CPU time = `time.process_time` (all threads). Phase columns are medians over the repeats; each ratio is "
    "the median over repeats of probes / plain within a repeat (the two phases ran back to back under "
    "similar load), which a single lucky or unlucky run on the shared CPU does not move. Every repeat is "
    "listed under its table.\n"
)


def render_section(title: str, rows: list[dict], command: str, info: dict) -> str:
    mib = 2**20
    lines = [
        f"## {title}", "",
        f"Command: `{command}`  ", f"Date: {info['date']}  ",
        f"Machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, {info['ram_gib']} GiB RAM; torch "
        f"{info['torch']} ({info['torch_threads']} threads), Python {info['python']}. Load average at start "
        f"{info['load_avg']}: the CPU is shared with other jobs, so wall times are noisy.", "",
        "| model | params | probed modules | batches x tokens | plain wall s | probes wall s | wall ratio "
        "| CPU-time ratio | plain peak MiB | probes peak MiB | peak ratio | delta ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, q = r["plain"], r["probes"]
        lines.append(
            f"| {r['model']} | {r['n_params'] / 1e6:.1f}M | {r['n_modules']} | {r['n_batches']} x "
            f"{r['tokens'] // r['n_batches']} | {p['wall_s']:.2f} | {q['wall_s']:.2f} | "
            f"**{r['wall_ratio']:.2f}** | {r['cpu_ratio']:.2f} | {p['rss_peak'] / mib:.0f} | "
            f"{q['rss_peak'] / mib:.0f} | **{r['peak_ratio']:.2f}** | {r['delta_ratio']:.2f} |")
    lines += ["", "Against a LoRA r16 forward + backward over the same batches (the step the user can "
              "afford; ratios: median over repeats of phase / lora within a repeat):", "",
              "| model | lora wall s | lora peak MiB | phase | wall s | wall ratio | CPU-time ratio "
              "| peak MiB | peak ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo = r["lora"]
        for phase, v in r["versus_lora"].items():
            bold = "**" if phase == "probes" else ""
            lines.append(
                f"| {r['model']} | {lo['wall_s']:.2f} | {lo['rss_peak'] / mib:.0f} | {phase} | "
                f"{v['wall_s']:.2f} | {bold}{v['wall_ratio']:.2f}{bold} | {v['cpu_ratio']:.2f} | "
                f"{v['rss_peak'] / mib:.0f} | {bold}{v['peak_ratio']:.2f}{bold} |")
    lines.append("")
    for r in rows:
        lines.append(f"- {r['model']}, probes-exact (`grad_sketch=\"exact\"`, full gradient halves) against "
                     f"plain: wall {r['exact_wall_ratio']:.2f}x, peak {r['exact_peak_ratio']:.2f}x.")
        for phase, m in r.get("extra", {}).items():
            lines.append(f"- {r['model']}, {phase} (probes with `gradient_checkpointing=True`): wall "
                         f"{m['wall_s']:.1f} s, CPU {m['cpu_s']:.1f} s, peak RSS "
                         f"{m['rss_peak'] / mib:.0f} MiB "
                         f"({m['rss_peak'] / r['plain']['rss_peak']:.2f}x plain).")
        lines.append(f"- {r['model']}: wall s per repeat plain {[round(w, 2) for w in r['walls']['plain']]}, "
                     f"probes {[round(w, 2) for w in r['walls']['probes']]} (ratio of the fastest runs "
                     f"{r['min_wall_ratio']:.2f}); CPU s plain {[round(w, 2) for w in r['cpus']['plain']]}, "
                     f"probes {[round(w, 2) for w in r['cpus']['probes']]}; ru_maxrss plain "
                     f"{r['plain']['ru_maxrss'] / mib:.0f} MiB, probes {r['probes']['ru_maxrss'] / mib:.0f} "
                     "MiB.")
    return "\n".join(lines) + "\n"


def merge(existing: str, sections: dict[str, str]) -> str:
    """HEADER, then the sections of ``existing`` not regenerated now, then the new ones (by title)."""
    kept = {}
    for chunk in existing.split("\n## ")[1:]:
        title = chunk.split("\n", 1)[0].strip()
        kept[title] = "## " + chunk.rstrip("\n") + "\n"
    kept.update(sections)
    return HEADER + "".join("\n" + text for text in kept.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="also run the full-size Qwen3.5-0.8B architecture")
    parser.add_argument("--only-full", action="store_true", help="run only the full-size model")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long in-process run (tests)")
    parser.add_argument("--repeats", type=int, default=3, help="alternations per small model (full: 1)")
    parser.add_argument("--out", default=str(ROOT / "docs/results/probes.md"), help="markdown report path")
    parser.add_argument("--phase", choices=["lora", "plain", "probes", "probes-exact", "probes-ckpt"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--spec-set", default="small", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:  # child process: one measurement, one JSON line
        print(json.dumps(measure(args.phase, args.model, _spec_sets()[args.spec_set])))
        return {}
    info = machine()
    given = argv if argv is not None else sys.argv[1:]
    command = ("python benchmarks/probe_overhead.py " + " ".join(given)).strip()
    runs = []
    if args.smoke:
        runs.append(("Smoke", compare(list(SMOKE), "smoke", 1, in_process=True)))
    else:
        if not args.only_full:
            runs.append((SMALL_TITLE, compare(list(SMALL), "small", args.repeats)))
        if args.full or args.only_full:
            runs.append((FULL_TITLE, compare(list(FULL), "full", 1, extra=("probes-ckpt",))))
    out = Path(args.out)
    existing = out.read_text(encoding="utf-8") if out.exists() and not args.smoke else ""
    text = merge(existing, {title: render_section(title, rows, command, info) for title, rows in runs})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    return {"sections": runs, "machine": info, "markdown": text}

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
