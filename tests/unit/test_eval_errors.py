"""Evaluator errors are not verdicts (issue 21): a model that does not load or run is retried, and
once dead-lettered leaves its version `unevaluated` (re-evaluable, never quarantined) until
`reevaluate` brings a real verdict. On the real local adapters, with the evaluator's, the
registry's and the tracker's handlers; evaluate() itself is a stand-in (a real evaluation, and that
load failures raise ModelLoadError, are in tests/unit/test_evaluation.py)."""
import pytest

from shared.domain import events as ev, model_registry as reg
from shared.domain.access import Caller
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import handle_message, publish_event
from shared.platform.topology import dlq_subscription
from tests.unit.bus_drain import drain
from tests.unit.governance import own
from tests.unit.test_registry import BUCKET, RECIPE, write_adapter, write_dataset

from services.evaluator import evaluation
from services.evaluator.evaluation import EvalResult, EvaluationError, ModelLoadError
from services.evaluator.judge import JudgeError
from services.evaluator.service import SERVICE as EVALUATOR
from services.registry_fn.service import SERVICE as REGISTRY
from services.tracker.service import SERVICE as TRACKER


def admin(name: str) -> Caller:
    return Caller(subject=name, admin=True)


NAME = RECIPE.model_name


@pytest.fixture(autouse=True)
def owned(request):
    if "adapters" in request.fixturenames:
        own(request.getfixturevalue("adapters").docs, RECIPE)
LOAD_FAILED = ModelLoadError(f"base model {RECIPE.base_model!r} could not be loaded: [Errno 5] Input/output error")


@pytest.fixture
def adapters(tmp_path):
    """The local adapters, with a nack backoff short enough to run every delivery attempt."""
    a = bootstrap(Settings(state_dir=tmp_path / "state", min_backoff_s=0.01, max_backoff_s=0.01))
    yield a
    a.close()


class Evaluate:
    """Stands in for evaluation.evaluate: raises `fault` on its first `failures` calls, then passes."""

    def __init__(self, failures: int, fault: Exception = LOAD_FAILED):
        self.failures, self.fault, self.calls = failures, fault, 0

    def __call__(self, recipe, data_dir, adapter_dir, **kwargs) -> EvalResult:
        self.calls += 1
        if self.calls <= self.failures:
            raise type(self.fault)(*self.fault.args)   # a new one each time, as a real fault
        scores = {"base": {"chrf": 20.0}, "candidate": {"chrf": 31.5}}
        return EvalResult(scores=scores, deltas={"chrf": 11.5}, intervals={}, passed=True,
                          reasons=["chrf: candidate 31.5 ≥ base 20.0"], gate={}, report_markdown="# Evaluation\n",
                          examples=2, available=2, seconds=0.1)


@pytest.fixture
def evaluate(monkeypatch):
    def install(failures: int, fault: Exception = LOAD_FAILED) -> Evaluate:
        stand_in = Evaluate(failures, fault)
        monkeypatch.setattr(evaluation, "evaluate", stand_in)
        return stand_in
    return install


def trained(adapters, run_id: str = "run-a") -> ev.TrainingCompleted:
    """What the trainer leaves and publishes."""
    event = ev.TrainingCompleted(run_id=run_id, recipe=RECIPE, dataset_uri=write_dataset(adapters),
                                 adapter_uri=write_adapter(adapters, run_id), metrics={"train_loss": 1.2}, steps=6)
    publish_event(adapters.bus, event)
    return event


def run_evaluator(adapters) -> list[str]:
    """Deliver the evaluator's messages (redeliveries too) until none is left: the outcomes."""
    outcomes = []
    while msgs := adapters.bus.pull(ev.subscription_name(EVALUATOR.name, ev.TRAINING), max_messages=1, timeout_s=0.5):
        outcomes.append(handle_message(EVALUATOR, adapters, ev.TRAINING, msgs[0]))
    return outcomes


def run(adapters, service, topics) -> list[str]:
    outcomes = []
    for topic in topics:
        for msg in adapters.bus.pull(ev.subscription_name(service.name, topic), max_messages=20, timeout_s=0.3):
            outcomes.append(handle_message(service, adapters, topic, msg))
    return outcomes


def registry(adapters) -> list[str]:
    return run(adapters, REGISTRY, [ev.EVALUATIONS])


def tracker(adapters) -> None:
    # The dead letter's notice (on jobs) last: it fails only a run the tracker knows of already.
    run(adapters, TRACKER, [ev.TRAINING, ev.EVALUATIONS, ev.MODELS, ev.JOBS, ev.NOTICES])


def evaluations(adapters) -> list:
    """What the evaluator published, as the tracker's subscription sees it (without consuming the registry's)."""
    return drain(adapters, ev.subscription_name("test", ev.EVALUATIONS))


def dead_letters(adapters) -> list:
    return adapters.bus.pull(dlq_subscription(ev.TRAINING), max_messages=10, timeout_s=0.3)


@pytest.fixture(autouse=True)
def watch_evaluations(adapters):
    adapters.bus.create_subscription(ev.subscription_name("test", ev.EVALUATIONS), ev.EVALUATIONS,
                                     adapters.settings.subscription_policy())


@pytest.mark.parametrize("fault", [LOAD_FAILED, RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   JudgeError("eval.judge j at http://127.0.0.1:9/v1 is required but gave no verdict")],
                         ids=["load", "run", "judge"])
def test_a_model_that_fails_once_is_retried_and_judged_once(adapters, evaluate, fault):
    stand_in = evaluate(failures=1, fault=fault)
    trained(adapters)
    assert run_evaluator(adapters) == ["nacked", "acked"]
    assert stand_in.calls == 2
    [verdict] = evaluations(adapters)
    assert isinstance(verdict, ev.EvaluationCompleted) and verdict.passed
    assert dead_letters(adapters) == []
    assert registry(adapters) == ["acked"]
    assert reg.get_version(adapters.docs, NAME, "1.1")["status"] == "promoted"


def test_a_model_that_never_loads_is_unevaluated_until_a_reevaluation_judges_it(adapters, evaluate):
    stand_in = evaluate(failures=10**6)
    trained(adapters)
    attempts = adapters.settings.max_delivery_attempts
    assert run_evaluator(adapters) == ["nacked"] * (attempts - 1) + ["dead-lettered"]
    assert stand_in.calls == attempts

    # No verdict: an EvaluationErrored, and the message dead-lettered with the reason.
    [errored] = evaluations(adapters)
    assert isinstance(errored, ev.EvaluationErrored)
    assert (errored.attempts, errored.reevaluation, errored.steps) == (attempts, 0, 6)
    assert errored.error.startswith("ModelLoadError: base model") and "Input/output error" in errored.error
    [dead] = dead_letters(adapters)
    reason = dead.attributes["dead_letter_reason"]
    assert f"evaluation errored on all {attempts} attempts (ModelLoadError" in reason
    assert "unevaluated, not quarantined" in reason and f"ftpipe models reevaluate {NAME} VERSION" in reason
    dead.ack()

    # The registry records the version unevaluated: no bundle, no alias, not quarantined.
    assert registry(adapters) == ["acked"]
    doc = reg.get_version(adapters.docs, NAME, "1.1")
    assert (doc["status"], doc["registered_status"], doc["aliases"]) == ("unevaluated", "unevaluated", [])
    assert doc["evaluation"] == {"error": errored.error, "attempts": attempts}
    assert doc["uri"] == adapters.store.url(BUCKET, f"models/{NAME}/1.1/")
    assert list(adapters.store.list(BUCKET, f"models/{NAME}/")) == []
    [registered] = drain(adapters, ev.subscription_name("serving", ev.MODELS))
    assert (registered.type, registered.status, registered.change) == ("ModelRegistered", "unevaluated", 0)
    tracker(adapters)
    run_doc = adapters.docs.get("runs", "run-a")
    assert run_doc["status"] == "failed" and "ftpipe models reevaluate" in run_doc["error"]
    assert run_doc["model"]["status"] == "unevaluated" and run_doc["evaluation"]["error"] == errored.error

    # Without a verdict, nothing moves it: the refusals say what to run.
    for op in (lambda: reg.approve(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann")),
               lambda: reg.promote(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann")),
               lambda: reg.archive(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"), reason="x")):
        with pytest.raises(reg.RegistryError, match=f"ftpipe models reevaluate {NAME} 1.1") as refused:
            op()
        assert refused.value.status == 409

    # A redelivered EvaluationErrored changes nothing.
    publish_event(adapters.bus, errored)
    assert registry(adapters) == ["duplicate"]
    assert evaluations(adapters) == [errored]
    assert reg.register_unevaluated(adapters.docs, {**doc, "evaluation": {}}, error="again", approval=False)[0][
        "history"] == doc["history"]

    # The fault is fixed: re-evaluation, by a person, with a new id the evaluator does not take for a replay.
    stand_in.failures = 0
    doc = reg.reevaluate(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"))
    assert (doc["status"], doc["reevaluations"]) == ("evaluating", 1)
    assert {k: doc["history"][-1][k] for k in ("status", "actor", "reevaluation")} == {
        "status": "evaluating", "actor": "ann", "reevaluation": 1}
    assert run_evaluator(adapters) == ["acked"]
    [verdict] = evaluations(adapters)
    assert isinstance(verdict, ev.EvaluationCompleted) and verdict.passed
    assert registry(adapters) == ["acked"]
    doc = reg.get_version(adapters.docs, NAME, "1.1")
    assert (doc["status"], doc["registered_status"], doc["aliases"]) == ("promoted", "promoted", ["production", "staging"])
    assert "evaluation_request" not in doc and doc["evaluation"]["passed"] is True
    assert [e["status"] for e in doc["history"]] == ["unevaluated", "evaluating", "candidate", "promoted"]
    assert adapters.store.stat(BUCKET, f"models/{NAME}/1.1/bundle.json") is not None
    events = drain(adapters, ev.subscription_name("serving", ev.MODELS))
    assert [(e.type, getattr(e, "status", None)) for e in events] == [
        ("ModelRegistered", "promoted"), ("ModelPromoted", None), ("ModelPromoted", None)]
    assert events[0].change == 2 and events[0].event_id != registered.event_id
    tracker(adapters)
    run_doc = adapters.docs.get("runs", "run-a")
    assert (run_doc["status"], run_doc["model"]["status"], run_doc["dead_letter"]["active"]) == (
        "succeeded", "promoted", False)
    assert run_doc["evaluation"]["passed"] is True and run_doc["evaluation"]["error"] is None

    # A verdict is final: no re-evaluation of it, and a redelivered verdict changes nothing.
    with pytest.raises(reg.RegistryError, match="only an unevaluated version") as refused:
        reg.reevaluate(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"))
    assert refused.value.status == 409
    publish_event(adapters.bus, verdict)
    assert registry(adapters) == ["duplicate"]
    assert reg.get_version(adapters.docs, NAME, "1.1")["history"] == doc["history"]


def test_a_malformed_artefact_is_still_a_failed_gate(adapters, evaluate):
    evaluate(failures=1, fault=EvaluationError("test split is empty: test.jsonl has no rows"))
    trained(adapters)
    assert run_evaluator(adapters) == ["acked"]
    [verdict] = evaluations(adapters)
    assert isinstance(verdict, ev.EvaluationCompleted) and not verdict.passed
    assert verdict.reasons == ["evaluation failed: test split is empty: test.jsonl has no rows"]
    assert dead_letters(adapters) == []


def test_only_an_unevaluated_version_is_reevaluated(adapters, evaluate):
    evaluate(failures=1, fault=EvaluationError("test split is empty"))
    trained(adapters)
    run_evaluator(adapters)
    registry(adapters)
    assert reg.get_version(adapters.docs, NAME, "1.1")["status"] == "quarantined"
    with pytest.raises(reg.RegistryError, match="1.1 is quarantined: only an unevaluated version"):
        reg.reevaluate(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"))
