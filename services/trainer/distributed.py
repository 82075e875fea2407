"""Training in several processes started by torchrun (`distribution.strategy` in the recipe): the
process group, the model wrapped per strategy, the collectives the loop needs, and the rank-0 gate.

The training loop (training.py) stays one loop; it asks a `World` for what differs:
- `micro_batches`: each rank trains its share (every size-th example) of every optimizer step, so a
  step holds the same examples whatever the number of processes, and the loss is divided by the
  step's trained tokens over all ranks: N processes give the loss curve of one with the same recipe;
- `wrap`: ddp keeps a whole model per rank and sums the gradients (one all-reduce per step, in
  buckets); fsdp shards every parameter with FSDP2's `fully_shard` (each decoder block, then the
  rest); deepspeed_zero2 / deepspeed_zero3 hand the model to DeepSpeed (ZeRO partitions optimizer
  state and gradients, stage 3 the parameters too);
- mixed precision (services/trainer/compute.py) the way each strategy has it: the loop's autocast
  and, for fp16, torch's GradScaler (one process, ddp, fsdp); FSDP2's MixedPrecisionPolicy on top
  (parameters gathered in the precision, gradients reduced in float32); DeepSpeed's own bf16 / fp16
  sections (its module in the precision, float32 master weights and its own loss scaler), the masters
  being what checkpoints hold;
- loading (`loads_sharded`): under fsdp and deepspeed_zero3 no rank holds the whole model. The model
  is built without the base's weights (`empty_init`: on the meta device, or in DeepSpeed's zero.Init,
  which partitions each parameter as its module is created; services/trainer/modeling.py), and once
  the parameters are cut `wrap` fills each rank's shards from the base's safetensors files, reading
  only the slices it holds (torch.distributed.checkpoint for FSDP2's DTensors, the rows covering its
  range for a ZeRO-3 partition); what one process initialises afresh (adapters, a new head) is made
  whole on every rank, with the same values, before it is cut;
- checkpoints keep the one-process layout: rank 0 writes the full adapter and the full optimizer
  state (gathered from the shards), each rank's RNG state beside it; on resume every rank reads the
  same files and takes its shard, so a run resumes on any number of processes and strategy (a whole
  model trained under fsdp / ZeRO-3 is read slice by slice from the checkpoint as the base is).

Under torchrun ranks never disagree: every decision (stop, alerts) is derived from all-reduced
numbers or agreed by an all-reduce, and a rank with fewer examples in a ragged step runs padding
micro-batches of weight 0, because a sharded forward and backward are collectives.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from services.trainer.compute import CPU_FP32, Compute
from services.trainer.modeling import WeightFiles

STRATEGIES_THAT_AVERAGE = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")  # they divide gradients by the world size
_BUCKET_ELEMENTS = 2**23  # gradients are summed in buckets of 32 MiB of float32, as DDP does


class DistributedError(RuntimeError):
    """The launch does not fit the recipe; the message says what to change."""


def launched() -> bool:
    """Whether this process is one of several started by torchrun (which sets WORLD_SIZE, RANK, ...)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def shards_parameters(model) -> bool:
    """Whether the model's parameters are sharded (FSDP, ZeRO-3): then only the model's own forward
    gathers them, and a loss must be computed through it."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or any(hasattr(p, "ds_id") for p in model.parameters())


@dataclass
class World:
    strategy: str = "single"
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    engine: object | None = None    # DeepSpeed's engine, once wrapped
    compute: Compute = CPU_FP32     # the precision the model was wrapped for
    scaler: torch.amp.GradScaler | None = None   # fp16 outside DeepSpeed: the loss scaler
    skipped: bool = False           # whether the last step() skipped its update (an fp16 overflow)
    loading_peak: int = 0           # the most parameter bytes held as the model was built and loaded (note_loading)

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------ data

    def micro_batches(self, step: list, batch_size: int) -> list[tuple[list, float]]:
        """This rank's share of an optimizer step's examples, cut into micro-batches of at most
        batch_size, each with its weight in the loss: 1, or 0 for the padding a rank runs when a
        ragged step leaves it fewer micro-batches than rank 0 (a sharded forward is a collective)."""
        mine = step[self.rank::self.size]
        batches = [(mine[i:i + batch_size], 1.0) for i in range(0, len(mine), batch_size)]
        wanted = math.ceil(math.ceil(len(step) / self.size) / batch_size)
        return batches + [(step[:1], 0.0)] * (wanted - len(batches))

    # ------------------------------------------------------------------------------ model

    def loads_sharded(self, adapter_kind: str) -> bool:
        """Whether the model is built without its base's weights and each rank loads only its shards
        (fsdp, deepspeed_zero3 in several processes); QLoRA's base is quantised as it loads, whole on
        each rank's own GPU."""
        return self.size > 1 and self.strategy in ("fsdp", "deepspeed_zero3") and adapter_kind != "qlora"

    @contextlib.contextmanager
    def empty_init(self, compute: Compute, max_grad_norm: float):
        """The context the base's modules are created in when loads_sharded: the meta device (FSDP2
        cuts the parameters; wrap then materialises each rank's shards), or DeepSpeed's zero.Init with
        the engine's configuration, which partitions each parameter as its module is created."""
        if self.strategy == "fsdp":
            with torch.device("meta"):
                yield
            return
        deepspeed = _deepspeed()
        from transformers.integrations.deepspeed import prevent_arange_dtype_change

        # transformers' own guard (entered first): RoPE's positions stay float32 in a bf16 / fp16
        # zero.Init. mem_efficient_linear off: on, zero.Init swaps torch.nn.functional.linear for
        # DeepSpeed's for the rest of the process.
        with prevent_arange_dtype_change(), deepspeed.zero.Init(
                config_dict_or_path=deepspeed_config(self.strategy, max_grad_norm, compute), mem_efficient_linear=False):
            yield

    def note_loading(self, model) -> None:
        """Record the parameter bytes the model holds now (parameter_bytes) if the most so far: called
        once it is built and once it is wrapped, its weights loaded."""
        self.loading_peak = max(self.loading_peak, parameter_bytes(model))

    def wrap(self, model, make_optimizer, *, max_grad_norm: float, compute: Compute = CPU_FP32,
             weights: WeightFiles | None = None):
        """(model, optimizer) for this strategy and precision; make_optimizer(params) builds the torch
        optimizer over the trainable parameters (after sharding, so it holds the shards). weights: a
        model built unloaded (loads_sharded) has its weights read into its shards here, from these."""
        model, optimizer = self._wrap(model, make_optimizer, max_grad_norm=max_grad_norm, compute=compute,
                                      weights=weights)
        self.note_loading(model)
        return model, optimizer

    def _wrap(self, model, make_optimizer, *, max_grad_norm: float, compute: Compute, weights: WeightFiles | None):
        self.compute = compute
        if self.strategy not in ("deepspeed_zero2", "deepspeed_zero3") or self.size == 1:
            self.scaler = compute.grad_scaler()
        if self.size == 1:
            return model, make_optimizer(_trainable(model))
        if self.strategy == "ddp":
            for p in _trainable(model):  # every rank starts from rank 0's adapter, as DDP does
                dist.broadcast(p.data, src=0)
            return model, make_optimizer(_trainable(model))
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            backbone = model.get_base_model() if hasattr(model, "get_base_model") else model  # full: no PEFT
            blocks = set(getattr(backbone, "_no_split_modules", None) or ())
            policy = fsdp_mixed_precision(compute)
            for module in model.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module, mp_policy=policy)
            fully_shard(model, mp_policy=policy)  # embeddings, final norm and head (tied to the embeddings) with the root
            if weights is not None:
                _materialise_shards(model, weights, self.device)
            return model, make_optimizer(_trainable(model))
        deepspeed = _deepspeed()
        trained = _trainable(model)
        # DeepSpeed makes its float32 masters from the module in the precision: keep the exact weights
        # (a resumed adapter, fresh LoRA A, a trained partition as the files hold it) to put into them
        exact = _load_partitions(weights, trained if compute.mixed else []) if weights is not None else {}
        masters = [(exact[id(p)], True) if id(p) in exact else (p.detach().to("cpu", copy=True), False)
                   for p in trained] if compute.mixed else []  # (value, whether it is the local partition)
        if weights is not None and compute.mixed:
            # DeepSpeed casts none of a zero.Init model's parameters: those made whole (adapters, a new
            # head) go to the precision zero.Init gave the rest, their exact values kept above
            for p in trained:
                if not hasattr(p, "ds_id"):
                    p.data = p.data.to(compute.dtype)
        optimizer = make_optimizer(trained)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(self.strategy, max_grad_norm, compute))
        if masters:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

            for param, (value, local) in zip(self._deepspeed_params(), masters, strict=True):
                (safe_set_local_fp32_param if local else safe_set_full_fp32_param)(param, value.to(self.device))
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        if self.strategy in STRATEGIES_THAT_AVERAGE and self.size > 1:
            loss = loss * self.size   # the loss is already divided by the step's tokens over all ranks
        if self.engine is not None:   # fp16: its loss scaler scales here
            self.engine.backward(loss, scale_wrt_gas=False)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer, max_grad_norm: float) -> float:
        """Reduce the gradients, clip them to max_grad_norm, step the optimizer, zero the
        gradients; returns the gradient norm before clipping (the same on every rank). With a loss
        scaler, a step whose gradients overflowed is skipped (`skipped`) and the scale lowered."""
        if self.engine is not None:  # it reduces the gradients, measures and clips them (its config), steps
            self.engine.step()
            self.skipped = not self.engine.was_step_applied()
            return float(self.engine.get_global_grad_norm())
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.strategy == "ddp" and self.size > 1:
            _sum_gradients(params)
        if self.scaler is not None:  # true gradients before measuring and clipping them (sharded: found_inf is all-reduced)
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)  # a sharded norm scales sharded grads
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)   # skipped if the gradients hold an inf or NaN
            self.scaler.update()
            self.skipped = self.scaler.get_scale() < scale
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if _is_dtensor(norm) else norm)

    # ------------------------------------------------------------------------------ collectives

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return float(tensor.item())

    def any(self, flag: bool) -> bool:
        """Whether any rank says so: a stop asked of one rank (its SIGTERM) stops them all together."""
        return self.sum(1.0 if flag else 0.0) > 0 if self.size > 1 else flag

    def gather(self, obj) -> list:
        """Every rank's obj (tensors, numbers, strings and containers of them), in rank order, on
        every rank. It travels through torch.save: all_gather_object's own pickling of tensors fails
        on gloo in torch 2.13 (UntypedStorage has no dtype)."""
        if self.size == 1:
            return [obj]
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        out = [None] * self.size
        dist.all_gather_object(out, buffer.getvalue())
        return [torch.load(io.BytesIO(data), weights_only=True) for data in out]

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------------------ checkpoints

    def full_state(self, model) -> dict[str, torch.Tensor] | None:
        """The trained parameters in full, gathered from their shards (a collective: every rank calls
        it), for rank 0 to save; None when they are not sharded (the model saves its own). Under
        DeepSpeed in bf16 / fp16, its float32 masters: the module holds copies rounded to the precision."""
        _reshard(model)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if self.engine is not None and self.compute.mixed:
            from deepspeed.utils import safe_get_full_fp32_param

            return {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in named}
        if not shards_parameters(model):
            return None
        if self.engine is not None:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {name: p.detach().cpu().clone() for name, p in named}
        return {name: p.full_tensor().cpu() for name, p in named}

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state_dict() as one process would have it: full tensors, parameters by
        index (a collective under fsdp and deepspeed)."""
        if self.engine is not None:
            return self._deepspeed_optimizer_state(optimizer)
        state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
        state["state"] = {index: {key: value.full_tensor().cpu() if _is_dtensor(value) else value
                                  for key, value in state["state"][index].items()} for index in sorted(state["state"])}
        return state

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load a state written by optimizer_state (by any strategy and number of processes)."""
        if self.engine is not None:
            return self._deepspeed_load_optimizer_state(optimizer, state)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            if _is_dtensor(param):
                from torch.distributed.tensor import distribute_tensor

                for key, value in state["state"].get(index, {}).items():
                    if value.shape == param.shape:   # exp_avg, exp_avg_sq; "step" stays a plain scalar
                        state["state"][index][key] = distribute_tensor(value.to(param.device), param.device_mesh,
                                                                       param.placements)
        optimizer.load_state_dict(state)

    def _deepspeed_params(self) -> list:
        # The client optimizer's groups now hold ZeRO's flat partitions; the model's parameters, in
        # the order they were given to it, are the engine's trainable ones.
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def _deepspeed_optimizer_state(self, optimizer) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        steps = [s["step"] for s in self.engine.optimizer.optimizer.state.values() if "step" in s]
        state = {}
        for index, param in enumerate(self._deepspeed_params() if steps else ()):
            state[index] = {"step": torch.tensor(float(steps[0]))}
            for key in ("exp_avg", "exp_avg_sq"):
                value = safe_get_full_optimizer_state(param, key)
                state[index][key] = value.detach().cpu().clone().reshape(getattr(param, "ds_shape", param.shape))
        groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        groups[0]["params"] = list(range(len(self._deepspeed_params())))  # training.py's one group
        saved = {"state": state, "param_groups": groups}
        if self.compute.precision == "fp16":  # its dynamic loss scale, where it had got to
            scaler = self.engine.optimizer.loss_scaler
            saved["loss_scaler"] = {key: getattr(scaler, key) for key in _DEEPSPEED_LOSS_SCALER}
        return saved

    def _deepspeed_load_optimizer_state(self, optimizer, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if self.compute.precision == "fp16" and "loss_scaler" in state:
            for key, value in state["loss_scaler"].items():
                setattr(self.engine.optimizer.loss_scaler, key, value)
        if not state["state"]:
            return
        # Adam's state over ZeRO's flat partitions, created as AdamW creates it at its first step
        # (ZeRO-3 leaves it to that step), then filled from the full state, slice by slice.
        steps = next(iter(state["state"].values()))["step"]
        zero = self.engine.optimizer
        base = zero.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups  # 3, 2
        for flat in flats:
            base.state[flat].update(step=steps.clone(), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2 links its views at its first step
            zero._lazy_init_hp_params_optimizer_state()
        for index, param in enumerate(self._deepspeed_params()):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, state["state"][index][key].to(self.device), key)

    def describe(self, model, optimizer) -> dict:
        """How the run was spread: parameter and optimizer-state elements each rank holds, and the
        most parameter bytes it held while loading (a collective). With fsdp and deepspeed_zero3 each
        rank holds about 1/size of the parameters, and never more while loading; with
        deepspeed_zero2 about 1/size of the optimizer state."""
        _reshard(model)
        params = list(model.parameters())
        total = sum(_full_numel(p) for p in params)
        local = sum(_local_numel(p) for p in params)
        base = self.engine.optimizer.optimizer if self.engine is not None else optimizer
        states = sum(_local_numel(v) for s in base.state.values() for k, v in s.items()
                     if torch.is_tensor(v) and k != "step")
        per_rank = self.gather((local, states, self.loading_peak))
        return {"strategy": self.strategy, "world_size": self.size, "param_elements": total,
                "param_elements_per_rank": [p for p, _, _ in per_rank],
                "optimizer_state_elements_per_rank": [s for _, s, _ in per_rank],
                "loading_peak_param_bytes_per_rank": [b for _, _, b in per_rank]}


# DeepSpeed's DynamicLossScaler: the fields that move as it trains
_DEEPSPEED_LOSS_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def deepspeed_config(strategy: str, max_grad_norm: float, compute: Compute) -> dict:
    """DeepSpeed's configuration for a ZeRO strategy and the run's precision."""
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        # the loop runs its micro-batches and calls step() once: DeepSpeed reduces there
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": 3 if strategy == "deepspeed_zero3" else 2}, "zero_allow_untested_optimizer": True,
        "gradient_clipping": max_grad_norm,
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }
    if compute.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif compute.precision == "fp16":  # loss_scale 0: dynamic, from 2^16 as torch's GradScaler
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def fsdp_mixed_precision(compute: Compute):
    """FSDP2's policy for the run's precision: parameters gathered and computed in it, gradients
    reduced in float32 (a sum over ranks in bf16 would lose the small ones); no casts in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not compute.mixed:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute.dtype, reduce_dtype=torch.float32)


def join(strategy: str) -> World:
    """The World of this process: under torchrun, joins (once) the process group from torchrun's
    environment (env://; gloo on CPU, nccl on GPU); otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(strategy=strategy)
    if strategy == "single":
        raise DistributedError(f"started as {size} processes (torchrun) but the recipe's distribution.strategy is "
                               "'single'; set it to ddp, fsdp, deepspeed_zero2 or deepspeed_zero3, or start one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=timedelta(minutes=30))
    return World(strategy=strategy, rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def parameter_bytes(model) -> int:
    """Bytes of parameter storage this process holds: a sharded parameter's shard (FSDP2's local
    tensor, a ZeRO-3 partition), a whole one's tensor, nothing for one on the meta device; storage
    that several parameters share (tied weights, ZeRO's flat buffers) counts once."""
    storages: dict[int, int] = {}
    for p in model.parameters():
        for tensor in (p.to_local() if _is_dtensor(p) else p, getattr(p, "ds_tensor", None)):
            if tensor is not None and not tensor.is_meta:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _deepspeed():
    import deepspeed

    for handler in deepspeed.utils.logger.handlers:  # stdout is the program's output (ftpipe train --json)
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    return deepspeed


def _materialise_shards(model, weights: WeightFiles, device: torch.device) -> None:
    """Give a model built on the meta device and cut by fully_shard its shards on the device
    (to_empty, as FSDP2 asks): the parameters and buffers that were real keep their values, the rest
    are read from the files, each rank only its slices (torch.distributed.checkpoint's reader of
    Hugging Face safetensors)."""
    import torch.distributed.checkpoint as dcp

    real = {name: p.to_local().detach().clone() for name, p in model.named_parameters() if not p.to_local().is_meta}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in real:
                p.to_local().copy_(real[name])
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    dcp.load({key: getattr(module, name) for (module, name), key in weights.keys.items()},
             storage_reader=dcp.HuggingFaceStorageReader(str(weights.folder)))


def _load_partitions(weights: WeightFiles, exact_for: list) -> dict[int, torch.Tensor]:
    """Fill this rank's ZeRO-3 partitions from the files, each from the rows that cover its range of
    the flattened tensor (a parameter made whole — a new head resumed from a checkpoint — whole);
    returns the float32 values of the partitions of exact_for's parameters, by id, padded as the
    partition is (DeepSpeed's masters under mixed precision)."""
    wanted = {id(p) for p in exact_for}
    exact = {}
    with torch.no_grad():
        for (module, name), key in weights.keys.items():
            param = getattr(module, name)
            if not hasattr(param, "ds_tensor"):
                param.copy_(weights.read(key).view_as(param))
                continue
            size = param.ds_tensor.numel()
            start = size * dist.get_rank(group=param.ds_process_group)
            values = weights.read(key, start, max(0, min(size, param.ds_numel - start)))
            param.ds_tensor[:values.numel()].copy_(values)
            if id(param) in wanted:
                exact[id(param)] = torch.zeros(size, dtype=torch.float32)
                exact[id(param)][:values.numel()] = values
    return exact


def _reshard(model) -> None:
    """FSDP2 leaves the root gathered after a forward without backward (validation): its parameters
    are whole tensors until resharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _local_numel(p) -> int:
    if _is_dtensor(p):
        return p.to_local().numel()
    if hasattr(p, "ds_tensor"):   # a ZeRO-3 parameter: its partition
        return p.ds_tensor.numel()
    return p.numel()


def _full_numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _sum_gradients(params: list) -> None:
    """Sum every rank's gradients into every rank's (the loss is already divided by the step's
    tokens over all ranks), in flat buckets: one all-reduce per bucket, not per tensor."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    bucket: list[torch.Tensor] = []
    for i, grad in enumerate(grads):
        bucket.append(grad)
        if i == len(grads) - 1 or sum(g.numel() for g in bucket) >= _BUCKET_ELEMENTS:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket = []
