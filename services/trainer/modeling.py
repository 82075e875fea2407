"""The model a run trains: the recipe's base model (a causal LM, or a sequence classifier for
`task: classification`) with the recipe's adapter — LoRA, QLoRA (4-bit NF4 base, bitsandbytes),
prefix tuning, or none (`full`: every weight trains) — and how its trained weights are saved into
and restored from a checkpoint.

Every kind saves what `PeftModel.from_pretrained` / `AutoModel*.from_pretrained` loads, so a
checkpoint's `adapter/` folder is a result the evaluator and the registry can use as it is.

A run that shards its parameters (FSDP, ZeRO-3) builds the model without the base's weights
(`build_unloaded_model`): they stay in the safetensors files (`WeightFiles`) until each rank reads
the slices it holds (services/trainer/distributed.py), so no rank ever holds the whole model.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.domain.models import ModelNotAvailable, resolve_model
from shared.domain.recipe import Recipe

from services.trainer.compute import CPU_FP32, Compute
from services.trainer.packed_attention import use_packed_attention

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"   # classification: the label of each class index, beside the weights


class ModelError(RuntimeError):
    """The base model or adapter cannot be built; the message says why and what to change."""


@dataclass(frozen=True)
class WeightFiles:
    """Where the weights of a model built without them are: the key, in the safetensors files of
    `folder`, of each parameter — by the module holding it and its name there, which outlive the
    parameter itself (sharding replaces it)."""
    folder: Path
    keys: dict[tuple[Any, str], str]   # (module, parameter name) -> key
    files: dict[str, Path]             # key -> the file holding it

    @classmethod
    def find(cls, model, folder: Path) -> WeightFiles:
        """The parameters of `model` that the files name as the model does (a tied weight under any
        of its names)."""
        from safetensors import safe_open

        files: dict[str, Path] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                files.update({key: file for key in handle.keys() if key not in files})
        keys: dict[tuple[Any, str], str] = {}
        found: set[int] = set()
        for prefix, module in model.named_modules():
            for name, param in module._parameters.items():
                key = f"{prefix}.{name}" if prefix else name
                if param is not None and id(param) not in found and key in files:
                    keys[module, name] = key
                    found.add(id(param))
        return cls(Path(folder), keys, files)

    def covered(self) -> set[int]:
        """The ids of the parameters the files hold."""
        return {id(getattr(module, name)) for module, name in self.keys}

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor `key`, flattened, read from the rows that hold
        them only (a rank's ZeRO-3 partition is a range of the flattened tensor)."""
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as handle:
            stored = handle.get_slice(key)
            shape = stored.get_shape()
            if len(shape) < 2:  # a vector or a scalar: small
                return handle.get_tensor(key).reshape(-1)[start:None if count is None else start + count]
            row = math.prod(shape[1:])
            count = math.prod(shape) - start if count is None else count
            if count <= 0:
                return stored[0:0].reshape(-1)
            first = start // row
            rows = stored[first:-(-(start + count) // row)].reshape(-1)
            return rows[start - first * row:start - first * row + count]


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
    return _with_adapter(_load_base(recipe, labels, compute), recipe, compute, log)


def build_unloaded_model(recipe: Recipe, *, labels: list[str] | None = None, log: logging.Logger = logger,
                         compute: Compute = CPU_FP32, empty: contextlib.AbstractContextManager,
                         device: torch.device) -> tuple[Any, WeightFiles]:
    """`build_model` for a run that shards its parameters, without reading the base's weights: the
    base's modules are created in `empty` (the meta device for FSDP; DeepSpeed's zero.Init for
    ZeRO-3, which partitions each parameter as it is created) and the returned WeightFiles say where
    each parameter's weights are, for World.wrap to read each rank's shards once they are cut. What
    a one-process run initialises afresh — the adapters, a classifier's new head — is made whole on
    `device` with that run's values (the same seeded draws, in the same order). Not for qlora, whose
    base is quantised as it loads."""
    path = _resolve(recipe)
    if isinstance(path, str):  # a hub id: its files, fetched into the hub's cache as from_pretrained fetches them
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    base = _load_base(recipe, labels, compute, empty=empty)
    weights = WeightFiles.find(base, path)
    loaded = weights.covered()
    missing = [name for name, p in base.base_model.named_parameters() if id(p) not in loaded]
    if missing:  # a head may be new (a classifier's); the rest must be in the files as the model names it
        raise ModelError(f"base_model {recipe.base_model!r} ({path}): its safetensors files hold no {missing[:3]} under "
                         "the model's own parameter names, which a sharded run (fsdp, deepspeed_zero3) loads by; "
                         "save the model once with save_pretrained (safetensors), or use distribution.strategy ddp")
    _initialise_afresh(base, weights, _base_dtype(recipe, compute), device, log)
    return _with_adapter(base, recipe, compute, log, device=device), weights


def _with_adapter(model, recipe: Recipe, compute: Compute, log: logging.Logger, *, device: torch.device | None = None):
    spec = recipe.adapter
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
    elif compute.gradient_checkpointing and spec.kind != "prefix":  # prefix: once PEFT has added it (it refuses otherwise)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=_NON_REENTRANT)
    from peft import cast_mixed_precision_params, get_peft_model

    try:
        with _stood_in(model, device):
            model = get_peft_model(model, _peft_config(recipe))
    except ValueError as exc:
        raise ModelError(f"adapter.target_modules={spec.target_modules!r} does not match the base model's "
                         f"modules: {exc}; use 'all-linear' or names such as q_proj, v_proj") from exc
    if spec.kind == "prefix" and compute.gradient_checkpointing:
        _checkpoint_with_prefix(model)
    if spec.kind == "qlora":
        keep_4bit_gradients(model)
    elif compute.mixed:
        # PEFT's: the frozen weights stay in the precision, every trained one goes to float32 (PEFT
        # already made the adapters so, but a classifier's new head is a copy of the bf16 one).
        cast_mixed_precision_params(model, compute.dtype)
    log.info("adapter %s: %d trainable of %d parameters", spec.kind,
             sum(_numel(p) for p in model.parameters() if p.requires_grad), sum(_numel(p) for p in model.parameters()))
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


def _base_dtype(recipe: Recipe, compute: Compute) -> torch.dtype:
    # The weights in the run's precision, but for a full fine-tune's, which all train (float32; the
    # forward's autocast computes in the precision).
    return torch.float32 if recipe.adapter.kind == "full" else compute.dtype


def _load_base(recipe: Recipe, labels: list[str] | None, compute: Compute,
               empty: contextlib.AbstractContextManager | None = None):
    """The base model, loaded; or with `empty`, its modules created in that context and nothing
    read or initialised (`build_unloaded_model` does the rest)."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )
    from transformers.initialization import no_init_weights

    path = _resolve(recipe)
    # Attention: transformers' default, SDPA (PyTorch's fused kernels) where the model supports it,
    # eager where it does not (Gemma 2's soft-capped attention logits, which SDPA cannot apply).
    kwargs: dict = {"dtype": _base_dtype(recipe, compute)}
    if recipe.adapter.kind == "qlora":
        kwargs.update(quantization_config=_bnb_config(recipe, compute), device_map=_device_map())
    try:
        if recipe.task == "classification":
            if not labels:
                raise ModelError("a classification run needs the labels of its train split")
            auto: Any = AutoModelForSequenceClassification
            mapping: Any = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
            config_kwargs: dict = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                                   "label2id": {label: i for i, label in enumerate(labels)}}
        else:
            auto, mapping, config_kwargs = AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING, {}
        if empty is None:
            model = auto.from_pretrained(path, **config_kwargs, **kwargs)
        else:
            config = AutoConfig.from_pretrained(path, **config_kwargs)
            # The model's module imported first: zero.Init gives the classes defined in it an __init__
            # it puts back on exit, dropping what decorators added since (transformers' hub kernels).
            mapping[type(config)]
            with no_init_weights(), empty:
                model = auto.from_config(config, **kwargs)
            model.tie_weights()  # as from_pretrained does once loaded (no_init_weights skips it)
        if recipe.task != "classification" and recipe.training.packing:
            if getattr(model.config.get_text_config(), "attn_logit_softcapping", None):
                raise ModelError(f"base_model {recipe.base_model!r} soft-caps its attention logits (Gemma 2), which "
                                 "packed rows' per-conversation attention does not apply; set training.packing: false")
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


def _initialise_afresh(model, weights: WeightFiles, dtype: torch.dtype, device: torch.device,
                       log: logging.Logger) -> None:
    """What from_pretrained makes besides the weights it loads, made as it makes it: the parameters
    the files lack (a classifier's new head) and the buffers on `device`, the persistent buffers
    read from the files, the rest (RoPE's frequencies, the new head) by the model's
    initialize_weights once everything loaded is marked initialised: the same random draws as one
    process's."""
    loaded = weights.covered()
    fresh: dict[int, torch.nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in loaded:
                param._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' mark
                continue
            if id(param) not in fresh:  # a ZeRO-3 partition is in the precision: a new weight has the base's dtype
                log.warning("%s is not in the base's files: initialised afresh", f"{prefix}.{name}".lstrip("."))
                fresh[id(param)] = torch.nn.Parameter(torch.empty(getattr(param, "ds_shape", param.shape), device=device,
                                                                  dtype=param.dtype if param.is_meta else dtype),
                                                      requires_grad=param.requires_grad)
            module._parameters[name] = fresh[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            if buffer.is_meta:
                module._buffers[name] = buffer = torch.empty_like(buffer, device=device)
            key = f"{prefix}.{name}".lstrip(".")
            if name not in module._non_persistent_buffers_set and key in weights.files:
                with torch.no_grad():
                    buffer.copy_(weights.read(key).view_as(buffer))
                buffer._is_hf_initialized = True  # type: ignore[attr-defined]
    model.initialize_weights()


@contextlib.contextmanager
def _stood_in(model, device: torch.device | None):
    """PEFT makes each adapter on its base layer's device: while it adds them, every meta parameter
    is stood in for by one element on `device` seen with the parameter's shape (stride 0), so that
    the adapters are made there, with a one-process run's values, not on the meta device; the meta
    parameters are put back after, frozen or not as PEFT left their stand-ins."""
    stand_ins: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}  # id(stand-in) -> (it, meta)
    by_meta: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in by_meta:
                    one = torch.zeros((), dtype=param.dtype, device=device).expand(param.shape)
                    by_meta[id(param)] = stand_in = torch.nn.Parameter(one, requires_grad=param.requires_grad)
                    stand_ins[id(stand_in)] = (stand_in, param)
                module._parameters[name] = by_meta[id(param)]
    try:
        yield
    finally:
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) in stand_ins:
                    stand_in, meta = stand_ins[id(param)]
                    module._parameters[name] = meta.requires_grad_(stand_in.requires_grad)


def _checkpoint_with_prefix(model) -> None:
    """Prefix tuning under activation checkpointing. PEFT hands the virtual tokens to the layers in
    a KV cache that each attention call extends; transformers' checkpointed layers drop a cache,
    since their recompute would extend it twice. In a training forward the cache PEFT builds is made
    read-only instead (each layer's update returns the prefix joined to the new keys and values and
    stores nothing: a training forward never reads them back), so the layers may keep it
    (`_can_checkpoint_with_cache`) and the recompute sees what the forward saw. Generation and
    evaluation get PEFT's cache as it is."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    make_prompt = model.get_prompt

    def get_prompt(*args, **kwargs):
        cache = make_prompt(*args, **kwargs)
        if model.training and torch.is_grad_enabled():
            for layer in cache.layers:
                layer.update = functools.partial(_joined_to_prefix, layer.keys, layer.values)
        return cache

    model.get_prompt = get_prompt
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=_NON_REENTRANT)
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


def _joined_to_prefix(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                      *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([keys, new_keys], dim=-2), torch.cat([values, new_values], dim=-2)


def _numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())  # a ZeRO-3 parameter holds its partition only


def _device_map():
    """Where QLoRA's 4-bit base loads: the process's own GPU (LOCAL_RANK under torchrun, where each
    rank holds the whole 4-bit base on its device; sharded loading is for unquantised weights)."""
    return {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else {"": "cpu"}


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


def restore_trained(model, folder: Path, weights: WeightFiles | None = None) -> WeightFiles | None:
    """Load weights written by `save_trained` back into the same kind of model, in place. For a
    model built unloaded (`weights`: its base's files), an adapter loads so (it is small and whole),
    but a whole trained model is not read here: the checkpoint's WeightFiles come back, for World.wrap
    to load each rank's shards from in place of the base's; otherwise `weights` comes back."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        # prefix tuning: peft loads "prompt_embeddings" into the prompt encoder itself, then reports it
        misfits = [k for k in getattr(result, "unexpected_keys", None) or () if k != "prompt_embeddings"]
    elif weights is not None:
        weights = WeightFiles.find(model, folder)
        if not weights.files:
            raise ModelError(f"checkpoint {folder}: no weights (*.safetensors) to resume from")
        found = weights.covered()
        misfits = [name for name, p in model.named_parameters() if id(p) not in found]  # every weight trained
    else:
        state = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(shard))
        if not state:
            raise ModelError(f"checkpoint {folder}: no weights (*.safetensors) to resume from")
        result = model.load_state_dict(state, strict=False)
        # tied weights (lm_head = embeddings) are saved once; only keys the model lacks are wrong
        misfits = result.unexpected_keys
    if misfits:
        raise ModelError(f"checkpoint {folder}: its weights do not fit the model ({list(misfits)[:3]} ...)")
    return weights
