"""Duplicates, disorder, storage and document-store faults, poison messages and `ftpipe dlq replay`
on the local stack, faults injected at the adapter boundary (FTPIPE_FAULTS, shared/platform/faults.py) in
every service process alike."""
from __future__ import annotations

import json
import time

import pytest

from chaos import harness as h
from ftpipe.client import Client
from ftpipe.stack import down, up
from shared.domain import events as ev
from shared.domain.recipe import load_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("delivery")
    recipe = h.recipe(tmp / "chaos-tiny.yaml")
    return tmp, recipe, h.prepared_dataset(tmp, recipe)


def start_runs(client: Client, tmp, recipe, prepared, n_prepared: int, tag: str) -> list[str]:
    """One drop through preprocessing and `n_prepared` prepared jobs straight to the trainer."""
    runs = [client.drop(h.chats(tmp / f"chats-{tag}.jsonl", salt=f"-{tag}"), str(recipe))]
    runs += [client.submit({"recipe": str(recipe), "dataset": str(prepared), "prepared": True})
             for _ in range(n_prepared)]
    return runs


def run_under(tmp, name: str, faults: str, recipe, prepared, *, n_prepared: int = 2, **settings) -> dict:
    settings = h.stack_settings(tmp / name, **settings)
    up(settings, extra_env={"FTPIPE_FAULTS": faults})
    client = Client(settings)
    try:
        started = time.monotonic()
        runs = start_runs(client, tmp, recipe, prepared, n_prepared, name)
        ended = [client.wait(r, timeout_s=900, poll_s=0.5) for r in runs]
        wall = time.monotonic() - started
        problems = [f"{r}: {p}" for r in runs for p in h.run_violations(client, r)] + h.store_violations(client)
        problems += [f"{s} is down" for s in h.services_up(settings)]
        problems += [f"dead letter: {d}" for d in h.dead_letters(client)]
        return {"faults": faults, "runs": len(runs), "statuses": [r["status"] for r in ended],
                "versions": sorted(r["model"]["version"] for r in ended if r.get("model")),
                "wall_s": round(wall, 1), "injected": h.faults_injected(settings),
                "duplicates_acknowledged": h.log_count(settings, "duplicate delivery acknowledged"),
                "retried_calls": h.log_count(settings, "call failed, retrying"),
                "handler_retries": h.log_count(settings, "will retry"), "violations": problems}
    finally:
        down(settings)


def test_every_message_delivered_twice_delayed_and_reordered(assets, chaos_seed):
    tmp, recipe, prepared = assets
    figures = run_under(tmp, "dup", f"redeliver,duplicate,reorder=3,seed={chaos_seed}", recipe, prepared)
    h.save("duplicates_and_disorder", figures)
    assert not figures["violations"], figures["violations"]
    assert sum(figures["duplicates_acknowledged"].values()) > 0


@pytest.mark.parametrize("faults, results", [
    ("store=0.05,docs=0.05", "transient_errors"),
    # The ambiguous failure: a write or a transaction happened, and the caller was told it failed.
    # The retry repeats it: write-if-absent finds the object, a transaction runs again.
    ("lost_reply=0.05", "lost_replies"),
], ids=["transient", "lost_reply"])
def test_store_and_docstore_faults_are_retried_below_the_handlers(assets, chaos_seed, faults, results):
    tmp, recipe, prepared = assets
    figures = run_under(tmp, results, f"{faults},seed={chaos_seed}", recipe, prepared, transient_retry_s=30)
    h.save(results, figures)
    assert not figures["violations"], figures["violations"]
    assert sum(figures["injected"].values()) > 0


def test_persistent_store_outage_dead_letters_then_replay_after_the_fix(assets, chaos_seed):
    """Every write under runs/ fails: the trainer's message is retried, dead-lettered with the
    error; the outage ends (the stack restarts without the fault) and `ftpipe dlq replay` finishes
    the run with exactly one version."""
    tmp, recipe, prepared = assets
    settings = h.stack_settings(tmp / "outage", transient_retry_s=1)
    up(settings, extra_env={"FTPIPE_FAULTS": f"store=1.0,store_prefix=runs/,seed={chaos_seed}"})
    client = Client(settings)
    try:
        run_id = client.submit({"recipe": str(recipe), "dataset": str(prepared), "prepared": True})
        dead = h.wait_for(lambda: client.dlq_list(ev.JOBS), 300, "the job to be dead-lettered")
        # The run says so (the runtime's MessageDeadLettered, folded by the tracker), with the reason.
        while_dead = h.wait_for(lambda: (r := h.run_doc(client, run_id)).get("status") == "failed" and r, 60,
                                "the run to read failed")
        injected = h.faults_injected(settings)
    finally:
        down(settings)
    up(settings)  # the outage is over
    try:
        listed = h.ftpipe("dlq", "list", "--json", env={"FTPIPE_STATE": str(settings.state_dir)})
        replay = h.ftpipe("dlq", "replay", "--topic", ev.JOBS, "--json", env={"FTPIPE_STATE": str(settings.state_dir)})
        assert replay.returncode == 0, replay.stderr[-2000:]
        run = client.wait(run_id, timeout_s=600, poll_s=0.5)
        problems = h.run_violations(client, run_id) + h.store_violations(client)
        problems += [f"dead letter left: {d}" for d in client.dlq_list()]
        h.save("persistent_outage_and_replay", {
            "faults": "store=1.0,store_prefix=runs/ (every object call under runs/ fails), then none",
            "dead_lettered": dead, "dlq_list_cli": json.loads(listed.stdout), "injected": injected,
            "status_while_dead_lettered": while_dead["status"], "error_while_dead_lettered": while_dead["error"],
            "replayed": json.loads(replay.stdout), "status_after_replay": run["status"],
            "version": (run.get("model") or {}).get("version"), "violations": problems})
        assert len(dead) == 1 and dead[0]["run_id"] == run_id, dead
        assert "handler failed 5 times: InjectedFault: injected store fault" in dead[0]["reason"], dead
        assert "ftpipe dlq replay --topic jobs" in while_dead["error"], while_dead
        assert not problems, problems
    finally:
        down(settings)


POISON = [  # (what, topic, body, attributes, the reason's words)
    ("malformed JSON", ev.JOBS, b'{"run_id": "poison-1", "recipe": ', {"type": "JobSubmitted", "schema_version": "1"},
     "body is not valid JSON"),
    ("unknown type", ev.JOBS, b'{"run_id": "poison-2"}', {"type": "JobExploded", "schema_version": "1"},
     "unknown message type 'JobExploded'"),
    ("future schema_version", ev.TRAINING, None, {"type": "TrainingCompleted", "schema_version": "2"},
     "schema_version 2 is newer than this service understands"),
    ("not JSON at all", ev.DATASET_UPLOADS, b"\xff\xfe\x00binary",
     {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}, "body is not valid JSON"),
    ("body of the wrong shape", ev.EVALUATIONS, b'{"run_id": "poison-5", "scores": "lots"}',
     {"type": "EvaluationCompleted", "schema_version": "1"}, "EvaluationCompleted: invalid body"),
]


def test_poison_messages_are_dead_lettered_with_reasons_and_replay_is_safe(assets):
    tmp, recipe, prepared = assets
    settings = h.stack_settings(tmp / "poison")
    up(settings)
    client = Client(settings)
    try:
        bus = client.adapters.bus
        completed = ev.TrainingCompleted(run_id="poison-3", recipe=load_recipe(str(recipe)), dataset_uri="file:///x/", adapter_uri="file:///x/", metrics={}, steps=1)
        for _what, topic, body, attributes, _ in POISON:
            bus.publish(topic, body if body is not None else ev.encode(completed)[0], attributes)
        expected = sum(h.receivers(topic, attributes) for _, topic, _, attributes, _ in POISON)
        dead = h.wait_for(lambda: (d := client.dlq_list()) and len(d) >= expected and d, 120,
                          "every subscriber to dead-letter its copy")
        by_reason = {what: [d for d in dead if words in d["reason"]] for what, _, _, _, words in POISON}
        # The fix for a poison message is in the sender (or an upgrade): a replay of the same bytes
        # is dead-lettered again with the same reason, and nothing else happens.
        replay = h.ftpipe("dlq", "replay", "--json", env={"FTPIPE_STATE": str(settings.state_dir)})
        again = h.wait_for(lambda: (d := client.dlq_list()) and len(d) >= len(dead) and d, 120, "the replays")
        # A good run still goes through the same stack afterwards.
        run_id = client.submit({"recipe": str(recipe), "dataset": str(prepared), "prepared": True})
        run = client.wait(run_id, timeout_s=600, poll_s=0.5)
        problems = [f"{s} is down" for s in h.services_up(settings)] + h.run_violations(client, run_id)
        h.save("poison_messages", {
            "messages": [what for what, *_ in POISON], "dead_letters": len(dead),
            "reasons": {what: sorted({d["reason"] for d in rows}) for what, rows in by_reason.items()},
            "replayed": len(json.loads(replay.stdout)), "dead_letters_after_replay": len(again),
            "good_run_after": run["status"], "violations": problems})
        assert all(by_reason.values()), by_reason
        assert len(again) == len(dead) and not problems, problems
    finally:
        down(settings)
