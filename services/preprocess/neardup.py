"""Near-duplicate removal in Spark: MinHash + LSH banding + connected components.

    rows (hash, (line, segments))
      -> mapPartitions: normalised text -> word shingles -> MinHash signature (numpy, vectorised
         over every shingle of the partition at once) -> one hash per LSH band
      -> DataFrame explode of (band, band_hash) + groupBy -> candidate pairs (rows sharing a bucket)
      -> verification in the bucket: exact Jaccard of the two shingle sets >= threshold
      -> connected components by iterative min-label propagation over the verified edges
      -> keep the lowest line of each component, drop the others.

Not `pyspark.ml.feature.MinHashLSH`: its tables are single hashes (OR of 1-row bands), whose
buckets flood the similarity join on short, templated chat text.

Defaults (shared/domain/recipe.py DedupSpec): 2-word shingles, 112 permutations = 16 bands x 7 rows
(LSH threshold (1/16)^(1/7) = 0.67, just under the 0.7 Jaccard check), chosen on the bench corpus
(`bench/preprocess`, 200k support chats with 1-3 word edits; figures in bench/README.md). On every
row of every 5th cluster (40,109 rows), precision / recall / F1 and seconds:

    shingle  bands x rows   precision  recall   F1      s
    2        16 x 7         0.9998     0.9993   0.9995   8.2   <- default
    2        28 x 4         0.9998     1.0000   0.9999  10.1
    3        14 x 8         1.0000     0.9759   0.9878   8.5   (the earlier default)
    5        28 x 4         1.0000     0.8861   0.9396   8.4

A small edit of a short row leaves few long shingles intact: 5-word shingles suit web pages, not
chat rows. Recall is bounded by the Jaccard check, not the banding; 2-word shingles make templated
rows look more alike (1 false positive in 40k here), so data with heavy shared boilerplate should be
re-measured. `bench/neardup_bench.py` compares the catch rate with datasketch on random rows.

The pure-numpy part (`signatures`, `band_hashes`, `words`) imports no Spark and is what the workers
run; the Spark part is `near_dedup`.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from services.preprocess import formats

_SHIFT = np.uint64(32)
_WORD = re.compile(r"\w+", re.UNICODE)
_CHUNK = 1 << 10  # shingles per vectorised block (x num_perm x 8 bytes: ~1 MB, in cache)
BROADCAST_DROPS = 2_000_000  # up to this many removed rows, their line numbers are broadcast (see near_dedup)
MAX_BUCKET_PAIRS = 64  # buckets larger than this give star edges from their lowest line only


@dataclass(frozen=True)
class Params:
    """What the workers need of the recipe's dedup section (small and picklable)."""

    shingle_words: int = 2
    num_perm: int = 112
    bands: int = 16
    rows: int = 7
    threshold: float = 0.7
    seed: int = 1
    max_iterations: int = 50

    @classmethod
    def from_spec(cls, spec) -> "Params":
        return cls(shingle_words=spec.shingle_words, num_perm=spec.num_perm, bands=spec.bands,
                   rows=spec.rows, threshold=spec.threshold, max_iterations=spec.max_iterations)


@dataclass
class NearDupResult:
    removed: int = 0
    clusters: int = 0
    cluster_sizes: dict[int, int] = field(default_factory=dict)  # size -> number of clusters
    candidate_pairs: int = 0
    verified_pairs: int = 0
    iterations: int = 0

    def report(self) -> dict:
        return {"near_duplicates_removed": self.removed, "clusters": self.clusters,
                "cluster_size_histogram": {str(k): v for k, v in sorted(self.cluster_sizes.items())},
                "candidate_pairs": self.candidate_pairs, "verified_pairs": self.verified_pairs,
                "connected_components_iterations": self.iterations}


# ------------------------------------------------------------------ pure numpy (workers)


def conversation_text(segments: Iterable[tuple[str, str]]) -> str:
    """The text compared for near-duplicates: every text segment but the system prompt (often
    shared by every row); see formats for the segments."""
    return "\n".join(content for role, content in formats.text_segments(segments) if role != "system")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the distinct k-word shingles (the whole text when it has fewer words)."""
    ws = words(text)
    if not ws:
        return np.empty(0, dtype=np.uint64)
    grams = {" ".join(ws[i:i + k]) for i in range(max(1, len(ws) - k + 1))}
    return np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the multiply-shift family h(x) = ((a x + b) mod 2^64) >> 32 (a odd), a universal
    family for 32-bit keys without the modulo of the Mersenne-prime one: 2.4x faster in numpy."""
    rng = np.random.RandomState(seed)
    a = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a, b


def signatures(shingles: list[np.ndarray], num_perm: int, seed: int = 1) -> np.ndarray:
    """MinHash signatures (len(shingles) x num_perm, uint32) for many documents at once: the
    shingles of consecutive documents go through the permutations in blocks of about _CHUNK rows,
    computed in place in one reused buffer (small enough to stay in cache: 4x faster than
    whole-partition temporaries), then a segmented minimum (`np.minimum.reduceat`). Documents
    without shingles get all-0xFFFFFFFF."""
    a, b = permutations(num_perm, seed)
    n = len(shingles)
    out = np.full((n, num_perm), 0xFFFFFFFF, dtype=np.uint32)
    lengths = np.fromiter((len(s) for s in shingles), dtype=np.int64, count=n)
    docs = np.flatnonzero(lengths)  # documents with shingles
    if len(docs) == 0:
        return out
    flat = np.concatenate([shingles[i] for i in docs])
    ends = np.cumsum(lengths[docs])
    starts = ends - lengths[docs]
    buffer = np.empty((_CHUNK, num_perm), dtype=np.uint64)
    i = 0
    while i < len(docs):  # documents i..j-1: whole documents, at most _CHUNK shingles unless one is longer
        j = max(i + 1, int(np.searchsorted(ends, starts[i] + _CHUNK, side="right")))
        lo, hi = starts[i], ends[j - 1]
        hv = buffer[: hi - lo] if hi - lo <= _CHUNK else np.empty((hi - lo, num_perm), dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.multiply(flat[lo:hi, None], a[None, :], out=hv)
            hv += b
        hv >>= _SHIFT
        out[docs[i:j]] = np.minimum.reduceat(hv, starts[i:j] - lo, axis=0)
        i = j
    return out


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One signed 64-bit hash per band (n x bands): a polynomial of the band's rows, wrapping."""
    n = sigs.shape[0]
    coeff = np.random.RandomState(7).randint(1, 1 << 62, size=rows, dtype=np.uint64) | np.uint64(1)
    view = sigs[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    with np.errstate(over="ignore"):
        h = (view * coeff[None, None, :]).sum(axis=2, dtype=np.uint64)
        h ^= h >> np.uint64(29)
    return h.view(np.int64)


def signature_partition(records: Iterable[tuple], params: Params) -> Iterator[tuple]:
    """(hash, (line, segments)) -> (line, [distinct shingle hashes], [band hashes]) for one
    partition: the signature gives the bands; the shingles stay for the exact check of candidates."""
    lines, shingles = [], []
    for _, (line_no, segments) in records:
        lines.append(line_no)
        shingles.append(shingle_hashes(conversation_text(segments), params.shingle_words))
    if not lines:
        return
    sigs = signatures(shingles, params.num_perm, params.seed)
    bh = band_hashes(sigs, params.bands, params.rows)
    for i, line_no in enumerate(lines):
        if len(shingles[i]):
            # as signed 32-bit ints: Spark's IntegerType, compared by array_intersect in the JVM
            yield line_no, np.unique(shingles[i]).astype(np.uint32).view(np.int32).tolist(), [int(x) for x in bh[i]]


# ------------------------------------------------------------------ Spark


def candidate_pairs(buckets):
    """Distinct candidate pairs (a < b) of a DataFrame of buckets (column `l`: sorted line numbers),
    built in the JVM: every pair of a small bucket, star edges from the lowest line of a large one
    (connected components still join them; a bucket of thousands would give millions of pairs)."""
    from pyspark.sql import functions as F

    every_pair = F.expr("flatten(transform(sequence(0, size(l) - 2), "
                        "i -> transform(slice(l, i + 2, size(l)), x -> named_struct('a', l[i], 'b', x))))")
    star = F.expr("transform(slice(l, 2, size(l)), x -> named_struct('a', l[0], 'b', x))")
    small = F.size("l") * (F.size("l") - 1) / 2 <= MAX_BUCKET_PAIRS
    return buckets.select(F.explode(F.when(small, every_pair).otherwise(star)).alias("p")).select("p.a", "p.b").distinct()


def connected_components(edges, max_iterations: int = 50, num_partitions: int | None = None):
    """Min-label propagation over an RDD of undirected edges (a, b): returns (RDD of
    (node, component label = lowest node of the component), rounds). Stops when no label changes.
    The edges and the labels share one hash partitioning, so each round's join is narrow."""
    n = num_partitions or edges.getNumPartitions()
    both = edges.flatMap(lambda e: ((e[0], e[1]), (e[1], e[0]))).partitionBy(n).cache()
    labels = both.map(lambda e: (e[0], e[0]), preservesPartitioning=True).reduceByKey(min, n).cache()
    total = labels.values().sum()
    rounds = 0
    try:
        while rounds < max_iterations:
            rounds += 1
            # each node takes the lowest label among itself and its neighbours; labels only go
            # down, so an unchanged sum means that no label changed
            offers = both.join(labels, n).map(lambda kv: (kv[1][0], kv[1][1]))
            new = labels.union(offers).reduceByKey(min, n).cache()
            new_total = new.values().sum()
            labels.unpersist()
            labels = new
            if new_total == total:
                break
            total = new_total
        else:
            raise RuntimeError(f"connected components did not converge in {max_iterations} rounds")
    finally:
        both.unpersist()
    return labels, rounds


def near_dedup(spark, deduped, params: Params):
    """Remove near-duplicates from an RDD of (hash, (line, segments)). Returns (kept RDD of the
    same shape, NearDupResult). The representative of each cluster is its lowest line."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, IntegerType, LongType, StructField, StructType

    schema = StructType([StructField("line", LongType(), False),
                         StructField("shingles", ArrayType(IntegerType(), False), False),
                         StructField("bands", ArrayType(LongType(), False), False)])
    # cached as a DataFrame, not as the Python RDD: both the banding and the verification read it,
    # and converting pickled Python rows to JVM rows costs more than computing the signatures
    df = spark.createDataFrame(deduped.mapPartitions(partial(signature_partition, params=params)), schema).cache()
    try:
        # buckets carry line numbers only (a shuffle of 8-byte ints, not of shingle sets); their
        # distinct pairs are then checked by the exact Jaccard of the two shingle sets, in the JVM:
        # an estimate from 112 signature slots errs by about 0.045, enough to merge templated rows
        # that differ in a number or a name (true Jaccard 0.6)
        buckets = (df.select("line", F.posexplode("bands").alias("band", "band_hash"))
                   .groupBy("band", "band_hash").agg(F.array_sort(F.collect_set("line")).alias("l"))
                   .where(F.size("l") > 1))
        candidates = candidate_pairs(buckets)
        shingles = df.select("line", "shingles")
        a, b = shingles.alias("sa"), shingles.alias("sb")
        inter = F.size(F.array_intersect(F.col("sa.shingles"), F.col("sb.shingles")))
        union = F.size(F.col("sa.shingles")) + F.size(F.col("sb.shingles")) - inter
        checked = (candidates.join(a, F.col("a") == F.col("sa.line")).join(b, F.col("b") == F.col("sb.line"))
                   .select("a", "b", (inter / union >= params.threshold).alias("near"))
                   .cache())
        verified = checked.where("near").select("a", "b").rdd.map(tuple).cache()
        result = NearDupResult(candidate_pairs=checked.count(), verified_pairs=verified.count())
        checked.unpersist()
        if result.verified_pairs == 0:
            verified.unpersist()
            return deduped, result
        parts = max(1, min(deduped.getNumPartitions(), result.verified_pairs // 20_000 + 1))
        labels, result.iterations = connected_components(verified, params.max_iterations, parts)
        verified.unpersist()
        sizes = labels.map(lambda kv: (kv[1], 1)).reduceByKey(lambda x, y: x + y).map(lambda kv: (kv[1], 1))
        result.cluster_sizes = dict(sizes.reduceByKey(lambda x, y: x + y).collect())
        result.clusters = sum(result.cluster_sizes.values())
        drop = labels.filter(lambda kv: kv[0] != kv[1]).keys()
        result.removed = sum((size - 1) * n for size, n in result.cluster_sizes.items())
        if result.removed <= BROADCAST_DROPS:
            # the removed line numbers go to every worker and the rows are filtered where they are:
            # no shuffle of whole rows
            gone = spark.sparkContext.broadcast(frozenset(drop.collect()))
            kept = deduped.filter(lambda r: r[1][0] not in gone.value)
        else:
            kept = deduped.map(lambda r: (r[1][0], r)).subtractByKey(drop.map(lambda line: (line, None))).values()
        return kept, result
    finally:
        df.unpersist()
