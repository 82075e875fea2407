"""Deterministic train/val/test split by content hash.

Each row's split depends only on its own content: `bucket(id)` maps the row id (a prefix of the
content hash) to [0, 1), and the recipe fractions cut [0, 1) into three intervals. So the same row
always lands in the same split, whatever else is in the dataset or how Spark partitions it.

Small datasets can leave a split empty by chance (e.g. 12 rows and nothing above 0.9). When a split
with a non-zero fraction is empty and another split has rows to spare, `rebalance` moves the rows
whose buckets lie nearest to the empty interval — still a deterministic function of the data.

Classification rows are stratified by label (`stratified_cuts`): within each label the rows are
ordered by bucket and cut at the recipe fractions, so every label gets exact proportions (a row's
split then depends on the other rows of its label, still not on partitioning). A split column in
the data overrides both (`stages.mask_and_place`).
"""
from __future__ import annotations

SPLITS = ("train", "val", "test")


def bucket(row_id: str) -> float:
    """A uniform value in [0, 1) from a hex id (the first 52 bits, exact as a float)."""
    return int(row_id[:13], 16) / float(1 << 52)


def boundaries(fractions: tuple[float, float, float]) -> tuple[float, float]:
    """The two cuts of [0, 1); a zero fraction at the end pins its cut to 1.0 exactly, so that
    float rounding (0.7 + 0.2 = 0.8999...) never sends a row to a split that should be empty."""
    train, val, test = fractions
    cut2 = 1.0 if test == 0 else train + val
    cut1 = 1.0 if val == 0 and test == 0 else min(train, cut2)
    return cut1, cut2


def assign(row_id: str, fractions: tuple[float, float, float]) -> int:
    """Index into SPLITS for a row."""
    b = bucket(row_id)
    cut1, cut2 = boundaries(fractions)
    if b < cut1:
        return 0
    if b < cut2:
        return 1
    return 2


def interval(index: int, fractions: tuple[float, float, float]) -> tuple[float, float]:
    cut1, cut2 = boundaries(fractions)
    return ((0.0, cut1), (cut1, cut2), (cut2, 1.0))[index]


def distance(row_id: str, index: int, fractions: tuple[float, float, float]) -> float:
    """How far a row's bucket lies from the interval of split `index` (0 inside it)."""
    lo, hi = interval(index, fractions)
    b = bucket(row_id)
    return 0.0 if lo <= b < hi else min(abs(b - lo), abs(b - hi))


def empty_splits(counts: list[int], fractions: tuple[float, float, float]) -> list[int]:
    """Splits that should have rows and have none, while the dataset could give them one each."""
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if sum(counts) < len(wanted):
        return []
    return [i for i in wanted if counts[i] == 0]


# ------------------------------------------------------------------ stratified (classification)


def order_key(row_id: str) -> tuple[float, str]:
    return bucket(row_id), row_id


def cut_ranks(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """0-based ranks of the first val row and the first test row among n rows of one label
    (cumulative rounding, half up, so the three counts always sum to n)."""
    train, val, test = fractions
    first_val = n if val == 0 and test == 0 else min(n, int(n * train + 0.5))
    first_test = n if test == 0 else min(n, int(n * (train + val) + 0.5))
    return first_val, first_test


def stratified_cuts(keys, fractions: tuple[float, float, float]) -> dict[str, tuple]:
    """keys: an RDD of (label as JSON, row id). Returns {label: (first val key, first test key)},
    each an `order_key` or None (no row at that rank). Collects two keys per label, never rows."""
    counts = keys.map(lambda k: k[0]).countByValue()
    wanted: dict[int, list[tuple[str, int]]] = {}
    cuts: dict[str, list] = {}
    offset = 0
    for label in sorted(counts):
        n = counts[label]
        cuts[label] = [None, None]
        for which, rank in enumerate(cut_ranks(n, fractions)):
            if rank < n:
                wanted.setdefault(offset + rank, []).append((label, which))
        offset += n
    ordered = (keys.map(lambda k: ((k[0], *order_key(k[1])), None)).sortByKey().keys().zipWithIndex()
               .filter(lambda kv, w=frozenset(wanted): kv[1] in w).collect())
    for (_label, b, row_id), index in ordered:
        for lab, which in wanted[index]:
            cuts[lab][which] = (b, row_id)
    return {label: tuple(c) for label, c in cuts.items()}


def assign_stratified(row_id: str, cuts: tuple) -> int:
    """Index into SPLITS for a row of a label with these cuts (see `stratified_cuts`)."""
    key = order_key(row_id)
    first_val, first_test = cuts
    if first_val is None or key < first_val:
        return 0
    if first_test is None or key < first_test:
        return 1
    return 2
