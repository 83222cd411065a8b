"""A plan inside a transformers / TRL training run: :class:`PlanCallback`.

    from allocator.integrations import PlanCallback
    trainer = SFTTrainer(model, train_dataset=ds, peft_config=plan.to_lora_config(),
                         callbacks=[PlanCallback(plan)])

When training begins the callback records the plan the run trains, on the main process only: one entry in the
trainer's ``state.log_history`` (kept in every checkpoint's ``trainer_state.json``) with the per-family ranks,
the cost, the budget and the plan's provenance; one line on the ``allocator`` logger; and the plan's own files
(``adapter_config.json``, ``allocation.json``, ``report.md``, ``heatmap.png``) in ``OUTPUT_DIR/lora_plan/``.
It warns (:class:`~allocator.errors.AllocatorWarning`) when the model's trainable parameters differ from the
plan's cost: the plan was not the one applied.

:func:`axolotl_config` writes the plan as the LoRA keys of an axolotl YAML config (axolotl's
``lora_rank_pattern`` / ``lora_alpha_pattern``). For frameworks without per-module ranks (LLaMA-Factory),
save an initialised adapter, ``plan.apply(model).save_pretrained(folder)``, and let the framework resume
training it (``adapter_name_or_path``): PEFT reloads it with the plan's exact ranks. Recipes:
docs/integrations.md.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from allocator.errors import AllocatorWarning, InputError
from allocator.output.plan import Plan
from allocator.output.report import family_rows

log = logging.getLogger("allocator")

PLAN_FOLDER = "lora_plan"  # under the trainer's output_dir
PROVENANCE_KEYS = ("model_id", "model_revision", "data", "data_hash", "budget_spec", "versions")


def plan_summary(plan: Plan) -> dict[str, Any]:
    """What the callback logs: cost, budget, per-family ranks and parameters, init and provenance (JSON)."""
    families = {
        row.family: {"adapted": row.adapted, "modules": row.modules, "ranks": row.ranks, "params": row.params}
        for row in family_rows(plan)
    }
    return {
        "model_id": plan.model_id,
        "cost": plan.cost,
        "budget": plan.budget,
        "alpha_ratio": plan.alpha_ratio,
        "use_rslora": plan.use_rslora,
        "init": plan.init,
        "families": families,
        "provenance": {k: plan.provenance[k] for k in PROVENANCE_KEYS if k in plan.provenance},
    }


class PlanCallback(TrainerCallback):
    """Records ``plan`` (a :class:`~allocator.output.plan.Plan` or the folder a plan was saved to) in the
    trainer's logs and output folder when training begins (see the module docstring)."""

    def __init__(self, plan: Plan | str | os.PathLike[str], *, save: bool = True) -> None:
        if isinstance(plan, (str, os.PathLike)):
            plan = Plan.load(plan)
        if not isinstance(plan, Plan):
            raise InputError(f"PlanCallback takes a Plan or a plan folder, got {type(plan).__name__}")
        self.plan, self.save = plan, save
        self.summary = plan_summary(plan)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if trainable != self.plan.cost:
                warnings.warn(
                    f"the model trains {trainable:,} parameters but the plan costs {self.plan.cost:,}: pass "
                    "peft_config=plan.to_lora_config() (or train plan.apply(model)) to train this plan",
                    AllocatorWarning,
                    stacklevel=2,
                )
        if not state.is_world_process_zero:
            return
        state.log_history.append({"lora_plan": self.summary, "step": state.global_step})
        ranks = "; ".join(f"{f} {v['ranks']}" for f, v in self.summary["families"].items())
        log.info("LoRA plan %s: cost %s of budget %s; %s", self.plan.model_id, f"{self.plan.cost:,}",
                 f"{self.plan.budget:,}", ranks)
        if self.save and getattr(args, "output_dir", None):
            self.plan.save(Path(args.output_dir) / PLAN_FOLDER, overwrite=True)


def axolotl_config(plan: Plan) -> dict[str, Any]:
    """The keys of an axolotl YAML config that build exactly ``plan``'s adapters.

    axolotl builds ``LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=lora_target_modules,
    target_parameters=lora_target_parameters, rank_pattern=lora_rank_pattern, alpha_pattern=
    lora_alpha_pattern, use_rslora=peft_use_rslora,
    ...)`` (``axolotl/loaders/adapter.py``); releases whose config schema lacks ``lora_rank_pattern`` cannot
    take per-module ranks: point their ``lora_model_dir`` at a saved initialised adapter instead
    (docs/integrations.md). An EVA plan's init is not a config key: save its initialised adapter the same way.
    """
    config = plan.to_lora_config()
    out: dict[str, Any] = {
        "adapter": "lora",
        "lora_r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "lora_target_modules": sorted(config.target_modules or []),
        "lora_rank_pattern": {k: int(v) for k, v in sorted(config.rank_pattern.items())},
        "lora_alpha_pattern": {k: float(v) for k, v in sorted(config.alpha_pattern.items())},
    }
    if config.target_parameters:
        out["lora_target_parameters"] = sorted(config.target_parameters)
    if config.use_rslora:
        out["peft_use_rslora"] = True
    return out
