"""Train one run, named in $FTPIPE_JOB, then exit: the entrypoint of the Kubernetes Job that
services/trainer/k8s.py renders for a run that needs its own GPU node(s).

The trainer service pulls its runs from the bus; a run whose recipe asks for several GPUs or nodes
is started by torchrun on each node instead, and every process must train that same run, so the
job travels in the pod's environment rather than as a message. The handler is the service's
(`service.train_run`): same lease, checkpoints, resume and events. It is rank-aware: rank 0 takes the
lease, publishes the events and uploads checkpoints and the adapter; the other ranks follow rank 0's
plan and train their share (services/trainer/distributed.py). A SIGTERM to any rank (torchrun passes
the pod's on to all) stops every rank after one checkpoint of the same step.

$FTPIPE_JOB: {"run_id", "recipe" (the recipe as JSON), "dataset_uri", "tenant"}.

Exit codes (the rendered Job's podFailurePolicy reads them):
  0   the run ended: TrainingCompleted or TrainingFailed was published
  75  try again (EX_TEMPFAIL): preempted after a checkpoint, or another worker holds the lease;
      the Job starts a new pod, which resumes from the latest checkpoint
  2   rejected (bad recipe or data, missing privacy sign-off): retrying cannot help
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from pydantic import BaseModel, ValidationError

from shared.domain.recipe import Recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.logs import configure_logging
from shared.platform.runtime import Context, Reject, Retry, publish_event

from services.trainer.launch import record_exit_code
from services.trainer.service import train_run

JOB_ENV = "FTPIPE_JOB"
EXIT_DONE, EXIT_REJECTED, EXIT_RETRY = 0, 2, 75


class JobSpec(BaseModel):
    run_id: str
    recipe: Recipe
    dataset_uri: str
    tenant: str = "default"


def read_job(environ=os.environ) -> JobSpec:
    raw = environ.get(JOB_ENV)
    if not raw:
        raise Reject(f"${JOB_ENV} is not set; it must hold the run to train as JSON "
                     "(run_id, recipe, dataset_uri, tenant), as `ftpipe train --render-k8s` writes it")
    try:
        return JobSpec.model_validate_json(raw)
    except ValidationError as exc:
        raise Reject(f"${JOB_ENV} is not a valid job: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc


def run(settings: Settings | None = None, stopping: threading.Event | None = None) -> int:
    log = logging.getLogger("ftpipe.trainer.job")
    stopping = stopping or threading.Event()
    try:
        job = read_job()
    except Reject as exc:
        log.error("rejected: %s", exc)
        return EXIT_REJECTED
    adapters = bootstrap(settings, service="trainer")
    extra = {"service": "trainer", "run_id": job.run_id}
    ctx = Context("trainer", adapters, message=None, stopping=stopping, log=logging.LoggerAdapter(log, extra))
    try:
        for event in train_run(ctx, job.run_id, job.recipe, job.dataset_uri, job.tenant) or ():
            publish_event(adapters.bus, event)
            log.info("published %s", event.type, extra=extra)
        return EXIT_DONE
    except Retry as exc:
        log.warning("will be retried by a new pod: %s", exc, extra=extra)
        return EXIT_RETRY
    except Reject as exc:
        log.error("rejected: %s", exc, extra=extra)
        return EXIT_REJECTED
    finally:
        adapters.close()


def main() -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # spot preemption: checkpoint, then exit for a new pod
        signal.signal(sig, lambda *_: stopping.set())
    code = run(settings, stopping)
    record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
