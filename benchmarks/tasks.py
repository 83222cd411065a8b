"""Data for the reference models and the fine-tune tasks that score a LoRA placement.

Every text source is present on every machine: the Python standard library of the running interpreter.

- Pretraining (``benchmarks.zoo``): stdlib ``.py`` sources outside any test directory, ``idlelib`` and
  ``site-packages``; a file is held out when ``sha256(relative path) % 20 == 0`` (about 5%), so the split does
  not move when a Python release adds files. 10% of pretraining rows (7.5% of tokens) are associative recall
  (``PRETRAIN_RECALL``).
- Tasks, shifted from pretraining: ``text_domain`` (the stdlib's own ``test/`` package, never pretrained on),
  ``recall`` (``SHIFTED_RECALL``: keys over new letters, longer, more pairs; scored by answer accuracy against
  chance), ``fact_recall`` (new key -> value facts stored in the weights) and ``retention`` (loss on held-out
  pretraining text; eval only).

Batches are dicts of ``input_ids`` / ``attention_mask`` / ``labels`` (``-100`` where no loss is taken), the
format :func:`allocator.tuning.finetune.finetune` takes. Everything is deterministic under the ``seed``
argument.
"""

from __future__ import annotations

import functools
import hashlib
import random
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from allocator.errors import AllocatorError
from allocator.tuning.finetune import evaluate_loss
from benchmarks.instruction import instruction_task
from benchmarks.taskdef import Batch, Task

SEQ_LEN = 128
RECALL_SEQ_LEN = 192
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)


# ---------------------------------------------------------------- text corpus


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _held_out(rel: str, modulus: int) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % modulus == 0


@functools.lru_cache(maxsize=4)
def pretraining_files(root: Path | None = None) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(train, held-out) stdlib sources by relative path, excluding tests, idlelib and site-packages."""
    root = stdlib_root() if root is None else root
    files = sorted(
        p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    train = tuple(p for p in files if not _held_out(p.relative_to(root).as_posix(), 20))
    held = tuple(p for p in files if _held_out(p.relative_to(root).as_posix(), 20))
    return train, held


@functools.lru_cache(maxsize=4)
def domain_files(root: Path | None = None) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(train, eval) sources of the stdlib ``test/`` package: the shifted text domain (eval: 10% by hash)."""
    root = stdlib_root() if root is None else root
    test_dir = root / "test"
    files = sorted(test_dir.rglob("*.py")) if test_dir.is_dir() else []
    if not files:
        raise AllocatorError(
            f"the text-domain task needs the standard library's test package, but {test_dir} has no .py "
            "files; install your distribution's python test package (e.g. `python3-test` / "
            "`libpython3-testsuite`)"
        )
    train = tuple(p for p in files if not _held_out(p.relative_to(root).as_posix(), 10))
    held = tuple(p for p in files if _held_out(p.relative_to(root).as_posix(), 10))
    return train, held


def read_source(path: Path) -> str:
    """File text; undecodable bytes (a few test files are Latin-1 on purpose) become U+FFFD."""
    return path.read_bytes().decode("utf-8", errors="replace")


def corpus_digest(files: Sequence[Path], root: Path | None = None) -> str:
    """sha256 over relative paths and contents: equal digests mean the same pretraining text."""
    root = stdlib_root() if root is None else root
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def token_windows(
    tokenizer: Any,
    files: Sequence[Path],
    *,
    seq_len: int = SEQ_LEN,
    max_windows: int | None = None,
    per_file: int | None = None,
) -> torch.Tensor:
    """Files tokenized, joined by EOS and cut into non-overlapping rows: (n_windows, seq_len) int64.

    ``per_file`` keeps at most that many windows' worth of tokens from the start of each file, so a few long
    files cannot fill ``max_windows`` alone."""
    ids: list[int] = []
    need = None if max_windows is None else max_windows * seq_len
    cap = None if per_file is None else per_file * seq_len
    for p in files:
        ids.extend(tokenizer(read_source(p), add_special_tokens=False, verbose=False)["input_ids"][:cap])
        ids.append(tokenizer.eos_token_id)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len if need is None else min(len(ids) // seq_len, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, seq_len)


def lm_batches(windows: torch.Tensor, batch_size: int) -> list[Batch]:
    """Full-sequence language-modelling batches over ``windows`` (n, T), in order."""
    return [
        {"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
        for w in windows.split(batch_size)
    ]


# ---------------------------------------------------------------- associative recall


@dataclass(frozen=True)
class RecallSpec:
    """How recall episodes are drawn: ``- key: value`` lines, then ``? key: value`` queries."""

    letters: str = field(metadata={"help": "alphabet of the keys"})
    key_len: int = field(metadata={"help": "letters per key"})
    min_pairs: int = field(metadata={"help": "fewest pairs in an episode"})
    max_pairs: int = field(metadata={"help": "most pairs in an episode"})
    n_queries: int = field(metadata={"help": "queries per episode (distinct keys)"})


PRETRAIN_RECALL = RecallSpec(letters="abcdefghijklm", key_len=3, min_pairs=2, max_pairs=6, n_queries=6)
SHIFTED_RECALL = RecallSpec(letters="nopqrstuvwxyz", key_len=4, min_pairs=10, max_pairs=14, n_queries=4)


@dataclass(frozen=True)
class RecallEpisode:
    text: str
    answer_spans: tuple[tuple[int, int], ...]  # character span of each query's value
    n_pairs: int


def recall_episode(rng: random.Random, spec: RecallSpec) -> RecallEpisode:
    """One episode, e.g. ``"- kel: 31\\n- mop: 85\\n? mop: 85\\n"``; values are 10..99, keys distinct."""
    n_pairs = rng.randint(spec.min_pairs, spec.max_pairs)
    keys: set[str] = set()
    while len(keys) < n_pairs:
        keys.add("".join(rng.choice(spec.letters) for _ in range(spec.key_len)))
    pairs = [(k, rng.randint(10, 99)) for k in sorted(keys)]
    rng.shuffle(pairs)
    text = "".join(f"- {k}: {v}\n" for k, v in pairs)  # " key" tokenizes alike in pairs and queries
    spans = []
    for k, v in rng.sample(pairs, min(spec.n_queries, n_pairs)):
        text += f"? {k}: "
        spans.append((len(text), len(text) + len(str(v))))
        text += f"{v}\n"
    return RecallEpisode(text, tuple(spans), n_pairs)


def _encode_episode(tokenizer: Any, ep: RecallEpisode) -> tuple[list[int], list[int]]:
    """Token ids (EOS appended) and, per token, the index of the query whose answer holds it (-1: none)."""
    enc = tokenizer(ep.text, add_special_tokens=False, return_offsets_mapping=True)
    group = [-1] * len(enc["input_ids"])
    for q, (a, b) in enumerate(ep.answer_spans):
        for i, (s, e) in enumerate(enc["offset_mapping"]):
            if s < b and e > a:  # token overlaps the answer characters
                group[i] = q
    return list(enc["input_ids"]) + [tokenizer.eos_token_id], group + [-1]


def packed_recall_row(tokenizer: Any, rng: random.Random, spec: RecallSpec, seq_len: int = SEQ_LEN) -> Batch:
    """A pretraining row: whole episodes packed until the next does not fit, right-padded (labels -100)."""
    ids: list[int] = []
    while True:
        ep_ids, _ = _encode_episode(tokenizer, recall_episode(rng, spec))
        if len(ids) + len(ep_ids) > seq_len:
            break
        ids.extend(ep_ids)
    n = len(ids)
    row = torch.full((seq_len,), tokenizer.pad_token_id, dtype=torch.long)
    row[:n] = torch.tensor(ids)
    labels = row.clone()
    labels[n:] = -100
    mask = (torch.arange(seq_len) < n).long()
    return {"input_ids": row, "attention_mask": mask, "labels": labels}


def recall_batches(
    tokenizer: Any,
    spec: RecallSpec,
    *,
    n_rows: int,
    seed: int | str,
    batch_size: int,
    seq_len: int = RECALL_SEQ_LEN,
) -> list[Batch]:
    """One episode per row, right-padded to the longest in its batch (at most ``seq_len``); loss on the answer
    tokens only; ``answer_group`` marks each query's answer tokens, ``n_pairs`` each row's pair count."""
    rng = random.Random(seed)
    ids = torch.full((n_rows, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    group = torch.full((n_rows, seq_len), -1, dtype=torch.long)
    mask = torch.zeros((n_rows, seq_len), dtype=torch.long)
    n_pairs = torch.zeros(n_rows, dtype=torch.long)
    for r in range(n_rows):
        ep = recall_episode(rng, spec)
        ep_ids, ep_group = _encode_episode(tokenizer, ep)
        if len(ep_ids) > seq_len:
            raise AllocatorError(
                f"a recall episode has {len(ep_ids)} tokens > seq_len {seq_len}; raise seq_len"
            )
        ids[r, : len(ep_ids)] = torch.tensor(ep_ids)
        group[r, : len(ep_ids)] = torch.tensor(ep_group)
        mask[r, : len(ep_ids)] = 1
        n_pairs[r] = ep.n_pairs
    labels = torch.where(group >= 0, ids, torch.full_like(ids, -100))
    batches = []
    for start in range(0, n_rows, batch_size):
        rows = slice(start, start + batch_size)
        width = int(mask[rows].sum(1).max())  # drop the all-pad tail columns of this batch
        batches.append(
            {
                "input_ids": ids[rows, :width],
                "attention_mask": mask[rows, :width],
                "labels": labels[rows, :width],
                "answer_group": group[rows, :width],
                "n_pairs": n_pairs[rows],
            }
        )
    return batches


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    """(accuracy, chance): share of queries whose answer tokens are all argmax-correct (teacher forced), and
    the mean of 1 / n_pairs, what copying a random value from the episode would score."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    chance = 0.0
    try:
        for b in batches:
            logits = model(
                input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
            ).logits
            pred = logits[:, :-1].argmax(-1).cpu()  # (B, T-1) prediction for token t+1
            hit = pred == b["input_ids"][:, 1:]
            group = b["answer_group"][:, 1:]
            for r in range(group.shape[0]):
                for q in group[r][group[r] >= 0].unique().tolist():
                    correct += bool(hit[r][group[r] == q].all())
                    total += 1
                    chance += 1.0 / float(b["n_pairs"][r])
    finally:
        model.train(was_training)
    return correct / total, chance / total


# ---------------------------------------------------------------- tasks


def _loss_metrics(prefix: str, batches: Sequence[Batch]) -> Callable[[torch.nn.Module], dict[str, float]]:
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {f"{prefix}_loss": evaluate_loss(model, batches)}

    return evaluate


def text_domain_task(
    tokenizer: Any,
    *,
    seed: int = 0,
    n_train: int = 512,
    n_eval: int = 64,
    batch_size: int = 16,
    per_file: int = 4,
) -> Task:
    """Language modelling on the stdlib ``test/`` package: up to ``per_file`` windows from the start of each
    file, train files in a ``seed``-shuffled order (about 130 files), eval files (about 16) in sorted
    order."""
    train_files, eval_files = domain_files()
    order = list(train_files)
    random.Random(seed).shuffle(order)
    train = token_windows(tokenizer, order, max_windows=n_train, per_file=per_file)
    evals = lm_batches(
        token_windows(tokenizer, eval_files, max_windows=n_eval, per_file=per_file), batch_size
    )
    return Task(
        "text_domain",
        "next-token loss on the stdlib test package (unseen in pretraining)",
        tuple(lm_batches(train, batch_size)),
        tuple(evals),
        _loss_metrics("text_domain", evals),
    )


def recall_task(
    tokenizer: Any, *, seed: int = 0, n_train: int = 512, n_eval: int = 128, batch_size: int = 16
) -> Task:
    """Shifted associative recall; eval episodes come from a seed disjoint from every train seed."""
    train = recall_batches(tokenizer, SHIFTED_RECALL, n_rows=n_train, seed=seed, batch_size=batch_size)
    evals = recall_batches(
        tokenizer, SHIFTED_RECALL, n_rows=n_eval, seed="recall-eval", batch_size=batch_size
    )

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        acc, chance = recall_accuracy(model, evals)
        return {"recall_accuracy": acc, "recall_chance": chance, "recall_loss": evaluate_loss(model, evals)}

    return Task(
        "recall",
        f"associative recall, {SHIFTED_RECALL.min_pairs}-{SHIFTED_RECALL.max_pairs} pairs of new keys; "
        "accuracy of the answer tokens vs chance 1/n_pairs",
        tuple(train),
        tuple(evals),
        evaluate,
    )


def _fact_rows(
    tokenizer: Any, facts: Sequence[tuple[str, int]], per_row: int, batch_size: int
) -> list[Batch]:
    """Rows of ``? key: value`` lines (``per_row`` facts each, in the given order); loss and ``answer_group``
    on the values only."""
    episodes = []
    for start in range(0, len(facts), per_row):
        text, spans = "", []
        for k, v in facts[start : start + per_row]:
            text += f"? {k}: "
            spans.append((len(text), len(text) + len(str(v))))
            text += f"{v}\n"
        episodes.append(_encode_episode(tokenizer, RecallEpisode(text, tuple(spans), 90)))
    width = max(len(ids) for ids, _ in episodes)
    rows = []
    for ids, group in episodes:
        pad = width - len(ids)
        ids_t = torch.tensor(ids + [tokenizer.pad_token_id] * pad)
        group_t = torch.tensor(group + [-1] * pad)
        rows.append(
            {
                "input_ids": ids_t,
                "attention_mask": (torch.arange(width) < len(ids)).long(),
                "labels": torch.where(group_t >= 0, ids_t, torch.full_like(ids_t, -100)),
                "answer_group": group_t,
                "n_pairs": torch.tensor(90),  # chance: one of the 90 values 10..99
            }
        )
    return [
        {k: torch.stack([r[k] for r in rows[i : i + batch_size]]) for k in rows[0]}
        for i in range(0, len(rows), batch_size)
    ]


def fact_recall_task(
    tokenizer: Any,
    *,
    seed: int = 0,
    n_train: int = 512,
    n_eval: int | None = None,
    batch_size: int = 16,
    per_row: int = 8,
    shuffle_values: bool = False,
    split: str = "eval",
) -> Task:
    """Parametric recall: ``n_train`` new ``key -> value`` facts (5-letter keys over n..z) in the weights.

    Train rows list the facts in a ``seed``-shuffled order; eval rows list the first ``n_eval`` of them
    (default all) in a fixed other order, ``per_row`` to a row, so a fact is never visible in its own context.
    The facts do not depend on ``seed``. Chance is 1/90 (values 10..99). ``shuffle_values`` is the control:
    train on the same keys and values with the values permuted among the keys (eval keeps the true facts), so
    the row format is learnt but no fact is; its accuracy must stay at chance. ``split="validation"`` scores
    the facts in a third order and grouping (neither the train rows' nor the eval rows'), to choose settings
    on without the eval rows."""
    if split not in ("eval", "validation"):
        raise ValueError(f"split must be 'eval' or 'validation', got {split!r}")
    rng = random.Random("fact-recall")
    keys: set[str] = set()
    while len(keys) < n_train:
        keys.add("".join(rng.choice(SHIFTED_RECALL.letters) for _ in range(5)))
    facts = [(k, rng.randint(10, 99)) for k in sorted(keys)]
    train_order, eval_order = list(facts), list(facts)
    if shuffle_values:
        values = [v for _, v in facts]
        random.Random("fact-recall-control").shuffle(values)
        train_order = [(k, v) for (k, _), v in zip(facts, values)]
    random.Random(seed).shuffle(train_order)
    random.Random(f"fact-recall-{split}").shuffle(eval_order)
    train = _fact_rows(tokenizer, train_order, per_row, batch_size)
    evals = _fact_rows(tokenizer, eval_order[:n_eval], per_row, batch_size)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        acc, chance = recall_accuracy(model, evals)
        return {"fact_accuracy": acc, "fact_chance": chance, "fact_loss": evaluate_loss(model, evals)}

    return Task(
        "fact_recall",
        f"{n_train} new key -> value facts learnt into the weights; answer accuracy vs chance 1/90",
        tuple(train),
        tuple(evals),
        evaluate,
    )


def retention_task(tokenizer: Any, *, n_eval: int = 64, batch_size: int = 16, per_file: int = 4) -> Task:
    """Eval only: loss on held-out pretraining text (what fine-tuning must not forget), up to ``per_file``
    windows from each held-out file."""
    _, held = pretraining_files()
    evals = lm_batches(token_windows(tokenizer, held, max_windows=n_eval, per_file=per_file), batch_size)
    return Task(
        "retention",
        "next-token loss on held-out pretraining text",
        (),
        tuple(evals),
        _loss_metrics("retention", evals),
    )


# Fine-tune tasks, all called as ``TASKS[name](tokenizer, *, seed, n_train, n_eval, batch_size)``.
# ``retention_task`` is eval only and called on its own.
TASKS: dict[str, Callable[..., Task]] = {
    "text_domain": text_domain_task,
    "recall": recall_task,
    "fact_recall": fact_recall_task,
    "instruction": instruction_task,
}
