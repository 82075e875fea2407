"""The tracker's read API over lineage recorded by the real lineage writer in a SQLite doc store."""
import pytest

from shared import events as ev
from shared.config import Settings, bootstrap
from shared.recipe import Recipe

from services.tracker.api import create_app
from services.tracker.lineage import record

SUPPORT = Recipe(name="support", version=2, base_model="tiny-random-smollm2", model_name="support")
LEGAL = Recipe(name="legal", version=1, base_model="tiny-random-smollm2", model_name="legal")


def lifecycle(run_id: str, recipe: Recipe, *, val_loss: float | None, end: str):
    """The events of one run, as the services publish them, up to `end`."""
    data, adapter = f"file:///b/datasets/{run_id}/", f"file:///b/runs/{run_id}/adapter/"
    events = [
        ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=f"file:///b/incoming/{run_id}.jsonl"),
        ev.DatasetPrepared(run_id=run_id, recipe=recipe, dataset_id=f"ds-{run_id}", dataset_uri=data,
                           counts={"raw": 100, "train": 80, "val": 10, "test": 10}),
        ev.TrainingStarted(run_id=run_id, dataset_uri=data),
        ev.TrainingProgress(run_id=run_id, total_steps=6, metrics=[ev.StepMetrics(step=s, loss=3.0 - s / 3)
                                                                   for s in (1, 2, 3)]),
        ev.TrainingProgress(run_id=run_id, total_steps=6, metrics=[ev.StepMetrics(step=s, loss=3.0 - s / 3)
                                                                   for s in (4, 5, 6)]),
    ]
    if end == "failed":
        return events + [ev.TrainingFailed(run_id=run_id, reason="loss diverged", step=6)]
    if end == "running":
        return events
    metrics = {"train_loss": 1.0} | ({"val_loss": val_loss} if val_loss is not None else {})
    return events + [
        ev.TrainingCompleted(run_id=run_id, recipe=recipe, dataset_uri=data, adapter_uri=adapter, metrics=metrics,
                             steps=6),
        ev.EvaluationCompleted(run_id=run_id, recipe=recipe, dataset_uri=data, adapter_uri=adapter,
                               scores={"base": {"chrf": 20.0}, "candidate": {"chrf": 30.0}}, passed=True,
                               reasons=["chrf improved"], report_uri=f"file:///b/runs/{run_id}/eval/"),
        ev.ModelRegistered(run_id=run_id, model_name=recipe.model_name, version="1.1", uri="file:///b/models/x/1.1/",
                           status="promoted"),
    ]


RUNS = {  # run -> (recipe, val_loss, how it ends)
    "run-a": (SUPPORT, 0.9, "succeeded"),
    "run-b": (SUPPORT, 0.4, "succeeded"),
    "run-c": (LEGAL, 0.6, "succeeded"),
    "run-d": (SUPPORT, None, "failed"),
    "run-e": (LEGAL, None, "running"),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    adapters = bootstrap(Settings(state_dir=tmp_path_factory.mktemp("tracker"), create_resources=False))
    for run_id, (recipe, val_loss, end) in RUNS.items():  # in order: created_at grows a → e
        for event in lifecycle(run_id, recipe, val_loss=val_loss, end=end):
            assert record(adapters.docs, event)
    # Redelivered and late events change nothing.
    assert not record(adapters.docs, lifecycle("run-a", SUPPORT, val_loss=0.9, end="succeeded")[3])
    yield create_app(adapters.docs).test_client()
    adapters.close()


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [r["run_id"] for r in resp.get_json()]


def test_runs_default_order_is_creation(client):
    assert ids(client.get("/runs")) == ["run-a", "run-b", "run-c", "run-d", "run-e"]
    assert ids(client.get("/runs?order_by=-created_at")) == ["run-e", "run-d", "run-c", "run-b", "run-a"]


@pytest.mark.parametrize("query, expected", [
    ("status=succeeded", ["run-a", "run-b", "run-c"]),
    ("status=failed", ["run-d"]),
    ("status=running", ["run-e"]),
    ("status=cancelled", []),
    ("recipe=support", ["run-a", "run-b", "run-d"]),
    ("recipe=legal&status=succeeded", ["run-c"]),
    ("recipe=nope", []),
])
def test_runs_filters(client, query, expected):
    assert ids(client.get(f"/runs?{query}")) == expected


def test_runs_with_the_lowest_validation_loss(client):
    resp = client.get("/runs?order_by=final_metrics.val_loss&limit=2")
    assert ids(resp) == ["run-b", "run-c"]
    assert [r["final_metrics"]["val_loss"] for r in resp.get_json()] == [0.4, 0.6]
    # Runs without a validation loss (failed, still running) are left out, as Firestore does.
    assert ids(client.get("/runs?order_by=final_metrics.val_loss")) == ["run-b", "run-c", "run-a"]
    assert ids(client.get("/runs?order_by=-final_metrics.val_loss")) == ["run-a", "run-c", "run-b"]
    assert ids(client.get("/runs?order_by=final_metrics.val_loss&recipe=support")) == ["run-b", "run-a"]


def test_runs_limit(client):
    assert ids(client.get("/runs?limit=2")) == ["run-a", "run-b"]
    assert ids(client.get("/runs?limit=1&order_by=-created_at")) == ["run-e"]


@pytest.mark.parametrize("query, message", [
    ("order_by=loss", "order_by must be one of"),
    ("order_by=final_metrics.val_loss;drop", "order_by must be one of"),
    ("order_by=--created_at", "order_by must be one of"),
    ("limit=ten", "limit must be an integer"),
    ("limit=0", "limit must be"),
    ("limit=-5", "limit must be"),
])
def test_bad_query_is_a_400_with_a_clear_json_message(client, query, message):
    resp = client.get(f"/runs?{query}")
    assert resp.status_code == 400
    assert resp.is_json, resp.get_data(as_text=True)
    assert message in resp.get_json()["error"]
    if "order_by" in query:
        assert "final_metrics.val_loss" in resp.get_json()["error"]  # it says what is allowed


def test_run_with_its_events_and_metrics(client):
    resp = client.get("/runs/run-a")
    assert resp.status_code == 200
    run = resp.get_json()
    assert run["status"] == "succeeded" and run["sub_state"] == "done"
    assert run["recipe"]["name"] == "support" and run["final_metrics"] == {"train_loss": 1.0, "val_loss": 0.9}
    assert run["model"]["version"] == "1.1" and run["evaluation"]["passed"] is True
    assert [e["seq"] for e in run["events"]] == list(range(1, 9))
    assert [e["type"] for e in run["events"]] == [
        "JobSubmitted", "DatasetPrepared", "TrainingStarted", "TrainingProgress", "TrainingProgress",
        "TrainingCompleted", "EvaluationCompleted", "ModelRegistered"]
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3, 4, 5, 6]
    assert all(m["run_id"] == "run-a" for m in run["metrics"])
    assert run["metrics"][-1]["loss"] == pytest.approx(1.0)


def test_failed_run_keeps_its_error_and_its_own_events_only(client):
    run = client.get("/runs/run-d").get_json()
    assert run["status"] == "failed" and run["error"] == "loss diverged"
    assert [e["seq"] for e in run["events"]] == list(range(1, 7)) and run["events"][-1]["type"] == "TrainingFailed"
    assert {e["run_id"] for e in run["events"]} == {"run-d"}


def test_unknown_run_is_a_404(client):
    resp = client.get("/runs/run-nope")
    assert resp.status_code == 404
    assert resp.is_json and "no run run-nope" in resp.get_json()["error"]


def test_healthz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
