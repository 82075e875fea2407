"""The tracker's API over lineage recorded by the real lineage writer in a SQLite doc store (and the
runs query on the Firestore emulator too), behind the real token authenticator."""
import io
import itertools
import json

import pytest

from shared.domain import access, events as ev
from shared.domain.access import Caller
from shared.domain.recipe import DataSpec, Recipe, apply_overrides
from shared.platform.auth import token_authenticator
from shared.platform.config import Settings, bootstrap

from services.tracker.api import create_app, query_runs
from services.tracker.lineage import record

TOKEN = "t0ken"   # the stack's own token of these tests' stores: their admin
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SUPPORT = Recipe(name="support", version=2, base_model="tiny-random-smollm2", model_name="support")
SUPPORT_SLOW = apply_overrides(SUPPORT, {"training.learning_rate": 5e-4, "adapter.r": 8})
LEGAL = Recipe(name="legal", version=1, base_model="tiny-random-smollm2", model_name="legal")
COUNTS = {"raw": 100, "valid": 95, "rejected": 5, "deduplicated": 90, "duplicates_removed": 3,
          "near_duplicates_removed": 2, "quality_filtered": 4, "pii_masked_rows": 7, "train": 70, "val": 8, "test": 8}
PRICE = 0.85  # USD per GPU-hour of the recipes' default hardware (one L4)


def lifecycle(run_id: str, recipe: Recipe, *, val_loss: float | None, end: str, tenant: str, root: str = "file:///b/"):
    """The events of one run, as the services publish them, up to `end`; `root`: the bucket's URL."""
    data, adapter = f"{root}datasets/ds-{run_id}/", f"{root}runs/{run_id}/adapter/"
    drop = f"incoming/{recipe.name}/{run_id}.jsonl"
    events = [
        ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=f"{root}{drop}", tenant=tenant,
                        source={"bucket": "ftpipe", "object": drop, "generation": "7", "size": 1234}),
        ev.DatasetPrepared(run_id=run_id, recipe=recipe, dataset_id=f"ds-{run_id}", dataset_uri=data, counts=COUNTS,
                           tenant=tenant, tokens={"total": 5000}, cost_estimate={"cost": 0.05, "gpu_hours": 0.06}),
        ev.TrainingStarted(run_id=run_id, dataset_uri=data),
        ev.TrainingProgress(run_id=run_id, total_steps=6, metrics=[
            ev.StepMetrics(step=s, loss=3.0 - s / 3, cost=0.01 * s) for s in (1, 2, 3)]),
        ev.CheckpointSaved(run_id=run_id, step=3, uri=f"{root}runs/{run_id}/checkpoints/step-3/", metrics={"loss": 2.0}),
        ev.TrainingAlert(run_id=run_id, step=4, kind="grad_norm", message="gradient norm 12 at step 4", value=12.0),
        ev.TrainingProgress(run_id=run_id, total_steps=6, metrics=[
            ev.StepMetrics(step=s, loss=3.0 - s / 3, cost=0.01 * s) for s in (4, 5, 6)]),
    ]
    if end == "failed":
        return events + [ev.TrainingFailed(run_id=run_id, reason="loss diverged", step=6)]
    if end == "running":
        return events
    metrics = {"train_loss": 1.0, "cost": 0.085} | ({"val_loss": val_loss} if val_loss is not None else {})
    events += [
        ev.TrainingCompleted(run_id=run_id, recipe=recipe, dataset_uri=data, adapter_uri=adapter, metrics=metrics,
                             steps=6),
        ev.EvaluationCompleted(run_id=run_id, recipe=recipe, dataset_uri=data, adapter_uri=adapter,
                               scores={"base": {"chrf": 20.0}, "candidate": {"chrf": 30.0 - 10 * (val_loss or 0)}},
                               passed=True, reasons=["chrf improved"], report_uri=f"{root}runs/{run_id}/eval/"),
    ]
    if end == "evaluated":
        return events
    return events + [ev.ModelRegistered(run_id=run_id, model_name=recipe.model_name, version="1.1",
                                        uri="file:///b/models/x/1.1/", status="promoted")]


RUNS = {  # run -> (recipe, val_loss, how it ends, tenant)
    "run-a": (SUPPORT, 0.9, "succeeded", "acme"),
    "run-b": (SUPPORT_SLOW, 0.4, "succeeded", "acme"),
    "run-c": (LEGAL, 0.6, "succeeded", "lawyers"),
    "run-d": (SUPPORT, None, "failed", "acme"),
    "run-e": (LEGAL, None, "running", "lawyers"),
}


def record_runs(docs, root: str = "file:///b/") -> None:
    for run_id, (recipe, val_loss, end, tenant) in RUNS.items():  # in order: created_at grows a → e
        for event in lifecycle(run_id, recipe, val_loss=val_loss, end=end, tenant=tenant, root=root):
            assert record(docs, event)


class Api:
    """The Flask test client, calling with the token unless told `auth=None`."""

    def __init__(self, app):
        self.client = app.test_client()

    def get(self, path, auth=AUTH, **kw):
        return self.client.get(path, headers=auth or {}, **kw)

    def post(self, path, auth=AUTH, headers=None, **kw):
        return self.client.post(path, headers={**(auth or {}), **(headers or {})}, **kw)

    def json(self, path, status=200):
        resp = self.get(path)
        assert resp.status_code == status, resp.get_data(as_text=True)
        return resp.get_json()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    adapters = bootstrap(Settings(state_dir=tmp_path_factory.mktemp("tracker")))
    adapters.docs.set("tenants", "acme", {})   # created by an admin (`ftpipe tenants set acme`)
    root = adapters.store.url("ftpipe", "")
    record_runs(adapters.docs, root)
    # Redelivered and late events change nothing.
    assert not record(adapters.docs, lifecycle("run-a", SUPPORT, val_loss=0.9, end="succeeded", tenant="acme",
                                               root=root)[3])
    yield adapters
    adapters.close()


def stack_auth(docs):
    return token_authenticator(docs, TOKEN)


def named(docs, name: str, *grants: tuple[str, str]) -> dict:
    """The Authorization header of a new token `name` holding each (role, tenant)."""
    admin = Caller(subject="token:stack", admin=True)
    role, tenant = grants[0]
    secret = access.create_token(docs, admin, name, role, tenant)
    for role, tenant in grants[1:]:
        access.grant(docs, admin, f"token:{name}", role, tenant)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def api(adapters):
    return Api(create_app(adapters, stack_auth(adapters.docs)))


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [r["run_id"] for r in resp.get_json()]


# ------------------------------------------------------------------ auth

def test_every_api_route_refuses_a_caller_without_the_token(api):
    rules = [r for r in api.client.application.url_map.iter_rules() if r.rule.startswith("/api/")]
    assert len(rules) >= 20
    for rule in rules:
        path = rule.rule.replace("<", "").replace(">", "")  # /api/runs/<run_id> -> /api/runs/run_id
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            for auth in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                resp = api.client.open(path, method=method, headers=auth or {})
                assert resp.status_code == 401, (method, path, auth, resp.status_code)
                assert resp.is_json and resp.get_json()["status"] == 401 and "auth-token" in resp.get_json()["error"]
    assert api.get("/healthz", auth=None).get_json() == {"status": "ok"}


def test_whoami(api):
    assert api.json("/api/whoami") == {"subject": "token:stack", "via": "token", "admin": True, "grants": {}}


def test_a_write_posted_from_another_sites_page_is_refused(api):
    resp = api.post("/api/runs/run-e/cancel", headers={"Origin": "https://evil.example"})
    assert resp.status_code == 403 and "another site" in resp.get_json()["error"]


# ------------------------------------------------------------------ runs

def test_runs_default_order_is_creation(api):
    assert ids(api.get("/api/runs")) == ["run-a", "run-b", "run-c", "run-d", "run-e"]
    assert ids(api.get("/api/runs?order_by=-created_at")) == ["run-e", "run-d", "run-c", "run-b", "run-a"]


@pytest.mark.parametrize("query, expected", [
    ("status=succeeded", ["run-a", "run-b", "run-c"]),
    ("status=failed", ["run-d"]),
    ("status=running", ["run-e"]),
    ("status=cancelled", []),
    ("recipe=support", ["run-a", "run-b", "run-d"]),
    ("recipe=legal&status=succeeded", ["run-c"]),
    ("recipe=nope", []),
    ("tenant=lawyers", ["run-c", "run-e"]),
    ("model=legal", ["run-c", "run-e"]),
    ("dataset=ds-run-b", ["run-b"]),
])
def test_runs_filters(api, query, expected):
    assert ids(api.get(f"/api/runs?{query}")) == expected


def test_runs_limit(api):
    assert ids(api.get("/api/runs?limit=2")) == ["run-a", "run-b"]
    assert ids(api.get("/api/runs?limit=1&order_by=-created_at")) == ["run-e"]


@pytest.mark.parametrize("store", ["sqlite", "firestore"])
def test_runs_with_the_lowest_validation_loss_for_a_recipe(store, request, tmp_path):
    """Ordering by a metric leaves out the runs without it, on both document stores alike."""
    from shared.platform.adapters.sqlite_docs import SqliteDocStore

    docs = SqliteDocStore(tmp_path / "docs.db")
    record_runs(docs)
    if store == "firestore":
        # The run documents the lineage wrote, copied over (the emulator's transactions take ~0.25 s each).
        from tests.emulators import make_firestore_docs
        runs_written = docs.query("runs")
        docs.close()
        docs = make_firestore_docs(request.getfixturevalue("firestore_emulator"))
        for run_id, doc in runs_written:
            docs.set("runs", run_id, doc)
    try:

        def runs(**args) -> list[str]:
            return [r["run_id"] for r in query_runs(docs, args)]
        assert runs(order_by="final_metrics.val_loss", limit="2") == ["run-b", "run-c"]
        assert runs(order_by="final_metrics.val_loss") == ["run-b", "run-c", "run-a"]   # d and e have none
        assert runs(order_by="-final_metrics.val_loss") == ["run-a", "run-c", "run-b"]
        assert runs(recipe="support", order_by="final_metrics.val_loss", limit="5") == ["run-b", "run-a"]
        assert runs(order_by="-evaluation.scores.candidate.chrf", limit="1") == ["run-b"]
        assert runs(tenant="acme", status="succeeded", order_by="-created_at") == ["run-b", "run-a"]
    finally:
        docs.close()


@pytest.mark.parametrize("query, message", [
    ("order_by=loss", "order_by must be one of"),
    ("order_by=final_metrics.val_loss;drop", "order_by must be one of"),
    ("order_by=final_metrics.a.b", "order_by must be one of"),
    ("order_by=--created_at", "order_by must be one of"),
    ("limit=ten", "limit must be an integer"),
    ("limit=0", "limit must be"),
    ("limit=-5", "limit must be"),
    ("limit=501", "limit must be"),
])
def test_bad_query_is_a_400_with_a_clear_json_message(api, query, message):
    resp = api.get(f"/api/runs?{query}")
    assert resp.status_code == 400
    assert resp.is_json, resp.get_data(as_text=True)
    assert message in resp.get_json()["error"] and resp.get_json()["status"] == 400
    if "order_by" in query:
        assert "final_metrics.val_loss" in resp.get_json()["error"]  # it says what is allowed


def test_run_with_its_events_checkpoints_alerts_hyperparameters_and_cost(api, adapters):
    run = api.json("/api/runs/run-a")
    assert run["status"] == "succeeded" and run["sub_state"] == "done" and run["tenant"] == "acme"
    assert run["recipe"]["name"] == "support" and run["final_metrics"] == {"train_loss": 1.0, "val_loss": 0.9, "cost": 0.085}
    assert run["model"] == {"name": "support", "version": "1.1", "status": "promoted", "uri": "file:///b/models/x/1.1/"}
    assert run["evaluation"]["passed"] is True and run["dataset"]["id"] == "ds-run-a"
    assert [e["seq"] for e in run["events"]] == list(range(1, 11))
    assert [e["type"] for e in run["events"]] == [
        "JobSubmitted", "DatasetPrepared", "TrainingStarted", "TrainingProgress", "CheckpointSaved", "TrainingAlert",
        "TrainingProgress", "TrainingCompleted", "EvaluationCompleted", "ModelRegistered"]
    assert run["checkpoints"] == [{"step": 3, "uri": adapters.store.url("ftpipe", "runs/run-a/checkpoints/step-3/"), "metrics": {"loss": 2.0}}]
    assert [(a["step"], a["kind"]) for a in run["alerts"]] == [(4, "grad_norm")]
    assert run["hyperparameters"]["training.learning_rate"] == SUPPORT.training.learning_rate
    assert run["hyperparameters"]["adapter.r"] == 16 and "name" not in run["hyperparameters"]
    assert run["cost"] == {"estimate_usd": 0.05, "estimate_gpu_hours": 0.06, "so_far_usd": 0.085,
                           "gpu_hours": pytest.approx(0.085 / PRICE, abs=1e-6)}
    assert run["hardware"] == {"gpu": "l4", "gpus": 1, "price_per_gpu_hour": PRICE}
    assert run["training"]["progress"] == 1.0 and run["training"]["step"] == 6
    assert run["source"]["object"] == "incoming/support/run-a.jsonl"


def test_running_run_shows_progress_eta_and_cost_so_far(api):
    run = api.json("/api/runs/run-e")
    assert run["status"] == "running" and run["training"]["progress"] == 1.0 and "eta_s" in run["training"]
    assert run["training"]["latest"]["loss"] == pytest.approx(1.0)
    assert run["cost"]["so_far_usd"] == 0.06 and run["cost"]["gpu_hours"] == pytest.approx(0.06 / PRICE, abs=1e-6)


def test_metrics_and_events_after_a_point_for_pollers(api):
    rows = api.json("/api/runs/run-a/metrics")
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6] and {m["run_id"] for m in rows} == {"run-a"}
    assert rows[-1]["loss"] == pytest.approx(1.0) and rows[-1]["cost"] == 0.06
    assert [m["step"] for m in api.json("/api/runs/run-a/metrics?after_step=4")] == [5, 6]
    assert api.json("/api/runs/run-a/metrics?after_step=6") == []
    assert [e["type"] for e in api.json("/api/runs/run-a/events?after_seq=8")] == ["EvaluationCompleted", "ModelRegistered"]
    assert "after_step must be an integer" in api.json("/api/runs/run-a/metrics?after_step=x", status=400)["error"]


def test_failed_run_keeps_its_error_and_its_own_events_only(api):
    run = api.json("/api/runs/run-d")
    assert run["status"] == "failed" and run["error"] == "loss diverged"
    assert [e["seq"] for e in run["events"]] == list(range(1, 9)) and run["events"][-1]["type"] == "TrainingFailed"
    assert {e["run_id"] for e in run["events"]} == {"run-d"}


@pytest.mark.parametrize("path", ["/api/runs/run-nope", "/api/runs/run-nope/metrics", "/api/runs/run-nope/events",
                                  "/api/compare?runs=run-a,run-nope", "/api/datasets/nope"])
def test_unknown_is_a_404(api, path):
    body = api.json(path, status=404)
    assert "nope" in body["error"] and body["status"] == 404


def test_compare_diffs_hyperparameters_and_overlays_curves(api):
    body = api.json("/api/compare?runs=run-a,run-b")
    assert [r["run_id"] for r in body["runs"]] == ["run-a", "run-b"]
    assert body["differing"] == ["adapter.r", "training.learning_rate"]
    assert [r["final_metrics"]["val_loss"] for r in body["runs"]] == [0.9, 0.4]
    assert body["runs"][1]["scores"]["candidate"]["chrf"] == 26.0
    assert body["runs"][1]["hyperparameters"]["training.learning_rate"] == 5e-4
    assert {run: [m["step"] for m in rows] for run, rows in body["metrics"].items()} == {
        "run-a": [1, 2, 3, 4, 5, 6], "run-b": [1, 2, 3, 4, 5, 6]}
    # different recipes differ in more than their names: the model they train, for one
    assert "model_name" in api.json("/api/compare?runs=run-a,run-c")["differing"]
    for bad in ("run-a", "run-a,run-a", ",".join(f"r{i}" for i in range(11))):
        assert "2 to 10 different run ids" in api.json(f"/api/compare?runs={bad}", status=400)["error"]


# ------------------------------------------------------------------ datasets, tenants, recipes

def test_dataset_funnel_pii_tokens_cost_and_runs(api, adapters):
    adapters.store.write("ftpipe", "datasets/ds-run-a/manifest.json", json.dumps({
        "dataset_id": "ds-run-a", "pii": {"counts": {"email": 3, "phone": 1}, "residual_rate": 0.001, "rows_masked": 4},
        "source": {"object": "incoming/support/run-a.jsonl"}}).encode())
    body = api.json("/api/datasets/ds-run-a")
    assert [(s["stage"], s["rows"]) for s in body["funnel"]] == [
        ("raw", 100), ("valid", 95), ("dedup", 90), ("quality", 86), ("pii", 86), ("split", 86)]
    assert body["funnel"][-1] == {"stage": "split", "rows": 86, "train": 70, "val": 8, "test": 8}
    assert body["funnel"][4]["masked"] == 7 and body["funnel"][2]["removed"] == 5
    assert body["pii"] == {"counts": {"email": 3, "phone": 1}, "residual_rate": 0.001, "rows_masked": 4}
    assert body["tokens"] == {"total": 5000} and body["cost_estimate"]["cost"] == 0.05
    assert body["runs"] == ["run-a"] and body["uri"] == adapters.store.url("ftpipe", "datasets/ds-run-a/")
    assert body["source"]["object"] == "incoming/support/run-a.jsonl"
    listed = api.json("/api/datasets?limit=2")
    assert [d["id"] for d in listed] == ["ds-run-e", "ds-run-d"] and listed[0]["funnel"][0]["rows"] == 100


def test_tenant_aggregates(api):
    spent_a = 0.085 + 0.085 + 0.06  # run-a, run-b completed; run-d failed after 6 steps
    assert api.json("/api/tenants") == [
        {"tenant": "acme", "jobs": 3, "succeeded": 2, "failed": 1, "cancelled": 0, "running": 0, "queued": 0,
         "success_rate": 0.6667, "gpu_hours": round(spent_a / PRICE, 4), "cost_usd": round(spent_a, 4)},
        {"tenant": "lawyers", "jobs": 2, "succeeded": 1, "failed": 0, "cancelled": 0, "running": 1, "queued": 0,
         "success_rate": 1.0, "gpu_hours": round(0.145 / PRICE, 4), "cost_usd": 0.145},
    ]


def test_recipes_for_the_no_code_form(api):
    recipes = {r["name"]: r for r in api.json("/api/recipes")}
    tiny = recipes["tiny-sft"]
    assert tiny["method"] == "sft" and tiny["adapter"] == "lora" and isinstance(tiny["version"], int)
    assert {"training.epochs", "training.learning_rate", "training.batch_size", "training.max_steps",
            "adapter.r"} <= set(tiny["hyperparameters"])


# ------------------------------------------------------------------ writes

def _pull(adapters, topic: str, service: str = "preprocess") -> list:
    msgs = adapters.bus.pull(ev.subscription_name(service, topic), max_messages=10, timeout_s=0.5)
    for m in msgs:
        m.ack()
    return [ev.decode(m.data, m.attributes) for m in msgs]


def test_submit_uploads_the_file_and_publishes_the_job_with_its_overrides(api, adapters):
    data = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    resp = api.post("/api/runs", data={"file": (io.BytesIO(data), "my chats.jsonl"), "recipe": "tiny-sft",
                                       "overrides": json.dumps({"training.epochs": 1, "adapter.r": 4}),
                                       "tenant": "acme"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    run_id = resp.get_json()["run_id"]
    [job] = _pull(adapters, ev.JOBS)
    assert isinstance(job, ev.JobSubmitted) and job.run_id == run_id and job.tenant == "acme" and not job.prepared
    assert job.recipe.name == "tiny-sft" and job.recipe.training.epochs == 1 and job.recipe.adapter.r == 4
    assert job.source == {"submitted": "my chats.jsonl", "by": "token:stack", "from": "dashboard"}
    bucket, name = adapters.store.parse_url(job.dataset_uri)
    assert name == f"uploads/{run_id}/my_chats.jsonl" and adapters.store.read(bucket, name) == data


@pytest.mark.parametrize("form, status, message", [
    ({"recipe": "tiny-sft"}, 400, "a multipart form with the dataset in 'file'"),
    ({"file": True, "recipe": "../etc/recipe.yaml"}, 400, "'recipe' must name a recipe"),
    ({"file": True, "recipe": "nope"}, 400, "recipe 'nope' not found"),
    ({"file": True, "recipe": "tiny-sft", "overrides": "{epochs: 1}"}, 400, "'overrides' is not JSON"),
    ({"file": True, "recipe": "tiny-sft", "overrides": "[1]"}, 400, "'overrides' must be a mapping"),
    ({"file": True, "recipe": "tiny-sft", "overrides": '{"training.epochz": 1}'}, 400, "unknown field 'epochz'"),
    ({"file": True, "recipe": "tiny-sft", "tenant": "Not A Tenant!"}, 400, "tenant"),
])
def test_submit_refuses_a_bad_form(api, adapters, form, status, message):
    if form.pop("file", False):
        form["file"] = (io.BytesIO(b"{}\n"), "x.jsonl")
    resp = api.post("/api/runs", data=form)
    assert resp.status_code == status and message in resp.get_json()["error"], resp.get_json()
    assert _pull(adapters, ev.JOBS) == []


def test_an_upload_over_the_limit_is_refused_before_it_is_read(adapters, tmp_path):
    from dataclasses import replace

    small = replace(adapters, settings=adapters.settings.model_copy(update={"max_upload_bytes": 1000}))
    api = Api(create_app(small, stack_auth(small.docs)))
    resp = api.post("/api/runs", data={"file": (io.BytesIO(b"x" * 2000), "big.jsonl"), "recipe": "tiny-sft"})
    assert resp.status_code == 413
    assert "1,000 bytes, FTPIPE_MAX_UPLOAD_BYTES" in resp.get_json()["error"]
    assert "drop a bigger dataset into the bucket" in resp.get_json()["error"]
    assert _pull(adapters, ev.JOBS) == []


def test_cancel(api, adapters):
    record(adapters.docs, ev.JobSubmitted(run_id="run-x", recipe=LEGAL, dataset_uri="file:///b/x.jsonl"))
    resp = api.post("/api/runs/run-x/cancel")
    assert resp.status_code == 200 and resp.get_json()["status"] == "cancelled"
    assert adapters.docs.get("cancellations", "run-x") is not None
    again = api.post("/api/runs/run-x/cancel")
    assert again.status_code == 409 and "already ended (cancelled)" in again.get_json()["error"]
    assert api.post("/api/runs/run-nope/cancel").status_code == 404


# ------------------------------------------------------------------ privacy sign-off

PII = {"counts": {"email": 3, "phone": 1}, "rows_scanned": 40, "rows_masked": 4, "residual_rate": 0.0005}
PRIVATE = Recipe(name="tiny-sft", version=1, base_model="tiny-random-smollm2", model_name="tiny-sft",
                 data=DataSpec(privacy_review=True, min_rows=1))


def _awaiting(adapters, run_id: str) -> None:
    adapters.store.write("ftpipe", f"datasets/d-{run_id}/manifest.json", b"{}")
    record(adapters.docs, ev.DatasetAwaitingReview(
        run_id=run_id, recipe=PRIVATE, dataset_id=f"d-{run_id}", dataset_uri=adapters.store.url("ftpipe", f"datasets/d-{run_id}/"),
        counts={"train": 8, "val": 1, "test": 1}, pii=PII))


@pytest.fixture(scope="module")
def ann(adapters):
    return named(adapters.docs, "ann", ("approver", "default"), ("approver", "acme"))


def test_privacy_approve_through_the_api_is_the_clis_sign_off(api, adapters, ann):
    from ftpipe.client import Client
    from ftpipe.privacy import approve

    _awaiting(adapters, "run-p1")
    [row] = api.json("/api/privacy")
    assert row["run_id"] == "run-p1" and row["pii"] == PII and row["residual_rate"] == 0.0005
    assert api.json("/api/datasets/d-run-p1")["privacy_review"]["status"] == "awaiting"

    resp = api.post("/api/privacy/run-p1/approve", json={"note": "checked"}, auth=ann)
    assert resp.status_code == 200, resp.get_json()
    signoff = resp.get_json()
    assert signoff["approver"] == "token:ann" and signoff["decision"] == "approved" and signoff["note"] == "checked"
    assert adapters.docs.get("privacy_signoffs", "run-p1")["approver"] == "token:ann"
    assert json.loads(adapters.store.read("ftpipe", "datasets/d-run-p1/manifest.json"))["privacy_signoff"] == signoff
    [prepared] = _pull(adapters, ev.DATASETS, "trainer")
    assert prepared.event_id == "run-p1:DatasetPrepared:0" and prepared.privacy_signoff == signoff
    # The CLI sees the same decision: the first one wins, and it republishes the identical event.
    bob = access.create_token(adapters.docs, Caller(subject="token:stack", admin=True), "bob", "approver", "default")
    assert approve(Client(adapters.settings, adapters, token=bob), "run-p1") == signoff
    assert _pull(adapters, ev.DATASETS, "trainer") == [prepared]
    record(adapters.docs, prepared)
    assert api.json("/api/privacy") == []
    assert api.json("/api/datasets/d-run-p1")["privacy_review"]["signoff"] == signoff

    resp = api.post("/api/privacy/run-p1/reject", json={"reason": "too late"})
    assert resp.status_code == 409 and "already approved" in resp.get_json()["error"]


def test_privacy_reject_through_the_api(api, adapters, ann):
    _awaiting(adapters, "run-p2")
    assert "'reason' is required" in api.post("/api/privacy/run-p2/reject", json={}, auth=ann).get_json()["error"]
    resp = api.post("/api/privacy/run-p2/reject", json={"reason": "names left in"}, auth=ann)
    assert resp.status_code == 200 and resp.get_json()["decision"] == "rejected"
    [rejected] = _pull(adapters, ev.DATASETS, "trainer")
    assert rejected.reason == "privacy review rejected by token:ann: names left in"
    record(adapters.docs, rejected)
    assert api.json("/api/runs/run-p2")["status"] == "failed"
    assert api.json("/api/datasets/d-run-p2")["privacy_review"]["status"] == "rejected"
    assert api.post("/api/privacy/run-nope/approve").status_code == 404
    assert api.post("/api/privacy/run-a/approve").status_code == 409  # not awaiting review
    assert api.post("/api/privacy/run-p2/approve", data="note", content_type="text/plain").status_code == 400


# ------------------------------------------------------------------ ftpipe dashboard

def test_ftpipe_dashboard_prints_the_link_with_the_token(tmp_path, capsys, monkeypatch):
    import logging
    import os

    from ftpipe.cli import main

    monkeypatch.delenv("FTPIPE_PROFILE", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level   # main() configures logging
    state = tmp_path / "state"
    assert main(["dashboard", "--state", str(state)]) == 2
    assert "the tracker is not running" in capsys.readouterr().err
    # What `ftpipe up` leaves for a running tracker (this process stands in for it).
    (state / "services").mkdir(parents=True)
    (state / "pids").mkdir()
    (state / "services" / "tracker.json").write_text(json.dumps({"url": "http://127.0.0.1:8123"}))
    (state / "pids" / "tracker.pid").write_text(str(os.getpid()))
    (state / "auth-token").write_text("s3cret\n")
    assert main(["dashboard", "--state", str(state)]) == 0
    assert capsys.readouterr().out.strip() == "http://127.0.0.1:8123/#token=s3cret"
    root.handlers[:], root.level = handlers, level


# ------------------------------------------------------------------ models and lineage

HELPDESK = Recipe(name="helpdesk", version=1, base_model="tiny-random-smollm2", model_name="helpdesk",
                  registry={"approval": True})


@pytest.fixture
def registry(tmp_path):
    """Two evaluated runs of a recipe that asks for approval, registered by the registry's own
    functions, with every event reaching the lineage through the tracker service's runtime."""
    from shared.domain import model_registry as reg
    from shared.platform.runtime import handle_message, publish_event

    from services.tracker.service import SERVICE as TRACKER

    adapters = bootstrap(Settings(state_dir=tmp_path / "state"))
    root = adapters.store.url("ftpipe", "")

    def track() -> None:
        while msgs := adapters.bus.pull(ev.subscription_name("tracker", ev.MODELS), max_messages=10, timeout_s=0.2):
            assert [handle_message(TRACKER, adapters, ev.MODELS, m) for m in msgs] == ["acked"] * len(msgs)

    for run_id, val_loss in (("run-m1", 0.5), ("run-m2", 0.3)):
        for event in lifecycle(run_id, HELPDESK, val_loss=val_loss, end="evaluated", tenant="acme", root=root):
            record(adapters.docs, event)
        version = reg.allocate_version(adapters.docs, "helpdesk", run_id, HELPDESK.base_model)
        uri = adapters.store.url("ftpipe", f"models/helpdesk/{version}/")
        adapters.store.write("ftpipe", f"models/helpdesk/{version}/bundle.json",
                             json.dumps({"name": "helpdesk", "version": version, "run_id": run_id}).encode())
        _, events = reg.register_version(adapters.docs, {
            "name": "helpdesk", "version": version, "run_id": run_id, "uri": uri, "base_model": HELPDESK.base_model,
            "evaluation": {"passed": True, "scores": {"base": {"chrf": 20.0}, "candidate": {"chrf": 30.0}},
                           "reasons": ["chrf improved"]}}, passed=True, reasons=[], approval=True)
        for event in events:
            publish_event(adapters.bus, event)
    track()
    yield adapters, Api(create_app(adapters, stack_auth(adapters.docs))), track
    adapters.close()


def test_models_versions_and_their_bundle(registry):
    _, api, _ = registry
    [model] = api.json("/api/models")
    assert model["name"] == "helpdesk" and model["versions"] == ["1.2", "1.1"] and model["aliases"] == {"staging": "1.2"}
    detail = api.json("/api/models/helpdesk")
    assert [v["status"] for v in detail["versions"]] == ["candidate", "candidate"]
    version = api.json("/api/models/helpdesk/1.2")
    assert version["run_id"] == "run-m2" and version["aliases"] == ["staging"]
    assert version["bundle"] == {"name": "helpdesk", "version": "1.2", "run_id": "run-m2"}
    assert version["bundle_matches_registry"] is None     # registered without digests (shared/domain/model_export)
    assert version["evaluation"]["scores"]["candidate"]["chrf"] == 30.0 and version["evaluation"]["reasons"]
    assert api.json("/api/models/nope", status=404)["error"].startswith("no model 'nope'")
    assert "has no version '9.9'" in api.json("/api/models/helpdesk/9.9", status=404)["error"]
    model = api.json("/api/runs/run-m2")["model"]
    assert (model["name"], model["version"], model["status"], model["uri"]) == ("helpdesk", "1.2", "candidate",
                                                                                version["uri"])
    assert model["promotions"]["staging"] | {"at": 0} == {"reason": "gate", "actor": None, "previous_version": "1.1",
                                                          "at": 0}


def test_a_version_says_whether_its_bundle_in_the_bucket_is_the_one_the_registry_recorded(registry):
    import hashlib

    from shared.domain import model_registry as reg

    adapters, api, _ = registry
    key, raw = reg.version_id("helpdesk", "1.2"), adapters.store.read("ftpipe", "models/helpdesk/1.2/bundle.json")
    adapters.docs.set(reg.MODEL_VERSIONS, key, {**adapters.docs.get(reg.MODEL_VERSIONS, key),
                                                "bundle_sha256": hashlib.sha256(raw).hexdigest()})
    assert api.json("/api/models/helpdesk/1.2")["bundle_matches_registry"] is True
    adapters.store.write("ftpipe", "models/helpdesk/1.2/bundle.json", raw.replace(b"run-m2", b"run-m9"))
    assert api.json("/api/models/helpdesk/1.2")["bundle_matches_registry"] is False


def test_model_writes_act_as_the_caller_and_reach_the_runs(registry):
    adapters, api, track = registry
    ann = named(adapters.docs, "ann", ("approver", "default"))
    resp = api.post("/api/models/helpdesk/1.1/approve", json={"note": "spot-checked"}, auth=ann)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["status"] == "promoted" and resp.get_json()["aliases"] == ["production"]
    assert resp.get_json()["approval"]["approver"] == "token:ann"
    resp = api.post("/api/models/helpdesk/1.2/approve", json={}, auth=ann)
    assert resp.get_json()["status"] == "promoted"   # allocated later: it takes production
    track()
    assert api.json("/api/runs/run-m1")["model"]["status"] == "archived"   # superseded by 1.2
    run = api.json("/api/runs/run-m2")
    assert run["model"]["status"] == "promoted" and run["model"]["approval"]["approver"] == "token:ann"
    assert run["model"]["promotions"]["production"]["actor"] == "token:ann"

    resp = api.post("/api/models/helpdesk/rollback", json={})
    assert resp.status_code == 200 and resp.get_json()["version"] == "1.1" and resp.get_json()["status"] == "promoted"
    track()
    assert api.json("/api/runs/run-m1")["model"]["promotions"]["production"]["reason"] == "rollback"
    assert api.json("/api/runs/run-m2")["model"]["status"] == "archived"
    resp = api.post("/api/models/helpdesk/1.2/quarantine", json={"reason": "leaks PII"})
    assert resp.status_code == 200 and resp.get_json()["status"] == "quarantined"
    track()
    assert api.json("/api/runs/run-m2")["model"]["status"] == "quarantined"

    # The registry's refusals, with its status and message.
    resp = api.post("/api/models/helpdesk/1.2/promote", json={"alias": "production"})
    assert resp.status_code == 409 and "quarantined versions are never promoted" in resp.get_json()["error"]
    resp = api.post("/api/models/helpdesk/1.1/archive", json={})
    assert resp.status_code == 400 and "'reason' is required" in resp.get_json()["error"]
    resp = api.post("/api/models/helpdesk/1.1/promote", json={"alias": "canary"})
    assert resp.status_code == 400 and "unknown alias 'canary'" in resp.get_json()["error"]
    assert api.post("/api/models/nope/1.1/approve").status_code == 404
    assert api.post("/api/models/helpdesk/1.1/explode").status_code == 404
    assert api.post("/api/models/helpdesk/1.1/approve", json=["x"]).status_code == 400


def test_lineage_from_a_model_version_back_to_the_dropped_file(registry):
    adapters, api, _ = registry
    graph = api.json("/api/lineage/helpdesk/1.2")
    assert [(n["kind"], n["id"]) for n in graph["nodes"]] == [
        ("model", "model:helpdesk@1.2"), ("run", "run:run-m2"), ("dataset", "dataset:ds-run-m2"),
        ("drop", f"drop:{adapters.store.url('ftpipe', 'incoming/helpdesk/run-m2.jsonl')}")]
    assert graph["edges"] == [{"from": a["id"], "to": b["id"]} for a, b in itertools.pairwise(graph["nodes"])]
    model, run, dataset, drop = graph["nodes"]
    assert model["details"]["status"] == "candidate" and model["details"]["aliases"] == ["staging"]
    assert run["details"]["recipe"]["name"] == "helpdesk" and run["details"]["final_metrics"]["val_loss"] == 0.3
    assert dataset["uri"] == adapters.store.url("ftpipe", "datasets/ds-run-m2/") and dataset["details"]["counts"] == COUNTS
    assert drop["label"] == "incoming/helpdesk/run-m2.jsonl"
    assert drop["details"] == {"via": "drop", "recipe": "helpdesk", "bucket": "ftpipe",
                               "object": "incoming/helpdesk/run-m2.jsonl", "generation": "7", "size": 1234}
    assert api.json("/api/lineage/helpdesk/3.1", status=404)["status"] == 404


def test_an_unevaluated_version_is_reevaluated_by_the_caller(registry):
    from shared.domain import model_registry as reg

    adapters, api, _ = registry
    request = ev.TrainingCompleted(run_id="run-m3", recipe=HELPDESK, dataset_uri="file:///b/datasets/d/",
                                   adapter_uri="file:///b/runs/run-m3/adapter/", metrics={}, steps=3)
    version = reg.allocate_version(adapters.docs, "helpdesk", "run-m3", HELPDESK.base_model)
    reg.register_unevaluated(adapters.docs, {
        "name": "helpdesk", "version": version, "run_id": "run-m3", "uri": adapters.store.url("ftpipe", f"models/helpdesk/{version}/"),
        "base_model": HELPDESK.base_model, "evaluation": {"error": "OSError: disk gone", "attempts": 5},
        "evaluation_request": request.model_dump(mode="json")}, error="OSError: disk gone", approval=True)
    shown = api.json(f"/api/models/helpdesk/{version}")
    assert (shown["status"], shown["bundle"], shown["evaluation"]["error"]) == ("unevaluated", None, "OSError: disk gone")
    resp = api.post(f"/api/models/helpdesk/{version}/approve", json={})
    assert resp.status_code == 409 and f"`ftpipe models reevaluate helpdesk {version}`" in resp.get_json()["error"]

    resp = api.post(f"/api/models/helpdesk/{version}/reevaluate", json={})
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["status"] == "evaluating" and resp.get_json()["history"][-1]["actor"] == "token:stack"
    [msg] = adapters.bus.pull(ev.subscription_name("evaluator", ev.TRAINING), timeout_s=2)
    assert ev.decode(msg.data, msg.attributes).event_id == "run-m3:TrainingCompleted:reevaluation-1"
    resp = api.post("/api/models/helpdesk/1.1/reevaluate", json={})
    assert resp.status_code == 409 and "can be re-evaluated" in resp.get_json()["error"]
