"""Stage 4: the allocation as a plan the user keeps: ranks, cost, utility and provenance.

``Plan`` is what :func:`allocator.allocate` returns. It exports to PEFT (``to_lora_config``), applies itself to a
model (``apply``: trainable parameters == ``cost``), and saves a folder (``save``)::

    OUT_DIR/adapter_config.json   written by PEFT, so ``LoraConfig.from_pretrained(OUT_DIR)`` loads it
    OUT_DIR/allocation.json       budget, cost, every rank/cost/utility, provenance
    OUT_DIR/report.md, heatmap.png

Writes are atomic: everything is written to a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from allocator.budget import lora_params
from allocator.components import Component
from allocator.errors import AllocatorError, InputError

ALLOCATION_FILE = "allocation.json"


@dataclass(frozen=True)
class Plan:
    """Ranks per module under a budget, with everything needed to reproduce them."""

    model_id: str = field(metadata={"help": "Hub id or local folder of the base model."})
    components: tuple[Component, ...] = field(metadata={"help": "Every adaptable module found, eligible or not."})
    ranks: Mapping[str, int] = field(metadata={"help": "Rank per eligible module (0 = no adapter)."})
    budget: int = field(metadata={"help": "Trainable-parameter budget the plan had to respect."})
    utility: Mapping[str, float] = field(
        default_factory=dict, metadata={"help": "Utility of each module at its chosen rank."}
    )
    risk: Mapping[str, float] = field(
        default_factory=dict, metadata={"help": "Retention risk of each module at its chosen rank (if measured)."}
    )
    solver: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "Solver status, MIP gap, granularity and groups."}
    )
    provenance: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "Model revision, data hash, settings, library versions."}
    )
    alpha_ratio: float = field(default=2.0, metadata={"help": "LoRA alpha = alpha_ratio * r per module."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha/sqrt(r) (rsLoRA) instead."})
    init: str = field(
        default="default",
        metadata={"help": "lora_A init: 'default' (PEFT's) or 'eva' (top input principal directions at these ranks)."},
    )

    def __post_init__(self) -> None:
        from allocator.lora_init import check_init

        check_init(self.init)
        names = {c.name for c in self.components}
        unknown = sorted(set(self.ranks) - names)
        if unknown:
            raise AllocatorError(f"plan ranks name unknown modules {unknown[:5]}")
        if self.cost > self.budget:
            raise AllocatorError(f"plan cost {self.cost:,} exceeds its budget {self.budget:,}")

    # ---- derived numbers --------------------------------------------------------------------------------------
    @property
    def by_name(self) -> dict[str, Component]:
        return {c.name: c for c in self.components}

    def module_cost(self, name: str) -> int:
        c = self.by_name[name]
        return lora_params(c.d_in, c.d_out, self.ranks.get(name, 0), c.n_experts)

    @property
    def cost(self) -> int:
        """Trainable LoRA parameters of the plan, exactly as PEFT counts them."""
        by_name = self.by_name
        return sum(
            lora_params(by_name[n].d_in, by_name[n].d_out, r, by_name[n].n_experts) for n, r in self.ranks.items()
        )

    @property
    def targets(self) -> dict[str, int]:
        """Modules that get an adapter, with their rank."""
        return {n: r for n, r in sorted(self.ranks.items()) if r > 0}

    @property
    def total_utility(self) -> float:
        return float(sum(self.utility.values()))

    # ---- export -----------------------------------------------------------------------------------------------
    def to_lora_config(self, **lora_kwargs: Any):
        """A ``peft.LoraConfig`` with exactly this plan's targets and ranks; extra LoraConfig fields pass through."""
        from allocator.export import to_lora_config

        lora_kwargs.setdefault("alpha_ratio", self.alpha_ratio)
        lora_kwargs.setdefault("use_rslora", self.use_rslora)
        lora_kwargs.setdefault("base_model_name_or_path", self.model_id)
        if self.init == "eva":  # recorded for the reader; rho = 1: PEFT's own EVA then keeps these ranks
            from peft import EvaConfig

            lora_kwargs.setdefault("init_lora_weights", "eva")
            lora_kwargs.setdefault("eva_config", EvaConfig(rho=1.0, adjust_scaling_factors=False))
        return to_lora_config(self.targets, self.components, **lora_kwargs)

    def apply(self, model: Any, *, init_data: Any = None, **lora_kwargs: Any):
        """Wrap ``model`` with ``peft.get_peft_model``; its trainable parameters equal ``self.cost``.

        With ``init="eva"`` pass ``init_data``, calibration micro-batches (dicts of ``input_ids``,
        ``attention_mask``, ``labels``; e.g. ``probes.load_batches(path, tokenizer)``): lora_A starts on the top
        principal directions of each module's input at exactly the plan's ranks (``allocator.lora_init``; MoE
        expert weights adapted as parameters keep PEFT's init).
        """
        from allocator.components import peft_exports
        from allocator.export import get_peft_model_quietly

        # a plan saved before export_as_parameter existed lists such linears in target_modules: mark them here
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        plan = replace(self, components=tuple(peft_exports(self.components, model_type)))
        components, eva = None, {}
        if self.init == "eva":
            if init_data is None:
                raise InputError("this plan initialises lora_A with EVA (init='eva'): pass init_data=calibration "
                                 "batches, e.g. probes.load_batches('train.jsonl', tokenizer)")
            from allocator.lora_init import eva_components, eva_targets, init_lora_a

            eva = eva_targets(self.components, self.targets)
            if eva:
                components = eva_components(model, list(eva), init_data, max(eva.values()))
        peft_model = get_peft_model_quietly(model, plan.to_lora_config(**lora_kwargs))
        trainable, _ = peft_model.get_nb_trainable_parameters()
        if trainable != self.cost:
            raise AllocatorError(
                f"PEFT counts {trainable:,} trainable parameters but the plan costs {self.cost:,}; "
                "was the model built from the same config the plan was made for?"
            )
        if components is not None:
            init_lora_a(peft_model, components, eva)
        return peft_model

    # ---- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        modules = []
        for c in self.components:
            entry = c.to_dict()
            if c.name in self.ranks:
                entry.update(
                    rank=int(self.ranks[c.name]),
                    cost=self.module_cost(c.name),
                    utility=float(self.utility.get(c.name, 0.0)),
                    risk=float(self.risk.get(c.name, 0.0)),
                )
            modules.append(entry)
        return {
            "model_id": self.model_id,
            "budget": int(self.budget),
            "cost": int(self.cost),
            "utility": self.total_utility,
            "alpha_ratio": self.alpha_ratio,
            "use_rslora": self.use_rslora,
            "init": self.init,
            "solver": dict(self.solver),
            "provenance": dict(self.provenance),
            "modules": modules,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        keys = set(Component.__dataclass_fields__)
        components, ranks, utility, risk = [], {}, {}, {}
        for entry in data["modules"]:
            components.append(Component.from_dict({k: v for k, v in entry.items() if k in keys}))
            if "rank" in entry:
                ranks[entry["name"]] = int(entry["rank"])
                utility[entry["name"]] = float(entry.get("utility", 0.0))
                risk[entry["name"]] = float(entry.get("risk", 0.0))
        return cls(
            model_id=data["model_id"],
            components=tuple(components),
            ranks=ranks,
            budget=int(data["budget"]),
            utility=utility,
            risk=risk,
            solver=data.get("solver", {}),
            provenance=data.get("provenance", {}),
            alpha_ratio=float(data.get("alpha_ratio", 2.0)),
            use_rslora=bool(data.get("use_rslora", False)),
            init=str(data.get("init", "default")),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan saved by :meth:`save` (the folder or its ``allocation.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / ALLOCATION_FILE
        if not path.is_file():
            raise InputError(f"no {ALLOCATION_FILE} at {path}; pass a folder written by `allocate -o`")
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, report: bool = True) -> Path:
        """Write the plan folder atomically; an existing folder is replaced only with ``overwrite=True``."""
        out = Path(out_dir).resolve()
        check_output_dir(out, overwrite=overwrite)
        made_parent = not out.parent.exists()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            self.to_lora_config().save_pretrained(str(tmp))
            (tmp / ALLOCATION_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
            if report:
                from allocator.report import write_report

                write_report(self, tmp)
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if made_parent:
                shutil.rmtree(out.parent, ignore_errors=True)
            raise
        return out


def check_output_dir(out: Path, *, overwrite: bool) -> None:
    """Fail early, before any work, if ``out`` cannot be written as asked."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder; choose another -o")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{parent} is a file, so {out} cannot be created; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {parent}; choose an -o in a writable folder")


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an old ``out`` is removed only after the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
