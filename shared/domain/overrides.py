"""Which recipe keys a job may override, and who may (shared/domain/jobs.py `authorize_job`).

A submitter changes how a run trains (FREE: hyperparameters, epochs, seed, adapter shape, data
layout) and may make its governance stricter (TIGHTEN: approval on, privacy review on, a stricter
gate rule, a lower cost cap); every other key (the model name, the base model, scheduling priority,
PII masking and dedup settings, the prices that meter cost, the evaluation's comparisons) is an
admin's. A refused override names the key and who may change it.
"""
from __future__ import annotations

from typing import Any, Callable

from shared.domain.access import Caller
from shared.domain.recipe import GateRule, Recipe

FREE = (
    "description",
    "model_name", "base_model",   # the model name's policy decides who may train it (model_policy.owner_check)
    "training.",
    "adapter.",
    "distribution.strategy",
    "hardware.gpu", "hardware.count", "hardware.nodes", "hardware.spot",   # bounded by the tenant's quotas
    "data.format", "data.columns", "data.split_column", "data.labels", "data.stratify", "data.system_prompt",
    "data.min_rows", "data.split",
    "eval.max_new_tokens",
    "eval.dtype",         # numerics, the same on every side: no gate is looser for it
    "eval.more_rounds",   # more looks, each at a stricter confidence (Bonferroni): the same error rate
)


def _true(new: Any, old: Any) -> bool:
    return new is True or new == old


def _not_above(new: Any, old: Any) -> bool:
    return isinstance(new, (int, float)) and not isinstance(new, bool) and (old is None or new <= old)


def _not_below(new: Any, old: Any) -> bool:
    return isinstance(new, (int, float)) and not isinstance(new, bool) and (old is None or new >= old)


def _stricter_gate(new: Any, recipe: Recipe) -> bool:
    """Whether gate rules `new` ({metric: rule}) are each at least as strict as the rule the recipe
    applies to that metric now, its own or ftpipe's default (shared/domain/gate_rules.py)."""
    from shared.domain.gate_rules import effective_rules
    from shared.domain.model_policy import at_least_as_strict

    if not isinstance(new, dict):
        return False
    try:
        rules = {k: GateRule.model_validate(v) for k, v in new.items()}
    except ValueError:
        return True   # not a valid gate: let the recipe's validation say what is wrong
    current = {metric: rule for metric, (rule, _) in effective_rules(recipe).items()}
    return all(at_least_as_strict(rule, current[k]) if k in current else rule.action != "off"
               for k, rule in rules.items())


# key -> whether the new value only tightens the old one
TIGHTEN: dict[str, Callable[[Any, Any], bool]] = {
    "registry.approval": _true,
    "data.privacy_review": _true,
    "data.require_legal_basis": _true,
    "eval.safety.enabled": _true,
    "eval.memorisation.enabled": _true,
    "eval.fairness.enabled": _true,
    "data.pii_residual_threshold": _not_above,
    "data.max_rejected_fraction": _not_above,
    "budget.max_cost": _not_above,
    "eval.max_examples": _not_below,
    "eval.bootstrap_iters": _not_below,
    # evaluate_more gathers more evidence, then holds what it still cannot decide: as strict as hold
    "eval.on_inconclusive": lambda new, old: new == old or new in ("hold", "evaluate_more"),
}


class OverrideRefused(ValueError):
    status = 403


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def _current(recipe: Recipe, key: str) -> Any:
    node: Any = recipe.model_dump(mode="json")
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_overrides(caller: Caller, recipe: Recipe, overrides: dict) -> None:
    """Refuse the first override `caller` may not make to `recipe` (an admin may make any)."""
    if caller.admin:
        return
    for key, value in overrides.items():
        if _free(key):
            continue
        if key == "eval.gate" or key.startswith("eval.gate."):
            rules = value if key == "eval.gate" else {key.split(".", 2)[2]: value}
            if _stricter_gate(rules, recipe):
                continue
            raise OverrideRefused(f"override {key!r}: a submitter may only make gate rules stricter than the ones in "
                                  "force (not looser, not off); an admin may change it")
        tightens = TIGHTEN.get(key)
        if tightens is None:
            raise OverrideRefused(f"override {key!r}: only an admin may change it; submitters may change "
                                  f"{', '.join(FREE)} and tighten {', '.join(TIGHTEN)}, eval.gate")
        if not tightens(value, _current(recipe, key)):
            raise OverrideRefused(f"override {key!r}={value!r}: a submitter may only tighten it (from "
                                  f"{_current(recipe, key)!r}); an admin may loosen it")
