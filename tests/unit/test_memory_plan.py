"""The memory planner (shared/domain/memory_plan.py): its model of what a run holds, the micro-batch it
picks, the refusal of a job that cannot fit (at submission, in the dry run, in the rendered GKE Job)
and the plan in the cost estimate and the run record. Predicted against measured peaks: bench/plan."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from ftpipe.cli import main
from shared.domain.jobs import JobError, drop, submit
from shared.domain.memory_plan import (
    GIB,
    ModelShape,
    PlanError,
    cpu_device,
    estimate,
    gpu_device,
    model_config,
    plan,
    plan_recipe,
    refusal,
    resolve_checkpointing,
    resolve_precision,
)
from shared.domain.recipe import apply_overrides, load_recipe
from shared.platform.config import Settings, bootstrap
from tests.unit.governance import ADMIN

from services.preprocess import cost
from services.trainer.k8s import RenderError, render

LLAMA_8B, LLAMA_70B = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B"
SMALL = {  # tiny configs of each family the planner knows, for the parameter count
    "llama": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False},
    "qwen2": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True},
    "qwen3": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000},
    "mistral": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 1, "vocab_size": 1000},
    "gemma2": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000},
    "phi3": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 1000, "pad_token_id": 0},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "vocab_size": 1000},
    "mixtral": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 1000},
}


def _recipe(**overrides):
    return apply_overrides(load_recipe("support-assistant"), overrides)


@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_the_parameter_count_from_config_json_is_transformers_own(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SMALL[model_type])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(config.to_dict()).params == sum(p.numel() for p in model.parameters())


def test_the_shipped_configs_give_the_published_sizes_and_a_missing_config_says_so(tmp_path):
    assert ModelShape.from_config(model_config(LLAMA_8B)).params == 8_030_261_248
    assert ModelShape.from_config(model_config(LLAMA_70B)).params == 70_553_706_496
    assert ModelShape.from_config(model_config("smollm2-135m-instruct")).params == 134_515_008
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(PlanError, match="config.json lacks"):
        ModelShape.from_config(model_config(str(tmp_path)))
    with pytest.raises(PlanError, match="is neither a model folder"):
        model_config(str(tmp_path / "nowhere"))
    with pytest.raises(PlanError, match="no config.json for base_model 'org/not-a-model'"):
        model_config("org/not-a-model")


def test_precision_and_checkpointing_resolve_as_the_trainer_does():
    recipe, gpu, cpu = _recipe(), gpu_device("l4"), cpu_device(8 * GIB)
    assert (resolve_precision(recipe, gpu), resolve_precision(recipe, cpu)) == ("bf16", "fp32")
    assert (resolve_checkpointing(recipe, gpu), resolve_checkpointing(recipe, cpu)) == (True, False)
    pinned = _recipe(**{"training.precision": "fp32", "training.gradient_checkpointing": False})
    assert (resolve_precision(pinned, gpu), resolve_checkpointing(pinned, gpu)) == ("fp32", False)


def test_the_components_at_the_peak_add_up_and_the_plan_reports_each_whole():
    p = plan_recipe(_recipe(base_model=LLAMA_8B, **{"training.max_seq_len": 1024}))
    assert p.peak_bytes == sum(p.at_peak.values())
    assert p.allocated_bytes == p.peak_bytes - p.at_peak["overhead"]
    assert set(p.components) >= {"weights", "adapter", "gradients", "optimizer", "activations", "logits"}
    for name, size in p.components.items():
        assert p.at_peak[name] <= size, name
    # LoRA on the bf16 base: 2 bytes a frozen weight; r x (in + out) per adapted module, float32, with
    # its gradient and AdamW's two moments
    assert p.components["weights"] == 2 * p.params
    assert p.trainable_params == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert p.components["adapter"] == p.components["gradients"] == 4 * p.trainable_params
    assert p.components["optimizer"] == 8 * p.trainable_params


def test_qlora_stores_nf4_weights_with_float32_embeddings_and_head():
    lora = plan_recipe(_recipe(base_model=LLAMA_8B))
    qlora = plan_recipe(_recipe(base_model=LLAMA_8B, **{"adapter.kind": "qlora"}))
    shape = ModelShape.from_config(model_config(LLAMA_8B))
    unquantised = shape.embedding_params + shape.head_params + 32 * shape.norm_params + shape.hidden
    quantised = shape.params - unquantised
    assert qlora.components["weights"] == pytest.approx(quantised * (0.5 + (1 + 4 / 256) / 64) + 4 * unquantised,
                                                        rel=1e-6)
    assert qlora.components["weights"] < lora.components["weights"] / 2


def test_sharding_strategies_divide_what_they_shard():
    def on(strategy):
        return plan_recipe(_recipe(base_model=LLAMA_8B, **{"adapter.kind": "full", "hardware.gpu": "h100",
                                                            "hardware.count": 8, "distribution.strategy": strategy}))
    ddp, fsdp, zero2, zero3 = on("ddp"), on("fsdp"), on("deepspeed_zero2"), on("deepspeed_zero3")
    for name in ("adapter", "gradients", "optimizer"):
        assert fsdp.components[name] == pytest.approx(ddp.components[name] / 8, abs=8)
    # DeepSpeed holds its module in bf16, whole (ZeRO-2) or partitioned (ZeRO-3), its gradients
    # partitioned, and float32 masters of its partition beside the moments
    params = ddp.params
    assert zero2.components["adapter"] == 2 * params and zero3.components["adapter"] == pytest.approx(2 * params / 8, 1)
    assert zero2.components["gradients"] == pytest.approx(2 * params / 8, abs=8)
    assert zero3.components["optimizer"] == pytest.approx(12 * params / 8, abs=8)
    assert ddp.peak_bytes > zero2.peak_bytes > zero3.peak_bytes
    # each rank loads only its shards (services/trainer/distributed.py loads_sharded): a 70B full
    # fine-tune fits 32 H100s, its load phase a 32nd of the float32 model on each
    big = plan_recipe(_recipe(base_model=LLAMA_70B, **{"adapter.kind": "full", "hardware.gpu": "h100",
                                                       "hardware.count": 8, "hardware.nodes": 4,
                                                       "distribution.strategy": "fsdp", "training.batch_size": 64}))
    assert big.fits and big.phase != "load" and big.micro_batch == 2   # the 64 rows of a step, two per GPU
    assert big.phase_bytes["load"] == pytest.approx(4 * big.params / 32, rel=0.01)
    # on the host: rank 0 gathers the checkpoint (float32 weights and AdamW's moments), but no
    # process loads the model there
    assert big.host_bytes - 16 * big.trainable_params < big.params
    # QLoRA's 4-bit base loads whole on every GPU: sharding does not lower what loading holds
    q = plan_recipe(_recipe(base_model=LLAMA_70B, **{"adapter.kind": "qlora", "hardware.gpu": "l4",
                                                     "hardware.count": 8, "distribution.strategy": "fsdp"}))
    assert not q.fits and q.phase == "load"
    assert "QLoRA's 4-bit base loads whole on each GPU before fsdp shards it" in q.advice[0]


def test_checkpointing_lowers_activations_to_the_layer_inputs_and_one_layer():
    on = plan_recipe(_recipe(base_model=LLAMA_8B, **{"training.gradient_checkpointing": True}))
    off = plan_recipe(_recipe(base_model=LLAMA_8B, **{"training.gradient_checkpointing": False,
                                                      "hardware.gpu": "h100"}))
    assert on.activations_bytes == {"on": on.components["activations"], "off": on.activations_bytes["off"]}
    assert on.activations_bytes["on"] * 10 < on.activations_bytes["off"]
    tokens = on.tokens_per_micro_batch
    assert on.activations_bytes["on"] > 32 * 2 * 4096 * tokens         # every layer's input, in bf16
    assert off.activations_bytes["off"] == off.components["activations"]


def test_the_micro_batch_is_the_largest_that_fits_and_keeps_the_effective_batch():
    recipe = _recipe(base_model=LLAMA_8B, **{"training.max_seq_len": 4096, "training.batch_size": 12,
                                             "training.grad_accum": 2})
    p = plan_recipe(recipe)
    assert p.fits and 1 <= p.micro_batch < 12
    assert p.micro_batch * p.grad_accum == 24                            # the recipe's effective batch
    bigger = [m for m in range(p.micro_batch + 1, 13) if 24 % m == 0]
    assert all(estimate(model_config(LLAMA_8B), recipe, gpu_device("l4"), m).peak > p.capacity_bytes for m in bigger)
    assert p.largest_micro_batch >= p.micro_batch
    small = plan_recipe(_recipe())                                       # 135M: the recipe's batch fits as it is
    assert (small.micro_batch, small.grad_accum) == (8, 1)


def test_a_run_that_cannot_fit_is_refused_with_what_to_change():
    full_8b = _recipe(base_model=LLAMA_8B, **{"adapter.kind": "full", "training.max_seq_len": 2048})
    p = plan_recipe(full_8b)
    assert not p.fits and p.micro_batch == 0 and p.grad_accum == 0
    assert p.advice == tuple(a for a in p.advice if "peak" in a)          # each suggestion planned, with its peak
    reason = refusal(full_8b)
    assert reason is not None and reason.startswith("recipe support-assistant does not fit in memory on one L4")
    assert "use QLoRA (adapter.kind: qlora)" in reason
    # the fewest GPUs that fit, the smallest kind first
    assert "more GPUs that shard the model (hardware.gpu: h100, hardware.count: 2, distribution.strategy: fsdp)" \
        in reason
    reason = refusal(_recipe(base_model=LLAMA_70B, **{"training.max_seq_len": 8192}))
    assert "QLoRA on a bigger GPU (adapter.kind: qlora, hardware.gpu: " in reason
    assert refusal(_recipe()) is None
    assert refusal(_recipe(base_model="org/unknown-model")) is None     # no config to plan from: not refused


def test_submission_and_drop_refuse_a_recipe_that_cannot_fit(tmp_path):
    adapters = bootstrap(Settings(state_dir=tmp_path / "state"))
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    job = {"recipe": "tiny-sft", "dataset": str(data), "overrides": {"base_model": LLAMA_70B}}
    with pytest.raises(JobError, match="does not fit in memory on one L4.*change one of"):
        submit(adapters.docs, adapters.store, adapters.bus, "ftpipe", ADMIN, job)
    recipe = tmp_path / "big.yaml"
    recipe.write_text(yaml.safe_dump({**load_recipe("tiny-sft").model_dump(mode="json"), "base_model": LLAMA_70B}))
    with pytest.raises(JobError, match="does not fit in memory"):
        drop(adapters.docs, adapters.store, "ftpipe", ADMIN, data, str(recipe))
    assert not list(adapters.store.list("ftpipe", "incoming/"))


def test_cli_plan_prints_the_plan_as_json_or_a_table_and_exits_1_when_it_cannot_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTPIPE_STATE", str(tmp_path / "state"))
    assert main(["train", "--recipe", "tiny-sft", "--plan", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"fits", "peak_bytes", "micro_batch", "grad_accum", "gpu", "components"} <= set(shown)
    assert shown["fits"] is True and shown["gpu"] == "l4" and shown["micro_batch"] == 2
    assert main(["train", "--recipe", "tiny-sft", "--plan"]) == 0
    assert "fits; micro-batch 2 x 1" in capsys.readouterr().out
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump({**load_recipe("tiny-sft").model_dump(mode="json"), "base_model": LLAMA_70B}))
    assert main(["train", "--recipe", str(big), "--plan"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["train", "--recipe", str(big), "--render-k8s"]) == 2
    assert "does not fit in memory" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    assert main(["drop", str(data), "--recipe", str(big), "--dry-run", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["refused"] is True


def test_the_rendered_job_requests_the_planned_memory_and_trains_the_planned_micro_batch():
    from services.trainer.run_job import JOB_ENV, read_job

    recipe = _recipe(base_model=LLAMA_8B, **{"training.max_seq_len": 4096, "training.batch_size": 12,
                                             "training.grad_accum": 2})
    p = plan_recipe(recipe)
    manifest = render(recipe, "run-1", "gs://b/d/", image="img:1")
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    memory = f"{-(-p.host_bytes // GIB)}Gi"
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"] == memory
    assert p.host_bytes > 2 * p.params                                    # the bf16 base is loaded on the host first
    env = {e["name"]: e["value"] for e in container["env"]}
    trained = read_job({JOB_ENV: env[JOB_ENV]}).recipe
    assert (trained.training.batch_size, trained.training.grad_accum) == (p.micro_batch, p.grad_accum)
    assert json.loads(manifest["metadata"]["annotations"]["ftpipe.dev/memory-plan"])["peak_bytes"] == p.peak_bytes
    assert manifest["metadata"]["annotations"]["ftpipe.dev/recipe-hash"] == recipe.hash
    with pytest.raises(RenderError, match="adapter.kind: qlora"):
        render(_recipe(base_model=LLAMA_8B, **{"adapter.kind": "full"}), "run-2", "gs://b/d/", image="img:1")


def test_the_cost_estimate_carries_the_plan_and_uses_its_parameter_count():
    recipe = _recipe(base_model=LLAMA_8B)
    tokens = {"train": {"rows": 100, "tokens": 50_000, "training_tokens": 50_000}}
    estimate_ = cost.estimate_cost(recipe, tokens, params=None, memory=plan_recipe(recipe))
    assert estimate_["params"] == 8_030_261_248 and estimate_["cost"] is not None
    assert estimate_["memory"]["fits"] is True and estimate_["memory"]["gpu"] == "l4"
    tokens.update(val={"tokens": 0}, test={"tokens": 0}, total=50_000)
    assert "memory plan: peak" in cost.describe(tokens, estimate_)


def test_a_cpu_plan_counts_the_heap_glibc_keeps_and_the_mapped_checkpoint():
    recipe = _recipe(**{"adapter.kind": "qlora"})
    config = model_config("smollm2-135m-instruct")          # stored in float32
    cpu, shape = cpu_device(16 * GIB), ModelShape.from_config(config)
    on_cpu = plan(config, recipe, cpu)
    assert on_cpu.gpu == "cpu" and on_cpu.precision == "fp32" and not on_cpu.gradient_checkpointing
    # the float32 file the NF4 weights were quantised from stays mapped (the embeddings are views of it)
    assert on_cpu.components["weights"] > 4 * shape.embedding_params + 4 * (shape.params - shape.embedding_params)
    assert on_cpu.at_peak["overhead"] > on_cpu.components["activations"]     # the retained heap


def test_the_run_record_carries_the_plan_beside_the_peak_the_run_reached():
    from services.trainer import run_record

    memory = run_record.memory(load_recipe("tiny-sft"), "cpu")
    assert memory["plan"]["gpu"] == "cpu" and memory["plan"]["fits"] is True
    assert memory["measured_peak_bytes"] > 0 and memory["measured"] == "peak resident set (ru_maxrss)"
    unknown = run_record.memory(_recipe(base_model="org/unknown-model"), "cpu")
    assert "no config.json" in unknown["plan"]["error"]


def test_the_readme_planner_table_is_the_planners_output():
    from pathlib import Path

    from bench.plan.table import markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown() in readme, "README.md's planner table is stale: paste `python bench/plan/table.py`"


def test_a_local_gpu_run_trains_the_micro_batch_its_gpu_fits(monkeypatch):
    import logging
    from types import SimpleNamespace

    import torch

    from services.trainer.distributed import World
    from services.trainer.training import _planned_micro_batch

    recipe = _recipe(base_model=LLAMA_8B, **{"training.max_seq_len": 2048, "training.batch_size": 16})
    log = logging.getLogger("test")
    # a 24 GB GPU: Llama-3.1-8B LoRA at 2,048 tokens fits 4 rows a forward; the effective batch stays 16
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        name="NVIDIA L4", total_memory=int(22.49 * 2**30)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    on_l4 = _planned_micro_batch(recipe, World(device=torch.device("cuda", 0)), log).training
    assert (on_l4.batch_size, on_l4.grad_accum) == (4, 4)
    assert plan_recipe(recipe).micro_batch == 4                         # the GKE Job's plan says the same
    # a CPU, or processes other than the recipe's hardware, train the recipe as written
    assert _planned_micro_batch(recipe, World(device=torch.device("cpu")), log) is recipe
    assert _planned_micro_batch(recipe, World(strategy="ddp", size=2, device=torch.device("cuda", 0)), log) is recipe


def test_a_gguf_base_is_planned_from_its_imported_folder_and_never_imported_by_the_planner(tmp_path, monkeypatch):
    from shared.domain.model_cache import gguf_folder

    monkeypatch.setenv("FTPIPE_MODEL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(PlanError, match="not imported yet"):  # importing needs torch: the trainer's job
        model_config(str(gguf))
    folder = gguf_folder(gguf)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **SMALL["llama"]}))
    assert model_config(str(gguf))["hidden_size"] == 64
    with pytest.raises(PlanError, match="neither a model folder"):
        model_config("not-a-model")
