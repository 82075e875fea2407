"""training.precision on the tiny model: what each device resolves it to, what the model holds in
it (frozen weights in the precision, trained weights and AdamW's moments in float32), bf16 runs on a
CPU resuming at the same step within a stated tolerance, fp16's loss scaler (its skipped steps, its
state in checkpoints: exact resume), and the configurations FSDP2 and DeepSpeed get."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402
from tests.unit.chats import order_chat, write_prepared  # noqa: E402

from services.trainer import compute, distributed, modeling, training  # noqa: E402
from services.trainer.compute import Compute, ComputeError  # noqa: E402
from services.trainer.training import TrainingError, TrainingStopped, train  # noqa: E402

BF16 = Compute("bf16", "cpu", False)


def _recipe(**overrides):
    return apply_overrides(load_recipe("tiny-sft"), overrides)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    chats = [order_chat(i, follow_up=True) for i in range(9)]
    return write_prepared(tmp_path / "data", {"train": chats[:7], "val": chats[7:]})


# ------------------------------------------------------------------ resolution

def test_precision_and_checkpointing_resolve_per_device(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert compute.resolve(_recipe(), cpu) == Compute("fp32", "cpu", False)
    assert compute.resolve(_recipe(**{"training.precision": "bf16"}), cpu) == BF16
    assert compute.resolve(_recipe(**{"training.gradient_checkpointing": True}), cpu).gradient_checkpointing
    with pytest.raises(ComputeError, match="'fp16' needs a GPU.*on a CPU use bf16"):
        compute.resolve(_recipe(**{"training.precision": "fp16"}), cpu)

    ampere = {"value": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: ampere["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert compute.resolve(_recipe(), gpu) == Compute("bf16", "cuda", True)
    assert compute.resolve(_recipe(**{"training.gradient_checkpointing": False}), gpu).gradient_checkpointing is False
    ampere["value"] = False   # Turing and older: fp16 with the loss scaler
    assert compute.resolve(_recipe(), gpu) == Compute("fp16", "cuda", True)
    assert compute.resolve(_recipe(**{"training.precision": "fp16"}), gpu).grad_scaler is not None
    with pytest.raises(ComputeError, match=r"Tesla T4\) has no native bfloat16.*use fp16 or auto"):
        compute.resolve(_recipe(**{"training.precision": "bf16"}), gpu)


def test_fp16_on_a_cpu_is_refused_before_anything_loads(data_dir, tmp_path):
    with pytest.raises(TrainingError, match="training.precision 'fp16' needs a GPU"):
        train(_recipe(**{"training.precision": "fp16"}), data_dir, tmp_path / "w")


# ------------------------------------------------------------------ what the model holds

def _dtypes(model, trained: bool) -> set:
    return {p.dtype for p in model.parameters() if p.requires_grad == trained}


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_bf16_holds_the_frozen_base_in_bf16_and_trains_in_float32(kind):
    model = modeling.build_model(_recipe(**{"adapter.kind": kind, "adapter.num_virtual_tokens": 4}), compute=BF16)
    assert _dtypes(model, trained=False) == {torch.bfloat16}
    assert _dtypes(model, trained=True) == {torch.float32}


def test_bf16_full_fine_tune_keeps_every_weight_in_float32_and_autocasts_the_forward():
    model = modeling.build_model(_recipe(**{"adapter.kind": "full"}), compute=BF16)
    assert _dtypes(model, trained=True) == {torch.float32} and _dtypes(model, trained=False) == set()
    with BF16.autocast():
        hidden = model.model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
        assert model.model.layers[0].mlp.down_proj(torch.ones(1, 64)).dtype == torch.bfloat16
    assert hidden.isfinite().all()


def test_bf16_qlora_computes_its_4bit_layers_in_bf16():
    import bitsandbytes as bnb

    model = modeling.build_model(_recipe(**{"adapter.kind": "qlora"}), compute=BF16)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.dtype == torch.uint8 and layer.compute_dtype == torch.bfloat16
                          for layer in layers)
    assert _dtypes(model, trained=True) == {torch.float32}


def test_qlora_under_torchrun_loads_on_each_ranks_own_gpu(monkeypatch):
    # bitsandbytes places the 4-bit base where device_map says: GPU LOCAL_RANK, not every rank on GPU 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert modeling._device_map() == {"": 3}
    monkeypatch.delenv("LOCAL_RANK")
    assert modeling._device_map() == {"": 0}   # one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling._device_map() == {"": "cpu"}


def test_bf16_classifier_trains_its_new_head_in_float32():
    recipe = load_recipe("ticket-classifier")
    model = modeling.build_model(recipe, labels=["a", "b", "c"], compute=BF16)
    heads = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert heads and set(heads.values()) == {torch.float32}
    assert _dtypes(model, trained=False) == {torch.bfloat16}


# ------------------------------------------------------------------ bf16 runs on a CPU

def test_a_bf16_run_keeps_float32_state_says_what_ran_and_resumes_within_tolerance(data_dir, tmp_path):
    recipe = _recipe(**{"training.precision": "bf16", "training.max_steps": 7, "adapter.dropout": 0.1,
                        "training.checkpoint_every": 100})
    full = []
    result = train(recipe, data_dir, tmp_path / "a", on_metrics=full.extend)
    record = json.loads((result.adapter_dir / "run_record.json").read_text())["result"]["compute"]
    assert record == {"precision": "bf16", "gradient_checkpointing": False, "attention": "sdpa",
                      "packed_attention": None, "loss": "chunked_head_ce"}

    first, polls = [], iter(range(1, 100))
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, data_dir, tmp_path / "b", on_metrics=first.extend, should_stop=lambda: next(polls) == 3)
    checkpoint = stopped.value.checkpoint
    moments = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert moments and {v.dtype for s in moments.values() for k, v in s.items() if k != "step"} == {torch.float32}
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(checkpoint / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}

    rest = []
    train(recipe, data_dir, tmp_path / "b", resume_from=checkpoint, on_metrics=rest.extend)
    resumed = first + rest
    assert [m["step"] for m in resumed] == list(range(1, 8)) and [m["epoch"] for m in resumed] == [
        m["epoch"] for m in full]
    # The tolerance a bf16 resume is held to: bf16 keeps 8 bits of mantissa (relative rounding 2^-9,
    # ~2e-3); the trained weights, moments and RNG come back exactly, so only a kernel choosing
    # another summation order could move a loss, by far less than that rounding.
    for a, b in zip(full, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2)
    # on this CPU it is in fact exact
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]


def test_the_fingerprint_holds_the_resolved_precision(data_dir, tmp_path):
    with pytest.raises(TrainingStopped) as stopped:
        train(_recipe(**{"training.precision": "fp32"}), data_dir, tmp_path / "w", should_stop=lambda: True)
    with pytest.raises(TrainingError, match="another recipe or dataset"):
        train(_recipe(**{"training.precision": "bf16"}), data_dir, tmp_path / "w",
              resume_from=stopped.value.checkpoint)
    # auto is fp32 on a CPU: the same numbers, so the checkpoint resumes; checkpointing changes none
    result = train(_recipe(**{"training.gradient_checkpointing": True}), data_dir, tmp_path / "w",
                   resume_from=stopped.value.checkpoint)
    assert result.steps == 6 and result.compute["gradient_checkpointing"] is True


# ------------------------------------------------------------------ fp16 and its loss scaler

@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 as a GPU runs it (autocast to float16, the frozen base in float16, torch's GradScaler),
    on the CPU, whose autocast has float16 too; the scaler starts at 2^20 so that its first steps
    overflow and are skipped, as a real run's do until the scale has come down."""
    fp16 = Compute("fp16", "cpu", False)
    monkeypatch.setattr(training, "resolve_compute", lambda recipe, device: fp16)
    monkeypatch.setattr(Compute, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0**20))


def test_fp16_skips_overflowing_steps_and_resumes_exactly_with_the_scalers_state(fp16_on_cpu, data_dir, tmp_path):
    recipe = _recipe(**{"training.max_steps": 9, "training.checkpoint_every": 100, "training.warmup_steps": 2})
    full = []
    train(recipe, data_dir, tmp_path / "a", on_metrics=full.extend)
    skipped = [m["step"] for m in full if not math.isfinite(m["grad_norm"])]  # overflowed: inf - inf
    assert skipped[:2] == [1, 2] and len(skipped) < 5
    # the schedule waits for a skipped step (the next one has its learning rate), not for the others
    for step in range(1, 9):
        assert (full[step]["lr"] == full[step - 1]["lr"]) == (step in skipped), step

    first, polls = [], iter(range(1, 100))
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, data_dir, tmp_path / "b", on_metrics=first.extend, should_stop=lambda: next(polls) == 5)
    scale = torch.load(stopped.value.checkpoint / "scaler.pt", weights_only=True)["scale"]
    assert scale < 2.0**40
    rest = []
    train(recipe, data_dir, tmp_path / "b", resume_from=stopped.value.checkpoint, on_metrics=rest.extend)
    resumed = first + rest
    assert [(m["loss"], m["lr"]) for m in resumed] == [(m["loss"], m["lr"]) for m in full]
    assert [m["grad_norm"] for m in resumed] == pytest.approx([m["grad_norm"] for m in full], nan_ok=True)


# ------------------------------------------------------------------ the strategies' mixed precision

def test_deepspeed_gets_its_bf16_or_fp16_section():
    bf16 = distributed.deepspeed_config("deepspeed_zero3", 1.0, Compute("bf16", "cuda", True))
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16 and bf16["zero_optimization"]["stage"] == 3
    fp16 = distributed.deepspeed_config("deepspeed_zero2", 1.0, Compute("fp16", "cuda", True))
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} and "bf16" not in fp16
    fp32 = distributed.deepspeed_config("deepspeed_zero2", 0.5, Compute())
    assert "bf16" not in fp32 and "fp16" not in fp32 and fp32["gradient_clipping"] == 0.5


def test_fsdp_gathers_in_the_precision_and_reduces_in_float32():
    policy = distributed.fsdp_mixed_precision(Compute("bf16", "cuda", True))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    plain = distributed.fsdp_mixed_precision(Compute())
    assert (plain.param_dtype, plain.reduce_dtype) == (None, None)


def test_one_process_wraps_a_loss_scaler_only_for_fp16():
    world = distributed.World()
    model = torch.nn.Linear(4, 4)
    world.wrap(model, lambda params: torch.optim.AdamW(params), max_grad_norm=1.0, compute=BF16)
    assert world.scaler is None and world.compute == BF16
    world.wrap(model, lambda params: torch.optim.AdamW(params), max_grad_norm=1.0, compute=Compute("fp16", "cpu"))
    assert isinstance(world.scaler, torch.amp.GradScaler)
