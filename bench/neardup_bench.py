"""Near-dup catch rate of services.preprocess.neardup (Spark) vs datasketch MinHashLSH, and the
Spark stage's throughput.

    .venv/bin/python bench/neardup_bench.py [--docs 3000] [--unrelated 1500] [--rows 20000]

Corpus: `docs` random 50-word chat rows (12-word user turn, 38-word answer, 3,000-word vocabulary),
one copy of each with 2 words replaced, and `unrelated` extra random rows. A copy is caught when it
ends up in the same cluster as its original (ftpipe: removed, its original kept; datasketch: the
original is among the copy's LSH candidates, same num_perm / bands / rows, 32-bit sha1 shingles).
Needs datasketch (test extra).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.preprocess import neardup  # noqa: E402

VOCAB_SIZE = 3000


def corpus(docs: int, unrelated: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(VOCAB_SIZE)]
    rows, originals = [], []
    for _ in range(docs + unrelated):
        rows.append([rng.choice(vocab) for _ in range(50)])
    for i in range(docs):
        copy = list(rows[i])
        for pos in rng.sample(range(50), 2):
            copy[pos] = rng.choice(vocab)
        rows.append(copy)
        originals.append((len(rows) - 1, i))  # (copy index, original index)
    return rows, originals


def as_record(i: int, ws: list[str]):
    return (f"h{i}", (i, (("user", " ".join(ws[:12])), ("assistant", " ".join(ws[12:])))))


def run_datasketch(rows, originals, k: int, p: neardup.Params) -> float:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=p.threshold, num_perm=p.num_perm, params=(p.bands, p.rows))
    for i, ws in enumerate(rows):
        m = MinHash(num_perm=p.num_perm, seed=1)
        m.update_batch([" ".join(ws[j:j + k]).encode() for j in range(len(ws) - k + 1)])
        lsh.insert(i, m)
    hit = 0
    for ci, oi in originals:
        m = MinHash(num_perm=p.num_perm, seed=1)
        ws = rows[ci]
        m.update_batch([" ".join(ws[j:j + k]).encode() for j in range(len(ws) - k + 1)])
        hit += oi in lsh.query(m)
    return hit / len(originals)


def run_ftpipe(spark, rows, originals, p: neardup.Params) -> tuple[float, float, dict]:
    rdd = spark.sparkContext.parallelize([as_record(i, ws) for i, ws in enumerate(rows)], 4)
    t0 = time.perf_counter()
    kept, res = neardup.near_dedup(spark, rdd, p)
    kept_lines = set(kept.map(lambda r: r[1][0]).collect())
    elapsed = time.perf_counter() - t0
    caught = sum(ci not in kept_lines and oi in kept_lines for ci, oi in originals)
    return caught / len(originals), elapsed, res.report()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--unrelated", type=int, default=1500)
    ap.add_argument("--rows", type=int, default=20000, help="rows for the throughput run")
    args = ap.parse_args()
    from services.preprocess.spark import build_session

    spark = build_session(cores=2, shuffle_partitions=4, driver_memory="2g")
    rows, originals = corpus(args.docs, args.unrelated)
    out = {}
    for k in (3, 5):
        p = neardup.Params(shingle_words=k)
        ft, secs, rep = run_ftpipe(spark, rows, originals, p)
        ds = run_datasketch(rows, originals, k, p)
        out[f"{k}-word"] = {"ftpipe_catch_rate": round(ft, 4), "datasketch_catch_rate": round(ds, 4),
                            "ftpipe_seconds": round(secs, 2),
                            "report": rep}
    # throughput: args.rows rows, a third of them edited copies
    rows, originals = corpus(args.rows // 3, args.rows - 2 * (args.rows // 3), seed=1)
    p = neardup.Params()
    ft, secs, rep = run_ftpipe(spark, rows, originals, p)
    out["throughput"] = {"rows": len(rows), "seconds": round(secs, 2), "rows_per_s": round(len(rows) / secs),
                         "catch_rate": round(ft, 4), "report": rep}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
