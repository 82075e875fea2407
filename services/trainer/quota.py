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

Cost: each usage document also keeps the recipe's price per GPU-hour (hardware.gpu_price: the
recipe's `price_per_gpu_hour`, else GPU_TABLE's), so a month's spend is the sum of seconds / 3600 x
GPUs x price (documents written before prices were recorded count no cost). The quota refuses a
run when the month's spend plus the run's estimate (`estimated_cost`: the prepared dataset's
cost estimate, else the recipe's budget.max_cost, else nothing) would pass it. Only what has been
metered counts as spent: the rest of runs still training is not reserved.
"""
from __future__ import annotations

import calendar
import json
import logging
import threading
import time
import uuid

from shared.domain.tenants import TenantError, get_quota
from shared.platform.ports import DocStore, ObjectNotFound, ObjectStore

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


def usage(docs: DocStore, tenant: str, month: str) -> tuple[float, float]:
    """The tenant's (GPU-hours, USD) of the month, from its gpu_usage documents."""
    hours = cost = 0.0
    for _, doc in docs.query(GPU_USAGE, where=[("tenant", "==", tenant), ("month", "==", month)]):
        gpu_hours = sum(doc.get("seconds", {}).values()) * doc.get("gpus", 1) / 3600
        hours += gpu_hours
        cost += gpu_hours * (doc.get("price_per_gpu_hour") or 0.0)
    return hours, cost


def gpu_hours_used(docs: DocStore, tenant: str, month: str) -> float:
    return usage(docs, tenant, month)[0]


def cost_used(docs: DocStore, tenant: str, month: str) -> float:
    return usage(docs, tenant, month)[1]


def estimated_cost(store: ObjectStore, dataset_uri: str, recipe) -> tuple[float, str]:
    """(USD, where the figure comes from) that a run is expected to cost, for the cost quota: the
    estimate preprocess wrote into the prepared dataset's manifest.json, else the recipe's
    budget.max_cost, else 0 (nothing known: only the month's spend is checked)."""
    try:
        bucket, prefix = store.parse_url(dataset_uri)
        manifest = json.loads(store.read(bucket, f"{prefix.rstrip('/')}/manifest.json"))
        cost = (manifest.get("cost_estimate") or {}).get("cost")
    except (ObjectNotFound, ValueError, AttributeError):  # no readable manifest: the run's own checks say so later
        cost = None
    if isinstance(cost, (int, float)) and cost >= 0:
        return float(cost), "the dataset's cost estimate"
    if recipe.budget.max_cost is not None:
        return float(recipe.budget.max_cost), "the recipe's budget.max_cost"
    return 0.0, "no estimate"


def _live(lease: dict | None, now: float) -> bool:
    return bool(lease and lease.get("owner") and lease.get("expires_at", 0) > now)


def running_runs(docs: DocStore, tenant: str, now: float | None = None) -> list[str]:
    """The tenant's admitted runs whose lease is live (for `ftpipe tenants show`)."""
    now = time.time() if now is None else now
    runs = (docs.get(TENANT_RUNS, tenant) or {}).get("runs", {})
    return sorted(r for r in runs if _live(docs.get(LEASES, r), now))


def admit(docs: DocStore, tenant: str, run_id: str, gpus: int, now: float | None = None, *,
          estimate_usd: float = 0.0, estimate_from: str = "no estimate") -> None:
    """Admit the run or raise OverQuota (module docstring). `estimate_usd`: what the run is
    expected to cost (`estimated_cost`), `estimate_from` says where that figure comes from."""
    now = time.time() if now is None else now
    try:
        quota = get_quota(docs, tenant)
    except TenantError as exc:
        raise OverQuota(str(exc)) from exc
    month = month_of(now)
    limited = quota.gpu_hours_per_month is not None or quota.cost_usd_per_month is not None
    used, spent = usage(docs, tenant, month) if limited else (0.0, 0.0)

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
        cost_quota = quota.cost_usd_per_month
        if cost_quota is not None and (spent >= cost_quota or spent + estimate_usd > cost_quota):
            raise OverQuota(
                f"tenant {tenant!r} has spent ${spent:.2f} of its ${cost_quota:g} cost quota for {month} (UTC months) "
                f"and this run is estimated at ${estimate_usd:.2f} ({estimate_from}): ${spent + estimate_usd:.2f} "
                f"would pass it; the quota renews next month, or raise it with "
                f"`ftpipe tenants set {tenant} --cost-per-month USD` and submit the job again")
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

    def __init__(self, docs: DocStore, run_id: str, tenant: str, gpus: int, interval_s: float, *,
                 price_per_gpu_hour: float | None = None):
        self.docs, self.run_id, self.tenant, self.gpus, self.interval_s = docs, run_id, tenant, gpus, interval_s
        self.price_per_gpu_hour = price_per_gpu_hour   # USD (hardware.gpu_price); None: not costed
        self.attempt = uuid.uuid4().hex[:12]
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"usage-{run_id}")

    def record(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for month, seconds in split_by_month(self.started, now).items():
            self.docs.merge(GPU_USAGE, f"{self.run_id}:{month}",
                            {"tenant": self.tenant, "run_id": self.run_id, "month": month, "gpus": self.gpus,
                             "price_per_gpu_hour": self.price_per_gpu_hour,
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
