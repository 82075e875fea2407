"""The fault injector (shared/platform/faults.py) and the retries (shared/platform/retrying.py) on the real embedded
adapters and runtime: a quick sample of what the chaos suite (chaos/, RELIABILITY.md) does at length."""
import logging
import threading

import pytest

from shared.domain import events as ev
from shared.domain.recipe import Recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.faults import FaultPlan, InjectedFault
from shared.platform.ports import PreconditionFailed
from shared.platform.runtime import Service, handle_message, publish_event
from shared.platform.topology import dlq_subscription

SUBSCRIPTION = ev.subscription_name("effect", ev.JOBS)


def adapters_with(tmp_path, faults: str | None, **settings):
    adapters = bootstrap(Settings(state_dir=tmp_path / "state", faults=faults, min_backoff_s=0, max_backoff_s=0,
                                  **settings))
    adapters.bus.create_subscription(SUBSCRIPTION, ev.JOBS, adapters.settings.subscription_policy(),
                                     dead_letter_topic=ev.dead_letter_topic(ev.JOBS))
    return adapters


def job(run_id: str = "run-faults") -> ev.JobSubmitted:
    return ev.JobSubmitted(run_id=run_id, recipe=Recipe(name="t", version=1, base_model="tiny-random-smollm2",
                                                        model_name="t"), dataset_uri="file:///nowhere")


def counting_service(effects: list, touch_store: bool = False) -> Service:
    def effect(event, ctx):
        if touch_store:
            ctx.store.write(ctx.settings.bucket, f"effects/{event.run_id}", b"done")
        effects.append(ctx.message.message_id)
        return []
    return Service("effect", {ev.JobSubmitted: effect})


def deliver_all(adapters, service) -> list[tuple[str, int, str]]:
    """Pull and handle until the subscription is empty: (message id, attempt, outcome) per delivery."""
    seen = []
    while got := adapters.bus.pull(SUBSCRIPTION, max_messages=1, timeout_s=1.5):
        msg = got[0]
        seen.append((msg.message_id, msg.delivery_attempt, handle_message(service, adapters, ev.JOBS, msg)))
    return seen


def test_plan_parses_and_names_what_is_wrong():
    assert FaultPlan.parse("redeliver, reorder=2.5,store=0.1,store_prefix=runs/,seed=3") == FaultPlan(
        redeliver=True, reorder=2.5, store=0.1, store_prefix="runs/", seed=3)
    for text, says in [("explode", "unknown term 'explode'"), ("store=lots", "store needs a float"),
                       ("docs=2", "probability"), ("lost_reply=-1", "probability"),
                       ("redeliver=1", "takes no value")]:
        with pytest.raises(ValueError, match=says):
            FaultPlan.parse(text)


def test_a_lost_ack_redelivers_the_same_message_and_the_ledger_makes_it_once(tmp_path):
    adapters = adapters_with(tmp_path, "redeliver")
    publish_event(adapters.bus, job())
    effects = []
    seen = deliver_all(adapters, counting_service(effects))
    assert [(attempt, outcome) for _, attempt, outcome in seen] == [(1, "acked"), (2, "duplicate")]
    assert seen[0][0] == seen[1][0]          # the same message, delivered twice
    assert len(effects) == 1


def test_a_duplicated_publish_is_handled_once(tmp_path):
    adapters = adapters_with(tmp_path, "duplicate")
    publish_event(adapters.bus, job())
    effects = []
    seen = deliver_all(adapters, counting_service(effects))
    assert [outcome for *_, outcome in seen] == ["acked", "duplicate"] and seen[0][0] != seen[1][0]
    assert len(effects) == 1


def test_reordered_deliveries_all_arrive_once(tmp_path):
    adapters = adapters_with(tmp_path, "reorder=0.5,seed=1")
    for n in range(4):
        publish_event(adapters.bus, job(f"run-{n}"))
    effects = []
    service = counting_service(effects)
    got = []
    while len(got) < 4:
        got += [handle_message(service, adapters, ev.JOBS, m) for m in adapters.bus.pull(SUBSCRIPTION, timeout_s=1.5)]
    assert got == ["acked"] * 4 and len(set(effects)) == 4
    assert adapters.bus.pull(SUBSCRIPTION, timeout_s=1) == []


def test_transient_store_faults_are_retried_below_the_handler(tmp_path, caplog):
    adapters = adapters_with(tmp_path, "store=0.5,seed=2")
    with caplog.at_level(logging.WARNING):
        for n in range(6):
            adapters.store.write("ftpipe", f"x/{n}", b"data")
        assert [adapters.store.read("ftpipe", f"x/{n}") for n in range(6)] == [b"data"] * 6
    assert any("injected fault" in r.getMessage() for r in caplog.records)
    assert any("call failed, retrying" in r.getMessage() for r in caplog.records)


def test_a_persistent_store_fault_is_retried_then_dead_lettered_with_its_reason(tmp_path):
    adapters = adapters_with(tmp_path, "store=1.0,store_prefix=effects/", transient_retry_s=0.2)
    publish_event(adapters.bus, job())
    effects = []
    seen = deliver_all(adapters, counting_service(effects, touch_store=True))
    # (the runtime's MessageDeadLettered notice goes to the tracker on `notices`, not to this service)
    assert [outcome for *_, outcome in seen] == ["nacked"] * 4 + ["dead-lettered"]
    dead = adapters.bus.pull(dlq_subscription(ev.JOBS), timeout_s=2)
    assert len(dead) == 1 and not effects
    reason = dead[0].attributes["dead_letter_reason"]
    assert reason.startswith("handler failed 5 times: InjectedFault: injected store fault on write(effects/run-faults)")


def test_a_document_store_outage_dead_letters_with_its_reason(tmp_path):
    """The ledger lookup itself fails: retried like a handler failure, then dead-lettered with the
    error (not left to the bus's generic 'not acknowledged')."""
    adapters = adapters_with(tmp_path, None)
    publish_event(adapters.bus, job())
    broken = bootstrap(Settings(state_dir=tmp_path / "state", faults="docs=1.0", transient_retry_s=0.1,
                                min_backoff_s=0, max_backoff_s=0, create_resources=False))
    effects = []
    seen = deliver_all(broken, counting_service(effects))
    # (the runtime's MessageDeadLettered notice goes to the tracker on `notices`, not to this service)
    assert [outcome for *_, outcome in seen] == ["nacked"] * 4 + ["dead-lettered"]
    reason = adapters.bus.pull(dlq_subscription(ev.JOBS), timeout_s=2)[0].attributes["dead_letter_reason"]
    assert "InjectedFault: injected docs fault on get" in reason and not effects


def test_faults_apply_across_threads_of_one_process(tmp_path):
    """Several handler threads share one plan's random stream (a lock): every write still lands."""
    adapters = adapters_with(tmp_path, "store=0.3,seed=4")

    def write(n):
        adapters.store.write("ftpipe", f"t/{n}", str(n).encode())
    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(info.name for info in adapters.store.list("ftpipe", "t/")) == sorted(f"t/{n}" for n in range(8))
    with pytest.raises(InjectedFault):
        bootstrap(Settings(state_dir=tmp_path / "state", faults="store=1.0", transient_retry_s=0,
                           create_resources=False)).store.read("ftpipe", "t/0")


def test_temp_files_of_a_writer_killed_mid_write_are_swept_when_a_process_starts(tmp_path):
    """A SIGKILLed writer leaves its temp file (found by the chaos suite's registry kills); the next
    process to open the store removes it, and never a live writer's."""
    import os
    import subprocess

    from shared.platform.adapters.local_store import LocalObjectStore

    store = LocalObjectStore(tmp_path / "buckets")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store._tmp / f"{dead.pid}-tmpkilled").write_bytes(b"half an object")
    (store._tmp / f"{os.getpid()}-tmpwriting").write_bytes(b"in flight")
    LocalObjectStore(tmp_path / "buckets")
    assert sorted(p.name for p in store._tmp.iterdir() if p.suffix != ".lock") == [f"{os.getpid()}-tmpwriting"]


def test_a_replay_that_is_dead_lettered_again_is_not_replayed_again_by_the_same_command(tmp_path):
    """`ftpipe dlq replay` of a message that is still poison: the consumer dead-letters it again
    while the command runs; the command replays it once (it used to take the new dead letter and
    replay it again, forever: found by the chaos suite's poison scenario)."""
    from dataclasses import replace

    from ftpipe.client import Client

    adapters = adapters_with(tmp_path, None)
    service = counting_service([])
    adapters.bus.publish(ev.JOBS, b"{not json", {"type": "JobSubmitted", "schema_version": "1"})
    assert [o for *_, o in deliver_all(adapters, service)] == ["dead-lettered"]
    publishes = []

    class ConsumedAtOnce:  # a consumer as quick as a real one: handles each message on `jobs` as it lands
        def __getattr__(self, name):
            return getattr(adapters.bus, name)

        def publish(self, topic, data, attributes):
            publishes.append(topic)
            assert len(publishes) < 5, "replayed in a loop"
            message_id = adapters.bus.publish(topic, data, attributes)
            if topic == ev.JOBS:
                deliver_all(adapters, service)
            return message_id

    client = Client(adapters.settings, replace(adapters, bus=ConsumedAtOnce()))
    assert len(client.dlq_replay(ev.JOBS)) == 1 and publishes == [ev.JOBS]
    assert [d["reason"] for d in client.dlq_list(ev.JOBS)] == ["malformed: body is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"]


def test_a_lost_reply_means_the_call_acted_and_its_retry_meets_the_result(tmp_path, caplog):
    """lost_reply: the write happened, the caller was told it failed; the retry of a write-if-absent
    then finds the object there (what callers must take as done)."""
    adapters = adapters_with(tmp_path, "lost_reply=1.0", transient_retry_s=0.2)
    with caplog.at_level(logging.WARNING), pytest.raises((InjectedFault, PreconditionFailed)):
        adapters.store.write("ftpipe", "x/once", b"data", if_generation_match=0)
    assert any("reply lost" in r.getMessage() for r in caplog.records)
    clean = bootstrap(Settings(state_dir=tmp_path / "state"))
    assert clean.store.read("ftpipe", "x/once") == b"data"


def test_a_delete_whose_reply_was_lost_is_done_when_its_retry_finds_nothing(tmp_path):
    adapters = adapters_with(tmp_path, "lost_reply=0.5,seed=1", transient_retry_s=5)
    names = [f"x/{n}" for n in range(8)]
    for name in names:
        try:
            adapters.store.write("ftpipe", name, b"data", if_generation_match=0)
        except PreconditionFailed:  # its first attempt wrote it
            pass
    for name in names:
        adapters.store.delete("ftpipe", name)  # no ObjectNotFound from a retry of a delete that was done
    assert list(adapters.store.list("ftpipe", "x/")) == []


def test_pruning_removes_the_marker_first_and_sweeps_partial_folders_left_by_a_cut_prune(tmp_path):
    from services.trainer.service import COMPLETE, checkpoint_prefix, prune_checkpoints

    store = bootstrap(Settings(state_dir=tmp_path / "state")).store
    for step, whole in [(5, True), (10, False), (15, True), (20, True)]:
        prefix = checkpoint_prefix("run-p", step)
        store.write("ftpipe", f"{prefix}/adapter/weights.safetensors", b"w")
        if whole:
            store.write("ftpipe", f"{prefix}/{COMPLETE}", b"{}")
    prune_checkpoints(store, "ftpipe", "run-p", keep=2)
    left = sorted({info.name.split("/checkpoints/")[1].split("/")[0]
                   for info in store.list("ftpipe", "runs/run-p/checkpoints/")})
    assert left == ["step-000015", "step-000020"]
