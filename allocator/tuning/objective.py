"""The trial objective of `allocate tune`: configuration -> plan -> pilot fine-tune -> eval loss.

::

    suggestions -> Search.suggest -> plan (solved from the cached probe report, or a baseline's uniform ranks)
                -> finetune(fixed steps) on the training rows -> eval loss on the eval rows

:class:`Objective` holds what every trial of one worker shares (model, components, probe reports, batches, the
init's lora_A directions as trials need them). It talks to its trial only through ``suggest_*``,
``set_user_attr``, ``report``/``should_prune`` and ``number``; a pruned or infeasible trial raises
:class:`Pruned`, which the worker (:mod:`allocator.tuning.run`) turns into Optuna's own exception. No Optuna
import here.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from allocator.api import solve_plan
from allocator.discovery.component import Component
from allocator.errors import InputError
from allocator.output.lora_init import init_components, init_lora_a, init_targets
from allocator.output.plan import Plan
from allocator.tuning.attribution import TRAINING, UNIFORM_AT_WINNER
from allocator.tuning.finetune import FinetuneSettings, finetune
from allocator.tuning.search import BaseTrial, FixedParams, Search, grid_up_to
from allocator.tuning.settings import PROTECTED_BASELINES, TuneSettings


class Pruned(Exception):
    """The trial stops here: its configuration is infeasible, or the pruner says its loss lags."""


@dataclass
class Objective:
    """One worker's trial objective; ``objective(trial)`` runs one trial and returns what the study
    minimises."""

    settings: TuneSettings
    study_name: str
    model: Any
    model_id: str
    components: tuple[Component, ...]
    architecture: Mapping[str, Any]
    report: Any  # the probe report of the calibration data
    risk: Any  # the probe report of retention data, or None
    search: Search
    provenance: dict[str, Any]
    use_rslora: bool = False
    init: str = "default"
    train: tuple = ()
    evals: tuple = ()
    calibration: list = field(default_factory=list)  # the init's data, with init "eva" or "gradient"
    user_objective: Callable[[Plan, Any], float] | None = None
    # lora_A directions per module (EVA's or the gradient's), computed as trials need them
    _directions: dict[str, Any] = field(default_factory=dict)

    @property
    def eligible(self) -> list[Component]:
        return [c for c in self.components if c.eligible]

    def baseline_rank(self, placement: str, budget: int) -> int:
        """Uniform rank of a baseline: the largest whole rank over its modules within ``budget``."""
        members = [c for c in self.eligible if placement == "uniform" or c.family == placement]
        per_rank = sum(c.n_params_per_rank for c in members)
        return budget // per_rank if per_rank else 0

    def uniform_fits(self, params: Mapping[str, Any]) -> bool:
        """Whether uniform LoRA gets rank >= 1 at the budget of a trial with ``params``."""
        budget = int(self.search.suggest(FixedParams(params))["budget"])
        return self.baseline_rank("uniform", budget) > 0

    def plan(self, cfg: Mapping[str, Any], number: int | None = None) -> Plan:
        """The plan of one configuration: solved from the cached probe report, or a baseline's uniform
        ranks."""
        placement, budget = cfg["placement"], int(cfg["budget"])
        prov = dict(self.provenance)
        prov["budget_spec"] = str(budget)
        prov["tune"] = {"study": self.study_name, "trial": number, "placement": placement, "lr": cfg["lr"]}
        if placement == "solver":
            return solve_plan(
                self.model_id,
                self.components,
                self.report,
                budget,
                cfg["utility"],
                cfg["solver"],
                risk_report=self.risk,
                provenance=prov,
                alpha_ratio=float(cfg["alpha_ratio"]),
                use_rslora=self.use_rslora,
                init=self.init,
                architecture=self.architecture,
            )
        rank = self.baseline_rank(placement, budget)
        ranks = {
            c.name: rank if placement == "uniform" or c.family == placement else 0 for c in self.eligible
        }
        solver = {"status": f"baseline ({placement})", "mip_gap": 0.0, "granularity": "type", "groups": {}}
        return Plan(
            model_id=self.model_id,
            components=self.components,
            ranks=dict(ranks),
            budget=budget,
            solver=solver,
            provenance=prov,
            alpha_ratio=float(cfg["alpha_ratio"]),
            use_rslora=self.use_rslora,
            init=self.init,
            architecture=self.architecture,
        )

    def plan_for_params(self, params: Mapping[str, Any], number: int | None = None) -> Plan:
        """Rebuild a finished trial's plan from its parameters (solving is deterministic)."""
        return self.plan(self.search.suggest(FixedParams(params, number or 0)), number)

    def baseline_params(self, name: str) -> dict[str, Any] | None:
        """The parameters a baseline trial is enqueued with; None when the baseline has nothing to adapt."""
        placement = "solver" if name == "default" else name
        base = BaseTrial(placement)
        cfg = self.search.suggest(base)
        if placement != "solver" and self.baseline_rank(placement, int(cfg["budget"])) == 0:
            return None
        return base.params

    def check_feasible(self) -> None:
        """The smallest and the largest budget must solve at the smallest grid top, and with a data-driven
        init its data must hold the uniform baseline's ranks; else InputError before any trial runs."""
        sp, base = self.search.spaces, self.search.suggest(BaseTrial("solver"))
        top = min(sp["max_rank"].values) if sp["max_rank"].searched else base["solver"].ranks[-1]
        base["solver"] = dataclasses.replace(base["solver"], ranks=grid_up_to(self.search.solver.ranks, top))
        for budget in sorted({min(sp["budget"].values), max(sp["budget"].values)}):
            try:
                self.plan({**base, "budget": budget})
            except InputError as exc:
                raise InputError(
                    "the search space reaches an infeasible corner (budget "
                    f"{budget:,}, max_rank {top}): {exc}; narrow TuneSettings.budget or raise "
                    "TuneSettings.max_rank"
                ) from None
        if self.init != "default":
            uniform = {**self.search.suggest(BaseTrial("uniform")), "budget": max(sp["budget"].values)}
            self.lora_a_init(self.plan(uniform))

    def lora_a_init(self, plan: Plan) -> Callable[[Any], None]:
        """The fine-tune's ``init``: the init's directions (EVA's or the gradient's) copied into lora_A at
        ``plan``'s ranks, as ``Plan.apply`` does. Directions are kept per module; one pass computes those a
        plan needs beyond what earlier trials asked for, at its largest such rank, and a module takes their
        first ``r`` rows (both inits order them by importance, so a prefix is the init at the lower rank)."""
        targets, cache = init_targets(plan.components, plan.targets), self._directions
        need = {n: r for n, r in targets.items() if n not in cache or cache[n].shape[0] < r}
        if need:
            cache.update(init_components(plan.init, self.model, sorted(need), self.calibration,
                                         max(need.values())))
        return lambda peft_model: init_lora_a(peft_model, cache, targets)

    def __call__(self, trial: Any) -> float | tuple[float, float]:
        """One trial: suggest, solve, fine-tune (or the user's objective), report; raises :class:`Pruned`."""
        started, s = time.perf_counter(), self.settings
        cfg = self.search.suggest(trial)
        try:
            plan = self.plan(cfg, trial.number)
        # e.g. share bounds this grid cannot meet: not this study's fault to crash on
        except InputError as exc:
            trial.set_user_attr("note", f"infeasible: {exc}")
            raise Pruned(str(exc)) from None
        trial.set_user_attr("cost", plan.cost)
        trial.set_user_attr("budget", plan.budget)
        trial.set_user_attr("worker", f"{platform.node()}:{os.getpid()}")
        setup = time.perf_counter() - started
        if self.user_objective is not None:
            value = float(self.user_objective(plan, trial))
            work = time.perf_counter() - started - setup
        else:
            single = s.mode == "single"
            baseline = trial.user_attrs.get("baseline")
            protected = baseline in PROTECTED_BASELINES or baseline == UNIFORM_AT_WINNER
            prunable = single and s.pruner != "none" and not protected
            left = steps_left(trial.study, s) if s.step_budget and not protected else None
            if left is not None and left < (min(s.steps, s.eval_every or s.steps) if single else s.steps):
                trial.set_user_attr("steps", 0)
                raise Pruned(f"the study's step budget ({s.step_budget} steps) is spent")
            run = FinetuneSettings(
                steps=s.steps,
                lr=cfg["lr"],
                seed=s.seed,
                batch_size=s.batch_size,
                eval_every=(s.eval_every or None) if single else None,
            )
            config = plan.to_lora_config(base_model_name_or_path=None)  # PEFT fills in the model's own
            result = finetune(
                self.model,
                config,
                self.train,
                self.evals,
                run,
                callback=_reporter(trial, prunable, left, s.eval_every) if single else None,
                init=self.lora_a_init(plan) if plan.init != "default" else None,
            )
            value, work = result.eval_loss, result.wall_time_s
            trial.set_user_attr("steps", s.steps)
            trial.set_user_attr("initial_eval_loss", result.initial_eval_loss)
        trial.set_user_attr("timing", {"setup_s": setup, "objective_s": work})
        return value if s.mode == "single" else (value, float(plan.cost))


def _reporter(trial: Any, prunable: bool, left: int | None = None, every: int = 0
              ) -> Callable[[int, float], None]:
    """The fine-tune callback: report each intermediate eval loss; raise :class:`Pruned` when the pruner says
    so, or when the next eval step would pass the ``left`` steps of the study's step budget."""

    def callback(step: int, loss: float) -> None:
        trial.report(loss, step)
        if prunable and trial.should_prune():
            trial.set_user_attr("steps", step)
            raise Pruned(f"eval loss {loss:.4f} at step {step} lags the other trials")
        if left is not None and step + every > left:
            trial.set_user_attr("steps", step)
            raise Pruned(f"stopped at step {step}: the study's step budget has {left} steps for this trial")

    return callback


def steps_left(study: Any, s: TuneSettings) -> int:
    """Steps of ``s.step_budget`` a prunable trial may still train: the budget less the steps of the finished
    trials and a whole pilot for each protected one still to come (the default and uniform baselines, and
    ``uniform@winner``). Trials running in other workers are not counted, so parallel workers may pass the
    budget by what they run at once."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    spent = sum(int(t.user_attrs.get("steps", s.steps * (t.state.name == "COMPLETE"))) for t in finished)
    done = {t.user_attrs.get("baseline") for t in finished}
    owed = [b for b in s.baselines if b in PROTECTED_BASELINES and b not in done]
    if UNIFORM_AT_WINNER not in done and any(s.spaces[k].searched for k in TRAINING if k in s.spaces):
        owed.append(UNIFORM_AT_WINNER)  # a winner at other training settings gets this extra pilot
    return s.step_budget - spent - s.steps * len(owed)
