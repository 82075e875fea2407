"""The model a run trains: the recipe's base model (a causal LM, or a sequence classifier for
`task: classification`) with the recipe's adapter — LoRA, QLoRA (4-bit NF4 base, bitsandbytes),
prefix tuning, or none (`full`: every weight trains) — and how its trained weights are saved into
and restored from a checkpoint.

Every kind saves what `PeftModel.from_pretrained` / `AutoModel*.from_pretrained` loads, so a
checkpoint's `adapter/` folder is a result the evaluator and the registry can use as it is.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from shared.domain.models import ModelNotAvailable, resolve_model
from shared.domain.recipe import Recipe

from services.trainer.compute import CPU_FP32, Compute
from services.trainer.packed_attention import use_packed_attention

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"   # classification: the label of each class index, beside the weights


class ModelError(RuntimeError):
    """The base model or adapter cannot be built; the message says why and what to change."""


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    path = _resolve(recipe)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # missing or unreadable tokenizer files
        raise ModelError(f"base_model {recipe.base_model!r} ({path}): the tokenizer could not be loaded: {exc}; "
                         "the model folder needs tokenizer.json or the tokenizer's vocabulary files") from exc


def load_base(recipe: Recipe, compute: Compute = CPU_FP32):
    """(tokenizer, the base model without an adapter), as a run would load them: for scripts that
    compare against the base (bench/, evaluation notebooks)."""
    return load_tokenizer(recipe), _load_base(recipe, None, compute)


# PyTorch's non-reentrant checkpoint: gradients reach the adapters whether or not a layer's input
# requires them, keyword arguments (position_ids of packed rows) pass through, and the recompute
# replays the forward's RNG (dropout masks), so the numbers are those of a run without it.
_NON_REENTRANT = {"use_reentrant": False}


def build_model(recipe: Recipe, *, labels: list[str] | None = None, log: logging.Logger = logger,
                compute: Compute = CPU_FP32):
    """The trainable model: base model + the recipe's adapter, on the CPU (the caller moves it;
    QLoRA places itself). The frozen weights are held in compute's precision, the trained ones in
    float32 (a full fine-tune's every weight); activations are checkpointed if compute says so.
    `labels` (classification only) names the classes, in index order."""
    spec = recipe.adapter
    model = _load_base(recipe, labels, compute)
    if spec.kind == "full":
        model.requires_grad_(True)
        if compute.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=_NON_REENTRANT)
        return model
    if spec.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        # Upcasts norms and the head to float32, lets gradients flow into the frozen 4-bit layers'
        # inputs and, if asked, turns checkpointing on.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=compute.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=_NON_REENTRANT)
    elif compute.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=_NON_REENTRANT)
    from peft import cast_mixed_precision_params, get_peft_model

    try:
        model = get_peft_model(model, _peft_config(recipe))
    except ValueError as exc:
        raise ModelError(f"adapter.target_modules={spec.target_modules!r} does not match the base model's "
                         f"modules: {exc}; use 'all-linear' or names such as q_proj, v_proj") from exc
    if spec.kind == "qlora":
        keep_4bit_gradients(model)
    elif compute.mixed:
        # PEFT's: the frozen weights stay in the precision, every trained one goes to float32 (PEFT
        # already made the adapters so, but a classifier's new head is a copy of the bf16 one).
        cast_mixed_precision_params(model, compute.dtype)
    log.info("adapter %s: %d trainable of %d parameters", spec.kind,
             sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return model


def keep_4bit_gradients(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU path on every 4-bit linear layer; returns how many.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights for a faster kernel
    the first time it runs in eval mode, and that kernel does not propagate gradients to the
    layer's input: every LoRA adapter below it silently stops learning after the first validation
    pass. The plain dequantising path is exact and differentiable."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _resolve(recipe: Recipe):
    try:
        return resolve_model(recipe.base_model)
    except ModelNotAvailable as exc:
        raise ModelError(f"base_model {recipe.base_model!r}: {exc}") from exc


def _load_base(recipe: Recipe, labels: list[str] | None, compute: Compute):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = _resolve(recipe)
    # The weights in the run's precision, but for a full fine-tune's, which all train (float32; the
    # forward's autocast computes in the precision). SDPA: PyTorch's fused attention kernels.
    dtype = torch.float32 if recipe.adapter.kind == "full" else compute.dtype
    kwargs: dict = {"dtype": dtype, "attn_implementation": "sdpa"}
    if recipe.adapter.kind == "qlora":
        kwargs.update(quantization_config=_bnb_config(recipe, compute), device_map=_device_map())
    try:
        if recipe.task == "classification":
            if not labels:
                raise ModelError("a classification run needs the labels of its train split")
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)}, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if recipe.training.packing:
                use_packed_attention(model)
    except ModelError:
        raise
    except ImportError as exc:  # bitsandbytes missing for qlora
        raise ModelError(f"adapter.kind 'qlora' needs bitsandbytes>=0.50: {exc}; pip install 'bitsandbytes>=0.50'") from exc
    except Exception as exc:  # bad config, missing or truncated weights, unknown architecture: all "not loadable"
        kind = "sequence classifier" if recipe.task == "classification" else "causal LM"
        raise ModelError(f"base_model {recipe.base_model!r} ({path}) could not be loaded as a {kind}: {exc}; "
                         "point base_model at a Hugging Face model folder with config, weights and tokenizer") from exc
    if getattr(model.config, "pad_token_id", None) is None and recipe.task == "classification":
        model.config.pad_token_id = 0
    return model


def _device_map():
    return {"": 0} if torch.cuda.is_available() else {"": "cpu"}


def _bnb_config(recipe: Recipe, compute: Compute):
    from transformers import BitsAndBytesConfig

    spec = recipe.adapter
    # The 4-bit layers dequantise to the run's precision and compute in it (bf16 on a GPU by default).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=compute.dtype,
                              bnb_4bit_quant_storage=torch.uint8)


def _peft_config(recipe: Recipe):
    from peft import LoraConfig, PrefixTuningConfig

    spec = recipe.adapter
    task_type = "SEQ_CLS" if recipe.task == "classification" else "CAUSAL_LM"
    if spec.kind == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=spec.num_virtual_tokens)
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    # SEQ_CLS: peft trains and saves the new classification head in full (modules_to_save).
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      task_type=task_type)


# ------------------------------------------------------------------------------ saving and restoring

def save_trained(model, folder: Path, *, labels: list[str] | None = None, state_dict: dict | None = None) -> None:
    """The trained weights in a loadable folder: a PEFT adapter, or (full) the whole model;
    state_dict: the trained weights gathered from shards (services/trainer/distributed.py)."""
    model.save_pretrained(folder, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    if labels is not None:
        (Path(folder) / LABELS_FILE).write_text(json.dumps(labels))


def restore_trained(model, folder: Path) -> None:
    """Load weights written by `save_trained` back into the same kind of model, in place."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        # prefix tuning: peft loads "prompt_embeddings" into the prompt encoder itself, then reports it
        unexpected = [k for k in getattr(result, "unexpected_keys", None) or () if k != "prompt_embeddings"]
    else:
        state = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(shard))
        if not state:
            raise ModelError(f"checkpoint {folder}: no weights (*.safetensors) to resume from")
        result = model.load_state_dict(state, strict=False)
        # tied weights (lm_head = embeddings) are saved once; only keys the model lacks are wrong
        unexpected = result.unexpected_keys
    if unexpected:
        raise ModelError(f"checkpoint {folder}: its weights do not fit the model ({list(unexpected)[:3]} ...)")
