"""Run ownership: a heartbeat lease in the DocStore (DESIGN.md, "Delivery and idempotency").

At most one trainer works on a run at a time, whatever the bus redelivers: a delivery that finds a
live lease held by another worker is retried later; one that finds a stale lease (its owner died)
takes it over and resumes from the latest checkpoint. The lease lives in its own `leases`
collection rather than on the tracker's run document, so the heartbeat never contends with lineage
writes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

LEASES = "leases"


class LeaseHeld(Exception):
    def __init__(self, owner: str, expires_in: float):
        super().__init__(f"run is leased by {owner} for another {expires_in:.0f}s")
        self.owner, self.expires_in = owner, expires_in


class LeaseLost(Exception):
    pass


@dataclass
class Lease:
    docs: object
    run_id: str
    owner: str
    ttl_s: float

    def acquire(self) -> int:
        """Take the lease; returns how many owners held it before (0 for a fresh run)."""
        def take(txn):
            doc = txn.get(LEASES, self.run_id) or {}
            now = time.time()
            if doc.get("owner") not in (None, self.owner) and doc.get("expires_at", 0) > now:
                raise LeaseHeld(doc["owner"], doc["expires_at"] - now)
            takeovers = doc.get("takeovers", 0) + (1 if doc.get("owner") not in (None, self.owner) else 0)
            txn.set(LEASES, self.run_id, {"owner": self.owner, "expires_at": now + self.ttl_s,
                                          "takeovers": takeovers, "acquired_at": now})
            return takeovers
        return self.docs.transaction(take)

    def renew(self) -> None:
        def extend(txn):
            doc = txn.get(LEASES, self.run_id) or {}
            if doc.get("owner") != self.owner:
                raise LeaseLost(f"lease on {self.run_id} was taken over by {doc.get('owner')}")
            txn.set(LEASES, self.run_id, {**doc, "expires_at": time.time() + self.ttl_s})
        self.docs.transaction(extend)

    def release(self) -> None:
        def drop(txn):
            doc = txn.get(LEASES, self.run_id) or {}
            if doc.get("owner") == self.owner:
                txn.set(LEASES, self.run_id, {**doc, "owner": None, "expires_at": 0})
        self.docs.transaction(drop)


class Heartbeat:
    """Renews a lease every ttl/3 on a thread; `lost` is set if another worker took it over."""

    def __init__(self, lease: Lease):
        self.lease = lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{lease.run_id}")

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                self.lease.renew()
            except LeaseLost:
                self.lost.set()
                return
            except Exception:  # a transient store error: the next beat tries again before expiry
                continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
