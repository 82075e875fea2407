"""Settings from the environment, and the one place adapters are chosen (bootstrap)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from shared.platform.ports import Bus, DocStore, ObjectStore, SubscriptionPolicy

Profile = Literal["local", "emulators", "gcp"]


class Settings(BaseModel):
    profile: Profile = "local"
    state_dir: Path = Path(".ftpipe")
    bucket: str = "ftpipe"
    project: str = "ftpipe-local"
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    ack_deadline_s: int = Field(default=60, ge=10)
    max_delivery_attempts: int = Field(default=5, ge=5)
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    trainer_lease_s: float = 60.0          # a run's ownership lease; stale after this without heartbeat
    # A lower priority class passed over this many times in a row is tried first (shared/platform/scheduling.py).
    priority_starvation_limit: int = Field(default=3, ge=1)
    create_resources: bool = True          # topics/subscriptions/buckets; Terraform owns them in gcp
    # Where the preprocess Spark job runs: in the service process (local Spark) or as a Dataproc
    # Serverless batch (services/preprocess/dataproc.py); the dataproc_* settings are for the latter.
    preprocess_runner: Literal["in_process", "dataproc"] = "in_process"
    dataproc_region: str = "europe-west1"
    dataproc_runtime_version: str = "3.0"  # Spark 4 (the code is written and tested against PySpark 4); 2.2 is Spark 3.5
    dataproc_service_account: str | None = None
    dataproc_subnetwork: str | None = None
    dataproc_wheel_uri: str | None = None          # gs://…/ftpipe-<version>-py3-none-any.whl
    dataproc_main_uri: str | None = None           # gs://…/preprocess_job.py (services/preprocess/job.py)
    dataproc_container_image: str | None = None    # a runtime image with ftpipe's dependencies installed
    # Pub/Sub push endpoints (the evaluator on Cloud Run, shared/platform/push.py): check the OIDC token of
    # each push (default: in the gcp profile only), expecting this audience (the subscription's
    # --push-auth-token-audience, by default the endpoint URL) and, if set, this signer's email.
    push_auth: bool | None = None
    push_audience: str | None = None
    push_service_account: str | None = None
    # People-facing HTTP (shared/platform/auth.py): in the gcp profile, the dashboard is reached through IAP
    # (its backend's audience) and the registry's approval function through IAM (its URL); what a caller
    # may do comes from its roles (shared/domain/access.py). `admins` (emails) are admins whatever the
    # documents say: the break-glass that no Firestore writer can grant themselves. Locally, named
    # tokens and the stack's own in <state>/auth-token (its admin).
    dashboard_audience: str | None = None
    approval_audience: str | None = None
    admins: tuple[str, ...] = ()
    # The serving API (services/serving/) in the gcp profile: callers' Google ID tokens for this
    # audience (its URL), from `serving_callers` only (service accounts' and people's emails; groups are
    # enforced by Cloud Run's invoker IAM, since ID tokens carry none); locally, a token with viewer.
    serving_audience: str | None = None
    serving_callers: tuple[str, ...] = ()
    # Tenants whose Pub/Sub job door (job-requests.<tenant>) the preprocess service takes: from
    # Terraform's var.tenants in the cloud (FTPIPE_JOB_DOORS), the local stack's `default` here.
    job_doors: tuple[str, ...] = ()
    # The most one request to the tracker's API may carry (a dataset uploaded from the dashboard or
    # POST /api/runs): bigger drops go to the bucket, which takes them in parts (10 GB and more).
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1)
    # Transient store / document-store failures are retried this long before the handler sees them
    # (shared/platform/retrying.py); `faults` injects failures at the adapter boundary (shared/platform/faults.py).
    transient_retry_s: float = Field(default=30.0, ge=0)
    faults: str | None = None
    # The processed-message ledger (shared/platform/runtime.py) in a document database of its own:
    # a Firestore database id (infra/terraform/firestore.tf), locally <state>/<name>.db. A service
    # that only reads the main database (shared/platform/topology.py DOCS_READERS: serving) keeps its
    # ledger there even when this is unset, under ledger_database_for(service).
    ledger_database: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{2,61}[a-z0-9]$")
    # The LLM judges a recipe may name (eval.judge.base_url, shared/domain/judge_urls.py): URL prefixes,
    # comma-separated in FTPIPE_JUDGE_URLS. Loopback is allowed outside the cloud; nothing else is.
    judge_urls: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        values = {
            "profile": env.get("FTPIPE_PROFILE"),
            "state_dir": env.get("FTPIPE_STATE"),
            "bucket": env.get("FTPIPE_BUCKET"),
            "project": env.get("FTPIPE_PROJECT") or env.get("GOOGLE_CLOUD_PROJECT"),
            "log_format": env.get("FTPIPE_LOG_FORMAT") or ("json" if env.get("FTPIPE_PROFILE") == "gcp" else None),
            "log_level": env.get("FTPIPE_LOG_LEVEL"),
            "ack_deadline_s": env.get("FTPIPE_ACK_DEADLINE_S"),
            "max_delivery_attempts": env.get("FTPIPE_MAX_DELIVERY_ATTEMPTS"),
            "min_backoff_s": env.get("FTPIPE_MIN_BACKOFF_S"),
            "trainer_lease_s": env.get("FTPIPE_TRAINER_LEASE_S"),
            "priority_starvation_limit": env.get("FTPIPE_PRIORITY_STARVATION_LIMIT"),
            "create_resources": env.get("FTPIPE_CREATE_RESOURCES"),
            "preprocess_runner": env.get("FTPIPE_PREPROCESS_RUNNER"),
            "dataproc_region": env.get("FTPIPE_DATAPROC_REGION"),
            "dataproc_runtime_version": env.get("FTPIPE_DATAPROC_RUNTIME_VERSION"),
            "dataproc_service_account": env.get("FTPIPE_DATAPROC_SERVICE_ACCOUNT"),
            "dataproc_subnetwork": env.get("FTPIPE_DATAPROC_SUBNETWORK"),
            "dataproc_wheel_uri": env.get("FTPIPE_DATAPROC_WHEEL_URI"),
            "dataproc_main_uri": env.get("FTPIPE_DATAPROC_MAIN_URI"),
            "dataproc_container_image": env.get("FTPIPE_DATAPROC_CONTAINER_IMAGE"),
            "push_auth": env.get("FTPIPE_PUSH_AUTH"),
            "push_audience": env.get("FTPIPE_PUSH_AUDIENCE"),
            "push_service_account": env.get("FTPIPE_PUSH_SERVICE_ACCOUNT"),
            "dashboard_audience": env.get("FTPIPE_DASHBOARD_AUDIENCE"),
            "approval_audience": env.get("FTPIPE_APPROVAL_AUDIENCE"),
            "serving_audience": env.get("FTPIPE_SERVING_AUDIENCE"),
            "max_upload_bytes": env.get("FTPIPE_MAX_UPLOAD_BYTES"),
            "transient_retry_s": env.get("FTPIPE_TRANSIENT_RETRY_S"),
            "faults": env.get("FTPIPE_FAULTS") or None,
            "admins": _csv(env.get("FTPIPE_ADMINS")),
            "serving_callers": _csv(env.get("FTPIPE_SERVING_CALLERS")),
            "job_doors": _csv(env["FTPIPE_JOB_DOORS"]) or () if "FTPIPE_JOB_DOORS" in env else None,
            "ledger_database": env.get("FTPIPE_LEDGER_DATABASE") or None,
            "judge_urls": _csv(env.get("FTPIPE_JUDGE_URLS")),
        }
        values = {k: v for k, v in values.items() if v is not None}
        values.update(overrides)
        settings = cls(**values)
        if settings.in_cloud and "create_resources" not in values:
            settings = settings.model_copy(update={"create_resources": False})
        if not settings.in_cloud and "job_doors" not in values:
            settings = settings.model_copy(update={"job_doors": ("default",)})
        return settings.model_copy(update={"state_dir": Path(settings.state_dir).resolve()})

    def env(self) -> dict[str, str]:
        """The environment that gives a child process these same settings."""
        return {"FTPIPE_PROFILE": self.profile, "FTPIPE_STATE": str(self.state_dir), "FTPIPE_BUCKET": self.bucket,
                "FTPIPE_PROJECT": self.project, "FTPIPE_LOG_FORMAT": self.log_format, "FTPIPE_LOG_LEVEL": self.log_level,
                "FTPIPE_ACK_DEADLINE_S": str(self.ack_deadline_s),
                "FTPIPE_MAX_DELIVERY_ATTEMPTS": str(self.max_delivery_attempts),
                "FTPIPE_MIN_BACKOFF_S": str(self.min_backoff_s),
                "FTPIPE_TRAINER_LEASE_S": str(self.trainer_lease_s),
                "FTPIPE_PRIORITY_STARVATION_LIMIT": str(self.priority_starvation_limit),
                "FTPIPE_TRANSIENT_RETRY_S": str(self.transient_retry_s),
                "FTPIPE_JOB_DOORS": ",".join(self.job_doors),
                **({"FTPIPE_FAULTS": self.faults} if self.faults else {}),
                **({"FTPIPE_LEDGER_DATABASE": self.ledger_database} if self.ledger_database else {}),
                **({"FTPIPE_JUDGE_URLS": ",".join(self.judge_urls)} if self.judge_urls else {})}

    @property
    def in_cloud(self) -> bool:
        """Running in Google Cloud: reached through its load balancers and identities, not the loopback
        and the local token. (The `emulators` profile uses the Google clients but runs here.)"""
        return self.profile == "gcp"

    @property
    def verify_push(self) -> bool:
        return self.push_auth if self.push_auth is not None else self.in_cloud

    def subscription_policy(self) -> SubscriptionPolicy:
        return SubscriptionPolicy(ack_deadline_s=self.ack_deadline_s, max_delivery_attempts=self.max_delivery_attempts,
                                  min_backoff_s=self.min_backoff_s, max_backoff_s=self.max_backoff_s)


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(e.strip() for e in text.split(",") if e.strip()) if text else None


@dataclass
class Adapters:
    settings: Settings
    bus: Bus
    store: ObjectStore
    docs: DocStore
    # The processed-message ledger's own database (Settings.ledger_database), if not `docs`.
    own_ledger: DocStore | None = None

    @property
    def ledger(self) -> DocStore:
        """Where the runtime records the messages it has processed."""
        return self.own_ledger if self.own_ledger is not None else self.docs

    def close(self) -> None:
        self.bus.close()
        self.docs.close()
        if self.own_ledger is not None:
            self.own_ledger.close()


def bootstrap(settings: Settings | None = None, *, service: str | None = None) -> Adapters:
    """The adapters of the settings' profile. A service's process names itself (`service`), and gets
    what its IAM grants allow and no more (shared/platform/topology.py): its bus publishes only what
    the service may (SERVICE_PUBLISHES); a service that only reads the documents (DOCS_READERS) gets
    them read-only, and its ledger in a database of its own; one that only reads the bucket
    (STORE_READERS), a read-only store. Tools and tests that name none may do anything."""
    settings = settings or Settings.from_env()
    from shared.platform.topology import (
        DOCS_READERS,
        STORE_READERS,
        ledger_database_for,
        publishing_as,
        reading_only,
        store_reading_only,
    )

    ledger_db = settings.ledger_database or (ledger_database_for(service) if service in DOCS_READERS else None)
    ledger: DocStore | None = None
    if settings.profile == "local":
        from shared.platform.adapters.local_store import LocalObjectStore
        from shared.platform.adapters.sqlite_bus import SqliteBus
        from shared.platform.adapters.sqlite_docs import SqliteDocStore
        from shared.platform.notifications import LocalBucketNotifier

        state = settings.state_dir
        bus = SqliteBus(state / "bus.db")
        docs = SqliteDocStore(state / "docs.db")
        if ledger_db:
            ledger = SqliteDocStore(state / f"{ledger_db}.db")
        store = LocalObjectStore(state / "buckets")
        # GCS sends OBJECT_FINALIZE notifications itself; locally the store does, through this.
        store.on_finalize = LocalBucketNotifier(bus, docs).notify
    else:
        # `emulators` is the same code as `gcp`: the clients follow *_EMULATOR_HOST variables.
        from shared.platform.adapters.firestore import FirestoreDocStore
        from shared.platform.adapters.gcs import GcsObjectStore
        from shared.platform.adapters.pubsub import PubSubBus

        bus = PubSubBus(settings.project)
        docs = FirestoreDocStore(settings.project)
        if ledger_db:
            ledger = FirestoreDocStore(settings.project, ledger_db)
        store = GcsObjectStore(settings.project)
    if settings.faults:  # the chaos suite's faults, below the retries as a real outage would be
        from shared.platform.faults import FaultPlan, inject

        plan = FaultPlan.parse(settings.faults)
        bus, store, docs = inject(plan, bus, store, docs)
        if ledger is not None:  # the same plan on the ledger's database (its own draws)
            _, _, ledger = inject(plan, bus, store, ledger)
    from shared.platform.retrying import DOCS_CALLS, STORE_CALLS, retrying

    store = retrying(store, STORE_CALLS, "store", settings.transient_retry_s)
    docs = retrying(docs, DOCS_CALLS, "docs", settings.transient_retry_s)
    if ledger is not None:
        ledger = retrying(ledger, DOCS_CALLS, "ledger", settings.transient_retry_s)
    if service is not None:
        bus = publishing_as(bus, service)
        if service in DOCS_READERS:
            docs = reading_only(docs, service)
        if service in STORE_READERS:
            store = store_reading_only(store, service)
    adapters = Adapters(settings=settings, bus=bus, store=store, docs=docs, own_ledger=ledger)
    if settings.create_resources:
        from shared.platform.topology import ensure_topology

        ensure_topology(bus, settings.subscription_policy(), doors=settings.job_doors)
        ensure_bucket = getattr(store, "ensure_bucket", None)
        if ensure_bucket:
            ensure_bucket(settings.bucket)
    return adapters
