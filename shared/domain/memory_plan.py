"""The memory planner: the peak memory of one training process (one GPU, or the CPU), predicted from
the base model's config.json and the recipe alone, before any weight is downloaded; the largest
micro-batch that fits and the accumulation that keeps the recipe's effective batch; and, when
nothing fits, what to change.

What the trainer holds at its peak (services/trainer: modeling.py, objectives.py, distributed.py):

- weights: the frozen base in its dtype (the compute dtype; QLoRA: NF4, 0.5 byte a parameter plus
  its quantisation constants, with the embeddings and the head left unquantised and upcast to
  float32 by peft's prepare_model_for_kbit_training); trainable weights in float32;
- gradients (float32, of the trainable weights) and AdamW's two float32 moments;
- activations saved for the backward pass, per layer and token, counted tensor by tensor for the
  layer as transformers writes it (`_layer_bytes_per_token`; with checkpointing, each layer's input
  plus one layer recomputed); the logits only at trained positions when the head is plain (a chunk of
  them at a time), every position's otherwise (soft-capped or scaled heads, prefix tuning);
- on a GPU the CUDA context and the caching allocator's slack; on a CPU, the heap glibc keeps
  after activations are freed (see CPU_HEAP_RETENTION).

The phases do not all peak together: the static part (weights, optimizer state) plus the largest
of the forward/backward peak (activations and logits, with the gradients of earlier micro-batches
when the step accumulates), the end of the backward pass (every gradient), and the optimizer step
(its temporaries). Sharded strategies divide what they shard by the number of processes.

Compared with the published estimators:
- HF accelerate `estimate-memory` counts weights x 4 for Adam training (weights, gradients, two
  moments, all in the load dtype) and no activations; here the moments and gradients are float32
  whatever the base's dtype, only trainable weights have them, and activations usually dominate.
- DeepSpeed `estimate_zero3_model_states_mem_needs`: 18 bytes a parameter / GPUs (fp16 weights and
  gradients, fp32 master and moments) + 4 x the largest layer; ours is 20 / GPUs (this trainer
  gives DeepSpeed float32 parameters: a float32 master copy, float32 gradients, two moments) plus
  the gathered layer and its prefetched neighbour; ZeRO-2: 4 x params + 16 / GPUs, as theirs.
- Korthikanti et al. 2022 (activation recomputation): 34 x s x b x h + 5 x a x s^2 x b bytes a
  layer with 16-bit activations, dropout and a 4h MLP. Ours counts the tensors the layer saves:
  no dropout masks (p = 0), SDPA / flash attention (no s^2 term; eager attention keeps it), gated
  MLPs (4 x intermediate), GQA's narrower keys and values, RMSNorm's float32 input copy, and the
  LoRA branches (their rank-r outputs, and a copy of each adapted module's input when the base
  computes in 16 bits). With checkpointing it is their 2 x s x b x h a layer plus one layer's
  activations.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.domain.recipe import GPU_TABLE, Recipe

MIB, GIB = 2**20, 2**30
MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"

# The chunked cross-entropy (services/trainer/objectives.py, LOGITS_CHUNK) materialises the logits
# of as many trained positions at once as make this many elements (vocabulary x positions), or as
# many elements as the hidden states it reads, whichever is more; None: all positions at once.
LOGITS_CHUNK_ELEMENTS: int | None = 2**24
# The CUDA context, cuBLAS workspaces and NCCL buffers outside torch's allocator, and the caching
# allocator's slack over what it hands out (block rounding, fragmentation).
CUDA_CONTEXT_BYTES = 1 * GIB
CUDA_FRAGMENTATION = 0.05
# On a CPU, glibc keeps the heap that freed activations and their gradients occupied (tensors under
# its 32 MiB mmap threshold go to the heap and are not returned): a share of what a forward/backward
# pass would save without checkpointing, by (float32?, checkpointing?), and more when a step runs
# several micro-batches (the next pass does not fit into the holes the last one left). Fitted on the
# tuning configurations of bench/plan (bench/README.md); a measured fact of glibc, not a derivation.
CPU_HEAP_RETENTION = {(True, False): 1.0, (True, True): 0.55, (False, False): 0.4, (False, True): 0.4}
CPU_HEAP_RETENTION_ACCUMULATING = 0.6
# Python, the tokenizer, the encoded examples, autograd's graph: resident beyond the tensors.
CPU_RUNTIME_BYTES = 192 * MIB
# Host memory of one GPU process beyond the tensors it loads: CUDA, torch and NCCL libraries.
HOST_RUNTIME_BYTES = 4 * GIB
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Families whose layers differ from the Llama shape (separate q/k/v/o, gated MLP, RMSNorm). These
# have a plain two-matrix MLP, LayerNorm and biases:
_GPT_STYLE = {"gpt_neox", "gpt2", "gptj", "opt", "bert", "roberta", "distilbert", "falcon", "phi", "starcoder2"}
_ENCODERS = {"bert", "roberta", "distilbert"}
_EAGER = {"gemma2", *_ENCODERS}      # no SDPA in transformers (soft-capping), or dropout on the probabilities
_SANDWICH_NORMS = {"gemma2", "gemma3", "gemma3_text"}          # norms after attention and MLP as well
_QK_NORM = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2"}
_QKV_BIAS = {"qwen2", "qwen2_moe"}
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "bert", "gpt2", "opt"}


class PlanError(ValueError):
    """No plan can be made: the base model's configuration cannot be read or is not a transformer's."""


# ------------------------------------------------------------------------------ the model's shape

@dataclass(frozen=True)
class Linear:
    name: str          # the module name peft matches target_modules against
    fan_in: int
    fan_out: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model, read from its config.json."""
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]       # one layer's linear modules (attention, MLP, MoE router)
    gated_mlp: bool = True
    layer_norm: bool = False          # LayerNorm (weight and bias) rather than RMSNorm
    parallel_residual: bool = False   # attention and MLP read the same normalised input (GPT-NeoX)
    fused_qkv: bool = False
    experts: int = 0                  # MoE: experts per layer (their weights are not nn.Linear: no LoRA)
    experts_per_token: int = 0
    expert_intermediate: int = 0
    positions: int = 0                # learned position embeddings
    plain_head: bool = True           # logits = the output embedding of the last hidden state, nothing after
    softcapped_head: bool = False
    softcapped_attention: bool = False
    eager_attention: bool = False     # attention probabilities materialised (no SDPA: soft-capping, dropout)
    encoder: bool = False
    checkpoint_dtype: str = "fp32"    # the dtype of the weights on disk

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        # a multimodal model's language model is described by its text_config
        cfg = {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config
        model_type = str(cfg.get("model_type") or "").lower()
        try:
            hidden = int(cfg.get("hidden_size") or cfg["n_embd"])
            layers = int(cfg.get("num_hidden_layers") or cfg["n_layer"])
            heads = int(cfg.get("num_attention_heads") or cfg["n_head"])
            vocab = int(cfg["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"config.json lacks {exc} (hidden size, layers, heads, vocabulary): not a transformer "
                            "the planner knows") from None
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        intermediate = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden)
        gated = model_type not in _GPT_STYLE
        experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        expert_inter = int(cfg.get("moe_intermediate_size") or intermediate) if experts else 0
        bias_all = model_type in _GPT_STYLE or bool(cfg.get("mlp_bias"))
        qkv_bias = bias_all or model_type in _QKV_BIAS or bool(cfg.get("attention_bias"))
        q, kv = heads * head_dim, kv_heads * head_dim
        if model_type == "gpt_neox":
            attention = [Linear("query_key_value", hidden, q + 2 * kv, True), Linear("dense", q, hidden, True)]
        elif model_type == "phi3":
            attention = [Linear("qkv_proj", hidden, q + 2 * kv), Linear("o_proj", q, hidden)]
        elif model_type in _ENCODERS:
            attention = [Linear(n, hidden, hidden, True) for n in ("query", "key", "value", "dense")]
        else:
            attention = [Linear("q_proj", hidden, q, qkv_bias), Linear("k_proj", hidden, kv, qkv_bias),
                         Linear("v_proj", hidden, kv, qkv_bias), Linear("o_proj", q, hidden, bias_all)]
        if experts:
            mlp = [Linear("gate", hidden, experts)]   # the router; the experts are fused 3-D parameters
        elif model_type == "gpt_neox":
            mlp = [Linear("dense_h_to_4h", hidden, intermediate, True), Linear("dense_4h_to_h", intermediate, hidden, True)]
        elif model_type == "phi3":
            mlp = [Linear("gate_up_proj", hidden, 2 * intermediate), Linear("down_proj", intermediate, hidden)]
        elif model_type in _ENCODERS:
            mlp = [Linear("dense", hidden, intermediate, True), Linear("dense", intermediate, hidden, True)]
        elif not gated:
            mlp = [Linear("fc1", hidden, intermediate, bias_all), Linear("fc2", intermediate, hidden, bias_all)]
        else:
            mlp = [Linear(n, hidden, intermediate, bias_all) for n in ("gate_proj", "up_proj")] + \
                  [Linear("down_proj", intermediate, hidden, bias_all)]
        tied = cfg.get("tie_word_embeddings")
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        return cls(
            model_type=model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            intermediate=intermediate, vocab=vocab,
            tied=bool(tied) if tied is not None else model_type in _TIED_BY_DEFAULT,
            linears=tuple(attention + mlp), gated_mlp=gated, layer_norm=model_type in _GPT_STYLE,
            parallel_residual=bool(cfg.get("use_parallel_residual", model_type == "gpt_neox")),
            fused_qkv=model_type in ("gpt_neox", "phi3"),
            experts=experts, experts_per_token=int(cfg.get("num_experts_per_tok") or (2 if experts else 0)),
            expert_intermediate=expert_inter,
            positions=int(cfg.get("max_position_embeddings") or 0) if model_type in ("gpt2", "opt", *_ENCODERS) else 0,
            plain_head=not any(cfg.get(k) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")),
            softcapped_head=bool(cfg.get("final_logit_softcapping")),
            softcapped_attention=bool(cfg.get("attn_logit_softcapping")),
            eager_attention=bool(cfg.get("attn_logit_softcapping")) or model_type in _EAGER,
            encoder=model_type in _ENCODERS,
            checkpoint_dtype=_CONFIG_DTYPES.get(dtype, "fp32"),
        )

    # -------------------------------------------------------------------------- parameters

    @property
    def norm_params(self) -> int:
        """One layer's norms (weight, and bias for LayerNorm)."""
        norms = 4 if self.model_type in _SANDWICH_NORMS else 2
        extra = 2 * self.head_dim if self.model_type in _QK_NORM else 0
        return norms * self.hidden * (2 if self.layer_norm else 1) + extra

    @property
    def expert_params(self) -> int:
        """One layer's MoE experts (three matrices each)."""
        return self.experts * 3 * self.hidden * self.expert_intermediate

    @property
    def layer_params(self) -> int:
        return sum(m.params for m in self.linears) + self.expert_params + self.norm_params

    @property
    def embedding_params(self) -> int:
        return (self.vocab + self.positions) * self.hidden

    @property
    def head_params(self) -> int:
        """The output embedding when it is a matrix of its own (not tied to the input one)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        final_norm = self.hidden * (2 if self.layer_norm else 1)
        return self.embedding_params + self.layers * self.layer_params + final_norm + self.head_params

    def adapted(self, target_modules: str | tuple[str, ...]) -> list[Linear]:
        """The linear modules of one layer LoRA adapts: all of them for 'all-linear' (peft leaves the
        output layer out), else those whose name matches (a regex string, or a list of names)."""
        if target_modules == "all-linear":
            return list(self.linears)
        if isinstance(target_modules, str):
            return [m for m in self.linears if re.fullmatch(target_modules, m.name)]
        return [m for m in self.linears if m.name in target_modules]


# ------------------------------------------------------------------------------ where it runs

@dataclass(frozen=True)
class Device:
    """What one process trains on: a GPU of the recipe's hardware, or the CPU (its memory)."""
    kind: str                  # a GPU_TABLE key, a GPU's own name (one seen at run time), or "cpu"
    capacity_bytes: int
    bf16: bool = True

    @property
    def gpu(self) -> bool:
        return self.kind != "cpu"


def gpu_device(kind: str) -> Device:
    return Device(kind, int(GPU_TABLE[kind]["memory_gib"] * GIB))


def cpu_device(capacity_bytes: int | None = None) -> Device:
    """This machine's CPU, its capacity the memory available now (or the one given)."""
    if capacity_bytes is None:
        capacity_bytes = _available_memory()
    return Device("cpu", capacity_bytes, bf16=False)


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_precision(recipe: Recipe, device: Device) -> str:
    """training.precision as the trainer resolves it: auto is bf16 on a GPU with bf16 (fp16 on one
    without), fp32 on a CPU."""
    precision = recipe.training.precision
    if precision != "auto":
        return precision
    if not device.gpu:
        return "fp32"
    return "bf16" if device.bf16 else "fp16"


def resolve_checkpointing(recipe: Recipe, device: Device) -> bool:
    """training.gradient_checkpointing as the trainer resolves it: None is on on a GPU, off on a CPU."""
    flag = recipe.training.gradient_checkpointing
    return device.gpu if flag is None else flag


# ------------------------------------------------------------------------------ the estimate

@dataclass(frozen=True)
class Setup:
    """Everything an estimate depends on besides the micro-batch."""
    shape: ModelShape
    recipe: Recipe
    device: Device
    ranks: int
    precision: str
    checkpointing: bool
    logits_chunk: int | None = LOGITS_CHUNK_ELEMENTS

    @property
    def strategy(self) -> str:
        return self.recipe.distribution.strategy if self.ranks > 1 else "single"

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    @property
    def kind(self) -> str:
        return self.recipe.adapter.kind

    @property
    def loads_sharded(self) -> bool:
        """Whether each rank loads only its shards of the base (as services/trainer/distributed.py's
        World.loads_sharded decides): fsdp and ZeRO-3 over several processes, QLoRA aside."""
        return self.ranks > 1 and self.strategy in ("fsdp", "deepspeed_zero3") and self.kind != "qlora"

    @property
    def rows_per_example(self) -> int:
        return 2 if self.recipe.data_kind == "preference" else 1   # chosen and rejected in one forward

    def trainable_params(self) -> int:
        shape, spec = self.shape, self.recipe.adapter
        if self.kind == "full":
            return shape.params
        if self.kind == "prefix":
            return spec.num_virtual_tokens * shape.layers * 2 * shape.hidden
        per_layer = sum(spec.r * (m.fan_in + m.fan_out) for m in shape.adapted(spec.target_modules))
        return shape.layers * per_layer

    def frozen_bytes(self) -> tuple[int, int]:
        """(bytes of the frozen base, of which quantised): the compute dtype's bytes a weight;
        QLoRA: NF4 linear weights (0.5 byte, plus an absmax a block of 64, itself quantised to 8 bits
        with double quantisation), everything else in float32 (prepare_model_for_kbit_training)."""
        shape = self.shape
        if self.kind == "full":
            return 0, 0
        if self.kind == "qlora":
            quantised = shape.layers * (sum(m.fan_in * m.fan_out for m in shape.linears) + shape.expert_params)
            constants = quantised / 64 * (1 + 4 / 256) if self.recipe.adapter.double_quant else quantised / 64 * 4
            return int(quantised * 0.5 + constants + (shape.params - quantised) * 4), quantised
        return shape.params * DTYPE_BYTES[self.precision], 0

    def rows(self, micro_batch: int) -> int:
        """Sequences one forward pass holds: packed rows go one at a time on a CPU (training.py)."""
        if self.recipe.training.packing and not self.device.gpu:
            return 1
        return micro_batch * self.rows_per_example


def _layer_bytes_per_token(setup: Setup, seq: int) -> float:
    """Bytes one layer saves for the backward pass, per token (what autograd keeps alive)."""
    s, a = setup.shape, setup.act_bytes
    full, lora = setup.kind == "full", setup.kind in ("lora", "qlora")
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    # A norm keeps its input (RMSNorm: an upcast float32 copy) and its output (the next linear's input);
    # a trained RMSNorm weight also keeps the normalised input. Parallel residual: one input for both.
    norm_in = a if s.layer_norm else 4
    norms = 2 * a * h + (1 if s.parallel_residual else 2) * norm_in * h
    if full and not s.layer_norm:
        norms += 2 * a * h
    if s.model_type in _SANDWICH_NORMS:       # post-attention / post-MLP norms: their inputs
        norms += 2 * 4 * h
    if s.model_type in _QK_NORM:
        norms += 4 * (q + kv)
    # Attention: the rotated queries and keys, the values (a view that keeps a fused qkv output
    # whole), the output; SDPA's log-sum-exp; eager attention its probabilities (and soft-cap).
    if s.fused_qkv:
        attention = a * (q + 2 * kv) + a * (q + kv) + a * q
    else:
        attention = a * (2 * q + 2 * kv)
    if s.eager_attention:
        # repeat_kv's full-width keys and values; the float32 softmax output, its 16-bit copy, the
        # soft-cap's tanh output: one probability per head and key position
        probabilities = 4 + (a if a != 4 else 0) + (a if s.softcapped_attention else 0)
        attention += a * 2 * (q - kv) + s.heads * seq * probabilities
    else:
        attention += 4 * s.heads
    # MLP: gated, the gate's output, its activation, the up projection and their product; plain,
    # the first projection's output and its activation. MoE: per routed token copy, its experts'.
    inner = s.expert_intermediate * s.experts_per_token if s.experts else s.intermediate
    mlp = a * inner * (4 if s.gated_mlp else 2) + (4 * s.experts if s.experts else 0)
    # LoRA: each adapted module's rank-r output; in 16 bits, the copy of its input that autocast
    # makes of the float32 one peft casts it to (`_cast_input_dtype`), one per module even where
    # modules share an input; dropout, its output and mask.
    adapter = 0
    if lora:
        spec = setup.recipe.adapter
        for m in s.adapted(spec.target_modules):
            adapter += a * spec.r + (a * m.fan_in if a != 4 else 0) + ((a + 1) * m.fan_in if spec.dropout else 0)
    return norms + attention + mlp + adapter


def _estimate(setup: Setup, micro_batch: int) -> "Estimate":
    """One process's peak at this micro-batch, and its components (bytes)."""
    shape, recipe, device, ranks = setup.shape, setup.recipe, setup.device, setup.ranks
    strategy, a = setup.strategy, setup.act_bytes
    seq = recipe.training.max_seq_len + (recipe.adapter.num_virtual_tokens if setup.kind == "prefix" else 0)
    rows = setup.rows(micro_batch)
    tokens = rows * recipe.training.max_seq_len

    trainable = setup.trainable_params()
    frozen, quantised = setup.frozen_bytes()
    if not device.gpu and setup.kind == "qlora" and shape.checkpoint_dtype == "fp32":
        # the unquantised tensors are views of the mapped checkpoint file, which stays mapped: the
        # pages read while quantising the others stay resident
        frozen += quantised * 4
    params_shard = ranks if strategy in ("fsdp", "deepspeed_zero3") else 1
    grads_shard = ranks if strategy in ("fsdp", "deepspeed_zero2", "deepspeed_zero3") else 1
    zero = strategy in ("deepspeed_zero2", "deepspeed_zero3")
    # DeepSpeed holds its module (and so its gradients) in the precision and float32 masters of its
    # partition in the optimizer; the others hold trainable weights in float32 (FSDP reduces in float32)
    module = a if zero else 4
    weights = frozen // params_shard
    adapter = module * trainable // params_shard
    gradients = module * trainable // grads_shard
    optimizer = 8 * trainable // grads_shard + (4 * trainable // ranks if zero else 0)

    # Activations: every layer's saved tensors, or (checkpointing) every layer's input plus one
    # layer recomputed; the final norm and the hidden states the head reads.
    per_layer = _layer_bytes_per_token(setup, seq) * tokens
    head_inputs = (4 + 2 * a) * shape.hidden * tokens
    uncheckpointed = shape.layers * per_layer + head_inputs
    if setup.checkpointing:
        activations = shape.layers * a * shape.hidden * tokens + per_layer + head_inputs
    else:
        activations = uncheckpointed
    if setup.kind == "full" and a != 4 and strategy in ("single", "ddp"):
        activations += a * shape.params        # autocast's cached 16-bit copies of the float32 weights
    # Gathered parameters, in the precision (FSDP's MixedPrecisionPolicy, DeepSpeed's module): FSDP's
    # root (embeddings, head) stays gathered after the forward, and a block is gathered with the next
    # prefetched; ZeRO-3 gathers a layer and prefetches one.
    gathered = 0
    if strategy == "fsdp":
        gathered = a * (shape.embedding_params + shape.head_params + 2 * shape.layer_params)
    elif strategy == "deepspeed_zero3":
        gathered = a * 2 * shape.layer_params

    # Logits: a plain head at trained positions (worst case: all of them), a chunk at a time; in the
    # cross-entropy's backward the log-softmax output, its gradient and the input's gradient
    # (float32) coexist, plus the 16-bit logits' gradient. Another head: every position's logits.
    if shape.encoder or recipe.task == "classification":
        logits = 0
    else:
        positions = tokens
        if shape.plain_head and setup.logits_chunk is not None:
            positions = min(tokens, max(1, max(setup.logits_chunk, tokens * shape.hidden) // shape.vocab))
        logits = (12 + (a if a != 4 else 0)) * positions * shape.vocab
        if shape.softcapped_head:    # the soft-cap's tanh output, every position's, kept for its backward
            logits += a * rows * seq * shape.vocab

    communication = 0
    if strategy == "ddp":            # distributed.py sums gradients in flat float32 buckets of 2^23
        communication = 2 * 4 * min(2**23, trainable)
    largest = max([m.params for m in shape.linears] + [shape.embedding_params]) if setup.kind == "full" else 0
    # GPU: AdamW's foreach step holds a float32 temporary of every parameter; CPU's per-tensor step,
    # two of the largest.
    step_temporaries = 4 * trainable // grads_shard if device.gpu else 2 * 4 * largest // params_shard

    sizes = {"weights": weights, "adapter": adapter, "gradients": gradients, "optimizer": optimizer,
             "activations": activations, "logits": logits, "gathered": gathered, "communication": communication}
    # The phases, each with what it holds: loading (on a CPU the checkpoint file's pages as well),
    # the forward/backward peak (the
    # gradients of earlier micro-batches with it when the step accumulates), the end of the backward
    # pass (every gradient; on a CPU the activations' heap is still held), the optimizer step.
    accumulating = math.ceil(recipe.training.batch_size * recipe.training.grad_accum / ranks) > micro_batch
    # CPU: the heap glibc keeps once the backward pass frees activations, less what new gradients
    # (a first micro-batch's, allocated in that pass) take back of it
    kappa = CPU_HEAP_RETENTION[(a == 4, setup.checkpointing)] + (CPU_HEAP_RETENTION_ACCUMULATING if accumulating else 0)
    retained = 0 if device.gpu else max(0, int(kappa * uncheckpointed) - (0 if accumulating else gradients))
    static = {"weights": weights, "adapter": adapter, "optimizer": optimizer}
    # Loading: the whole model on each process, but where each rank reads only its shards (fsdp and
    # ZeRO-3 over several processes, QLoRA aside: services/trainer/distributed.py loads_sharded); an
    # adapter is made whole on every rank before it is cut.
    load_shard = ranks if setup.loads_sharded else 1
    phases = {
        "load": {"weights": frozen // load_shard,
                 "adapter": 4 * trainable // (load_shard if setup.kind == "full" else 1),
                 "overhead": 0 if device.gpu else _cpu_load_bytes(setup) // load_shard},
        "forward_backward": {**static, "activations": activations, "logits": logits, "gathered": gathered,
                             "communication": communication, "gradients": gradients if accumulating else 0,
                             "overhead": retained},
        "end_of_backward": {**static, "gradients": gradients, "gathered": gathered, "communication": communication,
                            "activations": 0 if device.gpu else activations},
        "optimizer_step": {**static, "gradients": gradients, "optimizer": optimizer + step_temporaries},
    }
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    at_peak = {k: phases[phase].get(k, 0) for k in (*sizes, "overhead")}
    allocated = sum(v for k, v in at_peak.items() if k != "overhead")
    if device.gpu:
        at_peak["overhead"] += CUDA_CONTEXT_BYTES + int(CUDA_FRAGMENTATION * allocated)
    elif phase != "load":        # loading comes before the examples and autograd's graph
        at_peak["overhead"] += CPU_RUNTIME_BYTES
    return Estimate(micro_batch=micro_batch, tokens=tokens, sizes={k: int(v) for k, v in sizes.items()},
                    at_peak={k: int(v) for k, v in at_peak.items()}, phase=phase, allocated=int(allocated),
                    phases={name: int(sum(held.values())) for name, held in phases.items()})


def _cpu_load_bytes(setup: Setup) -> int:
    """On a CPU, what loading holds beyond the loaded weights: a checkpoint stored in another dtype
    than the one loaded is read through a mapping of the file, whose pages stay resident until the
    load ends (a checkpoint in the loaded dtype is not copied: the weights are views of the file).
    A full fine-tune's and QLoRA's unquantised weights load in float32, the others' in the precision."""
    shape = setup.shape
    loaded = "fp32" if setup.kind in ("full", "qlora") else setup.precision
    return 0 if shape.checkpoint_dtype == loaded else shape.params * DTYPE_BYTES[shape.checkpoint_dtype]


@dataclass(frozen=True)
class Estimate:
    micro_batch: int
    tokens: int                  # per forward pass
    sizes: dict[str, int]        # each component's whole size
    at_peak: dict[str, int]      # what coexists at the peak (sums to peak), overhead included
    phase: str                   # load | forward_backward | end_of_backward | optimizer_step
    allocated: int               # tensors alive at the peak (torch.cuda.max_memory_allocated's measure)
    phases: dict[str, int]       # what each phase holds (bytes, overhead apart from the CUDA context)

    @property
    def peak(self) -> int:
        return sum(self.at_peak.values())


# ------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Plan:
    """The plan of one run: per process (one GPU, or the CPU), at the chosen micro-batch."""
    fits: bool
    peak_bytes: int
    micro_batch: int             # examples per forward pass (0: not even one fits)
    grad_accum: int              # micro-batches per step, so that micro_batch x grad_accum = the recipe's
    gpu: str                     # GPU_TABLE key, or "cpu"
    capacity_bytes: int
    processes: int
    strategy: str
    precision: str
    gradient_checkpointing: bool
    phase: str                   # where the peak falls: load | forward_backward | end_of_backward | optimizer_step
    phase_bytes: dict[str, int]  # what each phase holds, overhead apart
    components: dict[str, int]   # each component's whole size, bytes
    at_peak: dict[str, int]      # what coexists at the peak: sums to peak_bytes
    allocated_bytes: int         # tensors alive at the peak (what torch.cuda.max_memory_allocated measures)
    activations_bytes: dict[str, int]   # the activations with checkpointing "on" and "off"
    params: int
    trainable_params: int
    tokens_per_micro_batch: int
    largest_micro_batch: int     # the largest that fits whatever the recipe's batch (up to 1024)
    host_bytes: int              # host memory of one node's pod (the GKE Job's request)
    model_type: str
    advice: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = field(default=(
        "every row max_seq_len tokens long, every position trained (the worst case)",
        "frozen weights in the compute dtype; trainable weights, gradients and AdamW state in float32",
    ))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["advice"], data["assumptions"] = list(self.advice), list(self.assumptions)
        return data

    def describe(self) -> str:
        """The plan as a few lines of text: components, peak against capacity, micro-batch, advice."""
        where = "CPU" if self.gpu == "cpu" else f"{self.gpu.upper()} ({_gib(self.capacity_bytes)} GiB)"
        lines = [f"memory plan: {self.model_type}, {self.params / 1e9:.3g}B params ({self.trainable_params:,} trained), "
                 f"{self.processes} process(es) on {where}, {self.strategy}, {self.precision}, "
                 f"checkpointing {'on' if self.gradient_checkpointing else 'off'}"]
        width = max(len(k) for k in self.components)
        for name, size in self.components.items():
            lines.append(f"  {name:<{width}}  {_gib(size):>9} GiB   at the peak {_gib(self.at_peak.get(name, 0)):>9} GiB")
        lines.append(f"  {'overhead':<{width}}  {'':>9}       at the peak {_gib(self.at_peak['overhead']):>9} GiB")
        lines.append(f"  activations with checkpointing {_gib(self.activations_bytes['on'])} GiB, without "
                     f"{_gib(self.activations_bytes['off'])} GiB")
        lines.append("  by phase: " + ", ".join(f"{name} {_gib(size)} GiB" for name, size in self.phase_bytes.items()))
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"peak {_gib(self.peak_bytes)} GiB of {_gib(self.capacity_bytes)} GiB ({self.phase}): {verdict}; "
                     f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation "
                     f"(largest micro-batch that fits: {self.largest_micro_batch})")
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def plan(config: dict | ModelShape, recipe: Recipe, device: Device | None = None) -> Plan:
    """The plan of `recipe` on `device` (default: a GPU of the recipe's hardware, one per process)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    device = device or gpu_device(recipe.hardware.gpu)
    setup = _setup(shape, recipe, device)
    spec = recipe.training
    effective = spec.batch_size * spec.grad_accum
    share = math.ceil(effective / setup.ranks)   # examples of a step each process trains
    # micro-batches the recipe allows: divisors of the effective batch (it stays the same) up to
    # batch_size, the most a forward pass may hold
    candidates = [m for m in range(min(spec.batch_size, share), 0, -1) if effective % m == 0]
    chosen = next((e for e in (_estimate(setup, m) for m in candidates) if e.peak <= device.capacity_bytes), None)
    estimate = chosen or _estimate(setup, 1)
    fits = chosen is not None
    micro = chosen.micro_batch if chosen else 0
    largest = _largest_fitting(setup)
    other = replace(setup, checkpointing=not setup.checkpointing)
    activations = {("on" if setup.checkpointing else "off"): estimate.sizes["activations"],
                   ("off" if setup.checkpointing else "on"): _estimate(other, estimate.micro_batch).sizes["activations"]}
    return Plan(
        fits=fits, peak_bytes=estimate.peak, micro_batch=micro,
        grad_accum=effective // micro if micro else 0, gpu=device.kind, capacity_bytes=device.capacity_bytes,
        processes=setup.ranks, strategy=setup.strategy, precision=setup.precision,
        gradient_checkpointing=setup.checkpointing, phase=estimate.phase, phase_bytes=estimate.phases,
        components=estimate.sizes,
        at_peak=estimate.at_peak, allocated_bytes=estimate.allocated, activations_bytes=activations,
        params=shape.params, trainable_params=setup.trainable_params(), tokens_per_micro_batch=estimate.tokens,
        largest_micro_batch=largest, host_bytes=_host_bytes(setup), model_type=shape.model_type,
        advice=() if fits else tuple(_advice(shape, recipe, device, estimate)))


def estimate(config: dict | ModelShape, recipe: Recipe, device: Device, micro_batch: int, *,
             logits_chunk: int | None = LOGITS_CHUNK_ELEMENTS) -> Estimate:
    """The peak and its components at a given micro-batch (bench/plan compares it with measured
    peaks; `logits_chunk` None for a trainer that computes every trained position's logits at once)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    return _estimate(replace(_setup(shape, recipe, device), logits_chunk=logits_chunk), micro_batch)


def _setup(shape: ModelShape, recipe: Recipe, device: Device) -> Setup:
    return Setup(shape=shape, recipe=recipe, device=device, ranks=recipe.hardware.total_gpus if device.gpu else 1,
                 precision=resolve_precision(recipe, device), checkpointing=resolve_checkpointing(recipe, device))


def _largest_fitting(setup: Setup, limit: int = 1024) -> int:
    """The largest micro-batch whose peak fits (peaks grow with the micro-batch): 0 when none does."""
    capacity = setup.device.capacity_bytes
    if _estimate(setup, 1).peak > capacity:
        return 0
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        if _estimate(setup, mid).peak <= capacity:
            low = mid
        else:
            high = mid - 1
    return low


def _host_bytes(setup: Setup) -> int:
    """Host memory of one node's pod on GKE: each process loads the base model on the CPU before
    moving it to its GPU (QLoRA loads straight onto the GPU; a sharded load reads a tensor at a time
    into its shards), and rank 0 gathers the trained weights
    and optimizer state to write a checkpoint (safetensors serialises the weights into one more copy);
    plus the CUDA / torch libraries of every process."""
    shape, recipe = setup.shape, setup.recipe
    per_gpu = recipe.hardware.count if setup.device.gpu else 1
    if setup.kind == "qlora":
        load = 0
    elif setup.loads_sharded:    # each rank reads its slices straight into its GPU's shards
        load = max([m.params for m in shape.linears] + [shape.embedding_params]) * 4
    else:
        load = shape.params * (4 if setup.kind == "full" else DTYPE_BYTES[setup.precision])
    trainable = setup.trainable_params()
    checkpoint = 4 * trainable * 2 + 8 * trainable
    return per_gpu * (HOST_RUNTIME_BYTES + load) + checkpoint


def _advice(shape: ModelShape, recipe: Recipe, device: Device, estimate: Estimate) -> list[str]:
    """What to change so that the run fits, each checked with the planner: QLoRA, checkpointing, a
    bigger GPU, more GPUs with sharding, a shorter max_seq_len."""
    from shared.domain.recipe import apply_overrides

    out = []
    if device.gpu and estimate.phase == "load" and recipe.hardware.total_gpus > 1 and recipe.adapter.kind == "qlora":
        training = max(v for k, v in estimate.phases.items() if k != "load")
        out.append(f"note that QLoRA's 4-bit base loads whole on each GPU before {recipe.distribution.strategy} "
                   f"shards it ({_gib(estimate.phases['load'])} GiB; training itself holds {_gib(training)} GiB), "
                   "so no layout of GPUs helps")

    def fits(overrides: dict, on: Device | None = None) -> Plan | None:
        try:
            changed = apply_overrides(recipe, overrides)
        except ValueError:
            return None
        target = on or (gpu_device(changed.hardware.gpu) if device.gpu else device)
        setup = _setup(shape, changed, target)
        return None if _estimate(setup, 1).peak > target.capacity_bytes else plan(shape, changed, target)

    if recipe.adapter.kind in ("lora", "full") and (p := fits({"adapter.kind": "qlora"})):
        out.append(f"use QLoRA (adapter.kind: qlora): peak {_gib(p.peak_bytes)} GiB")
    if not resolve_checkpointing(recipe, device) and (p := fits({"training.gradient_checkpointing": True})):
        out.append(f"turn on activation checkpointing (training.gradient_checkpointing: true): peak "
                   f"{_gib(p.peak_bytes)} GiB")
    if device.gpu:
        kinds = sorted(GPU_TABLE, key=lambda k: GPU_TABLE[k]["memory_gib"])
        bigger = [k for k in kinds if GPU_TABLE[k]["memory_gib"] * GIB > device.capacity_bytes]
        for gpu in bigger:
            if p := fits({"hardware.gpu": gpu}):
                out.append(f"a bigger GPU (hardware.gpu: {gpu}, {GPU_TABLE[gpu]['memory_gib']:g} GiB): peak "
                           f"{_gib(p.peak_bytes)} GiB")
                break
        if recipe.adapter.kind in ("lora", "full") and not any("adapter.kind" in a for a in out):
            for gpu in bigger:
                if p := fits({"adapter.kind": "qlora", "hardware.gpu": gpu}):
                    out.append(f"QLoRA on a bigger GPU (adapter.kind: qlora, hardware.gpu: {gpu}): peak "
                               f"{_gib(p.peak_bytes)} GiB")
                    break
        strategy = recipe.distribution.strategy if recipe.distribution.strategy in ("fsdp", "deepspeed_zero3") \
            else "fsdp"
        # the fewest GPUs that fit, the smallest kind first
        layouts = [(c, 1) for c in (2, 4, 8)] + [(8, n) for n in (2, 4, 8, 16)]
        for (count, nodes), gpu in ((layout, gpu) for layout in layouts for gpu in [recipe.hardware.gpu, *bigger]):
            if count * nodes <= recipe.hardware.total_gpus:
                continue
            if p := fits({"hardware.gpu": gpu, "hardware.count": count, "hardware.nodes": nodes,
                          "distribution.strategy": strategy}):
                where = (f"hardware.gpu: {gpu}, " if gpu != recipe.hardware.gpu else "") \
                    + f"hardware.count: {count}" + (f", hardware.nodes: {nodes}" if nodes > 1 else "")
                out.append(f"more GPUs that shard the model ({where}, distribution.strategy: {strategy}): peak "
                           f"{_gib(p.peak_bytes)} GiB per GPU")
                break
    seq = recipe.training.max_seq_len
    while seq > 16:
        seq = max(16, seq // 2)
        if p := fits({"training.max_seq_len": seq}):
            out.append(f"a shorter training.max_seq_len: {seq} (now {recipe.training.max_seq_len}): peak "
                       f"{_gib(p.peak_bytes)} GiB")
            break
    if not out:
        out.append("nothing within the planner's reach fits: the base model's weights alone take "
                   f"{_gib(estimate.sizes['weights'] + estimate.sizes['adapter'])} GiB")
    return out


# ------------------------------------------------------------------------------ the model's config

def model_config(ref: str) -> dict:
    """The base model's config.json, without its weights: a local model folder's; a built-in's or a
    known hub model's, shipped in model_configs/ (planning never materialises a model); an imported
    GGUF file's; else a hub id's, downloaded alone (from the local hub cache when HF_HUB_OFFLINE=1)."""
    shipped = MODEL_CONFIGS_DIR / f"{ref.replace('/', '--')}.json"
    path = Path(ref).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise PlanError(f"model folder {path} has no config.json")
        return _read_json(config)
    if shipped.is_file():
        return _read_json(shipped)
    if path.suffix == ".gguf":
        # its imported folder, if the trainer has imported it: planning never imports one (the
        # conversion needs torch, which the tracker's image leaves out)
        from shared.domain.model_cache import gguf_folder

        if not path.is_file():
            raise PlanError(f"GGUF file {path} not found")
        folder = gguf_folder(path)
        if not (folder / "config.json").is_file():
            raise PlanError(f"GGUF file {path} is not imported yet (the trainer imports it): no config.json to plan from")
        return _read_json(folder / "config.json")
    if ref.startswith((".", "/")) or ref.count("/") != 1:
        raise PlanError(f"base_model {ref!r} is neither a model folder, a .gguf file, a built-in nor a hub id: "
                        "no config.json to plan from")
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(ref, "config.json")))
    except Exception as exc:  # noqa: BLE001 - offline, gated, unknown: all "no config to plan from"
        raise PlanError(f"no config.json for base_model {ref!r}: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: not a readable config.json: {exc}") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a config.json is a JSON object")
    return data


def plan_recipe(recipe: Recipe, device: Device | None = None) -> Plan:
    """The plan of a recipe from its base model's config (PlanError when there is none to read)."""
    return plan(model_config(recipe.base_model), recipe, device)


def refusal(recipe: Recipe, memory: Plan | None = None) -> str | None:
    """Why a job of this recipe must not launch (its plan, `memory` or the recipe's, does not fit
    its hardware; with what to change), or None: it fits, or there is no config to plan from (the
    trainer's out-of-memory back-off is then the only guard)."""
    if memory is None:
        try:
            memory = plan_recipe(recipe)
        except PlanError:
            return None
    if memory.fits:
        return None
    gpus = f"{memory.processes} x {memory.gpu.upper()}" if memory.processes > 1 else f"one {memory.gpu.upper()}"
    return (f"recipe {recipe.name} does not fit in memory on {gpus}: a micro-batch of 1 needs "
            f"{_gib(memory.peak_bytes)} GiB of {_gib(memory.capacity_bytes)} GiB per GPU (`ftpipe train --recipe "
            f"{recipe.name} --plan` shows the plan); change one of: " + "; ".join(memory.advice))
