"""Out of memory, for real: a trainer process whose address space is capped (RLIMIT_AS) so that the
CPU allocator fails on long batches. The back-off halves the micro-batch, doubles the accumulation
and resumes from the last checkpoint; the steps stay the same, so the loss curve does too."""
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
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
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
    assert "out of memory at step" in capped["error"] and "micro-batches of 1" in capped["error"]
    assert "lower training.max_seq_len (now 1200)" in capped["error"]
    assert [value for _, _, value in capped["alerts"]] == [8.0, 4.0, 2.0]

