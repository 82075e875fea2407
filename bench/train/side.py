"""One measured side of bench/train, in a fresh process: ftpipe's `training.train` or TRL's
SFTTrainer on the same recipe and prepared folder. Prints `RESULT <json>`: for every optimizer
step its seconds, non-padding tokens, trained tokens and loss; the resident set's peak over its
level after the imports; where the adapter was saved.

    PYTHONPATH=. python bench/train/side.py '{"side": "ftpipe"|"trl", "recipe": {...}, "data": DIR, "work": DIR}'

The window of a step is the same on both sides: from building its batch (collating, padding) to
the scheduler's step, so forward, backward, clipping and the optimizer. Logging, validation and
checkpoints between steps, and everything before the first step and after the last, lie outside it.

TRL trains on ftpipe's batches: the rows in the order of ftpipe's random (not length-grouped)
sampler for the seed, read sequentially, so both sides see the same rows in the same steps.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Both sides import everything before the baseline is read, so that neither's imports count.
import datasets  # noqa: E402, F401
import peft  # noqa: E402, F401
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

from bench.process_memory import peak_bytes, resident_bytes  # noqa: E402
from bench.trl_sft import sft_trainer  # noqa: E402
from shared.domain.models import resolve_model  # noqa: E402
from shared.domain.recipe import Recipe  # noqa: E402

from services.trainer import training  # noqa: E402

BASELINE_MB = resident_bytes() / 2**20  # after the imports, before any model loads


def ftpipe_side(recipe: Recipe, data: Path, work: Path) -> tuple[list[dict], Path]:
    """ftpipe's trainer, each step timed around the loop's own `_optimizer_step` (what
    result.seconds sums)."""
    steps: list[dict] = []
    inner = training._optimizer_step

    def timed(run, batch):
        started = time.perf_counter()
        out = inner(run, batch)
        seconds = time.perf_counter() - started
        steps.append({"seconds": seconds, "tokens": sum(run.objective.tokens(e) for e in batch),
                      "trained": sum(run.objective.weight(e) for e in batch)})
        return out

    training._optimizer_step = timed  # the loop looks the function up in its module at every step
    result = training.train(recipe, data, work)
    for step, loss in zip(steps, result.loss_curve, strict=True):
        step["loss"] = loss
    return steps, result.adapter_dir


def ftpipe_order(rows: int, spec) -> list[int]:
    """The rows in the order ftpipe's sampler gives them in the first epoch (random batches)."""
    if spec.group_by_length:
        raise SystemExit("the TRL side follows ftpipe's random batches: set training.group_by_length false")
    return [i for batch in training._step_batches([0] * rows, spec.batch_size * spec.grad_accum, spec.seed, 0, False)
            for i in batch]


def trl_side(recipe: Recipe, data: Path, work: Path) -> tuple[list[dict], Path]:
    """The plain TRL script for the same job: SFTTrainer with the recipe's LoRA, batch, cut,
    learning rate and schedule, precision and checkpointing, loss on assistant turns only
    (`assistant_only_loss`, through ftpipe's generation-marked copy of the model's template, which
    renders the same text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    t = recipe.training
    if t.precision not in ("bf16", "fp32"):
        raise SystemExit("the TRL side runs bf16 or fp32 on a CPU: set training.precision")
    bf16 = t.precision == "bf16"
    path = resolve_model(recipe.base_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)  # as ftpipe loads it
    steps: list[dict] = []

    class Timed(SFTTrainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            self.step_started = time.perf_counter()  # the step's window opens as its batch is built
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            self.step_batches = batches
            return batches, items

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - trainer.step_started  # counting below is outside the window
            batches = trainer.step_batches
            steps.append({"seconds": seconds, "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                          "trained": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)})

    trainer = sft_trainer(
        recipe, data, model, tokenizer, work, callbacks=[StepEnd()], trainer_class=Timed,
        order=ftpipe_order(len(training.load_split(data / "train.jsonl")), t),
        num_train_epochs=t.epochs, max_steps=t.max_steps or -1, logging_steps=1, use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="sequential",  # ftpipe's order, see ftpipe_order
        gradient_checkpointing=bool(t.gradient_checkpointing), bf16=bf16)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    for step, loss in zip(steps, losses, strict=True):
        step["loss"] = loss
    trainer.save_model(str(work / "adapter"))
    return steps, work / "adapter"


def main() -> None:
    spec = json.loads(sys.argv[1])
    recipe, data, work = Recipe.model_validate(spec["recipe"]), Path(spec["data"]), Path(spec["work"])
    started = time.perf_counter()
    steps, adapter = (ftpipe_side if spec["side"] == "ftpipe" else trl_side)(recipe, data, work)
    print("RESULT " + json.dumps({
        "side": spec["side"], "steps": steps, "adapter": str(adapter),
        "call_seconds": round(time.perf_counter() - started, 3),  # model load, tokenising, the loop, saving
        "process_seconds": round(time.perf_counter() - STARTED, 3),
        "baseline_rss_mb": round(BASELINE_MB, 1), "peak_rss_mb": round(peak_bytes() / 2**20, 1),
        "peak_over_baseline_mb": round(peak_bytes() / 2**20 - BASELINE_MB, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
