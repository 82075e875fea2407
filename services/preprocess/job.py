"""The preprocess Spark application: raw JSONL / CSV / Parquet -> canonical chat splits.

    read -> validate (bad rows to rejected.jsonl) -> normalise -> exact dedup -> near dedup
         (MinHash LSH + connected components, `neardup`) -> quality filters (`quality`; removed rows
         to filtered.jsonl, counts in quality_report.json) -> PII masking
         -> deterministic split -> train/val/test.jsonl, rejected.jsonl, pii_report.json, manifest.json

Spark does the work over partitions (RDD mapPartitions with the pure functions of `formats`,
`partitions`, `pii`, `split`; dedup is a reduceByKey on the content hash). The driver only receives
per-partition summaries and streams the (small) outputs to files with `toLocalIterator`, one
partition at a time.

`prepare` runs the steps of `STEPS` in order, each a function over one `Preparation` (the run's
state): a step reads what earlier steps added, adds its own part, records its own counts and
timing, and rejects the dataset with one reason where it must.

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
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `spark-submit services/preprocess/job.py` from the project root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pyspark import RDD, StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql.types import StringType, StructField, StructType

from shared.domain import pii_residual
from shared.domain.recipe import DataSpec, Recipe, RecipeError, load_recipe, parse_recipe
from shared.platform.build_info import ftpipe_version, git_commit

from services.preprocess import cost, formats, neardup, partitions, pii, provenance, quality, split
from services.preprocess.pii import mask_excerpt

log = logging.getLogger("ftpipe.preprocess")

MANIFEST_VERSION = 1
SPLIT_FILES = tuple(f"{name}.jsonl" for name in split.SPLITS)
INPUT_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2")
CORRUPT_COLUMN = "_ftpipe_corrupt_record"
TOKENS_ON_DRIVER_ROWS = 20_000  # up to this many rows, token counts run on the driver (see count_tokens)


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


# ------------------------------------------------------------------------------ the state


@dataclass
class Preparation:
    """One `prepare` run: its inputs, what each step adds, and the bookkeeping every step writes
    to (its counts, manifest sections, files and timing). The comment of a field says which step
    writes it; a step reads only fields that steps before it wrote."""

    spark: SparkSession
    recipe: Recipe
    out_dir: Path
    source: dict
    uri: str                                   # the input as given: the manifest's input.uri
    started: float                             # perf_counter at the start (total_s)
    manifest: dict[str, Any]                   # its head (start); each step adds its own section
    path: str = ""                             # what Spark reads: `uri`, resolved (check_input), staged (stage_input)
    kind: str | None = None                    # jsonl | csv | parquet (check_input; json -> jsonl in stage_input)
    local: Path | None = None                  # the input on this machine's disk, None for gs:// (check_input)
    validated: RDD | None = None               # validation records, cached (read_validate)
    summary: dict[str, Any] = field(default_factory=dict)   # merged validation summary (read_validate)
    deduped: RDD | None = None                 # (hash, (line, segments)) kept (exact_dedup, near_dedup, quality_filter)
    near_removed: int = 0                      # rows removed as near duplicates (near_dedup)
    quality_removed: int = 0                   # rows removed by the quality filters (quality_filter)
    cuts: dict[str, tuple] | None = None       # each label's split cuts (stratified_cuts)
    prepared: RDD | None = None                # prepared records, masked and placed, cached (mask_and_place_rows)
    prepared_summary: dict[str, Any] = field(default_factory=dict)  # their merged summary (mask_and_place_rows)
    residual: dict[str, Any] = field(default_factory=dict)          # the residual PII scan (residual_pii_scan)
    moved: dict[str, int] = field(default_factory=dict)  # row id -> split it was moved to (fill_empty_splits)
    counts: dict[str, int] = field(default_factory=dict)     # row counts, each added by the step that knows it
    files: dict[str, Path] = field(default_factory=dict)     # file name -> path of every file written
    file_meta: dict[str, dict] = field(default_factory=dict)  # file name -> sha256, bytes, rows (the manifest's)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, recorded by the steps (stage)
    cached: list[RDD] = field(default_factory=list)          # RDDs to unpersist at the end (cache)
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # removers of staged input (stage_input)

    @classmethod
    def start(cls, spark: SparkSession, input_path: str, recipe: Recipe, out_dir: Path, *,
              source: dict) -> Preparation:
        """The state before the first step: the output folder made, the manifest's head."""
        started = time.perf_counter()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "source": source,
            "input": {"uri": input_path, "type": input_type(input_path), "digest": None,
                      "digest_method": "sum mod 2^256 of sha256(record number, record), over all records"},
            "recipe": {"name": recipe.name, "version": recipe.version, "hash": recipe.hash},
            "code_version": {"ftpipe": ftpipe_version(), **git_commit(), "pyspark": spark.version,
                             "python": ".".join(map(str, sys.version_info[:3]))},
        }
        return cls(spark=spark, recipe=recipe, out_dir=out_dir, source=source, uri=input_path, started=started,
                   manifest=manifest, path=input_path)

    @property
    def data(self) -> DataSpec:
        return self.recipe.data

    @property
    def fractions(self) -> tuple[float, float, float]:
        return tuple(float(f) for f in self.data.split)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.data.pii_categories)

    @property
    def rows(self) -> int:
        """Rows left after dedup and the quality filters (after mask_and_place_rows)."""
        return sum(self.prepared_summary["splits"])

    @contextmanager
    def stage(self, timing: str | None = None, job: str | None = None):
        """A step's work: its Spark jobs described as `job` (without one, they keep the description
        already set), its seconds added to `timings[timing]` when it completes (not when it raises)."""
        if job is not None:
            self.spark.sparkContext.setJobDescription(job)
        t0 = time.perf_counter()
        yield
        if timing is not None:
            self.timings[timing] = round(self.timings.get(timing, 0.0) + time.perf_counter() - t0, 3)

    def cache(self, rdd: RDD) -> RDD:
        """`rdd` persisted (memory, then disk) until the end of the run (release)."""
        self.cached.append(rdd.persist(StorageLevel.MEMORY_AND_DISK))
        return rdd

    def write_lines(self, name: str, lines: Iterable[str]) -> None:
        self.file_meta[name] = _write_lines(self.out_dir / name, lines)
        self.files[name] = self.out_dir / name

    def write_json(self, name: str, obj: Any) -> None:
        self.file_meta[name] = _write_json(self.out_dir / name, obj)
        self.files[name] = self.out_dir / name

    def release(self) -> None:
        """After the last step, whatever happened: cached RDDs unpersisted, staged input removed."""
        self.spark.sparkContext.setJobDescription(None)
        for rdd in self.cached:
            rdd.unpersist()
        for remove in self.cleanup:
            remove()


# ------------------------------------------------------------------------------ the steps
#
# Each step takes the state, reads what earlier steps added, adds its own part, records its own
# counts and timing, and raises _Rejected with one reason when the dataset cannot be used.


def pii_canary(p: Preparation) -> None:
    """Rejects the dataset unless the configured PII backend masks a document seeded with every
    enabled category, before any data is touched (categories only in the reason, never values)."""
    try:
        missed = pii.canary_missed(p.categories, p.data.pii_backend)
    except pii.PiiBackendUnavailable as exc:
        raise _Rejected(str(exc)) from None
    if missed:
        raise _Rejected(f"PII canary not fully detected: missed {missed} (pii_backend {p.data.pii_backend!r})")


def check_input(p: Preparation) -> None:
    """Rejects an input of an unsupported type, or a local one that is missing, unreadable, empty,
    too large or binary. Adds `kind`, `local` and `path` (a local input's resolved path)."""
    kind = input_type(p.uri)
    if kind is None:
        raise _Rejected(f"unsupported input type for {p.uri.rsplit('/', 1)[-1]!r}; "
                        f"expected one of {', '.join(sorted(INPUT_TYPES))} (optionally .gz/.bz2)")
    local = _local_path(p.uri)
    if local is not None:
        if not local.exists():
            raise _Rejected(f"input not found: {p.uri}")
        if not os.access(local, os.R_OK) or not (local.is_file() or kind == "parquet" and local.is_dir()):
            raise _Rejected(f"input unreadable: {p.uri} is not a readable file")
        if local.is_file() and local.stat().st_size == 0:
            raise _Rejected("input is empty (0 bytes)")
        if local.is_file():
            _check_whole_file(local, kind, p.data.max_file_bytes)
        p.path = str(local.resolve())
    p.kind, p.local = kind, local


def record_provenance(p: Preparation) -> None:
    """Adds the source's provenance to the manifest (`provenance.describe_source`); rejects a drop
    without the legal basis the recipe requires. Reads `local`."""
    p.manifest.update(provenance.describe_source(p.source, p.local, p.recipe))
    if problem := provenance.legal_basis_problem(p.recipe, p.source):
        raise _Rejected(problem)


def stage_input(p: Preparation) -> None:
    """The input as Spark may read it: a JSON array streamed into JSONL (element N as line N; a .json
    file that is no array is read as JSONL), a local JSONL input's over-long lines replaced by a
    marker (_cap_long_lines). Reads and updates `kind` and `path`; adds the removers to `cleanup`."""
    if p.kind == "json":
        p.kind = "jsonl"
        try:
            is_array = _is_json_array(p.path, p.local)
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable object
            raise _Rejected(f"input unreadable: {_describe_exception(exc)}") from None
        if is_array:
            p.path = _stage_json_array(p.path, p.local, p.cleanup)
            p.manifest["input"]["type"] = "json_array"
            p.manifest["input"]["record_numbering"] = "array element, from 1 (the 'line' of rejected.jsonl)"
    if p.kind == "jsonl" and p.local is not None:
        p.path = _cap_long_lines(p.path, p.data.max_row_bytes, p.cleanup)


def read_validate(p: Preparation) -> None:
    """Reads `path` as `kind` and validates every record against the recipe (`formats`); an input
    Spark cannot read is rejected. Adds `validated` (cached), `summary`, the input digest, the
    raw / blank_lines / valid / rejected counts and the rejections by code."""
    data = p.data
    rules = formats.RowRules(format=data.format, kind=p.recipe.data_kind, system_prompt=data.system_prompt,
                             max_row_bytes=data.max_row_bytes, columns=tuple(sorted(data.columns.items())),
                             split_column=data.split_column, labels=data.labels)
    p.manifest["kind"] = p.recipe.data_kind
    with p.stage("read_validate_s", job="preprocess: read + validate"):
        try:
            p.validated = p.cache(_validated_rdd(p.spark, p.path, p.kind, rules))
            summary = partitions.merge_validation(
                p.validated.mapPartitions(partitions.summarise_validation).collect())
        except _Rejected:
            raise
        except Exception as exc:  # noqa: BLE001 - Spark/Py4J errors for unreadable input
            log.warning("preprocess: cannot read input (%s)", type(exc).__name__)
            raise _Rejected(f"input unreadable as {p.kind.upper()}: {_describe_exception(exc)}") from None
    p.summary = summary
    p.manifest["input"]["digest"] = f"{summary['digest']:064x}"
    ok, bad = summary["counts"]["ok"], summary["counts"]["bad"]
    p.counts.update(raw=ok + bad, blank_lines=summary["counts"]["blank"], valid=ok, rejected=bad)
    p.manifest["rejected_by_code"] = dict(sorted(summary["codes"].items()))


def write_rejected(p: Preparation) -> None:
    """Writes rejected.jsonl: the rejected records of `validated`, in input order."""
    with p.stage("write_rejected_s", job="preprocess: write rejected.jsonl"):
        p.write_lines("rejected.jsonl",
                      p.validated.filter(lambda r: r[0] == "bad").map(partitions.rejected_line).toLocalIterator())


def judge_validation(p: Preparation) -> None:
    """Rejects the dataset when validation says it cannot be used: no rows, not JSON at all, one
    problem on every row, rows for another kind of training, or more rejected rows than
    data.max_rejected_fraction. Reads `summary` and the counts."""
    summary, raw, ok, bad = p.summary, p.counts["raw"], p.counts["valid"], p.counts["rejected"]
    if raw == 0:
        raise _Rejected("input is empty (no rows)")
    if ok == 0 and set(summary["codes"]) <= {"bad_json", "bad_encoding", "not_object"} and p.kind == "jsonl":
        array = "a JSON array or " if p.manifest["input"]["type"] == "json" else ""
        raise _Rejected(f"input is not {array}JSONL: none of its {raw} lines is a JSON object "
                        f"(line {summary['first_bad'][0]}: {summary['first_bad'][1]})")
    if ok == 0 and len(summary["codes"]) == 1:  # one problem everywhere, e.g. the wrong data.format
        raise _Rejected(f"all {raw} rows rejected, e.g. line {summary['first_bad'][0]}: {summary['first_bad'][1]}")
    if ok == 0 and summary["codes"].get("wrong_kind", 0) * 2 > bad:  # data for another kind of training
        line_no, why = summary["first"]["wrong_kind"]
        raise _Rejected(f"{summary['codes']['wrong_kind']} of {raw} rows do not fit the recipe, e.g. "
                        f"line {line_no}: {why}")
    limit = p.data.max_rejected_fraction
    if bad / raw > limit:
        top = ", ".join(f"{code} {n}" for code, n in
                        sorted(summary["codes"].items(), key=lambda kv: (-kv[1], kv[0]))[:3])
        raise _Rejected(f"{bad} of {raw} rows rejected ({bad / raw:.0%}), above "
                        f"data.max_rejected_fraction={limit:g} ({top}; see rejected.jsonl)")


def exact_dedup(p: Preparation) -> None:
    """Adds `deduped`: the valid records of `validated`, one per content hash (natural casing, then
    the lowest line wins: partitions.keep_representative). Lazy: the shuffle runs in the next
    step's first job."""
    p.deduped = (p.validated.filter(lambda r: r[0] == "ok").map(partitions.dedup_key)
                 .reduceByKey(partitions.keep_representative))


def near_dedup(p: Preparation) -> None:
    """With recipe.dedup.near: takes near duplicates out of `deduped` (MinHash LSH + connected
    components, `neardup`). Adds `near_removed` and the manifest's near_dedup section."""
    if not p.recipe.dedup.near:
        return
    with p.stage("near_dedup_s", job="preprocess: near dedup"):
        p.deduped, near = neardup.near_dedup(p.spark, p.deduped, neardup.Params.from_spec(p.recipe.dedup))
        p.near_removed = near.removed
        p.manifest["near_dedup"] = {**p.recipe.dedup.model_dump(mode="json"), **near.report()}


def _filtered_line(tagged: tuple) -> tuple[int, str]:
    """A row removed by the quality filters as (line, its filtered.jsonl line): the rules it
    tripped and a PII-masked excerpt, never the raw row."""
    (_, (line_no, messages)), tripped = tagged
    excerpt = mask_excerpt(neardup.conversation_text(messages), 200)
    return line_no, json.dumps({"line": line_no, "rules": list(tripped), "excerpt": excerpt}, ensure_ascii=False)


def quality_filter(p: Preparation) -> None:
    """With recipe.quality.enabled: takes the rows that trip a quality rule out of `deduped`
    (`quality`). Writes filtered.jsonl (line, rules, masked excerpt) and quality_report.json; adds
    `quality_removed` and the manifest's quality section."""
    spec = p.recipe.quality
    if not spec.enabled:
        return
    with p.stage("quality_s", job="preprocess: quality filters"):
        tagged = p.cache(p.deduped.mapPartitions(partial(quality.tag_partition, rules=quality.Rules.from_spec(spec))))
        qsum = quality.merge(tagged.mapPartitions(quality.summarise).collect())
        p.quality_removed = qsum["removed"]
        p.write_lines("filtered.jsonl", (line for _, line in tagged.filter(lambda t: bool(t[1])).map(_filtered_line)
                                         .sortByKey().toLocalIterator()))
        report = {"rules_enabled": list(spec.rules),
                  "thresholds": spec.model_dump(mode="json"),
                  "rows_checked": qsum["checked"],
                  "rows_removed": qsum["removed"],
                  "counts": {r: qsum["rules"].get(r, 0) for r in spec.rules},
                  "note": "a row can trip several rules: each is counted, the row is removed once"}
        p.write_json("quality_report.json", report)
        p.manifest["quality"] = {"rows_removed": qsum["removed"], "counts": report["counts"]}
        p.deduped = tagged.filter(lambda t: not t[1]).map(lambda t: t[0])


def stratified_cuts(p: Preparation) -> None:
    """For a classification recipe with data.stratify: adds `cuts`, each label's cut points over
    the rows of `deduped` the split may place (split.stratified_cuts). Timed with dedup_mask_s."""
    if not (p.recipe.data_kind == "classification" and p.data.stratify):
        return
    with p.stage("dedup_mask_s", job="preprocess: stratified split cuts"):
        p.cuts = split.stratified_cuts(p.deduped.map(partitions.strata_key).filter(lambda k: k is not None),
                                       p.fractions)


def mask_and_place_rows(p: Preparation) -> None:
    """Masks the PII of `deduped` and places each row in a split (partitions.mask_and_place: the
    user's split column, else `cuts`, else the hash bucket). Adds `prepared` (cached),
    `prepared_summary` and the dedup, quality and PII counts; rejects when fewer than
    data.min_rows rows remain."""
    with p.stage("dedup_mask_s", job="preprocess: dedup + PII + split"):
        p.prepared = p.cache(p.deduped.mapPartitions(
            partial(partitions.mask_and_place, categories=p.categories, fractions=p.fractions,
                    backend=p.data.pii_backend, cuts=p.cuts)))
        p.prepared_summary = partitions.merge_prepared(
            p.prepared.mapPartitions(partitions.summarise_prepared).collect())
        n, removed = p.rows, p.quality_removed
        # deduplicated: rows after exact and near dedup (the quality filters come after it)
        p.counts.update(deduplicated=n + removed, duplicates_removed=p.counts["valid"] - n - removed - p.near_removed,
                        near_duplicates_removed=p.near_removed, quality_filtered=removed,
                        pii_masked_rows=p.prepared_summary["masked_rows"])
    if n < p.data.min_rows:
        raise _Rejected(f"only {n} valid rows after dedup, fewer than data.min_rows={p.data.min_rows}")


def residual_pii_scan(p: Preparation) -> None:
    """An independent loose scanner over the masked rows of `prepared` (`shared.domain.pii_residual`);
    above the recipe's threshold the dataset is rejected before any split is written. Adds
    `residual` and the manifest's pii section."""
    data = p.data
    with p.stage("pii_residual_s", job="preprocess: PII residual scan"):
        residual = p.residual = pii_residual.merge(p.prepared.mapPartitions(pii_residual.summarise).collect())
        p.manifest["pii"] = {"backend": data.pii_backend,
                             "counts": {c: p.prepared_summary["pii"].get(c, 0) for c in p.categories},
                             "rows_masked": p.prepared_summary["masked_rows"], "residual_rate": residual["rate"],
                             "residual_threshold": data.pii_residual_threshold}
    if residual["rate"] > data.pii_residual_threshold:
        raise _Rejected(f"PII residual rate {residual['rate']:.2%} above threshold "
                        f"{data.pii_residual_threshold:.2%} ({residual['documents_with_hits']} of "
                        f"{residual['documents']} documents flagged by the residual scan: "
                        f"{', '.join(f'{k} {v}' for k, v in residual['hits'].items())})")


def fill_empty_splits(p: Preparation) -> None:
    """A split the fractions leave empty borrows, from the largest split, the row whose id is
    nearest to it (split.distance), never a row the user placed. Adds `moved`, the train / val /
    test counts and the manifest's split section. Timed with write_splits_s."""
    fractions = p.fractions
    with p.stage("write_splits_s", job="preprocess: fill empty splits"):
        split_counts = list(p.prepared_summary["splits"])
        moved: dict[str, int] = {}
        for target in split.empty_splits(split_counts, fractions):
            donor = max(range(3), key=lambda i: (split_counts[i], -i))
            if split_counts[donor] < 2:
                continue
            taken = set(moved)
            best = (p.prepared.filter(lambda r, d=donor, t=taken: r[0] == d and r[5] != "user" and r[1] not in t)
                    .map(lambda r: r[1])
                    .takeOrdered(1, key=lambda rid, t=target: (split.distance(rid, t, fractions), rid)))
            if best:
                moved[best[0]] = target
                split_counts[donor] -= 1
                split_counts[target] += 1
        p.moved = moved
        p.counts.update(zip(split.SPLITS, split_counts, strict=True))
        p.manifest["split"] = {
            "fractions": list(fractions),
            "method": ("stratified by label: per label, rows ordered by the sha256 bucket of their id and cut "
                       "at the fractions" if p.cuts is not None else "sha256 bucket of the row id"),
            "split_column": p.data.split_column,
            "rows_placed_by": dict(sorted(p.prepared_summary["placed_by"].items())),  # user | stratified | hash
            "rows_moved_to_fill_empty_splits": len(moved)}


def _placed(p: Preparation) -> RDD:
    """(id, (split, json line)) of every prepared row, after `moved`."""
    return p.prepared.map(lambda r, m=p.moved: (r[1], (m.get(r[1], r[0]), r[3])))


def write_splits(p: Preparation) -> None:
    """Writes train/val/test.jsonl from `prepared` and `moved`, each sorted by id, streaming one
    partition at a time."""
    with p.stage("write_splits_s", job="preprocess: write splits"):
        outs = [_OutFile(p.out_dir / name) for name in SPLIT_FILES]
        try:
            for _, (split_index, line) in _placed(p).sortByKey().toLocalIterator():
                outs[split_index].write_line(line)
        except BaseException:
            for out in outs:
                out.discard()
            raise
        for name, out in zip(SPLIT_FILES, outs, strict=True):
            p.file_meta[name] = out.close()
            p.files[name] = out.path


def write_pii_report(p: Preparation) -> None:
    """Writes pii_report.json (counts by category, the residual scan, never values) from
    `prepared_summary` and `residual`; adds the residual section to the manifest's pii."""
    data, psum, residual = p.data, p.prepared_summary, p.residual
    pii_report = {
        "categories_enabled": list(p.categories),
        "counts": {c: psum["pii"].get(c, 0) for c in p.categories},
        "rows_scanned": p.rows,
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
    p.write_json("pii_report.json", pii_report)
    p.manifest["pii"]["residual"] = pii_report["residual"]


def count_tokens(p: Preparation) -> None:
    """Token counts with the base model's tokenizer and the cost estimate (`cost`), added to the
    manifest: on the workers in parallel for large datasets; on the driver for small ones, where
    starting transformers in every worker costs more. Never rejects (an error is recorded)."""
    recipe, data = p.recipe, p.data
    max_seq_len = recipe.training.max_seq_len
    with p.stage("tokens_s", job="preprocess: token counts"):
        placed, n = _placed(p), p.rows

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
        p.manifest.update(tokens=tokens or {"error": token_error}, cost_estimate=cost_estimate)


Step = Callable[[Preparation], None]

#: the steps of `prepare`, in order
STEPS: tuple[Step, ...] = (
    pii_canary, check_input, record_provenance, stage_input,
    read_validate, write_rejected, judge_validation,
    exact_dedup, near_dedup, quality_filter,
    stratified_cuts, mask_and_place_rows, residual_pii_scan,
    fill_empty_splits, write_splits, write_pii_report, count_tokens,
)


# ------------------------------------------------------------------------------ the job


def _clear_for_rejection(p: Preparation) -> None:
    """A rejected dataset leaves no splits and no pii_report.json, not even an earlier run's; the
    audit files stay when this run wrote them (an earlier run's go), and rejected.jsonl is always
    there."""
    for name in (*SPLIT_FILES, "pii_report.json"):
        (p.out_dir / name).unlink(missing_ok=True)
    for name in ("filtered.jsonl", "quality_report.json"):
        if name not in p.files:
            (p.out_dir / name).unlink(missing_ok=True)
    if "rejected.jsonl" not in p.files:
        p.write_lines("rejected.jsonl", [])


def _finish(p: Preparation, rejection: _Rejected | None) -> PrepareResult:
    """Writes manifest.json (status, reason, counts, files, timings) and returns the result."""
    rejected, reason = rejection is not None, rejection.reason if rejection is not None else None
    manifest, timings = p.manifest, p.timings
    digest_hex = manifest["input"]["digest"] or hashlib.sha256(p.path.encode()).hexdigest()
    dataset_id = hashlib.sha256(f"{digest_hex}:{p.recipe.hash}".encode()).hexdigest()[:16]
    manifest.update(
        dataset_id=dataset_id,
        status="rejected" if rejected else "prepared",
        reason=reason,
        counts=p.counts,
        files=p.file_meta,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    timings["total_s"] = round(time.perf_counter() - p.started, 3)
    manifest["timings"] = dict(timings)
    _write_json(p.out_dir / "manifest.json", manifest)
    p.files["manifest.json"] = p.out_dir / "manifest.json"
    timings["total_s"] = round(time.perf_counter() - p.started, 3)
    if rejected:
        log.warning("preprocess: dataset %s rejected: %s", dataset_id, reason)
    log.info("preprocess: dataset %s counts=%s timings=%s", dataset_id, p.counts, timings)
    return PrepareResult(dataset_id=dataset_id, rejected=rejected, reason=reason, counts=p.counts,
                         out_dir=p.out_dir, files=p.files, timings=timings,
                         tokens=manifest.get("tokens") if not rejected else None,
                         cost_estimate=manifest.get("cost_estimate"))


def prepare(spark: SparkSession, input_path: str, recipe: Recipe, out_dir: Path, *, source: dict,
            steps: Sequence[Step] = STEPS) -> PrepareResult:
    """Prepare one raw dataset: `steps` in order over one `Preparation`; see the module docstring.
    Never raises for bad data: a dataset that cannot be used comes back with `rejected=True` and one
    reason (and rejected.jsonl and manifest.json are still written for audit)."""
    p = Preparation.start(spark, input_path, recipe, out_dir, source=source)
    rejection = None
    try:
        for step in steps:
            step(p)
    except _Rejected as rej:
        rejection = rej
        _clear_for_rejection(p)
    finally:
        p.release()
    return _finish(p, rejection)


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
