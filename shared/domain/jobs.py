"""Starting and cancelling runs: the one code path behind `ftpipe submit|drop|cancel` (ftpipe/client.py)
and the dashboard's `POST /api/runs` and `POST /api/runs/<id>/cancel` (services/tracker/api.py).

A submission resolves the recipe (a built-in name, or a YAML file that is uploaded to the bucket's
recipes/ so the services, which only see the bucket, resolve the same recipe), applies the
dotted-key overrides, uploads the dataset under uploads/<run_id>/ and publishes JobSubmitted. A drop
uploads the file to incoming/<recipe>/<file>, where the bucket's notification starts the run. Either
is refused first when the recipe's memory plan (shared/domain/memory_plan.py) does not fit its
hardware, with what to change.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path, PurePosixPath

from shared.domain import events as ev
from shared.domain.datasets import missing_prepared_files
from shared.domain.memory_plan import refusal
from shared.domain.recipe import Recipe, RecipeError, apply_overrides, load_recipe, parse_recipe
from shared.domain.tenants import TenantError, check_name
from shared.platform.ports import Bus, DocStore, ObjectStore
from shared.platform.runtime import CANCELLATIONS, publish_event
from shared.platform.storage import validate_object_name

RUNS = "runs"   # runs/{run_id}: the run documents the tracker writes (services/tracker/lineage.py)
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_KEYS = ("recipe", "dataset", "prepared", "overrides", "tenant", "run_id")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # object-name and document-id safe


class JobError(ValueError):
    """A job that cannot be started or cancelled; the message says what and how to fix it. `status`
    is the HTTP status the tracker's API answers with (400 bad job, 404 no such run, 409 too late)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def resolve_recipe(store: ObjectStore, bucket: str, ref: str, overrides: dict | None = None) -> Recipe:
    """A built-in recipe by name, or a YAML file (uploaded to the bucket's recipes/), with overrides."""
    try:
        path = Path(ref)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise JobError(f"recipe file {ref} does not exist")
            recipe = parse_recipe(path.read_text(), source=str(path))
            store.write(bucket, f"recipes/{recipe.name}.yaml", path.read_bytes())
        else:
            recipe = load_recipe(ref)
        return apply_overrides(recipe, overrides) if overrides else recipe
    except RecipeError as exc:
        raise JobError(str(exc)) from exc


def check_job(job: dict) -> None:
    """The job's shape: the keys of a job file, each of the right type (JobError names the first problem)."""
    unknown = set(job) - set(JOB_KEYS)
    if unknown:
        raise JobError(f"job file: unknown keys {sorted(unknown)}; allowed: {', '.join(JOB_KEYS)}")
    for key in ("recipe", "dataset"):
        if not job.get(key):
            raise JobError(f"job file: '{key}' is required")
    for key in ("recipe", "dataset", "tenant", "run_id"):
        if key in job and not isinstance(job[key], str):
            raise JobError(f"job file: '{key}' must be a string, got {type(job[key]).__name__}")
    if "prepared" in job and not isinstance(job["prepared"], bool):
        raise JobError(f"job file: 'prepared' must be true or false, got {job['prepared']!r}")
    if not isinstance(job.get("overrides") or {}, dict):
        raise JobError("job file: 'overrides' must be a mapping of dotted keys to values, e.g. {training.epochs: 1}")
    if "run_id" in job and not _RUN_ID.fullmatch(job["run_id"]):
        raise JobError(f"job file: run_id {job['run_id']!r} must be 1-128 of A-Z a-z 0-9 . _ -, "
                       "starting with a letter or digit")
    if "tenant" in job:
        try:
            check_name(job["tenant"])
        except TenantError as exc:
            raise JobError(f"job file: {exc}") from exc


def submit(store: ObjectStore, bus: Bus, bucket: str, job: dict, *, source: dict | None = None) -> str:
    """Publish a JobSubmitted; returns its run id. `job`: recipe (name or YAML path), dataset (a local
    file or prepared folder, or a store URL), optional prepared, overrides, tenant, run_id. `source`
    (default: the dataset as given) is recorded on the run as where its data came from."""
    check_job(job)
    recipe = resolve_recipe(store, bucket, job["recipe"], job.get("overrides"))
    if reason := refusal(recipe):
        raise JobError(reason)
    dataset = job["dataset"]
    run_id = job.get("run_id") or ev.derive_run_id("submit", recipe.hash, dataset, uuid.uuid4().hex)
    prepared = bool(job.get("prepared", False))
    if prepared and recipe.data.privacy_review and "://" not in dataset:
        raise JobError(f"recipe {recipe.name} requires a privacy sign-off (data.privacy_review): a local "
                       "prepared folder has none. Submit the raw data (dataset: the file, prepared: false) "
                       "so it is prepared and reviewed, or the store URL of a dataset already signed off")
    dataset_uri = _stage_dataset(store, bucket, dataset, run_id, prepared)
    publish_event(bus, ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=dataset_uri, prepared=prepared,
                                       tenant=job.get("tenant", "default"),
                                       source=source if source is not None else {"submitted": dataset}))
    return run_id


def _stage_dataset(store: ObjectStore, bucket: str, dataset: str, run_id: str, prepared: bool) -> str:
    """The store URL of the job's data: a URL as it is, a local file or prepared folder uploaded."""
    if "://" in dataset:
        try:
            validate_object_name(store.parse_url(dataset)[1].rstrip("/"))
        except ValueError as exc:  # InvalidObjectName too
            raise JobError(f"dataset {dataset!r} is not an object of this store ({exc}); give a local file or "
                           f"folder, or a URL from `ftpipe runs`/`ftpipe status` such as "
                           f"{store.url(bucket, 'datasets/')}ID/") from None
        return dataset
    path = Path(dataset)
    if prepared:
        if problem := missing_prepared_files(path):
            raise JobError(f"{dataset}: {problem}")
        from shared.platform.storage import upload_dir
        upload_dir(store, path, bucket, f"uploads/{run_id}/dataset")
        return store.url(bucket, f"uploads/{run_id}/dataset/")
    if not path.is_file():
        raise JobError(f"{dataset}: no such file")
    name = f"uploads/{run_id}/{safe_name(path.name)}"
    store.upload_file(bucket, name, str(path))
    return store.url(bucket, name)


def drop(store: ObjectStore, bucket: str, file: str | Path, recipe: str, *, legal_basis: str | None = None) -> str:
    """Upload a dataset to incoming/<recipe>/<file>, as a team would drop it into the bucket.
    Returns the run id the drop starts (derived exactly as the preprocess service derives it).
    `legal_basis` (a legal basis / consent reference) is written first, as the sidecar object
    incoming/<recipe>/<file>.legal.json that the preprocess service reads with the drop."""
    path = Path(file)
    if not path.is_file():
        raise JobError(f"{file}: no such file")
    parsed = resolve_recipe(store, bucket, recipe)
    if reason := refusal(parsed):
        raise JobError(reason)
    name = f"incoming/{parsed.name}/{safe_name(path.name)}"
    if legal_basis is not None:
        if not legal_basis.strip():
            raise JobError("--legal-basis must not be empty")
        store.write(bucket, f"{name}.legal.json",
                    json.dumps({"legal_basis": legal_basis.strip(), "at": time.time()}).encode(),
                    content_type="application/json")
    info = store.upload_file(bucket, name, str(path))
    return ev.derive_run_id(info.bucket, info.name, str(info.generation), parsed.name, parsed.version)


def cancel(docs: DocStore, run_id: str) -> dict:
    """Set the run's cancel flag (every service checks it before its work, the trainer at each step)
    and mark the run cancelled; returns the run document."""
    run = docs.get(RUNS, run_id)
    if run is None:
        raise JobError(f"no run {run_id}; `ftpipe runs` lists them", status=404)
    if run.get("status") in TERMINAL:
        raise JobError(f"run {run_id} already ended ({run['status']})", status=409)
    docs.set(CANCELLATIONS, run_id, {"requested_at": time.time()})

    from shared.domain.tenant_stats import apply_change

    def mark(txn):
        doc = txn.get(RUNS, run_id)
        if doc.get("status") not in TERMINAL:
            before = dict(doc)
            doc.update(status="cancelled", sub_state="done", error="cancelled by request")
            apply_change(txn, before, doc)
            txn.set(RUNS, run_id, doc)
        return doc
    return docs.transaction(mark)


def mark_replayed(docs: DocStore, run_id: str, message_id: str) -> None:
    """`ftpipe dlq replay` of a message of this run: a run the dead letter had failed is back in the
    state it was in, and a notice of that message the tracker has not folded yet will not fail it."""
    from shared.domain.tenant_stats import apply_change

    def mark(txn):
        run = txn.get(RUNS, run_id)
        if run is None:
            return
        before = {**run}
        dead_letter = run.setdefault("dead_letter", {})
        dead_letter.setdefault("replayed", {})[message_id] = time.time()
        if dead_letter.get("active") and dead_letter.get("message_id") == message_id:
            run.update(status=dead_letter.get("previous_status", "running"), error=None)
            dead_letter["active"] = False
        apply_change(txn, before, run)
        txn.set(RUNS, run_id, run)
    docs.transaction(mark)


def safe_name(filename: str) -> str:
    """A file name usable as the last part of an object name (no folders, no odd characters)."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    if not name:
        raise JobError(f"{filename!r} has no usable file name")
    return name
