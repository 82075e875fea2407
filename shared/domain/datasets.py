"""The prepared-dataset contract, read in one place by every stage that consumes it.

A prepared dataset is a folder with train.jsonl, val.jsonl and test.jsonl (plus manifest.json,
pii_report.json, rejected.jsonl). Each split line is one row of the recipe's kind
(Recipe.data_kind): chat {"id", "messages": [{"role": "system" | "user" | "assistant", "content"},
...]}, preference (TRL's conversational format) {"id", "prompt": [messages], "chosen": [messages],
"rejected": [messages]}, or classification {"id", "text": str, "label": str | int}.
"""
from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")
# The registry bundles the manifest and the PII report with every model version, so a prepared
# dataset without them could be trained on but never registered: refused before any training.
PREPARED_FILES = tuple(f"{split}.jsonl" for split in SPLITS) + ("manifest.json", "pii_report.json")


def missing_prepared_files(folder: Path) -> str | None:
    """None when `folder` is a whole prepared dataset; otherwise what is missing and how to fix it."""
    missing = [name for name in PREPARED_FILES if not (Path(folder) / name).is_file()]
    if not missing:
        return None
    return (f"the prepared dataset lacks {', '.join(missing)}: a prepared dataset is what `ftpipe prepare FILE "
            f"--recipe R --out DIR` writes ({', '.join(PREPARED_FILES)}); prepare the raw data with it, or submit "
            "the raw file (prepared: false)")
SHAPES = {
    "chat": '{"id": str, "messages": [{"role": system|user|assistant, "content": str}, ...]}',
    "preference": '{"id": str, "prompt": [messages], "chosen": [messages], "rejected": [messages]}',
    "classification": '{"id": str, "text": str, "label": str | int}',
}


def _messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)


_VALID = {
    "chat": lambda row: _messages(row.get("messages")),
    "preference": lambda row: all(_messages(row.get(k)) for k in ("prompt", "chosen", "rejected")),
    "classification": lambda row: isinstance(row.get("text"), str) and isinstance(row.get("label"), (str, int))
    and not isinstance(row.get("label"), bool),
}


class DatasetContractError(ValueError):
    """A split file that breaks the contract; the message names the file and line."""


def iter_jsonl(path: Path, *, shape: str):
    """(line number, value) for each non-blank line of a small JSONL file the pipeline wrote or
    ships; bad JSON raises DatasetContractError naming the file, the line and the expected shape."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetContractError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be {shape}") from exc


def read_split(path: Path, kind: str = "chat") -> list[dict]:
    """Every row of one split of the given kind, validated; blank lines are skipped."""
    rows = []
    for lineno, row in iter_jsonl(path, shape=SHAPES[kind]):
        if not isinstance(row, dict) or not _VALID[kind](row):
            raise DatasetContractError(f"{path}:{lineno}: expected a {kind} row {SHAPES[kind]}")
        rows.append(row)
    return rows


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The recipe's system prompt goes first in a conversation that has none of its own."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)
