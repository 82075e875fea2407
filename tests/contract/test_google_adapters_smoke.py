"""The Google adapters against the real emulators (Pub/Sub, Firestore, fake-gcs-server), with the
real client libraries: what the shared contract suites do not cover, and what the emulators do or
do not do (streaming lease extension, dead-lettering, delivery attempts, bucket notifications,
preconditions). Skipped with the reason where an emulator is not installed."""
from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest
from google.api_core import exceptions as gexc

from shared.platform.ports import InvalidObjectName, ObjectNotFound, PreconditionFailed, SubscriptionPolicy

# The session fixtures pubsub_emulator / firestore_emulator / gcs_emulator come from tests.emulators,
# registered as a plugin by tests/conftest.py.
from tests.emulators import make_firestore_docs, make_gcs_store, make_pubsub_bus, start_gcs

pytestmark = [pytest.mark.emulators, pytest.mark.timeout(120)]

FAST = SubscriptionPolicy(ack_deadline_s=10, max_delivery_attempts=2, min_backoff_s=0, max_backoff_s=0)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def bus(pubsub_emulator):
    b = make_pubsub_bus(pubsub_emulator)
    yield b
    b.close()


def _pull_all(bus, subscription, want: int, timeout_s: float = 10.0):
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += bus.pull(subscription, max_messages=10, timeout_s=min(1.0, deadline - time.monotonic()))
    return got


# ---------------------------------------------------------------- Pub/Sub

def test_publish_pull_ack_with_attributes(bus):
    topic, sub = _name("topic"), _name("sub")
    bus.create_topic(topic)
    bus.create_topic(topic)  # idempotent
    bus.create_subscription(sub, topic, FAST, dead_letter_topic=topic + "-dead-letter")
    bus.create_subscription(sub, topic, FAST, dead_letter_topic=topic + "-dead-letter")  # idempotent (update)
    message_id = bus.publish(topic, b"hello", {"type": "JobSubmitted", "run_id": "r1"})
    [msg] = _pull_all(bus, sub, 1)
    assert (msg.data, msg.attributes, msg.message_id, msg.delivery_attempt) == (
        b"hello", {"type": "JobSubmitted", "run_id": "r1"}, message_id, 1)
    msg.ack()
    assert bus.pull(sub, timeout_s=1.5) == []
    with pytest.raises(KeyError):
        bus.publish(_name("missing"), b"x", {})
    with pytest.raises(KeyError):
        bus.pull(_name("missing"), timeout_s=0.1)
    with pytest.raises(ValueError):  # same name on another topic
        other = _name("topic")
        bus.create_subscription(sub, other, FAST)


def test_dead_letter_after_max_attempts_nacks_and_expiry(bus):
    """max_delivery_attempts=2 (below Pub/Sub's server minimum of 5): the adapter dead-letters the
    third delivery itself; an expired ack deadline counts as a failed attempt like a nack."""
    topic, sub, dlq = _name("topic"), _name("sub"), _name("dlq")
    policy = SubscriptionPolicy(ack_deadline_s=1, max_delivery_attempts=2, min_backoff_s=0, max_backoff_s=0)
    bus.create_subscription(sub, topic, policy, dead_letter_topic=topic + "-dead-letter")
    bus.create_subscription(dlq, topic + "-dead-letter", SubscriptionPolicy())
    bus.publish(topic, b"poison", {"event_id": "e1"})

    [first] = _pull_all(bus, sub, 1)
    assert first.delivery_attempt == 1
    first.nack()
    [second] = _pull_all(bus, sub, 1)
    assert second.delivery_attempt == 2 and second.message_id == first.message_id
    # no ack: let the 1 s deadline lapse — the second failure
    time.sleep(1.5)
    assert bus.pull(sub, timeout_s=2.0) == []   # the third delivery went to the dead-letter topic
    [dead] = _pull_all(bus, dlq, 1)
    assert dead.data == b"poison"
    assert dead.attributes["event_id"] == "e1"
    assert dead.attributes["dead_letter_source"] == sub
    assert "2 delivery attempts" in dead.attributes["dead_letter_reason"]
    dead.ack()
    assert bus.pull(sub, timeout_s=1.0) == []


def test_emulator_honours_server_side_dead_letter_policy(bus):
    """Fact check of the emulator: with the adapter out of the way (raw client), the server
    dead-letters after the policy's attempts, fills delivery_attempt and adds its own attributes."""
    topic, sub, dlq = _name("topic"), _name("sub"), _name("dlq")
    policy = SubscriptionPolicy(ack_deadline_s=10, max_delivery_attempts=4, min_backoff_s=0, max_backoff_s=0)
    bus.create_subscription(sub, topic, policy, dead_letter_topic=topic + "-dl")   # server max = 5
    bus.create_subscription(dlq, topic + "-dl", SubscriptionPolicy())
    raw = bus._subscriber
    path = bus._sub_path(sub)
    assert raw.get_subscription(request={"subscription": path}).dead_letter_policy.max_delivery_attempts == 5
    bus.publish(topic, b"x", {"k": "v"})
    attempts = []
    deadline = time.monotonic() + 20
    while len(attempts) < 6 and time.monotonic() < deadline:
        resp = raw.pull(request={"subscription": path, "max_messages": 5}, timeout=5)
        for rm in resp.received_messages:
            attempts.append(rm.delivery_attempt)
            raw.modify_ack_deadline(request={"subscription": path, "ack_ids": [rm.ack_id], "ack_deadline_seconds": 0})
        if not resp.received_messages:
            if len(attempts) >= 5:
                break
            time.sleep(0.2)
    assert attempts == [1, 2, 3, 4, 5]
    [dead] = _pull_all(bus, dlq, 1)
    assert dead.attributes["k"] == "v"
    assert dead.attributes["CloudPubSubDeadLetterSourceSubscription"] == sub
    assert dead.attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
    dead.ack()


def test_server_rejects_fewer_than_five_attempts(bus):
    """Why the adapter dead-letters itself: Pub/Sub (and the emulator) refuse max_delivery_attempts < 5."""
    topic = _name("topic")
    bus.create_topic(topic)
    bus.create_topic(topic + "-dl")
    with pytest.raises((gexc.OutOfRange, gexc.InvalidArgument)):
        bus._subscriber.create_subscription(request={
            "name": bus._sub_path(_name("sub")), "topic": bus._topic_path(topic),
            "dead_letter_policy": {"dead_letter_topic": bus._topic_path(topic + "-dl"), "max_delivery_attempts": 2}})


def test_delivery_attempt_without_dead_letter_policy(bus):
    """Pub/Sub leaves delivery_attempt empty without a dead-letter policy; the adapter counts."""
    topic, sub = _name("topic"), _name("sub")
    bus.create_subscription(sub, topic, FAST)
    bus.publish(topic, b"x", {})
    [m1] = _pull_all(bus, sub, 1)
    assert m1.delivery_attempt == 1
    m1.nack()
    [m2] = _pull_all(bus, sub, 1)
    assert m2.delivery_attempt == 2
    m2.ack()


def test_nack_with_delay_on_pull(bus):
    topic, sub = _name("topic"), _name("sub")
    bus.create_subscription(sub, topic, FAST, dead_letter_topic=topic + "-dl")
    bus.publish(topic, b"later", {})
    [m] = _pull_all(bus, sub, 1)
    t0 = time.monotonic()
    m.nack(delay_s=2)
    assert bus.pull(sub, timeout_s=1.0) == []
    [again] = _pull_all(bus, sub, 1, timeout_s=10)
    assert time.monotonic() - t0 >= 1.8
    assert again.delivery_attempt == 2
    again.ack()


# Lease extension beyond the ack deadline while a streaming callback runs is in the shared
# contract (test_bus_contract.py::test_streaming_subscribe_extends_the_lease_while_the_callback_runs).


def test_streaming_nack_delay_exception_and_dead_letter(bus):
    """Streaming: nack(delay) redelivers after the delay (the message leaves lease management); a
    callback that raises gets its message nacked; after max attempts it is dead-lettered."""
    topic, sub, dlq = _name("topic"), _name("sub"), _name("dlq")
    bus.create_subscription(sub, topic, SubscriptionPolicy(ack_deadline_s=10, max_delivery_attempts=3,
                                                           min_backoff_s=0, max_backoff_s=0),
                            dead_letter_topic=topic + "-dl")
    bus.create_subscription(dlq, topic + "-dl", SubscriptionPolicy())
    bus.publish(topic, b"bad", {"event_id": "e9"})
    seen: list[tuple[int, float]] = []

    def handler(msg):
        seen.append((msg.delivery_attempt, time.monotonic()))
        if msg.delivery_attempt == 1:
            msg.nack(delay_s=2)
        else:
            raise RuntimeError("handler bug")   # the adapter nacks

    s = bus.subscribe(sub, handler, max_messages=2)
    try:
        [dead] = _pull_all(bus, dlq, 1, timeout_s=25)
    finally:
        s.stop(timeout=10)
    assert [a for a, _ in seen] == [1, 2, 3]
    assert seen[1][1] - seen[0][1] >= 1.8
    assert dead.data == b"bad" and dead.attributes["event_id"] == "e9"
    assert dead.attributes["dead_letter_source"] == sub
    dead.ack()


def test_subscribe_missing_subscription_fails_fast(bus):
    with pytest.raises(KeyError):
        bus.subscribe(_name("missing"), lambda m: None)


# ---------------------------------------------------------------- Cloud Storage (fake-gcs-server)

def test_gcs_objects_and_preconditions(gcs_emulator, tmp_path):
    store = make_gcs_store(gcs_emulator)
    info = store.write("ftpipe", "datasets/d1/train.jsonl", b'{"a":1}\n', if_generation_match=0)
    assert info.generation > 0 and info.size == 8 and info.md5_hash and info.updated.endswith("Z")
    with pytest.raises(PreconditionFailed):
        store.write("ftpipe", "datasets/d1/train.jsonl", b"other", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        store.write("ftpipe", "datasets/d1/train.jsonl", b"other", if_generation_match=info.generation + 1)
    info2 = store.write("ftpipe", "datasets/d1/train.jsonl", b"v2", if_generation_match=info.generation)
    assert info2.generation != info.generation
    assert store.read("ftpipe", "datasets/d1/train.jsonl") == b"v2"
    assert store.stat("ftpipe", "datasets/d1/train.jsonl").generation == info2.generation
    assert store.stat("ftpipe", "datasets/d1/nothing") is None
    with pytest.raises(ObjectNotFound):
        store.read("ftpipe", "datasets/d1/nothing")
    store.write("ftpipe", "datasets/d1/val.jsonl", b"v")
    store.write("ftpipe", "datasets/d2/val.jsonl", b"v")
    assert [i.name for i in store.list("ftpipe", "datasets/d1/")] == ["datasets/d1/train.jsonl",
                                                                     "datasets/d1/val.jsonl"]
    assert list(store.list("no-such-bucket")) == []
    target = tmp_path / "sub" / "train.jsonl"
    got = store.download_file("ftpipe", "datasets/d1/train.jsonl", str(target))
    assert target.read_bytes() == b"v2" and got.generation == info2.generation
    with pytest.raises(ObjectNotFound):
        store.download_file("ftpipe", "nope", str(tmp_path / "nope"))
    # fake-gcs-server ignores ifGenerationMatch on delete: the adapter checks first.
    with pytest.raises(PreconditionFailed):
        store.delete("ftpipe", "datasets/d1/train.jsonl", if_generation_match=info.generation)
    assert store.stat("ftpipe", "datasets/d1/train.jsonl") is not None
    store.delete("ftpipe", "datasets/d1/train.jsonl", if_generation_match=info2.generation)
    with pytest.raises(ObjectNotFound):
        store.delete("ftpipe", "datasets/d1/train.jsonl")
    for bad in ("", "/abs", "a/../b", "a/./b", "a\\b", "a\x00b", "x" * 1025):
        with pytest.raises(InvalidObjectName):
            store.write("ftpipe", bad, b"x")
    url = store.url("ftpipe", "models/m/1/bundle.json")
    assert url == "gs://ftpipe/models/m/1/bundle.json"
    assert store.parse_url(url) == ("ftpipe", "models/m/1/bundle.json")
    with pytest.raises(ValueError):
        store.parse_url("file:///tmp/x")


def test_gcs_large_upload_precondition(gcs_emulator, tmp_path):
    """Above 8 MiB the client uploads resumably, where fake-gcs-server ignores ifGenerationMatch:
    the adapter's own check keeps write-if-absent working."""
    store = make_gcs_store(gcs_emulator)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024))
    info = store.upload_file("ftpipe", "runs/r1/checkpoints/step-1/model.bin", str(big), if_generation_match=0)
    assert info.size == 9 * 1024 * 1024
    with pytest.raises(PreconditionFailed):
        store.upload_file("ftpipe", "runs/r1/checkpoints/step-1/model.bin", str(big), if_generation_match=0)
    assert store.stat("ftpipe", "runs/r1/checkpoints/step-1/model.bin").generation == info.generation


def test_fake_gcs_notification_is_a_gcs_json_api_v1_event(pubsub_emulator, tmp_path):
    """fake-gcs-server wired to the Pub/Sub emulator publishes what a GCS bucket notification
    (payload JSON_API_V1, OBJECT_FINALIZE, prefix incoming/) publishes."""
    project = _name("notify")
    bus = make_pubsub_bus(pubsub_emulator, project=project)
    try:
        bus.create_topic("dataset-uploads")   # must exist before objects are written
        bus.create_subscription("preprocess.dataset-uploads", "dataset-uploads", FAST)
        gcs = start_gcs(project, log_dir=tmp_path, notify_pubsub=pubsub_emulator, notify_project=project,
                        notify_topic="dataset-uploads", notify_prefix="incoming/")
        try:
            store = make_gcs_store(gcs, buckets=("ftpipe",))
            store.write("ftpipe", "datasets/ignored.jsonl", b"{}\n")
            info = store.write("ftpipe", "incoming/sft/data.jsonl", b'{"prompt":"a","completion":"b"}\n',
                               content_type="application/jsonl")
            [msg] = _pull_all(bus, "preprocess.dataset-uploads", 1)
            time.sleep(0.5)
            assert bus.pull("preprocess.dataset-uploads", timeout_s=0.5) == []   # only the incoming/ object
        finally:
            gcs.stop()
        attrs = dict(msg.attributes)
        assert attrs["eventType"] == "OBJECT_FINALIZE"
        assert attrs["payloadFormat"] == "JSON_API_V1"
        assert attrs["bucketId"] == "ftpipe"
        assert attrs["objectId"] == "incoming/sft/data.jsonl"
        assert attrs["objectGeneration"] == str(info.generation)
        body = json.loads(msg.data)
        assert body["kind"] == "storage#object"
        assert (body["bucket"], body["name"]) == ("ftpipe", "incoming/sft/data.jsonl")
        assert body["generation"] == str(info.generation)     # a string, as GCS sends it
        assert body["size"] == str(info.size)
        assert body["contentType"] == "application/jsonl"
        assert body["md5Hash"] == info.md5_hash
        assert body["timeCreated"] and body["updated"]
        msg.ack()
        # The pipeline's own model of the event accepts it.
        from shared.domain.events import ObjectFinalized

        event = ObjectFinalized.model_validate(body)
        assert event.attributes()["objectGeneration"] == attrs["objectGeneration"]
    finally:
        bus.close()


# ---------------------------------------------------------------- Firestore

@pytest.fixture
def docs(firestore_emulator):
    d = make_firestore_docs(firestore_emulator)
    yield d
    d.close()


def test_firestore_documents(docs):
    assert docs.get("runs", "r1") is None
    assert docs.create("runs", "r1", {"status": "queued", "metrics": {"loss": 1.0}}) is True
    assert docs.create("runs", "r1", {"status": "other"}) is False
    docs.merge("runs", "r1", {"metrics": {"acc": 0.5}, "status": "running", "lease": {"owner": "a"}})
    assert docs.get("runs", "r1") == {"status": "running", "metrics": {"loss": 1.0, "acc": 0.5},
                                      "lease": {"owner": "a"}}
    docs.set("runs", "r1", {"status": "succeeded"})
    assert docs.get("runs", "r1") == {"status": "succeeded"}
    # ids Firestore itself would refuse or misread
    for odd in ("gs://b/incoming/a.jsonl#1", "..", "__x__", "50%"):
        docs.set("ledger", odd, {"id": odd})
        assert docs.get("ledger", odd) == {"id": odd}
    assert sorted(i for i, _ in docs.query("ledger")) == sorted(["gs://b/incoming/a.jsonl#1", "..", "__x__", "50%"])
    docs.delete("runs", "r1")
    docs.delete("runs", "r1")   # deleting what is not there is fine
    assert docs.get("runs", "r1") is None


def test_firestore_named_database_is_a_database_of_its_own(docs, firestore_emulator):
    """Serving's ledger lives in a named database (shared/platform/topology.py DOCS_READERS,
    infra/terraform/firestore.tf): the client's `database=` reaches it, on the emulator too, and its
    documents are not the (default) database's."""
    from shared.platform.adapters.firestore import FirestoreDocStore
    from shared.platform.topology import ledger_database_for

    ledger = FirestoreDocStore(docs.project, ledger_database_for("serving"), emulator_host=firestore_emulator.host_port)
    try:
        docs.set("processed", "k", {"where": "default"})
        assert ledger.get("processed", "k") is None
        ledger.set("processed", "k", {"where": "ledger"})
        assert ledger.transaction(lambda t: t.get("processed", "k")) == {"where": "ledger"}
        assert docs.get("processed", "k") == {"where": "default"}
        assert [i for i, _ in ledger.query("processed")] == ["k"]
    finally:
        ledger.close()


def test_firestore_transactions(docs):
    docs.set("counters", "c", {"n": 0})

    def bump(t):
        doc = t.get("counters", "c")
        t.set("counters", "c", {"n": doc["n"] + 1})
        t.merge("counters", "c", {"by": {"x": 1}})
        assert t.get("counters", "c")["n"] == doc["n"] + 1    # reads after writes see them
        return doc["n"] + 1

    threads = [threading.Thread(target=lambda: [docs.transaction(bump) for _ in range(5)]) for _ in range(4)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert docs.get("counters", "c") == {"n": 20, "by": {"x": 1}}
    assert time.monotonic() - t0 < 20

    class Boom(Exception):
        pass

    def fail(t):
        t.set("counters", "c", {"n": -1})
        raise Boom()

    with pytest.raises(Boom):
        docs.transaction(fail)
    assert docs.get("counters", "c")["n"] == 20   # nothing written

    def lease(t):
        if t.get("runs", "r") is not None:
            return False
        t.set("runs", "r", {"owner": "me"})
        t.delete("counters", "c")
        return True

    assert docs.transaction(lease) is True
    assert docs.transaction(lease) is False
    assert docs.get("counters", "c") is None


def test_firestore_queries(docs):
    rows = {"a": {"status": "running", "step": 3, "m": {"lm-eval": 0.5}},
            "b": {"status": "failed", "step": 1, "m": {"lm-eval": 0.9}},
            "c": {"status": "running", "step": 7},
            "d": {"status": "succeeded", "step": 5, "m": {"lm-eval": 0.7}}}
    for k, v in rows.items():
        docs.set("runs", k, v)
    ids = lambda res: [i for i, _ in res]  # noqa: E731
    assert ids(docs.query("runs")) == ["a", "b", "c", "d"]
    assert ids(docs.query("runs", [("status", "==", "running")])) == ["a", "c"]
    assert ids(docs.query("runs", [("status", "!=", "running")], order_by=[("status", "asc")])) == ["b", "d"]
    assert ids(docs.query("runs", [("step", ">=", 3)], order_by=[("step", "desc")])) == ["c", "d", "a"]
    assert ids(docs.query("runs", [("step", "<", 5)], order_by=[("step", "asc")], limit=1)) == ["b"]
    assert ids(docs.query("runs", [("status", "in", ["failed", "succeeded"])])) == ["b", "d"]
    assert ids(docs.query("runs", order_by=[("m.lm-eval", "desc")])) == ["b", "d", "a"]   # c lacks it
    assert ids(docs.query("runs", [("m.lm-eval", ">", 0.6)])) == ["b", "d"]   # id order without order_by
    assert docs.query("runs", [("step", "in", [])]) == []
    assert docs.query("runs", limit=0) == []
    with pytest.raises(ValueError):
        docs.query("runs", [("step", "~", 1)])
