"""The GKE Job / JobSet a run renders to (services/trainer/k8s.py), and the entrypoint its pods run
(services/trainer/run_job.py), trained for real on the local adapters."""
from __future__ import annotations

import json
import logging
import re

import pytest
import yaml

from ftpipe.cli import main
from shared.domain import events as ev
from shared.domain.recipe import RecipeError, apply_overrides, load_recipe
from shared.platform.config import Settings, bootstrap
from tests.unit.chats import order_chat, write_prepared

from services.trainer import run_job
from services.trainer.k8s import object_name, render

DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _pod(manifest: dict) -> dict:
    if manifest["kind"] == "Job":
        return manifest["spec"]["template"]["spec"]
    return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def _env(pod: dict) -> dict:
    return {e["name"]: e["value"] for e in pod["containers"][0]["env"]}


def test_one_node_recipe_renders_a_suspended_job_on_spot_gpus():
    recipe = load_recipe("support-assistant")
    manifest = render(recipe, "run-42", "gs://b/datasets/d1/", tenant="team-a", image="reg/trainer:1")
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["spec"]["suspend"] is True  # Kueue admits it
    labels = manifest["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "ftpipe"
    assert labels["kueue.x-k8s.io/priority-class"] == "ftpipe-batch"
    assert labels["ftpipe.dev/tenant"] == "team-a" and labels["ftpipe.dev/run-id"] == "run-42"
    rules = manifest["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert rules[1]["onExitCodes"]["values"] == [run_job.EXIT_REJECTED]

    pod = _pod(manifest)
    assert pod["priorityClassName"] == "ftpipe-batch" and pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] < 30  # inside GKE's spot notice
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4",
                                   "cloud.google.com/gke-nodepool": "ftpipe-l4-spot",
                                   "cloud.google.com/gke-spot": "true"}
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in pod["tolerations"]
    container = pod["containers"][0]
    assert container["image"] == "reg/trainer:1"
    assert container["command"] == ["python", "-m", "services.trainer.launch", "--nnodes=1", "--nproc-per-node=1",
                                    "--standalone"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["memory"] == resources["requests"]["memory"]   # the memory plan's host figure
    # the run travels in the environment and reads back as the same job
    job = run_job.read_job({run_job.JOB_ENV: _env(pod)[run_job.JOB_ENV]})
    assert job.run_id == "run-42" and job.recipe == recipe and job.tenant == "team-a"
    assert job.dataset_uri == "gs://b/datasets/d1/"
    # plain YAML: no anchors, loads back to the same object
    text = yaml.safe_dump(manifest, sort_keys=False)
    assert "&id" not in text and yaml.safe_load(text) == manifest


def test_multi_node_recipe_renders_a_jobset_with_torchrun_rendezvous_on_its_first_pod():
    recipe = apply_overrides(load_recipe("support-assistant"), {
        "hardware.gpu": "h100", "hardware.count": 8, "hardware.nodes": 2, "hardware.spot": False,
        "distribution.strategy": "fsdp", "scheduling.priority": "production", "scheduling.queue": "team-a"})
    manifest = render(recipe, "run-7", "gs://b/datasets/d1/", image="reg/trainer:1")
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    name = manifest["metadata"]["name"]
    assert manifest["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": name}
    [workers] = manifest["spec"]["replicatedJobs"]
    job = workers["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (2, 2, "Indexed")
    pod = _pod(manifest)
    assert pod["priorityClassName"] == "ftpipe-production"
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                                   "cloud.google.com/gke-nodepool": "ftpipe-h100"}
    assert all(t["key"] != "cloud.google.com/gke-spot" for t in pod["tolerations"])
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["command"][:5] == ["python", "-m", "services.trainer.launch", "--nnodes=2", "--nproc-per-node=8"]
    assert f"--rdzv-endpoint={name}-workers-0-0.{name}:29500" in container["command"]
    assert "--rdzv-id=run-7" in container["command"]
    assert len(f"{name}-workers-0-0") <= 63  # the pod's host name


@pytest.mark.parametrize("run_id", ["run-42", "Run_With.CAPS/and:colons" * 4, "---", "x"])
def test_object_names_are_dns_labels(run_id):
    name = object_name(run_id)
    assert DNS_1123.match(name) and len(name) <= 50, name
    assert object_name(run_id) == name and object_name(run_id + "1") != name


def test_several_gpus_need_a_distribution_strategy():
    with pytest.raises(RecipeError, match="distribution.strategy 'single'; pick ddp, fsdp"):
        apply_overrides(load_recipe("tiny-sft"), {"hardware.count": 2})


def test_cli_prints_the_manifest_and_needs_data_without_it(capsys):
    assert main(["train", "--recipe", "tiny-sft", "--render-k8s", "--run-id", "r1", "--image", "img:1"]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert manifest["kind"] == "Job" and _pod(manifest)["containers"][0]["image"] == "img:1"
    assert main(["train", "--recipe", "tiny-sft"]) == 2
    assert "needs --data" in capsys.readouterr().err


# ------------------------------------------------------------------ the pods' entrypoint


@pytest.fixture
def settings(tmp_path, monkeypatch):
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_LOG_LEVEL", "FTPIPE_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield Settings(state_dir=tmp_path / "state")
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def pod_env(settings, tmp_path, monkeypatch):
    """A prepared dataset in the local bucket, and a function that renders a run of it and puts the
    run's $FTPIPE_JOB in this process's environment, as the pod would have it: returns (adapters, recipe)."""
    from shared.platform.storage import upload_dir

    folder = write_prepared(tmp_path / "dataset", {split: [order_chat(i) for i in ids] for split, ids in
                                                   (("train", range(6)), ("val", range(6, 8)), ("test", range(8, 9)))})
    adapters = bootstrap(settings)
    upload_dir(adapters.store, folder, settings.bucket, "datasets/d1")

    def as_pod(run_id: str, overrides: dict):
        recipe = apply_overrides(load_recipe("tiny-sft"), overrides)
        manifest = render(recipe, run_id, adapters.store.url(settings.bucket, "datasets/d1/"), image="img:1")
        monkeypatch.setenv(run_job.JOB_ENV, _env(_pod(manifest))[run_job.JOB_ENV])
        return adapters, recipe

    yield as_pod
    adapters.close()


def test_run_job_trains_the_run_in_its_environment_and_publishes_the_result(settings, pod_env):
    adapters, recipe = pod_env("run-k8s", {"training.max_steps": 2})
    assert run_job.run(settings) == run_job.EXIT_DONE
    assert adapters.store.stat(settings.bucket, "runs/run-k8s/adapter/COMPLETE") is not None
    record = json.loads(adapters.store.read(settings.bucket, "runs/run-k8s/adapter/run_record.json"))
    assert record["recipe"]["hash"] == recipe.hash and record["result"]["steps"] == 2
    events = [ev.decode(m.data, m.attributes)
              for m in adapters.bus.pull(ev.subscription_name("evaluator", ev.TRAINING), max_messages=20, timeout_s=2)]
    [done] = [e for e in events if e.type == "TrainingCompleted"]
    assert done.run_id == "run-k8s" and done.steps == 2

    # a second pod for the same run (a Job retry after the upload) finds it done and says so again
    assert run_job.run(settings) == run_job.EXIT_DONE


def test_a_preempted_pod_checkpoints_exits_75_and_the_next_pod_resumes(settings, pod_env):
    import threading

    adapters, _ = pod_env("run-spot", {"training.max_steps": 3})
    sigterm = threading.Event()
    sigterm.set()  # GKE's spot notice arrived: the first step ends with a checkpoint, then the pod exits
    assert run_job.run(settings, sigterm) == run_job.EXIT_RETRY
    assert adapters.store.stat(settings.bucket, "runs/run-spot/checkpoints/step-000001/COMPLETE") is not None
    assert run_job.run(settings) == run_job.EXIT_DONE
    started = [e for e in (ev.decode(m.data, m.attributes) for m in adapters.bus.pull(
        ev.subscription_name("evaluator", ev.TRAINING), max_messages=50, timeout_s=2)) if e.type == "TrainingStarted"]
    assert [e.resumed_from_step for e in started] == [0, 1]


def test_run_job_exits_rejected_when_retrying_cannot_help(settings, monkeypatch, caplog):
    monkeypatch.delenv(run_job.JOB_ENV, raising=False)
    assert run_job.run(settings) == run_job.EXIT_REJECTED
    monkeypatch.setenv(run_job.JOB_ENV, json.dumps({"run_id": "r"}))
    assert run_job.run(settings) == run_job.EXIT_REJECTED
    recipe = apply_overrides(load_recipe("tiny-sft"), {"distribution.strategy": "ddp"})
    monkeypatch.setenv(run_job.JOB_ENV, json.dumps({"run_id": "r", "recipe": recipe.model_dump(mode="json"),
                                                    "dataset_uri": "file:///nowhere/"}))
    with caplog.at_level(logging.ERROR):
        assert run_job.run(settings) == run_job.EXIT_REJECTED
    assert "distribution.strategy 'ddp'" in caplog.text


def test_the_pod_launcher_keeps_run_jobs_exit_code_through_torchrun(tmp_path):
    """torchrun alone exits 1 for any failed worker; the pods' launcher exits with run_job's verdict,
    so the Job's podFailurePolicy fails a rejected run at once."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != run_job.JOB_ENV}
    env.update(FTPIPE_STATE=str(tmp_path / "state"), OMP_NUM_THREADS="1")
    launched = subprocess.run([sys.executable, "-m", "services.trainer.launch", "--standalone", "--nproc-per-node=2"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == run_job.EXIT_REJECTED, launched.stderr[-2000:]
    assert "FTPIPE_JOB is not set" in launched.stderr


def test_an_over_budget_run_fails_and_its_alert_reaches_the_bus(settings, pod_env):
    adapters, _ = pod_env("run-budget", {"training.max_steps": 3, "budget.max_cost": 1e-12})
    assert run_job.run(settings) == run_job.EXIT_DONE
    events = [ev.decode(m.data, m.attributes) for m in adapters.bus.pull(
        ev.subscription_name("tracker", ev.TRAINING), max_messages=50, timeout_s=2)]
    [alert] = [e for e in events if e.type == "TrainingAlert"]
    assert (alert.kind, alert.step, alert.stop) == ("budget", 1, True)
    [failed] = [e for e in events if e.type == "TrainingFailed"]
    assert "above budget.max_cost" in failed.reason


def test_the_first_rank_to_finish_gives_the_verdict(tmp_path):
    """torchrun SIGTERMs the other ranks once one exits; their later 'preempted' must not replace it."""
    from services.trainer import launch

    environ = {launch.EXIT_CODE_ENV: str(tmp_path / "exit-code"), "LOCAL_RANK": "1"}
    launch.record_exit_code(run_job.EXIT_REJECTED, environ)
    launch.record_exit_code(run_job.EXIT_RETRY, {**environ, "LOCAL_RANK": "0"})
    assert (tmp_path / "exit-code").read_text() == str(run_job.EXIT_REJECTED)
    assert [p.name for p in tmp_path.iterdir()] == ["exit-code"]
