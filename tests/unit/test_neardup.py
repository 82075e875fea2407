"""Near-duplicate removal: MinHash (numpy), LSH banding and connected components in local Spark."""
from __future__ import annotations

import random

import numpy as np
import pytest

from shared.domain.recipe import DedupSpec

from services.preprocess import neardup

pytest.importorskip("pyspark")

VOCAB = [f"word{i}" for i in range(5000)]


def doc(rng: random.Random, n: int = 60) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def edit(ws: list[str], rng: random.Random, k: int = 1) -> list[str]:
    ws = list(ws)
    for pos in rng.sample(range(len(ws)), k):
        ws[pos] = rng.choice(VOCAB)
    return ws


def record(line: int, ws: list[str]):
    return (f"hash{line}", (line, (("user", " ".join(ws[:10])), ("assistant", " ".join(ws[10:])))))


# ------------------------------------------------------------------ pure numpy


def test_signatures_deterministic_and_estimate_jaccard():
    rng = random.Random(1)
    a = doc(rng, 200)
    b = edit(a, rng, 10)
    sh = [neardup.shingle_hashes(" ".join(x), 3) for x in (a, a, b)]
    sigs = neardup.signatures(sh, 112)
    assert sigs.shape == (3, 112) and sigs.dtype == np.uint32
    assert (sigs[0] == sigs[1]).all()
    assert (neardup.signatures(sh[:1], 112) == sigs[:1]).all()  # same with other documents in the block
    true = len(set(sh[0]) & set(sh[2])) / len(set(sh[0]) | set(sh[2]))
    assert abs(float(np.mean(sigs[0] == sigs[2])) - true) < 0.15  # equal slots estimate the Jaccard
    bands = neardup.band_hashes(sigs, 14, 8)
    assert bands.shape == (3, 14) and (bands[0] == bands[1]).all()


def test_short_text_single_shingle_and_empty():
    assert len(neardup.shingle_hashes("Hi there", 3)) == 1
    assert len(neardup.shingle_hashes("  ...  ", 3)) == 0


def test_candidate_pairs_all_or_star(spark):
    big = list(range(100, 120))  # 190 pairs > MAX_BUCKET_PAIRS: star edges from its lowest line
    buckets = spark.createDataFrame([([1, 2, 3],), ([2, 3],), (big,)], "l array<long>")
    got = {(r["a"], r["b"]) for r in neardup.candidate_pairs(buckets).collect()}
    assert got == {(1, 2), (1, 3), (2, 3)} | {(100, b) for b in big[1:]}


def test_recipe_validates_bands_rows():
    assert DedupSpec().num_perm == DedupSpec().bands * DedupSpec().rows == 112
    with pytest.raises(ValueError, match="bands"):
        DedupSpec(num_perm=100, bands=14, rows=8)


# ------------------------------------------------------------------ Spark



def test_connected_components_merges_transitively(spark):
    edges = spark.sparkContext.parallelize([(3, 4), (1, 2), (2, 3), (10, 11), (11, 12), (20, 21)], 3)
    labels, rounds = neardup.connected_components(edges)
    assert dict(labels.collect()) == {1: 1, 2: 1, 3: 1, 4: 1, 10: 10, 11: 10, 12: 10, 20: 20, 21: 20}
    assert rounds >= 2


def test_near_dedup_clusters_and_keeps_lowest_line(spark):
    rng = random.Random(7)
    a, b, c = doc(rng), doc(rng), doc(rng)
    c2 = edit(c, rng, 1)
    c3 = edit(c2, rng, 1)  # chain c - c2 - c3
    rows = [record(5, a), record(2, edit(a, rng, 1)), record(9, edit(a, rng, 2)),  # cluster of a; line 2 lowest
            record(4, b),                                                           # unrelated
            record(11, c3), record(12, c), record(13, c2)]                          # cluster of c
    rows += [record(100 + i, doc(rng)) for i in range(30)]                           # unrelated
    rdd = spark.sparkContext.parallelize(rows, 3)
    kept, res = neardup.near_dedup(spark, rdd, neardup.Params())
    kept_lines = sorted(r[1][0] for r in kept.collect())
    assert kept_lines == sorted([2, 4, 11] + [100 + i for i in range(30)])
    assert res.removed == 4 and res.clusters == 2 and res.cluster_sizes == {3: 2}
    assert res.report()["cluster_size_histogram"] == {"3": 2}
    # deterministic: another partitioning, same result
    kept2, res2 = neardup.near_dedup(spark, spark.sparkContext.parallelize(list(reversed(rows)), 2), neardup.Params())
    assert sorted(r[1][0] for r in kept2.collect()) == kept_lines and res2.removed == 4


def test_near_dedup_nothing_similar(spark):
    rng = random.Random(3)
    rows = [record(i, doc(rng)) for i in range(20)]
    kept, res = neardup.near_dedup(spark, spark.sparkContext.parallelize(rows, 2), neardup.Params())
    assert kept.count() == 20 and res.removed == 0 and res.clusters == 0


def test_job_removes_near_duplicates_and_reports(spark, tmp_path):
    import json

    from shared.domain.recipe import DataSpec, Recipe

    from services.preprocess.job import prepare

    rng = random.Random(11)
    docs = [doc(rng) for _ in range(12)]
    rows = [record(i, ws) for i, ws in enumerate(docs)]
    rows.append(record(12, edit(docs[0], rng, 1)))   # line 13: near copy of line 1
    rows.append(record(13, edit(docs[5], rng, 2)))   # line 14: near copy of line 6
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in rec[1][1]]}) + "\n"
                           for rec in rows))

    def run(near: bool, out: str):
        recipe = Recipe(name="nd-test", version=1, base_model="tiny", model_name="nd-bot",
                        data=DataSpec(min_rows=5), dedup={"near": near},
                        quality={"enabled": False})  # synthetic "wordNNN" text is no language
        return prepare(spark, str(src), recipe, tmp_path / out, source={})

    on = run(True, "on")
    assert not on.rejected, on.reason
    assert on.counts["near_duplicates_removed"] == 2 and on.counts["duplicates_removed"] == 0
    assert on.counts["deduplicated"] == 12 == on.counts["train"] + on.counts["val"] + on.counts["test"]
    manifest = json.loads((tmp_path / "on" / "manifest.json").read_text())
    assert manifest["near_dedup"]["cluster_size_histogram"] == {"2": 2}
    assert manifest["near_dedup"]["shingle_words"] == 2 and manifest["counts"]["near_duplicates_removed"] == 2
    off = run(False, "off")
    assert off.counts["near_duplicates_removed"] == 0 and off.counts["deduplicated"] == 14
    assert "near_dedup" not in json.loads((tmp_path / "off" / "manifest.json").read_text())
