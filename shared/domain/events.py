"""Event contracts: every message on the bus is one of these pydantic models, JSON in the body,
with attributes `type`, `schema_version`, `run_id` and a deterministic `event_id` so that a
redelivered or re-published message is recognised by the consumers' ledgers (and `priority` on
events that carry a recipe)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.domain.recipe import Recipe

SCHEMA_VERSION = 1

# Topics: the one place their names are written.
DATASET_UPLOADS = "dataset-uploads"
JOBS = "jobs"
DATASETS = "datasets"
TRAINING = "training"
EVALUATIONS = "evaluations"
MODELS = "models"
# What the runtime tells the tracker about deliveries (MessageDeadLettered): a topic of its own, so
# that every consumer may publish there without being able to publish work (a job) on `jobs`.
NOTICES = "notices"
TOPICS = (DATASET_UPLOADS, JOBS, DATASETS, TRAINING, EVALUATIONS, MODELS, NOTICES)
# Tenants' job doors: one topic per tenant, job-requests.<tenant>, on which only that tenant's
# principals may publish (infra/terraform: var.tenants). Pub/Sub says nothing of a publisher, so the
# topic a request arrives on is what says whose it is (services/preprocess/service.py on_job_request).
JOB_REQUESTS = "job-requests"


def door_topic(tenant: str) -> str:
    return f"{JOB_REQUESTS}.{tenant}"


def door_tenant(topic: str) -> str | None:
    """The tenant whose door `topic` is, or None for any other topic."""
    prefix = JOB_REQUESTS + "."
    return topic[len(prefix):] or None if topic.startswith(prefix) else None


# The attribute that carries a run's priority class (its recipe's scheduling.priority) on every
# event with a recipe; a message without it counts as batch.
PRIORITY = "priority"


def dead_letter_topic(topic: str) -> str:
    return f"{topic}-dead-letter"


def subscription_name(service: str, topic: str) -> str:
    return f"{service}.{topic}"


class MalformedMessage(ValueError):
    """A message no handler can ever process (bad JSON, unknown type, newer schema, invalid body).
    It goes straight to the dead-letter topic with this reason."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(_Body):
    type: ClassVar[str]
    topic: ClassVar[str]
    door: ClassVar[bool] = False   # published on a tenant's door topic (door_topic), not on `topic` itself
    run_id: str = Field(min_length=1, max_length=128)

    def step_key(self) -> str:
        """What makes this event unique within its run and type (overridden where one run emits many)."""
        return "0"

    @property
    def event_id(self) -> str:
        return f"{self.run_id}:{self.type}:{self.step_key()}"


class StepMetrics(_Body):
    model_config = ConfigDict(extra="allow", frozen=True)
    step: int
    loss: float
    grad_norm: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    epoch: float | None = None


# ---------------------------------------------------------------- jobs

class JobSubmitted(Event):
    type: ClassVar[str] = "JobSubmitted"
    topic: ClassVar[str] = JOBS
    recipe: Recipe
    dataset_uri: str                       # a raw file (preprocess) or a prepared folder (trainer)
    prepared: bool = False
    tenant: str = "default"
    source: dict[str, Any] = {}            # where the data came from: drop object, submitter, …


# ---------------------------------------------------------------- datasets

class _DatasetReady(Event):
    """What preprocess says of a dataset it has prepared, whether or not it waits for review."""
    topic: ClassVar[str] = DATASETS
    recipe: Recipe
    dataset_id: str
    dataset_uri: str                       # folder URL holding train/val/test.jsonl, manifest.json
    counts: dict[str, int]
    tenant: str = "default"
    tokens: dict[str, Any] | None = None          # per split, with the base model's tokenizer
    cost_estimate: dict[str, Any] | None = None   # FLOPs, GPU hours, price (services/preprocess/cost.py)


class DatasetPrepared(_DatasetReady):
    type: ClassVar[str] = "DatasetPrepared"
    privacy_signoff: dict[str, Any] | None = None  # who approved, when, residual rate seen (privacy review)


class DatasetAwaitingReview(_DatasetReady):
    """A prepared dataset held for privacy sign-off (recipe data.privacy_review): nothing trains on
    it until `ftpipe privacy approve` publishes its DatasetPrepared."""
    type: ClassVar[str] = "DatasetAwaitingReview"
    pii: dict[str, Any] = {}               # pii_report summary: counts per category, residual rate; never values


class DatasetRejected(Event):
    type: ClassVar[str] = "DatasetRejected"
    topic: ClassVar[str] = DATASETS
    recipe: Recipe | None = None           # None when the drop named a recipe that does not exist
    reason: str
    counts: dict[str, int] = {}
    report_uri: str | None = None          # folder with rejected.jsonl and manifest.json, for audit


# ---------------------------------------------------------------- training

class TrainingStarted(Event):
    type: ClassVar[str] = "TrainingStarted"
    topic: ClassVar[str] = TRAINING
    dataset_uri: str
    resumed_from_step: int = 0

    def step_key(self) -> str:
        return str(self.resumed_from_step)


class TrainingProgress(Event):
    type: ClassVar[str] = "TrainingProgress"
    topic: ClassVar[str] = TRAINING
    metrics: list[StepMetrics] = Field(min_length=1)
    total_steps: int | None = None

    def step_key(self) -> str:
        return f"{self.metrics[0].step}-{self.metrics[-1].step}"


class CheckpointSaved(Event):
    type: ClassVar[str] = "CheckpointSaved"
    topic: ClassVar[str] = TRAINING
    step: int
    uri: str
    metrics: dict[str, float] = {}

    def step_key(self) -> str:
        return str(self.step)


class TrainingAlert(Event):
    """Something the trainer's monitor saw (services/trainer/monitor.py): a warning, or why it stopped."""
    type: ClassVar[str] = "TrainingAlert"
    topic: ClassVar[str] = TRAINING
    step: int
    kind: Literal["non_finite_loss", "grad_norm", "val_loss_rising", "val_probes_plateau", "budget", "out_of_memory"]
    message: str
    value: float | None = None
    threshold: float | None = None
    stop: bool = False

    def step_key(self) -> str:
        return f"{self.step}-{self.kind}"


class TrainingCompleted(Event):
    type: ClassVar[str] = "TrainingCompleted"
    topic: ClassVar[str] = TRAINING
    recipe: Recipe
    dataset_uri: str
    adapter_uri: str
    metrics: dict[str, float]
    steps: int
    tenant: str = "default"
    # 0: the trainer's; N: the Nth re-evaluation asked for (`ftpipe models reevaluate`, after an
    # evaluation that errored). Part of the id, so the evaluator's ledger does not take the request
    # for a redelivery of the first one.
    reevaluation: int = Field(default=0, ge=0)

    def step_key(self) -> str:
        return "0" if not self.reevaluation else f"reevaluation-{self.reevaluation}"


class TrainingFailed(Event):
    type: ClassVar[str] = "TrainingFailed"
    topic: ClassVar[str] = TRAINING
    reason: str
    step: int = 0
    cancelled: bool = False


# ---------------------------------------------------------------- evaluation

class EvaluationCompleted(Event):
    type: ClassVar[str] = "EvaluationCompleted"
    topic: ClassVar[str] = EVALUATIONS
    recipe: Recipe
    dataset_uri: str
    adapter_uri: str
    scores: dict[str, dict[str, float]]    # {"base": {...}, "candidate": {...}}
    passed: bool
    reasons: list[str]
    report_uri: str
    training_metrics: dict[str, float] = {}
    tenant: str = "default"
    # Not passed and held: the evidence could not decide a block rule and the recipe says hold
    # (eval.on_inconclusive): the registry holds the version, neither promoted nor quarantined.
    held: bool = False
    # Failed on evidence (every failed rule a significant regression on its intervals): the quarantine
    # is final. False: failed on point values, which an approver may have re-evaluated.
    conclusive: bool = False
    steps: int = 0   # the training run's, kept for a re-evaluation's TrainingCompleted
    # 0: the first evaluation; N: the Nth re-evaluation (TrainingCompleted.reevaluation), part of the id
    # so that the registry's ledger does not take a re-evaluation's verdict for a redelivery.
    reevaluation: int = Field(default=0, ge=0)

    def step_key(self) -> str:
        return "0" if not self.reevaluation else f"reevaluation-{self.reevaluation}"


class EvaluationErrored(Event):
    """The evaluator could not load or run a model (an infrastructure fault, not a verdict) on any of
    its delivery attempts, and dead-lettered the TrainingCompleted. The registry records the run's
    version `unevaluated`: what it carries is what a re-evaluation needs to ask again."""
    type: ClassVar[str] = "EvaluationErrored"
    topic: ClassVar[str] = EVALUATIONS
    recipe: Recipe
    dataset_uri: str
    adapter_uri: str
    training_metrics: dict[str, float] = {}
    steps: int = 0
    tenant: str = "default"
    error: str
    attempts: int
    reevaluation: int = Field(default=0, ge=0)   # the TrainingCompleted's: which evaluation errored

    def step_key(self) -> str:
        return str(self.reevaluation)


# ---------------------------------------------------------------- models
# What the registry (services/registry_fn/, shared/domain/model_registry.py) did to a model version. Each
# carries the run that trained the version. A version changes status several times in its life
# (promoted, archived, rolled back to, archived again), so the events that record a change carry
# its index in the version's `history` (`change`), and ModelPromoted the index of the move in the
# alias's history (`move`): the ids stay unique, and a redelivery republishes the same id.

MODEL_STATUSES = ("unevaluated", "evaluating", "held", "candidate", "approved", "promoted", "quarantined", "archived")
ALIASES = ("staging", "production")


class _ModelEvent(Event):
    topic: ClassVar[str] = MODELS
    model_name: str
    version: str
    uri: str


class _StatusChange(_ModelEvent):
    change: int = 0                        # the change's index in the version's history

    def step_key(self) -> str:
        return f"{self.version}-{self.change}"


class ModelRegistered(_ModelEvent):
    type: ClassVar[str] = "ModelRegistered"
    # candidate: passed the gate, waits for approval; promoted: passed, in production; quarantined:
    # failed the gate; archived: passed, but a later version of the same model was in production already;
    # unevaluated: its evaluation errored (no verdict), it waits for `ftpipe models reevaluate`
    status: Literal["unevaluated", "held", "candidate", "promoted", "quarantined", "archived"]
    # The index in the version's history of the registration's first entry: 0 for its first, more
    # for a verdict (or another error) after a re-evaluation, which registers the version again.
    change: int = 0

    def step_key(self) -> str:
        return str(self.change)


class ModelApproved(_StatusChange):
    type: ClassVar[str] = "ModelApproved"
    approver: str
    note: str = ""


class ModelPromoted(_ModelEvent):
    """An alias now points at this version (production: the version serves)."""
    type: ClassVar[str] = "ModelPromoted"
    alias: Literal["staging", "production"] = "production"
    previous_version: str | None = None
    reason: Literal["gate", "approval", "manual", "rollback"] = "gate"
    actor: str | None = None               # who moved it (None: the gate, nobody)
    move: int = 1                          # 1 for the alias's first move, 2 for its second, …
    # production: the index of the version's "promoted" entry in its history, which orders this
    # change among the version's others (ModelApproved's `change`, …) however the bus delivers them
    change: int | None = None

    def step_key(self) -> str:
        return f"{self.alias}-{self.move}"


class ModelQuarantined(_StatusChange):
    type: ClassVar[str] = "ModelQuarantined"
    reasons: list[str]
    actor: str | None = None               # None: the gate quarantined it


class ModelArchived(_StatusChange):
    type: ClassVar[str] = "ModelArchived"
    reason: str
    actor: str | None = None               # None: superseded when another version was promoted


# ---------------------------------------------------------------- GCS notifications

class ObjectFinalized(_Body):
    """The GCS JSON_API_V1 object resource that a bucket notification carries (subset we use)."""
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    type: ClassVar[str] = "OBJECT_FINALIZE"
    topic: ClassVar[str] = DATASET_UPLOADS
    door: ClassVar[bool] = False
    bucket: str
    name: str
    generation: str
    size: str = "0"
    contentType: str = "application/octet-stream"
    md5Hash: str = ""
    timeCreated: str = ""
    updated: str = ""

    @property
    def event_id(self) -> str:
        return f"{self.bucket}/{self.name}#{self.generation}"

    @property
    def run_id(self) -> str:
        return ""

    def attributes(self) -> dict[str, str]:
        return {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1", "bucketId": self.bucket,
                "objectId": self.name, "objectGeneration": self.generation,
                "notificationConfig": f"projects/_/buckets/{self.bucket}/notificationConfigs/ftpipe"}


# ---------------------------------------------------------------- delivery

class MessageDeadLettered(Event):
    """The runtime gave up on a message of this run (shared/platform/runtime.py): published on `notices`
    beside the dead letter itself, so the tracker marks the run failed with the reason instead of
    leaving it in its last stage. `ftpipe dlq replay` after the fix moves the run on again."""
    type: ClassVar[str] = "MessageDeadLettered"
    topic: ClassVar[str] = NOTICES
    message_id: str                        # the dead-lettered message (a replay publishes a new one)
    message_type: str
    source_topic: str
    subscription: str
    reason: str

    def step_key(self) -> str:
        return f"{self.subscription}:{self.message_id}"


class JobRequested(Event):
    """A job asked for on a tenant's door (job-requests.<tenant>) with any Pub/Sub client: attribute
    `type=JobRequested`, `schema_version=1`, and this JSON body. It carries no recipe body and no
    authority: the door acts as a submitter of its tenant (shared/domain/jobs.py authorize_job), so a
    refused request becomes a DatasetRejected with the reason. `tenant` must be the door's own;
    `run_id` is the caller's idempotency key (the run gets an id derived from it and the door)."""
    type: ClassVar[str] = "JobRequested"
    topic: ClassVar[str] = JOB_REQUESTS
    door: ClassVar[bool] = True
    tenant: str
    recipe: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")   # built-in, or recipes/<tenant>/<name>.yaml
    dataset_uri: str                       # data of the tenant's: gs://BUCKET/incoming/<tenant>/... or a run's
    overrides: dict[str, Any] = {}

    def step_key(self) -> str:
        return self.tenant   # a run_id one tenant picked never shadows another tenant's request


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls for cls in (JobRequested, JobSubmitted, DatasetPrepared, DatasetAwaitingReview, DatasetRejected, TrainingStarted, TrainingProgress,
                              CheckpointSaved, TrainingAlert, TrainingCompleted, TrainingFailed, EvaluationCompleted,
                              EvaluationErrored, ModelRegistered, ModelApproved, ModelPromoted, ModelQuarantined, ModelArchived,
                              MessageDeadLettered)
}

AnyEvent = Event | ObjectFinalized


def events_on(topic: str) -> tuple[type[Event], ...]:
    """Every event class published on the topic."""
    return tuple(cls for cls in EVENT_TYPES.values() if cls.topic == topic)


def encode(event: Event) -> tuple[bytes, dict[str, str]]:
    body = event.model_dump_json().encode()
    attributes = {"type": event.type, "schema_version": str(SCHEMA_VERSION), "run_id": event.run_id,
                  "event_id": event.event_id}
    recipe = getattr(event, "recipe", None)
    if isinstance(recipe, Recipe):  # the trainer's subscriptions are filtered on it (shared/platform/scheduling.py)
        attributes[PRIORITY] = recipe.scheduling.priority
    return body, attributes


def decode(data: bytes, attributes: Mapping[str, str]) -> AnyEvent:
    """Parse one bus message, or raise MalformedMessage saying exactly what is wrong."""
    if "eventType" in attributes and "type" not in attributes:
        if attributes["eventType"] != "OBJECT_FINALIZE":
            raise MalformedMessage(f"unsupported storage notification {attributes['eventType']!r}")
        return _validate(ObjectFinalized, _json(data))
    kind = attributes.get("type")
    if kind not in EVENT_TYPES:
        raise MalformedMessage(f"unknown message type {kind!r}; known: {', '.join(EVENT_TYPES)}")
    version = attributes.get("schema_version", "")
    if not version.isdigit():
        raise MalformedMessage(f"{kind}: schema_version {version!r} is not a number")
    if int(version) > SCHEMA_VERSION:
        raise MalformedMessage(
            f"{kind}: schema_version {version} is newer than this service understands ({SCHEMA_VERSION}); upgrade the service")
    event = _validate(EVENT_TYPES[kind], _json(data))
    if attributes.get("event_id") not in (None, event.event_id):
        raise MalformedMessage(f"{kind}: attribute event_id {attributes['event_id']!r} does not match the body ({event.event_id!r})")
    return event


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"body is not valid JSON: {exc}") from exc


def _validate(model: type[BaseModel], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise MalformedMessage(f"{model.__name__}: body must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise MalformedMessage(f"{model.__name__}: invalid body: {problems}") from exc


def derive_run_id(*parts: object) -> str:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"run-{digest[:16]}"
