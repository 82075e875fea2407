"""The base model's results, kept across evaluations.

Every evaluation scores the base model on the same shipped probe sets: its answers depend only on
the base model's files, the probes, the system prompt, the decoding settings, the evaluator's code
and the libraries that run it. So each suite's base result (metrics and per-probe details) is kept
in the bucket under `eval-cache/`, keyed by the sha256 of all of those, and the next evaluation of
any run on that base reads it instead of generating again: one side fewer from the second run on.
A suite whose inputs are the run's own data (the test split, the train rows that memorisation
probes) hits only when the same data is evaluated again (a re-evaluation).

Only the base side is cached: a candidate is new by definition, and a production version's answers
would need its adapter's digests in the key. Anything that could change an answer is in the key;
what is not (the gate's rules, its confidence) is left out, so changing a tolerance keeps the cache.
The cache is an input of the gate, so it lives where only the pipeline's own service accounts write
(infra/terraform/iam.tf: the data services' objectUser; a tenant's door reaches incoming/<tenant>/
only), and an entry that does not parse is ignored and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from shared.platform.ports import ObjectStore

_logger = logging.getLogger("ftpipe.evaluator")

PREFIX = "eval-cache/"
FORMAT = 1   # bump when the stored value's shape changes
_CODE_ROOTS = (Path(__file__).parent, Path(__file__).parents[2] / "shared" / "domain")
_LIBRARIES = ("torch", "transformers", "peft", "lm_eval", "accelerate")


class Entries(Protocol):
    def get(self, key: str) -> dict | None: ...
    def put(self, key: str, value: dict) -> None: ...


class StoreEntries:
    """Entries as JSON objects in a bucket (GCS in the cloud, the local store's folder on one machine)."""

    def __init__(self, store: ObjectStore, bucket: str):
        self.store, self.bucket = store, bucket

    def get(self, key: str) -> dict | None:
        try:
            value = json.loads(self.store.read(self.bucket, f"{PREFIX}{key}.json"))
        except KeyError:   # ObjectNotFound
            return None
        except ValueError:
            _logger.warning("eval cache entry %s does not parse: ignored, it will be rewritten", key)
            return None
        return value if isinstance(value, dict) and value.get("format") == FORMAT else None

    def put(self, key: str, value: dict) -> None:
        self.store.write(self.bucket, f"{PREFIX}{key}.json", json.dumps(value).encode(),
                         content_type="application/json")


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the evaluator's code and shipped data and the shared domain code it reads, plus the
    versions of the libraries that generate and score: a deploy that changes any of them starts a
    fresh cache rather than pairing a candidate with answers the old code gave."""
    digest = hashlib.sha256()
    for root in _CODE_ROOTS:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _LIBRARIES:
        try:
            digest.update(f"{name}=={metadata.version(name)}\n".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} absent\n".encode())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def fingerprint(value: Any) -> str:
    """sha256 of a JSON rendering of `value` (dataclasses by their fields)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_jsonable).encode()).hexdigest()


class BaseResults:
    """The base side's suite results for one evaluation: `key` names them, `get`/`put` read and keep them."""

    def __init__(self, entries: Entries, *, base_sha256: str, device: str, dtype: str, batch_size: int):
        self.entries = entries
        self._scope = {"format": FORMAT, "code": code_version(), "base": base_sha256, "device": device,
                       "dtype": dtype, "batch_size": batch_size}
        self.hits: list[str] = []

    def key(self, suite: str, inputs: Any) -> str:
        return fingerprint({**self._scope, "suite": suite, "inputs": fingerprint(inputs)})

    def get(self, suite: str, inputs: Any) -> dict | None:
        key = self.key(suite, inputs)
        value = self.entries.get(key)
        if value is None or value.get("suite") != suite:
            return None
        self.hits.append(suite)
        return value["result"]

    def put(self, suite: str, inputs: Any, result: dict) -> None:
        try:
            self.entries.put(self.key(suite, inputs), {"format": FORMAT, "suite": suite, "result": result})
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs time, never the verdict
            _logger.warning("eval cache: could not keep the base's %s result (%s: %s)", suite,
                            type(exc).__name__, str(exc)[:200])
