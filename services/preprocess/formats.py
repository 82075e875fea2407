"""Row validation and normalisation to ftpipe's canonical records (pure Python, runs on workers).

Three kinds of dataset, each with its canonical output line (what the trainer reads):
- chat (SFT):       {"id", "messages": [{"role", "content"}, ...]} — roles system/user/assistant, at
                    most one system message (first), a user and an assistant turn, the assistant last
- preference (DPO / ORPO, TRL's conversational format):
                    {"id", "prompt": [messages ending with a user turn],
                     "chosen": [{"role": "assistant", "content"}], "rejected": [{"role": "assistant", ...}]}
- classification:   {"id", "text", "label"}

Accepted input shapes (`data.format: auto` detects them per row; naming one accepts only it):
- chat:              {"messages": [{"role", "content"}, ...]} (OpenAI style)
- sharegpt:          {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
- instruction:       {"instruction", "input"?, "output"} (Alpaca) or {"instruction", "response"}
- prompt_completion: {"prompt", "completion"}
- preference:        {"prompt", "chosen", "rejected"}, each a string or a message list; or, with no
                     prompt, "chosen" and "rejected" as whole conversations sharing their prompt turns
- classification:    {"text", "label"} (label a string or an integer)
`data.columns` renames input fields to these names first (e.g. {"text": "review", "label": "stars"});
the field named by `data.split_column` (default "split"), where present, fixes the row's split.

Inside the job a row travels as a tuple of (role, content) segments: the chat turns, then for
preference rows ("chosen", text) and ("rejected", text), for classification rows ("text", text) and
("label", label); a user-given split is a trailing ("split", name). Roles in META_ROLES are metadata,
not text: they are never masked, hashed or scanned.

Every problem raises `RowError(code, reason)`: `code` is a stable category (counted in the
manifest), `reason` a specific sentence for rejected.jsonl. Reasons name fields and positions,
never values. This module imports only the standard library (and pii), so workers import it cheaply.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from services.preprocess.pii import mask_excerpt

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
SHAPES = ("chat", "sharegpt", "instruction", "prompt_completion", "preference", "classification")
KIND_OF_SHAPE = {"chat": "chat", "sharegpt": "chat", "instruction": "chat", "prompt_completion": "chat",
                 "preference": "preference", "classification": "classification"}
SHAPE_FIELDS = {"chat": "'messages'", "sharegpt": "'conversations'",
                "instruction": "'instruction' + 'output'/'response'", "prompt_completion": "'prompt' + 'completion'",
                "preference": "'prompt' + 'chosen' + 'rejected'", "classification": "'text' + 'label'"}
KIND_DESCRIPTION = {"chat": "chat rows (SFT)", "preference": "preference pairs (DPO / ORPO)",
                    "classification": "text + label rows (classification)"}
META_ROLES = frozenset({"label", "split"})
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test", "eval": "test"}
EXCERPT_CHARS = 200
Segments = tuple[tuple[str, Any], ...]


class RowError(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class RowRules:
    """The part of the recipe the workers need (small and picklable)."""

    format: str = "auto"            # auto | one of SHAPES
    kind: str = "chat"              # the kind the recipe trains on: chat | preference | classification
    system_prompt: str | None = None
    max_row_bytes: int = 64_000
    columns: tuple[tuple[str, str], ...] = ()   # (canonical field, the input's field)
    split_column: str | None = "split"
    labels: tuple[Any, ...] | None = None       # allowed labels (classification), None: any

    def field(self, canonical: str) -> str:
        """How the input names a canonical field (for messages)."""
        return dict(self.columns).get(canonical, canonical)


# --------------------------------------------------------------------------------------------
# parsing


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def parse_json_line(line: str) -> dict:
    # Spark decodes bytes that are not UTF-8 as U+FFFD: such a line's text is already corrupt
    # (typically Latin-1 / Windows-1252 text), whether or not it still parses as JSON.
    if "\ufffd" in line:
        raise RowError("bad_encoding", "not valid UTF-8 text (Latin-1 / Windows-1252, or binary data?); "
                                       "re-encode the file as UTF-8")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RowError("bad_json", f"bad JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise RowError("bad_json", "bad JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RowError("not_object", f"not a JSON object (got {_json_type(obj)})")
    return obj


def renamed(obj: dict, rules: RowRules) -> dict:
    """The row with `data.columns` renames applied (input field -> canonical field)."""
    if not rules.columns:
        return obj
    to_canonical = {actual: canonical for canonical, actual in rules.columns}
    return {to_canonical.get(k, k): v for k, v in obj.items()}


def detect_shape(keys: Iterable[str]) -> str | None:
    """The shape a row's (canonical) field names declare; None when they declare none."""
    keys = set(keys)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "instruction" in keys:
        return "instruction"
    if "prompt" in keys:
        return "prompt_completion"
    if "text" in keys or "label" in keys:
        return "classification"
    return None


def _expected_shapes(rules: RowRules) -> str:
    if rules.format != "auto":
        return SHAPE_FIELDS[rules.format]
    return ", ".join(SHAPE_FIELDS[s] for s in SHAPES if KIND_OF_SHAPE[s] == rules.kind)


def table_shape(columns: Iterable[str], rules: RowRules) -> str:
    """The shape a CSV/Parquet header declares (column names compared case-insensitively); raises
    RowError with a dataset-level reason when it declares none or the wrong kind."""
    lowered = {c.strip().lower() for c in columns}
    renames = {actual.lower(): canonical for canonical, actual in rules.columns}
    shape = detect_shape(renames.get(c, c) for c in lowered)
    if shape is None:
        raise RowError("unknown_shape", f"match no known shape; expected {_expected_shapes(rules)}"
                       + (" (or set data.columns to map yours)" if not rules.columns else ""))
    _check_shape(shape, rules)
    return shape


def table_row_to_object(row: dict, rules: RowRules) -> dict:
    """A CSV/Parquet row (column -> value, None for empty cells) as the JSON object it stands for:
    column names lower-cased, message lists parsed from their JSON text, empty cells as empty
    strings (reported as empty fields), empty optional cells dropped."""
    renames = {actual.strip().lower(): canonical for canonical, actual in rules.columns}
    if rules.split_column:
        renames.setdefault(rules.split_column.lower(), rules.split_column)
    obj = {renames.get(k, k): v for k, v in ((str(k).strip().lower(), v) for k, v in row.items())}
    for key in ("messages", "conversations", "prompt", "chosen", "rejected"):
        cell = obj.get(key)
        if isinstance(cell, str) and (key in ("messages", "conversations") or cell.lstrip().startswith("[")):
            try:
                obj[key] = json.loads(cell)
            except json.JSONDecodeError as exc:
                if key in ("messages", "conversations"):
                    raise RowError("bad_json", f"bad JSON in the '{key}' column: {exc.msg} at column {exc.colno}") from None
    for key, value in list(obj.items()):
        if value is None:
            if key in ("input", rules.split_column):
                del obj[key]
            else:
                obj[key] = ""
    return obj


# --------------------------------------------------------------------------------------------
# normalisation


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError("bad_field_type", f"{what} must be a string, got {_json_type(value)}")
    return unicodedata.normalize("NFC", value).strip()


def _required(obj: dict, name: str, rules: RowRules, shape: str) -> Any:
    if name not in obj:
        shown = rules.field(name)
        raise RowError("missing_field", f"{shape} row without '{shown}'")
    return obj[name]


def _messages(raw: Any, *, field: str, sharegpt: bool = False) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not raw:
        got = "an empty array" if isinstance(raw, list) else _json_type(raw)
        raise RowError("bad_messages", f"'{field}' must be a non-empty array, got {got}")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out: list[tuple[str, str]] = []
    for i, msg in enumerate(raw, start=1):
        if not isinstance(msg, dict):
            raise RowError("bad_messages", f"{field} message {i} is not an object (got {_json_type(msg)})")
        if role_key not in msg:
            raise RowError("bad_messages", f"{field} message {i} has no '{role_key}'")
        if content_key not in msg:
            raise RowError("bad_messages", f"{field} message {i} has no '{content_key}'")
        role = msg[role_key]
        if not isinstance(role, str):
            raise RowError("bad_role", f"{field} message {i} '{role_key}' must be a string, got {_json_type(role)}")
        role = role.strip().lower()
        if sharegpt:
            role = SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            shown = role if len(role) <= 20 else role[:20] + "…"
            raise RowError("bad_role", f"{field} message {i} has role {shown!r}; allowed: {', '.join(ROLES)}")
        content = _text(msg[content_key], f"{field} message {i} '{content_key}'")
        if not content:
            raise RowError("empty_content", f"{field} message {i} ({role}) has empty content")
        out.append((role, content))
    return out


def _check_turns(turns: list[tuple[str, str]], *, last: str, field: str) -> None:
    for i, (role, _) in enumerate(turns[1:], start=2):
        if role == "system":
            raise RowError("bad_order", f"{field} message {i} is a system message; only the first message may be")
    roles = [role for role, _ in turns]
    if last == "assistant" and "assistant" not in roles:
        raise RowError("no_assistant", "no assistant turn")
    if roles[-1] != last:
        code = "last_not_assistant" if last == "assistant" else "bad_order"
        where = "" if field == "messages" else f" {field}"
        raise RowError(code, f"last{where} turn is from '{roles[-1]}', not the {last}")
    if "user" not in roles:
        raise RowError("no_user", f"no user turn in '{field}'")


def _chat(obj: dict, shape: str, rules: RowRules) -> list[tuple[str, str]]:
    if shape in ("chat", "sharegpt"):
        field = "messages" if shape == "chat" else "conversations"
        turns = _messages(obj[field], field=field, sharegpt=shape == "sharegpt")
    elif shape == "instruction":
        if "output" not in obj and "response" not in obj:
            raise RowError("missing_field", f"instruction row without '{rules.field('response')}' or "
                                            f"'{rules.field('output')}'")
        resp_key = "response" if "response" in obj else "output"
        instruction = _text(obj["instruction"], f"'{rules.field('instruction')}'")
        extra = obj.get("input")
        extra = _text(extra, f"'{rules.field('input')}'") if extra is not None else ""
        response = _text(obj[resp_key], f"'{rules.field(resp_key)}'")
        if not instruction:
            raise RowError("empty_content", f"'{rules.field('instruction')}' is empty")
        if not response:
            raise RowError("empty_content", f"'{rules.field(resp_key)}' is empty")
        turns = [("user", f"{instruction}\n\n{extra}" if extra else instruction), ("assistant", response)]
    else:
        prompt = _text(obj["prompt"], f"'{rules.field('prompt')}'")
        completion = _text(_required(obj, "completion", rules, "prompt"), f"'{rules.field('completion')}'")
        if not prompt:
            raise RowError("empty_content", f"'{rules.field('prompt')}' is empty")
        if not completion:
            raise RowError("empty_content", f"'{rules.field('completion')}' is empty")
        turns = [("user", prompt), ("assistant", completion)]
    _check_turns(turns, last="assistant", field="messages")
    return turns


def _answer(raw: Any, field: str) -> tuple[str, list[tuple[str, str]] | None]:
    """A chosen / rejected value: (its answer text, the full conversation when it is a message list)."""
    if isinstance(raw, list):
        turns = _messages(raw, field=field)
        if turns[-1][0] != "assistant":
            raise RowError("last_not_assistant", f"last '{field}' turn is from '{turns[-1][0]}', not the assistant")
        return turns[-1][1], turns
    text = _text(raw, f"'{field}'")
    if not text:
        raise RowError("empty_content", f"'{field}' is empty")
    return text, None


def _preference(obj: dict, rules: RowRules) -> list[tuple[str, str]]:
    chosen, chosen_turns = _answer(_required(obj, "chosen", rules, "preference"), rules.field("chosen"))
    rejected, rejected_turns = _answer(_required(obj, "rejected", rules, "preference"), rules.field("rejected"))
    if "prompt" in obj:
        raw = obj["prompt"]
        if isinstance(raw, list):
            prompt = _messages(raw, field=rules.field("prompt"))
        else:
            text = _text(raw, f"'{rules.field('prompt')}'")
            if not text:
                raise RowError("empty_content", f"'{rules.field('prompt')}' is empty")
            prompt = [("user", text)]
        for turns, name in ((chosen_turns, "chosen"), (rejected_turns, "rejected")):
            if turns is not None and len(turns) != 1:
                raise RowError("bad_messages", f"'{rules.field(name)}' must be one assistant message when "
                                               f"'{rules.field('prompt')}' is given, got {len(turns)} messages")
    else:  # implicit prompt: the turns the two conversations share
        if chosen_turns is None or rejected_turns is None:
            raise RowError("missing_field", f"preference row without '{rules.field('prompt')}' (needed unless "
                                            "'chosen' and 'rejected' are whole conversations)")
        prompt = chosen_turns[:-1]
        if not prompt or rejected_turns[:-1] != prompt:
            raise RowError("bad_messages", "'chosen' and 'rejected' conversations must share every turn "
                                           "but the last assistant answer")
    _check_turns(prompt, last="user", field="prompt")
    if " ".join(chosen.split()).casefold() == " ".join(rejected.split()).casefold():
        raise RowError("identical_pair", "'chosen' and 'rejected' are the same answer (no preference to learn)")
    return [*prompt, ("chosen", chosen), ("rejected", rejected)]


def _classification(obj: dict, rules: RowRules) -> list[tuple[str, Any]]:
    text = _text(_required(obj, "text", rules, "classification"), f"'{rules.field('text')}'")
    if not text:
        raise RowError("empty_content", f"'{rules.field('text')}' is empty")
    label = _required(obj, "label", rules, "classification")
    if isinstance(label, str):
        label = unicodedata.normalize("NFC", label).strip()
        if not label:
            raise RowError("empty_content", f"'{rules.field('label')}' is empty")
    elif not isinstance(label, int) or isinstance(label, bool):
        raise RowError("bad_field_type", f"'{rules.field('label')}' must be a string or an integer, "
                                         f"got {_json_type(label)}")
    if rules.labels is not None and label not in rules.labels:
        shown = label if len(str(label)) <= 30 else str(label)[:30] + "…"
        raise RowError("bad_label", f"label {shown!r} is not one of data.labels")
    return [("text", text), ("label", label)]


def _check_shape(shape: str, rules: RowRules) -> None:
    if rules.format != "auto" and shape != rules.format:
        raise RowError("format_mismatch", f"{shape}-shaped row ({SHAPE_FIELDS[shape]}) but data.format is "
                                          f"{rules.format!r}")
    if KIND_OF_SHAPE[shape] != rules.kind:
        raise RowError("wrong_kind", f"{shape}-shaped row ({SHAPE_FIELDS[shape]}), but the recipe trains on "
                                     f"{KIND_DESCRIPTION[rules.kind]}")


def _user_split(obj: dict, rules: RowRules) -> str | None:
    if rules.split_column is None or rules.split_column not in obj:
        return None
    value = obj[rules.split_column]
    if value is None or value == "":
        return None
    name = SPLIT_NAMES.get(value.strip().lower()) if isinstance(value, str) else None
    if name is None:
        shown = value if isinstance(value, str) and len(value) <= 20 else _json_type(value)
        raise RowError("bad_split", f"'{rules.split_column}' is {shown!r}; expected train, val or test "
                                    "(or set data.split_column: null to ignore the column)")
    return name


def normalise(obj: dict, rules: RowRules) -> list[tuple[str, Any]]:
    """A parsed row (fields already `renamed`) as validated segments (see the module docstring)."""
    split_name = _user_split(obj, rules)
    shape = rules.format if rules.format != "auto" else detect_shape(obj)
    if shape is None:
        keys = sorted(str(k)[:30] for k in obj)[:6]
        raise RowError("unknown_shape", f"unknown row shape (keys: {', '.join(keys) or 'none'}); expected "
                                        f"{_expected_shapes(rules)}")
    found = detect_shape(obj)
    if found is not None and found != shape:
        _check_shape(found, rules)
    _check_shape(shape, rules)
    if KIND_OF_SHAPE[shape] == "chat":
        if shape in ("chat", "sharegpt"):
            _required(obj, "messages" if shape == "chat" else "conversations", rules, shape)
        else:
            _required(obj, "instruction" if shape == "instruction" else "prompt", rules, shape)
        segments = _chat(obj, shape, rules)
    elif shape == "preference":
        segments = _preference(obj, rules)
    else:
        segments = _classification(obj, rules)
    if split_name is not None:
        segments.append(("split", split_name))
    return segments


def with_system_prompt(segments: list[tuple[str, Any]], rules: RowRules) -> Segments:
    """The recipe's data.system_prompt first in chat and preference rows that have no system message
    of their own. Applied after hashing, so row ids (and splits) do not change with the prompt."""
    if rules.system_prompt and segments[0][0] in ("user", "assistant"):
        return (("system", unicodedata.normalize("NFC", rules.system_prompt).strip()), *segments)
    return tuple(segments)


def text_segments(segments: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, str]]:
    """The segments that are text (everything but META_ROLES)."""
    return ((role, content) for role, content in segments if role not in META_ROLES)


def segment(segments: Iterable[tuple[str, Any]], role: str, default: Any = None) -> Any:
    """The content of the first segment with this role."""
    return next((content for r, content in segments if r == role), default)


def kind_of(segments: Iterable[tuple[str, Any]]) -> str:
    roles = {role for role, _ in segments}
    return "preference" if "chosen" in roles else "classification" if "text" in roles else "chat"


def content_hash(segments: Iterable[tuple[str, Any]]) -> str:
    """sha256 of the text segments with whitespace collapsed and case folded (the dedup key; a
    classification row's label and a user split are not part of it)."""
    h = hashlib.sha256()
    for role, content in text_segments(segments):
        h.update(role.encode())
        h.update(b"\x1f")
        h.update(" ".join(content.split()).casefold().encode())
        h.update(b"\x1e")
    return h.hexdigest()


def to_record(row_id: str, segments: Iterable[tuple[str, Any]]) -> dict:
    """The canonical output record (see the module docstring) of a row's segments."""
    segments = [s for s in segments if s[0] != "split"]
    kind = kind_of(segments)
    if kind == "classification":
        return {"id": row_id, "text": segment(segments, "text"), "label": segment(segments, "label")}
    turns = [{"role": role, "content": content} for role, content in segments if role in ROLES]
    if kind == "chat":
        return {"id": row_id, "messages": turns}
    return {"id": row_id, "prompt": turns,
            "chosen": [{"role": "assistant", "content": segment(segments, "chosen")}],
            "rejected": [{"role": "assistant", "content": segment(segments, "rejected")}]}


def record_digest(line_no: int, raw: str) -> int:
    """One record's share of the input digest (summed mod 2**256, so independent of partitioning)."""
    return int.from_bytes(hashlib.sha256(f"{line_no}\x1f{raw}".encode("utf-8", "surrogatepass")).digest(), "big")


# --------------------------------------------------------------------------------------------
# partition functions (Spark mapPartitions)
#
# Output records, one per input record:
#   ("ok",    line_no, digest, hash, segments)
#   ("bad",   line_no, digest, code, reason, excerpt)
#   ("blank", line_no, digest)


def _bad(line_no: int, digest: int, err: RowError, raw: str) -> tuple:
    return ("bad", line_no, digest, err.code, err.reason, mask_excerpt(raw, EXCERPT_CHARS))


def _checked(raw: str, rules: RowRules) -> None:
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > rules.max_row_bytes:
        raise RowError("too_large", f"row is {size} bytes, over data.max_row_bytes={rules.max_row_bytes}")


_LONG_LINE = '{"_ftpipe_line_bytes": '


def long_line_marker(size: int) -> bytes:
    """What stands in for a line too long to hand to Spark (job._cap_long_lines)."""
    return f"{_LONG_LINE}{size}}}".encode()


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
            if line.startswith(_LONG_LINE):
                raise RowError("too_large", f"row is {line[len(_LONG_LINE):-1]} bytes, over "
                                            f"data.max_row_bytes={rules.max_row_bytes}")
            _checked(line, rules)
            segments = normalise(renamed(parse_json_line(line), rules), rules)
        except RowError as err:
            yield _bad(line_no, digest, err, line)
            continue
        yield ("ok", line_no, digest, content_hash(segments), with_system_prompt(segments, rules))


# A CSV cell a spreadsheet would run: `=…` or `@…`, or `+` / `-` before a function call or a DDE
# link (`+cmd|' /C calc'!A0`); a plain "- item" or "+1 555…" is text (OWASP: CSV injection).
_FORMULA = re.compile(r"\s*(?:[=@]|[+-]\s*(?:[A-Za-z_][\w.]*\s*\(|\w+\|))")


def check_formulas(values: dict) -> None:
    for column, value in values.items():
        if isinstance(value, str) and _FORMULA.match(value):
            raise RowError("formula", f"column {column!r} starts like a spreadsheet formula "
                                      f"({mask_excerpt(value, 12)!r}): CSV injection risk; quote it as text "
                                      "(e.g. a leading apostrophe) or drop the row")


def validate_table(records: Iterable[tuple[Any, int]], rules: RowRules,
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
            if corrupt_column:  # CSV input (Parquet cells are typed data, not spreadsheet text)
                check_formulas(values)
            _checked(raw, rules)
            segments = normalise(table_row_to_object(values, rules), rules)
        except RowError as err:
            yield _bad(line_no, digest, err, corrupt if corrupt is not None else raw)
            continue
        yield ("ok", line_no, digest, content_hash(segments), with_system_prompt(segments, rules))
