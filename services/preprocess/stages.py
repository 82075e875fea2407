"""The per-partition steps after validation, and the small per-partition summaries the driver
merges (pure Python, standard library only: this is what Spark workers import).

Validation records come from `formats.validate_*`:
    ("ok",    line_no, digest, hash, messages)
    ("bad",   line_no, digest, code, reason, excerpt)
    ("blank", line_no, digest)
Prepared records (after dedup and masking), from `mask_and_place`:
    (split_index, id, line_no, json_line, pii_counts)
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from services.preprocess import pii, split

ID_CHARS = 16
_MOD = 1 << 256


# ------------------------------------------------------------------ validation summary


def summarise_validation(records: Iterable[tuple]) -> Iterator[dict]:
    """One summary per partition: counts by status and by rejection code, the input digest share,
    the first rejection (line and reason, for the dataset-level message)."""
    counts = {"ok": 0, "bad": 0, "blank": 0}
    codes: dict[str, int] = {}
    digest = 0
    first_bad = None
    for rec in records:
        status, line_no, d = rec[0], rec[1], rec[2]
        counts[status] += 1
        digest = (digest + d) % _MOD
        if status == "bad":
            codes[rec[3]] = codes.get(rec[3], 0) + 1
            if first_bad is None or line_no < first_bad[0]:
                first_bad = (line_no, rec[4])
    yield {"counts": counts, "codes": codes, "digest": digest, "first_bad": first_bad}


def merge_validation(parts: Iterable[dict]) -> dict:
    total = {"counts": {"ok": 0, "bad": 0, "blank": 0}, "codes": {}, "digest": 0, "first_bad": None}
    for part in parts:
        for k, v in part["counts"].items():
            total["counts"][k] += v
        for k, v in part["codes"].items():
            total["codes"][k] = total["codes"].get(k, 0) + v
        total["digest"] = (total["digest"] + part["digest"]) % _MOD
        fb = part["first_bad"]
        if fb is not None and (total["first_bad"] is None or fb[0] < total["first_bad"][0]):
            total["first_bad"] = fb
    return total


def rejected_line(rec: tuple) -> str:
    """A ("bad", ...) record as its rejected.jsonl line."""
    _, line_no, _, code, reason, excerpt = rec
    return json.dumps({"line": line_no, "code": code, "reason": reason, "raw_excerpt": excerpt}, ensure_ascii=False)


# ------------------------------------------------------------------ dedup


def dedup_key(rec: tuple) -> tuple[str, tuple[int, tuple]]:
    """("ok", line, digest, hash, messages) -> (hash, (line, messages))."""
    return rec[3], (rec[1], rec[4])


def keep_first(a: tuple[int, tuple], b: tuple[int, tuple]) -> tuple[int, tuple]:
    """Of two rows with the same content hash keep the one with the lower line number."""
    return a if a[0] <= b[0] else b


# ------------------------------------------------------------------ masking and placement


def mask_and_place(pairs: Iterable[tuple[str, tuple[int, tuple]]], categories: tuple[str, ...],
                   fractions: tuple[float, float, float], backend: str = "rules") -> Iterator[tuple]:
    """(hash, (line, messages)) -> (split_index, id, line_no, json_line, pii_counts).

    The id is a prefix of the content hash of the unmasked, normalised conversation (unique after
    dedup); the split depends only on the id.
    """
    for content_hash, (line_no, messages) in pairs:
        row_id = content_hash[:ID_CHARS]
        counts: dict[str, int] = {}
        out = []
        for role, content in messages:
            if categories:
                content, found = pii.mask(content, categories, backend)
                for k, v in found.items():
                    counts[k] = counts.get(k, 0) + v
            out.append({"role": role, "content": content})
        line = json.dumps({"id": row_id, "messages": out}, ensure_ascii=False)
        yield (split.assign(row_id, fractions), row_id, line_no, line, counts)


def summarise_prepared(records: Iterable[tuple]) -> Iterator[dict]:
    splits = [0, 0, 0]
    pii_counts: dict[str, int] = {}
    masked_rows = 0
    for split_index, _, _, _, counts in records:
        splits[split_index] += 1
        if counts:
            masked_rows += 1
            for k, v in counts.items():
                pii_counts[k] = pii_counts.get(k, 0) + v
    yield {"splits": splits, "pii": pii_counts, "masked_rows": masked_rows}


def merge_prepared(parts: Iterable[dict]) -> dict:
    total = {"splits": [0, 0, 0], "pii": {}, "masked_rows": 0}
    for part in parts:
        total["splits"] = [a + b for a, b in zip(total["splits"], part["splits"])]
        for k, v in part["pii"].items():
            total["pii"][k] = total["pii"].get(k, 0) + v
        total["masked_rows"] += part["masked_rows"]
    return total
