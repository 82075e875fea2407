"""The dashboard in a real browser, against the real tracker app (its /api over a SQLite doc store,
local bus and bucket) on a real HTTP server. The lineage is recorded by the tracker's own writer
(services/tracker/lineage.record) and the registry's own functions, as the services would."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from shared.domain import access, events as ev, model_registry as registry
from shared.domain.jobs import CANCELLATIONS, RUNS
from shared.domain.privacy import SIGNOFFS
from shared.domain.recipe import Recipe
from shared.platform.auth import authenticator, local_token
from shared.platform.config import Settings, bootstrap
from tests.browser.fixtures import open_dashboard, serve
from tests.unit.governance import ADMIN

from services.tracker.api import create_app
from services.tracker.lineage import record

expect = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'").expect

SUPPORT = Recipe(name="support", version=2, base_model="tiny-random-smollm2", model_name="support")
HOSTILE = '<img src=x onerror="window.pwned=1">'  # a run id is any string: the page must show it as text
ME = "token:stack"  # who the stack's own token authenticates as (shared/platform/auth.py): its admin


def progress(run_id: str, steps, total: int = 10) -> ev.TrainingProgress:
    return ev.TrainingProgress(run_id=run_id, total_steps=total, metrics=[
        ev.StepMetrics(step=s, loss=3.0 - s / 5, grad_norm=1.0 + s / 10, lr=2e-4, tokens_per_s=900.0 + s) for s in steps])


def seed(adapters) -> None:
    docs, store, bucket = adapters.docs, adapters.store, adapters.settings.bucket
    docs.set("tenants", "team-a", {})   # a tenant an admin created
    data = store.url(bucket, "datasets/ds-live/")
    for event in [
        ev.JobSubmitted(run_id="run-live", recipe=SUPPORT, dataset_uri=store.url(bucket, "incoming/support/a.jsonl")),
        ev.DatasetPrepared(run_id="run-live", recipe=SUPPORT, dataset_id="ds-live", dataset_uri=data,
                           counts={"raw": 100, "valid": 96, "deduplicated": 90, "train": 72, "val": 9, "test": 9}),
        ev.TrainingStarted(run_id="run-live", dataset_uri=data),
        progress("run-live", (1, 2, 3)),
        ev.JobSubmitted(run_id=HOSTILE, recipe=SUPPORT, dataset_uri=store.url(bucket, "incoming/support/b.jsonl")),
        ev.JobSubmitted(run_id="run-cancel", recipe=SUPPORT, dataset_uri=store.url(bucket, "incoming/support/d.jsonl")),
    ]:
        assert record(docs, event)

    # Three versions of "support": 1.1 then 1.2 passed the gate (1.2 in production, 1.1 archived);
    # 1.3 passed too but its recipe asks for approval, so it waits as a candidate.
    for run_id, approval in (("run-v1", False), ("run-v2", False), ("run-v3", True)):
        version = registry.allocate_version(docs, "support", run_id, SUPPORT.base_model)
        registry.register_version(docs, {
            "name": "support", "version": version, "run_id": run_id, "base_model": SUPPORT.base_model,
            "uri": store.url(bucket, f"models/support/{version}/"),
            "evaluation": {"passed": True, "reasons": ["chrf improved"],
                           "scores": {"base": {"chrf": 20.0}, "candidate": {"chrf": 30.0}}},
        }, passed=True, reasons=["chrf improved"], approval=approval)

    # "screener": 1.1 quarantined by the gate on point values (re-evaluable), 1.2 on significant
    # evidence (final).
    for run_id, conclusive in (("run-s1", False), ("run-s2", True)):
        version = registry.allocate_version(docs, "screener", run_id, SUPPORT.base_model)
        request = {"run_id": run_id, "recipe": SUPPORT.model_dump(mode="json"), "tenant": "default",
                   "dataset_uri": data, "adapter_uri": store.url(bucket, f"runs/{run_id}/adapter/"), "metrics": {},
                   "steps": 10}
        registry.register_version(docs, {
            "name": "screener", "version": version, "run_id": run_id, "base_model": SUPPORT.base_model,
            "uri": store.url(bucket, f"models/screener/{version}/"), "evaluation_request": request,
            "evaluation": {"passed": False, "reasons": ["refusal_rate: FAILED"], "scores": {}},
        }, passed=False, reasons=["refusal_rate: FAILED"], approval=False, conclusive=conclusive)

    # A dataset held for privacy sign-off, with its manifest where preprocess writes it.
    review = store.url(bucket, "datasets/ds-review/")
    store.write(bucket, "datasets/ds-review/manifest.json", json.dumps({"dataset_id": "ds-review"}).encode())
    for event in [
        ev.JobSubmitted(run_id="run-review", recipe=SUPPORT, dataset_uri=store.url(bucket, "incoming/support/c.jsonl")),
        ev.DatasetAwaitingReview(run_id="run-review", recipe=SUPPORT, dataset_id="ds-review", dataset_uri=review,
                                 counts={"raw": 40, "train": 32, "val": 4, "test": 4},
                                 pii={"counts": {"EMAIL": 7, "PHONE": 2}, "residual_rate": 0.0025}),
    ]:
        assert record(docs, event)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    settings = Settings(state_dir=tmp_path_factory.mktemp("dashboard"))
    adapters = bootstrap(settings)
    seed(adapters)
    app = create_app(adapters, authenticator(settings, adapters.docs, audience=None, iap=True))
    with serve(app) as url:
        yield SimpleNamespace(url=url, adapters=adapters, docs=adapters.docs, token=local_token(settings.state_dir))
    adapters.close()


def test_runs_page_lists_the_runs_and_keeps_the_token_out_of_the_address_bar(page, tracker):
    open_dashboard(page, tracker.url, tracker.token)
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('ftpipe.token')") == tracker.token
    live = page.locator('[data-testid=run-row][data-run-id="run-live"]')
    expect(live.get_by_test_id("status")).to_have_text("running")
    expect(live.get_by_test_id("progress")).to_have_attribute("data-value", "30.0")
    # Server text is text: the hostile run id is shown as it is, and nothing ran.
    expect(page.get_by_test_id("run-link").filter(has_text=HOSTILE)).to_have_count(1)
    assert page.evaluate("window.pwned") is None
    expect(page.get_by_test_id("whoami")).to_contain_text(ME)

    page.get_by_test_id("filter-status").select_option("validating")
    expect(page.get_by_test_id("run-row")).to_have_count(2)  # only submitted: the hostile run and run-cancel
    assert page.url.endswith("#/runs?status=validating")


def test_run_page_charts_gain_points_without_a_reload(page, tracker):
    open_dashboard(page, tracker.url, tracker.token, "/runs/run-live")
    loss = page.get_by_test_id("chart-loss")
    expect(loss).to_have_attribute("data-points", "3")
    expect(loss.locator("canvas")).to_have_count(1)  # uPlot drew it
    page.evaluate("window.sameDocument = true")

    assert record(tracker.docs, progress("run-live", (4, 5)))
    expect(loss).to_have_attribute("data-points", "5")  # the next poll, ≤ 2 s later
    expect(page.get_by_test_id("chart-throughput")).to_have_attribute("data-points", "5")
    expect(page.get_by_test_id("run-facts").get_by_test_id("progress")).to_have_attribute("data-value", "50.0")
    expect(page.get_by_test_id("event-row").first).to_contain_text("steps 4-5")
    assert page.evaluate("window.sameDocument") is True  # no reload happened


def test_cancel_button_cancels_the_run(page, tracker):
    open_dashboard(page, tracker.url, tracker.token, "/runs/run-cancel")
    expect(page.get_by_test_id("run-status")).to_have_text("validating")
    page.get_by_test_id("cancel-run").click()
    page.get_by_test_id("cancel-run-confirm").click()
    expect(page.get_by_test_id("run-status")).to_have_text("cancelled")
    expect(page.get_by_test_id("cancel-run")).to_be_hidden()
    assert tracker.docs.get(CANCELLATIONS, "run-cancel") is not None
    assert tracker.docs.get(RUNS, "run-cancel")["status"] == "cancelled"


def test_promote_click_moves_the_production_alias(page, tracker):
    assert registry.get_model(tracker.docs, "support")["aliases"]["production"] == "1.2"
    open_dashboard(page, tracker.url, tracker.token, "/models/support")
    row = page.locator('[data-testid=version-row][data-version="1.1"]')
    expect(row.get_by_test_id("version-status")).to_have_text("archived")

    row.get_by_test_id("action-promote").click()
    row.get_by_test_id("action-promote-confirm").click()
    expect(row.get_by_test_id("version-status")).to_have_text("promoted")
    model = registry.get_model(tracker.docs, "support")
    assert model["aliases"]["production"] == "1.1"
    move = model["alias_history"]["production"][-1]
    assert (move["version"], move["previous"], move["actor"], move["reason"]) == ("1.1", "1.2", ME, "manual")

    # A refused action says why, in the server's words: 1.3 waits for approval.
    candidate = page.locator('[data-testid=version-row][data-version="1.3"]')
    candidate.get_by_test_id("action-promote").click()
    candidate.get_by_test_id("action-promote-confirm").click()
    expect(candidate.get_by_test_id("action-error").filter(has_text="waits for approval")).to_have_count(1)
    assert registry.get_model(tracker.docs, "support")["aliases"]["production"] == "1.1"


def test_a_viewer_is_offered_no_action_and_an_approver_is(page, tracker):
    viewer = access.create_token(tracker.docs, ADMIN, "vic", "viewer", "default")
    open_dashboard(page, tracker.url, viewer, "/models/support")
    expect(page.get_by_test_id("whoami")).to_contain_text("token:vic (viewer in default)")
    expect(page.get_by_test_id("version-row")).to_have_count(3)
    expect(page.get_by_test_id("no-actions")).to_have_count(3)
    expect(page.get_by_test_id("action-approve")).to_have_count(0)
    expect(page.get_by_test_id("action-rollback")).to_have_count(0)
    approver = access.create_token(tracker.docs, ADMIN, "ann", "approver", "default")
    open_dashboard(page, tracker.url, approver, "/models/support")
    expect(page.get_by_test_id("action-approve")).to_have_count(1)


def test_a_quarantine_on_point_values_is_offered_for_re_evaluation_and_a_conclusive_one_is_not(page, tracker):
    open_dashboard(page, tracker.url, tracker.token, "/models/screener")
    on_points = page.locator('[data-testid=version-row][data-version="1.1"]')
    conclusive = page.locator('[data-testid=version-row][data-version="1.2"]')
    expect(conclusive.get_by_test_id("version-status")).to_have_text("quarantined")
    expect(conclusive.get_by_test_id("action-reevaluate")).to_have_count(0)
    on_points.get_by_test_id("action-reevaluate").click()
    on_points.get_by_test_id("action-reevaluate-confirm").click()
    expect(on_points.get_by_test_id("version-status")).to_have_text("evaluating")
    doc = registry.get_version(tracker.docs, "screener", "1.1")
    assert doc["reevaluations"] == 1 and doc["history"][-1]["actor"] == ME


def test_without_the_token_the_page_asks_for_it_and_writes_are_refused(page, tracker):
    open_dashboard(page, tracker.url, None, "/runs")
    prompt = page.get_by_test_id("auth-prompt")
    expect(prompt).to_be_visible()
    expect(prompt).to_contain_text("<state>/auth-token")
    expect(prompt).to_contain_text("ftpipe dashboard")
    expect(page.get_by_test_id("runs-table")).to_have_count(0)

    before = registry.get_model(tracker.docs, "support")["aliases"]
    status = page.evaluate("""async () => (await fetch('api/models/support/1.2/promote', {
        method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{"alias": "production"}'})).status""")
    assert status == 401
    wrong = page.evaluate("""async () => (await fetch('api/models/support/1.2/promote', {
        method: 'POST', headers: {'Content-Type': 'application/json', Authorization: 'Bearer nope'},
        body: '{"alias": "production"}'})).status""")
    assert wrong == 401
    assert registry.get_model(tracker.docs, "support")["aliases"] == before

    # Pasting the token into the prompt opens the page.
    page.get_by_test_id("auth-token-input").fill(tracker.token)
    page.get_by_test_id("auth-token-submit").click()
    expect(prompt).to_be_hidden()
    expect(page.locator('[data-testid=run-row][data-run-id="run-live"]')).to_have_count(1)


def test_no_code_form_uploads_the_file_and_publishes_a_job(page, tracker, tmp_path):
    rows = tmp_path / "support.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(3)))
    open_dashboard(page, tracker.url, tracker.token, "/new")
    page.get_by_test_id("new-file").set_input_files(str(rows))
    page.get_by_test_id("new-recipe").select_option("tiny-sft")
    page.locator('[data-testid=hp-input][data-key="training.learning_rate"]').fill("0.0005")
    page.get_by_test_id("new-tenant").fill("team-a")
    page.get_by_test_id("new-submit").click()

    expect(page).to_have_url(re.compile(r"#/runs/[^/]+$"))
    run_id = page.url.rsplit("/", 1)[-1]
    expect(page.get_by_test_id("run-waiting")).to_be_visible()  # until the tracker records the job
    [message] = tracker.adapters.bus.pull(ev.subscription_name("tracker", ev.JOBS), timeout_s=5)
    job = ev.decode(message.data, message.attributes)
    message.ack()
    assert isinstance(job, ev.JobSubmitted) and job.run_id == run_id
    assert job.recipe.name == "tiny-sft" and job.recipe.training.learning_rate == 0.0005
    assert job.recipe.training.epochs == 2  # the fields left alone keep the recipe's values
    assert job.tenant == "team-a" and job.source["by"] == ME
    bucket, name = tracker.adapters.store.parse_url(job.dataset_uri)
    assert tracker.adapters.store.read(bucket, name) == rows.read_bytes()

    assert record(tracker.docs, job)  # what the tracker service does with it
    expect(page.get_by_test_id("run-status")).to_have_text("validating")
    expect(page.get_by_test_id("run-waiting")).to_have_count(0)


def test_privacy_approve_signs_the_dataset_off(page, tracker):
    open_dashboard(page, tracker.url, tracker.token, "/privacy")
    item = page.locator('[data-testid=privacy-item][data-run-id="run-review"]')
    expect(item.get_by_test_id("pii-counts")).to_contain_text("EMAIL")
    expect(item.get_by_test_id("pii-residual")).to_have_text("0.25 %")

    item.get_by_test_id("privacy-approve").click()
    item.get_by_test_id("privacy-approve-input").fill("checked the report")
    item.get_by_test_id("privacy-approve-confirm").click()
    expect(item.get_by_test_id("privacy-decision")).to_have_text(re.compile(f"^approved by {ME}: checked the report"))
    signoff = tracker.docs.get(SIGNOFFS, "run-review")
    assert (signoff["decision"], signoff["approver"], signoff["note"]) == ("approved", ME, "checked the report")
    manifest = json.loads(tracker.adapters.store.read(tracker.adapters.settings.bucket, "datasets/ds-review/manifest.json"))
    assert manifest["privacy_signoff"]["approver"] == ME

    # Once the tracker has recorded the DatasetPrepared the sign-off published, nothing waits.
    [message] = tracker.adapters.bus.pull(ev.subscription_name("tracker", ev.DATASETS), timeout_s=5)
    prepared = ev.decode(message.data, message.attributes)
    message.ack()
    assert isinstance(prepared, ev.DatasetPrepared) and prepared.privacy_signoff["approver"] == ME
    assert record(tracker.docs, prepared)
    page.reload()
    expect(page.get_by_test_id("privacy-empty")).to_be_visible()
