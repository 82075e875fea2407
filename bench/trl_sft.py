"""The TRL side of the trainer benchmarks (bench/train on a CPU, bench/gpu on a GPU): the plain
TRL SFTTrainer script a user would write for a recipe's job, with the recipe's LoRA, batch,
sequence cut, learning rate and schedule, and the loss on assistant turns only as ftpipe trains.
Each benchmark passes what differs (device, precision, checkpointing, how long, kernels)."""
from __future__ import annotations

from pathlib import Path

from shared.domain.datasets import with_system_prompt
from shared.domain.recipe import Recipe

from services.trainer.chat_templates import training_template
from services.trainer.training import load_split


def sft_trainer(recipe: Recipe, data: Path, model, tokenizer, work: Path, *, callbacks=(), order: list[int] | None = None,
                trainer_class=None, **config):
    """SFTTrainer (or trainer_class, a subclass) over data/train.jsonl, its rows in `order` where
    given, for `model` (loaded by the caller, without an adapter: the trainer adds the recipe's
    LoRA); `config`: SFTConfig fields over the recipe's."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    t = recipe.training
    # TRL's assistant_only_loss reads the mask off {% generation %} markers: a marked copy of the
    # model's template that renders the same text
    tokenizer.chat_template = training_template(tokenizer)
    rows = load_split(data / "train.jsonl")
    rows = [{"messages": with_system_prompt(rows[i]["messages"], recipe.data.system_prompt)}
            for i in (order if order is not None else range(len(rows)))]
    args = SFTConfig(**{
        "output_dir": str(work), "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum, "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler, "warmup_steps": t.warmup_steps, "max_length": t.max_seq_len,
        "max_grad_norm": t.max_grad_norm, "weight_decay": 0.0, "packing": False, "save_strategy": "no",
        "report_to": [], "seed": t.seed, "dataloader_num_workers": 0, "assistant_only_loss": True, **config})
    lora = LoraConfig(r=recipe.adapter.r, lora_alpha=recipe.adapter.alpha, lora_dropout=recipe.adapter.dropout,
                      target_modules=recipe.adapter.target_modules, task_type="CAUSAL_LM")
    return (trainer_class or SFTTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=lora, callbacks=list(callbacks))


def tokens_fed(trainer, max_length: int) -> list[int]:
    """Non-padding tokens of each example as the trainer feeds it (cut at max_length)."""
    return [min(len(ids), max_length) for ids in trainer.train_dataset["input_ids"]]
