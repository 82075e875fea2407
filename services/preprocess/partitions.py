"""The per-partition steps after validation, and the small per-partition summaries the driver
merges (pure Python, standard library only: this is what Spark workers import).

Validation records come from `formats.validate_*`:
    ("ok",    line_no, digest, hash, segments)
    ("bad",   line_no, digest, code, reason, excerpt)
    ("blank", line_no, digest)
Prepared records (after dedup and masking), from `mask_and_place`:
    (split_index, id, line_no, json_line, pii_counts, placed_by, residual_hits)
    placed_by: user | stratified | hash; residual_hits: pii_residual's scan of the masked row
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from shared.domain import pii_residual

from services.preprocess import formats, pii, split

ID_CHARS = 16
_MOD = 1 << 256


# ------------------------------------------------------------------ validation summary


def summarise_validation(records: Iterable[tuple]) -> Iterator[dict]:
    """One summary per partition: counts by status and by rejection code, the input digest share,
    the first rejection of each code (line and reason, for the dataset-level message)."""
    counts = {"ok": 0, "bad": 0, "blank": 0}
    codes: dict[str, int] = {}
    digest = 0
    first: dict[str, tuple[int, str]] = {}
    for rec in records:
        status, line_no, d = rec[0], rec[1], rec[2]
        counts[status] += 1
        digest = (digest + d) % _MOD
        if status == "bad":
            codes[rec[3]] = codes.get(rec[3], 0) + 1
            if rec[3] not in first or line_no < first[rec[3]][0]:
                first[rec[3]] = (line_no, rec[4])
    yield {"counts": counts, "codes": codes, "digest": digest, "first": first}


def merge_validation(parts: Iterable[dict]) -> dict:
    """Partition summaries -> one, with `first_bad`: the first rejection of the most common code."""
    total = {"counts": {"ok": 0, "bad": 0, "blank": 0}, "codes": {}, "digest": 0, "first": {}}
    for part in parts:
        for k, v in part["counts"].items():
            total["counts"][k] += v
        for k, v in part["codes"].items():
            total["codes"][k] = total["codes"].get(k, 0) + v
        total["digest"] = (total["digest"] + part["digest"]) % _MOD
        for code, example in part["first"].items():
            if code not in total["first"] or example[0] < total["first"][code][0]:
                total["first"][code] = example
    top = max(total["codes"], key=lambda c: (total["codes"][c], -total["first"][c][0]), default=None)
    total["first_bad"] = total["first"][top] if top else None
    return total


def rejected_line(rec: tuple) -> str:
    """A ("bad", ...) record as its rejected.jsonl line."""
    _, line_no, _, code, reason, excerpt = rec
    return json.dumps({"line": line_no, "code": code, "reason": reason, "raw_excerpt": excerpt}, ensure_ascii=False)


# ------------------------------------------------------------------ dedup


def dedup_key(rec: tuple) -> tuple[str, tuple[int, tuple]]:
    """("ok", line, digest, hash, segments) -> (hash, (line, segments))."""
    return rec[3], (rec[1], rec[4])


def _one_case(segments: tuple) -> bool:
    """Whether a row's text is all lower or all upper case (a mangled copy: PII rules and the model
    both read natural casing better)."""
    text = "".join(content for _, content in formats.text_segments(segments))
    return text.islower() or text.isupper()


def keep_representative(a: tuple[int, tuple], b: tuple[int, tuple]) -> tuple[int, tuple]:
    """Of two rows with the same content hash (equal up to case and spacing) keep the one in natural
    casing, then the one with the lower line number (commutative and associative, as reduceByKey needs)."""
    return a if (_one_case(a[1]), a[0]) <= (_one_case(b[1]), b[0]) else b


# ------------------------------------------------------------------ masking and placement


def strata_key(pair: tuple[str, tuple[int, tuple]]) -> tuple[str, str] | None:
    """(label as JSON, row id) of a classification row the split may place (no user split), else None."""
    content_hash, (_, segments) = pair
    if formats.segment(segments, "split") is not None:
        return None
    label = formats.segment(segments, "label")
    return None if label is None else (json.dumps(label), content_hash[:ID_CHARS])


def mask_and_place(pairs: Iterable[tuple[str, tuple[int, tuple]]], categories: tuple[str, ...],
                   fractions: tuple[float, float, float], backend: str = "rules",
                   cuts: dict[str, tuple] | None = None) -> Iterator[tuple]:
    """(hash, (line, segments)) -> (split_index, id, line_no, json_line, pii_counts, placed_by,
    residual_hits).

    The id is a prefix of the content hash of the unmasked, normalised row (unique after dedup).
    The split: the row's own split column where it has one; else, with `cuts` (stratified
    classification, see `split.stratified_cuts`), its label's cuts; else the hash bucket of its id.
    """
    for content_hash, (line_no, segments) in pairs:
        row_id = content_hash[:ID_CHARS]
        counts: dict[str, int] = {}
        out = []
        for role, content in segments:
            if categories and role not in formats.META_ROLES:
                content, found = pii.mask(content, categories, backend)
                for k, v in found.items():
                    counts[k] = counts.get(k, 0) + v
            out.append((role, content))
        user_split = formats.segment(segments, "split")
        label = formats.segment(segments, "label")
        if user_split is not None:
            index, placed_by = split.SPLITS.index(user_split), "user"
        elif cuts is not None and label is not None:
            index, placed_by = split.assign_stratified(row_id, cuts[json.dumps(label)]), "stratified"
        else:
            index, placed_by = split.assign(row_id, fractions), "hash"
        line = json.dumps(formats.to_record(row_id, out), ensure_ascii=False)
        residual = pii_residual.scan_texts(c for _, c in formats.text_segments(out))
        yield (index, row_id, line_no, line, counts, placed_by, residual)


def summarise_prepared(records: Iterable[tuple]) -> Iterator[dict]:
    splits = [0, 0, 0]
    pii_counts: dict[str, int] = {}
    placed: dict[str, int] = {}
    masked_rows = 0
    for split_index, _, _, _, counts, placed_by, _ in records:
        splits[split_index] += 1
        placed[placed_by] = placed.get(placed_by, 0) + 1
        if counts:
            masked_rows += 1
            for k, v in counts.items():
                pii_counts[k] = pii_counts.get(k, 0) + v
    yield {"splits": splits, "pii": pii_counts, "masked_rows": masked_rows, "placed_by": placed}


def merge_prepared(parts: Iterable[dict]) -> dict:
    total = {"splits": [0, 0, 0], "pii": {}, "masked_rows": 0, "placed_by": {}}
    for part in parts:
        total["splits"] = [a + b for a, b in zip(total["splits"], part["splits"], strict=True)]
        for key in ("pii", "placed_by"):
            for k, v in part[key].items():
                total[key][k] = total[key].get(k, 0) + v
        total["masked_rows"] += part["masked_rows"]
    return total
