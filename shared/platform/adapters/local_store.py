"""The embedded object store: a folder per bucket under `root`, with GCS-like generations.

An object's generation is its file's mtime in nanoseconds: unique per write (every write is a
temp file renamed into place, so readers never see a partial object) and also defined for files a
person copies in by hand. Preconditions are checked under a per-bucket lock.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import mimetypes
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, unquote, urlparse

from shared.platform.ports import InvalidObjectName, ObjectInfo, ObjectNotFound, PreconditionFailed
from shared.platform.processes import alive
from shared.platform.storage import validate_bucket_name, validate_object_name


class LocalObjectStore:
    def __init__(self, root: str | Path, *, on_finalize: Callable[[ObjectInfo], object] | None = None):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)
        self._sweep_temp_files()
        # Called after every successful write: bootstrap wires it to the bucket-notification
        # publisher so writes under incoming/ reach `dataset-uploads` as GCS would send them.
        self.on_finalize = on_finalize

    def _temp_file(self) -> tuple[int, str]:
        # The writer's pid in the name: a writer killed mid-write leaves its temp file behind.
        return tempfile.mkstemp(dir=self._tmp, prefix=f"{os.getpid()}-")

    def _sweep_temp_files(self) -> None:
        """Remove the temp files of writers that died mid-write (each process sweeps as it starts)."""
        for path in self._tmp.iterdir():
            pid = path.name.split("-", 1)[0]
            if path.suffix == ".lock" or not pid.isdigit() or alive(int(pid)):
                continue
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ paths
    def _path(self, bucket: str, name: str) -> Path:
        validate_bucket_name(bucket)
        validate_object_name(name)
        path = (self.root / bucket / name)
        if not path.resolve().is_relative_to((self.root / bucket).resolve()):
            raise InvalidObjectName(f"object name {name!r} escapes bucket {bucket!r}")
        return path

    @contextmanager
    def _locked(self, bucket: str):
        (self.root / bucket).mkdir(parents=True, exist_ok=True)
        with open(self._tmp / f"{bucket}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _info(self, bucket: str, name: str, path: Path, md5: str = "") -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(bucket=bucket, name=name, generation=st.st_mtime_ns, size=st.st_size, md5_hash=md5,
                          content_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
                          updated=datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z"))

    def _check(self, path: Path, bucket: str, name: str, if_generation_match: int | None) -> None:
        if if_generation_match is None:
            return
        current = path.stat().st_mtime_ns if path.is_file() else 0
        if current != if_generation_match:
            raise PreconditionFailed(
                f"{bucket}/{name}: generation is {current or 'absent'}, precondition wanted {if_generation_match or 'absent'}")

    # ------------------------------------------------------------ writes
    def write(self, bucket: str, name: str, data: bytes, *, if_generation_match: int | None = None,
              content_type: str | None = None) -> ObjectInfo:
        fd, tmp = self._temp_file()
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return self._commit(tmp, bucket, name, if_generation_match, base64.b64encode(hashlib.md5(data).digest()).decode())

    def upload_file(self, bucket: str, name: str, path: str, *, if_generation_match: int | None = None,
                    content_type: str | None = None) -> ObjectInfo:
        fd, tmp = self._temp_file()
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        return self._commit(tmp, bucket, name, if_generation_match, base64.b64encode(digest.digest()).decode())

    def _commit(self, tmp: str, bucket: str, name: str, if_generation_match: int | None, md5: str) -> ObjectInfo:
        try:
            path = self._path(bucket, name)
            with self._locked(bucket):
                self._check(path, bucket, name, if_generation_match)
                path.parent.mkdir(parents=True, exist_ok=True)
                previous = path.stat().st_mtime_ns if path.is_file() else 0
                os.replace(tmp, path)
                if path.stat().st_mtime_ns <= previous:  # coarse clocks: generations must still grow
                    os.utime(path, ns=(previous + 1, previous + 1))
                info = self._info(bucket, name, path, md5)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if self.on_finalize is not None:
            self.on_finalize(info)
        return info

    # ------------------------------------------------------------ reads
    def read(self, bucket: str, name: str) -> bytes:
        path = self._path(bucket, name)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{bucket}/{name}") from None

    def download_file(self, bucket: str, name: str, path: str) -> ObjectInfo:
        src = self._path(bucket, name)
        if not src.is_file():
            raise ObjectNotFound(f"{bucket}/{name}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        return self._info(bucket, name, src)

    def stat(self, bucket: str, name: str) -> ObjectInfo | None:
        path = self._path(bucket, name)
        return self._info(bucket, name, path) if path.is_file() else None

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / validate_bucket_name(bucket)
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                name = path.relative_to(base).as_posix()
                if name.startswith(prefix):
                    try:
                        yield self._info(bucket, name, path)
                    except FileNotFoundError:  # deleted while listing
                        continue

    def delete(self, bucket: str, name: str, *, if_generation_match: int | None = None) -> None:
        path = self._path(bucket, name)
        with self._locked(bucket):
            if not path.is_file():
                raise ObjectNotFound(f"{bucket}/{name}")
            self._check(path, bucket, name, if_generation_match)
            path.unlink()
            # Remove now-empty folders so listings and hand inspection stay clean.
            parent = path.parent
            while parent != self.root / bucket and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    # ------------------------------------------------------------ urls
    def url(self, bucket: str, name: str) -> str:
        return (self.root / bucket).as_uri() + "/" + quote(name)

    def parse_url(self, url: str) -> tuple[str, str]:
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise ValueError(f"{url!r} is not a local store URL (file://…)")
        path = unquote(parsed.path)
        rel = Path(path).relative_to(self.root).as_posix() + ("/" if path.endswith("/") else "")
        bucket, _, name = rel.partition("/")
        return bucket, name

    def local_path(self, bucket: str, name: str) -> Path:
        return self._path(bucket, name)

    def wait_stable(self, path: Path, seconds: float = 1.0) -> bool:
        """True when a hand-copied file has not changed for `seconds` (its copy has finished)."""
        st = path.stat()
        return time.time() - st.st_mtime >= seconds

