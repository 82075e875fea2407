"""Document helpers shared by the doc-store adapters and their users."""
from __future__ import annotations

import copy


def deep_merge(base: dict, update: dict) -> dict:
    """Firestore set(merge=True): maps are merged recursively, every other value replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
