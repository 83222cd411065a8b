"""Stage 4: the allocation as a plan the user keeps: ranks, cost, utility and provenance.

``Plan`` is what :func:`allocator.allocate` returns. It exports to PEFT (``to_lora_config``), applies itself
to a model (``apply``: trainable parameters == ``cost``), and saves a folder (``save``)::

    OUT_DIR/adapter_config.json   written by PEFT, so ``LoraConfig.from_pretrained(OUT_DIR)`` loads it
    OUT_DIR/allocation.json       budget, cost, every rank/cost/utility, provenance
    OUT_DIR/report.md, heatmap.png

Writes go through the one safe folder writer (:mod:`probes.folders`): atomic, marked with a manifest, and an
overwrite replaces only the files a plan writes. ``allocation.json`` carries a schema version
(:data:`SCHEMA`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from peft import EvaConfig, LoraConfig, PeftModel
from transformers import PreTrainedModel

from allocator.discovery.component import Component
from allocator.discovery.components import architecture_of, peft_exports
from allocator.discovery.experts import check_expert_targets
from allocator.errors import AllocatorError, InputError, as_input_error
from allocator.output.export import (
    adapted_shape,
    check_alpha_ratio,
    get_peft_model_quietly,
    restore_base_model,
    snapshot_base_model,
    to_lora_config,
)
from allocator.output.lora_init import check_init, init_components, init_lora_a, init_targets
from allocator.output.report import write_report
from allocator.solver.budget import lora_params
from probes.errors import ProbeError
from probes.folders import FolderError, check_target, write_folder
from probes.runner import check_token_ids

ALLOCATION_FILE = "allocation.json"
PLAN_FILES = ("adapter_config.json", ALLOCATION_FILE, "report.md", "heatmap.png")
# plan folders written before the folder manifest existed: exactly these files mark them as the tool's
LEGACY_PLAN_FILES = (frozenset(PLAN_FILES), frozenset(PLAN_FILES[:2]))
# allocation.json: 1 had no "schema" key; 2 adds "schema" and "architecture". Optional keys added since, which
# readers of schema 2 ignore and this reader does without: "evidence" (top level), "marginal" (per module)
SCHEMA = 2


@dataclass(frozen=True)
class Plan:
    """Ranks per module under a budget, with everything needed to reproduce them."""

    model_id: str = field(metadata={"help": "Hub id or local folder of the base model."})
    components: tuple[Component, ...] = field(metadata={"help": "Every adaptable module found, eligible or "
                                                                "not."})
    ranks: Mapping[str, int] = field(metadata={"help": "Rank per eligible module (0 = no adapter)."})
    budget: int = field(metadata={"help": "Trainable-parameter budget the plan had to respect."})
    utility: Mapping[str, float] = field(
        default_factory=dict, metadata={"help": "Utility of each module at its chosen rank."}
    )
    risk: Mapping[str, float] = field(
        default_factory=dict, metadata={"help": "Retention risk of each module at its chosen rank (if "
                                                "measured)."}
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
        metadata={"help": "lora_A init: 'default' (PEFT's), 'eva' (top input principal directions at "
                          "these ranks) or 'gradient' (top right singular vectors of the calibration "
                          "gradient at these ranks)."},
    )
    architecture: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "model_type, decoder layers and class of the model the plan was made for; apply "
                          "checks them."},
    )
    marginal: Mapping[str, float | None] = field(
        default_factory=dict,
        metadata={"help": "Per module: utility the next grid rank would add, per parameter it costs "
                          "(what the solver equalises); None at the top of the grid."},
    )
    evidence: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "What moved budget away from uniform: the signal, the share moved with each "
                          "lever off, held-out consistency (allocator.output.evidence); empty for "
                          "hand-made plans."},
    )

    def __post_init__(self) -> None:

        check_init(self.init)
        names = {c.name for c in self.components}
        unknown = sorted(set(self.ranks) - names)
        if unknown:
            raise AllocatorError(f"plan ranks name unknown modules {unknown[:5]}")
        bad = sorted(
            n for n, r in self.ranks.items() if isinstance(r, bool) or not isinstance(r, int) or r < 0
        )
        if bad:
            raise InputError(f"plan ranks must be integers >= 0; {bad[0]!r} has {self.ranks[bad[0]]!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise InputError(f"plan budget must be a whole number of parameters >= 1, got {self.budget!r}")

        object.__setattr__(self, "alpha_ratio", check_alpha_ratio(self.alpha_ratio))
        if self.cost > self.budget:
            raise AllocatorError(f"plan cost {self.cost:,} exceeds its budget {self.budget:,}")

    def __repr__(self) -> str:
        """One screen: model, budget, cost, the verdict's headline and the ranks per family."""
        from allocator.output.report import family_rows, short_verdict

        families = "\n".join(
            f"    {row.family:<10} {row.adapted:>3}/{row.modules:<3} modules adapted, ranks {row.ranks}, "
            f"{row.params:,} parameters" for row in family_rows(self)
        )
        return (
            f"Plan(model={self.model_id!r},\n    budget={self.budget:,}, cost={self.cost:,}, "
            f"init={self.init!r}, alpha_ratio={self.alpha_ratio:g}: {short_verdict(self)}\n{families})"
        )

    # ---- derived numbers
    # --------------------------------------------------------------------------------------
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
            lora_params(by_name[n].d_in, by_name[n].d_out, r, by_name[n].n_experts)
            for n, r in self.ranks.items()
        )

    @property
    def targets(self) -> dict[str, int]:
        """Modules that get an adapter, with their rank."""
        return {n: r for n, r in sorted(self.ranks.items()) if r > 0}

    @property
    def total_utility(self) -> float:
        return float(sum(self.utility.values()))

    # ---- export
    # -----------------------------------------------------------------------------------------------
    def to_lora_config(self, **lora_kwargs: Any) -> LoraConfig:
        """A ``peft.LoraConfig`` with exactly this plan's targets and ranks; extra LoraConfig fields pass
        through."""

        lora_kwargs.setdefault("alpha_ratio", self.alpha_ratio)
        lora_kwargs.setdefault("use_rslora", self.use_rslora)
        lora_kwargs.setdefault("base_model_name_or_path", self.model_id)
        if self.init == "eva":  # recorded for the reader; rho = 1: PEFT's own EVA then keeps these ranks
            lora_kwargs.setdefault("init_lora_weights", "eva")
            lora_kwargs.setdefault("eva_config", EvaConfig(rho=1.0, adjust_scaling_factors=False))
        # init "gradient" keeps PEFT's default here: lora_A comes from ``apply``, the adapter is plain LoRA
        return to_lora_config(self.targets, self.components, **lora_kwargs)

    def apply(
        self,
        model: PreTrainedModel,
        *,
        init_data: Sequence[Mapping[str, Any]] | None = None,
        **lora_kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with ``peft.get_peft_model``; its trainable parameters equal ``self.cost``.

        The model is checked first against what the plan was made for (:meth:`check_model`); on any failure
        the model is left exactly as it was (no adapter injected, ``requires_grad`` flags untouched).

        With ``init="eva"`` or ``"gradient"`` pass ``init_data``, calibration micro-batches (dicts of
        ``input_ids``, ``attention_mask``, ``labels``; e.g. ``probes.load_batches(path, tokenizer)``): lora_A
        starts on the top principal directions of each module's input (EVA), or on the top right singular
        vectors of each module's calibration-loss gradient scaled to PEFT's default row norm (gradient), at
        exactly the plan's ranks; lora_B is zero (``allocator.output.lora_init``; MoE expert weights adapted
        as parameters keep PEFT's init).
        """
        self.check_model(model)
        if self.init != "default" and init_data is None:
            raise InputError(
                f"this plan initialises lora_A from calibration data (init={self.init!r}): pass "
                "init_data=calibration batches, e.g. probes.load_batches('train.jsonl', tokenizer)"
            )
        snapshot = snapshot_base_model(model)
        try:
            components, started = None, {}
            if self.init != "default" and (started := init_targets(self.components, self.targets)):
                with as_input_error(ProbeError):
                    check_token_ids(model, init_data)
                components = init_components(self.init, model, list(started), init_data,
                                             max(started.values()))
            # a plan saved before export_as_parameter existed lists such linears in target_modules: mark them
            # here
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            plan = replace(self, components=tuple(peft_exports(self.components, model_type)))
            peft_model = get_peft_model_quietly(model, plan.to_lora_config(**lora_kwargs))
            trainable, _ = peft_model.get_nb_trainable_parameters()
            if trainable != self.cost:
                raise AllocatorError(
                    f"PEFT counts {trainable:,} trainable parameters but the plan costs {self.cost:,}; "
                    "was the model built from the same config the plan was made for?"
                )
            if components is not None:
                init_lora_a(peft_model, components, started)
        except BaseException:
            restore_base_model(model, snapshot)
            raise
        return peft_model

    def check_model(self, model: PreTrainedModel) -> None:
        """Raise :class:`InputError` unless ``model`` is the architecture this plan was made for: the same
        model_type and decoder layer count (when recorded) and every planned module present with its
        d_in/d_out.
        """

        if hasattr(model, "peft_config") or not hasattr(model, "named_modules"):
            what = (
                "already holds PEFT adapters"
                if hasattr(model, "peft_config")
                else f"is a {type(model).__name__}"
            )
            raise InputError(
                f"the model {what}; apply the plan to the base transformers model it was made for"
            )
        found = architecture_of(model)
        differ = [
            f"{k} {self.architecture[k]!r} (model: {found[k]!r})"
            for k in ("model_type", "n_layers")
            if self.architecture.get(k) is not None and self.architecture[k] != found[k]
        ]
        by_name = self.by_name
        missing, wrong = [], []
        for name in self.targets:
            c = by_name[name]
            shape = adapted_shape(model, name, c.is_parameter)
            if shape is None:
                missing.append(name)
            elif shape != (c.n_experts, c.d_in, c.d_out):
                wrong.append(
                    f"{name} is {shape[1]}->{shape[2]}"
                    + (f" x{shape[0]}" if shape[0] > 1 else "")
                    + ", the plan has "
                    f"{c.d_in}->{c.d_out}" + (f" x{c.n_experts}" if c.n_experts > 1 else "")
                )
        storage = check_expert_targets(model, missing, {n: by_name[n].is_parameter for n in missing})
        if storage is not None:
            raise InputError(storage)
        if differ or missing or wrong:
            detail = "; ".join(
                differ
                + ([f"{len(missing)} planned modules missing, e.g. {missing[0]}"] if missing else [])
                + wrong[:2]
            )
            raise InputError(
                f"this plan was made for another model ({self.model_id}): {detail}; make a "
                "plan for this model with `allocate`, or load the model the plan names"
            )

    # ---- serialisation
    # ----------------------------------------------------------------------------------------
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
                if c.name in self.marginal:
                    entry["marginal"] = self.marginal[c.name]
            modules.append(entry)
        return {
            "schema": SCHEMA,
            "model_id": self.model_id,
            "architecture": dict(self.architecture),
            "budget": int(self.budget),
            "cost": int(self.cost),
            "utility": self.total_utility,
            "alpha_ratio": self.alpha_ratio,
            "use_rslora": self.use_rslora,
            "init": self.init,
            "solver": dict(self.solver),
            "provenance": dict(self.provenance),
            **({"evidence": dict(self.evidence)} if self.evidence else {}),
            "modules": modules,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict`'s output; anything malformed is an :class:`InputError`."""
        if not isinstance(data, Mapping):
            raise InputError(f"a plan is a JSON object, got {type(data).__name__}")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise InputError(
                f"this plan has schema {schema!r}; this version reads up to {SCHEMA}: upgrade "
                "hybrid-lora-allocator"
            )
        missing = [k for k in ("model_id", "budget", "modules") if k not in data]
        if missing or not isinstance(data["modules"], list):
            raise InputError(
                f"not a plan: {', '.join(missing) or 'modules'} missing or malformed; pass an "
                f"{ALLOCATION_FILE} written by `allocate -o`"
            )
        names = [e.get("name") if isinstance(e, Mapping) else None for e in data["modules"]]
        twice = sorted({n for n in names if names.count(n) > 1}, key=str)
        if twice:
            raise InputError(
                f"malformed plan: module {twice[0]!r} is listed more than once; pass an "
                f"{ALLOCATION_FILE} written by `allocate -o`"
            )
        keys = set(Component.__dataclass_fields__)
        components, ranks, utility, risk, marginal = [], {}, {}, {}, {}
        try:
            for entry in data["modules"]:
                components.append(Component.from_dict({k: v for k, v in entry.items() if k in keys}))
                if "rank" in entry:
                    ranks[entry["name"]] = _whole(entry["rank"], f"rank of {entry['name']}")
                    utility[entry["name"]] = float(entry.get("utility", 0.0))
                    risk[entry["name"]] = float(entry.get("risk", 0.0))
                    if "marginal" in entry:  # plans written before it existed have none
                        value = entry["marginal"]
                        marginal[entry["name"]] = None if value is None else float(value)
            return cls(
                model_id=str(data["model_id"]),
                components=tuple(components),
                ranks=ranks,
                budget=_whole(data["budget"], "budget"),
                utility=utility,
                risk=risk,
                solver=dict(data.get("solver", {})),
                provenance=dict(data.get("provenance", {})),
                alpha_ratio=float(data.get("alpha_ratio", 2.0)),
                use_rslora=bool(data.get("use_rslora", False)),
                init=str(data.get("init", "default")),
                architecture=dict(data.get("architecture", {})),
                marginal=marginal,
                evidence=dict(data.get("evidence", {})),
            )
        except InputError:
            raise
        except (AllocatorError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"malformed plan ({type(exc).__name__}: {exc}); pass an "
                f"{ALLOCATION_FILE} written by `allocate -o`"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan saved by :meth:`save` (the folder or its ``allocation.json``)."""
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(
                f"Plan.load takes a folder or an {ALLOCATION_FILE} path, got {type(path).__name__}"
            )
        path = Path(path)
        if path.is_dir():
            path = path / ALLOCATION_FILE
        if not path.is_file():
            raise InputError(f"no {ALLOCATION_FILE} at {path}; pass a folder written by `allocate -o`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(
                f"could not read {path} as JSON ({exc}); pass a folder written by `allocate -o`"
            ) from None
        return cls.from_dict(data)

    def save(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, report: bool = True) -> Path:
        """Write the plan folder atomically (:mod:`probes.folders`): a new or empty folder, or with
        ``overwrite`` one this tool wrote, whose plan files are replaced (files of the user's beside them are
        kept)."""

        def fill(tmp: Path) -> None:
            self.to_lora_config().save_pretrained(str(tmp))
            (tmp / ALLOCATION_FILE).write_text(
                json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
            )
            if report:
                write_report(self, tmp)

        with as_input_error(FolderError):
            return write_folder(out_dir, fill, overwrite=overwrite, legacy=LEGACY_PLAN_FILES)


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InputError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def check_output_dir(out: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Fail early, before any work, if a plan cannot be written to ``out`` as asked; return its absolute
    path."""
    with as_input_error(FolderError):
        return check_target(out, overwrite=overwrite, legacy=LEGACY_PLAN_FILES)
