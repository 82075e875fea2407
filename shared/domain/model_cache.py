"""Where the model cache keeps models (FTPIPE_MODEL_CACHE): its folder, and the folder each GGUF
file is imported into. Apart from shared/domain/models.py, which fills the cache (with torch and
transformers), so that the memory planner can read an imported model's config.json where torch is
not installed (the tracker's image)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("FTPIPE_MODEL_CACHE") or Path.home() / ".cache" / "ftpipe" / "models"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def gguf_folder(path: Path) -> Path:
    """Where ensure_gguf imports a GGUF file, imported yet or not: the cache, keyed by the file's
    path, size and modification time."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"gguf-{path.stem}-{key}"
