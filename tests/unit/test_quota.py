"""Tenant quotas: admission (services/trainer/quota.py) on the real local document store, the
trainer ending an over-quota run as failed, and `ftpipe tenants`."""
import calendar
import json
import time

import pytest

from ftpipe.cli import main
from shared.domain import events as ev
from shared.domain.recipe import load_recipe
from shared.domain.tenants import get_quota, set_quota
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import handle_message, publish_event
from shared.platform.scheduling import class_subscription
from tests.unit.governance import ADMIN

from services.tracker.service import SERVICE as TRACKER
from services.trainer.lease import Lease
from services.trainer.quota import (
    GPU_USAGE,
    OverQuota,
    UsageMeter,
    admit,
    cost_used,
    estimated_cost,
    gpu_hours_used,
    month_of,
    running_runs,
    split_by_month,
)
from services.trainer.service import SERVICE as TRAINER


@pytest.fixture
def adapters(tmp_path):
    a = bootstrap(Settings(state_dir=tmp_path))
    yield a
    a.close()


def leased(docs, run_id: str) -> Lease:
    lease = Lease(docs, run_id, f"worker-{run_id}", ttl_s=60)
    lease.acquire()
    return lease


def test_no_quota_document_is_unlimited(adapters):
    docs = adapters.docs
    for i in range(5):
        leased(docs, f"run-{i}")
        admit(docs, "acme", f"run-{i}", gpus=8)
    assert running_runs(docs, "acme") == [f"run-{i}" for i in range(5)]


def test_concurrent_jobs_are_counted_from_live_leases(adapters):
    docs = adapters.docs
    set_quota(docs, ADMIN, "acme", max_concurrent_jobs=1)
    first = leased(docs, "run-a")
    admit(docs, "acme", "run-a", gpus=1)
    leased(docs, "run-b")
    with pytest.raises(OverQuota) as refused:
        admit(docs, "acme", "run-b", gpus=1)
    message = str(refused.value)
    assert "tenant 'acme' already has 1 of its 1 concurrent training jobs running (run-a)" in message
    assert "ftpipe tenants set acme --max-concurrent N" in message
    admit(docs, "other", "run-o", gpus=1)  # another tenant is not affected

    first.release()  # run-a ended: its slot is free
    admit(docs, "acme", "run-b", gpus=1)
    assert running_runs(docs, "acme") == ["run-b"]
    # run-a comes back (preempted, redelivered): admitted before, so it is not refused half-trained
    leased(docs, "run-a")
    admit(docs, "acme", "run-a", gpus=1)


def test_a_dead_workers_lease_frees_its_slot(adapters):
    docs = adapters.docs
    set_quota(docs, ADMIN, "acme", max_concurrent_jobs=1)
    Lease(docs, "run-a", "dead-worker", ttl_s=-1).acquire()  # its heartbeat stopped: expired
    admit(docs, "acme", "run-a", gpus=1)
    leased(docs, "run-b")
    admit(docs, "acme", "run-b", gpus=1)
    assert running_runs(docs, "acme") == ["run-b"]


def test_gpu_hours_are_recorded_per_attempt_idempotently_and_limit_new_runs(adapters):
    docs = adapters.docs
    t0 = calendar.timegm((2030, 5, 10, 12, 0, 0))
    first = UsageMeter(docs, "run-a", "acme", gpus=4, interval_s=60)
    first.started = t0
    first.record(now=t0 + 1800)
    first.record(now=t0 + 1800)  # written again, not added
    assert gpu_hours_used(docs, "acme", "2030-05") == pytest.approx(2.0)   # 0.5 h x 4 GPUs
    second = UsageMeter(docs, "run-a", "acme", gpus=4, interval_s=60)   # the run resumed on another worker
    second.started = t0 + 3600
    second.record(now=t0 + 3600 + 900)
    assert gpu_hours_used(docs, "acme", "2030-05") == pytest.approx(3.0)
    assert gpu_hours_used(docs, "acme", "2030-06") == 0 and gpu_hours_used(docs, "other", "2030-05") == 0

    set_quota(docs, ADMIN, "acme", gpu_hours_per_month=3)
    with pytest.raises(OverQuota, match=r"tenant 'acme' has used 3.00 of its 3 GPU-hours for 2030-05 .*"
                                        r"ftpipe tenants set acme --gpu-hours-per-month H"):
        admit(docs, "acme", "run-b", gpus=1, now=t0 + 7200)
    admit(docs, "acme", "run-b", gpus=1, now=calendar.timegm((2030, 6, 1, 0, 0, 0)))  # a new month


MAY = calendar.timegm((2030, 5, 10, 12, 0, 0))


def meter(docs, run_id: str, *, gpus: int, price: float, start: float, hours: float, tenant: str = "acme") -> None:
    usage = UsageMeter(docs, run_id, tenant, gpus=gpus, interval_s=60, price_per_gpu_hour=price)
    usage.started = start
    usage.record(now=start + hours * 3600)


def test_the_cost_quota_refuses_a_run_whose_estimate_would_pass_it_with_the_figures(adapters):
    docs = adapters.docs
    meter(docs, "run-a", gpus=2, price=3.0, start=MAY, hours=1)            # 2 GPU-hours x $3 = $6
    set_quota(docs, ADMIN, "acme", cost_usd_per_month=10)
    leased(docs, "run-b")
    with pytest.raises(OverQuota) as refused:
        admit(docs, "acme", "run-b", gpus=1, now=MAY + 7200, estimate_usd=5.0,
              estimate_from="the dataset's cost estimate")
    message = str(refused.value)
    assert ("tenant 'acme' has spent $6.00 of its $10 cost quota for 2030-05 (UTC months) and this run is "
            "estimated at $5.00 (the dataset's cost estimate): $11.00 would pass it") in message
    assert "`ftpipe tenants set acme --cost-per-month USD`" in message
    assert running_runs(docs, "acme") == []                                # nothing taken
    # Spent in full, even a run with no estimate is refused; another tenant is not affected.
    meter(docs, "run-c", gpus=1, price=4.0, start=MAY, hours=1)
    with pytest.raises(OverQuota, match=r"has spent \$10.00 of its \$10 cost quota"):
        admit(docs, "acme", "run-b", gpus=1, now=MAY + 7200)
    admit(docs, "other", "run-o", gpus=1, now=MAY + 7200, estimate_usd=1000.0)


def test_under_the_cost_quota_a_run_is_admitted(adapters):
    docs = adapters.docs
    meter(docs, "run-a", gpus=2, price=3.0, start=MAY, hours=1)
    set_quota(docs, ADMIN, "acme", cost_usd_per_month=10, gpu_hours_per_month=100)
    leased(docs, "run-b")
    admit(docs, "acme", "run-b", gpus=1, now=MAY + 7200, estimate_usd=4.0)   # $6 + $4: just at the quota
    assert running_runs(docs, "acme") == ["run-b"]
    set_quota(docs, ADMIN, "acme", cost_usd_per_month=None)                       # unlimited again
    leased(docs, "run-c")
    admit(docs, "acme", "run-c", gpus=1, now=MAY + 7200, estimate_usd=1e6)


def test_the_cost_of_two_runs_adds_up_at_each_runs_price(adapters):
    docs = adapters.docs
    meter(docs, "run-l4", gpus=1, price=0.85, start=MAY, hours=2)           # $1.70
    meter(docs, "run-h100", gpus=8, price=11.0, start=MAY, hours=0.5)       # 4 GPU-hours: $44
    resumed = UsageMeter(docs, "run-l4", "acme", gpus=1, interval_s=60, price_per_gpu_hour=0.85)
    resumed.started = MAY + 3 * 3600                                        # its second attempt: 1 h more
    resumed.record(now=MAY + 4 * 3600)
    meter(docs, "run-x", gpus=1, price=100.0, start=MAY, hours=1, tenant="other")
    assert cost_used(docs, "acme", "2030-05") == pytest.approx(1.70 + 44 + 0.85)
    assert gpu_hours_used(docs, "acme", "2030-05") == pytest.approx(2 + 4 + 1)
    docs.merge(GPU_USAGE, "run-old:2030-05", {"tenant": "acme", "run_id": "run-old", "month": "2030-05", "gpus": 1,
                                              "seconds": {"x": 3600}})      # written before prices: no cost
    assert cost_used(docs, "acme", "2030-05") == pytest.approx(1.70 + 44 + 0.85)


def test_cost_is_split_at_the_month_boundary_and_a_new_month_starts_from_nothing(adapters):
    docs = adapters.docs
    june = calendar.timegm((2030, 6, 1, 0, 0, 0))
    meter(docs, "run-a", gpus=2, price=5.0, start=june - 3600, hours=3)      # 1 h in May, 2 h in June
    assert cost_used(docs, "acme", "2030-05") == pytest.approx(10.0)
    assert cost_used(docs, "acme", "2030-06") == pytest.approx(20.0)
    set_quota(docs, ADMIN, "acme", cost_usd_per_month=25)
    leased(docs, "run-b")
    with pytest.raises(OverQuota, match="for 2030-06"):
        admit(docs, "acme", "run-b", gpus=1, now=june + 3 * 3600, estimate_usd=6.0)
    admit(docs, "acme", "run-b", gpus=1, now=calendar.timegm((2030, 7, 1, 0, 0, 1)), estimate_usd=6.0)


def test_a_runs_estimate_is_the_datasets_else_its_budget(adapters):
    store, bucket = adapters.store, adapters.settings.bucket
    recipe = load_recipe("tiny-sft")
    dataset = store.url(bucket, "datasets/d/")
    assert estimated_cost(store, dataset, recipe) == (0.0, "no estimate")
    budgeted = recipe.model_copy(update={"budget": recipe.budget.model_copy(update={"max_cost": 7.5})})
    assert estimated_cost(store, dataset, budgeted) == (7.5, "the recipe's budget.max_cost")
    store.write(bucket, "datasets/d/manifest.json", json.dumps({"cost_estimate": {"cost": 2.25}}).encode())
    assert estimated_cost(store, dataset, budgeted) == (2.25, "the dataset's cost estimate")


def test_the_meter_records_while_the_run_holds_its_gpus(adapters):
    with UsageMeter(adapters.docs, "run-m", "acme", gpus=2, interval_s=0.05) as meter:
        pass
    [(doc_id, doc)] = adapters.docs.query(GPU_USAGE)
    assert doc_id == f"run-m:{month_of(meter.started)}"
    assert doc["tenant"] == "acme" and doc["gpus"] == 2 and list(doc["seconds"]) == [meter.attempt]


def test_time_is_split_at_month_boundaries_utc():
    new_year = calendar.timegm((2031, 1, 1, 0, 0, 0))
    assert split_by_month(new_year - 3600, new_year + 7200) == {"2030-12": 3600, "2031-01": 7200}
    assert split_by_month(new_year, new_year) == {"2031-01": 0.0}


def test_a_job_over_quota_ends_its_run_as_failed_with_the_reason(adapters):
    docs, store, bucket = adapters.docs, adapters.store, adapters.settings.bucket
    set_quota(docs, ADMIN, "acme", max_concurrent_jobs=1)
    leased(docs, "run-busy")
    admit(docs, "acme", "run-busy", gpus=1)
    job = ev.JobSubmitted(run_id="run-q", recipe=load_recipe("tiny-sft"), dataset_uri=store.url(bucket, "datasets/d/"),
                          prepared=True, tenant="acme")
    publish_event(adapters.bus, job)

    [msg] = adapters.bus.pull(class_subscription("trainer", ev.JOBS, job.recipe.scheduling.priority), timeout_s=5)
    assert handle_message(TRAINER, adapters, ev.JOBS, msg) == "acked"
    for topic in (ev.JOBS, ev.TRAINING):  # the tracker records what was published
        for m in adapters.bus.pull(ev.subscription_name("tracker", topic), max_messages=10, timeout_s=2):
            handle_message(TRACKER, adapters, topic, m)

    run = docs.get("runs", "run-q")
    assert run["status"] == "failed"
    assert run["error"].startswith("over quota: tenant 'acme' already has 1 of its 1 concurrent training jobs")
    assert "--max-concurrent" in run["error"]
    assert "training" not in run                                   # never started
    assert list(store.list(bucket, "runs/run-q/")) == []           # nothing partial
    assert docs.query(GPU_USAGE) == []


def test_a_job_over_the_cost_quota_fails_with_the_datasets_estimate(adapters):
    docs, store, bucket = adapters.docs, adapters.store, adapters.settings.bucket
    set_quota(docs, ADMIN, "acme", cost_usd_per_month=1)
    store.write(bucket, "datasets/d/manifest.json", json.dumps({"cost_estimate": {"cost": 3.5}}).encode())
    job = ev.JobSubmitted(run_id="run-q", recipe=load_recipe("tiny-sft"), dataset_uri=store.url(bucket, "datasets/d/"),
                          prepared=True, tenant="acme")
    publish_event(adapters.bus, job)
    [msg] = adapters.bus.pull(class_subscription("trainer", ev.JOBS, job.recipe.scheduling.priority), timeout_s=5)
    assert handle_message(TRAINER, adapters, ev.JOBS, msg) == "acked"
    for topic in (ev.JOBS, ev.TRAINING):
        for m in adapters.bus.pull(ev.subscription_name("tracker", topic), max_messages=10, timeout_s=2):
            handle_message(TRACKER, adapters, topic, m)
    run = docs.get("runs", "run-q")
    assert run["status"] == "failed"
    assert run["error"].startswith("over quota: tenant 'acme' has spent $0.00 of its $1 cost quota")
    assert "estimated at $3.50 (the dataset's cost estimate)" in run["error"] and "--cost-per-month" in run["error"]
    assert docs.query(GPU_USAGE) == []


def test_the_trainers_meter_records_the_recipes_gpu_price(adapters):
    docs, store, bucket = adapters.docs, adapters.store, adapters.settings.bucket
    recipe = load_recipe("tiny-sft")
    job = ev.JobSubmitted(run_id="run-p", recipe=recipe, dataset_uri=store.url(bucket, "datasets/none/"),
                          prepared=True, tenant="acme")
    publish_event(adapters.bus, job)
    [msg] = adapters.bus.pull(class_subscription("trainer", ev.JOBS, recipe.scheduling.priority), timeout_s=5)
    assert handle_message(TRAINER, adapters, ev.JOBS, msg) == "acked"   # admitted; fails on its missing files
    [(_, usage)] = docs.query(GPU_USAGE)
    assert usage["price_per_gpu_hour"] == recipe.hardware.gpu_price == 0.85 and usage["tenant"] == "acme"


def test_cli_tenants_set_show_list(adapters, tmp_path, capsys):
    state = ["--state", str(tmp_path)]
    assert main(["tenants", "list", *state]) == 0
    assert "every tenant is unlimited" in capsys.readouterr().err
    assert main(["tenants", "set", "acme", "--max-concurrent", "2", "--gpu-hours-per-month", "100", *state]) == 0
    assert main(["tenants", "set", "acme", "--gpu-hours-per-month", "unlimited", *state]) == 0
    capsys.readouterr()
    assert get_quota(adapters.docs, "acme").describe() == {"max_concurrent_jobs": 2, "gpu_hours_per_month": None,
                                                           "cost_usd_per_month": None}
    leased(adapters.docs, "run-a")
    admit(adapters.docs, "acme", "run-a", gpus=1)
    assert main(["tenants", "show", "acme", "--json", *state]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["running"] == ["run-a"] and shown["max_concurrent_jobs"] == 2 and shown["gpu_hours_used"] >= 0
    assert main(["tenants", "list", *state]) == 0
    assert "acme" in capsys.readouterr().out


def test_cli_tenants_cost_quota_and_explicit_unlimited(adapters, tmp_path, capsys):
    state = ["--state", str(tmp_path)]
    assert main(["tenants", "set", "acme", "--cost-per-month", "250", "--max-concurrent", "3", *state]) == 0
    assert "cost 20" in capsys.readouterr().out and get_quota(adapters.docs, "acme").cost_usd_per_month == 250
    meter(adapters.docs, "run-a", gpus=60, price=1.0, start=time.time() - 60, hours=60 / 3600)   # this month: $1
    assert main(["tenants", "show", "acme", "--json", *state]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cost_usd_per_month"] == 250 and shown["cost_usd_used"] == pytest.approx(1.0, abs=0.01)
    assert main(["tenants", "show", "acme", *state]) == 0
    assert "/ $250" in capsys.readouterr().out
    # --unlimited lifts every limit and keeps the tenant listed, explicitly unlimited.
    assert main(["tenants", "set", "acme", "--unlimited", *state]) == 0
    assert get_quota(adapters.docs, "acme").describe() == {
        "max_concurrent_jobs": None, "gpu_hours_per_month": None, "cost_usd_per_month": None}
    capsys.readouterr()
    assert main(["tenants", "list", "--json", *state]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["tenant"] == "acme" and row["cost_usd_per_month"] is None
    assert main(["tenants", "list", *state]) == 0
    listed = capsys.readouterr().out
    assert "acme" in listed and "/ unlimited" in listed and "cost" in listed


@pytest.mark.parametrize("argv, message", [
    (["tenants", "set", "acme"], "needs --max-concurrent N, --gpu-hours-per-month H and/or --cost-per-month USD"),
    (["tenants", "set", "acme", "--cost-per-month", "-5"], "--cost-per-month '-5': give a number >= 0"),
    (["tenants", "set", "acme", "--unlimited", "--max-concurrent", "1"], "--unlimited lifts every limit"),
    (["tenants", "set", "acme", "--max-concurrent", "-1"], "--max-concurrent '-1': give a whole number >= 0"),
    (["tenants", "set", "acme", "--gpu-hours-per-month", "lots"], "--gpu-hours-per-month 'lots'"),
    (["tenants", "set", "acme", "--gpu-hours-per-month", "nan"], "--gpu-hours-per-month 'nan'"),
    (["tenants", "show"], "tenants show needs a TENANT name"),
    (["tenants", "set", "a/b", "--max-concurrent", "1"], "tenant 'a/b': use 1-63 letters"),
])
def test_cli_tenants_misuse_exits_2_with_what_to_fix(tmp_path, capsys, argv, message):
    assert main([*argv, "--state", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err.replace("\n", "")
