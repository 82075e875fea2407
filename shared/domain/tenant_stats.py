"""Per-tenant run totals kept as runs change, so that `GET /api/tenants` reads one document per
tenant instead of every run.

`tenant_stats/{tenant}` holds what the tenant's runs add up to: jobs, jobs by status bucket
(succeeded, failed, cancelled, running; `queued` counts validating and queued runs), and the
GPU-hours and USD spent training (each run's `cost.gpu_hours` and `cost.so_far_usd`, as the
tracker folds them), in millionths (`gpu_hours_e6`, `cost_usd_e6`: integers, so that adding and
taking away a run's figures leaves no rounding behind and the totals equal a recount exactly).

Every write of a run document that can change these goes through `apply_change` in the same
transaction: the lineage writer (services/tracker/lineage.py, once per event: a redelivered event
is skipped there before it gets here), `jobs.cancel` and `jobs.mark_replayed`. It takes the run's
old contribution away from its old tenant's document and adds the new one to its new tenant's
(a run's tenant can change once: events that arrive before JobSubmitted count it under
`default`). `rebuild` recounts every document from the runs (`ftpipe tenants reindex`).
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from shared.domain.jobs import RUNS, TERMINAL
from shared.platform.ports import DocStore, Transaction

TENANT_STATS = "tenant_stats"
COUNTS = ("jobs", "succeeded", "failed", "cancelled", "running", "queued", "gpu_hours_e6", "cost_usd_e6")


def contribution(run: dict | None) -> tuple[str, Counter]:
    """(tenant, what the run adds to its totals); a missing run adds nothing."""
    if run is None:
        return "default", Counter()
    status = run.get("status")
    cost = run.get("cost") or {}
    return run.get("tenant") or "default", Counter({
        "jobs": 1, (status if status in TERMINAL or status == "running" else "queued"): 1,
        "gpu_hours_e6": _micro(cost.get("gpu_hours")), "cost_usd_e6": _micro(cost.get("so_far_usd"))})


def _micro(value) -> int:
    return round(float(value) * 1_000_000) if isinstance(value, (int, float)) else 0


def totals(runs: Iterable[dict]) -> dict[str, Counter]:
    """Per tenant, the sum of its runs' contributions (a recount)."""
    out: dict[str, Counter] = {}
    for run in runs:
        tenant, adds = contribution(run)
        out.setdefault(tenant, Counter()).update(adds)
    return out


def apply_change(txn: Transaction, before: dict | None, after: dict | None) -> None:
    """Move a run's contribution from `before` (None: a new run) to `after` (module docstring).
    Writes only the documents whose totals change; a tenant left with no jobs loses its document."""
    (old_tenant, old), (new_tenant, new) = contribution(before), contribution(after)
    deltas: dict[str, Counter] = {}
    deltas.setdefault(old_tenant, Counter()).subtract(old)
    deltas.setdefault(new_tenant, Counter()).update(new)
    for tenant, delta in deltas.items():
        if not any(delta.values()):
            continue
        doc = txn.get(TENANT_STATS, tenant) or {}
        counts = {k: int(doc.get(k, 0)) + delta.get(k, 0) for k in COUNTS}
        if counts["jobs"] <= 0:
            txn.delete(TENANT_STATS, tenant)
        else:
            txn.set(TENANT_STATS, tenant, {"tenant": tenant, **counts, "updated_at": time.time()})


def rebuild(docs: DocStore) -> dict:
    """Recount every tenant's document from the runs, and drop the documents of tenants without
    runs. Not one transaction with the lineage writer: an event folded while it runs may be
    counted twice or not at all, so run it when the tracker is quiet (or run it again)."""
    counted = totals(doc for _, doc in docs.query(RUNS))
    now = time.time()
    for tenant, counts in counted.items():
        docs.set(TENANT_STATS, tenant, {"tenant": tenant, **{k: counts.get(k, 0) for k in COUNTS}, "updated_at": now})
    stale = [tenant for tenant, _ in docs.query(TENANT_STATS) if tenant not in counted]
    for tenant in stale:
        docs.delete(TENANT_STATS, tenant)
    return {"tenants": len(counted), "runs": sum(c["jobs"] for c in counted.values()), "removed": stale}
