"""The trainer's domain logic on the tiny random model: label masking, checkpoints, exact resume,
metrics batching, cooperative stop and the errors users meet."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from shared.domain.models import resolve_model  # noqa: E402
from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402
from tests.unit.chats import order_chat, write_jsonl  # noqa: E402

from services.trainer.chat_templates import training_template  # noqa: E402
from services.trainer.objectives import (
    IGNORE_INDEX,  # noqa: E402
    encode_conversation as _encode,  # noqa: E402
)
from services.trainer.training import TrainingError, TrainingStopped, train  # noqa: E402


def encode_conversation(tokenizer, messages, **kwargs):
    return _encode(tokenizer, training_template(tokenizer), messages, **kwargs)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    # 7 conversations at batch_size 2 -> 4 micro-batches an epoch, the last one short: runs cross
    # epoch boundaries and meet a ragged batch.
    write_jsonl(folder / "train.jsonl", [order_chat(i, follow_up=True) for i in range(7)])
    write_jsonl(folder / "val.jsonl", [order_chat(i, follow_up=True) for i in range(7, 9)])
    write_jsonl(folder / "test.jsonl", [order_chat(9, follow_up=True)])
    return folder


def _recipe(**overrides):
    return apply_overrides(load_recipe("tiny-sft"), overrides)


# ------------------------------------------------------------------------------------ label mask

def test_label_mask_trains_only_assistant_content_and_end_of_turn(tokenizer):
    messages = order_chat(1, follow_up=True)["messages"]
    ex = encode_conversation(tokenizer, messages, system_prompt="Be brief.", max_seq_len=512)

    # The ids are those of the whole conversation as the model's own template renders it.
    full = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    assert ex.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert len(ex.labels) == len(ex.input_ids)

    trained = [tok for tok, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(ex.input_ids, ex.labels, strict=True))
    assert tokenizer.decode(trained) == "Order 1 ships on day 2.<|im_end|>Noted, we will write to you.<|im_end|>"
    assert ex.trained_tokens == len(trained)


def test_system_prompt_is_inserted_only_when_the_conversation_has_none(tokenizer):
    with_prompt = encode_conversation(tokenizer, order_chat(1, follow_up=True)["messages"], system_prompt="Be brief.", max_seq_len=512)
    assert tokenizer.decode(with_prompt.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")

    own = [{"role": "system", "content": "Own prompt."}, *order_chat(1, follow_up=True)["messages"]]
    kept = encode_conversation(tokenizer, own, system_prompt="Be brief.", max_seq_len=512)
    text = tokenizer.decode(kept.input_ids)
    assert text.startswith("<|im_start|>system\nOwn prompt.<|im_end|>") and "Be brief." not in text


def test_truncation_to_max_seq_len(tokenizer):
    full = encode_conversation(tokenizer, order_chat(1, follow_up=True)["messages"], system_prompt=None, max_seq_len=512)
    short = encode_conversation(tokenizer, order_chat(1, follow_up=True)["messages"], system_prompt=None, max_seq_len=20)
    assert len(short.input_ids) == len(short.labels) == 20
    assert short.input_ids == full.input_ids[:20] and short.labels == full.labels[:20]


# ------------------------------------------------------------------------------------ training

def test_checkpoint_contents_retention_and_final_adapter(data_dir, tmp_path):
    announced = []
    result = train(_recipe(**{"training.max_steps": 5, "training.keep_checkpoints": 2}), data_dir,
                   tmp_path / "work", on_checkpoint=lambda step, path, m: announced.append((step, path.name, m)))

    # Every 2 steps and at the end; only the last two stay on disk.
    assert [(s, name) for s, name, _ in announced] == [(2, "step-2"), (4, "step-4"), (5, "step-5")]
    assert announced[-1][2]["step"] == 5 and announced[-1][2]["tokens_seen"] == result.tokens
    checkpoints = tmp_path / "work" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-5"]

    ckpt = checkpoints / "step-4"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.pt",
                 "scheduler.pt", "rng.pt", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["total_steps"] == 5
    assert state["data_position"] == {"epoch": 1, "next_step": 0, "shuffle_seed": 0}
    assert [m["step"] for m in state["metrics"]] == [1, 2, 3, 4]
    assert state["tokens_seen"] > 0

    assert result.steps == 5 and result.tokens > 0 and result.seconds > 0
    assert result.metrics["val_loss"] > 0 and result.metrics["train_loss"] > 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-smollm2"))
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())

    # Resuming from the final checkpoint (a crash after training, before the upload) only redoes the end.
    again = train(_recipe(**{"training.max_steps": 5, "training.keep_checkpoints": 2}), data_dir,
                  tmp_path / "work", resume_from=checkpoints / "step-5", on_metrics=pytest.fail)
    assert again.steps == 5 and again.tokens == result.tokens
    assert again.metrics["val_loss"] == pytest.approx(result.metrics["val_loss"], abs=1e-6)


def test_resume_is_exact(data_dir, tmp_path):
    # Dropout on: the resumed run must also restore the torch RNG to draw the same masks.
    recipe = _recipe(**{"training.max_steps": 7, "adapter.dropout": 0.1, "training.checkpoint_every": 100})
    full = []
    train(recipe, data_dir, tmp_path / "a", on_metrics=full.extend)

    first, polls = [], iter(range(1, 100))
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, data_dir, tmp_path / "b", on_metrics=first.extend, should_stop=lambda: next(polls) == 3)
    assert stopped.value.step == 3
    rest = []
    result = train(recipe, data_dir, tmp_path / "b", resume_from=stopped.value.checkpoint, on_metrics=rest.extend)

    resumed = first + rest
    assert [m["step"] for m in resumed] == list(range(1, 8))  # no step skipped or repeated
    assert [m["epoch"] for m in resumed] == [m["epoch"] for m in full]
    for a, b in zip(full, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])
    assert result.steps == 7


def test_rerun_gives_the_same_loss_curve_and_the_run_record_names_what_ran(data_dir, tmp_path):
    (data_dir / "manifest.json").write_text(json.dumps({"dataset_id": "d0123456789abcdef"}))
    recipe = _recipe(**{"training.max_steps": 4, "adapter.dropout": 0.1})
    records = []
    for work in ("a", "b"):
        result = train(recipe, data_dir, tmp_path / work)
        records.append(json.loads((result.adapter_dir / "run_record.json").read_text()))
    a, b = records
    assert len(a["result"]["loss_curve"]) == 4
    assert a["result"]["loss_curve"] == pytest.approx(b["result"]["loss_curve"], abs=1e-7)
    assert a["recipe"] == {"name": "tiny-sft", "version": recipe.version, "hash": recipe.hash,
                           "base_model": recipe.base_model, "method": "sft", "adapter": "lora"}
    assert a["seed"] == recipe.training.seed
    import hashlib
    assert a["dataset"] == {"dataset_id": "d0123456789abcdef",
                            "manifest_sha256": hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest(),
                            "train_sha256": hashlib.sha256((data_dir / "train.jsonl").read_bytes()).hexdigest()}
    assert a["packages"]["torch"] == torch.__version__ and "transformers" in a["packages"]
    commit = a["code"]["git_commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    assert a["machine"]["device"] == "cpu" and a["code"]["ftpipe"]


def test_neftune_noises_training_forwards_only_and_is_gone_from_the_saved_model(data_dir, tmp_path, monkeypatch):
    from services.trainer import modeling
    seen, save = [], modeling.save_trained

    def spy(model, *args, **kwargs):
        embeddings = model.get_input_embeddings()
        seen.append((len(embeddings._forward_hooks), hasattr(embeddings, "neftune_noise_alpha")))
        return save(model, *args, **kwargs)

    monkeypatch.setattr(modeling, "save_trained", spy)
    # a learning rate too small to move the weights: whatever differs is the noise
    still = {"training.max_steps": 2, "training.learning_rate": 1e-12}
    plain = train(_recipe(**still), data_dir, tmp_path / "a")
    noisy = train(_recipe(**still, **{"training.neftune_alpha": 5.0}), data_dir, tmp_path / "b")
    assert abs(noisy.loss_curve[0] - plain.loss_curve[0]) > 1e-3               # training forwards: noised
    assert noisy.metrics["val_loss"] == pytest.approx(plain.metrics["val_loss"], abs=1e-6)   # eval mode: not
    assert seen[1] == seen[0] and not seen[1][1]     # saved without the hook, as a plain run is


def test_resume_refuses_a_checkpoint_of_another_recipe(data_dir, tmp_path):
    with pytest.raises(TrainingStopped) as stopped:
        train(_recipe(), data_dir, tmp_path / "w", should_stop=lambda: True)
    with pytest.raises(TrainingError, match="another recipe or dataset"):
        train(_recipe(**{"training.learning_rate": 0.01}), data_dir, tmp_path / "w",
              resume_from=stopped.value.checkpoint)


def test_metrics_arrive_in_batches_of_metrics_every(data_dir, tmp_path):
    batches = []
    train(_recipe(**{"training.max_steps": 5, "training.checkpoint_every": 100, "training.metrics_every": 2}),
          data_dir, tmp_path / "w", on_metrics=batches.append)
    assert [[m["step"] for m in b] for b in batches] == [[1, 2], [3, 4], [5]]
    for m in (m for b in batches for m in b):
        every_step = {"step", "total_steps", "loss", "grad_norm", "lr", "tokens_per_s", "epoch", "peak_memory_mb",
                      "cost"}
        # validation loss at each eval interval (by default the checkpoint interval) and at the end
        assert set(m) == (every_step | {"val_loss"} if m["step"] == 5 else every_step)
        assert m["peak_memory_mb"] > 0 and m["cost"] >= 0
        assert m["total_steps"] == 5
        assert m["loss"] > 0 and m["tokens_per_s"] > 0
    assert batches[1][1]["epoch"] == 1.0  # 4 micro-batches an epoch


def test_should_stop_checkpoints_then_raises(data_dir, tmp_path):
    announced, delivered = [], []
    with pytest.raises(TrainingStopped) as stopped:
        train(_recipe(**{"training.metrics_every": 5}), data_dir, tmp_path / "w", should_stop=lambda: True,
              on_checkpoint=lambda step, path, m: announced.append(step), on_metrics=delivered.extend)
    assert stopped.value.step == 1 and announced == [1]
    assert [m["step"] for m in delivered] == [1]  # pending metrics are flushed before the stop
    state = json.loads((stopped.value.checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["data_position"]["next_step"] == 1
    assert not (tmp_path / "w" / "adapter").exists()


# ------------------------------------------------------------------------------------ errors

def test_empty_train_split_is_a_clear_error(data_dir, tmp_path):
    (data_dir / "train.jsonl").write_text("")
    with pytest.raises(TrainingError, match="train split .* is empty"):
        train(_recipe(), data_dir, tmp_path / "w")


def test_no_assistant_turns_is_a_clear_error(data_dir, tmp_path):
    write_jsonl(data_dir / "train.jsonl",
                 [{"id": "u", "messages": [{"role": "user", "content": "hello"}]}] * 3)
    with pytest.raises(TrainingError, match="none of its 3 conversations has an assistant turn"):
        train(_recipe(), data_dir, tmp_path / "w")


def test_unloadable_model_is_a_clear_error(data_dir, tmp_path):
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    (bogus / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match="could not be loaded"):
        train(_recipe(base_model=str(bogus)), data_dir, tmp_path / "w")
    truncated = tmp_path / "truncated"
    shutil.copytree(resolve_model("tiny-random-smollm2"), truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TrainingError, match="could not be loaded"):
        train(_recipe(base_model=str(truncated)), data_dir, tmp_path / "w")
    with pytest.raises(TrainingError, match="neither a built-in"):
        train(_recipe(base_model="no-such-model"), data_dir, tmp_path / "w")


def test_logits_at_trained_positions_only_give_the_full_loss(tokenizer):
    from transformers import AutoModelForCausalLM

    from services.trainer.objectives import _pad, target_logps

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-smollm2"))
    examples = [encode_conversation(tokenizer, order_chat(i, follow_up=True)["messages"], system_prompt=None, max_seq_len=512)
                for i in range(3)]
    ids, labels = _pad([e.input_ids for e in examples], 0), _pad([e.labels for e in examples], IGNORE_INDEX)
    mask = _pad([[1] * len(e.input_ids) for e in examples], 0)
    fast, rows = target_logps(model, ids, labels, attention_mask=mask)
    logits = model(input_ids=ids, attention_mask=mask).logits
    full = -torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    assert len(fast) == sum(e.trained_tokens for e in examples) and rows.tolist() == sorted(rows.tolist())
    assert fast.sum().item() == pytest.approx(full.item(), rel=1e-5)


def test_length_grouped_batches_cover_the_epoch_once_and_depend_only_on_seed_and_epoch():
    from services.trainer.training import _step_batches

    lengths = [(i * 37) % 101 + 5 for i in range(500)]
    batches = _step_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert batches == _step_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert batches != _step_batches(lengths, 8, seed=3, epoch=2, group_by_length=True)
    spread = lambda bs: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert spread(batches) < spread(_step_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)) / 4
