"""The Kubernetes object that trains one run on GKE GPU nodes: a batch/v1 Job for one node, a
JobSet (jobset.x-k8s.io) for several. `ftpipe train --render-k8s` prints it.

Everything comes from the recipe:
- hardware: GPU type (node selector `cloud.google.com/gke-accelerator`), GPUs per node (the
  `nvidia.com/gpu` limit and torchrun's --nproc-per-node), nodes (--nnodes; a JobSet with an
  indexed Job whose first pod is the rendezvous host), node pool, spot (node selector and
  toleration; the grace period fits the 30 s notice GKE gives a spot VM, in which the trainer
  checkpoints and exits with 75 for a new pod to resume);
- scheduling: the PriorityClass `ftpipe-<priority>` and Kueue's queue and priority labels (the Job
  is created suspended; Kueue admits it when the queue has quota);
- the memory plan (shared/domain/memory_plan.py): the pod's memory request and limit (every
  process loads the base model on the host first; rank 0 gathers checkpoints there), the
  micro-batch the run trains with (the largest that fits, the accumulation keeping the effective
  batch), an annotation with the plan; a recipe that cannot fit is refused, with what to change;
- the run itself travels in $FTPIPE_JOB (services/trainer/run_job.py).

The PriorityClasses, the Kueue ClusterQueue / LocalQueue and the node pools are cluster objects,
created once with the cluster (infra/), not per run.
"""
from __future__ import annotations

import hashlib
import json
import math
import re

from shared.domain.memory_plan import GIB, Plan, PlanError, plan_recipe, refusal
from shared.domain.recipe import GKE_ACCELERATORS, Recipe

from services.trainer.run_job import EXIT_REJECTED, JOB_ENV, JobSpec

RDZV_PORT = 29500
GRACE_PERIOD_S = 25         # GKE gives a spot VM 30 s of notice; the SIGTERM checkpoint must fit in it
MAX_RESTARTS = 10           # new pods after failures that are not preemptions
CPU_PER_GPU, MEMORY_PER_GPU_GI = 4, 16   # the memory request when there is no plan (no config.json to read)


class RenderError(ValueError):
    """The run cannot be rendered to a Job that would work; the message says what to change."""


def object_name(run_id: str) -> str:
    """A DNS-1123 name for the run's Job (pod host names derive from it; kept short for JobSet's)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:30].strip("-")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:6]
    return f"ftpipe-train-{slug}-{digest}" if slug else f"ftpipe-train-{digest}"


def label_value(value: str) -> str:
    """A valid label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63].strip("-._") or "none"


def priority_class(recipe: Recipe) -> str:
    return f"ftpipe-{recipe.scheduling.priority}"


def torchrun_command(recipe: Recipe, run_id: str, leader: str | None) -> list[str]:
    hw = recipe.hardware
    # torchrun through ftpipe's launcher, which keeps run_job's exit code (torchrun's is 1 for any failure)
    command = ["python", "-m", "services.trainer.launch", f"--nnodes={hw.nodes}", f"--nproc-per-node={hw.count}"]
    if hw.nodes == 1:
        command.append("--standalone")
    else:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={leader}:{RDZV_PORT}", f"--rdzv-id={run_id}"]
    return command


def _pod_spec(recipe: Recipe, run_id: str, job: JobSpec, *, image: str, env: dict[str, str],
              service_account: str, leader: str | None, plan: Plan | None) -> dict:
    hw = recipe.hardware
    memory = f"{math.ceil(plan.host_bytes / GIB)}Gi" if plan else f"{MEMORY_PER_GPU_GI * hw.count}Gi"
    selector = {"cloud.google.com/gke-accelerator": GKE_ACCELERATORS[hw.gpu], "cloud.google.com/gke-nodepool": hw.pool}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if hw.spot:
        selector["cloud.google.com/gke-spot"] = "true"
        tolerations.append({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                            "effect": "NoSchedule"})
    container_env = [{"name": k, "value": v} for k, v in {**env, JOB_ENV: job.model_dump_json()}.items()]
    return {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "priorityClassName": priority_class(recipe),
        "terminationGracePeriodSeconds": GRACE_PERIOD_S,
        "nodeSelector": selector,
        "tolerations": tolerations,
        "containers": [{
            "name": "trainer",
            "image": image,
            "command": torchrun_command(recipe, run_id, leader),
            "env": container_env,
            "ports": [{"name": "rdzv", "containerPort": RDZV_PORT}],
            "resources": {
                "requests": {"cpu": str(CPU_PER_GPU * hw.count), "memory": memory, "nvidia.com/gpu": str(hw.count)},
                "limits": {"memory": memory, "nvidia.com/gpu": str(hw.count)},
            },
            # NCCL exchanges tensors through shared memory; the container default (64 MiB) is too small
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }


def render(recipe: Recipe, run_id: str, dataset_uri: str, *, tenant: str = "default", image: str,
           namespace: str = "ftpipe", service_account: str = "ftpipe-trainer",
           env: dict[str, str] | None = None) -> dict:
    """The Job (one node) or JobSet (several) that trains `run_id` (a plain dict, ready for YAML).
    RenderError when the recipe's memory plan does not fit its hardware."""
    name = object_name(run_id)
    hw = recipe.hardware
    try:
        plan = plan_recipe(recipe)
    except PlanError:
        plan = None
    if plan is not None and (reason := refusal(recipe, plan)):
        raise RenderError(reason)
    trained = recipe
    if plan is not None and plan.micro_batch != recipe.training.batch_size:
        trained = recipe.model_copy(update={"training": recipe.training.model_copy(
            update={"batch_size": plan.micro_batch, "grad_accum": plan.grad_accum})})
    job = JobSpec(run_id=run_id, recipe=trained, dataset_uri=dataset_uri, tenant=tenant)
    labels = {
        "app.kubernetes.io/name": "ftpipe-trainer", "app.kubernetes.io/part-of": "ftpipe",
        "ftpipe.dev/run-id": label_value(run_id), "ftpipe.dev/tenant": label_value(tenant),
        "ftpipe.dev/recipe": label_value(recipe.name), "ftpipe.dev/priority": recipe.scheduling.priority,
        "kueue.x-k8s.io/queue-name": recipe.scheduling.queue,
        "kueue.x-k8s.io/priority-class": priority_class(recipe),
    }
    annotations = {"ftpipe.dev/run-id": run_id, "ftpipe.dev/recipe-hash": recipe.hash}
    if plan is not None:
        annotations["ftpipe.dev/memory-plan"] = json.dumps({k: getattr(plan, k) for k in (
            "peak_bytes", "capacity_bytes", "micro_batch", "grad_accum", "host_bytes", "precision",
            "gradient_checkpointing")}, sort_keys=True)
    metadata = {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations}
    env = {"FTPIPE_PROFILE": "gcp", "FTPIPE_LOG_FORMAT": "json", **(env or {})}
    # a preemption (DisruptionTarget) does not count as a failure; a rejection fails the Job at once
    failure_policy = {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_REJECTED]}},
    ]}
    if hw.nodes == 1:
        pod = _pod_spec(recipe, run_id, job, image=image, env=env, service_account=service_account, leader=None,
                        plan=plan)
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": {
            "suspend": True, "backoffLimit": MAX_RESTARTS, "podFailurePolicy": failure_policy,
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}
    # JobSet pods are named <jobset>-<replicated job>-<job index>-<pod index>, with DNS host names
    # under the JobSet's headless service: the first pod of the indexed Job hosts the rendezvous
    leader = f"{name}-workers-0-0.{name}"
    pod = _pod_spec(recipe, run_id, job, image=image, env=env, service_account=service_account, leader=leader,
                    plan=plan)
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata, "spec": {
        "suspend": True,
        "network": {"enableDNSHostnames": True, "subdomain": name},
        "failurePolicy": {"maxRestarts": MAX_RESTARTS,
                          "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]},
        "replicatedJobs": [{"name": "workers", "replicas": 1, "template": {"spec": {
            "parallelism": hw.nodes, "completions": hw.nodes, "completionMode": "Indexed", "backoffLimit": 0,
            "podFailurePolicy": failure_policy,
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}}],
    }}
