"""The preprocess Spark application: raw JSONL / CSV / Parquet -> canonical chat splits.

    read -> validate (bad rows to rejected.jsonl) -> normalise -> exact dedup -> near dedup
         (MinHash LSH + connected components, `neardup`) -> quality filters (`quality`; removed rows
         to filtered.jsonl, counts in quality_report.json) -> PII masking
         -> deterministic split -> train/val/test.jsonl, rejected.jsonl, pii_report.json, manifest.json

Spark does the work over partitions (RDD mapPartitions with the pure functions of `formats`,
`partitions`, `pii`, `split`; dedup is a reduceByKey on the content hash). The driver only receives
per-partition summaries and streams the (small) outputs to files with `toLocalIterator`, one
partition at a time.

As a Spark application (local or Dataproc):

    spark-submit --py-files ftpipe.zip services/preprocess/job.py \
        --input gs://bucket/incoming/support/chats.jsonl --recipe '{"name": ...}' \
        --out /tmp/prepared --source-json '{"bucket": ..., "name": ..., "generation": ...}'

or locally without spark-submit: `python -m services.preprocess.job --input ... --recipe ... --out ...`
(then a local session is built by `services.preprocess.spark.build_session`).
Exit status: 0 prepared, 1 dataset rejected (the manifest says why), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `spark-submit services/preprocess/job.py` from the project root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql.types import StringType, StructField, StructType

from services.preprocess import formats, split, partitions
from services.preprocess import cost, provenance
from services.preprocess import neardup, quality
from services.preprocess.pii import mask_excerpt
from services.preprocess import pii
from shared.domain import pii_residual
from shared.platform.build_info import ftpipe_version, git_commit
from shared.domain.recipe import Recipe, RecipeError, load_recipe, parse_recipe

log = logging.getLogger("ftpipe.preprocess")

MANIFEST_VERSION = 1
SPLIT_FILES = tuple(f"{name}.jsonl" for name in split.SPLITS)
INPUT_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2")
CORRUPT_COLUMN = "_ftpipe_corrupt_record"
TOKENS_ON_DRIVER_ROWS = 20_000  # up to this many rows, token counts run on the driver (see prepare)


@dataclass
class PrepareResult:
    dataset_id: str
    rejected: bool
    reason: str | None
    counts: dict[str, int]
    out_dir: Path
    files: dict[str, Path]  # file name -> path, every file written (manifest.json included)
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, Any] | None = None          # per split (services/preprocess/cost.py)
    cost_estimate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["files"] = {k: str(v) for k, v in self.files.items()}
        return d


class _Rejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------ small helpers


def input_type(path: str) -> str | None:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext in COMPRESSION:
        name = name.removesuffix(ext)
    return INPUT_TYPES.get(Path(name).suffix)


_SNIFF_BYTES = 8192


def _check_whole_file(path: Path, kind: str, max_bytes: int) -> None:
    """Whole-file problems get one clear reason before Spark reads a line: too large, or binary
    content (NUL bytes) in a text format. Only the first 8 KiB (decompressed) are looked at."""
    size = path.stat().st_size
    if size > max_bytes:
        raise _Rejected(f"input is {size / 2**30:.2f} GiB, over the recipe's data.max_file_bytes "
                        f"({max_bytes / 2**30:.2f} GiB); split the file or raise the limit")
    if kind == "parquet":
        return
    try:
        with _opener(path)(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except (OSError, EOFError) as exc:
        raise _Rejected(f"input cannot be decompressed as {path.suffix}: {exc}") from None
    if b"\x00" in head:
        raise _Rejected(f"input looks binary (NUL bytes in its first {_SNIFF_BYTES // 1024} KiB), "
                        f"not {kind.upper()} text; check that the right file was dropped")


def _opener(path: Path):
    return {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix.lower(), open)


def _gcs_blob(uri: str):
    from google.cloud import storage

    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return storage.Client().bucket(bucket).blob(name)


def _open_input(uri: str, local: Path | None):
    """The input's bytes, decompressed by suffix: a local file, or a gs:// object streamed (Dataproc)."""
    if local is not None:
        return _opener(local)(local, "rb")
    raw = _gcs_blob(uri).open("rb")
    suffix = Path(uri).suffix.lower()
    return gzip.GzipFile(fileobj=raw) if suffix == ".gz" else bz2.BZ2File(raw) if suffix == ".bz2" else raw


def _is_json_array(uri: str, local: Path | None) -> bool:
    """Whether a .json input holds one JSON array (else it is read as JSONL)."""
    with _open_input(uri, local) as fh:
        head = fh.read(_SNIFF_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _json_array_to_jsonl(src, out) -> int:
    """Stream a JSON array's elements (binary file `src`) into JSONL (text file `out`), one element
    per line (ijson: the array is never held in memory). Element N becomes line N. A syntax error
    rejects the whole file."""
    import ijson

    n = 0
    try:
        for item in ijson.items(src, "item", use_float=True):
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
            n += 1
    except (ijson.JSONError, UnicodeDecodeError, ValueError, EOFError, OSError):
        # the parser's message can quote the data: say where, not what
        raise _Rejected(f"input is not a valid JSON array: a syntax or encoding error after element {n}; "
                        "fix the file or drop it as JSONL (one object per line)") from None
    return n


def _stage_json_array(uri: str, local: Path | None, cleanup: list) -> str:
    """The JSON array input as a JSONL file Spark can read: a local temp file, or on Dataproc an
    object beside the input under tmp/ (executors cannot see the driver's disk); removed after."""
    if local is not None:
        staging = Path(tempfile.mkdtemp(prefix="ftpipe-json-"))
        cleanup.append(lambda: shutil.rmtree(staging, ignore_errors=True))
        target = staging / "elements.jsonl"
        with _open_input(uri, local) as src, open(target, "w", encoding="utf-8") as out:
            _json_array_to_jsonl(src, out)
        return str(target)
    bucket = uri.removeprefix("gs://").partition("/")[0]
    target = f"gs://{bucket}/tmp/ftpipe-staging/{uuid.uuid4().hex}/elements.jsonl"
    blob = _gcs_blob(target)
    cleanup.append(lambda: blob.delete() if blob.exists() else None)
    with _open_input(uri, None) as src, blob.open("w", encoding="utf-8") as out:
        _json_array_to_jsonl(src, out)
    return target


def _capped_lines(src, limit: int, out=None) -> bool:
    """Copy binary lines from `src` to `out`, each line over `limit` bytes replaced by a marker
    (formats.long_line_marker) that validation rejects as too_large; never more than `limit` bytes
    of a line in memory. Without `out`, only look: True at the first line over the limit."""
    line, size, found = bytearray(), 0, False
    for chunk in iter(lambda: src.read(1 << 20), b""):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:end if end >= 0 else len(chunk)]
            size += len(piece)
            if size <= limit:
                line += piece
            else:
                line.clear()
                if out is None:
                    return True
                found = True
            if end < 0:
                break
            if out is not None:
                out.write(bytes(line) if size <= limit else formats.long_line_marker(size))
                out.write(b"\n")
            line.clear()
            size, start = 0, end + 1
    if out is not None and size:
        out.write(bytes(line) if size <= limit else formats.long_line_marker(size))
    return found


def _cap_long_lines(path: str, limit: int, cleanup: list) -> str:
    """The JSONL input as Spark may read it. Spark holds a whole line in memory (one line of a few
    hundred MB exhausts the driver's heap and kills its JVM), so when a line is over
    data.max_row_bytes a copy is staged with that line replaced by a marker, rejected as too_large
    with its size; otherwise the input itself."""
    local = Path(path)
    with _opener(local)(local, "rb") as src:
        if not _capped_lines(src, limit):
            return path
    staging = Path(tempfile.mkdtemp(prefix="ftpipe-lines-"))
    cleanup.append(lambda: shutil.rmtree(staging, ignore_errors=True))
    target = staging / "capped.jsonl"
    with _opener(local)(local, "rb") as src, open(target, "wb") as out:
        _capped_lines(src, limit, out)
    return str(target)


def _local_path(path: str) -> Path | None:
    if path.startswith("file://"):
        return Path(path[len("file://"):])
    return None if "://" in path else Path(path)


class _OutFile:
    """Writes a file atomically (temp name, then rename) and records its sha256, size and lines."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._fh = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.rows = 0

    def write_line(self, text: str) -> None:
        data = text.encode("utf-8") + b"\n"
        self._fh.write(data)
        self._sha.update(data)
        self.bytes += len(data)
        self.rows += 1

    def close(self) -> dict[str, Any]:
        self._fh.close()
        os.replace(self._tmp, self.path)
        return {"sha256": self._sha.hexdigest(), "bytes": self.bytes, "rows": self.rows}

    def discard(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> dict[str, Any]:
    out = _OutFile(path)
    try:
        for line in json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).split("\n"):
            out.write_line(line)
    except BaseException:
        out.discard()
        raise
    meta = out.close()
    del meta["rows"]
    return meta


def _write_lines(path: Path, lines) -> dict[str, Any]:
    out = _OutFile(path)
    try:
        for line in lines:
            out.write_line(line)
    except BaseException:
        out.discard()
        raise
    return out.close()


def _describe_exception(exc: BaseException) -> str:
    """One line about a read failure: the exception class and the first line of its message,
    which for Spark is about paths and formats, not row content."""
    text = str(exc).strip().splitlines()
    first = text[0][:300] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ------------------------------------------------------------------------------ reading


def _validated_rdd(spark: SparkSession, path: str, kind: str, rules: formats.RowRules):
    """Validation records (see `formats`) for every input record, in input order."""
    sc = spark.sparkContext
    if kind == "jsonl":
        lines = sc.textFile(path).zipWithIndex()
        return lines.mapPartitions(partial(formats.validate_jsonl, rules=rules))

    if kind == "csv":
        reader = (spark.read.option("header", True).option("multiLine", True)
                  .option("escape", '"').option("mode", "PERMISSIVE"))
        columns = reader.csv(path).columns
    else:
        columns = spark.read.parquet(path).columns
    try:
        formats.table_shape(columns, rules)
    except formats.RowError as err:
        # a header can be a data line (a JSONL file named .csv): mask it like an excerpt
        shown = ", ".join(mask_excerpt(c, 30) for c in columns[:8]) or "none"
        raise _Rejected(f"{kind.upper()} columns ({shown}): {err.reason}") from None

    if kind == "csv":
        schema = StructType([StructField(c, StringType()) for c in columns]
                            + [StructField(CORRUPT_COLUMN, StringType())])
        df = reader.option("columnNameOfCorruptRecord", CORRUPT_COLUMN).schema(schema).csv(path)
        corrupt = CORRUPT_COLUMN
    else:
        df = spark.read.parquet(path)
        corrupt = None
    return df.rdd.zipWithIndex().mapPartitions(
        partial(formats.validate_table, rules=rules, corrupt_column=corrupt)
    )


# ------------------------------------------------------------------------------ the job


def _filtered_line(tagged: tuple) -> tuple[int, str]:
    """A row removed by the quality filters as (line, its filtered.jsonl line): the rules it
    tripped and a PII-masked excerpt, never the raw row."""
    (_, (line_no, messages)), tripped = tagged
    excerpt = mask_excerpt(neardup.conversation_text(messages), 200)
    return line_no, json.dumps({"line": line_no, "rules": list(tripped), "excerpt": excerpt}, ensure_ascii=False)


def prepare(spark: SparkSession, input_path: str, recipe: Recipe, out_dir: Path, *, source: dict) -> PrepareResult:
    """Prepare one raw dataset; see the module docstring. Never raises for bad data: a dataset
    that cannot be used comes back with `rejected=True` and one reason (and rejected.jsonl and
    manifest.json are still written for audit)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = recipe.data
    sc = spark.sparkContext
    rules = formats.RowRules(format=data.format, kind=recipe.data_kind, system_prompt=data.system_prompt,
                             max_row_bytes=data.max_row_bytes, columns=tuple(sorted(data.columns.items())),
                             split_column=data.split_column, labels=data.labels)
    fractions = tuple(float(f) for f in data.split)
    categories = tuple(data.pii_categories)

    counts: dict[str, int] = {}
    files: dict[str, Path] = {}
    file_meta: dict[str, dict] = {}
    timings: dict[str, float] = {}
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "source": source,
        "input": {"uri": input_path, "type": input_type(input_path), "digest": None,
                  "digest_method": "sum mod 2^256 of sha256(record number, record), over all records"},
        "recipe": {"name": recipe.name, "version": recipe.version, "hash": recipe.hash},
        "code_version": {"ftpipe": ftpipe_version(), **git_commit(), "pyspark": spark.version,
                         "python": ".".join(map(str, sys.version_info[:3]))},
    }
    cached = []
    cleanup: list = []   # callables that remove staged files

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        return now

    try:
        # 0. PII canary: the configured backend must mask a document seeded with every enabled
        # category before any data is touched (categories only in the reason, never values)
        try:
            missed = pii.canary_missed(categories, data.pii_backend)
        except pii.PiiBackendUnavailable as exc:
            raise _Rejected(str(exc)) from None
        if missed:
            raise _Rejected(f"PII canary not fully detected: missed {missed} (pii_backend {data.pii_backend!r})")

        kind = input_type(input_path)
        if kind is None:
            raise _Rejected(f"unsupported input type for {input_path.rsplit('/', 1)[-1]!r}; "
                            f"expected one of {', '.join(sorted(INPUT_TYPES))} (optionally .gz/.bz2)")
        local = _local_path(input_path)
        if local is not None:
            if not local.exists():
                raise _Rejected(f"input not found: {input_path}")
            if not os.access(local, os.R_OK) or not (local.is_file() or kind == "parquet" and local.is_dir()):
                raise _Rejected(f"input unreadable: {input_path} is not a readable file")
            if local.is_file() and local.stat().st_size == 0:
                raise _Rejected("input is empty (0 bytes)")
            if local.is_file():
                _check_whole_file(local, kind, data.max_file_bytes)
            input_path = str(local.resolve())
        manifest.update(provenance.describe_source(source, local, recipe))
        if problem := provenance.legal_basis_problem(recipe, source):
            raise _Rejected(problem)
        if kind == "json":  # a JSON array (streamed into JSONL, element N as line N) or JSONL named .json
            kind = "jsonl"
            try:
                is_array = _is_json_array(input_path, local)
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable object
                raise _Rejected(f"input unreadable: {_describe_exception(exc)}") from None
            if is_array:
                input_path = _stage_json_array(input_path, local, cleanup)
                manifest["input"]["type"] = "json_array"
                manifest["input"]["record_numbering"] = "array element, from 1 (the 'line' of rejected.jsonl)"
        if kind == "jsonl" and local is not None:
            input_path = _cap_long_lines(input_path, data.max_row_bytes, cleanup)
        manifest["kind"] = recipe.data_kind

        # 1-2. read and validate
        t0 = time.perf_counter()
        sc.setJobDescription("preprocess: read + validate")
        try:
            validated = _validated_rdd(spark, input_path, kind, rules).persist(StorageLevel.MEMORY_AND_DISK)
            cached.append(validated)
            summary = partitions.merge_validation(validated.mapPartitions(partitions.summarise_validation).collect())
        except _Rejected:
            raise
        except Exception as exc:  # noqa: BLE001 - Spark/Py4J errors for unreadable input
            log.warning("preprocess: cannot read input (%s)", type(exc).__name__)
            raise _Rejected(f"input unreadable as {kind.upper()}: {_describe_exception(exc)}") from None
        t0 = lap("read_validate_s", t0)

        digest = summary["digest"]
        manifest["input"]["digest"] = f"{digest:064x}"
        ok, bad = summary["counts"]["ok"], summary["counts"]["bad"]
        counts.update(raw=ok + bad, blank_lines=summary["counts"]["blank"], valid=ok, rejected=bad)
        manifest["rejected_by_code"] = dict(sorted(summary["codes"].items()))

        sc.setJobDescription("preprocess: write rejected.jsonl")
        file_meta["rejected.jsonl"] = _write_lines(
            out_dir / "rejected.jsonl",
            validated.filter(lambda r: r[0] == "bad").map(partitions.rejected_line).toLocalIterator(),
        )
        files["rejected.jsonl"] = out_dir / "rejected.jsonl"
        t0 = lap("write_rejected_s", t0)

        raw = counts["raw"]
        if raw == 0:
            raise _Rejected("input is empty (no rows)")
        if ok == 0 and set(summary["codes"]) <= {"bad_json", "bad_encoding", "not_object"} and kind == "jsonl":
            raise _Rejected(f"input is not {'a JSON array or ' if manifest['input']['type'] == 'json' else ''}JSONL: none of its {raw} lines is a JSON object "
                            f"(line {summary['first_bad'][0]}: {summary['first_bad'][1]})")
        if ok == 0 and len(summary["codes"]) == 1:  # one problem everywhere, e.g. the wrong data.format
            raise _Rejected(f"all {raw} rows rejected, e.g. line {summary['first_bad'][0]}: {summary['first_bad'][1]}")
        if ok == 0 and summary["codes"].get("wrong_kind", 0) * 2 > bad:  # data for another kind of training
            line_no, why = summary["first"]["wrong_kind"]
            raise _Rejected(f"{summary['codes']['wrong_kind']} of {raw} rows do not fit the recipe, e.g. "
                            f"line {line_no}: {why}")
        if bad / raw > data.max_rejected_fraction:
            top = ", ".join(f"{code} {n}" for code, n in
                            sorted(summary["codes"].items(), key=lambda kv: (-kv[1], kv[0]))[:3])
            raise _Rejected(f"{bad} of {raw} rows rejected ({bad / raw:.0%}), above "
                            f"data.max_rejected_fraction={data.max_rejected_fraction:g} ({top}; see rejected.jsonl)")

        # 3-5. dedup on the content hash (natural casing, then the lowest line wins), then mask and place
        sc.setJobDescription("preprocess: dedup + PII + split")
        deduped = (validated.filter(lambda r: r[0] == "ok").map(partitions.dedup_key)
                   .reduceByKey(partitions.keep_representative))
        # 3b. near-duplicates (MinHash LSH + connected components), then 3c. quality filters
        near_removed, quality_removed = 0, 0
        if recipe.dedup.near:
            sc.setJobDescription("preprocess: near dedup")
            deduped, near = neardup.near_dedup(spark, deduped, neardup.Params.from_spec(recipe.dedup))
            near_removed = near.removed
            manifest["near_dedup"] = {**recipe.dedup.model_dump(mode="json"), **near.report()}
            t0 = lap("near_dedup_s", t0)
        if recipe.quality.enabled:
            sc.setJobDescription("preprocess: quality filters")
            tagged = deduped.mapPartitions(
                partial(quality.tag_partition, rules=quality.Rules.from_spec(recipe.quality))
            ).persist(StorageLevel.MEMORY_AND_DISK)
            cached.append(tagged)
            qsum = quality.merge(tagged.mapPartitions(quality.summarise).collect())
            quality_removed = qsum["removed"]
            file_meta["filtered.jsonl"] = _write_lines(
                out_dir / "filtered.jsonl",
                (line for _, line in tagged.filter(lambda t: bool(t[1])).map(_filtered_line).sortByKey()
                 .toLocalIterator()),
            )
            files["filtered.jsonl"] = out_dir / "filtered.jsonl"
            quality_report = {"rules_enabled": list(recipe.quality.rules),
                              "thresholds": recipe.quality.model_dump(mode="json"),
                              "rows_checked": qsum["checked"],
                              "rows_removed": quality_removed,
                              "counts": {r: qsum["rules"].get(r, 0) for r in recipe.quality.rules},
                              "note": "a row can trip several rules: each is counted, the row is removed once"}
            file_meta["quality_report.json"] = _write_json(out_dir / "quality_report.json", quality_report)
            files["quality_report.json"] = out_dir / "quality_report.json"
            manifest["quality"] = {"rows_removed": quality_removed, "counts": quality_report["counts"]}
            deduped = tagged.filter(lambda t: not t[1]).map(lambda t: t[0])
            t0 = lap("quality_s", t0)
        cuts = None
        if recipe.data_kind == "classification" and data.stratify:
            sc.setJobDescription("preprocess: stratified split cuts")
            cuts = split.stratified_cuts(deduped.map(partitions.strata_key).filter(lambda k: k is not None), fractions)
        prepared = deduped.mapPartitions(
            partial(partitions.mask_and_place, categories=categories, fractions=fractions, backend=data.pii_backend,
                    cuts=cuts)
        ).persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(prepared)
        psum = partitions.merge_prepared(prepared.mapPartitions(partitions.summarise_prepared).collect())
        n = sum(psum["splits"])
        # deduplicated: rows after exact and near dedup (the quality filters come after it)
        counts.update(deduplicated=n + quality_removed, duplicates_removed=ok - n - quality_removed - near_removed,
                      near_duplicates_removed=near_removed, quality_filtered=quality_removed,
                      pii_masked_rows=psum["masked_rows"])
        t0 = lap("dedup_mask_s", t0)
        if n < data.min_rows:
            raise _Rejected(f"only {n} valid rows after dedup, fewer than data.min_rows={data.min_rows}")

        # 5b. residual PII scan: an independent loose scanner over the masked rows; above the
        # recipe's threshold the dataset is rejected before any split is written
        sc.setJobDescription("preprocess: PII residual scan")
        residual = pii_residual.merge(prepared.mapPartitions(pii_residual.summarise).collect())
        manifest["pii"] = {"backend": data.pii_backend, "counts": {c: psum["pii"].get(c, 0) for c in categories},
                           "rows_masked": psum["masked_rows"], "residual_rate": residual["rate"],
                           "residual_threshold": data.pii_residual_threshold}
        t0 = lap("pii_residual_s", t0)
        if residual["rate"] > data.pii_residual_threshold:
            raise _Rejected(f"PII residual rate {residual['rate']:.2%} above threshold "
                            f"{data.pii_residual_threshold:.2%} ({residual['documents_with_hits']} of "
                            f"{residual['documents']} documents flagged by the residual scan: "
                            f"{', '.join(f'{k} {v}' for k, v in residual['hits'].items())})")

        # 6. split (hash buckets; an empty split borrows the nearest rows of the largest one)
        split_counts = list(psum["splits"])
        moved: dict[str, int] = {}
        for target in split.empty_splits(split_counts, fractions):
            donor = max(range(3), key=lambda i: (split_counts[i], -i))
            if split_counts[donor] < 2:
                continue
            taken = set(moved)
            best = (prepared.filter(lambda r, d=donor, t=taken: r[0] == d and r[5] != "user" and r[1] not in t)
                    .map(lambda r: r[1])
                    .takeOrdered(1, key=lambda rid, t=target: (split.distance(rid, t, fractions), rid)))
            if best:
                moved[best[0]] = target
                split_counts[donor] -= 1
                split_counts[target] += 1
        counts.update(zip(split.SPLITS, split_counts))
        manifest["split"] = {
            "fractions": list(fractions),
            "method": ("stratified by label: per label, rows ordered by the sha256 bucket of their id and cut "
                       "at the fractions" if cuts is not None else "sha256 bucket of the row id"),
            "split_column": data.split_column,
            "rows_placed_by": dict(sorted(psum["placed_by"].items())),  # user (split column) | stratified | hash
            "rows_moved_to_fill_empty_splits": len(moved)}

        # 7. write the splits, sorted by id, streaming one partition at a time
        sc.setJobDescription("preprocess: write splits")
        outs = [_OutFile(out_dir / name) for name in SPLIT_FILES]
        placed = prepared.map(lambda r, m=moved: (r[1], (m.get(r[1], r[0]), r[3])))  # (id, (split, line))
        try:
            for _, (split_index, line) in placed.sortByKey().toLocalIterator():
                outs[split_index].write_line(line)
        except BaseException:
            for out in outs:
                out.discard()
            raise
        for name, out in zip(SPLIT_FILES, outs):
            file_meta[name] = out.close()
            files[name] = out.path
        t0 = lap("write_splits_s", t0)

        pii_report = {
            "categories_enabled": list(categories),
            "counts": {c: psum["pii"].get(c, 0) for c in categories},
            "rows_scanned": n,
            "rows_masked": psum["masked_rows"],
            "backend": data.pii_backend,
            "canary": "passed",
            "residual_rate": residual["rate"],
            "residual_threshold": data.pii_residual_threshold,
            "residual": {"documents_scanned": residual["documents"],
                         "documents_with_hits": residual["documents_with_hits"],
                         "hits_by_rule": residual["hits"], "rate": residual["rate"],
                         "threshold": data.pii_residual_threshold},
            "method": (f"{data.pii_backend} backend (see services/preprocess/pii.py), then an independent "
                       "high-recall residual scan of the masked rows; values are never stored"),
        }
        file_meta["pii_report.json"] = _write_json(out_dir / "pii_report.json", pii_report)
        files["pii_report.json"] = out_dir / "pii_report.json"
        manifest["pii"]["residual"] = pii_report["residual"]
        rejected, reason = False, None
        t0 = time.perf_counter()
        # token counts with the base model's tokenizer: on the workers in parallel for large datasets;
        # on the driver for small ones, where starting transformers in every worker costs more
        sc.setJobDescription("preprocess: token counts")
        max_seq_len = recipe.training.max_seq_len

        def count(tokenizer) -> dict:
            if n <= TOKENS_ON_DRIVER_ROWS:
                lines = ((i, json.loads(line)) for i, line in placed.values().toLocalIterator())
                return cost.token_totals(cost.count_records(tokenizer, lines, system_prompt=data.system_prompt,
                                                            max_seq_len=max_seq_len), max_seq_len)
            per_partition = partial(cost.count_partition, base_model=recipe.base_model,
                                    system_prompt=data.system_prompt, max_seq_len=max_seq_len)
            return cost.token_totals(cost.merge_counts(placed.values().mapPartitions(per_partition).collect()),
                                     max_seq_len)

        tokens, cost_estimate, token_error = cost.tokens_and_cost(recipe, count)
        manifest.update(tokens=tokens or {"error": token_error}, cost_estimate=cost_estimate)
        lap("tokens_s", t0)
    except _Rejected as rej:
        rejected, reason = True, rej.reason
        for name in (*SPLIT_FILES, "pii_report.json"):  # never leave splits from an earlier run beside a rejection
            (out_dir / name).unlink(missing_ok=True)
        for name in ("filtered.jsonl", "quality_report.json"):  # audit files: kept when written by this run
            if name not in files:
                (out_dir / name).unlink(missing_ok=True)
        if "rejected.jsonl" not in files:
            file_meta["rejected.jsonl"] = _write_lines(out_dir / "rejected.jsonl", [])
            files["rejected.jsonl"] = out_dir / "rejected.jsonl"
    finally:
        sc.setJobDescription(None)
        for rdd in cached:
            rdd.unpersist()
        for remove in cleanup:
            remove()

    digest_hex = manifest["input"]["digest"] or hashlib.sha256(input_path.encode()).hexdigest()
    dataset_id = hashlib.sha256(f"{digest_hex}:{recipe.hash}".encode()).hexdigest()[:16]
    manifest.update(
        dataset_id=dataset_id,
        status="rejected" if rejected else "prepared",
        reason=reason,
        counts=counts,
        files=file_meta,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    timings["total_s"] = round(time.perf_counter() - started, 3)
    manifest["timings"] = dict(timings)
    _write_json(out_dir / "manifest.json", manifest)
    files["manifest.json"] = out_dir / "manifest.json"
    timings["total_s"] = round(time.perf_counter() - started, 3)
    if rejected:
        log.warning("preprocess: dataset %s rejected: %s", dataset_id, reason)
    log.info("preprocess: dataset %s counts=%s timings=%s", dataset_id, counts, timings)
    return PrepareResult(dataset_id=dataset_id, rejected=rejected, reason=reason, counts=counts,
                         out_dir=out_dir, files=files, timings=timings,
                         tokens=manifest.get("tokens") if not rejected else None,
                         cost_estimate=manifest.get("cost_estimate"))


# ------------------------------------------------------------------------------ entrypoint


def _load_recipe_arg(value: str) -> Recipe:
    if value.lstrip().startswith("{"):
        return parse_recipe(value, source="--recipe")  # JSON is YAML
    return load_recipe(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preprocess", description="Prepare a raw dataset for fine-tuning.")
    parser.add_argument("--input", required=True, help="JSONL/CSV/Parquet file (local path, file:// or gs://)")
    parser.add_argument("--recipe", required=True, help="recipe name, YAML path, or JSON string")
    parser.add_argument("--out", required=True, help="output directory (a path, file:// or gs://, e.g. on Dataproc)")
    parser.add_argument("--source-json", default="{}", help="source description (JSON object) for the manifest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)

    try:
        recipe = _load_recipe_arg(args.recipe)
        source = json.loads(args.source_json)
        if not isinstance(source, dict):
            raise ValueError("--source-json must be a JSON object")
    except (RecipeError, ValueError) as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # launched by spark-submit: the cluster's settings
        spark = SparkSession.builder.appName("ftpipe-preprocess").getOrCreate()
    else:
        from services.preprocess.spark import build_session

        spark = build_session()
    start_s = time.perf_counter() - t0
    remote = args.out.startswith("gs://")
    out_dir = Path(tempfile.mkdtemp(prefix="ftpipe-out-")) if remote else Path(args.out.removeprefix("file://"))
    result = prepare(spark, args.input, recipe, out_dir, source=source)
    if remote:  # Dataproc: the driver's local folder, then the bucket (write-if-absent, as the service does)
        from services.preprocess.dataproc import upload_out

        upload_out(out_dir, args.out)
    result.timings["spark_start_s"] = round(start_s, 3)
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return 1 if result.rejected else 0


if __name__ == "__main__":
    sys.exit(main())
