"""The ObjectStore port on Cloud Storage (google-cloud-storage), also used against fake-gcs-server.

The client follows the environment: with STORAGE_EMULATOR_HOST set (scheme included, e.g.
http://127.0.0.1:4443) google-cloud-storage talks to that endpoint with anonymous credentials;
`endpoint=` does the same explicitly. Object names are validated with the same rules as the local
store (shared.platform.storage.validate_object_name), so a name that works locally works here.

Preconditions: `if_generation_match` maps to GCS's ifGenerationMatch (0 = only if absent) and a
412 becomes PreconditionFailed. fake-gcs-server (checked with v1.54) ignores ifGenerationMatch on
object deletes and on resumable uploads (used above 8 MiB); so for those two the adapter checks
the generation itself first (a stat) and still sends the precondition. On Cloud Storage that
costs one GET and the server check stays atomic; on fake-gcs-server a writer racing between the
stat and the write can slip through — the one gap left on the emulator.
"""
from __future__ import annotations

import mimetypes
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from google.api_core import exceptions as gexc
from google.cloud import storage
from google.cloud.storage import blob as _blob_mod

from shared.platform.ports import ObjectInfo, ObjectNotFound, PreconditionFailed
from shared.platform.storage import validate_bucket_name, validate_object_name

# Above this size google-cloud-storage switches from one multipart request to a resumable upload.
_MULTIPART_MAX = getattr(_blob_mod, "_MAX_MULTIPART_SIZE", 8 * 1024 * 1024)


def _rfc3339(ts: datetime | None) -> str:
    if ts is None:
        return ""
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class GcsObjectStore:
    def __init__(self, project: str | None = None, *, endpoint: str | None = None,
                 client: storage.Client | None = None, location: str | None = None):
        """`endpoint`: an emulator URL such as http://127.0.0.1:4443 (anonymous credentials).
        Without it, STORAGE_EMULATOR_HOST or the real service with application default
        credentials."""
        if client is None:
            if endpoint:
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=project or "ftpipe-local", credentials=AnonymousCredentials(),
                                        client_options={"api_endpoint": endpoint})
            else:
                client = storage.Client(project=project)
        self.client = client
        self.project = project
        self.location = location

    # ------------------------------------------------------------ helpers
    def _blob(self, bucket: str, name: str) -> storage.Blob:
        validate_bucket_name(bucket)
        validate_object_name(name)
        return self.client.bucket(bucket).blob(name)

    @staticmethod
    def _info(blob: storage.Blob) -> ObjectInfo:
        return ObjectInfo(bucket=blob.bucket.name, name=blob.name or "", generation=int(blob.generation or 0),
                          size=int(blob.size or 0), md5_hash=blob.md5_hash or "",
                          content_type=blob.content_type or "application/octet-stream",
                          updated=_rfc3339(blob.updated))

    @staticmethod
    def _content_type(name: str, content_type: str | None) -> str:
        return content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"

    def _precheck(self, bucket: str, name: str, if_generation_match: int) -> None:
        current = self.stat(bucket, name)
        generation = current.generation if current is not None else 0
        if generation != if_generation_match:
            raise PreconditionFailed(f"{bucket}/{name}: generation is {generation or 'absent'}, "
                                     f"precondition wanted {if_generation_match or 'absent'}")

    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket when it does not exist (ObjectStore itself has no create_bucket;
        bootstrap calls this when it owns the resources; Terraform does in production)."""
        validate_bucket_name(bucket)
        try:
            self.client.create_bucket(bucket, location=self.location)
        except gexc.Conflict:  # 409: already exists (ours or, on GCS, someone else's)
            pass

    # ------------------------------------------------------------ writes
    def write(self, bucket: str, name: str, data: bytes, *, if_generation_match: int | None = None,
              content_type: str | None = None) -> ObjectInfo:
        data = bytes(data)
        return self._upload(bucket, name, len(data), if_generation_match, content_type,
                            lambda blob, **kw: blob.upload_from_string(data, **kw))

    def upload_file(self, bucket: str, name: str, path: str, *, if_generation_match: int | None = None,
                    content_type: str | None = None) -> ObjectInfo:
        return self._upload(bucket, name, os.path.getsize(path), if_generation_match, content_type,
                            lambda blob, **kw: blob.upload_from_filename(str(path), **kw))

    def _upload(self, bucket: str, name: str, size: int, if_generation_match: int | None,
                content_type: str | None, send) -> ObjectInfo:
        blob = self._blob(bucket, name)
        if if_generation_match is not None and size > _MULTIPART_MAX:
            self._precheck(bucket, name, if_generation_match)
        try:
            send(blob, content_type=self._content_type(name, content_type), if_generation_match=if_generation_match)
        except gexc.PreconditionFailed as exc:
            raise PreconditionFailed(f"{bucket}/{name}: {exc.message}") from None
        except gexc.NotFound:
            raise ObjectNotFound(f"bucket {bucket!r} does not exist") from None
        return self._info(blob)

    # ------------------------------------------------------------ reads
    def read(self, bucket: str, name: str) -> bytes:
        try:
            return self._blob(bucket, name).download_as_bytes()
        except gexc.NotFound:
            raise ObjectNotFound(f"{bucket}/{name}") from None

    def download_file(self, bucket: str, name: str, path: str) -> ObjectInfo:
        """Download one generation consistently: the generation stat'ed is the one fetched (a
        concurrent overwrite makes that generation vanish; then the newer one is fetched)."""
        validate_bucket_name(bucket)
        validate_object_name(name)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            blob = self.client.bucket(bucket).get_blob(name)
            if blob is None:
                raise ObjectNotFound(f"{bucket}/{name}")
            pinned = self.client.bucket(bucket).blob(name, generation=blob.generation)
            try:
                pinned.download_to_filename(str(path))
            except gexc.NotFound:
                continue  # overwritten or deleted meanwhile: look again
            return self._info(blob)
        raise ObjectNotFound(f"{bucket}/{name} kept changing while downloading")

    def stat(self, bucket: str, name: str) -> ObjectInfo | None:
        validate_bucket_name(bucket)
        validate_object_name(name)
        try:
            blob = self.client.bucket(bucket).get_blob(name)
        except gexc.NotFound:  # missing bucket
            return None
        return self._info(blob) if blob is not None else None

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_bucket_name(bucket)
        try:
            for blob in self.client.list_blobs(bucket, prefix=prefix or None):
                yield self._info(blob)
        except gexc.NotFound:  # a bucket that does not exist holds nothing
            return

    def delete(self, bucket: str, name: str, *, if_generation_match: int | None = None) -> None:
        blob = self._blob(bucket, name)
        if if_generation_match is not None:
            current = self.stat(bucket, name)
            if current is None:
                raise ObjectNotFound(f"{bucket}/{name}")
            if current.generation != if_generation_match:
                raise PreconditionFailed(f"{bucket}/{name}: generation is {current.generation}, "
                                         f"precondition wanted {if_generation_match or 'absent'}")
        try:
            blob.delete(if_generation_match=if_generation_match)
        except gexc.NotFound:
            raise ObjectNotFound(f"{bucket}/{name}") from None
        except gexc.PreconditionFailed as exc:
            raise PreconditionFailed(f"{bucket}/{name}: {exc.message}") from None

    # ------------------------------------------------------------ urls
    def url(self, bucket: str, name: str) -> str:
        validate_bucket_name(bucket)
        validate_object_name(name)
        return f"gs://{bucket}/{name}"

    def parse_url(self, url: str) -> tuple[str, str]:
        if not isinstance(url, str) or not url.startswith("gs://"):
            raise ValueError(f"{url!r} is not a Cloud Storage URL (gs://bucket/name)")
        bucket, _, name = url[len("gs://"):].partition("/")
        validate_bucket_name(bucket)
        if name:  # "gs://bucket" and "gs://bucket/" name the bucket itself
            validate_object_name(name)
        return bucket, name
