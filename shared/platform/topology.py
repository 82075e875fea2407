"""Which service consumes which topic and publishes which events: the tables that subscriptions,
dead-letter topics, the local stack, each service's publish guard and the Terraform check (its
subscriptions and IAM grants) are derived from."""
from __future__ import annotations

from typing import Mapping, cast

from shared.domain import events as ev
from shared.platform.ports import AttributeFilter, Bus, DocStore, ObjectStore, SubscriptionPolicy
from shared.platform.retrying import guarded
from shared.platform.scheduling import CLASSES, class_filter, class_subscription

SERVICE_TOPICS: dict[str, tuple[str, ...]] = {
    "preprocess": (ev.DATASET_UPLOADS, ev.JOBS),
    "trainer": (ev.DATASETS, ev.JOBS),
    "evaluator": (ev.TRAINING,),
    "registry": (ev.EVALUATIONS,),
    # every topic: the lineage, and the runtime's notices (a run's message dead-lettered)
    "tracker": (ev.JOBS, ev.DATASETS, ev.TRAINING, ev.EVALUATIONS, ev.MODELS, ev.NOTICES),
    # `ftpipe serve`: loads newly promoted versions, drops quarantined and archived ones
    "serving": (ev.MODELS,),
}

# The events each service publishes itself: its handlers' outputs, and those of the shared
# functions it calls (shared/domain/jobs.py submit, privacy.py approve / reject, model_registry.py's
# operations). tests/infra/test_terraform.py derives the same from the code and fails on any
# difference, and Terraform grants each service account publish on these events' topics only.
# Every consumer also publishes the runtime's MessageDeadLettered (on `notices`) and the dead
# letters of what it consumes (may_publish, dead_letter_topics): not listed here.
SERVICE_PUBLISHES: dict[str, tuple[type[ev.Event], ...]] = {
    "preprocess": (ev.JobSubmitted, ev.DatasetPrepared, ev.DatasetAwaitingReview, ev.DatasetRejected),
    "trainer": (ev.TrainingStarted, ev.TrainingProgress, ev.CheckpointSaved, ev.TrainingAlert, ev.TrainingCompleted,
                ev.TrainingFailed),
    "evaluator": (ev.EvaluationCompleted, ev.EvaluationErrored),
    "registry": (ev.ModelRegistered, ev.ModelApproved, ev.ModelPromoted, ev.ModelQuarantined, ev.ModelArchived),
    # the API: submit, privacy sign-off, the registry's operations (the dashboard's writes)
    "tracker": (ev.JobSubmitted, ev.DatasetPrepared, ev.DatasetRejected, ev.ModelRegistered, ev.ModelApproved,
                ev.ModelPromoted, ev.ModelQuarantined, ev.ModelArchived, ev.TrainingCompleted),
    "serving": (),
}

# Services that only read the document database (serving: the registry's documents). Their IAM
# grant on it is read-only (datastore.viewer), so the runtime's processed-message ledger, their only
# write, is a database of their own (ledger_database_for; Settings.ledger_database overrides it),
# on which they are datastore.user. Their docs are read-only in the code too (reading_only).
DOCS_READERS: tuple[str, ...] = ("serving",)

# Services that only read the bucket (serving: adapter files through their bundle): storage.objectViewer
# where the others are objectUser (infra/terraform/iam.tf), and a read-only store in the code.
STORE_READERS: tuple[str, ...] = ("serving",)

# Services whose workers take the highest priority class first (shared/platform/scheduling.py): one
# subscription per class on each of their topics, filtered on the `priority` attribute.
PRIORITIZED: tuple[str, ...] = ("trainer",)

# Dead-lettered messages are kept on one subscription per dead-letter topic, read by `ftpipe dlq`.
DLQ_SERVICE = "dlq"


def dlq_subscription(topic: str) -> str:
    return ev.subscription_name(DLQ_SERVICE, ev.dead_letter_topic(topic))


def priority_classes(service: str) -> tuple[str, ...]:
    """The classes, highest first, of a prioritized service; () for one that takes messages as they come."""
    return CLASSES if service in PRIORITIZED else ()


def subscriptions(service: str, topic: str) -> list[tuple[str, AttributeFilter | None]]:
    """The service's subscriptions on the topic, with their filters."""
    if service in PRIORITIZED:
        return [(class_subscription(service, topic, c), class_filter(c)) for c in CLASSES]
    return [(ev.subscription_name(service, topic), None)]


# The service that takes tenants' job doors (ev.JobRequested on job-requests.<tenant>).
DOOR_SERVICE = "preprocess"


def ensure_topology(bus: Bus, policy: SubscriptionPolicy, *, services: tuple[str, ...] | None = None,
                    doors: tuple[str, ...] = ()) -> None:
    """Create every topic, dead-letter topic and subscription (idempotent), and the job doors of the
    tenants in `doors` (Settings.job_doors)."""
    for tenant in doors:
        topic = ev.door_topic(tenant)
        bus.create_topic(topic)
        bus.create_topic(ev.dead_letter_topic(topic))
        bus.create_subscription(dlq_subscription(topic), ev.dead_letter_topic(topic),
                                SubscriptionPolicy(ack_deadline_s=60, max_delivery_attempts=100))
        if services is None or DOOR_SERVICE in services:
            bus.create_subscription(ev.subscription_name(DOOR_SERVICE, topic), topic, policy,
                                    dead_letter_topic=ev.dead_letter_topic(topic))
    for topic in ev.TOPICS:
        bus.create_topic(topic)
        bus.create_topic(ev.dead_letter_topic(topic))
        bus.create_subscription(dlq_subscription(topic), ev.dead_letter_topic(topic),
                                SubscriptionPolicy(ack_deadline_s=60, max_delivery_attempts=100))
    for service, topics in SERVICE_TOPICS.items():
        if services is not None and service not in services:
            continue
        for topic in topics:
            for subscription, attribute_filter in subscriptions(service, topic):
                bus.create_subscription(subscription, topic, policy, dead_letter_topic=ev.dead_letter_topic(topic),
                                        filter=attribute_filter)


def may_publish(service: str) -> tuple[type[ev.Event], ...]:
    """The event classes the service may publish: its own, and MessageDeadLettered if it consumes."""
    return SERVICE_PUBLISHES[service] + ((ev.MessageDeadLettered,) if SERVICE_TOPICS.get(service) else ())


def publish_topics(service: str) -> tuple[str, ...]:
    """The topics of the service's own events, in TOPICS order (its IAM publish grants, with the
    `notices` and dead-letter topics of a consumer)."""
    own = {cls.topic for cls in SERVICE_PUBLISHES[service]}
    return tuple(t for t in ev.TOPICS if t in own)


def dead_letter_topics(service: str) -> tuple[str, ...]:
    return tuple(ev.dead_letter_topic(t) for t in SERVICE_TOPICS.get(service, ()))


class UndeclaredPublish(PermissionError):
    """A service published what SERVICE_PUBLISHES does not let it: in the cloud its service account
    has no publish right there either."""


class DeclaredPublisher:
    """A service's bus that publishes only what the service may (may_publish: by topic and `type`
    attribute, and the raw messages of its dead letters); everything else is the inner bus's. The
    same rule as its IAM grants, checked wherever it runs, with a reason that says what to change."""

    def __init__(self, inner: Bus, service: str):
        if service not in SERVICE_PUBLISHES:
            raise ValueError(f"unknown service {service!r}: shared/platform/topology.py SERVICE_PUBLISHES "
                             f"names {', '.join(SERVICE_PUBLISHES)}")
        self._inner, self.service = inner, service
        self._allowed = {(cls.topic, cls.type) for cls in may_publish(service)}
        self._dead_letters = set(dead_letter_topics(service))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        kind = attributes.get("type")
        if topic not in self._dead_letters and (topic, kind) not in self._allowed:
            declared = ", ".join(f"{cls.__name__} on {cls.topic}" for cls in may_publish(self.service)) or "nothing"
            raise UndeclaredPublish(
                f"service {self.service!r} may not publish {kind or 'a message without a type'} on {topic!r}; "
                f"it may publish {declared} (shared/platform/topology.py SERVICE_PUBLISHES, and its IAM grants in "
                f"infra/terraform/iam.tf). Declare the event there if the service should publish it.")
        return self._inner.publish(topic, data, attributes)


def publishing_as(bus: Bus, service: str) -> Bus:
    """`bus` behind the service's DeclaredPublisher (typed as the Bus it stands in for)."""
    return cast(Bus, DeclaredPublisher(bus, service))


def ledger_database_for(service: str) -> str:
    """The document database of a DOCS_READERS service's ledger (a Firestore database id; locally
    <state>/<id>.db), unless Settings.ledger_database names another."""
    return f"{service}-ledger"


class ReadOnly(PermissionError):
    """A DOCS_READERS / STORE_READERS service wrote where it only reads: in the cloud it has no right to."""


DOCS_WRITES = frozenset({"set", "merge", "create", "delete", "transaction"})
STORE_WRITES = frozenset({"write", "upload_file", "delete"})


def reading_only(docs: DocStore, service: str) -> DocStore:
    """`docs` with every write refused (ReadOnly), as the service's IAM grant on the database is."""
    def refuse(call: str, fn, *args, **kwargs):
        raise ReadOnly(f"service {service!r} only reads the document database (shared/platform/topology.py "
                       f"DOCS_READERS; its IAM role there is roles/datastore.viewer): {call}() refused. Its "
                       f"own writes go to its ledger's database (Adapters.ledger).")
    return guarded(docs, DOCS_WRITES, refuse)


def store_reading_only(store: ObjectStore, service: str) -> ObjectStore:
    """`store` with every write refused (ReadOnly), as the service's IAM grant on the bucket is."""
    def refuse(call: str, fn, *args, **kwargs):
        raise ReadOnly(f"service {service!r} only reads the bucket (shared/platform/topology.py STORE_READERS; its "
                       f"IAM role there is roles/storage.objectViewer): {call}() refused")
    return guarded(store, STORE_WRITES, refuse)
