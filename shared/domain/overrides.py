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
    "training.",
    "adapter.",
    "distribution.strategy",
    "hardware.gpu", "hardware.count", "hardware.nodes", "hardware.spot",   # bounded by the tenant's quotas
    "data.format", "data.columns", "data.split_column", "data.labels", "data.stratify", "data.system_prompt",
    "data.min_rows", "data.split",
    "eval.max_new_tokens",
)


def _true(new: Any, old: Any) -> bool:
    return new is True or new == old


def _not_above(new: Any, old: Any) -> bool:
    return isinstance(new, (int, float)) and not isinstance(new, bool) and (old is None or new <= old)


def _not_below(new: Any, old: Any) -> bool:
    return isinstance(new, (int, float)) and not isinstance(new, bool) and (old is None or new >= old)


def _stricter_gate(new: Any, old: Any) -> bool:
    from shared.domain.model_policy import at_least_as_strict

    if not isinstance(new, dict):
        return False
    old = old or {}
    try:
        rules = {k: GateRule.model_validate(v) for k, v in new.items()}
    except ValueError:
        return True   # not a valid gate: let the recipe's validation say what is wrong
    if set(old) - set(rules):
        return False
    return all(at_least_as_strict(rule, GateRule.model_validate(old[k])) if k in old else rule.action != "off"
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
    "eval.gate": _stricter_gate,
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
        tightens = TIGHTEN.get(key)
        if tightens is None:
            parent = next((t for t in TIGHTEN if key.startswith(t + ".")), None)
            if parent == "eval.gate":   # eval.gate.<metric>: one rule, judged as the whole gate
                metric = key.split(".", 2)[2]
                if _stricter_gate({**recipe.eval.gate, metric: value} if isinstance(value, dict) else None,
                                  {k: v.model_dump() for k, v in recipe.eval.gate.items()}):
                    continue
                raise OverrideRefused(f"override {key!r}: a submitter may only make gate rules stricter (not looser, "
                                      "not off); an admin may change it")
            raise OverrideRefused(f"override {key!r}: only an admin may change it; submitters may change "
                                  f"{', '.join(FREE)} and tighten {', '.join(TIGHTEN)}")
        if not tightens(value, _current(recipe, key)):
            raise OverrideRefused(f"override {key!r}={value!r}: a submitter may only tighten it (from "
                                  f"{_current(recipe, key)!r}); an admin may loosen it")
