"""Small generated support chats for the trainer's tests, and writing them as split files."""
from __future__ import annotations

import json
from pathlib import Path


def order_chat(i: int, *, follow_up: bool = False) -> dict:
    """A chat about order i: one exchange, or two with `follow_up` (a second user and assistant turn)."""
    messages = [{"role": "user", "content": f"Where is order {i}?"},
                {"role": "assistant", "content": f"Order {i} ships on day {i % 3 + 1}."}]
    if follow_up:
        messages += [{"role": "user", "content": "Thanks, and my email is [EMAIL]."},
                     {"role": "assistant", "content": "Noted, we will write to you."}]
    return {"id": f"c{i}", "messages": messages}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_prepared(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """A whole prepared dataset as the trainer accepts it (shared/domain/datasets.PREPARED_FILES): the split
    files plus a manifest and a PII report, which the registry bundles with the model."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    counts = {split: len(rows) for split, rows in splits.items()}
    (folder / "manifest.json").write_text(json.dumps({"dataset_id": folder.name, "counts": counts}))
    (folder / "pii_report.json").write_text(json.dumps({"counts": {}, "residual_rate": 0.0}))
    return folder
