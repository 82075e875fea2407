"""The duplicates, poison and crash scenarios again on the `emulators` profile: the Google adapters
against the official Pub/Sub and Firestore emulators and fake-gcs-server (tests/emulators.py).
Skipped with the reason where the emulators are missing."""
from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from chaos import harness as h
from chaos.test_delivery import POISON
from ftpipe.client import Client
from ftpipe.stack import down, running, up
from shared.domain import events as ev
from shared.domain.recipe import load_recipe
from tests.emulators import EmulatorMissing, start_all

# The run's sub_state while the victim works, and the most seconds to wait after it appears.
KILLS = [("trainer", "training", 6.0), ("evaluator", "evaluating", 10.0), ("registry", "registering", 0.5),
         ("tracker", "training", 5.0)]


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emulators")
    try:
        stack = start_all(project="ftpipe-chaos", log_dir=tmp / "emulator-logs")
    except EmulatorMissing as exc:
        pytest.skip(f"emulators unavailable: {exc}")
    saved = {k: os.environ.get(k) for k in stack.env}
    os.environ.update(stack.env)
    recipe = h.recipe(tmp / "chaos-tiny.yaml")
    yield tmp, recipe, h.prepared_dataset(tmp, recipe)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stack.stop()


def record(name: str, figures: dict) -> None:
    """Each scenario's figures under its name in results/emulators.json (other scenarios' kept)."""
    path = h.RESULTS / "emulators.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    h.save("emulators", {**{k: v for k, v in previous.items() if k not in ("scenario", "recorded_at")},
                         name: figures})


def test_duplicates_and_disorder_on_the_emulators(emulators, chaos_seed):
    tmp, recipe, prepared = emulators
    settings = h.stack_settings(tmp / "dup")
    assert settings.profile == "emulators"
    up(settings, extra_env={"FTPIPE_FAULTS": f"redeliver,duplicate,reorder=3,seed={chaos_seed}"})
    client = Client(settings)
    try:
        runs = [client.drop(h.chats(tmp / "emu-chats.jsonl", salt="-emu"), str(recipe)),
                client.submit({"recipe": str(recipe), "dataset": str(prepared), "prepared": True})]
        ended = [client.wait(r, timeout_s=900, poll_s=1) for r in runs]
        problems = [f"{r}: {p}" for r in runs for p in h.run_violations(client, r)] + h.store_violations(client)
        problems += [f"{s} is down" for s in h.services_up(settings)]
        record("duplicates_and_disorder", {
            "runs": len(runs), "statuses": [r["status"] for r in ended], "injected": h.faults_injected(settings),
            "duplicates_acknowledged": h.log_count(settings, "duplicate delivery acknowledged"), "violations": problems})
        assert not problems, problems
    finally:
        down(settings)


def test_poison_on_the_emulators(emulators):
    tmp, recipe, prepared = emulators
    settings = h.stack_settings(tmp / "poison")
    up(settings)
    client = Client(settings)
    try:
        completed = ev.TrainingCompleted(run_id="poison-emu", recipe=load_recipe(str(recipe)), dataset_uri="gs://x/y/",
                                         adapter_uri="gs://x/z/", metrics={}, steps=1)
        for _, topic, body, attributes, _ in POISON:
            client.adapters.bus.publish(topic, body if body is not None else ev.encode(completed)[0], attributes)
        expected = sum(h.receivers(topic, attributes) for _, topic, _, attributes, _ in POISON)
        dead = h.wait_for(lambda: (d := client.dlq_list()) and len(d) >= expected and d, 180,
                          "every subscriber to dead-letter its copy", poll_s=1)
        replay = h.ftpipe("dlq", "replay", "--json", env={**settings.env()})
        again = h.wait_for(lambda: (d := client.dlq_list()) and len(d) >= len(dead) and d, 180, "the replays", poll_s=1)
        by_reason = {what: sorted({d["reason"] for d in dead if words in d["reason"]})
                     for what, _, _, _, words in POISON}
        problems = [f"{s} is down" for s in h.services_up(settings)]
        problems += [f"no dead letter for {w}" for w, reasons in by_reason.items() if not reasons]
        record("poison", {"messages": len(POISON), "dead_letters": len(dead), "reasons": by_reason,
                          "replayed": len(json.loads(replay.stdout or "[]")), "dead_letters_after_replay": len(again),
                          "violations": problems})
        assert not problems and len(again) == len(dead), problems
    finally:
        down(settings)


def test_sigkill_on_the_emulators(emulators, chaos_seed):
    tmp, recipe, prepared = emulators
    settings = h.stack_settings(tmp / "crash")
    up(settings)
    client = Client(settings)
    trials = []
    try:
        for number, (victim, stage, longest) in enumerate(KILLS):
            rng = random.Random(f"{chaos_seed}:emulators:{number}")
            run_id = client.submit({"recipe": str(recipe), "dataset": str(prepared), "prepared": True})
            h.wait_for(lambda run_id=run_id, stage=stage: h.run_doc(client, run_id).get("sub_state") in (stage, "done"),
                       600, stage, poll_s=0.05)
            delay = rng.uniform(0, longest)
            time.sleep(delay)
            at = h.run_doc(client, run_id).get("sub_state")
            pid = running(settings)[victim]
            os.kill(pid, signal.SIGKILL)
            h.wait_for(lambda victim=victim, pid=pid: running(settings).get(victim) != pid, 30, f"{victim} to die")
            up(settings)
            run = client.wait(run_id, timeout_s=900, poll_s=1)
            problems = h.run_violations(client, run_id) + h.store_violations(client)
            trials.append({"service": victim, "kill_after_s": round(delay, 2), "run_sub_state_at_kill": at,
                           "status": run["status"], "version": (run.get("model") or {}).get("version"),
                           "violations": problems})
            record("crashes", {"trials": trials})
        assert not [t for t in trials if t["violations"]], trials
    finally:
        down(settings)
