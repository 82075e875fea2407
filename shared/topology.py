"""Which service consumes which topic: the one table that subscriptions, dead-letter topics, the
local stack and the Terraform check are derived from."""
from __future__ import annotations

from shared import events as ev
from shared.ports import Bus, SubscriptionPolicy

SERVICE_TOPICS: dict[str, tuple[str, ...]] = {
    "preprocess": (ev.DATASET_UPLOADS, ev.JOBS),
    "trainer": (ev.DATASETS, ev.JOBS),
    "evaluator": (ev.TRAINING,),
    "registry": (ev.EVALUATIONS,),
    "tracker": (ev.JOBS, ev.DATASETS, ev.TRAINING, ev.EVALUATIONS, ev.MODELS),
}

# Dead-lettered messages are kept on one subscription per dead-letter topic, read by `ftpipe dlq`.
DLQ_SERVICE = "dlq"


def dlq_subscription(topic: str) -> str:
    return ev.subscription_name(DLQ_SERVICE, ev.dead_letter_topic(topic))


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
            bus.create_subscription(ev.subscription_name(service, topic), topic, policy,
                                    dead_letter_topic=ev.dead_letter_topic(topic))
