"""Model policy: governance that belongs to a model name, not to the job that trains it.

`model_policies/{name}` is written by an admin only (`ftpipe models policy NAME ...`,
`PUT /api/models/<name>/policy`) and says which tenants own the name (may train and approve it),
whether a version needs approval, whether the run's submitter may approve it (four-eyes), whether its
data needs a privacy sign-off, the gate rules no job may relax, and the evaluation suites no job may
turn off. A job can tighten all of it, never loosen it: `govern` raises a recipe to the policy, and is
applied at submission (shared/domain/jobs.py), by preprocess and the trainer, by the evaluator and by
the registry, so a job message forged onto the bus is bounded the same way.

A model name without a policy is unclaimed: only an admin's job may train it, and that job claims it
for its tenant (`claim`), with the defaults below.
"""
from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.domain.access import Caller, require
from shared.domain.recipe import GateRule, Recipe
from shared.platform.ports import DocStore, Transaction

POLICIES = "model_policies"
SUITES = ("safety", "memorisation", "fairness")
_ACTION_RANK = {"off": 0, "warn": 1, "block": 2}


class PolicyError(ValueError):
    """A job or change the model's policy does not allow; `status` is the HTTP answer (403 / 400)."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


class ModelPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owners: tuple[str, ...] = Field(min_length=1)   # tenants that may train, approve and serve it
    approval_required: bool = True
    four_eyes: bool = True          # a run's submitter may not approve, promote or sign off its own work
    privacy_review: bool = False
    gate: dict[str, GateRule] = {}  # floors: a recipe's rule for the metric must be at least this strict
    locked_suites: tuple[str, ...] = SUITES   # evaluation suites a job may not disable
    # false: probe answers never leave the evaluator: a job's eval.judge (an LLM judge behind an
    # endpoint, services/evaluator/judge.py) is dropped and the rules judge alone
    llm_judge: bool = True

    def public(self) -> dict:
        return self.model_dump(mode="json")


def get_policy(docs: DocStore | Transaction, name: str) -> ModelPolicy | None:
    """The name's policy (read in a transaction too), or None while it has none."""
    doc = docs.get(POLICIES, name)
    if doc is None:
        return None
    try:
        return ModelPolicy.model_validate({k: v for k, v in doc.items() if k in ModelPolicy.model_fields})
    except ValidationError as exc:
        raise PolicyError(f"{POLICIES}/{name} is not a valid policy ({exc.errors()[0]['msg']}); an admin fixes it "
                          f"with `ftpipe models policy {name} ...`", status=500) from exc


def set_policy(docs: DocStore, caller: Caller, name: str, **changes) -> ModelPolicy:
    """Create or change `name`'s policy (admin only); unchanged fields keep their values."""
    require(caller, "admin", to=f"set the policy of model {name}")

    def edit(txn):
        doc = txn.get(POLICIES, name) or {}
        current = {k: v for k, v in doc.items() if k in ModelPolicy.model_fields}
        try:
            policy = ModelPolicy.model_validate({**current, **{k: v for k, v in changes.items() if v is not None}})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise PolicyError(f"policy of {name}: {'.'.join(map(str, err['loc']))}: {err['msg']}", status=400) from exc
        bad = set(policy.locked_suites) - set(SUITES)
        if bad:
            raise PolicyError(f"policy of {name}: unknown suites {sorted(bad)}; one of {', '.join(SUITES)}", status=400)
        history = (doc.get("history") or [])[-99:] + [{"by": caller.subject, "at": time.time(),
                                                        "changes": {k: v for k, v in policy.public().items()
                                                                    if current.get(k) != v}}]
        txn.set(POLICIES, name, {**policy.public(), "history": history, "updated_at": time.time()})
        return policy
    return docs.transaction(edit)


def claim(docs: DocStore, caller: Caller, name: str, tenant: str, recipe: Recipe) -> ModelPolicy:
    """An unclaimed name, claimed by an admin's job for its tenant, with that job's approval,
    privacy review and enabled suites as the policy (an admin tightens it later with `ftpipe models
    policy`); an existing policy is returned as it is."""
    require(caller, "admin", to=f"claim the unclaimed model name {name}")
    policy = ModelPolicy(owners=(tenant,), approval_required=recipe.registry.approval,
                         privacy_review=recipe.data.privacy_review,
                         locked_suites=tuple(s for s in SUITES if getattr(recipe.eval, s).enabled))
    docs.create(POLICIES, name, {**policy.public(), "history": [{"by": caller.subject, "at": time.time(),
                                                                 "changes": {"claimed": tenant}}]})
    return get_policy(docs, name) or policy


def owner_check(policy: ModelPolicy | None, name: str, tenant: str) -> None:
    """Refuse a tenant that does not own the model name."""
    if policy is None:
        raise PolicyError(f"model name {name!r} has no policy yet, so no tenant owns it; an admin claims it with "
                          f"`ftpipe models policy {name} --owner {tenant}`")
    if tenant not in policy.owners:
        raise PolicyError(f"tenant {tenant} does not own model {name!r} (owners: {', '.join(policy.owners)}); pick "
                          f"another model_name, or an admin adds the tenant with `ftpipe models policy {name} "
                          f"--owner ...`")


def at_least_as_strict(rule: GateRule, floor: GateRule) -> bool:
    """Whether `rule` fails every candidate `floor` fails (an ordering on what both can express)."""
    if _ACTION_RANK[rule.action] < _ACTION_RANK[floor.action]:
        return False
    if floor.tolerance is not None:
        if rule.tolerance is None or rule.relative != floor.relative or rule.tolerance > floor.tolerance:
            return False
        if not set(floor.against) <= set(rule.against):
            return False
    if floor.min is not None and (rule.min is None or rule.min < floor.min):
        return False
    if floor.max is not None and (rule.max is None or rule.max > floor.max):
        return False
    return True


def loosenings(recipe: Recipe, policy: ModelPolicy) -> list[str]:
    """What in `recipe` is looser than the policy (empty: nothing)."""
    out = []
    if policy.approval_required and not recipe.registry.approval:
        out.append("registry.approval=false (the policy requires approval)")
    if policy.privacy_review and not recipe.data.privacy_review:
        out.append("data.privacy_review=false (the policy requires a privacy sign-off)")
    for suite in policy.locked_suites:
        if not getattr(recipe.eval, suite).enabled:
            out.append(f"eval.{suite}.enabled=false (the policy locks the {suite} suite on)")
    if not policy.llm_judge and recipe.eval.judge is not None:
        out.append("eval.judge is set (the policy keeps probe answers in the evaluator: no LLM judge)")
    for metric, floor in policy.gate.items():
        rule = recipe.eval.gate.get(metric)
        if rule is not None and not at_least_as_strict(rule, floor):
            out.append(f"eval.gate.{metric} is looser than the policy's floor {floor.model_dump(exclude_defaults=True)}")
    return out


def govern(recipe: Recipe, policy: ModelPolicy | None) -> Recipe:
    """The recipe raised to the policy: approval and privacy review on where the policy says so,
    locked suites enabled, no LLM judge where it forbids one, and each floor rule in place of a
    looser one. A recipe already as strict comes back unchanged."""
    if policy is None or not loosenings(recipe, policy) and all(m in recipe.eval.gate for m in policy.gate):
        return recipe
    data = recipe.model_dump(mode="json")
    data["registry"]["approval"] = recipe.registry.approval or policy.approval_required
    data["data"]["privacy_review"] = recipe.data.privacy_review or policy.privacy_review
    for suite in policy.locked_suites:
        data["eval"][suite]["enabled"] = True
    if not policy.llm_judge:
        data["eval"]["judge"] = None
    for metric, floor in policy.gate.items():
        rule = recipe.eval.gate.get(metric)
        if rule is None or not at_least_as_strict(rule, floor):
            data["eval"]["gate"][metric] = floor.model_dump(mode="json")
    return Recipe.model_validate(data)
