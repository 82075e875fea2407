"""The trainer's monitor (services/trainer/monitor.py) as a pure state machine, then inside the real
training loop on the tiny random model: early stop returns the best checkpoint, the budget stops a
run, gradient spikes warn."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402
from tests.unit.chats import order_chat, write_jsonl  # noqa: E402

from services.trainer.monitor import Monitor, cost_per_second  # noqa: E402


def _recipe(**overrides):
    return apply_overrides(load_recipe("tiny-sft"), overrides)


# ------------------------------------------------------------------ pure

def test_grad_norm_warns_and_a_non_finite_loss_stops():
    m = Monitor(_recipe(**{"training.grad_norm_alert": 5.0}), total_steps=10)
    assert m.on_step(1, 0.5, 4.9, 1.0) == []
    [spike] = m.on_step(2, 0.5, 12.0, 2.0)
    assert (spike.kind, spike.stop, spike.value, spike.threshold) == ("grad_norm", False, 12.0, 5.0)
    kinds = [(a.kind, a.stop) for a in m.on_step(3, math.nan, math.nan, 3.0)]
    assert kinds == [("non_finite_loss", True)]


def test_budget_stops_when_the_projection_passes_max_cost_times_overrun():
    recipe = _recipe(**{"hardware.price_per_gpu_hour": 3.6, "budget.max_cost": 1.0, "budget.overrun": 1.2})
    assert cost_per_second(recipe) == pytest.approx(0.001)
    m = Monitor(recipe, total_steps=100)
    # 10 s for 10 steps -> 100 s for 100 steps -> 0.10 USD: fine
    assert m.on_step(10, 0.5, 1.0, 10.0) == []
    # 130 s for 10 steps -> 1,300 s -> 1.30 > 1.0 x 1.2: stop
    [over] = m.on_step(10, 0.5, 1.0, 130.0)
    assert over.kind == "budget" and over.stop and over.value == pytest.approx(1.3) and over.threshold == 1.2


def test_val_loss_rising_n_evaluations_in_a_row_stops_and_remembers_the_best():
    m = Monitor(_recipe(**{"training.early_stop_evals": 3}), total_steps=100)
    for step, loss in ((10, 2.0), (20, 1.5), (30, 1.6), (40, 1.55), (50, 1.7), (60, 1.8)):
        assert m.on_eval(step, loss) == [], step  # 1.55 < 1.6 broke the streak
    [stop] = m.on_eval(70, 1.9)
    assert stop.kind == "val_loss_rising" and stop.stop and "step 20" in stop.message
    assert (m.state.best_step, m.state.best_val_loss) == (20, 1.5)
    # the state survives a checkpoint: a resumed run knows it had stopped
    resumed = Monitor(_recipe(**{"training.early_stop_evals": 3}), 100, Monitor.load_state(m.state_dict()))
    assert resumed.stopped_early() and resumed.state.best_step == 20
    assert not Monitor(_recipe(**{"training.early_stop_evals": 0}), 100, resumed.state).stopped_early()


def _by_probes(**overrides):
    return _recipe(**{"training.select_by": "probes", "eval.probes": "probes/p.jsonl", **overrides})


def test_select_by_probes_keeps_the_best_fact_rate_ties_going_to_the_lower_val_loss():
    m = Monitor(_by_probes(**{"training.early_stop_evals": 2}), total_steps=100)
    # val loss falls throughout: selecting on it would take the last step
    for step, loss, score in ((10, 2.0, 0.2), (20, 1.5, 0.6), (30, 1.4, 0.5), (40, 1.2, 0.6)):
        assert m.on_eval(step, loss, score) == [], step   # 0.6 at a lower val loss is the new best
    assert (m.state.best_step, m.state.best_score, m.state.stale) == (40, 0.6, 0)
    assert m.on_eval(50, 1.1, 0.4) == []
    [stop] = m.on_eval(60, 1.0, 0.5)                    # two evaluations in a row without a better rate
    assert (stop.kind, stop.stop, stop.value, stop.threshold) == ("val_probes_plateau", True, 0.5, 0.6)
    assert "step 40" in stop.message and m.state.best_val_loss == 1.2


def test_select_by_probes_stops_on_a_plateau_or_a_perfect_rate_and_a_resume_stays_stopped():
    m = Monitor(_by_probes(**{"training.early_stop_evals": 2}), total_steps=100)
    assert m.on_eval(10, 1.0, 0.5) == [] and m.on_eval(20, 1.1, 0.4) == []
    [stop] = m.on_eval(30, 1.2, 0.5)                    # equal rate at a higher loss is not better
    assert (stop.kind, stop.stop, m.state.best_step) == ("val_probes_plateau", True, 10)
    assert "step 10" in stop.message
    resumed = Monitor(_by_probes(**{"training.early_stop_evals": 2}), 100, Monitor.load_state(m.state_dict()))
    assert resumed.stopped_early() and resumed.state.best_score == 0.5

    perfect = Monitor(_by_probes(**{"training.early_stop_evals": 0}), total_steps=100)
    [done] = perfect.on_eval(10, 1.0, 1.0)
    assert done.stop and "every val probe passes" in done.message
    with pytest.raises(ValueError, match="needs the val-probe fact rate"):
        perfect.on_eval(20, 1.0)


# ------------------------------------------------------------------ in the loop

@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, ids in (("train.jsonl", range(8)), ("val.jsonl", range(20, 24))):
        write_jsonl(folder / name, [order_chat(i) for i in ids])
    return folder


def test_early_stop_returns_the_best_checkpoint_and_a_resume_stays_stopped(data_dir, tmp_path):
    from services.trainer.training import train

    # a learning rate far too high for the held-out rows: validation loss turns up within a few steps
    recipe = _recipe(**{"training.max_steps": 40, "training.learning_rate": 0.05, "training.eval_every": 1,
                        "training.early_stop_evals": 2, "training.checkpoint_every": 1,
                        "training.keep_checkpoints": 1})
    alerts, announced = [], []
    result = train(recipe, data_dir, tmp_path / "w", on_alert=alerts.append,
                   on_checkpoint=lambda step, path, m: announced.append((step, m)))
    best, stopped_at = result.metrics["best_step"], result.metrics["early_stopped_at"]
    assert best < stopped_at < 40 and result.steps == stopped_at
    assert [a.kind for a in alerts if a.stop] == ["val_loss_rising"]
    vals = {step: m["val_loss"] for step, m in announced}
    assert result.metrics["val_loss"] == vals[best] == min(vals.values())
    # the adapter is the best checkpoint's, which pruning kept beside the latest one
    checkpoints = tmp_path / "w" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted({f"step-{best}", f"step-{stopped_at}"})
    assert (result.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (checkpoints / f"step-{best}" / "adapter" / "adapter_model.safetensors").read_bytes()
    # a crash after the early stop's checkpoint: the resume does not train on
    again = train(recipe, data_dir, tmp_path / "w", resume_from=checkpoints / f"step-{stopped_at}")
    assert again.steps == stopped_at and again.metrics["best_step"] == best


def test_over_budget_stops_with_a_checkpoint_and_grad_spikes_only_warn(data_dir, tmp_path):
    from services.trainer.training import TrainingError, train

    alerts = []
    with pytest.raises(TrainingError, match="projected cost .* above budget.max_cost"):
        train(_recipe(**{"training.max_steps": 5, "budget.max_cost": 1e-12}), data_dir, tmp_path / "b",
              on_alert=alerts.append)
    assert [(a.kind, a.step, a.stop) for a in alerts] == [("budget", 1, True)]
    assert (tmp_path / "b" / "checkpoints" / "step-1" / "trainer_state.json").is_file()

    alerts.clear()
    result = train(_recipe(**{"training.max_steps": 3, "training.grad_norm_alert": 1e-9}), data_dir,
                   tmp_path / "g", on_alert=alerts.append)
    assert result.steps == 3 and [(a.kind, a.stop) for a in alerts] == [("grad_norm", False)] * 3


def test_select_by_probes_returns_the_checkpoint_with_the_best_val_fact_rate(data_dir, tmp_path, monkeypatch):
    import json

    from services.trainer import training

    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in (
        {"question": "val one?", "expect": ["x"], "split": "val"},
        {"question": "test one?", "expect": ["x"], "split": "test"})))
    scores, asked = iter([0.2, 0.6, 0.4, 0.4, 0.4]), []

    def scripted(model, tokenizer, probes, **kwargs):   # the generation itself is test_probes.py's
        asked.append([p.question for p in probes])
        return next(scores), []

    monkeypatch.setattr(training, "fact_rate", scripted)
    # no plateau stop, and no regular checkpoint before the end: the best one is written because it is the best
    recipe = _by_probes(**{"training.max_steps": 5, "training.eval_every": 1, "training.checkpoint_every": 100,
                           "training.keep_checkpoints": 1, "training.early_stop_evals": 0})
    rows: list[dict] = []
    result = training.train(recipe, data_dir, tmp_path / "w", probes_path=probes, on_metrics=rows.extend)
    assert asked == [["val one?"]] * 5          # the val probes only: the test ones are the gate's
    assert result.steps == 5 and result.metrics["best_step"] == 2 and result.metrics["val_fact_rate"] == 0.6
    assert [r["val_fact_rate"] for r in rows] == [0.2, 0.6, 0.4, 0.4, 0.4]
    checkpoints = tmp_path / "w" / "checkpoints"
    assert (result.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (checkpoints / "step-2" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert result.metrics["val_loss"] == next(r["val_loss"] for r in rows if r["step"] == 2)

    with pytest.raises(training.TrainingError, match="eval.probes .* did not reach the trainer"):
        training.train(recipe, data_dir, tmp_path / "none")


def test_a_planned_early_stop_is_logged_as_information_not_as_an_error(data_dir, tmp_path, monkeypatch, caplog):
    import json
    import logging

    from services.trainer import training

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"question": "val one?", "expect": ["x"], "split": "val"}) + "\n")
    monkeypatch.setattr(training, "fact_rate", lambda *args, **kwargs: (1.0, []))
    recipe = _by_probes(**{"training.max_steps": 5, "training.eval_every": 1})
    with caplog.at_level(logging.INFO):
        result = training.train(recipe, data_dir, tmp_path / "w", probes_path=probes)
    assert result.steps == 1   # every val probe passed at the first validation
    stops = [r for r in caplog.records if "val_probes_plateau" in r.getMessage()]
    assert [r.levelno for r in stops] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_select_by_probes_needs_eval_probes():
    with pytest.raises(Exception, match="select_by 'probes' picks checkpoints on eval.probes' val probes"):
        _recipe(**{"training.select_by": "probes"})
