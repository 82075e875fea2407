"""Token counts and the cost estimate (pure functions), the manifest's provenance fields and the
legal-basis rule (one small Spark job each), and `ftpipe drop --dry-run` / `ftpipe prepare`."""
import json
from pathlib import Path

import pytest

from shared.domain.recipe import GPU_TABLE, DataSpec, DistributionSpec, HardwareSpec, Recipe, TrainingSpec, load_recipe
from shared.platform.storage import file_sha256

from services.preprocess import cost, provenance


def recipe(**kw) -> Recipe:
    return Recipe(name="cost-test", version=1, base_model="tiny-random-smollm2", model_name="cost-test", **kw)


def tokens(train_rows=100, train_tokens=50_000) -> dict:
    split = {"rows": train_rows, "tokens": train_tokens, "training_tokens": train_tokens, "max_tokens": 900,
             "truncated_rows": 0}
    empty = dict(split, rows=0, tokens=0, training_tokens=0, max_tokens=0)
    return {"train": split, "val": empty, "test": empty, "total": train_tokens}


# ------------------------------------------------------------------ pure estimate

def test_lora_estimate_is_four_flops_per_param_token_times_epochs():
    r = recipe(training=TrainingSpec(epochs=3))
    est = cost.estimate_cost(r, tokens(), params=135_000_000)
    assert est["trained_tokens"] == 150_000 and est["limited_by"] == "epochs"
    assert est["flops"] == 4 * 135_000_000 * 150_000
    l4 = GPU_TABLE["l4"]
    hours = est["flops"] / (l4["sustained_tflops"] * 1e12) / 3600
    assert est["gpu_hours"] == pytest.approx(hours, rel=1e-3)
    assert est["cost"] == pytest.approx(hours * l4["price_per_gpu_hour"], rel=1e-3)


def test_hardware_overrides_and_gpu_count():
    hw = HardwareSpec(gpu="h100", count=2, nodes=2, price_per_gpu_hour=2.0, sustained_tflops=100.0)  # 4 GPUs
    est = cost.estimate_cost(recipe(hardware=hw, distribution=DistributionSpec(strategy="ddp"),
                                    training=TrainingSpec(epochs=1)), tokens(), params=10**9)
    flops = 4 * 10**9 * 50_000
    wall = flops / (100e12 * 4) / 3600
    assert est["wall_hours"] == pytest.approx(wall, rel=1e-3)
    assert est["gpu_hours"] == pytest.approx(4 * wall, rel=1e-3)     # four GPUs for the wall time
    assert est["cost"] == pytest.approx(4 * wall * 2.0, rel=1e-3)
    assert est["hardware"] == {"gpu": "h100", "count": 4, "sustained_tflops_per_gpu": 100.0,
                               "price_per_gpu_hour": 2.0, "currency": "USD"}


def test_max_steps_caps_the_trained_tokens():
    r = recipe(training=TrainingSpec(epochs=3, max_steps=5, batch_size=2, grad_accum=2))
    est = cost.estimate_cost(r, tokens(train_rows=100, train_tokens=50_000), params=1000)
    assert est["limited_by"] == "max_steps" and est["trained_tokens"] == 5 * 2 * 2 * 500


def test_unknown_params_leave_the_cost_empty():
    est = cost.estimate_cost(recipe(), tokens(), params=None)
    assert est["trained_tokens"] == 150_000 and est["cost"] is None and est["flops"] is None


def test_unknown_gpu_is_a_recipe_error():
    with pytest.raises(ValueError, match="hardware"):
        Recipe.model_validate({"name": "x", "version": 1, "base_model": "m", "model_name": "x",
                               "hardware": {"gpu": "tpu"}})


# ------------------------------------------------------------------ token counting

class FakeTokenizer:
    chat_template = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_count_tokens_per_split_with_truncation():
    rows = [{"id": str(i), "messages": [{"role": "user", "content": "a " * i}, {"role": "assistant", "content": "b"}]}
            for i in range(1, 6)]
    per_split = cost.count_records(FakeTokenizer(), [(0, r) for r in rows] + [(1, rows[0])],
                                   system_prompt="sys", max_seq_len=6, batch=2)
    counted = cost.token_totals(per_split, 6)
    # "system: sys" (2) + "user: a…" (1 + i) + "assistant: b" (2) = 5 + i tokens
    assert counted["train"]["tokens"] == sum(5 + i for i in range(1, 6))
    assert counted["train"]["training_tokens"] == sum(min(5 + i, 6) for i in range(1, 6))
    assert counted["train"]["truncated_rows"] == 4 and counted["train"]["max_tokens"] == 10
    assert counted["val"]["rows"] == 1 and counted["test"]["rows"] == 0
    assert counted["total"] == counted["train"]["tokens"] + counted["val"]["tokens"]


def test_preference_and_classification_records_count_every_sequence():
    pair = {"prompt": [{"role": "user", "content": "q q"}], "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no no no"}]}
    text = {"text": "one two three", "label": "x"}
    [train, val, _] = cost.count_records(FakeTokenizer(), [(0, pair), (1, text)], system_prompt=None, max_seq_len=5)
    # "user: q q" (3) + "assistant: yes" (2) = 5; + "assistant: no no no" (4) = 7, cut at 5
    assert (train["rows"], train["tokens"], train["training_tokens"], train["max_tokens"]) == (1, 12, 10, 7)
    assert train["truncated_rows"] == 1 and (val["rows"], val["tokens"]) == (1, 3)
    merged = cost.merge_counts([[train, val, cost._zero()], [val, val, cost._zero()]])
    assert merged[0]["rows"] == 2 and merged[0]["max_tokens"] == 7 and merged[1]["tokens"] == 6


def test_an_unknown_base_model_is_reported_not_fatal(tmp_path):
    got_tokens, estimate, error = cost.tokens_and_cost(recipe().model_copy(update={"base_model": "nope"}),
                                                       lambda tokenizer: {})
    assert got_tokens is None and estimate is None and "no tokenizer for base_model 'nope'" in error


# ------------------------------------------------------------------ provenance

def test_provenance_and_legal_basis(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"hello\n")
    r = recipe()
    got = provenance.describe_source({"bucket": "b", "object": "incoming/r/d.jsonl", "generation": "7",
                                      "legal_basis": "consent ref 42"}, data, r)
    assert got == {"source_uri": "gs://b/incoming/r/d.jsonl", "source_generation": "7",
                   "input_sha256": "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
                   "legal_basis": "consent ref 42", "config_hash": r.hash}
    strict = recipe(data=DataSpec(require_legal_basis=True))
    assert provenance.legal_basis_problem(r, {}) is None
    assert "--legal-basis" in provenance.legal_basis_problem(strict, {"legal_basis": "  "})
    assert provenance.legal_basis_problem(strict, {"legal_basis": "contract"}) is None
    assert provenance.is_sidecar(provenance.sidecar_name("incoming/r/d.jsonl"))


# ------------------------------------------------------------------ the job and the CLI (Spark)

def _tokenizer_available() -> bool:
    from shared.domain.models import cache_dir

    return (cache_dir() / "tiny-random-smollm2" / "config.json").is_file()


needs_model = pytest.mark.skipif(not _tokenizer_available(), reason="tiny-random-smollm2 not in the model cache "
                                 "(`make setup` materialises it)")


def _chats(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"How do I reset item {i}?"},
                                                     {"role": "assistant", "content": f"Open settings, pick {i}."}]})
                            + "\n" for i in range(n)))
    return path



@needs_model
def test_manifest_has_tokens_cost_provenance_and_timings(spark, tmp_path):
    from services.preprocess.job import prepare

    data = _chats(tmp_path / "chats.jsonl")
    r = load_recipe("tiny-sft")
    source = {"bucket": "ftpipe", "object": "incoming/tiny-sft/chats.jsonl", "generation": "3",
              "uri": "file:///state/buckets/ftpipe/incoming/tiny-sft/chats.jsonl", "legal_basis": "DPA-7"}
    result = prepare(spark, str(data), r, tmp_path / "out", source=source)
    assert not result.rejected, result.reason
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source_uri"] == source["uri"] and manifest["source_generation"] == "3"
    assert manifest["input_sha256"] == file_sha256(data)
    assert manifest["legal_basis"] == "DPA-7" and manifest["config_hash"] == r.hash
    assert manifest["code_version"]["ftpipe"]
    assert manifest["tokens"]["train"]["rows"] == result.counts["train"]
    assert manifest["tokens"]["total"] > 0 and manifest["tokens"] == result.tokens
    assert manifest["cost_estimate"]["cost"] > 0 and manifest["cost_estimate"] == result.cost_estimate
    assert {"read_validate_s", "tokens_s", "total_s"} <= set(manifest["timings"])


@needs_model
def test_required_legal_basis_rejects_a_drop_without_one(spark, tmp_path):
    from services.preprocess.job import prepare

    strict = load_recipe("tiny-sft", overrides={"data.require_legal_basis": True})
    result = prepare(spark, str(_chats(tmp_path / "chats.jsonl")), strict, tmp_path / "out", source={})
    assert result.rejected and "data.require_legal_basis" in result.reason
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "rejected" and manifest["legal_basis"] is None


@needs_model
def test_drop_dry_run_prints_counts_tokens_and_cost_and_uploads_nothing(spark, tmp_path, monkeypatch, capsys):
    import logging

    from ftpipe.cli import main

    monkeypatch.setenv("FTPIPE_STATE", str(tmp_path / "state"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        data = _chats(tmp_path / "chats.jsonl")
        assert main(["drop", str(data), "--recipe", "tiny-sft", "--dry-run", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["dry_run"] and result["counts"]["train"] > 0
        assert result["tokens"]["total"] > 0 and result["cost_estimate"]["gpu_hours"] > 0
        assert not (tmp_path / "state").exists()      # nothing uploaded, no state touched
        # the text form (shared with `ftpipe prepare`)
        assert main(["prepare", str(data), "--recipe", "tiny-sft", "--out", str(tmp_path / "p")]) == 0
        text = capsys.readouterr().out
        assert "tokens: train" in text and "cost estimate:" in text and "GPU-hours on 1 x l4" in text
    finally:
        root.handlers[:], root.level = handlers, level
