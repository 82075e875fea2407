"""Helpers over the ObjectStore port: name validation shared by every adapter, URLs, and folder
upload/download (checkpoints and datasets are folders)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from shared.platform.ports import InvalidObjectName, ObjectStore, PreconditionFailed

MAX_NAME_BYTES = 1024


def file_sha256(path: Path) -> str:
    """sha256 of a local file, read in 1 MiB chunks (files can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate_object_name(name: str) -> str:
    """Reject names that could escape a bucket folder or confuse tools; the same rules for every
    adapter so a name that works locally works on GCS."""
    if not isinstance(name, str) or not name:
        raise InvalidObjectName("object name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidObjectName(f"object name is over {MAX_NAME_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidObjectName(f"object name {name!r} contains control characters")
    if name.startswith("/"):
        raise InvalidObjectName(f"object name {name!r} is absolute; use a relative name like incoming/recipe/file.jsonl")
    if "\\" in name:
        raise InvalidObjectName(f"object name {name!r} contains a backslash")
    if any(part in ("", ".", "..") for part in name.split("/")[:-1]) or name.split("/")[-1] in (".", ".."):
        raise InvalidObjectName(f"object name {name!r} has an empty, '.' or '..' path segment")
    return name


def validate_bucket_name(bucket: str) -> str:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", bucket or ""):
        raise InvalidObjectName(f"bucket name {bucket!r} is invalid: 3-63 of a-z 0-9 . _ -, starting and ending alphanumeric")
    return bucket


def upload_dir(store: ObjectStore, local_dir: Path, bucket: str, prefix: str, *, overwrite: bool = False) -> list[str]:
    """Upload every file under local_dir to bucket/prefix/…. By default write-if-absent, so a retried
    upload of a deterministic artefact never clobbers one already there; `overwrite` for folders
    whose completeness a marker object written last decides (checkpoints). Returns the names."""
    names = []
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        name = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
        try:
            store.upload_file(bucket, name, str(path), if_generation_match=None if overwrite else 0)
        except PreconditionFailed:
            pass  # already uploaded by an earlier attempt
        names.append(name)
    return names


def download_dir(store: ObjectStore, bucket: str, prefix: str, local_dir: Path) -> list[Path]:
    prefix = prefix.rstrip("/") + "/"
    paths = []
    for info in store.list(bucket, prefix):
        target = Path(local_dir) / info.name[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(bucket, info.name, str(target))
        paths.append(target)
    return paths


def download_if_present(store: ObjectStore, bucket: str, name: str, target: Path) -> Path | None:
    """The object at target, or None when the bucket has no such object (an optional input: the
    recipe's knowledge probes, read by the trainer and the evaluator alike)."""
    try:
        store.download_file(bucket, name, str(target))
    except KeyError:
        return None
    return target
