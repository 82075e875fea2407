"""Distributed training for real: torchrun with 2 processes on gloo, the tiny random model, every
strategy. Each run is checked against one in-process run of the same recipe (same effective batch,
so the same loss curve), and the run record says what each rank held: fsdp and ZeRO-3 must shard
the parameters, ZeRO-2 the optimizer state. ddp runs through `ftpipe train --nproc 2`; the sharded
strategies (whose checkpoints gather and re-scatter shards) through the pods' entrypoint
(services/trainer/run_job.py), interrupted by SIGTERM as GKE preempts a pod, and resumed by a
second launch; a full fine-tune under each through tests/unit/sharded_full_run.py (a run, then a
resume of it, in one launch).

Loading: under fsdp and ZeRO-3 no rank may hold the whole model, rank 0 included. Each rank reports
the most parameter bytes it held while the model was built and loaded (World.loading_peak: its
parameters' storage — shards, partitions, whole tensors — after building and after loading); it
must stay within LOADING_SHARE of one process's, which holds the whole model. Parameter storage,
not the process's resident memory: on CPU the interpreter and libraries dwarf the tiny model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from ftpipe.cli import main  # noqa: E402
from shared.domain import events as ev  # noqa: E402
from shared.domain.recipe import load_recipe  # noqa: E402
from shared.platform.config import Settings, bootstrap  # noqa: E402
from shared.platform.storage import upload_dir  # noqa: E402
from tests.unit.chats import order_chat, write_prepared  # noqa: E402

from services.trainer import run_job  # noqa: E402
from services.trainer.training import train  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 12
FULL_STEPS = 4  # a full fine-tune's: checkpoints at 2 and 4
CLOSE = 1e-4  # float sums in another order (per rank, then all-reduced): equal to about 1e-6
LOADING_SHARE = 0.6  # of one process's parameter bytes: each rank's half, plus the adapter it makes whole
SHARDED = ("fsdp", "deepspeed_zero3")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A prepared dataset and a recipe file per strategy. 9 conversations in steps of 2 x 2: the
    last step of each epoch has one example, so rank 1 runs a padding micro-batch there."""
    root = tmp_path_factory.mktemp("dist")
    write_prepared(root / "data", {split: [order_chat(i, follow_up=True) for i in ids] for split, ids in
                                   (("train", range(9)), ("val", range(9, 11)), ("test", range(11, 12)))})
    base = yaml.safe_load(Path("recipes/tiny-sft.yaml").read_text())
    base["training"].update(grad_accum=2, max_steps=STEPS, checkpoint_every=2)
    for strategy in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        recipe = {**base, "name": f"tiny-{strategy.replace('_', '-')}", "distribution": {"strategy": strategy}}
        (root / f"{strategy}.yaml").write_text(yaml.safe_dump(recipe))
    for strategy in SHARDED:
        recipe = {**base, "name": f"tiny-full-{strategy.replace('_', '-')}", "distribution": {"strategy": strategy},
                  "adapter": {**base["adapter"], "kind": "full"},
                  "training": {**base["training"], "max_steps": FULL_STEPS}}
        (root / f"{strategy}-full.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def reference(workspace) -> dict:
    """The same recipe in this one process: its loss curve, adapter weights and loading peak."""
    from safetensors.torch import load_file

    result = train(load_recipe(str(workspace / "ddp.yaml")), workspace / "data", workspace / "one")
    return {"loss_curve": result.loss_curve, "loading_peak": _loading_peak(result.distribution),
            "adapter": load_file(result.adapter_dir / "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def full_reference(workspace) -> dict:
    """The full fine-tune in this one process: its loss curve and loading peak (the whole model)."""
    result = train(load_recipe(str(workspace / "fsdp-full.yaml")), workspace / "data", workspace / "one-full")
    return {"loss_curve": result.loss_curve, "loading_peak": _loading_peak(result.distribution)}


def _loading_peak(distribution: dict) -> int:
    [peak] = distribution["loading_peak_param_bytes_per_rank"]
    return peak


def _assert_loaded_in_shards(distribution: dict, one_process: int) -> None:
    per_rank = distribution["loading_peak_param_bytes_per_rank"]
    assert len(per_rank) == 2 and all(0 < held <= LOADING_SHARE * one_process for held in per_rank), (per_rank, one_process)


def _assert_like_one_process(curve: list[float], adapter_dir: Path, reference: dict) -> None:
    from safetensors.torch import load_file

    assert len(curve) == STEPS
    assert curve == pytest.approx(reference["loss_curve"], abs=CLOSE)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    assert weights.keys() == reference["adapter"].keys()
    for name, tensor in weights.items():  # gathered from the shards where they were sharded
        torch.testing.assert_close(tensor, reference["adapter"][name], atol=1e-4, rtol=1e-3)


def _assert_spread(distribution: dict, strategy: str) -> None:
    total, params = distribution["param_elements"], distribution["param_elements_per_rank"]
    states = distribution["optimizer_state_elements_per_rank"]
    assert distribution["world_size"] == 2 and len(params) == len(states) == 2
    if strategy in ("fsdp", "deepspeed_zero3"):  # each rank holds its half of every parameter, no more
        assert all(total / 2 <= n <= total / 2 + 1024 for n in params) and sum(params) >= total
    else:
        assert params == [total, total]
    if strategy == "ddp":  # Adam's two moments of every LoRA parameter, on each rank
        assert states[0] == states[1] > 0
    else:  # partitioned: the two halves add up to one whole optimizer state
        assert states[0] == states[1] and states[0] % 2 == 0


# ------------------------------------------------------------------ ftpipe train --nproc 2


@pytest.mark.parametrize("strategy", ["ddp"])
def test_two_processes_train_the_one_process_loss_curve(strategy, workspace, reference, capsys):
    out = workspace / f"cli-{strategy}"
    code = main(["train", "--recipe", str(workspace / f"{strategy}.yaml"), "--data", str(workspace / "data"),
                 "--out", str(out), "--nproc", "2", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == STEPS and result["distribution"]["strategy"] == strategy
    _assert_spread(result["distribution"], strategy)
    # a whole model on each rank: what one process holds
    assert result["distribution"]["loading_peak_param_bytes_per_rank"] == [reference["loading_peak"]] * 2
    record = json.loads((out / "adapter" / "run_record.json").read_text())
    _assert_like_one_process(record["result"]["loss_curve"], out / "adapter", reference)


def test_nproc_needs_a_distributed_strategy(capsys):
    assert main(["train", "--recipe", "tiny-sft", "--data", ".", "--out", "/tmp/unused", "--nproc", "2"]) == 2
    assert "distribution.strategy 'single'" in capsys.readouterr().err


# ------------------------------------------------------------------ the pods' entrypoint, preempted


@pytest.fixture
def cluster(tmp_path, workspace, monkeypatch):
    """The local profile's store and bus in tmp_path, the dataset uploaded; start(strategy, run_id)
    launches run_job under torchrun in 2 processes through the pods' launcher, as a GKE pod does."""
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings(state_dir=tmp_path / "state")
    adapters = bootstrap(settings)
    upload_dir(adapters.store, workspace / "data", settings.bucket, "datasets/d1")

    def start(strategy: str, run_id: str) -> subprocess.Popen:
        job = run_job.JobSpec(run_id=run_id, recipe=load_recipe(str(workspace / f"{strategy}.yaml")),
                              dataset_uri=adapters.store.url(settings.bucket, "datasets/d1/"))
        env = {**os.environ, run_job.JOB_ENV: job.model_dump_json(), "FTPIPE_STATE": str(settings.state_dir),
               "HF_HUB_OFFLINE": "1"}
        return subprocess.Popen([sys.executable, "-m", "services.trainer.launch", "--standalone", "--nproc-per-node=2"],
                                env=env)

    yield settings, adapters, start
    adapters.close()


# ZeRO-2 goes through the same DeepSpeed code as ZeRO-3 but for the stage number
# (services/trainer/distributed.py), and ZeRO-3 also partitions the parameters, so ZeRO-3 stands for
# both here: each run costs about a minute of the suite's 20 on 2 cores.
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3"])
def test_a_preempted_two_process_run_checkpoints_and_resumes_exactly(strategy, cluster, reference):
    settings, adapters, start = cluster
    run_id = f"run-{strategy.replace('_', '-')}"
    first_checkpoint = f"runs/{run_id}/checkpoints/step-000002/COMPLETE"

    pods = start(strategy, run_id)
    while adapters.store.stat(settings.bucket, first_checkpoint) is None:
        assert pods.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    pods.send_signal(signal.SIGTERM)  # the spot notice: the launcher passes it to torchrun, torchrun to both ranks
    assert pods.wait(timeout=120) == run_job.EXIT_RETRY  # both ranks stopped after a checkpoint of the same step
    assert adapters.store.stat(settings.bucket, f"runs/{run_id}/adapter/COMPLETE") is None

    assert start(strategy, run_id).wait(timeout=600) == 0  # the next pod resumes and finishes
    events = [ev.decode(m.data, m.attributes) for m in adapters.bus.pull(
        ev.subscription_name("evaluator", ev.TRAINING), max_messages=100, timeout_s=2)]
    resumed = [e.resumed_from_step for e in events if e.type == "TrainingStarted"]
    assert resumed[0] == 0 and 2 <= resumed[1] < STEPS
    [done] = [e for e in events if e.type == "TrainingCompleted"]
    assert done.steps == STEPS

    adapter = settings.state_dir / "adapter"
    from shared.platform.storage import download_dir

    download_dir(adapters.store, settings.bucket, f"runs/{run_id}/adapter", adapter)
    record = json.loads((adapter / "run_record.json").read_text())
    _assert_spread(record["result"]["distribution"], strategy)
    _assert_loaded_in_shards(record["result"]["distribution"], reference["loading_peak"])  # the resumed pod's
    _assert_like_one_process(record["result"]["loss_curve"], adapter, reference)


# ------------------------------------------------------------------ a full fine-tune, loaded in shards


@pytest.mark.parametrize("strategy", SHARDED)
def test_a_sharded_full_fine_tune_never_loads_the_whole_model_and_resumes_exactly(strategy, workspace,
                                                                                   full_reference, tmp_path):
    # every weight trains and comes from the base's files, then from the checkpoint's on resume
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "tests.unit.sharded_full_run", str(workspace / f"{strategy}-full.yaml"), str(workspace / "data"),
               str(tmp_path)]
    assert subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600).returncode == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for run in ("fresh", "resumed"):
        assert results[run]["loss_curve"] == pytest.approx(full_reference["loss_curve"], abs=CLOSE)
        assert len(results[run]["loss_curve"]) == FULL_STEPS
        _assert_spread(results[run]["distribution"], strategy)
        _assert_loaded_in_shards(results[run]["distribution"], full_reference["loading_peak"])
