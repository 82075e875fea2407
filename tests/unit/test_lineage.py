"""Lineage folding: out-of-order and duplicated events leave one consistent run record."""
from shared import events as ev
from shared.adapters.sqlite_docs import SqliteDocStore
from shared.recipe import Recipe

from services.tracker.lineage import METRICS, RUN_EVENTS, RUNS, record

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
