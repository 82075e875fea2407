"""The Bus port's contract, the same for every adapter."""
import threading
import time

import pytest

from shared.platform.ports import AttributeFilter, SubscriptionPolicy
from shared.platform.runtime import KeepLeased

POLICY = SubscriptionPolicy(ack_deadline_s=10, max_delivery_attempts=5, min_backoff_s=0.5, max_backoff_s=2)


def pull_until(bus, sub, n=1, timeout=20.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += bus.pull(sub, max_messages=n - len(got), timeout_s=1.0)
    return got


def setup(bus, name, policy=POLICY, dlt=None):
    bus.create_topic(name)
    bus.create_topic(name)  # idempotent
    bus.create_subscription(f"{name}-sub", name, policy, dead_letter_topic=dlt)
    bus.create_subscription(f"{name}-sub", name, policy, dead_letter_topic=dlt)
    return f"{name}-sub"


def test_publish_pull_ack(bus, name):
    sub = setup(bus, name)
    bus.publish(name, b'{"x": 1}', {"type": "T", "event_id": "e1"})
    [msg] = pull_until(bus, sub)
    assert msg.data == b'{"x": 1}'
    assert msg.attributes["type"] == "T" and msg.attributes["event_id"] == "e1"
    assert msg.delivery_attempt == 1
    msg.ack()
    assert pull_until(bus, sub, timeout=2) == []


def test_fan_out_to_every_subscription_created_before_publish(bus, name):
    bus.create_topic(name)
    bus.create_subscription(f"{name}-a", name, POLICY)
    bus.create_subscription(f"{name}-b", name, POLICY)
    bus.publish(name, b"hello", {})
    for sub in (f"{name}-a", f"{name}-b"):
        [msg] = pull_until(bus, sub)
        assert msg.data == b"hello"
        msg.ack()
    bus.create_subscription(f"{name}-late", name, POLICY)
    assert pull_until(bus, f"{name}-late", timeout=2) == []


def test_nack_redelivers_after_the_delay_with_a_higher_attempt(bus, name):
    sub = setup(bus, name)
    bus.publish(name, b"m", {})
    [msg] = pull_until(bus, sub)
    msg.nack(0)
    [again] = pull_until(bus, sub)
    assert again.data == b"m" and again.delivery_attempt == 2
    again.nack(3)
    assert bus.pull(sub, max_messages=1, timeout_s=1.0) == []
    [third] = pull_until(bus, sub, timeout=20)
    assert third.delivery_attempt == 3
    third.ack()


def test_unacked_message_is_redelivered_after_the_ack_deadline(bus, name):
    sub = setup(bus, name)
    bus.publish(name, b"m", {})
    [first] = pull_until(bus, sub)
    [second] = pull_until(bus, sub, timeout=30)   # deadline is 10 s
    assert second.data == b"m" and second.delivery_attempt == 2
    second.ack()


def test_dead_letter_after_max_delivery_attempts(bus, name):
    bus.create_topic(f"{name}-dl")
    bus.create_subscription(f"{name}-dl-sub", f"{name}-dl", POLICY)
    sub = setup(bus, name, dlt=f"{name}-dl")
    bus.publish(name, b"poison", {"type": "T"})
    for attempt in range(1, POLICY.max_delivery_attempts + 1):
        [msg] = pull_until(bus, sub, timeout=30)
        assert msg.delivery_attempt == attempt
        msg.nack(0)
    [dead] = pull_until(bus, f"{name}-dl-sub", timeout=30)
    assert dead.data == b"poison" and dead.attributes["type"] == "T"
    dead.ack()
    assert pull_until(bus, sub, timeout=2) == []


def test_streaming_subscribe_extends_the_lease_while_the_callback_runs(bus, name):
    sub = setup(bus, name)
    received, done = [], threading.Event()

    def slow(msg):
        received.append(msg.delivery_attempt)
        time.sleep(14)  # longer than the 10 s ack deadline
        msg.ack()
        done.set()

    stream = bus.subscribe(sub, slow, max_messages=2)
    try:
        bus.publish(name, b"long job", {})
        assert done.wait(40)
        time.sleep(1)
    finally:
        stream.stop()
    assert received == [1]  # never redelivered while it was being worked on


def test_streaming_subscribe_flow_control(bus, name):
    sub = setup(bus, name)
    active, peak, lock, seen = [0], [0], threading.Lock(), []

    def work(msg):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
            seen.append(msg.data)
        msg.ack()

    stream = bus.subscribe(sub, work, max_messages=2)
    try:
        for i in range(6):
            bus.publish(name, str(i).encode(), {})
        deadline = time.monotonic() + 30
        while len(seen) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stream.stop()
    assert sorted(seen) == [str(i).encode() for i in range(6)]
    assert peak[0] <= 2


PRODUCTION = AttributeFilter("priority", ("production",))
BATCH_OR_UNMARKED = AttributeFilter("priority", ("batch",), or_missing=True)


def test_a_filtered_subscription_gets_only_the_messages_its_filter_matches(bus, name):
    bus.create_topic(name)
    subs = {f"{name}-prod": PRODUCTION, f"{name}-batch": BATCH_OR_UNMARKED, f"{name}-all": None}
    for sub, attribute_filter in subs.items():
        bus.create_subscription(sub, name, POLICY, filter=attribute_filter)
        bus.create_subscription(sub, name, POLICY, filter=attribute_filter)  # idempotent
    for data, attributes in ((b"p", {"priority": "production"}), (b"b", {"priority": "batch"}), (b"u", {}),
                             (b"i", {"priority": "interactive"})):
        bus.publish(name, data, attributes)

    def received(sub, n):
        msgs = pull_until(bus, sub, n)
        for m in msgs:
            m.ack()
        assert pull_until(bus, sub, timeout=1) == []  # and nothing else
        return sorted(m.data for m in msgs)

    assert received(f"{name}-prod", 1) == [b"p"]
    assert received(f"{name}-batch", 2) == [b"b", b"u"]
    assert received(f"{name}-all", 4) == [b"b", b"i", b"p", b"u"]


def test_streaming_subscribe_honours_the_filter(bus, name):
    bus.create_subscription(f"{name}-sub", name, POLICY, filter=PRODUCTION)
    got, done = [], threading.Event()

    def take(msg):
        got.append(msg.data)
        msg.ack()
        if len(got) == 2:
            done.set()

    stream = bus.subscribe(f"{name}-sub", take)
    try:
        for data, priority in ((b"b", "batch"), (b"p1", "production"), (b"i", "interactive"), (b"p2", "production")):
            bus.publish(name, data, {"priority": priority})
        assert done.wait(20)
        time.sleep(1)
    finally:
        stream.stop()
    assert sorted(got) == [b"p1", b"p2"]


def test_a_subscription_filter_is_fixed_at_creation(bus, name):
    bus.create_subscription(f"{name}-sub", name, POLICY, filter=PRODUCTION)
    with pytest.raises(ValueError, match="filter"):
        bus.create_subscription(f"{name}-sub", name, POLICY)
    with pytest.raises(ValueError, match="filter"):
        bus.create_subscription(f"{name}-sub", name, POLICY, filter=BATCH_OR_UNMARKED)


def test_a_pulled_message_kept_leased_is_not_redelivered_until_released(bus, name):
    sub = setup(bus, name, policy=SubscriptionPolicy(ack_deadline_s=2, max_delivery_attempts=5))
    bus.publish(name, b"long job", {})
    [msg] = pull_until(bus, sub)
    with KeepLeased(msg, ack_deadline_s=2, max_lease_s=3600):
        time.sleep(4)  # twice the 2 s ack deadline
        assert bus.pull(sub, max_messages=1, timeout_s=1.0) == []
    msg.ack()
    assert pull_until(bus, sub, timeout=3) == []  # acked for good (not merely leased)
