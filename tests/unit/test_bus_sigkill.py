"""A local-bus consumer killed with SIGKILL mid-message: the message is redelivered to another
consumer process and the idempotent handler's effect happens exactly once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.domain import events as ev
from shared.domain.recipe import Recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.ports import SubscriptionPolicy
from shared.platform.runtime import LEDGER, ledger_key, publish_event

CONSUMER = Path(__file__).with_name("idempotent_consumer.py")


def start_consumer(state, markers, hold_s):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, str(CONSUMER), str(state), str(markers), str(hold_s)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkilled_consumer_message_redelivered_and_effect_happens_once(tmp_path):
    state, markers = tmp_path / "state", tmp_path / "markers"
    markers.mkdir()
    adapters = bootstrap(Settings(state_dir=state))
    adapters.bus.create_subscription(ev.subscription_name("effect", ev.JOBS), ev.JOBS,
                                     SubscriptionPolicy(ack_deadline_s=2, max_delivery_attempts=5))
    job = ev.JobSubmitted(run_id="run-kill", recipe=Recipe(name="t", version=1, base_model="tiny-random-smollm2", model_name="t"), dataset_uri="file:///nowhere")
    publish_event(adapters.bus, job)

    first = start_consumer(state, markers, hold_s=120)
    try:
        wait_for(lambda: any(markers.iterdir()), 60, "the first consumer to do the effect")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    second = start_consumer(state, markers, hold_s=0)
    try:
        wait_for(lambda: adapters.docs.get(LEDGER, ledger_key("effect", job.event_id)) is not None, 60,
                 "the second consumer to process the redelivery")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)
    attempts = sorted(p.name.rsplit("-", 1)[-1] for p in markers.iterdir())
    assert attempts == ["1", "2"], attempts          # delivered twice, to two processes
    assert adapters.docs.get("effects", "counter") == {"n": 1}   # the effect happened once
    assert adapters.bus.pull(ev.subscription_name("effect", ev.JOBS), timeout_s=3) == []  # acked for good
