"""tenant_stats (shared/domain/tenant_stats.py): kept by the lineage writer, cancel and dead-letter
replay in their transactions, it always equals a recount over the runs, whatever order and how
many times the bus delivers the events; `ftpipe tenants reindex` restores a damaged document."""
import random

import pytest

from ftpipe.cli import main
from shared.domain import events as ev
from shared.domain.jobs import RUNS, JobError, cancel, mark_replayed
from shared.domain.recipe import Recipe
from shared.domain.tenant_stats import COUNTS, TENANT_STATS, rebuild, totals
from shared.platform.adapters.sqlite_docs import SqliteDocStore
from tests.unit.governance import ADMIN

from services.tracker import aggregates
from services.tracker.lineage import record

RECIPE = Recipe(name="t", version=1, base_model="tiny-random-smollm2", model_name="t")
TENANTS = ("acme", "lawyers", "default", "zeta")


def run_events(rng: random.Random, run_id: str) -> list[ev.Event]:
    """One run's events as the services publish them, ending at random, with random costs."""
    tenant, data, adapter = rng.choice(TENANTS), f"file:///b/datasets/ds-{run_id}/", f"file:///b/runs/{run_id}/a/"
    events: list[ev.Event] = [
        ev.JobSubmitted(run_id=run_id, recipe=RECIPE, dataset_uri=f"file:///b/incoming/t/{run_id}", tenant=tenant),
        ev.DatasetPrepared(run_id=run_id, recipe=RECIPE, dataset_id=f"ds-{run_id}", dataset_uri=data, tenant=tenant,
                           counts={"train": 8}, cost_estimate={"cost": rng.choice([0.05, 1.25]), "gpu_hours": 0.06}),
        ev.TrainingStarted(run_id=run_id, dataset_uri=data),
    ]
    cost = 0.0
    for first in range(1, rng.randint(1, 4) * 3, 3):
        steps = []
        for step in range(first, first + 3):
            cost += rng.choice([0.0123457, 0.01, 0.333333])
            steps.append(ev.StepMetrics(step=step, loss=1.0, cost=round(cost, 7)))
        events.append(ev.TrainingProgress(run_id=run_id, total_steps=12, metrics=steps))
    end = rng.choice(["running", "failed", "cancelled", "succeeded", "dead"])
    if end == "failed":
        events.append(ev.TrainingFailed(run_id=run_id, reason="diverged", step=3))
    elif end == "cancelled":
        events.append(ev.TrainingFailed(run_id=run_id, reason="cancelled by request", cancelled=True))
    elif end == "dead":
        events.append(ev.MessageDeadLettered(run_id=run_id, message_id=f"m-{run_id}", message_type="TrainingStarted",
                                             source_topic=ev.TRAINING, subscription="evaluator.training",
                                             reason="handler failed"))
    elif end == "succeeded":
        events += [
            ev.TrainingCompleted(run_id=run_id, recipe=RECIPE, dataset_uri=data, adapter_uri=adapter,
                                 metrics={"cost": round(cost + 0.5, 7)}, steps=12),
            ev.EvaluationCompleted(run_id=run_id, recipe=RECIPE, dataset_uri=data, adapter_uri=adapter,
                                   scores={}, passed=True, reasons=[], report_uri="file:///r/"),
            ev.ModelRegistered(run_id=run_id, model_name="t", version="1.1", uri="file:///m/", status="promoted"),
        ]
    return events


def stats(docs) -> dict[str, dict]:
    return {tenant: {k: doc.get(k, 0) for k in COUNTS} for tenant, doc in docs.query(TENANT_STATS)}


def recount(docs) -> dict[str, dict]:
    return {tenant: {k: counts.get(k, 0) for k in COUNTS}
            for tenant, counts in totals(doc for _, doc in docs.query(RUNS)).items()}


@pytest.mark.parametrize("seed", range(6))
def test_tenant_stats_equal_a_recount_after_any_delivery_order(tmp_path, seed):
    rng = random.Random(seed)
    docs = SqliteDocStore(tmp_path / "docs.db")
    deliveries = [e for i in range(8) for e in run_events(rng, f"run-{seed}-{i}")]
    deliveries += rng.sample(deliveries, len(deliveries) // 3)    # redeliveries
    rng.shuffle(deliveries)                                         # in any order
    for n, event in enumerate(deliveries):
        record(docs, event)
        if rng.random() < 0.05:   # someone cancels a run, or replays a dead letter, in between
            try:
                cancel(docs, ADMIN, event.run_id)
            except JobError:
                pass
        if rng.random() < 0.1:
            mark_replayed(docs, event.run_id, f"m-{event.run_id}")
        if n % 10 == 0:
            assert stats(docs) == recount(docs)
    assert stats(docs) == recount(docs)
    assert sum(row["jobs"] for row in stats(docs).values()) == 8
    runs = [doc for _, doc in docs.query(RUNS)]
    assert aggregates.tenant_rows(doc for _, doc in docs.query(TENANT_STATS)) == aggregates.tenants(runs)


def test_a_run_counted_as_default_before_its_job_event_moves_to_its_tenant(tmp_path):
    docs = SqliteDocStore(tmp_path / "docs.db")
    record(docs, ev.TrainingStarted(run_id="r", dataset_uri="file:///d/"))
    assert stats(docs) == {"default": {**dict.fromkeys(COUNTS, 0), "jobs": 1, "running": 1}}
    record(docs, ev.JobSubmitted(run_id="r", recipe=RECIPE, dataset_uri="file:///in", tenant="acme"))
    assert stats(docs) == {"acme": {**dict.fromkeys(COUNTS, 0), "jobs": 1, "running": 1}}   # default's is gone


def test_reindex_restores_a_damaged_document_and_drops_a_stray_one(tmp_path, capsys):
    from shared.platform.config import Settings, bootstrap

    adapters = bootstrap(Settings(state_dir=tmp_path))
    docs = adapters.docs
    try:
        rng = random.Random(42)
        for i in range(4):
            for event in run_events(rng, f"run-{i}"):
                record(docs, event)
        good = stats(docs)
        victim = next(iter(good))
        docs.set(TENANT_STATS, victim, {"tenant": victim, "jobs": 99, "failed": -3, "cost_usd_e6": 1})
        docs.set(TENANT_STATS, "ghost", {"tenant": "ghost", "jobs": 2, "queued": 2})
        assert stats(docs) != good
        assert main(["tenants", "reindex", "--state", str(tmp_path)]) == 0
        assert "4 runs" in capsys.readouterr().err
        assert stats(docs) == good == recount(docs)
        assert rebuild(docs) == {"tenants": len(good), "runs": 4, "removed": []}
    finally:
        adapters.close()
