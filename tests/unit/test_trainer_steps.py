"""The trainer's stages run alone: `_train_attempt`'s stages over one `_Attempt`
(services/trainer/training.py), `_lead`'s over one `_Run` and the `Plan` rank 0 broadcasts
(services/trainer/service.py)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")

from shared.domain import events as ev  # noqa: E402
from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402
from shared.platform.runtime import Context, Reject, Retry  # noqa: E402
from tests.unit.chats import order_chat, write_jsonl, write_prepared  # noqa: E402

from services.trainer import (  # noqa: E402
    distributed,
    service as trainer,  # noqa: E402
    training,
)
from services.trainer.lease import Lease  # noqa: E402
from services.trainer.monitor import Monitor  # noqa: E402


def _recipe(**overrides):
    return apply_overrides(load_recipe("tiny-sft"), overrides)


def _attempt(recipe, data_dir: Path, work_dir: Path, **kwargs) -> training._Attempt:
    return training._Attempt(recipe, data_dir, work_dir, distributed.World(), **kwargs)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """7 train chats (a ragged last step at the tiny recipe's batch), 2 for validation."""
    chats = [order_chat(i, follow_up=True) for i in range(10)]
    return write_prepared(tmp_path / "data", {"train": chats[:7], "val": chats[7:9], "test": chats[9:]})


# ------------------------------------------------------------------------------------ training stages

def test_the_data_stage_inserts_the_canaries_and_counts_them(data_dir, tmp_path):
    run = _attempt(_recipe(**{"eval.canaries.count": 2, "eval.canaries.repeats": 3}), data_dir, tmp_path / "w")
    training._load_data(run)
    assert len(run.train_rows) == 7 + 2 * 3 and len(run.val_rows) == 2
    stats = run.stats["load_data"]
    assert (stats["rows"], stats["canary_rows"], stats["val_rows"], stats["calls"]) == (7, 6, 2, 1)
    assert stats["seconds"] >= 0


@pytest.mark.parametrize(("rows_masked", "count", "inserted"), [(3, None, 4), (0, None, 0), (3, 0, 0), (0, 1, 1)])
def test_auto_canaries_follow_the_pii_report_in_the_trainer_and_the_evaluator(data_dir, tmp_path, rows_masked,
                                                                               count, inserted):
    """Unset eval.canaries.count: 4 canaries where the prepared data had PII masked, none where it had
    none; an explicit count wins either way. The evaluator's plan measures the very secrets inserted."""
    from services.evaluator import suites

    report = json.loads((data_dir / "pii_report.json").read_text())
    (data_dir / "pii_report.json").write_text(json.dumps({**report, "rows_masked": rows_masked}))
    recipe = _recipe(**({} if count is None else {"eval.canaries.count": count}))
    run = _attempt(recipe, data_dir, tmp_path / "w")
    training._load_data(run)
    repeats = recipe.eval.canaries.repeats
    canary_rows = [r for r in run.train_rows if r["id"].startswith("canary-")]
    assert len(canary_rows) == inserted * repeats and run.stats["load_data"]["canary_rows"] == inserted * repeats
    plan = suites.plan(recipe, data_dir, probes_path=None, labels=None, say=lambda _: None)
    assert sorted({r["messages"][1]["content"] for r in canary_rows}) == sorted(c.text for c in plan.canaries)
    assert len(plan.canaries) == inserted


def test_the_data_stage_rejects_an_empty_or_missing_split_with_the_same_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_jsonl(empty / "train.jsonl", [])
    with pytest.raises(training.TrainingError, match=r"the train split .*train.jsonl is empty; the preprocess "
                                                     r"stage kept no rows \(see its quality_report.json"):
        training._load_data(_attempt(_recipe(), empty, tmp_path / "w"))
    with pytest.raises(training.TrainingError, match=r"no train split at .*; data_dir must be a prepared dataset"):
        training._load_data(_attempt(_recipe(), tmp_path / "nowhere", tmp_path / "w"))


def test_the_watch_stage_alone_stops_on_a_non_finite_loss(data_dir, tmp_path):
    alerts = []
    run = _attempt(_recipe(), data_dir, tmp_path / "w", hooks=training._Hooks(on_alert=alerts.append))
    run.total_steps, run.state.global_step = 10, 3
    run.monitor = Monitor(run.recipe, run.total_steps)
    with pytest.raises(training.TrainingError, match="loss became nan at step 3"):
        training._watch(run, {"loss": float("nan")}, 1.0)
    assert [a.kind for a in alerts] == ["non_finite_loss"] and run.stats["watch"]["calls"] == 1


def test_the_model_stages_alone_plan_and_take_one_step(data_dir, tmp_path):
    rows = []
    run = _attempt(_recipe(**{"training.metrics_every": 1}), data_dir, tmp_path / "w",
                   hooks=training._Hooks(on_metrics=rows.extend))
    training._load_data(run)
    training._build_model(run)
    assert len(run.examples) == 7 and len(run.val_examples) == 2 and run.model is not None
    training._plan_steps(run)
    spec = run.spec
    assert run.steps_per_epoch == -(-7 // (spec.batch_size * spec.grad_accum))
    assert run.total_steps == spec.max_steps
    training._restore_or_start(run, None)
    assert run.state == training._State() and run.optimizer is not None and not run.stopped_early

    first = [run.examples[0], run.examples[1]]
    metrics, grad_norm = training._optimizer_step(run, first)
    assert metrics["step"] == run.state.global_step == 1 and metrics["total_steps"] == run.total_steps
    assert metrics["grad_norm"] == round(grad_norm, 6) and metrics["loss"] > 0
    assert run.state.tokens_seen == sum(run.objective.tokens(e) for e in first)
    training._record(run, metrics)
    assert rows == [metrics] and run.state.metrics == [metrics] and run.pending == []
    step = run.stats["optimizer_step"]
    assert (step["calls"], step["steps"], step["tokens"]) == (1, 1, run.state.tokens_seen)
    assert set(run.stats) == {"load_data", "build_model", "plan_steps", "restore_or_start", "optimizer_step",
                              "record"}


# ------------------------------------------------------------------------------------ the plan

def test_a_plan_round_trips_through_pickle():
    for plan in (trainer.Plan("train", resume="runs/r/checkpoints/step-000004"), trainer.Plan("done"),
                 trainer.Plan("retry", reason="lease held by w until 12:00")):
        assert pickle.loads(pickle.dumps(plan)) == plan
    with pytest.raises(AttributeError):
        trainer.Plan("done").action = "train"  # frozen: what rank 0 said stays said


class _World:
    """A rank's view of World.broadcast: the plans it hears (as a follower) or tells (as rank 0)."""

    def __init__(self, *heard: trainer.Plan):
        self.heard, self.told = list(heard), []

    def broadcast(self, obj):
        if obj is None:
            return self.heard.pop(0)
        self.told.append(obj)
        return obj


def test_a_follower_obeys_the_plan(adapters):
    def follow(plan):
        return trainer._follow(_context(adapters), _World(plan), "run-f", _recipe(), "file:///nowhere/")

    with pytest.raises(Retry, match="^lease held$") as retry:
        follow(trainer.Plan("retry", reason="lease held"))
    assert retry.value.delay_s == 0
    with pytest.raises(Reject, match="^no sign-off$"):
        follow(trainer.Plan("reject", reason="no sign-off"))
    assert follow(trainer.Plan("done")) == []


# ------------------------------------------------------------------------------------ _lead's stages

def _context(adapters) -> Context:
    return Context(service="trainer", adapters=adapters, message=None, stopping=threading.Event(),
                   log=logging.LoggerAdapter(logging.getLogger("test"), {}))


def _run(adapters, world, run_id: str, dataset: str = "datasets/d/") -> trainer._Run:
    store, bucket = adapters.store, adapters.settings.bucket
    return trainer._Run(_context(adapters), world, run_id, _recipe(), store.url(bucket, dataset), "acme")


def test_a_run_trained_before_is_done_and_its_completion_published_again(adapters):
    store, bucket = adapters.store, adapters.settings.bucket
    world = _World()
    assert trainer._already_trained(_run(adapters, world, "run-t")) is None and world.told == []
    store.write(bucket, f"runs/run-t/adapter/{trainer.COMPLETE}", b'{"val_loss": 1.5, "steps": 4}')
    [completed] = trainer._already_trained(_run(adapters, world, "run-t"))
    assert world.told == [trainer.Plan("done")]
    assert isinstance(completed, ev.TrainingCompleted)
    assert (completed.steps, completed.metrics, completed.tenant) == (4, {"val_loss": 1.5}, "acme")


def test_a_held_lease_tells_the_other_ranks_to_retry(adapters):
    Lease(adapters.docs, "run-l", "another-worker", ttl_s=60).acquire()
    world, dataset_uri = _World(), adapters.store.url(adapters.settings.bucket, "datasets/d/")
    with pytest.raises(Retry) as retry:
        trainer._lead(_context(adapters), world, "run-l", _recipe(), dataset_uri, "acme")
    assert world.told == [trainer.Plan("retry", reason=str(retry.value))] and retry.value.delay_s > 0


def test_inputs_without_the_prepared_files_end_the_run_as_failed(adapters, tmp_path):
    store, bucket = adapters.store, adapters.settings.bucket
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [order_chat(0)])
    store.write(bucket, "datasets/d/train.jsonl", (folder / "train.jsonl").read_bytes())
    world = _World()
    [failed] = trainer._lead(_context(adapters), world, "run-m", _recipe(),
                             store.url(bucket, "datasets/d/"), "acme")
    assert world.told == [trainer.Plan("done")] and isinstance(failed, ev.TrainingFailed)
    assert failed.reason.startswith(store.url(bucket, "datasets/d/") + ": ")

    whole = write_prepared(tmp_path / "whole", {"train": [order_chat(0)], "val": [], "test": []})
    for path in sorted(whole.iterdir()):
        store.write(bucket, f"datasets/whole/{path.name}", path.read_bytes())
    run = _run(adapters, world, "run-w", "datasets/whole/")
    trainer._fetch_inputs(run, tmp_path / "inputs")
    assert trainer._verify_inputs(run) is None and run.resume_prefix is None and run.resume_dir is None
    assert (run.data_dir / "train.jsonl").is_file()


def test_the_probes_file_is_fetched_from_the_datasets_bucket_only_to_select_by_probes(adapters, tmp_path):
    store, bucket = adapters.store, adapters.settings.bucket
    dataset_uri, ctx = store.url(bucket, "datasets/d/"), _context(adapters)
    by_probes = _recipe(**{"training.select_by": "probes", "eval.probes": "probes/facts.jsonl"})
    assert trainer._selection_probes(ctx, by_probes, dataset_uri, tmp_path) is None   # not in the bucket: train says so
    store.write(bucket, "probes/facts.jsonl", b'{"question": "q?", "expect": ["a"], "split": "val"}\n')
    assert trainer._selection_probes(ctx, _recipe(**{"eval.probes": "probes/facts.jsonl"}), dataset_uri, tmp_path) is None
    path = trainer._selection_probes(ctx, by_probes, dataset_uri, tmp_path)
    assert path is not None and path.read_bytes() == store.read(bucket, "probes/facts.jsonl")
