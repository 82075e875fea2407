"""Local bucket notifications: what GCS does for a bucket with an OBJECT_FINALIZE notification
config on `incoming/`, for the embedded store — including files a person copies in by hand, which
`scan_incoming` finds. Each (bucket, object, generation) is announced once."""
from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path

from shared.domain import events as ev
from shared.platform.ports import Bus, DocStore, ObjectInfo

log = logging.getLogger("ftpipe.notifications")

INCOMING_PREFIX = "incoming/"


class LocalBucketNotifier:
    def __init__(self, bus: Bus, docs: DocStore, prefix: str = INCOMING_PREFIX):
        self.bus, self.docs, self.prefix = bus, docs, prefix

    @staticmethod
    def _key(info: ObjectInfo) -> str:
        return hashlib.sha256(f"{info.bucket}/{info.name}#{info.generation}".encode()).hexdigest()

    def announced(self, info: ObjectInfo) -> bool:
        return self.docs.get("notifications", self._key(info)) is not None

    def notify(self, info: ObjectInfo) -> bool:
        if not info.name.startswith(self.prefix) or self.announced(info):
            return False
        resource = ev.ObjectFinalized.model_validate({  # id and kind are extra fields of GCS's resource
            "bucket": info.bucket, "name": info.name, "generation": str(info.generation), "size": str(info.size),
            "contentType": info.content_type, "md5Hash": info.md5_hash, "timeCreated": info.updated,
            "updated": info.updated, "id": f"{info.bucket}/{info.name}/{info.generation}", "kind": "storage#object"})
        # Publish before recording: a crash in between re-announces (at-least-once), never loses.
        self.bus.publish(ev.DATASET_UPLOADS, resource.model_dump_json().encode(), resource.attributes())
        self.docs.set("notifications", self._key(info), {"bucket": info.bucket, "name": info.name, "generation": str(info.generation)})
        log.info("announced new object", extra={"object": f"{info.bucket}/{info.name}", "generation": info.generation})
        return True


def scan_incoming(store, notifier: LocalBucketNotifier, *, settle_s: float = 1.0) -> int:
    """Announce objects under incoming/ in every bucket that have not been announced yet. Files
    still being written (modified within settle_s) wait for the next scan."""
    count = 0
    for bucket_dir in sorted(p for p in Path(store.root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for info in store.list(bucket_dir.name, INCOMING_PREFIX):
            path = store.local_path(info.bucket, info.name)
            if path.name.startswith(".") or notifier.announced(info) or not store.wait_stable(path, settle_s):
                continue
            if notifier.notify(_with_md5(info, path)):
                count += 1
    return count


def _with_md5(info: ObjectInfo, path: Path) -> ObjectInfo:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return ObjectInfo(bucket=info.bucket, name=info.name, generation=info.generation, size=info.size,
                      md5_hash=base64.b64encode(digest.digest()).decode(), content_type=info.content_type,
                      updated=info.updated)
