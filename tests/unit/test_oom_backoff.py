"""Out of memory, for real: a trainer process whose address space is capped (RLIMIT_AS) so that the
CPU allocator fails on long batches. The back-off halves the micro-batch, doubles the accumulation
and resumes from the last checkpoint; the steps stay the same, so the loss curve does too.

Then out of memory where else it happens (the optimizer step, validation, DPO's reference pass),
raised there as CUDA raises it: each backs off the same way, and the failed attempt's model is
released before the next one loads its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = {"training.max_steps": 4, "training.max_seq_len": 1200, "training.checkpoint_every": 1,
             "training.keep_checkpoints": 1, "training.early_stop_evals": 0}

# Runs in a child process: imports and loads everything first (OpenBLAS spins when it cannot set up
# under the cap), then caps the address space `headroom` MiB above what the process maps already.
CHILD = """
import json, resource, sys
from pathlib import Path
import torch
from shared.domain.recipe import apply_overrides, load_recipe
from services.trainer.modeling import load_base
from services.trainer.training import TrainingError, train

data, work, headroom, overrides = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
recipe = apply_overrides(load_recipe("tiny-sft"), overrides)
torch.randn(256, 256) @ torch.randn(256, 256)
tokenizer, _ = load_base(recipe)
# what training imports before its first step (TRL's template tables map ~1.5 GB of address space)
from services.trainer import objectives
objectives.for_recipe(recipe, tokenizer)
mapped = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom * 2**20, resource.RLIM_INFINITY))
alerts = []
try:
    r = train(recipe, data, work, on_alert=alerts.append)
    out = {"micro_batch": r.micro_batch, "loss_curve": r.loss_curve,
           "record": json.loads((r.adapter_dir / "run_record.json").read_text())["result"]["micro_batch"]}
except TrainingError as exc:
    out = {"error": str(exc)}
out["alerts"] = [[a.kind, a.step, a.value] for a in alerts]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    """The tiny random model with a wide MLP (4,096): its activations, about 100 MB per long example,
    are what grows with the micro-batch (the loss's logits no longer do: objectives.head_logps)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shared.domain.models import resolve_model

    tiny, folder = resolve_model("tiny-random-smollm2"), tmp_path_factory.mktemp("wide")
    config = LlamaConfig.from_pretrained(tiny)
    config.intermediate_size = 4096
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """16 chats, half with ~1,000-token answers: with batches of 8 grouped by length, one step of
    each epoch holds the long ones."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i in range(16):
        answer = " ".join(f"item{(i * 7 + j) % 97} ships to depot {j % 13}." for j in range(400 if i % 2 else 3))
        rows.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"Status of order {i}?"},
                                                 {"role": "assistant", "content": answer}]})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _capped_train(data_dir: Path, work: Path, headroom_mb: int, base_model: str) -> dict:
    # The cap is on address space. glibc keeps the address space of freed arena memory mapped, so
    # after an out-of-memory attempt the next one could fail to map its model file, where a
    # machine's real limit (RSS in a cgroup, a GPU's allocator) would see that memory free: a fixed
    # mmap threshold gives every tensor of 1 MiB or more its own mapping, unmapped when freed.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), str(work), str(headroom_mb),
                           json.dumps({**OVERRIDES, "base_model": base_model, "training.batch_size": 8,
                                       "training.grad_accum": 1})],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(line[len("RESULT "):])


def test_out_of_memory_backs_off_to_the_same_effective_batch_and_the_same_steps(data_dir, wide_model, tmp_path):
    from services.trainer.training import train

    capped = _capped_train(data_dir, tmp_path / "capped", headroom_mb=1500, base_model=wide_model)
    kinds = {kind for kind, _, _ in capped["alerts"]}
    assert kinds == {"out_of_memory"}
    assert [value for _, _, value in capped["alerts"]] == [8.0, 4.0, 2.0][:len(capped["alerts"])]
    batch, accum = capped["micro_batch"]
    assert batch < 8 and batch * accum == 8
    assert capped["record"] == {"batch_size": batch, "grad_accum": accum}
    # the same steps as a run that never ran out of memory (cut in micro-batches of 2, no cap)
    reference = train(apply_overrides(load_recipe("tiny-sft"), {**OVERRIDES, "base_model": wide_model,
                                                               "training.batch_size": 2, "training.grad_accum": 4}),
                      data_dir, tmp_path / "ref")
    assert capped["loss_curve"] == pytest.approx(reference.loss_curve, abs=1e-4)


def test_out_of_memory_at_a_micro_batch_of_one_fails_with_what_to_change(data_dir, wide_model, tmp_path):
    capped = _capped_train(data_dir, tmp_path / "tiny", headroom_mb=200, base_model=wide_model)
    assert "out of memory at step" in capped["error"] and "micro-batches of 1" in capped["error"], capped
    assert "lower training.max_seq_len (now 1200)" in capped["error"]
    assert [value for _, _, value in capped["alerts"]] == [8.0, 4.0, 2.0]


# ------------------------------------------------------------------ out of memory elsewhere, raised where it happens

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"


def _raise_once(monkeypatch, owner, name: str, when) -> list:
    """owner.name raises CUDA's out-of-memory error the first time when(*args) holds; returns the
    calls that raised (so a test can see it did)."""
    original, raised = getattr(owner, name), []

    def patched(*args, **kwargs):
        if not raised and when(*args):
            raised.append(args)
            raise torch.OutOfMemoryError(CUDA_OOM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return raised


@pytest.fixture
def models_built(monkeypatch) -> list[int]:
    """For each model the trainer builds, how many of those built before it are still alive: the
    back-off must release a failed attempt's model before the next attempt builds its own."""
    import weakref

    from services.trainer import modeling

    built, alive, original = [], [], modeling.build_model

    def tracked(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in built))
        model = original(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(modeling, "build_model", tracked)
    return alive


def _chats(folder: Path) -> Path:
    from tests.unit.chats import order_chat, write_prepared

    chats = [order_chat(i, follow_up=True) for i in range(10)]
    return write_prepared(folder, {"train": chats[:8], "val": chats[8:]})


def _backed_off(recipe, data: Path, work: Path) -> tuple:
    from services.trainer.training import train

    alerts = []
    result = train(recipe, data, work, on_alert=alerts.append)
    return result, [(a.kind, a.step, a.value, a.message) for a in alerts]


def test_out_of_memory_in_the_optimizer_step_backs_off_after_releasing_the_attempt(tmp_path, monkeypatch,
                                                                                    models_built):
    from services.trainer.training import train

    data = _chats(tmp_path / "data")
    overrides = {"training.max_steps": 4, "training.checkpoint_every": 1, "training.batch_size": 2,
                 "training.grad_accum": 1}
    steps = iter(range(1, 100))
    _raise_once(monkeypatch, torch.optim.AdamW, "step", lambda *_: next(steps) == 3)  # AdamW's step 3
    result, alerts = _backed_off(apply_overrides(load_recipe("tiny-sft"), overrides), data, tmp_path / "w")

    [(kind, step, batch, message)] = alerts
    assert (kind, step, batch) == ("out_of_memory", 3, 2.0)
    assert message.startswith("out of memory at step 3 (optimizer step) with micro-batches of 2; resuming with 1 x 2")
    assert result.micro_batch == (1, 2) and result.steps == 4
    # the second attempt was built once the first one's model was gone, without the test collecting it
    assert models_built == [0, 0]
    monkeypatch.undo()
    reference = train(apply_overrides(load_recipe("tiny-sft"), {**overrides, "training.batch_size": 1,
                                                               "training.grad_accum": 2}), data, tmp_path / "ref")
    assert result.loss_curve == pytest.approx(reference.loss_curve, abs=1e-6)


def test_out_of_memory_in_validation_backs_off_and_replays_the_steps_since_the_checkpoint(tmp_path, monkeypatch):
    from services.trainer import training

    data = _chats(tmp_path / "data")
    overrides = {"training.max_steps": 4, "training.checkpoint_every": 2, "training.batch_size": 2,
                 "training.grad_accum": 1, "training.early_stop_evals": 0}
    raised = _raise_once(monkeypatch, training, "_evaluate_loss", lambda *_: True)  # the first validation: step 2
    result, alerts = _backed_off(apply_overrides(load_recipe("tiny-sft"), overrides), data, tmp_path / "w")

    assert raised and [a[:3] for a in alerts] == [("out_of_memory", 2, 2.0)]
    assert alerts[0][3].startswith("out of memory at step 2 (validation) with micro-batches of 2")
    monkeypatch.undo()
    reference = training.train(apply_overrides(load_recipe("tiny-sft"), overrides), data, tmp_path / "ref")
    assert result.micro_batch == (1, 2) and result.loss_curve == pytest.approx(reference.loss_curve, abs=1e-5)
    assert result.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], abs=1e-5)


def test_out_of_memory_in_the_dpo_reference_pass_backs_off_to_smaller_batches(tmp_path, monkeypatch):
    from tests.unit.chats import write_jsonl

    from services.trainer import objectives

    data = tmp_path / "pairs"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Can I return item {i}?"}],
         "chosen": [{"role": "assistant", "content": f"Yes, item {i} can be returned within 30 days."}],
         "rejected": [{"role": "assistant", "content": "No."}]} for i in range(8)])
    # the reference pass is the forward without gradients; a batch of 4 pairs does not fit
    raised = _raise_once(monkeypatch, objectives.Preference, "_sequence_logps",
                         lambda _self, _model, batch, _device: not torch.is_grad_enabled() and len(batch) == 4)
    recipe = apply_overrides(load_recipe("tiny-sft"), {"method": "dpo", "training.max_steps": 2,
                                                      "training.batch_size": 4, "training.grad_accum": 1})
    result, alerts = _backed_off(recipe, data, tmp_path / "w")

    assert raised and [a[:3] for a in alerts] == [("out_of_memory", 0, 4.0)]
    assert alerts[0][3].startswith("out of memory in the DPO reference pass (before training) with micro-batches of 4")
    assert result.micro_batch == (2, 2)
    assert result.loss_curve[0] == pytest.approx(0.693147, abs=1e-4)  # the policy is the reference at step 1
