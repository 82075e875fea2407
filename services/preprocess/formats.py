"""Row validation and normalisation to the canonical chat format (pure Python, runs on workers).

Canonical row: {"id": <content hash prefix>, "messages": [{"role", "content"}, ...]} with roles
system/user/assistant, at most one system message (first), at least one user and one assistant
turn, and the last turn from the assistant.

Accepted shapes:
- chat:        {"messages": [{"role": ..., "content": ...}, ...]}
               {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]} (ShareGPT)
- instruction: {"instruction", "input"?, "response"|"output"} (Alpaca), {"prompt", "completion"}

Every problem raises `RowError(code, reason)`: `code` is a stable category (counted in the
manifest), `reason` a specific sentence for rejected.jsonl. Reasons name fields and positions,
never values. This module imports only the standard library, so Spark workers import it cheaply.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from services.preprocess.pii import mask_excerpt

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
EXCERPT_CHARS = 200

# Shapes a table (CSV / Parquet) header can declare, by (lower-cased) column names.
TABLE_SHAPES = ("chat", "alpaca", "prompt_completion")


class RowError(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class RowRules:
    """The part of the recipe the workers need (small and picklable)."""

    format: str = "auto"  # auto | chat | instruction
    system_prompt: str | None = None
    max_row_bytes: int = 64_000


# --------------------------------------------------------------------------------------------
# parsing


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def parse_json_line(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        if "\ufffd" in line:
            raise RowError("bad_encoding", "not valid UTF-8 text (binary data?)") from None
        raise RowError("bad_json", f"bad JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise RowError("bad_json", "bad JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RowError("not_object", f"not a JSON object (got {_json_type(obj)})")
    return obj


def table_shape(columns: Iterable[str]) -> tuple[str, dict[str, str]] | None:
    """The shape a CSV/Parquet header declares and a map canonical name -> actual column name."""
    cols = {c.strip().lower(): c for c in columns}
    if "messages" in cols:
        return "chat", {"messages": cols["messages"]}
    if "instruction" in cols and ("response" in cols or "output" in cols):
        resp = "response" if "response" in cols else "output"
        names = {"instruction": cols["instruction"], resp: cols[resp]}
        if "input" in cols:
            names["input"] = cols["input"]
        return "alpaca", names
    if "prompt" in cols and "completion" in cols:
        return "prompt_completion", {"prompt": cols["prompt"], "completion": cols["completion"]}
    return None


def table_row_to_object(row: dict, shape: str, names: dict[str, str]) -> dict:
    """A CSV/Parquet row (column -> value, None for empty cells) as the JSON object it stands for."""
    if shape == "chat":
        cell = row.get(names["messages"])
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            raise RowError("empty_content", "empty 'messages' cell")
        if isinstance(cell, str):
            try:
                cell = json.loads(cell)
            except json.JSONDecodeError as exc:
                raise RowError("bad_json", f"bad JSON in the 'messages' column: {exc.msg} at column {exc.colno}") from None
        return {"messages": cell}
    obj = {canon: row.get(actual) for canon, actual in names.items()}
    for key, value in obj.items():
        if value is None and key != "input":
            obj[key] = ""  # an empty cell is an empty field, reported as such
    return obj


# --------------------------------------------------------------------------------------------
# normalisation


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError("bad_field_type", f"{what} must be a string, got {_json_type(value)}")
    return unicodedata.normalize("NFC", value).strip()


def _chat_messages(raw: Any, *, sharegpt: bool) -> list[tuple[str, str]]:
    field = "conversations" if sharegpt else "messages"
    if not isinstance(raw, list) or not raw:
        got = "an empty array" if isinstance(raw, list) else _json_type(raw)
        raise RowError("bad_messages", f"'{field}' must be a non-empty array, got {got}")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out: list[tuple[str, str]] = []
    for i, msg in enumerate(raw, start=1):
        if not isinstance(msg, dict):
            raise RowError("bad_messages", f"message {i} is not an object (got {_json_type(msg)})")
        if role_key not in msg:
            raise RowError("bad_messages", f"message {i} has no '{role_key}'")
        if content_key not in msg:
            raise RowError("bad_messages", f"message {i} has no '{content_key}'")
        role = msg[role_key]
        if not isinstance(role, str):
            raise RowError("bad_role", f"message {i} '{role_key}' must be a string, got {_json_type(role)}")
        role = role.strip().lower()
        if sharegpt:
            role = SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            shown = role if len(role) <= 20 else role[:20] + "…"
            raise RowError("bad_role", f"message {i} has role {shown!r}; allowed: {', '.join(ROLES)}")
        content = _text(msg[content_key], f"message {i} '{content_key}'")
        if not content:
            raise RowError("empty_content", f"message {i} ({role}) has empty content")
        out.append((role, content))
    return out


def _instruction_messages(obj: dict) -> list[tuple[str, str]]:
    if "instruction" in obj:
        resp_key = "response" if "response" in obj else "output"
        instruction = _text(obj["instruction"], "'instruction'")
        extra = obj.get("input")
        extra = _text(extra, "'input'") if extra is not None else ""
        response = _text(obj[resp_key], f"'{resp_key}'")
        prompt_key, prompt = "instruction", (f"{instruction}\n\n{extra}" if extra else instruction)
    else:
        resp_key = "completion"
        prompt_key, prompt = "prompt", _text(obj["prompt"], "'prompt'")
        response = _text(obj["completion"], "'completion'")
    if not prompt:
        raise RowError("empty_content", f"'{prompt_key}' is empty")
    if not response:
        raise RowError("empty_content", f"'{resp_key}' is empty")
    return [("user", prompt), ("assistant", response)]


def row_kind(obj: dict) -> str:
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj:
        if "response" in obj or "output" in obj:
            return "instruction"
        raise RowError("missing_field", "instruction row without 'response' or 'output'")
    if "prompt" in obj:
        if "completion" in obj:
            return "instruction"
        raise RowError("missing_field", "prompt row without 'completion'")
    keys = sorted(str(k)[:30] for k in obj)[:6]
    raise RowError(
        "unknown_shape",
        f"unknown row shape (keys: {', '.join(keys) or 'none'}); expected 'messages', "
        "'instruction' + 'response'/'output', or 'prompt' + 'completion'",
    )


def normalise(obj: dict, rules: RowRules) -> list[tuple[str, str]]:
    """A parsed row as a validated list of (role, content)."""
    kind = row_kind(obj)
    if rules.format == "chat" and kind == "instruction":
        raise RowError("format_mismatch", "instruction-shaped row but data.format is 'chat'")
    if rules.format == "instruction" and kind != "instruction":
        raise RowError("format_mismatch", "chat-shaped row but data.format is 'instruction'")
    if kind == "instruction":
        messages = _instruction_messages(obj)
    else:
        messages = _chat_messages(obj["messages" if kind == "chat" else "conversations"], sharegpt=kind == "sharegpt")

    for i, (role, _) in enumerate(messages[1:], start=2):
        if role == "system":
            raise RowError("bad_order", f"message {i} is a system message; only the first message may be")
    roles = [role for role, _ in messages]
    if "assistant" not in roles:
        raise RowError("no_assistant", "no assistant turn")
    if roles[-1] != "assistant":
        raise RowError("last_not_assistant", f"last turn is from '{roles[-1]}', not the assistant")
    if "user" not in roles:
        raise RowError("no_user", "no user turn")
    return messages


def with_system_prompt(messages: list[tuple[str, str]], rules: RowRules) -> tuple[tuple[str, str], ...]:
    """The recipe's data.system_prompt first, where the row has no system message of its own.
    Applied after hashing, so row ids (and splits) do not change with the recipe's prompt."""
    if rules.system_prompt and messages[0][0] != "system":
        return (("system", unicodedata.normalize("NFC", rules.system_prompt).strip()), *messages)
    return tuple(messages)


def content_hash(messages: Iterable[tuple[str, str]]) -> str:
    """sha256 of the conversation with whitespace collapsed and case folded (the dedup key)."""
    h = hashlib.sha256()
    for role, content in messages:
        h.update(role.encode())
        h.update(b"\x1f")
        h.update(" ".join(content.split()).casefold().encode())
        h.update(b"\x1e")
    return h.hexdigest()


def record_digest(line_no: int, raw: str) -> int:
    """One record's share of the input digest (summed mod 2**256, so independent of partitioning)."""
    return int.from_bytes(hashlib.sha256(f"{line_no}\x1f{raw}".encode("utf-8", "surrogatepass")).digest(), "big")


# --------------------------------------------------------------------------------------------
# partition functions (Spark mapPartitions)
#
# Output records, one per input record:
#   ("ok",    line_no, digest, hash, messages)
#   ("bad",   line_no, digest, code, reason, excerpt)
#   ("blank", line_no, digest)


def _bad(line_no: int, digest: int, err: RowError, raw: str) -> tuple:
    return ("bad", line_no, digest, err.code, err.reason, mask_excerpt(raw, EXCERPT_CHARS))


def validate_jsonl(records: Iterable[tuple[str, int]], rules: RowRules) -> Iterator[tuple]:
    """(line, 0-based index) pairs from `textFile().zipWithIndex()` -> validation records."""
    for line, index in records:
        line_no = index + 1
        if line_no == 1 and line.startswith("\ufeff"):
            line = line[1:]
        digest = record_digest(line_no, line)
        if not line.strip():
            yield ("blank", line_no, digest)
            continue
        try:
            size = len(line.encode("utf-8", "surrogatepass"))
            if size > rules.max_row_bytes:
                raise RowError("too_large", f"row is {size} bytes, over data.max_row_bytes={rules.max_row_bytes}")
            messages = normalise(parse_json_line(line), rules)
        except RowError as err:
            yield _bad(line_no, digest, err, line)
            continue
        yield ("ok", line_no, digest, content_hash(messages), with_system_prompt(messages, rules))


def validate_table(records: Iterable[tuple[Any, int]], rules: RowRules, shape: str, names: dict[str, str],
                   corrupt_column: str | None = None) -> Iterator[tuple]:
    """(Row, 0-based index) pairs from a CSV/Parquet DataFrame -> validation records."""
    for row, index in records:
        line_no = index + 1
        values = row.asDict(recursive=True)
        corrupt = values.pop(corrupt_column, None) if corrupt_column else None
        raw = json.dumps(values, ensure_ascii=False, default=str, sort_keys=True)
        digest = record_digest(line_no, raw)
        try:
            if corrupt is not None:
                raise RowError("bad_csv", "malformed CSV record")
            size = len(raw.encode("utf-8", "surrogatepass"))
            if size > rules.max_row_bytes:
                raise RowError("too_large", f"row is {size} bytes, over data.max_row_bytes={rules.max_row_bytes}")
            obj = table_row_to_object(values, shape, names)
            messages = normalise(obj, rules)
        except RowError as err:
            yield _bad(line_no, digest, err, corrupt if corrupt is not None else raw)
            continue
        yield ("ok", line_no, digest, content_hash(messages), with_system_prompt(messages, rules))
