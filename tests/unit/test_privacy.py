"""Privacy sign-off: DatasetAwaitingReview round-trips, the tracker folds it into "queued" /
"awaiting_privacy_review" (and forward only), and `ftpipe privacy list|approve|reject` on a local
state folder, with the real runtime's handle_message driving the tracker and the trainer's guard."""
import json
import logging
from pathlib import Path

import pytest

from ftpipe.cli import main
from shared.domain import events as ev
from shared.domain.recipe import DataSpec, Recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import LEDGER, handle_message, ledger_key, publish_event
from tests.unit.governance import own, token

from services.tracker import lineage
from services.tracker.service import SERVICE as TRACKER

RECIPE = Recipe(name="tiny-sft", version=1, base_model="tiny-random-smollm2", model_name="tiny-sft",
                data=DataSpec(privacy_review=True, min_rows=1))
PII = {"counts": {"email": 3, "phone": 1, "card": 0}, "rows_scanned": 40, "rows_masked": 4, "residual_rate": 0.0005}


def awaiting(run_id: str = "run-priv", uri: str = "file:///x/datasets/d1/") -> ev.DatasetAwaitingReview:
    return ev.DatasetAwaitingReview(run_id=run_id, recipe=RECIPE, dataset_id="d1", dataset_uri=uri,
                                    counts={"train": 8, "val": 1, "test": 1}, pii=PII,
                                    tokens={"total": 100}, cost_estimate={"cost": 0.01})


def test_event_round_trip_and_id():
    event = awaiting()
    assert ev.decode(*ev.encode(event)) == event
    assert event.event_id == "run-priv:DatasetAwaitingReview:0"
    assert event.topic == ev.DATASETS


def test_tracker_folds_review_between_preparing_and_training():
    run = {"status": "validating", "sub_state": "preparing_data"}
    update = lineage.fold(run, awaiting(), now=1.0)
    assert (update["status"], update["sub_state"]) == ("queued", "awaiting_privacy_review")
    assert update["privacy_review"]["pii"]["residual_rate"] == 0.0005
    # a late JobSubmitted does not move it back; a DatasetPrepared moves it on
    run.update(update)
    assert "status" not in lineage.fold(run, ev.JobSubmitted(run_id="run-priv", recipe=RECIPE, dataset_uri="x"), 2.0)
    prepared = ev.DatasetPrepared(run_id="run-priv", recipe=RECIPE, dataset_id="d1", dataset_uri="x", counts={},
                                  privacy_signoff={"approver": "ann"})
    moved = lineage.fold(run, prepared, 3.0)
    assert moved["sub_state"] == "waiting_for_capacity"
    assert moved["privacy_review"]["status"] == "approved"
    # a DatasetAwaitingReview redelivered after approval does not move the run back
    run.update(moved)
    assert "status" not in lineage.fold(run, awaiting(), 4.0)


@pytest.fixture
def state(tmp_path, monkeypatch):
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_LOG_LEVEL", "FTPIPE_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FTPIPE_STATE", str(tmp_path / "state"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    adapters = bootstrap(Settings(state_dir=tmp_path / "state"))
    yield adapters
    adapters.close()
    root.handlers[:], root.level = handlers, level


def _track(adapters) -> list[str]:
    """Deliver everything pending on the tracker's datasets subscription through the real runtime."""
    results = []
    while msgs := adapters.bus.pull(ev.subscription_name("tracker", ev.DATASETS), max_messages=10, timeout_s=0.3):
        results += [handle_message(TRACKER, adapters, ev.DATASETS, m) for m in msgs]
    return results


def _dataset_folder(adapters) -> str:
    adapters.store.write("ftpipe", "datasets/d1/manifest.json", b"{}")
    return adapters.store.url("ftpipe", "datasets/d1/")


def test_approve_records_signoff_then_publishes_dataset_prepared_once(state, capsys):
    ann, bob = token(state.docs, "ann", "approver"), token(state.docs, "bob", "approver")
    uri = _dataset_folder(state)
    publish_event(state.bus, awaiting(uri=uri))
    assert _track(state) == ["acked"]
    run = state.docs.get("runs", "run-priv")
    assert (run["status"], run["sub_state"]) == ("queued", "awaiting_privacy_review")

    assert main(["privacy", "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["run_id"] == "run-priv" and row["pii_counts"]["email"] == 3 and row["residual_rate"] == 0.0005
    assert main(["privacy", "list"]) == 0
    assert "residual rate 0.0500%" in capsys.readouterr().out

    # training has not started: the trainer ignores the review request
    from services.trainer.service import SERVICE as TRAINER
    [held] = state.bus.pull(ev.subscription_name("trainer", ev.DATASETS), timeout_s=2)
    assert handle_message(TRAINER, state, ev.DATASETS, held) == "ignored"

    assert main(["privacy", "approve", "run-priv", "--token", ann, "--note", "checked", "--json"]) == 0
    signoff = json.loads(capsys.readouterr().out)
    assert signoff["approver"] == "token:ann" and signoff["decision"] == "approved" and signoff["residual_rate_seen"] == 0.0005
    assert state.docs.get("privacy_signoffs", "run-priv")["approver"] == "token:ann"
    manifest = json.loads(state.store.read("ftpipe", "datasets/d1/manifest.json"))
    assert manifest["privacy_signoff"] == signoff

    # approving twice is harmless: the identical event, which the ledgers drop
    assert main(["privacy", "approve", "run-priv", "--token", bob]) == 0
    msgs = state.bus.pull(ev.subscription_name("trainer", ev.DATASETS), max_messages=10, timeout_s=0.5)
    events = [ev.decode(m.data, m.attributes) for m in msgs]
    assert len(events) == 2 and events[0] == events[1]
    assert events[0].event_id == "run-priv:DatasetPrepared:0"
    assert events[0].privacy_signoff["approver"] == "token:ann"
    assert events[0].tokens == {"total": 100}
    for m in msgs:
        m.nack(0)  # leave them; the trainer is not run here

    assert _track(state) == ["acked", "duplicate"]
    run = state.docs.get("runs", "run-priv")
    assert (run["status"], run["sub_state"]) == ("queued", "waiting_for_capacity")
    assert run["privacy_review"]["signoff"]["approver"] == "token:ann"
    assert main(["privacy", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["privacy", "reject", "run-priv", "--reason", "too late"]) == 2  # already approved


def test_reject_publishes_dataset_rejected(state, capsys):
    ann, bob = token(state.docs, "ann", "approver"), token(state.docs, "bob", "approver")
    publish_event(state.bus, awaiting(uri=_dataset_folder(state)))
    _track(state)
    assert main(["privacy", "reject", "run-priv", "--reason", "names left in", "--token", ann]) == 0
    assert _track(state) == ["acked"]
    run = state.docs.get("runs", "run-priv")
    assert (run["status"], run["sub_state"]) == ("failed", "done")
    assert "privacy review rejected by token:ann: names left in" in run["error"]
    assert run["privacy_review"]["status"] == "rejected"
    assert main(["privacy", "approve", "run-priv", "--token", bob]) == 2
    assert "already rejected" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["privacy", "approve", "nope"], "no run nope"),
    (["privacy", "approve"], "needs a RUN id"),
    (["privacy", "reject", "run-x"], "needs --reason"),
])
def test_misuse(state, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_trainer_refuses_an_unsigned_dataset_of_a_review_recipe(state):
    from services.trainer.service import SERVICE as TRAINER

    publish_event(state.bus, ev.DatasetPrepared(run_id="run-unsigned", recipe=RECIPE, dataset_id="d1",
                                                dataset_uri="file:///nowhere/", counts={}))
    [msg] = state.bus.pull(ev.subscription_name("trainer", ev.DATASETS), timeout_s=2)
    assert handle_message(TRAINER, state, ev.DATASETS, msg) == "dead-lettered"
    assert state.docs.get(LEDGER, ledger_key("trainer", "run-unsigned:DatasetPrepared:0")) is None


def test_the_signoff_goes_into_the_model_bundle(state, capsys):
    from services.registry_fn.service import SERVICE as REGISTRY

    uri = _dataset_folder(state)
    own(state.docs, RECIPE)
    publish_event(state.bus, awaiting(uri=uri))
    _track(state)
    assert main(["privacy", "approve", "run-priv", "--token", token(state.docs, "ann", "approver")]) == 0
    from tests.unit.test_registry import RUN_RECORD, write_report

    # the other parts of a version's bundle: the run record, the PII report, the evaluation report
    state.store.write("ftpipe", "runs/run-priv/adapter/adapter_config.json", b"{}")
    state.store.write("ftpipe", "runs/run-priv/adapter/run_record.json", json.dumps(RUN_RECORD).encode())
    state.store.write("ftpipe", "datasets/d1/pii_report.json", b"{}")
    publish_event(state.bus, ev.EvaluationCompleted(
        run_id="run-priv", recipe=RECIPE, dataset_uri=uri, adapter_uri=state.store.url("ftpipe", "runs/run-priv/adapter/"),
        scores={"base": {"chrf": 1.0}, "candidate": {"chrf": 2.0}}, passed=True, reasons=[],
        report_uri=write_report(state, "run-priv")))
    [msg] = state.bus.pull(ev.subscription_name("registry", ev.EVALUATIONS), timeout_s=2)
    assert handle_message(REGISTRY, state, ev.EVALUATIONS, msg) == "acked"
    bundle = json.loads(state.store.read("ftpipe", "models/tiny-sft/1.1/bundle.json"))
    assert bundle["privacy_signoff"]["approver"] == "token:ann" and bundle["privacy_signoff"]["residual_rate_seen"] == 0.0005
    assert "approved by token:ann" in state.store.read("ftpipe", "models/tiny-sft/1.1/MODEL_CARD.md").decode()


def test_drop_legal_basis_travels_in_the_job_source(state, tmp_path):
    from ftpipe.client import Client

    from services.preprocess.service import SERVICE as PREPROCESS

    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    run_id = Client(state.settings, state).drop(data, "tiny-sft", legal_basis="DPA-2026-04")
    msgs = state.bus.pull(ev.subscription_name("preprocess", ev.DATASET_UPLOADS), max_messages=10, timeout_s=2)
    assert sorted(ev.decode(m.data, m.attributes).name for m in msgs) == [
        "incoming/default/tiny-sft/chats.jsonl", "incoming/default/tiny-sft/chats.jsonl.legal.json"]
    assert [handle_message(PREPROCESS, state, ev.DATASET_UPLOADS, m) for m in msgs] == ["acked", "acked"]
    [job] = state.bus.pull(ev.subscription_name("trainer", ev.JOBS), max_messages=10, timeout_s=2)
    submitted = ev.decode(job.data, job.attributes)
    assert submitted.run_id == run_id and submitted.source["legal_basis"] == "DPA-2026-04"
    assert submitted.source["legal_basis_uri"].endswith("incoming/default/tiny-sft/chats.jsonl.legal.json")


def _signed_dataset(state, tmp_path) -> tuple[str, Path]:
    """A dataset folder as preprocess writes it, awaiting review, then approved through the CLI."""
    import hashlib

    folder = tmp_path / "d1"
    folder.mkdir()
    files = {}
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        data = b'{"id": "1", "messages": []}\n'
        (folder / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"dataset_id": "d1", "files": files}))
    from shared.platform.storage import upload_dir
    upload_dir(state.store, folder, "ftpipe", "datasets/d1")
    uri = state.store.url("ftpipe", "datasets/d1/")
    publish_event(state.bus, awaiting(uri=uri))
    _track(state)
    return uri, folder


def test_a_prepared_submission_cannot_skip_the_review(state, tmp_path, capsys):
    from shared.domain.privacy import SignoffMissing, verify_signed_off
    from shared.platform.storage import download_dir

    from services.trainer.service import SERVICE as TRAINER

    uri, folder = _signed_dataset(state, tmp_path)
    # the CLI refuses a local prepared folder for a review recipe at once
    (tmp_path / "job.yaml").write_text(f"recipe: {tmp_path / 'r.yaml'}\ndataset: {folder}\nprepared: true\n")
    (tmp_path / "r.yaml").write_text("name: tiny-sft\nversion: 1\nbase_model: tiny-random-smollm2\n"
                                     "model_name: tiny-sft\ndata: {privacy_review: true}\n")
    assert main(["submit", str(tmp_path / "job.yaml")]) == 2
    assert "requires a privacy sign-off" in capsys.readouterr().err
    # a JobSubmitted naming the folder directly, before any approval: the trainer dead-letters it
    publish_event(state.bus, ev.JobSubmitted(run_id="run-direct", recipe=RECIPE, dataset_uri=uri, prepared=True))
    [msg] = state.bus.pull(ev.subscription_name("trainer", ev.JOBS), timeout_s=2)
    assert handle_message(TRAINER, state, ev.JOBS, msg) == "dead-lettered"
    from shared.platform.topology import dlq_subscription
    [dead] = state.bus.pull(dlq_subscription(ev.JOBS), max_messages=10, timeout_s=2)
    assert "requires a privacy sign-off (data.privacy_review) and dataset d1 has none" in \
        dead.attributes["dead_letter_reason"]
    # once approved, the same folder verifies; a split file changed after the review does not
    assert main(["privacy", "approve", "run-priv", "--token", token(state.docs, "ann", "approver")]) == 0
    got = tmp_path / "got"
    download_dir(state.store, "ftpipe", "datasets/d1/", got)
    assert verify_signed_off(state.docs, got)["approver"] == "token:ann"
    (got / "train.jsonl").write_text('{"id": "2", "messages": []}\n')
    with pytest.raises(SignoffMissing, match="train.jsonl of dataset d1 is not the file the approver signed off"):
        verify_signed_off(state.docs, got)
