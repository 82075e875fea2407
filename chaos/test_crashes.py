"""Crashes: each of the five services SIGKILLed at a random point of a run's stage on the local
stack (every service its own OS process), then started again; every run must still end exactly
once (chaos.harness.run_violations) and leave no orphan in the bucket (store_violations).

A trial's random choices come from (--chaos-seed, trial number): `pytest chaos/test_crashes.py
--chaos-seed 7 -k 'trial-03'` replays trial 3."""
from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest

from chaos import harness as h
from ftpipe.client import Client
from ftpipe.stack import down, running, up

SERVICES = ("preprocess", "trainer", "evaluator", "registry", "tracker")
# A trial kills its victim while the victim holds one of the run's messages (its lease on the
# victim's subscription, read from the local bus): the subscription, the message type, and the most
# seconds to wait after the victim took it. The waits cover each handler's length on the tiny
# model on 2 quiet cores: preparing ~15 s, training 40 steps ~4 s, evaluating ~13 s, registering
# ~0.1 s, recording one event ~10 ms.
WINDOWS = {"preprocess": ("preprocess.jobs", "JobSubmitted", 15.0),
           "trainer": ("trainer.jobs", "JobSubmitted", 4.0),
           "evaluator": ("evaluator.training", "TrainingCompleted", 13.0),
           "registry": ("registry.evaluations", "EvaluationCompleted", 0.05),
           "tracker": ("tracker.training", "TrainingProgress", 0.01)}
FIGURES: list[dict] = []


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crashes")
    settings = h.stack_settings(tmp / "state")
    recipe = h.recipe(tmp / "chaos-tiny.yaml")
    prepared = h.prepared_dataset(tmp, recipe)
    up(settings)
    yield settings, tmp, recipe, prepared
    down(settings)


def pytest_generate_tests(metafunc):
    if "trial" in metafunc.fixturenames:
        n = metafunc.config.getoption("--chaos-trials")
        services = metafunc.config.getoption("--chaos-services").split(",")
        trials = [(i, services[i % len(services)]) for i in range(n)]
        metafunc.parametrize("trial", trials, ids=[f"trial-{i:02d}-{s}" for i, s in trials])


def test_sigkill(stack, trial, chaos_seed, request):
    settings, tmp, recipe, prepared = stack
    number, victim = trial
    rng = random.Random(f"{chaos_seed}:{number}")
    client = Client(settings)
    started = time.monotonic()
    if victim in ("preprocess", "tracker"):  # the whole flow from a drop
        run_id = client.drop(h.chats(tmp / f"chats-{number}.jsonl", salt=f"-{number}"), str(recipe))
    else:  # a prepared dataset straight to the trainer: the stages after preprocessing
        run_id = client.submit({"recipe": str(recipe), "dataset": str(prepared), "prepared": True})
    subscription, kind, longest = WINDOWS[victim]
    h.wait_for(lambda: h.in_flight(settings, subscription, kind, run_id), 300, f"{victim} to take the run's {kind}",
               poll_s=0.01)
    delay = rng.uniform(0, longest)
    time.sleep(delay)
    pid = running(settings)[victim]
    mid_handler = h.in_flight(settings, subscription, kind, run_id)
    at = h.run_doc(client, run_id).get("sub_state")
    os.kill(pid, signal.SIGKILL)
    h.wait_for(lambda: running(settings).get(victim) != pid, 30, f"{victim} to die")
    up(settings)  # the replacement (Cloud Run / GKE / the function's runtime restart it in the cloud)
    run = client.wait(run_id, timeout_s=600, poll_s=0.5)
    problems = h.run_violations(client, run_id) + h.store_violations(client)
    problems += [f"{s} is down" for s in h.services_up(settings)]
    problems += [f"dead letter: {d}" for d in h.dead_letters(client)]
    FIGURES.append({"trial": number, "service": victim, "seed": f"{chaos_seed}:{number}",
                    "kill_after_s": round(delay, 2), "mid_handler": mid_handler,
                    "run_sub_state_at_kill": at, "run_id": run_id,
                    "status": run["status"], "version": (run.get("model") or {}).get("version"),
                    "trainer_starts": len([1 for _, e in client.adapters.docs.query(
                        "run_events", where=[("run_id", "==", run_id), ("type", "==", "TrainingStarted")])]),
                    "wall_s": round(time.monotonic() - started, 1), "violations": problems})
    h.save(request.config.getoption("--chaos-results"), {"trials": len(FIGURES), "violations": sum(len(f["violations"]) for f in FIGURES),
                       "killed_mid_handler": sum(1 for f in FIGURES if f["mid_handler"]),
                       "by_service": {s: sum(1 for f in FIGURES if f["service"] == s) for s in SERVICES},
                       "faults_injected": "SIGKILL of the victim service, then a fresh process", "runs": FIGURES})
    assert not problems, problems


def spark_jvm(pid: int) -> psutil.Process | None:
    """The Spark JVM the preprocess service started, if it has one now: spark-submit's shell execs
    into it, after a short-lived java process (launcher.Main) has built its command line."""
    try:
        return next((p for p in psutil.Process(pid).children(recursive=True)
                     if p.name() == "java" and "org.apache.spark.deploy.SparkSubmit" in p.cmdline()
                     and "org.apache.spark.launcher.Main" not in p.cmdline()), None)
    except psutil.NoSuchProcess:
        return None


def spark_workers(pid: int) -> bool:
    try:
        return any("pyspark.daemon" in p.cmdline() for p in psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return False


def test_a_spark_jvm_killed_mid_job_is_started_again_and_the_run_completes(stack, chaos_seed):
    """The preprocess service's JVM dies under a job (the kernel's OOM killer, say) while the service
    process lives on: the job fails and is redelivered, and the service starts a new JVM for it
    (services/preprocess/service.spark_session) instead of failing every job after it."""
    settings, tmp, recipe, _ = stack
    client = Client(settings)
    started = time.monotonic()
    run_id = client.drop(h.chats(tmp / "chats-jvm.jsonl", salt="-jvm"), str(recipe))
    h.wait_for(lambda: h.in_flight(settings, "preprocess.jobs", "JobSubmitted", run_id), 300,
               "preprocess to take the run's JobSubmitted", poll_s=0.01)
    service = running(settings)["preprocess"]
    # Killed while Spark works on the job (its Python workers are up), not while the JVM starts:
    # a JVM that dies starting is an error of its own, which the retry also cures.
    h.wait_for(lambda: spark_workers(service), 120, "Spark's Python workers", poll_s=0.05)
    jvm = spark_jvm(service)
    delay = random.Random(f"{chaos_seed}:jvm").uniform(0, 2)
    time.sleep(delay)
    mid_handler = h.in_flight(settings, "preprocess.jobs", "JobSubmitted", run_id)
    jvm.kill()
    run = client.wait(run_id, timeout_s=600, poll_s=0.5)
    problems = h.run_violations(client, run_id) + h.store_violations(client)
    problems += [f"{s} is down" for s in h.services_up(settings)]
    problems += [f"dead letter: {d}" for d in h.dead_letters(client)]
    if running(settings).get("preprocess") != service:
        problems.append("the preprocess service process was replaced")
    new_jvm = spark_jvm(service)
    restarts = h.log_count(settings, "the Spark JVM is gone").get("preprocess", 0)
    h.save("spark_jvm_killed", {
        "faults_injected": "SIGKILL of the preprocess service's Spark JVM (the service process lives on)",
        "seed": f"{chaos_seed}:jvm", "kill_after_s": round(delay, 2), "mid_handler": mid_handler, "run_id": run_id,
        "status": run["status"], "version": (run.get("model") or {}).get("version"),
        "jvm_restarts_logged": restarts, "new_jvm": bool(new_jvm and new_jvm.pid != jvm.pid),
        "wall_s": round(time.monotonic() - started, 1), "violations": problems})
    assert not problems, problems
    assert restarts >= 1 and new_jvm is not None and new_jvm.pid != jvm.pid
