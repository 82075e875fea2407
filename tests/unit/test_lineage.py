"""Lineage folding: out-of-order and duplicated events leave one consistent run record."""
from shared.domain import events as ev
from shared.domain.recipe import Recipe
from shared.platform.adapters.sqlite_docs import SqliteDocStore

from services.tracker.lineage import DATASETS, METRICS, RECIPES, RUN_EVENTS, RUNS, record

RECIPE = Recipe(name="t", version=1, base_model="tiny-random-smollm2", model_name="t")


def test_run_lifecycle_with_duplicates_and_disorder(tmp_path):
    docs = SqliteDocStore(tmp_path / "docs.db")
    progress = ev.TrainingProgress(run_id="r", total_steps=4, metrics=[
        ev.StepMetrics(step=1, loss=2.0), ev.StepMetrics(step=2, loss=1.5)])
    events = [
        ev.JobSubmitted(run_id="r", recipe=RECIPE, dataset_uri="file:///in"),
        ev.DatasetPrepared(run_id="r", recipe=RECIPE, dataset_id="d1", dataset_uri="file:///d/", counts={"raw": 10, "train": 8}),
        ev.TrainingStarted(run_id="r", dataset_uri="file:///d/"),
        ev.TrainingCompleted(run_id="r", recipe=RECIPE, dataset_uri="file:///d/", adapter_uri="file:///a/",
                             metrics={"train_loss": 1.0}, steps=4),
        progress,   # arrives late: must not move the run back to training
        progress,   # and twice: must not duplicate metric rows or events
        ev.EvaluationCompleted(run_id="r", recipe=RECIPE, dataset_uri="file:///d/", adapter_uri="file:///a/",
                               scores={"base": {"chrf": 10.0}, "candidate": {"chrf": 30.0}}, passed=True,
                               reasons=["chrf +20"], report_uri="file:///r/"),
        ev.ModelRegistered(run_id="r", model_name="t", version="1.1", uri="file:///m/", status="promoted"),
    ]
    recorded = [record(docs, e) for e in events]
    assert recorded == [True, True, True, True, True, False, True, True]
    run = docs.get(RUNS, "r")
    assert run["status"] == "succeeded" and run["sub_state"] == "done"
    assert run["dataset"]["counts"] == {"raw": 10, "train": 8}
    assert run["model"]["version"] == "1.1" and run["evaluation"]["passed"] is True
    assert run["seq"] == 7
    seqs = [e["seq"] for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", "r")], order_by=[("seq", "asc")])]
    assert seqs == list(range(1, 8))
    assert [m["step"] for _, m in docs.query(METRICS, where=[("run_id", "==", "r")], order_by=[("step", "asc")])] == [1, 2]


def test_failure_is_terminal(tmp_path):
    docs = SqliteDocStore(tmp_path / "docs.db")
    record(docs, ev.TrainingFailed(run_id="r", reason="diverged"))
    record(docs, ev.TrainingStarted(run_id="r", dataset_uri="file:///d/", resumed_from_step=3))
    run = docs.get(RUNS, "r")
    assert run["status"] == "failed" and run["error"] == "diverged"


def test_alerts_are_kept_once_each_on_the_run(tmp_path):
    docs = SqliteDocStore(tmp_path / "docs.db")
    spike = ev.TrainingAlert(run_id="r", step=7, kind="grad_norm", message="gradient norm 12 at step 7", value=12.0,
                             threshold=10.0)
    stop = ev.TrainingAlert(run_id="r", step=9, kind="budget", message="projected cost 3.1 above 2.4", stop=True)
    assert [record(docs, e) for e in (spike, spike, stop)] == [True, False, True]
    alerts = docs.get(RUNS, "r")["alerts"]
    assert {k: (a["kind"], a["stop"]) for k, a in alerts.items()} == {"7-grad_norm": ("grad_norm", False),
                                                                      "9-budget": ("budget", True)}
    summaries = [e["summary"] for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", "r")], order_by=[("seq", "asc")])]
    assert summaries == ["alert at step 7: gradient norm 12 at step 7", "stopped at step 9: projected cost 3.1 above 2.4"]


def test_the_registrys_changes_reach_the_runs_model(tmp_path):
    """ModelRegistered, then the registry's later changes to the version (in the order they come)."""
    docs = SqliteDocStore(tmp_path / "docs.db")
    uri = "file:///m/t/1.2/"
    common = dict(run_id="r", model_name="t", version="1.2", uri=uri)
    approved = ev.ModelApproved(**common, approver="ann@example.com", note="looks right", change=1)
    for event in (approved,  # delivered before the registration it follows: the registration does not undo it
                  ev.ModelRegistered(**common, status="candidate")):
        assert record(docs, event)
    model = docs.get(RUNS, "r")["model"]
    assert (model["status"], model["version"], model["approval"]["approver"]) == ("approved", "1.2", "ann@example.com")
    assert docs.get(RUNS, "r")["status"] == "succeeded"

    record(docs, ev.ModelPromoted(**common, alias="production", previous_version="1.1", reason="approval",
                                  actor="ann@example.com", change=2))
    model = docs.get(RUNS, "r")["model"]
    assert model["status"] == "promoted"
    assert model["promotions"]["production"] | {"at": 0} == {"reason": "approval", "actor": "ann@example.com",
                                                            "previous_version": "1.1", "at": 0}
    record(docs, ev.ModelArchived(**common, reason="superseded by 1.3", change=3))
    assert docs.get(RUNS, "r")["model"]["status"] == "archived"
    record(docs, ev.ModelPromoted(**common, alias="production", previous_version="1.3", reason="rollback",
                                  actor="bob@example.com", move=3, change=4))
    model = docs.get(RUNS, "r")["model"]
    assert model["status"] == "promoted" and model["promotions"]["production"]["reason"] == "rollback"
    record(docs, ev.ModelQuarantined(**common, reasons=["leaks PII"], actor="bob@example.com", change=5))
    model = docs.get(RUNS, "r")["model"]
    assert (model["status"], model["status_reason"], model["actor"]) == ("quarantined", "leaks PII", "bob@example.com")
    summaries = [e["summary"] for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", "r")], order_by=[("seq", "asc")])]
    assert summaries[2] == "t 1.2 is production (approval by ann@example.com, was 1.1)"
    assert summaries[-1] == "t 1.2 quarantined: leaks PII"

    # The bus delivers an approval's two events in either order: the promotion stands.
    late = dict(common, run_id="r2")
    record(docs, ev.ModelPromoted(**late, alias="production", reason="approval", actor="ann@example.com", change=2))
    record(docs, ev.ModelApproved(**late, approver="ann@example.com", change=1))
    model = docs.get(RUNS, "r2")["model"]
    assert (model["status"], model["approval"]["approver"]) == ("promoted", "ann@example.com")


def test_dataset_documents_know_their_runs_review_and_estimates(tmp_path):
    docs = SqliteDocStore(tmp_path / "docs.db")
    review = dict(recipe=RECIPE, dataset_id="d1", dataset_uri="file:///d/", counts={"raw": 10, "train": 8},
                  tokens={"total": 900}, cost_estimate={"cost": 0.02, "gpu_hours": 0.03})
    record(docs, ev.DatasetAwaitingReview(run_id="r1", **review, pii={"counts": {"email": 2}, "residual_rate": 0.0}))
    dataset = docs.get(DATASETS, "d1")
    assert dataset["runs"] == ["r1"] and dataset["privacy_review"]["status"] == "awaiting"
    assert dataset["pii"]["counts"] == {"email": 2} and dataset["tokens"] == {"total": 900}
    assert dataset["cost_estimate"]["cost"] == 0.02 and "cost" not in dataset
    assert docs.get(RUNS, "r1")["cost"] == {"estimate_usd": 0.02, "estimate_gpu_hours": 0.03}
    record(docs, ev.DatasetPrepared(run_id="r1", **review, privacy_signoff={"approver": "ann"}))
    record(docs, ev.DatasetPrepared(run_id="r2", **review))  # the same data, dropped again for another run
    dataset = docs.get(DATASETS, "d1")
    assert dataset["runs"] == ["r1", "r2"] and dataset["privacy_review"]["signoff"] == {"approver": "ann"}
    # A rejected review marks the dataset too.
    record(docs, ev.DatasetAwaitingReview(run_id="r3", **{**review, "dataset_id": "d2"}, pii={}))
    record(docs, ev.DatasetRejected(run_id="r3", recipe=RECIPE, reason="privacy review rejected by bob: names"))
    assert docs.get(DATASETS, "d2")["privacy_review"] == {"status": "rejected", "run_id": "r3",
                                                         "reason": "privacy review rejected by bob: names"}
    assert docs.get(RECIPES, "r1")["recipe"]["name"] == "t"


def test_a_dead_letter_fails_a_live_run_only_and_a_replay_must_pass_its_stage(tmp_path):
    docs = SqliteDocStore(tmp_path / "docs.db")
    notice = dict(message_type="TrainingCompleted", source_topic=ev.TRAINING, subscription="evaluator.training",
                  reason="handler failed 5 times: OSError: no space left")
    record(docs, ev.TrainingStarted(run_id="r", dataset_uri="file:///d/"))
    record(docs, ev.MessageDeadLettered(run_id="r", message_id="m1", **notice))
    assert docs.get(RUNS, "r")["status"] == "failed"
    # A late event of the stage it stopped at (published before the message was given up) leaves it failed.
    record(docs, ev.TrainingStarted(run_id="r", dataset_uri="file:///d/", resumed_from_step=5))
    assert (docs.get(RUNS, "r")["status"], docs.get(RUNS, "r")["sub_state"]) == ("failed", "training")
    record(docs, ev.ModelRegistered(run_id="r", model_name="t", version="1.1", uri="file:///m/", status="promoted"))
    run = docs.get(RUNS, "r")
    assert (run["status"], run["error"], run["dead_letter"]["active"]) == ("succeeded", None, False)
    # A finished run keeps its outcome (serving failing on its promotion is not the run failing).
    record(docs, ev.MessageDeadLettered(run_id="r", message_id="m2", **{**notice, "subscription": "serving.models"}))
    run = docs.get(RUNS, "r")
    assert run["status"] == "succeeded" and run["dead_letter"]["subscription"] == "serving.models"
    assert run["dead_letter"]["active"] is False


def test_two_subscriptions_dead_lettering_one_message_leave_the_run_replayable(tmp_path):
    """A poison JobSubmitted is dead-lettered by each service on `jobs`: the second notice must not
    take the first one's failure for the run's own ending."""
    from shared.domain.jobs import mark_replayed

    docs = SqliteDocStore(tmp_path / "docs.db")
    record(docs, ev.JobSubmitted(run_id="r", recipe=RECIPE, dataset_uri="file:///in"))
    for subscription in ("preprocess.jobs", "trainer.jobs"):
        record(docs, ev.MessageDeadLettered(run_id="r", message_id="m1", message_type="JobSubmitted",
                                            source_topic=ev.JOBS, subscription=subscription, reason="malformed"))
    run = docs.get(RUNS, "r")
    assert run["status"] == "failed" and run["dead_letter"]["active"] is True
    mark_replayed(docs, "r", "m1")
    run = docs.get(RUNS, "r")
    assert (run["status"], run["error"], run["dead_letter"]["active"]) == ("validating", None, False)


def test_an_evaluation_that_errored_waits_unevaluated_and_a_reevaluation_moves_the_run_on(tmp_path):
    docs = SqliteDocStore(tmp_path / "docs.db")
    completed = ev.TrainingCompleted(run_id="r", recipe=RECIPE, dataset_uri="file:///d/", adapter_uri="file:///a/",
                                     metrics={"train_loss": 1.0}, steps=4)
    errored = ev.EvaluationErrored(run_id="r", recipe=RECIPE, dataset_uri="file:///d/", adapter_uri="file:///a/",
                                   steps=4, error="OSError: [Errno 5] Input/output error", attempts=5)
    unevaluated = ev.ModelRegistered(run_id="r", model_name="t", version="1.1", uri="file:///m/", status="unevaluated")
    for event in (completed, unevaluated, errored):   # the registry's answer may come first
        record(docs, event)
    run = docs.get(RUNS, "r")
    # No outcome: the run waits (the evaluator's dead letter fails it, MessageDeadLettered), not succeeded.
    assert (run["status"], run["sub_state"], run["model"]["status"]) == ("running", "evaluating", "unevaluated")
    assert run["evaluation"] == {"error": "OSError: [Errno 5] Input/output error", "attempts": 5}
    assert record(docs, ev.MessageDeadLettered(run_id="r", message_id="m1", message_type="TrainingCompleted",
                                               source_topic="training", subscription="evaluator.training",
                                               reason="rejected: evaluation errored on all 5 attempts"))
    assert docs.get(RUNS, "r")["status"] == "failed"

    # `ftpipe models reevaluate`: a new request (a new id), then the verdict registers the version again.
    assert record(docs, completed.model_copy(update={"reevaluation": 1}))
    assert record(docs, ev.EvaluationCompleted(run_id="r", recipe=RECIPE, dataset_uri="file:///d/",
                                               adapter_uri="file:///a/", scores={}, passed=True, reasons=["ok"],
                                               report_uri="file:///r/"))
    assert record(docs, ev.ModelRegistered(run_id="r", model_name="t", version="1.1", uri="file:///m/",
                                           status="promoted", change=2))
    run = docs.get(RUNS, "r")
    assert (run["status"], run["sub_state"], run["model"]["status"], run["model"]["change"]) == (
        "succeeded", "done", "promoted", 2)
    assert run["dead_letter"]["active"] is False and run["evaluation"]["error"] is None
    summaries = [e["summary"] for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", "r")], order_by=[("seq", "asc")])]
    assert "evaluation errored on 5 attempts (no verdict): OSError: [Errno 5] Input/output error" in summaries
