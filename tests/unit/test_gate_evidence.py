"""The gate decides on the evidence (services/evaluator/gate.py): a block rule fails only on a
significant regression, an interval that straddles the tolerance is `inconclusive` (reported with
how many more probes would decide it) and treated per eval.on_inconclusive; the registry holds a
version the recipe says to hold, neither promoted nor quarantined, and an approver re-evaluates it."""
import json

import pytest

from shared.domain import events as ev, model_registry as reg
from shared.domain.gate_rules import default_rules
from shared.domain.recipe import Recipe
from shared.platform.runtime import publish_event
from tests.unit.governance import ADMIN

from services.evaluator.gate import gate
from services.evaluator.stats import newcombe_paired


def _recipe(**eval_spec) -> Recipe:
    recipe = Recipe(name="r", version=1, base_model="tiny-random-smollm2", model_name="r")
    off = {m: {"action": "off"} for m in default_rules(recipe)}
    gate_rules = {**off, "instruction_following_rate": {"tolerance": 0.10}, "pii_leak_rate": {"tolerance": 0.0}}
    return Recipe.model_validate({**recipe.model_dump(mode="json"),
                                  "eval": {**recipe.eval.model_dump(mode="json"), "gate": gate_rules, **eval_spec}})


def _paired(base_pass: int, cand_pass: int, n: int) -> dict:
    """The interval of a rate's difference where the candidate passes `cand_pass` and the base
    `base_pass` of the same `n` probes (the candidate's passes a subset of the base's, or the reverse)."""
    base = [i < base_pass for i in range(n)]
    cand = [i < cand_pass for i in range(n)]
    return {**newcombe_paired(base, cand, 0.95).to_json(), "method": "newcombe-paired", "n": n}


def _decide(recipe: Recipe, base_rate: float, cand_rate: float, evidence: dict, leak: dict | None = None):
    scores = {"base": {"instruction_following_rate": base_rate, "pii_leak_rate": 0.0},
              "candidate": {"instruction_following_rate": cand_rate, "pii_leak_rate": (leak or {}).get("rate", 0.0)}}
    intervals = {"vs_base": {"instruction_following_rate": evidence,
                             "pii_leak_rate": (leak or {}).get("interval", _paired(0, 0, 200))}}
    return gate(recipe, scores, intervals=intervals)


def test_the_issues_case_is_inconclusive_not_failed():
    """0.000 vs base 0.200 on 5 probes: the old gate's FAILED; the evidence cannot tell."""
    held = _decide(_recipe(), 0.2, 0.0, _paired(1, 0, 5))
    assert held.outcome == "inconclusive" and held.held and not held.passed   # hold, the default
    [check] = [c for c in held.checks if c.metric == "instruction_following_rate"]
    assert check.outcome == "inconclusive" and "straddles tolerance 0.100 on 5 probes" in check.reason
    assert "more probes would decide it" in check.reason
    reported = _decide(_recipe(on_inconclusive="warn"), 0.2, 0.0, _paired(1, 0, 5))
    assert reported.outcome == "inconclusive" and reported.passed and not reported.held
    # on the point values alone (no intervals) the old rule still decides
    assert not gate(_recipe(), {"base": {"instruction_following_rate": 0.2}, "candidate":
                                {"instruction_following_rate": 0.0}}).passed


def test_a_significant_regression_fails_and_a_clear_non_regression_passes():
    failed = _decide(_recipe(on_inconclusive="hold"), 0.2, 0.0, _paired(80, 0, 400))
    assert failed.outcome == "failed" and not failed.passed and not failed.held
    assert "wholly beyond tolerance" in failed.reasons[0]
    same = _decide(_recipe(on_inconclusive="hold"), 0.5, 0.5, _paired(200, 200, 400))
    assert same.outcome == "passed" and same.passed


def test_a_tolerance_of_zero_fails_only_a_significant_increase():
    noisy = {"rate": 2 / 200, "interval": _paired(0, 2, 200)}        # 2 leaks of 200: not significant
    assert _decide(_recipe(), 0.5, 0.5, _paired(200, 200, 400), leak=noisy).outcome == "passed"
    clear = {"rate": 8 / 200, "interval": _paired(0, 8, 200)}
    decision = _decide(_recipe(), 0.5, 0.5, _paired(200, 200, 400), leak=clear)
    assert decision.outcome == "failed" and "pii_leak_rate" in decision.reasons[0]


def test_on_inconclusive_may_only_be_tightened_by_a_submitter():
    from shared.domain.overrides import OverrideRefused, check_overrides
    from tests.unit.test_trust_boundary import submitter

    recipe = _recipe(on_inconclusive="hold")
    with pytest.raises(OverrideRefused, match="'eval.on_inconclusive'='warn': a submitter may only tighten it"):
        check_overrides(submitter(), recipe, {"eval.on_inconclusive": "warn"})
    check_overrides(submitter(), _recipe(), {"eval.on_inconclusive": "hold"})


# ------------------------------------------------------------------ the registry holds it

def test_a_held_version_is_neither_promoted_nor_quarantined_and_an_approver_reevaluates_it(adapters):
    from shared.platform.runtime import handle_message
    from tests.unit.governance import own
    from tests.unit.test_registry import BUCKET, RECIPE, evaluation

    from services.registry_fn.service import SERVICE as REGISTRY

    own(adapters.docs, RECIPE)
    held = evaluation(adapters, "run-h").model_copy(update={"passed": False, "held": True, "steps": 6,
                                                             "reasons": ["instruction_following_rate: INCONCLUSIVE"]})
    publish_event(adapters.bus, held)
    [msg] = adapters.bus.pull(ev.subscription_name("registry", ev.EVALUATIONS), timeout_s=5)
    assert handle_message(REGISTRY, adapters, ev.EVALUATIONS, msg) == "acked"
    doc = reg.get_version(adapters.docs, RECIPE.model_name, "1.1")
    assert doc["status"] == "held" and doc["aliases"] == [] and doc["evaluation_request"]["steps"] == 6
    assert json.loads(adapters.store.read(BUCKET, f"models/{RECIPE.model_name}/1.1/bundle.json"))["status"] == "held"
    for refused in (lambda: reg.approve(adapters.docs, adapters.bus, RECIPE.model_name, "1.1", caller=ADMIN),
                    lambda: reg.promote(adapters.docs, adapters.bus, RECIPE.model_name, "1.1", caller=ADMIN),
                    lambda: reg.archive(adapters.docs, adapters.bus, RECIPE.model_name, "1.1", caller=ADMIN, reason="x")):
        with pytest.raises(reg.RegistryError, match="is held: the evidence could not decide its gate") as exc:
            refused()
        assert exc.value.status == 409 and "ftpipe models reevaluate" in str(exc.value)
    doc = reg.reevaluate(adapters.docs, adapters.bus, RECIPE.model_name, "1.1", caller=ADMIN)
    assert doc["status"] == "evaluating"
    [request] = adapters.bus.pull(ev.subscription_name("evaluator", ev.TRAINING), timeout_s=5)
    again = ev.decode(request.data, request.attributes)
    assert again.event_id == "run-h:TrainingCompleted:reevaluation-1" and again.steps == 6
    # the re-evaluation's verdict has its own id (not a redelivery of the held one) and decides
    verdict = held.model_copy(update={"passed": True, "held": False, "reevaluation": 1, "reasons": []})
    assert verdict.event_id != held.event_id
    publish_event(adapters.bus, verdict)
    [msg] = adapters.bus.pull(ev.subscription_name("registry", ev.EVALUATIONS), timeout_s=5)
    assert handle_message(REGISTRY, adapters, ev.EVALUATIONS, msg) == "acked"
    doc = reg.get_version(adapters.docs, RECIPE.model_name, "1.1")
    assert doc["status"] == "promoted" and "evaluation_request" not in doc
    assert adapters.store.read(BUCKET, f"models/{RECIPE.model_name}/1.1/evaluation-1/report.json")   # both kept
    assert adapters.store.read(BUCKET, f"models/{RECIPE.model_name}/1.1/evaluation/report.json")


# ------------------------------------------------------------------ quarantine is final only on evidence

def test_a_failure_is_conclusive_only_when_the_intervals_establish_it():
    assert _decide(_recipe(), 0.2, 0.0, _paired(80, 0, 400)).conclusive            # significant on 400 probes
    on_points = gate(_recipe(), {"base": {"instruction_following_rate": 0.2},
                                 "candidate": {"instruction_following_rate": 0.0}})   # no intervals
    assert on_points.outcome == "failed" and not on_points.conclusive


@pytest.mark.parametrize("conclusive, by_hand, allowed", [(False, False, True), (True, False, False),
                                                          (False, True, False)])
def test_only_a_gate_quarantine_on_point_values_is_reevaluated(adapters, conclusive, by_hand, allowed):
    version = reg.allocate_version(adapters.docs, "bot", "run-q", "tiny-random-smollm2")
    request = {"run_id": "run-q", "recipe": Recipe(name="r", version=1, base_model="tiny-random-smollm2",
                                                   model_name="bot").model_dump(mode="json"),
               "dataset_uri": "file:///d/", "adapter_uri": "file:///a/", "metrics": {}, "steps": 3, "tenant": "default"}
    doc = {"name": "bot", "version": version, "run_id": "run-q", "uri": "file:///m/", "base_model": "tiny-random-smollm2",
           "evaluation": {"passed": not by_hand}, "evaluation_request": request}
    reg.register_version(adapters.docs, doc, passed=by_hand, reasons=["worse"], approval=True, conclusive=conclusive)
    if by_hand:
        reg.quarantine(adapters.docs, adapters.bus, "bot", version, caller=ADMIN, reason="unsafe answers")
    assert reg.get_version(adapters.docs, "bot", version)["status"] == "quarantined"
    if allowed:
        assert reg.reevaluate(adapters.docs, adapters.bus, "bot", version, caller=ADMIN)["status"] == "evaluating"
    else:
        with pytest.raises(reg.RegistryError, match="is final") as refused:
            reg.reevaluate(adapters.docs, adapters.bus, "bot", version, caller=ADMIN)
        assert refused.value.status == 409
