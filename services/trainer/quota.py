"""Admitting a run against its tenant's quota (shared/domain/tenants.py), and metering its GPU-hours.

Concurrent jobs: `tenant_runs/{tenant}` lists the tenant's admitted runs. Admission is one DocStore
transaction: it drops the listed runs whose lease (lease.py) is no longer live — finished, or their
worker died — and refuses the run when as many as the limit remain; otherwise it adds the run and
records it in `admissions/{run_id}`. Two workers admitting runs of one tenant at once therefore
cannot both take its last slot. A run is admitted once: resuming after preemption or a takeover it
is not checked again (it was running before; failing it half-trained would waste that work).

GPU-hours: while a run holds its lease, UsageMeter writes the seconds of this attempt into
`gpu_usage/{run_id}:{YYYY-MM}` (one map entry per attempt, split at month boundaries, UTC) every
few seconds and at the end. The writes set values rather than add them, so they are idempotent; a
worker that dies loses at most one interval. A month's use is the sum over the tenant's documents
of seconds x the recipe's GPUs (hardware.total_gpus) / 3600; the quota refuses new runs once it is
used up (a running run is not stopped: budget.max_cost bounds one run).
"""
from __future__ import annotations

import calendar
import logging
import threading
import time
import uuid

from shared.domain.tenants import TenantError, get_quota
from shared.platform.ports import DocStore

from services.trainer.lease import LEASES

log = logging.getLogger("ftpipe.trainer")

TENANT_RUNS = "tenant_runs"
ADMISSIONS = "admissions"
GPU_USAGE = "gpu_usage"


class OverQuota(Exception):
    """The run may not start; the message says which quota, the figures, and how to raise it."""


def month_of(ts: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(ts))


def _next_month(ts: float) -> float:
    t = time.gmtime(ts)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def split_by_month(start: float, end: float) -> dict[str, float]:
    """Seconds of [start, end) in each calendar month (UTC) it touches."""
    out = {month_of(start): 0.0}
    t = start
    while t < end:
        boundary = min(end, _next_month(t))
        out[month_of(t)] = out.get(month_of(t), 0.0) + boundary - t
        t = boundary
    return out


def gpu_hours_used(docs: DocStore, tenant: str, month: str) -> float:
    rows = docs.query(GPU_USAGE, where=[("tenant", "==", tenant), ("month", "==", month)])
    return sum(sum(doc.get("seconds", {}).values()) * doc.get("gpus", 1) for _, doc in rows) / 3600


def _live(lease: dict | None, now: float) -> bool:
    return bool(lease and lease.get("owner") and lease.get("expires_at", 0) > now)


def running_runs(docs: DocStore, tenant: str, now: float | None = None) -> list[str]:
    """The tenant's admitted runs whose lease is live (for `ftpipe tenants show`)."""
    now = time.time() if now is None else now
    runs = (docs.get(TENANT_RUNS, tenant) or {}).get("runs", {})
    return sorted(r for r in runs if _live(docs.get(LEASES, r), now))


def admit(docs: DocStore, tenant: str, run_id: str, gpus: int, now: float | None = None) -> None:
    """Admit the run or raise OverQuota (module docstring)."""
    now = time.time() if now is None else now
    try:
        quota = get_quota(docs, tenant)
    except TenantError as exc:
        raise OverQuota(str(exc)) from exc
    month = month_of(now)
    used = gpu_hours_used(docs, tenant, month) if quota.gpu_hours_per_month is not None else 0.0

    def check_and_take(txn) -> None:
        if txn.get(ADMISSIONS, run_id) is not None:
            return  # admitted before: resuming
        runs = (txn.get(TENANT_RUNS, tenant) or {}).get("runs", {})
        live = {r: at for r, at in runs.items() if _live(txn.get(LEASES, r), now)}
        if quota.gpu_hours_per_month is not None and used >= quota.gpu_hours_per_month:
            raise OverQuota(
                f"tenant {tenant!r} has used {used:.2f} of its {quota.gpu_hours_per_month:g} GPU-hours for {month} "
                f"(UTC months); the quota renews next month, or raise it with "
                f"`ftpipe tenants set {tenant} --gpu-hours-per-month H` and submit the job again")
        if quota.max_concurrent_jobs is not None and len(live) >= quota.max_concurrent_jobs:
            raise OverQuota(
                f"tenant {tenant!r} already has {len(live)} of its {quota.max_concurrent_jobs} concurrent training "
                f"jobs running ({', '.join(sorted(live)[:5])}); submit the job again when one ends, or raise the "
                f"quota with `ftpipe tenants set {tenant} --max-concurrent N`")
        txn.set(TENANT_RUNS, tenant, {"runs": {**live, run_id: now}})
        txn.set(ADMISSIONS, run_id, {"tenant": tenant, "gpus": gpus, "admitted_at": now})

    docs.transaction(check_and_take)


class UsageMeter:
    """Records the GPU time of one attempt at a run (module docstring) every `interval_s` on a
    thread, and once more at the end of the block."""

    def __init__(self, docs: DocStore, run_id: str, tenant: str, gpus: int, interval_s: float):
        self.docs, self.run_id, self.tenant, self.gpus, self.interval_s = docs, run_id, tenant, gpus, interval_s
        self.attempt = uuid.uuid4().hex[:12]
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"usage-{run_id}")

    def record(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for month, seconds in split_by_month(self.started, now).items():
            self.docs.merge(GPU_USAGE, f"{self.run_id}:{month}",
                            {"tenant": self.tenant, "run_id": self.run_id, "month": month, "gpus": self.gpus,
                             "seconds": {self.attempt: round(seconds, 3)}})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.record()
            except Exception:  # a transient store error: the next interval writes the total again
                continue

    def __enter__(self):
        self.started = time.time()
        self.record()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        try:
            self.record()
        except Exception:  # the run's outcome stands; this attempt's last interval goes unrecorded
            log.warning("could not record the GPU time of %s", self.run_id, exc_info=True)
