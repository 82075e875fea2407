"""What a subscriber receives: every message waiting on a subscription, decoded and acked."""
from shared.domain import events as ev


def drain(adapters, subscription: str) -> list:
    out = []
    while msgs := adapters.bus.pull(subscription, max_messages=50, timeout_s=0.3):
        for m in msgs:
            out.append(ev.decode(m.data, m.attributes))
            m.ack()
    return out
