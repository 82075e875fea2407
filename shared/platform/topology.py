"""Which service consumes which topic: the one table that subscriptions, dead-letter topics, the
local stack and the Terraform check are derived from."""
from __future__ import annotations

from shared.domain import events as ev
from shared.platform.ports import AttributeFilter, Bus, SubscriptionPolicy
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


def ensure_topology(bus: Bus, policy: SubscriptionPolicy, *, services: tuple[str, ...] | None = None) -> None:
    """Create every topic, dead-letter topic and subscription (idempotent)."""
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
