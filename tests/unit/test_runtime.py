"""The runtime's delivery rules on the real local adapters."""
import json

import pytest

from shared.domain import events as ev
from shared.domain.recipe import Recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import CANCELLATIONS, Retry, Service, handle_message, publish_event
from shared.platform.topology import dlq_subscription

RECIPE = Recipe(name="t", version=1, base_model="tiny-random-smollm2", model_name="t")


@pytest.fixture
def adapters(tmp_path):
    a = bootstrap(Settings(state_dir=tmp_path, min_backoff_s=0.1, max_backoff_s=0.2))
    yield a
    a.close()


def job(run_id="run-1"):
    return ev.JobSubmitted(run_id=run_id, recipe=RECIPE, dataset_uri="file:///x")


def deliver(adapters, service, topic=ev.JOBS):
    [msg] = adapters.bus.pull(ev.subscription_name(service.name, topic), max_messages=1, timeout_s=5)
    return handle_message(service, adapters, topic, msg)


def dead_letters(adapters, topic=ev.JOBS):
    msgs = adapters.bus.pull(dlq_subscription(topic), max_messages=10, timeout_s=2)
    return [(m.data, dict(m.attributes)) for m in msgs]


def service_with(handler):
    return Service("preprocess", {ev.JobSubmitted: handler})


@pytest.mark.parametrize("data, attributes, reason", [
    (b"{not json", {"type": "JobSubmitted", "schema_version": "1"}, "not valid JSON"),
    (b"{}", {"type": "Nope", "schema_version": "1"}, "unknown message type 'Nope'"),
    (b"{}", {"type": "JobSubmitted", "schema_version": "9"}, "newer than this service understands"),
    (b'{"run_id": "r"}', {"type": "JobSubmitted", "schema_version": "1"}, "recipe: Field required"),
])
def test_malformed_messages_are_dead_lettered_with_a_reason(adapters, data, attributes, reason):
    calls = []
    adapters.bus.publish(ev.JOBS, data, attributes)
    assert deliver(adapters, service_with(lambda e, c: calls.append(e))) == "dead-lettered"
    [(body, attrs)] = dead_letters(adapters)
    assert body == data and reason in attrs["dead_letter_reason"]
    assert calls == []


def test_duplicate_delivery_runs_the_handler_once(adapters):
    calls = []
    service = service_with(lambda e, c: calls.append(e.event_id) or [])
    publish_event(adapters.bus, job())
    publish_event(adapters.bus, job())  # re-published: same deterministic event_id
    assert deliver(adapters, service) == "acked"
    assert deliver(adapters, service) == "duplicate"
    assert calls == ["run-1:JobSubmitted:0"]


def test_outputs_are_published_before_the_ack(adapters):
    prepared = ev.DatasetRejected(run_id="run-1", recipe=RECIPE, reason="too small")
    publish_event(adapters.bus, job())
    assert deliver(adapters, service_with(lambda e, c: [prepared])) == "acked"
    [msg] = adapters.bus.pull(ev.subscription_name("tracker", ev.DATASETS), timeout_s=5)
    assert ev.decode(msg.data, msg.attributes) == prepared


def test_failing_handler_is_retried_then_dead_lettered(adapters):
    def broken(event, ctx):
        raise RuntimeError("disk on fire")

    publish_event(adapters.bus, job())
    outcomes = []
    for _ in range(adapters.settings.max_delivery_attempts):
        [msg] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=5)
        outcomes.append(handle_message(service_with(broken), adapters, ev.JOBS, msg))
    assert outcomes == ["nacked"] * 4 + ["dead-lettered"]
    [(_, attrs)] = dead_letters(adapters)
    assert "RuntimeError: disk on fire" in attrs["dead_letter_reason"]


def test_retry_nacks_without_recording(adapters):
    calls = []

    def busy(event, ctx):
        calls.append(1)
        if len(calls) == 1:
            raise Retry("leased elsewhere", delay_s=0)
        return []

    publish_event(adapters.bus, job())
    assert deliver(adapters, service_with(busy)) == "nacked"
    assert deliver(adapters, service_with(busy)) == "acked"
    assert len(calls) == 2


def test_cancelled_runs_are_skipped(adapters):
    adapters.docs.set(CANCELLATIONS, "run-1", {"requested_at": 0})
    calls = []
    publish_event(adapters.bus, job())
    assert deliver(adapters, service_with(lambda e, c: calls.append(1))) == "cancelled"
    assert calls == []


def test_event_ids_are_deterministic_and_attributes_match():
    data, attrs = ev.encode(ev.CheckpointSaved(run_id="r", step=40, uri="file:///c"))
    assert attrs == {"type": "CheckpointSaved", "schema_version": "1", "run_id": "r", "event_id": "r:CheckpointSaved:40"}
    assert json.loads(data)["step"] == 40


def test_a_dead_lettered_message_fails_its_run_with_the_reason_until_a_replay_moves_it_on(adapters):
    from services.tracker.service import SERVICE as TRACKER

    def track(topic):
        for msg in adapters.bus.pull(ev.subscription_name("tracker", topic), max_messages=10, timeout_s=1):
            handle_message(TRACKER, adapters, topic, msg)

    def broken(event, ctx):
        raise RuntimeError("disk on fire")

    publish_event(adapters.bus, job())
    track(ev.JOBS)
    assert adapters.docs.get("runs", "run-1")["status"] == "validating"
    for _ in range(adapters.settings.max_delivery_attempts):
        [msg] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=5)
        handle_message(service_with(broken), adapters, ev.JOBS, msg)
    track(ev.NOTICES)  # the runtime's MessageDeadLettered notice
    run = adapters.docs.get("runs", "run-1")
    assert run["status"] == "failed" and run["sub_state"] == "preparing_data"
    assert "JobSubmitted dead-lettered by preprocess.jobs: handler failed 5 times: RuntimeError: disk on fire" in run["error"]
    assert "ftpipe dlq replay --topic jobs" in run["error"]
    assert run["dead_letter"]["active"] is True

    # After the fix, `ftpipe dlq replay` puts the run back where it was, and the run goes on.
    from ftpipe.client import Client

    [replayed] = Client(adapters.settings, adapters).dlq_replay(ev.JOBS)
    assert replayed["run_id"] == "run-1"
    run = adapters.docs.get("runs", "run-1")
    assert (run["status"], run["sub_state"], run["error"]) == ("validating", "preparing_data", None)
    assert run["dead_letter"]["active"] is False and "disk on fire" in run["dead_letter"]["reason"]
    publish_event(adapters.bus, ev.DatasetPrepared(run_id="run-1", recipe=RECIPE, dataset_id="d", dataset_uri="file:///d/",
                                                   counts={"train": 1}))
    track(ev.DATASETS)
    assert adapters.docs.get("runs", "run-1")["status"] == "queued"


def refuse(event, ctx):
    raise ev.MalformedMessage("no handler can take this body")


def test_a_replay_before_the_tracker_saw_the_dead_letter_does_not_fail_the_run_late(adapters):
    from ftpipe.client import Client

    from services.tracker.service import SERVICE as TRACKER

    publish_event(adapters.bus, job())
    tracker_jobs = ev.subscription_name("tracker", ev.JOBS)
    [submitted] = adapters.bus.pull(tracker_jobs, timeout_s=5)
    handle_message(TRACKER, adapters, ev.JOBS, submitted)
    [msg] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=5)
    assert handle_message(service_with(refuse), adapters, ev.JOBS, msg) == "dead-lettered"
    Client(adapters.settings, adapters).dlq_replay(ev.JOBS)  # the tracker was down meanwhile
    [notice] = adapters.bus.pull(ev.subscription_name("tracker", ev.NOTICES), max_messages=10, timeout_s=2)
    assert notice.attributes["type"] == "MessageDeadLettered"
    handle_message(TRACKER, adapters, ev.NOTICES, notice)
    run = adapters.docs.get("runs", "run-1")
    assert run["status"] == "validating" and run["dead_letter"]["active"] is False


def test_a_poison_message_without_a_run_of_ours_marks_no_run(adapters):
    from services.tracker.service import SERVICE as TRACKER

    adapters.bus.publish(ev.JOBS, b"{not json", {"type": "JobSubmitted", "schema_version": "1", "run_id": "ghost"})
    assert deliver(adapters, service_with(lambda e, c: [])) == "dead-lettered"
    [notice] = adapters.bus.pull(ev.subscription_name("tracker", ev.NOTICES), max_messages=10, timeout_s=2)
    assert notice.attributes["type"] == "MessageDeadLettered"
    handle_message(TRACKER, adapters, ev.NOTICES, notice)
    assert adapters.docs.get("runs", "ghost") is None


def test_a_services_bus_publishes_only_what_the_topology_lets_it(tmp_path):
    """bootstrap(service=...) puts the service's publish rule (SERVICE_PUBLISHES, the same as its IAM
    grants) in front of the bus: serving may publish its notices and dead letters, not a job."""
    from shared.platform.topology import UndeclaredPublish

    adapters = bootstrap(Settings(state_dir=tmp_path), service="serving")
    try:
        with pytest.raises(UndeclaredPublish, match=r"service 'serving' may not publish JobSubmitted on 'jobs'; "
                                                    r"it may publish MessageDeadLettered on notices"):
            publish_event(adapters.bus, job())
        notice = ev.MessageDeadLettered(run_id="r", message_id="m", message_type="ModelPromoted",
                                        source_topic=ev.MODELS, subscription="serving.models", reason="boom")
        publish_event(adapters.bus, notice)
        adapters.bus.publish(ev.dead_letter_topic(ev.MODELS), b"{}", {"type": "ModelPromoted"})
        with pytest.raises(UndeclaredPublish):  # a topic's dead letters only from its consumers
            adapters.bus.publish(ev.dead_letter_topic(ev.JOBS), b"{}", {"type": "JobSubmitted"})
        with pytest.raises(UndeclaredPublish, match="a message without a type"):
            adapters.bus.publish(ev.MODELS, b"{}", {})
        assert adapters.bus.pull(ev.subscription_name("tracker", ev.NOTICES), timeout_s=2)[0].attributes["type"] == \
            "MessageDeadLettered"
    finally:
        adapters.close()
    with pytest.raises(ValueError, match="unknown service 'nope'"):
        bootstrap(Settings(state_dir=tmp_path), service="nope")


def test_a_handler_publishing_an_undeclared_event_is_dead_lettered_with_the_reason(tmp_path):
    adapters = bootstrap(Settings(state_dir=tmp_path, min_backoff_s=0.1, max_backoff_s=0.2), service="preprocess")
    try:
        publish_event(adapters.bus, job())
        sneaky = service_with(lambda e, c: [ev.TrainingFailed(run_id=e.run_id, reason="not mine to say")])
        outcomes = [deliver(adapters, sneaky) for _ in range(adapters.settings.max_delivery_attempts)]
        assert outcomes == ["nacked"] * 4 + ["dead-lettered"]
        [(_, attrs)] = dead_letters(adapters)
        assert "UndeclaredPublish: service 'preprocess' may not publish TrainingFailed on 'training'" in \
            attrs["dead_letter_reason"]
    finally:
        adapters.close()


def test_a_docs_reader_keeps_its_ledger_in_a_database_of_its_own(tmp_path):
    """Serving only reads the registry's documents (its IAM role on the main database is
    datastore.viewer) and the bucket (objectViewer): both are read-only to it, and the runtime's
    ledger is a database of its own."""
    from shared.platform.runtime import LEDGER, ledger_key
    from shared.platform.topology import ReadOnly

    settings = Settings(state_dir=tmp_path, min_backoff_s=0.1, max_backoff_s=0.2)
    with_ledger = bootstrap(settings, service="serving")
    plain = bootstrap(settings)
    try:
        assert (tmp_path / "serving-ledger.db").exists()
        with pytest.raises(ReadOnly, match=r"service 'serving' only reads the document database .* set\(\) refused"):
            with_ledger.docs.set("models", "m", {"name": "m"})
        with pytest.raises(ReadOnly, match=r"service 'serving' only reads the bucket .* write\(\) refused"):
            with_ledger.store.write("ftpipe", "models/m/1.1/x", b"x")
        plain.store.write("ftpipe", "models/m/1.1/x", b"x")
        assert with_ledger.store.read("ftpipe", "models/m/1.1/x") == b"x"
        plain.docs.set("models", "m", {"name": "m"})
        assert with_ledger.docs.get("models", "m") == {"name": "m"}  # reads are the main database's

        promoted = ev.ModelPromoted(run_id="r", model_name="m", version="1.1", uri="file:///m")
        publish_event(plain.bus, promoted)
        seen = []
        service = Service("serving", {ev.ModelPromoted: lambda e, c: seen.append(e.event_id) or []},
                          skip_cancelled=False)
        assert deliver(with_ledger, service, ev.MODELS) == "acked" and seen == [promoted.event_id]
        key = ledger_key("serving", promoted.event_id)
        assert with_ledger.ledger.get(LEDGER, key) is not None and plain.docs.get(LEDGER, key) is None
        publish_event(plain.bus, promoted)  # a redelivery is recognised by the service's own ledger
        assert deliver(with_ledger, service, ev.MODELS) == "duplicate" and len(seen) == 1
    finally:
        with_ledger.close()
        plain.close()
    # any service's ledger may be moved so (FTPIPE_LEDGER_DATABASE)
    moved = bootstrap(Settings(state_dir=tmp_path, ledger_database="tracker-ledger"))
    try:
        assert moved.ledger is not moved.docs and (tmp_path / "tracker-ledger.db").exists()
    finally:
        moved.close()
    with pytest.raises(ValueError, match="ledger_database"):
        Settings(ledger_database="Not A Database")
