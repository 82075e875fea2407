"""The preprocess job's steps one at a time, each on a small `Preparation` (services/preprocess/job.py):
what a step reads, what it adds, the counts and timing it records, and `prepare` with steps left
out or reordered."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pyspark")

from shared.domain.recipe import DataSpec, Recipe  # noqa: E402

from services.preprocess import job  # noqa: E402
from services.preprocess.job import Preparation, _Rejected  # noqa: E402


def recipe(**data) -> Recipe:
    return Recipe(name="steps-test", version=1, base_model="tiny", model_name="steps-bot", data=DataSpec(**data))


def chat(i: int) -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": f"How do I reset device {i} model {i * 7}?"},
        {"role": "assistant",
         "content": f"Hold the power button of device {i} for {i % 9 + 2} seconds until it restarts."}]})


def start(spark, tmp_path: Path, lines: list[str], **data) -> Preparation:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    return Preparation.start(spark, str(src), recipe(**data), tmp_path / "out", source={})


def test_a_stage_times_itself_and_names_its_jobs(spark, tmp_path):
    p = start(spark, tmp_path, [])
    sc = spark.sparkContext
    with p.stage("a_s", job="preprocess: a"):
        assert sc.getLocalProperty("spark.job.description") == "preprocess: a"
    with p.stage("a_s"):  # no job: the description set before stays; the seconds add up
        assert sc.getLocalProperty("spark.job.description") == "preprocess: a"
    with pytest.raises(_Rejected), p.stage("b_s", job="preprocess: b"):
        raise _Rejected("no")
    assert set(p.timings) == {"a_s"} and p.timings["a_s"] >= 0  # a step that raises records no time
    p.release()
    assert sc.getLocalProperty("spark.job.description") is None


def test_validation_alone_records_its_counts_and_timing(spark, tmp_path):
    p = start(spark, tmp_path, [chat(1), "{not json", chat(2), ""])
    job.check_input(p)
    assert p.kind == "jsonl" and p.local == tmp_path / "in.jsonl"
    job.read_validate(p)
    try:
        assert p.counts == {"raw": 3, "blank_lines": 1, "valid": 2, "rejected": 1}
        assert p.manifest["rejected_by_code"] == {"bad_json": 1} and len(p.manifest["input"]["digest"]) == 64
        assert set(p.timings) == {"read_validate_s"} and p.cached == [p.validated]
        job.write_rejected(p)
        assert [json.loads(x)["line"] for x in (p.out_dir / "rejected.jsonl").read_text().splitlines()] == [2]
        assert p.file_meta["rejected.jsonl"]["rows"] == 1 and p.files["rejected.jsonl"] == p.out_dir / "rejected.jsonl"
        assert set(p.timings) == {"read_validate_s", "write_rejected_s"}
    finally:
        p.release()


def test_an_unreadable_input_is_rejected_by_the_read_with_no_timing(spark, tmp_path):
    garbage = tmp_path / "rows.parquet"
    garbage.write_bytes(b"PAR1" + bytes(range(64)) + b"PAR1")
    p = Preparation.start(spark, str(garbage), recipe(), tmp_path / "out", source={})
    job.check_input(p)
    with pytest.raises(_Rejected, match="input unreadable as PARQUET"):
        job.read_validate(p)
    assert p.timings == {} and p.counts == {}
    p.release()


def test_input_checks_and_validation_judgement_reject_with_one_reason(spark, tmp_path):
    p = Preparation.start(spark, str(tmp_path / "notes.txt"), recipe(), tmp_path / "out", source={})
    with pytest.raises(_Rejected, match="unsupported input type for 'notes.txt'"):
        job.check_input(p)
    assert p.kind is None
    p = start(spark, tmp_path, [], max_rejected_fraction=0.2)
    p.kind = "jsonl"
    p.counts.update(raw=10, blank_lines=0, valid=7, rejected=3)
    p.summary = {"codes": {"bad_json": 2, "bad_role": 1}, "first_bad": (4, "bad JSON"),
                 "first": {"bad_json": (4, "bad JSON"), "bad_role": (9, "role")}}
    with pytest.raises(_Rejected) as rejected:
        job.judge_validation(p)
    assert rejected.value.reason == ("3 of 10 rows rejected (30%), above data.max_rejected_fraction=0.2 "
                                     "(bad_json 2, bad_role 1; see rejected.jsonl)")
    p.counts.update(valid=9, rejected=1)
    job.judge_validation(p)  # 10% is fine


def test_filling_empty_splits_alone(spark, tmp_path):
    """A middle step on a state built by hand: six prepared rows all placed in train."""
    def row_id(bucket: float) -> str:
        return f"{int(bucket * (1 << 52)):013x}000"

    buckets = {0.05: "hash", 0.2: "hash", 0.4: "hash", 0.75: "hash", 0.78: "user", 0.79: "hash"}
    records = [(0, row_id(b), n, json.dumps({"id": row_id(b)}), {}, by, {})  # see partitions.mask_and_place
               for n, (b, by) in enumerate(buckets.items())]
    p = start(spark, tmp_path, [])
    p.prepared = spark.sparkContext.parallelize(records, 2)
    p.prepared_summary = {"splits": [6, 0, 0], "placed_by": {"hash": 5, "user": 1}}
    job.fill_empty_splits(p)
    # val takes the train row nearest to it; test the next one; the user's row stays
    assert p.moved == {row_id(0.79): 1, row_id(0.75): 2}
    assert (p.counts["train"], p.counts["val"], p.counts["test"]) == (4, 1, 1)
    assert p.manifest["split"]["rows_moved_to_fill_empty_splits"] == 2 and set(p.timings) == {"write_splits_s"}
    job.write_splits(p)
    written = {name: (p.out_dir / name).read_text().splitlines() for name in job.SPLIT_FILES}
    assert [json.loads(x)["id"] for x in written["val.jsonl"]] == [row_id(0.79)]
    assert [json.loads(x)["id"] for x in written["test.jsonl"]] == [row_id(0.75)]
    assert len(written["train.jsonl"]) == 4 and p.file_meta["train.jsonl"]["rows"] == 4
    p.release()


def test_optional_steps_can_be_left_out_or_reordered(spark, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(chat(i) + "\n" for i in range(12)))
    r = recipe(min_rows=5)
    assert r.dedup.near and r.quality.enabled

    def run(name: str, steps=job.STEPS):
        result = job.prepare(spark, str(src), r, tmp_path / name, source={}, steps=steps)
        assert not result.rejected, result.reason
        return result, {f: (tmp_path / name / f).read_bytes() for f in job.SPLIT_FILES}

    swapped = [s for s in job.STEPS if s is not job.count_tokens]
    i, j = swapped.index(job.near_dedup), swapped.index(job.quality_filter)
    swapped[i], swapped[j] = swapped[j], swapped[i]  # quality filters first, then near dedup
    reordered, reordered_splits = run("reordered", tuple(swapped))
    assert {"near_dedup_s", "quality_s", "dedup_mask_s"} <= set(reordered.timings)
    assert "tokens_s" not in reordered.timings
    assert "filtered.jsonl" in reordered.files and reordered.tokens is None
    plain, plain_splits = run("plain", tuple(s for s in swapped if s not in (job.near_dedup, job.quality_filter)))
    assert plain.counts == reordered.counts and plain_splits == reordered_splits  # none of these rows is dropped
    assert {"near_dedup_s", "quality_s"}.isdisjoint(plain.timings) and "filtered.jsonl" not in plain.files
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert "near_dedup" not in manifest and "quality" not in manifest and manifest["status"] == "prepared"
