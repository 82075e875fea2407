"""Privacy sign-offs, shared by the CLI that records them, the trainer that requires them and the
registry that copies them into the model bundle.

A sign-off lives in two places: the DocStore (`privacy_signoffs/{run_id}`, written only by
`ftpipe privacy approve|reject`, the authority) and the dataset's manifest.json (`privacy_signoff`,
the record that travels with the data). Training a recipe with `data.privacy_review` needs both to
agree and the split files to be the ones whose hashes the manifest holds: a prepared folder
submitted directly cannot skip the review.
"""
from __future__ import annotations

import json
from pathlib import Path

from shared.datasets import SPLITS
from shared.ports import DocStore, ObjectNotFound, ObjectStore, PreconditionFailed
from shared.storage import file_sha256

SIGNOFFS = "privacy_signoffs"
MANIFEST = "manifest.json"
SPLIT_FILES = tuple(f"{name}.jsonl" for name in SPLITS)


class SignoffMissing(Exception):
    """Training would use data no approver signed off; the message says why and what to do."""


def _manifest_name(dataset_uri: str, store: ObjectStore) -> tuple[str, str]:
    bucket, prefix = store.parse_url(dataset_uri)
    return bucket, f"{prefix.rstrip('/')}/{MANIFEST}"


def read_manifest(store: ObjectStore, dataset_uri: str) -> dict | None:
    bucket, name = _manifest_name(dataset_uri, store)
    try:
        return json.loads(store.read(bucket, name))
    except (ObjectNotFound, ValueError):
        return None


def record_in_manifest(store: ObjectStore, dataset_uri: str, signoff: dict) -> dict:
    """Write the sign-off into the dataset's manifest.json (compare-and-swap on the object's
    generation, so a concurrent writer is never overwritten). The first approval of a dataset stays;
    returns the sign-off the manifest holds."""
    bucket, name = _manifest_name(dataset_uri, store)
    for _ in range(5):
        info = store.stat(bucket, name)
        if info is None:
            raise SignoffMissing(f"{store.url(bucket, name)} does not exist: not a dataset prepared by ftpipe")
        manifest = json.loads(store.read(bucket, name))
        if manifest.get("privacy_signoff"):
            return manifest["privacy_signoff"]
        manifest["privacy_signoff"] = signoff
        try:
            store.write(bucket, name, json.dumps(manifest, indent=2, sort_keys=True).encode(),
                        if_generation_match=info.generation, content_type="application/json")
            return signoff
        except PreconditionFailed:
            continue
    raise SignoffMissing(f"{store.url(bucket, name)} kept changing while the sign-off was recorded; try again")


def approved_signoff(docs: DocStore, dataset_id: str) -> dict | None:
    """The first approval of this dataset recorded by `ftpipe privacy approve`, if any."""
    found = [doc for _, doc in docs.query(SIGNOFFS, where=[("dataset_id", "==", dataset_id),
                                                             ("decision", "==", "approved")])]
    found.sort(key=lambda d: d.get("at_ts") or 0)
    return found[0] if found else None


def verify_signed_off(docs: DocStore, data_dir: Path) -> dict:
    """The sign-off for a downloaded dataset folder, after checking that an approver signed off this
    dataset and that its split files are the reviewed ones; raises SignoffMissing otherwise."""
    how = ("drop the raw data so that preprocess prepares it and an approver signs it off "
           "(`ftpipe privacy approve RUN --approver NAME`), then train on that dataset")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise SignoffMissing(f"the recipe requires a privacy sign-off (data.privacy_review) and this dataset has no "
                             f"{MANIFEST}, so no approver has seen its PII report; {how}")
    manifest = json.loads(path.read_text())
    dataset_id = manifest.get("dataset_id")
    approval = approved_signoff(docs, dataset_id) if dataset_id else None
    if approval is None or not manifest.get("privacy_signoff"):
        raise SignoffMissing(f"the recipe requires a privacy sign-off (data.privacy_review) and dataset "
                             f"{dataset_id or '(unnamed)'} has none; {how}")
    for name in SPLIT_FILES:
        expected = (manifest.get("files") or {}).get(name, {}).get("sha256")
        if not (data_dir / name).is_file() or expected != file_sha256(data_dir / name):
            raise SignoffMissing(f"{name} of dataset {dataset_id} is not the file the approver signed off "
                                 f"(its sha256 differs from the manifest's); {how}")
    return manifest["privacy_signoff"]
