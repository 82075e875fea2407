"""Input shapes beyond chat: preference pairs, text + label, JSON arrays, renamed columns, a
user split column and the stratified split (pure functions, then the real job on local Spark)."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from shared.domain.recipe import DataSpec, Recipe, RecipeError, parse_recipe

from services.preprocess import formats

SAMPLES = {
    "chat": {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
    "instruction": {"instruction": "Greet", "input": "Sam", "output": "Hello Sam!"},
    "prompt_completion": {"prompt": "Hi there", "completion": "Hello!"},
    "preference": {"prompt": "Hi there", "chosen": "Hello! How can I help?", "rejected": "What."},
    "classification": {"text": "My parcel never arrived", "label": "shipping"},
}


def rules(fmt: str = "auto", **kw) -> formats.RowRules:
    kind = kw.pop("kind", formats.KIND_OF_SHAPE.get(fmt, "chat"))
    return formats.RowRules(format=fmt, kind=kind, **kw)


# ------------------------------------------------------------------ shapes and overrides


@pytest.mark.parametrize("shape", formats.SHAPES)
def test_every_shape_is_detected_and_can_be_forced(shape):
    row = SAMPLES[shape]
    kind = formats.KIND_OF_SHAPE[shape]
    auto = formats.normalise(row, rules(kind=kind))
    assert formats.normalise(row, rules(shape)) == auto
    assert formats.kind_of(auto) == kind
    others = [s for s in formats.SHAPES if s != shape and formats.KIND_OF_SHAPE[s] == kind]
    for other in others:  # forcing another shape of the same kind rejects the row, naming both
        with pytest.raises(formats.RowError, match=f"{shape}-shaped row .* but data.format is '{other}'"):
            formats.normalise(row, rules(other))


def test_a_row_of_another_kind_is_rejected_with_what_the_recipe_needs():
    with pytest.raises(formats.RowError, match=r"preference-shaped row .*trains on chat rows \(SFT\)") as err:
        formats.normalise(SAMPLES["preference"], rules())
    assert err.value.code == "wrong_kind"
    with pytest.raises(formats.RowError, match="trains on preference pairs"):
        formats.normalise(SAMPLES["chat"], rules(kind="preference"))


def test_preference_pairs_explicit_and_implicit_prompt():
    r = rules("preference")
    assert formats.normalise(SAMPLES["preference"], r) == [
        ("user", "Hi there"), ("chosen", "Hello! How can I help?"), ("rejected", "What.")]
    conversational = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}
    assert formats.normalise(conversational, r)[:2] == [("system", "Be kind."), ("user", "Hi")]
    shared = [{"role": "user", "content": "Hi"}]
    implicit = {"chosen": shared + [{"role": "assistant", "content": "Hello!"}],
                "rejected": shared + [{"role": "assistant", "content": "No."}]}
    assert formats.normalise(implicit, r) == [("user", "Hi"), ("chosen", "Hello!"), ("rejected", "No.")]
    record = formats.to_record("abc", formats.normalise(conversational, r))
    assert record == {"id": "abc", "prompt": conversational["prompt"], "chosen": conversational["chosen"],
                      "rejected": conversational["rejected"]}


@pytest.mark.parametrize("row, code, fragment", [
    ({"prompt": "q", "chosen": "Same answer", "rejected": " same  ANSWER "}, "identical_pair", "the same answer"),
    ({"prompt": "q", "chosen": "a"}, "missing_field", "without 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty_content", "'rejected' is empty"),
    ({"chosen": "a", "rejected": "b"}, "missing_field", "without 'prompt'"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "bad_messages", "share every turn"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "b",
      "rejected": "c"}, "bad_order", "last prompt turn is from 'assistant', not the user"),
])
def test_bad_preference_rows(row, code, fragment):
    with pytest.raises(formats.RowError, match=fragment) as err:
        formats.normalise(row, rules("preference"))
    assert err.value.code == code


def test_classification_rows_and_allowed_labels():
    r = rules("classification", labels=("billing", "shipping", 3))
    assert formats.normalise({"text": " Late parcel ", "label": "shipping"}, r) == [
        ("text", "Late parcel"), ("label", "shipping")]
    assert formats.normalise({"text": "x", "label": 3}, r)[1] == ("label", 3)
    for label, code in ((True, "bad_field_type"), (1.5, "bad_field_type"), ("refund", "bad_label"), ("", "empty_content")):
        with pytest.raises(formats.RowError) as err:
            formats.normalise({"text": "x", "label": label}, r)
        assert err.value.code == code
    # the label is not part of the content hash: the same text twice is a duplicate whatever its label
    a = formats.normalise({"text": "Late parcel", "label": "shipping"}, r)
    b = formats.normalise({"text": "late  PARCEL", "label": "billing"}, r)
    assert formats.content_hash(a) == formats.content_hash(b)


def test_renamed_columns_and_the_split_column():
    r = rules("classification", columns=(("label", "stars"), ("text", "review")), split_column="fold")
    row = formats.renamed({"review": "Great service", "stars": 5, "fold": "Validation"}, r)
    assert formats.normalise(row, r) == [("text", "Great service"), ("label", 5), ("split", "val")]
    with pytest.raises(formats.RowError, match="without 'review'"):
        formats.normalise(formats.renamed({"stars": 5}, r), r)
    with pytest.raises(formats.RowError, match="'fold' is 'holdout'; expected train, val or test") as err:
        formats.normalise(formats.renamed({"review": "x", "stars": 1, "fold": "holdout"}, r), r)
    assert err.value.code == "bad_split"
    # no split column configured: the field is ignored
    plain = formats.normalise({"text": "x", "label": 1, "split": "nonsense"}, rules("classification", split_column=None))
    assert formats.segment(plain, "split") is None


def test_recipe_checks_format_against_method_and_columns():
    with pytest.raises(ValueError, match="data.format 'preference' does not fit task 'chat_sft' with method 'sft'"):
        Recipe(name="x", version=1, base_model="m", model_name="x", data=DataSpec(format="preference"))
    with pytest.raises(ValueError, match="does not apply to task 'classification'"):
        Recipe(name="x", version=1, base_model="m", model_name="x", task="classification", method="dpo")
    with pytest.raises(RecipeError, match=r"data.columns: unknown canonical field\(s\) \['body'\]"):
        parse_recipe("name: x\nversion: 1\nbase_model: m\nmodel_name: x\ndata: {columns: {body: review}}")
    assert Recipe(name="x", version=1, base_model="m", model_name="x", method="orpo").data_kind == "preference"


# ------------------------------------------------------------------ the job on local Spark

pytest.importorskip("pyspark")



def job_recipe(**kw) -> Recipe:
    data = kw.pop("data", {})
    data.setdefault("min_rows", 3)
    return Recipe(name="formats-test", version=1, base_model="tiny", model_name="formats-test",
                  data=DataSpec(**data), **kw)


def prepare(spark, path: Path, recipe: Recipe, out: Path):
    from services.preprocess.job import prepare as run

    return run(spark, str(path), recipe, out, source={})


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def preference_rows(n: int) -> list[dict]:
    return [{"prompt": f"How do I reset password number {i} for account {i * 7}?",
             "chosen": f"Open Settings, choose Security, then Reset for account {i * 7}.",
             "rejected": f"No idea, try turning it off and on {i} times."} for i in range(n)]


def test_json_array_of_preference_pairs(spark, tmp_path):
    rows = preference_rows(30)
    rows[4] = {"prompt": "q", "chosen": "same", "rejected": "same"}           # element 5: identical pair
    rows[9] = ["not", "an", "object"]                                         # element 10
    rows[12] = {**rows[12], "chosen": rows[12]["chosen"] + " Email jane.doe@example.com if stuck."}
    src = tmp_path / "pairs.json.gz"
    with gzip.open(src, "wt") as fh:
        json.dump(rows, fh, indent=2)  # pretty-printed: one element spans many lines
    result = prepare(spark, src, job_recipe(method="dpo"), tmp_path / "out")
    assert not result.rejected, result.reason
    assert result.counts["valid"] == 28 and result.counts["rejected"] == 2
    rejected = {r["line"]: r["code"] for r in lines(result.out_dir / "rejected.jsonl")}
    assert rejected == {5: "identical_pair", 10: "not_object"}
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["input"]["type"] == "json_array" and manifest["kind"] == "preference"
    written = [r for s in ("train", "val", "test") for r in lines(result.out_dir / f"{s}.jsonl")]
    assert len(written) == 28
    assert all(set(r) == {"id", "prompt", "chosen", "rejected"} and r["prompt"][-1]["role"] == "user" for r in written)
    masked = [r for r in written if "[EMAIL]" in r["chosen"][0]["content"]]
    assert len(masked) == 1 and "jane.doe" not in json.dumps(written)
    # the same rows given to a chat (SFT) recipe: every row has the wrong kind, one clear reason
    chat = prepare(spark, src, job_recipe(), tmp_path / "chat")
    assert chat.rejected and "preference-shaped row" in chat.reason and "trains on chat rows" in chat.reason


def test_broken_json_array_is_rejected_whole(spark, tmp_path):
    src = tmp_path / "broken.json"
    src.write_text(json.dumps(preference_rows(5))[:-40])
    result = prepare(spark, src, job_recipe(method="dpo"), tmp_path / "out")
    assert result.rejected and "not a valid JSON array" in result.reason and "after element" in result.reason
    # a .json file of JSON lines is read as JSONL
    jsonl = tmp_path / "lines.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(12)))
    ok = prepare(spark, jsonl, job_recipe(method="dpo"), tmp_path / "lines")
    assert not ok.rejected and ok.counts["valid"] == 12


LABELS = ("billing", "shipping", "account")


def test_csv_classification_stratified_with_user_splits(spark, tmp_path):
    import csv

    src = tmp_path / "tickets.csv"
    with open(src, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Review", "Topic", "Fold"])
        for label in LABELS:
            for i in range(60):
                w.writerow([f"Ticket {i} about my {label} problem, case {i * 13} please help", label, ""])
        for i in range(6):  # rows the user pinned to test
            w.writerow([f"Pinned ticket {i} about delivery windows", "shipping", "test"])
        w.writerow(["Unknown topic row", "refunds", ""])
    recipe = job_recipe(task="classification", dedup={"near": False}, data={  # templated rows, not near-dups here
        "columns": {"text": "Review", "label": "Topic"}, "split_column": "Fold", "labels": list(LABELS)})
    result = prepare(spark, src, recipe, tmp_path / "out")
    assert not result.rejected, result.reason
    assert [r["code"] for r in lines(result.out_dir / "rejected.jsonl")] == ["bad_label"]
    per = {s: Counter(r["label"] for r in lines(result.out_dir / f"{s}.jsonl")) for s in ("train", "val", "test")}
    for label in LABELS:  # exact 80/10/10 of each label's 60 hash-placed rows
        assert (per["train"][label], per["val"][label]) == (48, 6)
    assert per["test"]["billing"] == per["test"]["account"] == 6 and per["test"]["shipping"] == 12
    pinned = [r for r in lines(result.out_dir / "test.jsonl") if r["text"].startswith("Pinned")]
    assert len(pinned) == 6 and all(set(r) == {"id", "text", "label"} for r in pinned)
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["split"]["rows_placed_by"] == {"stratified": 180, "user": 6}
    assert manifest["split"]["method"].startswith("stratified by label")


def test_parquet_preference_columns(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = preference_rows(12)
    table = pa.table({"question": [r["prompt"] for r in rows], "good": [r["chosen"] for r in rows],
                      "bad": [r["rejected"] for r in rows]})
    src = tmp_path / "pairs.parquet"
    pq.write_table(table, src)
    recipe = job_recipe(method="orpo", data={"columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}})
    result = prepare(spark, src, recipe, tmp_path / "out")
    assert not result.rejected, result.reason
    assert result.counts["valid"] == 12
    unmapped = prepare(spark, src, job_recipe(method="orpo"), tmp_path / "unmapped")
    assert unmapped.rejected and "PARQUET columns (question, good, bad): match no known shape" in unmapped.reason
    assert "'prompt' + 'chosen' + 'rejected'" in unmapped.reason and "data.columns" in unmapped.reason


def test_json_array_staged_through_cloud_storage(gcs_emulator, monkeypatch):
    """On Dataproc the driver streams a gs:// JSON array into a JSONL object the executors can
    read (here against fake-gcs-server), and removes it afterwards."""
    from tests.emulators import make_gcs_store

    from services.preprocess import job

    for key, value in gcs_emulator.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", gcs_emulator.project)
    store = make_gcs_store(gcs_emulator, ("ftpipe-json",))
    rows = preference_rows(3)
    store.write("ftpipe-json", "incoming/dpo/pairs.json.gz", gzip.compress(json.dumps(rows).encode()))
    uri = "gs://ftpipe-json/incoming/dpo/pairs.json.gz"
    assert job._is_json_array(uri, None)
    cleanup: list = []
    staged = job._stage_json_array(uri, None, cleanup)
    bucket, _, name = staged.removeprefix("gs://").partition("/")
    assert bucket == "ftpipe-json" and name.startswith("tmp/ftpipe-staging/")
    assert [json.loads(x) for x in store.read(bucket, name).decode().splitlines()] == rows
    for remove in cleanup:
        remove()
    assert store.stat(bucket, name) is None


def test_token_counts_on_the_workers_equal_those_on_the_driver(spark, tmp_path, monkeypatch):
    from services.preprocess import job

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(12)))
    recipe = Recipe(name="tokens-test", version=1, base_model="tiny-random-smollm2", model_name="tokens-test",
                    method="dpo", data=DataSpec(min_rows=3))
    on_driver = prepare(spark, src, recipe, tmp_path / "driver")
    monkeypatch.setattr(job, "TOKENS_ON_DRIVER_ROWS", 0)
    on_workers = prepare(spark, src, recipe, tmp_path / "workers")
    assert on_driver.tokens["total"] > 0 and on_driver.tokens == on_workers.tokens
    assert on_driver.cost_estimate["trained_tokens"] == on_workers.cost_estimate["trained_tokens"] > 0
