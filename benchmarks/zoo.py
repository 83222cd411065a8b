"""Build the reference models: ``python -m benchmarks.zoo [--only NAME] [--check]``.

Each model is the exact transformers architecture (``Qwen3_5ForCausalLM``, ``FalconH1ForCausalLM``,
``GraniteMoeHybridForCausalLM``) with the structure of the released config (layer-type pattern, head ratios,
gates, routed experts) and small sizes (``benchmarks.zoo_configs``). It
is pretrained from a fixed seed for a fixed token budget on the Python standard library (``benchmarks.tasks``)
with 10% associative-recall rows, then saved with its byte-level BPE tokenizer and a ``training.json``
(recipe, loss curve, held-out loss of the stored weights) in ``allocator/zoo/<name>/``. ``--check`` reloads
what is there through ``from_pretrained`` and recomputes the held-out loss. Reproducible on the same Python
stdlib and torch. The zoo is built from local text alone and never reaches the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from allocator.reference import CHAT_TEMPLATE, REFERENCE_MODELS, ZOO_DIR
from allocator.tuning.finetune import evaluate_loss, lr_at, token_loss_sum
from benchmarks import tasks
from benchmarks.log import log
from benchmarks.zoo_configs import VOCAB_SIZE, falcon_h1, granite_moe_hybrid, qwen3_5

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"  # ids 0, 1, 2
RECALL_FRACTION = 0.10
N_CURVE_EVAL, N_FINAL_EVAL = 64, 256  # held-out windows (x128 tokens) for the curve and the final loss


@dataclass(frozen=True)
class Recipe:
    """Pretraining settings of one reference model; stored in its ``training.json``."""

    config: dict[str, Any] = field(repr=False, metadata={"help": "transformers config (model_type first)"})
    steps: int = field(metadata={"help": "optimizer steps; tokens = steps x batch_size x seq_len"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW peak learning rate"})
    batch_size: int = field(default=16, metadata={"help": "rows per step"})
    seq_len: int = field(default=tasks.SEQ_LEN, metadata={"help": "tokens per row"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup, then cosine to 0"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    seed: int = field(default=0, metadata={"help": "init, data order and recall episodes"})
    eval_every: int = field(default=50, metadata={"help": "steps between held-out evals on the curve"})
    store_dtype: str = field(default="float32", metadata={"help": "dtype of model.safetensors"})
    router_aux_loss: float = field(default=0.0, metadata={
        "help": "weight of the routers' load-balancing loss (routed MoE; 0: none)"})


RECIPES: dict[str, Recipe] = {
    "qwen3_5_tiny": Recipe(qwen3_5(4), steps=700),
    "falcon_h1_tiny": Recipe(falcon_h1(), steps=700),
    "qwen3_5_deep": Recipe(qwen3_5(12), steps=500, store_dtype="bfloat16"),
    # the tiny models' recipe plus the routers' load-balancing loss (docs/reference-models.md says why)
    "granite_moe_tiny": Recipe(granite_moe_hybrid(), steps=700,
                               router_aux_loss=granite_moe_hybrid()["router_aux_loss_coef"]),
}
assert set(RECIPES) == set(REFERENCE_MODELS)


def build_tokenizer(train_files: tuple[Path, ...]) -> Any:
    """Byte-level BPE (vocab 2048) trained on the pretraining text plus recall episodes; deterministic."""
    rng = random.Random("tokenizer")
    texts = [tasks.read_source(p) for p in train_files]
    texts += [tasks.recall_episode(rng, tasks.PRETRAIN_RECALL).text for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )


def _batches(recipe: Recipe, tokenizer: Any, windows: Any, seed: int):
    """Yield (input_ids, attention_mask, labels) per step: shuffled stdlib windows, ~10% packed recall
    rows."""
    rng = random.Random(seed)
    recall_rng = random.Random(f"recall-{seed}")
    order: list[int] = []
    for _ in range(recipe.steps):
        rows = []
        for _ in range(recipe.batch_size):
            if rng.random() < RECALL_FRACTION:
                rows.append(
                    tasks.packed_recall_row(tokenizer, recall_rng, tasks.PRETRAIN_RECALL, recipe.seq_len)
                )
                continue
            if not order:  # a new pass over the windows
                order = list(range(len(windows)))
                rng.shuffle(order)
            w = windows[order.pop()]
            rows.append({"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w})
        yield {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def pretrain(
    name: str,
    tokenizer: Any,
    train_windows: Any,
    held_windows: Any,
    out_dir: Path,
    *,
    steps: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Pretrain reference model ``name``; save it with its tokenizer and ``training.json`` in ``out_dir``."""
    recipe = RECIPES[name]
    if steps is not None:
        recipe = Recipe(**{**asdict(recipe), "steps": steps})
    if seed is not None:
        recipe = Recipe(**{**asdict(recipe), "seed": seed})
    torch.manual_seed(recipe.seed)
    cfg = dict(recipe.config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = model.num_parameters()
    log(f"{name}: {type(model).__name__} ({config.model_type}), {n_params:,} parameters, "
        f"{recipe.steps} steps", "zoo")
    curve, tokens, wall = _train(name, model, recipe, tokenizer, train_windows, held_windows)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, recipe.store_dtype)).save_pretrained(out_dir)
    # Stored compactly, computed in fp32: from_pretrained loads in config.dtype.
    model.config.dtype = torch.float32
    model.config.save_pretrained(out_dir)
    tokenizer.chat_template = CHAT_TEMPLATE  # chat_template.jinja: chat data works on the built-in models
    tokenizer.save_pretrained(out_dir)
    record = {
        "name": name,
        "description": REFERENCE_MODELS[name],
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "n_params": n_params,
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "config"},
        "train_tokens": tokens,
        "wall_time_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "torch_threads": torch.get_num_threads(),
        "loss_curve": curve,
        "data": _data_record(tokenizer),
        "versions": _versions(),
        "date": datetime.date.today().isoformat(),
    }
    record.update(measure(out_dir))  # held-out loss etc. of the stored weights, loaded as users load them
    (out_dir / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log(f"{name}: held-out {record['heldout_loss']:.4f} nats/token, recall acc "
        f"{record['recall_accuracy']:.3f} (chance {record['recall_chance']:.3f}), {wall:.0f} s", "zoo")
    return record


def _train(name: str, model: Any, recipe: Recipe, tokenizer: Any, train_windows: Any,
           held_windows: Any) -> tuple[list[dict[str, float]], int, float]:
    """The pretraining loop of :func:`pretrain` (AdamW, warmup then cosine, clipped gradients), a held-out
    eval every ``recipe.eval_every`` steps. Returns the loss curve, the train tokens and the wall seconds."""
    curve_eval = tasks.lm_batches(held_windows[:N_CURVE_EVAL], recipe.batch_size)
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    curve: list[dict[str, float]] = []
    start, window_loss, window_n, tokens, window_aux = time.perf_counter(), 0.0, 0, 0, 0.0
    model.train()
    stack, aux = contextlib.ExitStack(), []
    if recipe.router_aux_loss:
        stack.enter_context(_load_balancing(model, aux))
    for step, batch in enumerate(_batches(recipe, tokenizer, train_windows, recipe.seed)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps)
        aux.clear()
        loss_sum, n = token_loss_sum(model, batch)
        loss = loss_sum / n
        if aux:  # the routers' load-balancing loss of this batch's forward
            loss = loss + recipe.router_aux_loss * aux[0]
            window_aux += aux[0].item()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: non-finite loss at step {step}; lower Recipe.lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # (a fixed part of the recipe)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_loss, window_n, tokens = window_loss + loss_sum.item(), window_n + n, tokens + n
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            held = evaluate_loss(model, curve_eval)
            elapsed = time.perf_counter() - start
            curve.append(
                {
                    "step": step + 1,
                    "tokens": tokens,
                    "train_loss": round(window_loss / window_n, 4),
                    "heldout_loss": round(held, 4),
                    "elapsed_s": round(elapsed, 1),
                }
            )
            if recipe.router_aux_loss:  # the window's mean; num_experts_per_tok when perfectly balanced
                window_steps = step + 1 - (curve[-2]["step"] if len(curve) > 1 else 0)
                curve[-1]["router_aux_loss"] = round(window_aux / window_steps, 4)
            log(f"{name} step {step + 1}/{recipe.steps} train {window_loss / window_n:.3f} held-out "
                f"{held:.3f} ({tokens / elapsed:,.0f} tok/s)", "zoo")
            window_loss, window_n, window_aux = 0.0, 0, 0.0
    stack.close()
    return curve, tokens, time.perf_counter() - start


@contextlib.contextmanager
def _load_balancing(model: Any, out: list):
    """Within the block the model's routers return their logits and every forward appends its load-balancing
    loss to ``out``: transformers' Switch loss per layer (``num_experts_per_tok`` when balanced), averaged
    over the layers. transformers' own ``aux_loss`` pools the layers' routing first, so it is at its minimum
    while single layers send most tokens to one expert (seen in a 150-step trial: 0.46 of one layer's tokens
    to one of 8 experts). The config is restored after, so the saved model's forward stays as it was."""
    config = model.config
    before = config.output_router_logits

    def hook(module, args, kwargs, output):
        mask = kwargs.get("attention_mask")
        layers = [load_balancing_loss_func((logits,), config.num_local_experts, config.num_experts_per_tok,
                                           mask) for logits in output.router_logits]
        out.append(sum(layers) / len(layers))

    config.output_router_logits = True
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        model.config.output_router_logits = before


def stdlib_description() -> str:
    """The pretraining text's source as ``training.json`` records it: the interpreter's version, never its
    folder (a path names one machine; the version and the corpus digest beside it fix the text)."""
    return f"Python {platform.python_version()} standard library (sysconfig stdlib)"


def _data_record(tokenizer: Any) -> dict[str, Any]:
    train, held = tasks.pretraining_files()
    return {
        "source": "Python standard library .py files (benchmarks.tasks.pretraining_files)",
        "stdlib": stdlib_description(),
        "python": platform.python_version(),
        "n_train_files": len(train),
        "n_heldout_files": len(held),
        "sha256": tasks.corpus_digest(train + held),
        "recall_fraction": RECALL_FRACTION,
        "recall_spec": asdict(tasks.PRETRAIN_RECALL),
        "vocab_size": len(tokenizer),
    }


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def measure(folder: Path) -> dict[str, float]:
    """Load ``folder`` through ``from_pretrained`` and score it: held-out loss over the first ``N_FINAL_EVAL``
    held-out windows, and answer accuracy on pretraining-style and shifted recall episodes."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    _, held = tasks.pretraining_files()
    windows = tasks.token_windows(tokenizer, held, max_windows=N_FINAL_EVAL)
    heldout = evaluate_loss(model, tasks.lm_batches(windows, 16))
    out = {"heldout_loss": round(heldout, 4), "heldout_tokens": int(windows.numel() - windows.shape[0])}
    for key, spec in (("recall", tasks.PRETRAIN_RECALL), ("shifted_recall", tasks.SHIFTED_RECALL)):
        batches = tasks.recall_batches(tokenizer, spec, n_rows=128, seed="zoo-recall-eval", batch_size=16)
        acc, chance = tasks.recall_accuracy(model, batches)
        out[f"{key}_accuracy"], out[f"{key}_chance"] = round(acc, 4), round(chance, 4)
    return out


def check(names: list[str], zoo_dir: Path) -> int:
    """Reload each model and compare the recomputed held-out loss with its ``training.json``."""
    failed = 0
    for name in names:
        folder = zoo_dir / name
        record = json.loads((folder / "training.json").read_text())
        now = measure(folder)
        ok = abs(now["heldout_loss"] - record["heldout_loss"]) < 1e-3
        failed += not ok
        log(
            f"{name}: held-out {now['heldout_loss']:.4f} (recorded {record['heldout_loss']:.4f}) "
            f"recall {now['recall_accuracy']:.3f} shifted {now['shifted_recall_accuracy']:.3f} "
            f"{'ok' if ok else 'MISMATCH'}",
            "zoo",
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=sorted(RECIPES), action="append", help="build only NAME (repeatable)"
    )
    parser.add_argument(
        "--check", action="store_true", help="reload the shipped models and report held-out loss"
    )
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="zoo folder (default: allocator/zoo)")
    parser.add_argument("--steps", type=int, default=None, help="override the step budget (trials only)")
    parser.add_argument("--seed", type=int, default=None,
                        help="override the recipe's seed (init, data order, recall episodes; the tokenizer "
                        "does not change): a second pretraining seed, e.g. --seed 1 --out build/zoo-seed1")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU, 2+ threads spin and stall)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only or list(RECIPES)
    if args.check:
        return check(names, args.out)
    train_files, held_files = tasks.pretraining_files()
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(train_files)
    train_windows = tasks.token_windows(tokenizer, train_files)
    held_windows = tasks.token_windows(tokenizer, held_files)
    log(
        f"tokenizer + corpus: {time.perf_counter() - t0:.0f} s; {train_windows.numel():,} train tokens in "
        f"{len(train_files)} files, {held_windows.numel():,} held-out tokens in {len(held_files)} files",
        "zoo",
    )
    for name in names:
        pretrain(name, tokenizer, train_windows, held_windows, args.out / name, steps=args.steps,
                 seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
