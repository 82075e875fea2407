"""The embedded document store: Firestore's data model (collections of JSON documents) on SQLite."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from shared.platform.documents import deep_merge

_OPS = {"==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _path(field: str) -> str:
    if not all(part.replace("_", "").replace("-", "").isalnum() for part in field.split(".")):
        raise ValueError(f"invalid field path {field!r}")
    return "$." + ".".join(f'"{p}"' for p in field.split("."))


class _SqliteTxn:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def get(self, collection: str, doc_id: str) -> dict | None:
        row = self.conn.execute("SELECT data FROM docs WHERE collection=? AND id=?", (collection, doc_id)).fetchone()
        return json.loads(row[0]) if row else None

    def set(self, collection: str, doc_id: str, data: dict) -> None:
        self.conn.execute("INSERT INTO docs(collection, id, data) VALUES (?,?,?) "
                          "ON CONFLICT(collection, id) DO UPDATE SET data=excluded.data",
                          (collection, doc_id, json.dumps(data)))

    def merge(self, collection: str, doc_id: str, data: dict) -> None:
        self.set(collection, doc_id, deep_merge(self.get(collection, doc_id) or {}, data))

    def delete(self, collection: str, doc_id: str) -> None:
        self.conn.execute("DELETE FROM docs WHERE collection=? AND id=?", (collection, doc_id))


class SqliteDocStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(
            "CREATE TABLE IF NOT EXISTS docs (collection TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL, "
            "PRIMARY KEY (collection, id));")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def transaction(self, fn: Callable[[_SqliteTxn], Any]) -> Any:
        conn = self._conn()
        for attempt in range(20):
            try:
                conn.execute("BEGIN IMMEDIATE")  # serialises writers: reads inside see a stable view
            except sqlite3.OperationalError:
                time.sleep(0.05 * (attempt + 1))
                continue
            try:
                result = fn(_SqliteTxn(conn))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result
        raise TimeoutError(f"document store {self.path} stayed locked; another process holds it")

    def get(self, collection: str, doc_id: str) -> dict | None:
        return _SqliteTxn(self._conn()).get(collection, doc_id)

    def set(self, collection: str, doc_id: str, data: dict) -> None:
        self.transaction(lambda t: t.set(collection, doc_id, data))

    def merge(self, collection: str, doc_id: str, data: dict) -> None:
        self.transaction(lambda t: t.merge(collection, doc_id, data))

    def create(self, collection: str, doc_id: str, data: dict) -> bool:
        def _create(t):
            if t.get(collection, doc_id) is not None:
                return False
            t.set(collection, doc_id, data)
            return True
        return self.transaction(_create)

    def delete(self, collection: str, doc_id: str) -> None:
        self.transaction(lambda t: t.delete(collection, doc_id))

    def query(self, collection: str, where: Sequence[tuple[str, str, Any]] = (),
              order_by: Sequence[tuple[str, str]] = (), limit: int | None = None) -> list[tuple[str, dict]]:
        sql: list[str] = ["SELECT id, data FROM docs WHERE collection=?"]
        params: list[Any] = [collection]
        for field, op, value in where:
            if op == "in":
                values = list(value)
                sql.append(f"AND json_extract(data, ?) IN ({','.join('?' * len(values))})")
                params += [_path(field), *[_sql_value(v) for v in values]]
            elif op in _OPS:
                sql.append(f"AND json_extract(data, ?) {_OPS[op]} ?")
                params += [_path(field), _sql_value(value)]
            else:
                raise ValueError(f"unsupported query operator {op!r}; use one of {', '.join([*_OPS, 'in'])}")
        # Firestore leaves out documents that lack an ordered field; so do we.
        for field, _ in order_by:
            sql.append("AND json_type(data, ?) IS NOT NULL")
            params.append(_path(field))
        if order_by:
            parts = []
            for field, direction in order_by:
                if direction not in ("asc", "desc"):
                    raise ValueError(f"order direction must be 'asc' or 'desc', got {direction!r}")
                parts.append(f"json_extract(data, ?) {direction.upper()}")
                params.append(_path(field))
            sql.append("ORDER BY " + ", ".join(parts) + ", id")
        else:
            sql.append("ORDER BY id")
        if limit is not None:
            sql.append("LIMIT ?")
            params.append(int(limit))
        rows = self._conn().execute(" ".join(sql), params).fetchall()
        return [(doc_id, json.loads(data)) for doc_id, data in rows]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _sql_value(value: Any) -> Any:
    # json_extract yields 1/0 for JSON booleans and text for strings; bind Python values to match.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value
