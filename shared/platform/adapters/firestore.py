"""The DocStore port on Firestore (native mode, google-cloud-firestore), also used against the
Firestore emulator.

The client follows the environment: with FIRESTORE_EMULATOR_HOST set it talks to the emulator over
an insecure channel; `emulator_host=` does the same explicitly without touching os.environ.

Semantics, and where Firestore differs from the SQLite store:
- merge() is set(merge=True): maps are merged recursively, every other value replaced. One edge
  differs: merging an empty map ({"a": {}}) replaces `a` with {} on Firestore, while the SQLite
  store leaves an existing map `a` as it is.
- transaction(fn) runs fn under Firestore's @transactional (retried on contention, Aborted). The
  wrapper handed to fn buffers its writes and applies them when fn returns, so fn may read after
  writing (Firestore itself refuses reads after writes in a transaction) and sees its own writes.
  Firestore locks documents pessimistically; two transactions of the same process contending for
  a document cost seconds each (the emulator waits ~2 s before aborting one), so transactions of
  one process on one database are serialised here; contention across processes is left to
  Firestore and the retries.
- Document ids may be any non-empty string: '/' and '%' are escaped (and '.', '..', '__x__' ids
  that Firestore reserves), transparently both ways.
- query(): == != < <= > >= in, through FieldFilter; documents lacking an ordered field are left
  out (as Firestore does); ties are broken by document id. Without order_by results come in
  document-id order, except with an inequality filter *and* a limit: Firestore then orders by
  the inequality field first (and cannot be told otherwise), so which documents the limit keeps
  differs from the SQLite store — give an order_by with a limit. Production Firestore needs composite
  indexes for some filter/order combinations (the emulator does not check; Terraform declares them).
"""
from __future__ import annotations

import copy
import re
import threading
from typing import Any, Callable, Sequence
from urllib.parse import unquote

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath

from shared.platform.documents import deep_merge

_OPS = ("==", "!=", "<", "<=", ">", ">=", "in")
_RESERVED_ID = re.compile(r"__.*__")


def encode_id(doc_id: str) -> str:
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError("document id must be a non-empty string")
    enc = doc_id.replace("%", "%25").replace("/", "%2F")
    if enc in (".", "..") or _RESERVED_ID.fullmatch(enc):
        enc = "%{:02X}".format(ord(enc[0])) + enc[1:]
    return enc


def decode_id(enc: str) -> str:
    return unquote(enc)


def _field(path: str) -> str:
    """A dotted field path ("metrics.loss") as Firestore's field-path syntax, quoting parts that
    are not simple identifiers ("scores.lm-eval" -> "scores.`lm-eval`")."""
    if not path or any(not part for part in path.split(".")):
        raise ValueError(f"invalid field path {path!r}")
    return FieldPath(*path.split(".")).to_api_repr()


class _Txn:
    """The port's Transaction: reads go to Firestore inside the transaction, writes are buffered
    and applied at the end (see the module docstring)."""

    def __init__(self, store: "FirestoreDocStore", txn):
        self._store, self._txn = store, txn
        self._ops: dict[tuple[str, str], list[tuple[str, dict | None]]] = {}

    def _read(self, collection: str, doc_id: str) -> dict | None:
        snap = self._store._ref(collection, doc_id).get(transaction=self._txn)
        return snap.to_dict() if snap.exists else None

    def get(self, collection: str, doc_id: str) -> dict | None:
        ops = self._ops.get((collection, doc_id))
        if not ops:
            return self._read(collection, doc_id)
        state, _ = self._fold(ops, base=lambda: self._read(collection, doc_id))
        return copy.deepcopy(state)

    def set(self, collection: str, doc_id: str, data: dict) -> None:
        self._store._ref(collection, doc_id)  # validate now
        self._ops.setdefault((collection, doc_id), []).append(("set", copy.deepcopy(dict(data))))

    def merge(self, collection: str, doc_id: str, data: dict) -> None:
        self._store._ref(collection, doc_id)
        self._ops.setdefault((collection, doc_id), []).append(("merge", copy.deepcopy(dict(data))))

    def delete(self, collection: str, doc_id: str) -> None:
        self._store._ref(collection, doc_id)
        self._ops.setdefault((collection, doc_id), []).append(("delete", None))

    @staticmethod
    def _fold(ops, base: Callable[[], dict | None] | None) -> tuple[dict | None, str]:
        """Collapse a document's buffered writes into its final state and the one write that
        produces it: ("set"|"delete", state) or, for merges only, ("merge", combined update)."""
        last_full = max((i for i, (kind, _) in enumerate(ops) if kind in ("set", "delete")), default=None)
        if last_full is None:
            combined: dict = {}
            for _, data in ops:
                combined = deep_merge(combined, data)
            if base is None:
                return combined, "merge"
            return deep_merge(base() or {}, combined), "merge"
        kind, data = ops[last_full]
        state = data if kind == "set" else None
        for _, later in ops[last_full + 1:]:
            state = deep_merge(state or {}, later)
        return state, ("delete" if state is None else "set")

    def _apply(self) -> None:
        for (collection, doc_id), ops in self._ops.items():
            ref = self._store._ref(collection, doc_id)
            state, kind = self._fold(ops, base=None)
            if kind == "delete":
                self._txn.delete(ref)
            elif kind == "merge":
                self._txn.set(ref, state, merge=True)
            else:
                self._txn.set(ref, state)


class FirestoreDocStore:
    _locks: dict[tuple[str, str], threading.RLock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, project: str | None = None, database: str = "(default)", *,
                 emulator_host: str | None = None, client: firestore.Client | None = None,
                 max_attempts: int = 20):
        if client is None:
            if emulator_host:
                from google.auth.credentials import AnonymousCredentials

                client = firestore.Client(project=project or "ftpipe-local", database=database,
                                          credentials=AnonymousCredentials())
                # google-cloud-firestore reads FIRESTORE_EMULATOR_HOST once, in its constructor,
                # and builds its insecure channel lazily from this attribute.
                client._emulator_host = emulator_host
            else:
                client = firestore.Client(project=project, database=database)
        self.client = client
        self.project = client.project
        self.database = database
        self.max_attempts = max_attempts
        with self._locks_guard:
            self._txn_lock = self._locks.setdefault((self.project, database), threading.RLock())

    def _ref(self, collection: str, doc_id: str):
        if not collection or "/" in collection:
            raise ValueError(f"invalid collection name {collection!r}")
        return self.client.collection(collection).document(encode_id(doc_id))

    # ------------------------------------------------------------ single documents
    def get(self, collection: str, doc_id: str) -> dict | None:
        snap = self._ref(collection, doc_id).get()
        return snap.to_dict() if snap.exists else None

    def set(self, collection: str, doc_id: str, data: dict) -> None:
        self._ref(collection, doc_id).set(dict(data))

    def merge(self, collection: str, doc_id: str, data: dict) -> None:
        self._ref(collection, doc_id).set(dict(data), merge=True)

    def create(self, collection: str, doc_id: str, data: dict) -> bool:
        try:
            self._ref(collection, doc_id).create(dict(data))
        except gexc.AlreadyExists:
            return False
        return True

    def delete(self, collection: str, doc_id: str) -> None:
        self._ref(collection, doc_id).delete()

    # ------------------------------------------------------------ transactions
    def transaction(self, fn: Callable[[_Txn], Any]) -> Any:
        @firestore.transactional
        def _run(txn):
            wrapper = _Txn(self, txn)
            result = fn(wrapper)
            wrapper._apply()
            return result

        with self._txn_lock:
            try:
                return _run(self.client.transaction(max_attempts=self.max_attempts))
            except ValueError as exc:
                if isinstance(exc.__cause__, gexc.Aborted):
                    raise TimeoutError(f"transaction kept conflicting after {self.max_attempts} attempts") from exc
                raise

    # ------------------------------------------------------------ queries
    def query(self, collection: str, where: Sequence[tuple[str, str, Any]] = (),
              order_by: Sequence[tuple[str, str]] = (), limit: int | None = None) -> list[tuple[str, dict]]:
        q = self.client.collection(collection)
        for field, op, value in where:
            if op not in _OPS:
                raise ValueError(f"unsupported query operator {op!r}; use one of {', '.join(_OPS)}")
            if op == "in":
                value = list(value)
                if not value:
                    return []
            q = q.where(filter=FieldFilter(_field(field), op, value))
        for field, direction in order_by:
            if direction not in ("asc", "desc"):
                raise ValueError(f"order direction must be 'asc' or 'desc', got {direction!r}")
            q = q.order_by(_field(field), direction=firestore.Query.DESCENDING if direction == "desc"
                           else firestore.Query.ASCENDING)
        if limit is not None:
            if int(limit) <= 0:
                return []
            q = q.limit(int(limit))
        rows = [(decode_id(snap.id), snap.to_dict() or {}) for snap in q.stream()]
        if not order_by and limit is None:
            # Firestore orders an inequality query by the inequality field(s) first and refuses an
            # explicit document-id-only order then; the port's order without order_by is by id.
            rows.sort(key=lambda row: row[0])
        return rows

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
