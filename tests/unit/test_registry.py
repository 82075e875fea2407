"""The model registry on the real local adapters: versions, bundles, aliases, idempotency — and the
same handler as a functions-framework CloudEvent function driven by Pub/Sub push deliveries."""
import base64
import hashlib
import json
import logging
import sys

import pytest

from shared.domain import events as ev
from shared.domain.recipe import load_recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import LEDGER, Context, handle_message, publish_event
from shared.platform.topology import dlq_subscription
from tests.unit.bus_drain import drain
from tests.unit.governance import own

from services.registry_fn.service import MODEL_VERSIONS, MODELS, SERVICE, register

RECIPE = load_recipe("tiny-sft")
NAME = RECIPE.model_name
BUCKET = "ftpipe"
ADAPTER_FILES = {"adapter_config.json": b'{"r": 4, "lora_alpha": 8}',
                 "adapter_model.safetensors": bytes(range(256)) * 8,
                 "tokenizer/tokenizer.json": b'{"model": "tiny"}'}
BASE_SHA = "b" * 64
RUN_RECORD = {"recipe": {"name": RECIPE.name, "hash": RECIPE.hash},
              "base_model": {"ref": RECIPE.base_model, "path": "/cache/tiny", "sha256": BASE_SHA,
                             "files": {"model.safetensors": "c" * 64}},
              "seed": 0, "packages": {"torch": "2.5.0", "peft": "0.13.0"}}
MANIFEST = {"dataset_id": "d1", "source_uri": "gs://ftpipe/incoming/tiny-sft/chats.jsonl", "input_sha256": "e" * 64,
            "legal_basis": "DPA-7", "counts": {"raw": 12, "valid": 11, "train": 8, "val": 1, "test": 2},
            "tokens": {"train": {"tokens": 640}}}
PII_REPORT = {"counts": {"email": 3, "phone": 0}, "residual_rate": 0.0}
SCORES = {"base": {"chrf": 20.0, "exact": 0.1}, "candidate": {"chrf": 31.5, "exact": 0.4}}
# What the bundle holds besides the adapter, as the registry writes it.
PARTS = ["MODEL_CARD.md", "bundle.json", "dataset/manifest.json", "dataset/pii_report.json", "evaluation/report.json",
         "evaluation/report.md", "privacy_review.json", "recipe.json", "requirements.lock"]


def write_adapter(adapters, run_id: str) -> str:
    """What the trainer leaves behind: runs/<run>/adapter/… with its run record, and the COMPLETE
    marker written last."""
    prefix = f"runs/{run_id}/adapter"
    for rel, data in {**ADAPTER_FILES, "run_record.json": json.dumps(RUN_RECORD).encode()}.items():
        adapters.store.write(BUCKET, f"{prefix}/{rel}", data)
    adapters.store.write(BUCKET, f"{prefix}/COMPLETE", json.dumps({"train_loss": 1.2, "steps": 6}).encode())
    return adapters.store.url(BUCKET, prefix + "/")


def write_dataset(adapters, manifest=MANIFEST) -> str:
    """What preprocess leaves behind (the parts the bundle copies)."""
    adapters.store.write(BUCKET, "datasets/d1/manifest.json", json.dumps(manifest).encode())
    adapters.store.write(BUCKET, "datasets/d1/pii_report.json", json.dumps(PII_REPORT).encode())
    return adapters.store.url(BUCKET, "datasets/d1/")


def write_report(adapters, run_id: str) -> str:
    """What the evaluator leaves behind."""
    adapters.store.write(BUCKET, f"runs/{run_id}/evaluation/report.json", b'{"scores": {}}')
    adapters.store.write(BUCKET, f"runs/{run_id}/evaluation/report.md", b"# Evaluation\n")
    return adapters.store.url(BUCKET, f"runs/{run_id}/evaluation/")


@pytest.fixture(autouse=True)
def owned(request):
    """The model name claimed for the default tenant, as the first (admin's) submission claims it."""
    if "adapters" in request.fixturenames:
        own(request.getfixturevalue("adapters").docs, RECIPE)


def evaluation(adapters, run_id: str, *, passed: bool = True, reasons=None, recipe=RECIPE) -> ev.EvaluationCompleted:
    return ev.EvaluationCompleted(
        run_id=run_id, recipe=recipe, dataset_uri=write_dataset(adapters),
        adapter_uri=write_adapter(adapters, run_id), scores=SCORES, passed=passed,
        reasons=reasons if reasons is not None else ["chrf: candidate 31.5 ≥ base 20.0 - 0.02"],
        report_uri=write_report(adapters, run_id), training_metrics={"train_loss": 1.2, "val_loss": 1.4})


def deliver(adapters, topic=ev.EVALUATIONS) -> str:
    [msg] = adapters.bus.pull(ev.subscription_name(SERVICE.name, topic), max_messages=1, timeout_s=5)
    return handle_message(SERVICE, adapters, topic, msg)


def published_models(adapters) -> list:
    """What the registry published on `models`, as a consumer (the tracker) receives it."""
    return drain(adapters, ev.subscription_name("tracker", ev.MODELS))


def versions(adapters) -> dict:
    return {doc_id: doc for doc_id, doc in adapters.docs.query(MODEL_VERSIONS)}


def aliases(adapters) -> dict:
    return (adapters.docs.get(MODELS, NAME) or {}).get("aliases", {})


def model_files(adapters, version: str) -> list[str]:
    prefix = f"models/{NAME}/{version}/"
    return sorted(info.name[len(prefix):] for info in adapters.store.list(BUCKET, prefix))


# ------------------------------------------------------------------ the handler on the bus

def test_passed_evaluation_registers_and_promotes_1_1_with_its_whole_bundle(adapters):
    publish_event(adapters.bus, evaluation(adapters, "run-a"))
    assert deliver(adapters) == "acked"

    adapter = sorted(f"adapter/{rel}" for rel in [*ADAPTER_FILES, "run_record.json"])
    assert model_files(adapters, "1.1") == sorted(adapter + PARTS)
    for rel, data in ADAPTER_FILES.items():
        assert adapters.store.read(BUCKET, f"models/{NAME}/1.1/adapter/{rel}") == data
    bundle = json.loads(adapters.store.read(BUCKET, f"models/{NAME}/1.1/bundle.json"))
    assert bundle["name"] == NAME and bundle["version"] == "1.1" and bundle["status"] == "promoted"
    assert bundle["run_id"] == "run-a" and bundle["recipe_hash"] == RECIPE.hash
    assert bundle["base_model"] == RECIPE.base_model and bundle["base_model_sha256"] == BASE_SHA
    assert bundle["evaluation"]["scores"] == SCORES and bundle["evaluation"]["passed"] is True
    # every file of the version but bundle.json itself, with the hash of what was written
    assert sorted(f["name"] for f in bundle["files"]) == sorted(adapter + PARTS[:1] + PARTS[2:])
    for f in bundle["files"]:
        data = adapters.store.read(BUCKET, f"models/{NAME}/1.1/{f['name']}")
        assert (f["sha256"], f["size"]) == (hashlib.sha256(data).hexdigest(), len(data))
    part = lambda rel: adapters.store.read(BUCKET, f"models/{NAME}/1.1/{rel}")  # noqa: E731
    assert json.loads(part(bundle["run_record"])) == RUN_RECORD
    assert part(bundle["lockfile"]) == b"peft==0.13.0\ntorch==2.5.0\n"
    assert json.loads(part(bundle["dataset_manifest"])) == MANIFEST and json.loads(part(bundle["pii_report"])) == PII_REPORT
    assert part(bundle["evaluation"]["report_markdown"]) == b"# Evaluation\n"
    assert json.loads(part(bundle["recipe_file"])) == RECIPE.model_dump(mode="json")
    assert json.loads(part(bundle["privacy_review"])) == {"required": False, "signoff": None, "dataset_id": "d1"}

    card = part("MODEL_CARD.md").decode()
    assert card.startswith(f"# {NAME} 1.1") and "**promoted**" in card and "run-a" in card
    for section in ("## Intended use", "## Training data", "## Evaluation", "## Limitations"):
        assert section in card
    assert RECIPE.description in card and "legal basis: DPA-7" in card and "PII masked: email 3" in card
    assert "| chrf | 20 | 31.5 |" in card and "Gate: passed" in card and "- chrf: candidate 31.5" in card

    assert aliases(adapters) == {"staging": "1.1", "production": "1.1"}
    assert versions(adapters)[f"{NAME}@1.1"]["status"] == "promoted"
    uri = adapters.store.url(BUCKET, f"models/{NAME}/1.1/")
    assert published_models(adapters) == [
        ev.ModelRegistered(run_id="run-a", model_name=NAME, version="1.1", uri=uri, status="promoted"),
        ev.ModelPromoted(run_id="run-a", model_name=NAME, version="1.1", uri=uri, alias="staging", move=1),
        ev.ModelPromoted(run_id="run-a", model_name=NAME, version="1.1", uri=uri, alias="production", move=1,
                        change=1)]  # its "promoted" entry: index 1 of the version history


def test_next_run_gets_1_2_and_redelivery_is_the_same_version(adapters):
    first = evaluation(adapters, "run-a")
    publish_event(adapters.bus, first)
    assert deliver(adapters) == "acked"
    first_events = published_models(adapters)
    publish_event(adapters.bus, evaluation(adapters, "run-b"))
    assert deliver(adapters) == "acked"
    assert sorted(versions(adapters)) == [f"{NAME}@1.1", f"{NAME}@1.2"]
    assert aliases(adapters) == {"staging": "1.2", "production": "1.2"}
    assert {k: v["status"] for k, v in versions(adapters).items()} == {f"{NAME}@1.1": "archived",
                                                                      f"{NAME}@1.2": "promoted"}
    assert [(e.type, e.version, getattr(e, "previous_version", None)) for e in published_models(adapters)] == [
        ("ModelRegistered", "1.2", None), ("ModelPromoted", "1.2", "1.1"), ("ModelPromoted", "1.2", "1.1"),
        ("ModelArchived", "1.1", None)]

    # Redelivered (re-published with its deterministic event_id): the ledger recognises it.
    publish_event(adapters.bus, first)
    assert deliver(adapters) == "duplicate"
    assert sorted(versions(adapters)) == [f"{NAME}@1.1", f"{NAME}@1.2"]
    assert published_models(adapters) == []

    # Redelivered after a crash that lost the ledger entry: the handler runs again and gets the
    # same version, rewrites nothing new, does not move the aliases back to the older version, and
    # republishes exactly the events of the first delivery (same ids: consumers drop them).
    adapters.docs.delete(LEDGER, next(doc_id for doc_id, doc in adapters.docs.query(LEDGER)
                                      if doc["event_id"] == first.event_id))
    before = model_files(adapters, "1.1")
    publish_event(adapters.bus, first)
    assert deliver(adapters) == "acked"
    assert sorted(versions(adapters)) == [f"{NAME}@1.1", f"{NAME}@1.2"]
    assert model_files(adapters, "1.1") == before
    assert aliases(adapters) == {"staging": "1.2", "production": "1.2"}
    assert versions(adapters)[f"{NAME}@1.1"]["status"] == "archived"
    assert published_models(adapters) == first_events
    assert adapters.docs.get(MODELS, NAME)["runs"] == {"run-a": "1.1", "run-b": "1.2"}


def test_failed_gate_is_quarantined_and_the_aliases_stay(adapters):
    publish_event(adapters.bus, evaluation(adapters, "run-a"))
    assert deliver(adapters) == "acked"
    published_models(adapters)
    reasons = ["chrf: candidate 12.0 < base 20.0 - 0.02", "probe accuracy fell from 0.5 to 0.1"]
    publish_event(adapters.bus, evaluation(adapters, "run-b", passed=False, reasons=reasons))
    assert deliver(adapters) == "acked"

    assert aliases(adapters) == {"staging": "1.1", "production": "1.1"}
    assert versions(adapters)[f"{NAME}@1.2"]["status"] == "quarantined"
    bundle = json.loads(adapters.store.read(BUCKET, f"models/{NAME}/1.2/bundle.json"))
    assert bundle["status"] == "quarantined" and bundle["evaluation"]["reasons"] == reasons
    card = adapters.store.read(BUCKET, f"models/{NAME}/1.2/MODEL_CARD.md").decode()
    assert "**quarantined**" in card and "Gate: failed" in card and all(f"- {r}" in card for r in reasons)
    assert "must not be served" in card
    uri = adapters.store.url(BUCKET, f"models/{NAME}/1.2/")
    assert published_models(adapters) == [
        ev.ModelRegistered(run_id="run-b", model_name=NAME, version="1.2", uri=uri, status="quarantined"),
        ev.ModelQuarantined(run_id="run-b", model_name=NAME, version="1.2", uri=uri, reasons=reasons)]


def test_a_first_version_that_fails_the_gate_sets_no_alias(adapters):
    publish_event(adapters.bus, evaluation(adapters, "run-a", passed=False, reasons=["worse than base"]))
    assert deliver(adapters) == "acked"
    assert aliases(adapters) == {}
    assert versions(adapters)[f"{NAME}@1.1"]["status"] == "quarantined"


def test_with_approval_a_passing_version_waits_as_candidate_in_staging(adapters):
    gated = RECIPE.model_copy(update={"registry": RECIPE.registry.model_copy(update={"approval": True})})
    publish_event(adapters.bus, evaluation(adapters, "run-a"))
    assert deliver(adapters) == "acked"
    publish_event(adapters.bus, evaluation(adapters, "run-b", recipe=gated))
    assert deliver(adapters) == "acked"
    assert aliases(adapters) == {"staging": "1.2", "production": "1.1"}
    doc = versions(adapters)[f"{NAME}@1.2"]
    assert doc["status"] == "candidate" and doc["approval_required"] is True and doc["approval"] is None
    bundle = json.loads(adapters.store.read(BUCKET, f"models/{NAME}/1.2/bundle.json"))
    assert bundle["status"] == "candidate" and bundle["approval_required"] is True
    assert "approved by a person" in adapters.store.read(BUCKET, f"models/{NAME}/1.2/MODEL_CARD.md").decode()
    assert [(e.type, getattr(e, "alias", None)) for e in published_models(adapters)][-2:] == [
        ("ModelRegistered", None), ("ModelPromoted", "staging")]


def test_a_new_base_model_starts_a_major_version(adapters):
    other = RECIPE.model_copy(update={"base_model": "smollm2-135m-instruct"})
    record = {**RUN_RECORD, "base_model": {**RUN_RECORD["base_model"], "ref": "smollm2-135m-instruct"}}
    for run_id, recipe in (("run-a", RECIPE), ("run-b", other), ("run-c", RECIPE), ("run-d", other)):
        event = evaluation(adapters, run_id, recipe=recipe)
        if recipe is other:
            adapters.store.write(BUCKET, f"runs/{run_id}/adapter/run_record.json", json.dumps(record).encode())
        publish_event(adapters.bus, event)
        assert deliver(adapters) == "acked"
    assert adapters.docs.get(MODELS, NAME)["runs"] == {"run-a": "1.1", "run-b": "2.1", "run-c": "1.2", "run-d": "2.2"}
    # 1.2 was trained after 2.1: the later run goes to production, whatever its number.
    assert aliases(adapters)["production"] == "2.2"
    assert [v["base_model"] for v in sorted(versions(adapters).values(), key=lambda v: v["version"])] == [
        RECIPE.base_model, RECIPE.base_model, "smollm2-135m-instruct", "smollm2-135m-instruct"]


def test_registering_a_run_twice_directly_is_idempotent(adapters):
    """The domain function alone (no ledger): the same event twice is the same version and files."""
    event = evaluation(adapters, "run-a")
    ctx = Context("registry", adapters, None, None, logging.LoggerAdapter(logging.getLogger("t"), {}))
    first, second = register(event, ctx), register(event, ctx)
    assert [o.event_id for o in first] == [o.event_id for o in second]
    assert list(versions(adapters)) == [f"{NAME}@1.1"]
    assert adapters.docs.get(MODELS, NAME)["lineages"] == [{"major": 1, "base_model": RECIPE.base_model,
                                                           "next_minor": 2}]


def test_the_version_document_records_the_digests_of_its_adapter_files_and_bundle(adapters):
    """Where writers of the bucket cannot change them: the registry's document (model_export checks them)."""
    publish_event(adapters.bus, evaluation(adapters, "run-a"))
    assert deliver(adapters) == "acked"
    doc = versions(adapters)[f"{NAME}@1.1"]
    prefix = f"models/{NAME}/1.1/"
    raw = adapters.store.read(BUCKET, prefix + "bundle.json")
    assert doc["bundle_sha256"] == hashlib.sha256(raw).hexdigest()
    assert [f["name"] for f in doc["adapter_files"]] == sorted(f"adapter/{rel}" for rel in [*ADAPTER_FILES,
                                                                                            "run_record.json"])
    for f in doc["adapter_files"]:
        data = adapters.store.read(BUCKET, prefix + f["name"])
        assert (f["sha256"], f["size"]) == (hashlib.sha256(data).hexdigest(), len(data))
    assert "sealed" not in doc


def test_a_status_the_transaction_decides_otherwise_rewrites_the_bundle_whose_digest_it_recorded(adapters,
                                                                                                 monkeypatch):
    """Another registration committing between the handler's read and its transaction: the bundle
    written first names a status the transaction does not choose. The digest recorded is the one of
    the bundle the bucket ends with, and a redelivery leaves it so."""
    import services.registry_fn.service as service

    monkeypatch.setattr(service, "registration_status", lambda *a, **k: "archived")   # a stale guess
    ctx = Context("registry", adapters, None, None, logging.LoggerAdapter(logging.getLogger("t"), {}))
    event = evaluation(adapters, "run-a")
    register(event, ctx)
    doc = versions(adapters)[f"{NAME}@1.1"]
    raw = adapters.store.read(BUCKET, f"models/{NAME}/1.1/bundle.json")
    assert doc["registered_status"] == json.loads(raw)["status"] == "promoted"
    assert doc["bundle_sha256"] == hashlib.sha256(raw).hexdigest()
    card = adapters.store.read(BUCKET, f"models/{NAME}/1.1/MODEL_CARD.md")
    assert "**promoted**" in card.decode()
    assert {f["name"]: f["sha256"] for f in json.loads(raw)["files"]}["MODEL_CARD.md"] == hashlib.sha256(card).hexdigest()

    register(event, ctx)   # redelivered: the registered status, the same bytes
    assert adapters.store.read(BUCKET, f"models/{NAME}/1.1/bundle.json") == raw
    assert versions(adapters)[f"{NAME}@1.1"]["bundle_sha256"] == doc["bundle_sha256"]


def test_an_empty_adapter_folder_is_dead_lettered(adapters):
    event = evaluation(adapters, "run-a").model_copy(
        update={"adapter_uri": adapters.store.url(BUCKET, "runs/none/adapter/")})
    publish_event(adapters.bus, event)
    assert deliver(adapters) == "dead-lettered"
    [msg] = adapters.bus.pull(dlq_subscription(ev.EVALUATIONS), timeout_s=2)
    assert "is empty; nothing to register" in msg.attributes["dead_letter_reason"]


@pytest.mark.parametrize("break_it, reason", [
    (lambda a: a.store.delete(BUCKET, "runs/run-a/adapter/run_record.json"),
     "the run record (run_record.json) of adapter folder"),
    (lambda a: a.store.write(BUCKET, "runs/run-a/adapter/run_record.json", json.dumps(
        {**RUN_RECORD, "base_model": {"ref": RECIPE.base_model, "sha256": None}}).encode()),
     "has no content hash of the base model"),
    (lambda a: a.store.delete(BUCKET, "datasets/d1/manifest.json"), "the dataset manifest of"),
    (lambda a: a.store.delete(BUCKET, "datasets/d1/pii_report.json"), "the PII report of"),
    (lambda a: a.store.delete(BUCKET, "runs/run-a/evaluation/report.md"), "the evaluation report report.md"),
], ids=["run-record", "base-hash", "manifest", "pii-report", "eval-report"])
def test_a_missing_part_dead_letters_and_registers_nothing(adapters, break_it, reason):
    event = evaluation(adapters, "run-a")
    break_it(adapters)
    publish_event(adapters.bus, event)
    assert deliver(adapters) == "dead-lettered"
    [msg] = adapters.bus.pull(dlq_subscription(ev.EVALUATIONS), timeout_s=2)
    assert reason in msg.attributes["dead_letter_reason"]
    assert versions(adapters) == {} and list(adapters.store.list(BUCKET, "models/")) == []
    assert published_models(adapters) == []


def test_a_recipe_with_privacy_review_needs_the_signoff_in_the_manifest(adapters):
    reviewed = RECIPE.model_copy(update={"data": RECIPE.data.model_copy(update={"privacy_review": True})})
    publish_event(adapters.bus, evaluation(adapters, "run-a", recipe=reviewed))
    assert deliver(adapters) == "dead-lettered"
    [msg] = adapters.bus.pull(dlq_subscription(ev.EVALUATIONS), timeout_s=2)
    assert "requires a privacy sign-off" in msg.attributes["dead_letter_reason"]

    # A sign-off written into the bucket's manifest by anyone with write access is not one: the
    # registry asks the sign-off documents, which only an approver's decision writes.
    signoff = {"approver": "ann", "at": "2026-01-01T00:00:00Z", "residual_rate_seen": 0.0005}
    event = evaluation(adapters, "run-b", recipe=reviewed)
    write_dataset(adapters, {**MANIFEST, "privacy_signoff": signoff})
    publish_event(adapters.bus, event)
    assert deliver(adapters) == "dead-lettered"
    [msg] = adapters.bus.pull(dlq_subscription(ev.EVALUATIONS), timeout_s=2)
    assert "no approver's sign-off on record" in msg.attributes["dead_letter_reason"]
    adapters.docs.create("privacy_signoffs", "run-review", {"dataset_id": "d1", "decision": "approved",
                                                            "approver": "ann", "at_ts": 1.0})
    publish_event(adapters.bus, event)
    assert deliver(adapters) == "acked"
    version = adapters.docs.get(MODELS, NAME)["runs"]["run-b"]
    record = json.loads(adapters.store.read(BUCKET, f"models/{NAME}/{version}/privacy_review.json"))
    assert record == {"required": True, "signoff": signoff, "dataset_id": "d1"}
    assert "approved by ann" in adapters.store.read(BUCKET, f"models/{NAME}/{version}/MODEL_CARD.md").decode()


# ------------------------------------------------------------------ the Cloud Function

@pytest.fixture
def function_client(tmp_path, monkeypatch):
    """functions-framework loads services/registry_fn/main.py as the `on_evaluation` CloudEvent
    function, with its adapters bootstrapped from the environment (a tmp state folder)."""
    import functions_framework

    state = tmp_path / "fn-state"
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_PROJECT", "FTPIPE_CREATE_RESOURCES",
                "FTPIPE_MAX_DELIVERY_ATTEMPTS", "FTPIPE_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FTPIPE_STATE", str(state))
    monkeypatch.setenv("FTPIPE_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("FUNCTION_TARGET", "on_evaluation")  # create_app sets it; restored afterwards
    monkeypatch.setattr(sys, "path", list(sys.path))         # create_app appends the source folder
    monkeypatch.setitem(sys.modules, "main", None)           # … and registers the module as "main"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level            # the function configures logging
    app = functions_framework.create_app(target="on_evaluation", source="services/registry_fn/main.py",
                                         signature_type="cloudevent")
    module = sys.modules["main"]
    adapters = bootstrap(Settings(state_dir=state))
    own(adapters.docs, RECIPE)
    try:
        yield app.test_client(), adapters
    finally:
        if module._adapters.cache_info().currsize:
            module._adapters().close()
        adapters.close()
        root.handlers[:], root.level = handlers, level


def pubsub_message(data: bytes, attributes: dict, message_id: str = "1001") -> dict:
    return {"message": {"data": base64.b64encode(data).decode(), "attributes": attributes, "messageId": message_id,
                        "publishTime": "2025-01-01T00:00:00Z"},
            "subscription": "projects/p/subscriptions/eventarc-registry"}


CE = {"specversion": "1.0", "type": "google.cloud.pubsub.topic.v1.messagePublished",
      "source": "//pubsub.googleapis.com/projects/p/topics/evaluations"}


def post_structured(client, data: dict, ce_id: str = "ce-1"):
    return client.post("/", data=json.dumps({**CE, "id": ce_id, "datacontenttype": "application/json", "data": data}),
                       headers={"Content-Type": "application/cloudevents+json"})


def post_binary(client, data: dict, ce_id: str = "ce-1"):
    headers = {f"ce-{k}": v for k, v in CE.items()} | {"ce-id": ce_id, "Content-Type": "application/json"}
    return client.post("/", data=json.dumps(data), headers=headers)


def test_cloud_function_registers_from_a_structured_pubsub_cloudevent(function_client):
    client, adapters = function_client
    event = evaluation(adapters, "run-fn")
    resp = post_structured(client, pubsub_message(*ev.encode(event)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert versions(adapters)[f"{NAME}@1.1"]["run_id"] == "run-fn"
    assert aliases(adapters) == {"staging": "1.1", "production": "1.1"}
    assert [e.type for e in published_models(adapters)] == ["ModelRegistered", "ModelPromoted", "ModelPromoted"]

    # Eventarc redelivers the same message: acknowledged, nothing new.
    resp = post_binary(client, pubsub_message(*ev.encode(event), message_id="1002"), ce_id="ce-2")
    assert resp.status_code == 200
    assert list(versions(adapters)) == [f"{NAME}@1.1"]
    assert published_models(adapters) == []


def test_cloud_function_registers_from_a_binary_pubsub_cloudevent(function_client):
    client, adapters = function_client
    resp = post_binary(client, pubsub_message(*ev.encode(evaluation(adapters, "run-bin", passed=False,
                                                                      reasons=["worse"]))))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert versions(adapters)[f"{NAME}@1.1"]["status"] == "quarantined"


@pytest.mark.parametrize("message, reason", [
    ({"data": base64.b64encode(b"{not json").decode(),
      "attributes": {"type": "EvaluationCompleted", "schema_version": "1"}}, "not valid JSON"),
    ({"data": base64.b64encode(b"{}").decode(), "attributes": {"type": "Nope", "schema_version": "1"}},
     "unknown message type 'Nope'"),
    ({"data": "%%% not base64 %%%", "attributes": {"type": "EvaluationCompleted", "schema_version": "1"}},
     "base64"),
    ({"data": base64.b64encode(b"{}").decode(), "attributes": ["not", "a", "map"]}, "attributes"),
])
def test_cloud_function_dead_letters_a_malformed_message_without_crashing(function_client, message, reason):
    client, adapters = function_client
    resp = post_structured(client, {"message": {**message, "messageId": "m-1"}, "subscription": "s"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    [msg] = adapters.bus.pull(dlq_subscription(ev.EVALUATIONS), timeout_s=2)
    assert reason in msg.attributes["dead_letter_reason"]
    assert msg.attributes["dead_letter_source"] == ev.subscription_name("registry", ev.EVALUATIONS)
    assert versions(adapters) == {}


def test_cloud_function_dead_letters_an_event_without_a_pubsub_message(function_client):
    client, adapters = function_client
    resp = post_structured(client, {"not": "a pubsub push"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    [msg] = adapters.bus.pull(dlq_subscription(ev.EVALUATIONS), timeout_s=2)
    assert "message" in msg.attributes["dead_letter_reason"]
