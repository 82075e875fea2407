"""The Python SDK: what the CLI does, as functions over the same ports the services use."""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Callable

from shared import events as ev
from shared.config import Adapters, Settings, bootstrap
from shared import model_registry
from shared.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from shared.runtime import CANCELLATIONS, REPLAY_FOR, publish_event
from shared.tenants import TenantError, check_name, get_quota, list_quotas, set_quota
from shared.topology import dlq_subscription

RUNS = "runs"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # object-name and document-id safe
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(RuntimeError):
    """A misuse the user can fix; the message says how."""


class Client:
    def __init__(self, settings: Settings | None = None, adapters: Adapters | None = None):
        self.settings = settings or Settings.from_env()
        self._adapters = adapters

    @property
    def adapters(self) -> Adapters:
        if self._adapters is None:
            self._adapters = bootstrap(self.settings)
        return self._adapters

    def close(self) -> None:
        if self._adapters is not None:
            self._adapters.close()

    # ------------------------------------------------------------ starting runs
    def _recipe(self, ref: str) -> Recipe:
        """A built-in recipe by name, or a YAML file, which is uploaded to the bucket's recipes/ so
        the services (which only see the bucket) resolve the same recipe."""
        path = Path(ref)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ClientError(f"recipe file {ref} does not exist")
            recipe = parse_recipe(path.read_text(), source=str(path))
            self.adapters.store.write(self.settings.bucket, f"recipes/{recipe.name}.yaml", path.read_bytes())
            return recipe
        return load_recipe(ref)

    def drop(self, file: str | Path, recipe: str, *, legal_basis: str | None = None) -> str:
        """Upload a dataset to incoming/<recipe>/<file>, as a team would drop it into the bucket.
        Returns the run id the drop starts (derived exactly as the preprocess service derives it).
        `legal_basis` (a legal basis / consent reference) is written first, as the sidecar object
        incoming/<recipe>/<file>.legal.json that the preprocess service reads with the drop."""
        path = Path(file)
        if not path.is_file():
            raise ClientError(f"{file}: no such file")
        try:
            parsed = self._recipe(recipe)
        except RecipeError as exc:
            raise ClientError(str(exc)) from exc
        name = f"incoming/{parsed.name}/{_safe_name(path.name)}"
        if legal_basis is not None:
            if not legal_basis.strip():
                raise ClientError("--legal-basis must not be empty")
            import json

            self.adapters.store.write(self.settings.bucket, f"{name}.legal.json",
                                      json.dumps({"legal_basis": legal_basis.strip(), "at": time.time()}).encode(),
                                      content_type="application/json")
        info = self.adapters.store.upload_file(self.settings.bucket, name, str(path))
        return ev.derive_run_id(info.bucket, info.name, str(info.generation), parsed.name, parsed.version)

    def submit(self, job: dict) -> str:
        """Publish a JobSubmitted. `job`: recipe (name or YAML path), dataset (local file or folder, or
        a store URL), optional prepared, overrides, tenant, run_id."""
        unknown = set(job) - {"recipe", "dataset", "prepared", "overrides", "tenant", "run_id"}
        if unknown:
            raise ClientError(f"job file: unknown keys {sorted(unknown)}; allowed: recipe, dataset, prepared, overrides, tenant, run_id")
        for key in ("recipe", "dataset"):
            if not job.get(key):
                raise ClientError(f"job file: '{key}' is required")
        for key in ("recipe", "dataset", "tenant", "run_id"):
            if key in job and not isinstance(job[key], str):
                raise ClientError(f"job file: '{key}' must be a string, got {type(job[key]).__name__}")
        if "prepared" in job and not isinstance(job["prepared"], bool):
            raise ClientError(f"job file: 'prepared' must be true or false, got {job['prepared']!r}")
        if not isinstance(job.get("overrides") or {}, dict):
            raise ClientError("job file: 'overrides' must be a mapping of dotted keys to values, "
                              "e.g. {training.epochs: 1}")
        if "run_id" in job and not _RUN_ID.fullmatch(job["run_id"]):
            raise ClientError(f"job file: run_id {job['run_id']!r} must be 1-128 of A-Z a-z 0-9 . _ -, "
                              "starting with a letter or digit")
        if "tenant" in job:
            try:
                check_name(job["tenant"])
            except TenantError as exc:
                raise ClientError(f"job file: {exc}") from exc
        try:
            recipe = self._recipe(str(job["recipe"]))
            if job.get("overrides"):
                from shared.recipe import apply_overrides
                recipe = apply_overrides(recipe, job["overrides"])
        except RecipeError as exc:
            raise ClientError(str(exc)) from exc
        run_id = job.get("run_id") or ev.derive_run_id("submit", recipe.hash, job["dataset"], uuid.uuid4().hex)
        prepared = bool(job.get("prepared", False))
        if prepared and recipe.data.privacy_review and "://" not in str(job["dataset"]):
            raise ClientError(f"recipe {recipe.name} requires a privacy sign-off (data.privacy_review): a local "
                              "prepared folder has none. Submit the raw data (dataset: the file, prepared: false) "
                              "so it is prepared and reviewed, or the store URL of a dataset already signed off")
        dataset_uri = self._dataset_uri(str(job["dataset"]), run_id, prepared)
        publish_event(self.adapters.bus, ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=dataset_uri,
                                                         prepared=prepared, tenant=job.get("tenant", "default"),
                                                         source={"submitted": str(job["dataset"])}))
        return run_id

    def _dataset_uri(self, dataset: str, run_id: str, prepared: bool) -> str:
        store, bucket = self.adapters.store, self.settings.bucket
        if "://" in dataset:
            store.parse_url(dataset)  # raises if the URL is not this store's
            return dataset
        path = Path(dataset)
        if prepared:
            if not (path / "train.jsonl").is_file():
                raise ClientError(f"{dataset}: a prepared dataset is a folder with train.jsonl, val.jsonl and test.jsonl")
            from shared.storage import upload_dir
            upload_dir(store, path, bucket, f"uploads/{run_id}/dataset")
            return store.url(bucket, f"uploads/{run_id}/dataset/")
        if not path.is_file():
            raise ClientError(f"{dataset}: no such file")
        store.upload_file(bucket, f"uploads/{run_id}/{_safe_name(path.name)}", str(path))
        return store.url(bucket, f"uploads/{run_id}/{_safe_name(path.name)}")

    # ------------------------------------------------------------ reading runs
    def run(self, run_id: str) -> dict | None:
        return self.adapters.docs.get(RUNS, run_id)

    def runs(self, *, status: str | None = None, limit: int = 20) -> list[dict]:
        where = [("status", "==", status)] if status else []
        return [doc for _, doc in self.adapters.docs.query(RUNS, where=where, order_by=[("created_at", "desc")], limit=limit)]

    def wait(self, run_id: str, *, timeout_s: float = 3600, on_update: Callable[[dict | None], None] | None = None,
             poll_s: float = 1.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.run(run_id)
            if on_update:
                on_update(run)
            if run and run.get("status") in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f}s (status: "
                                   f"{(run or {}).get('status', 'not seen yet')})")
            time.sleep(poll_s)

    def cancel(self, run_id: str) -> dict:
        run = self.run(run_id)
        if run is None:
            raise ClientError(f"no run {run_id}; `ftpipe runs` lists them")
        if run.get("status") in TERMINAL:
            raise ClientError(f"run {run_id} already ended ({run['status']})")
        self.adapters.docs.set(CANCELLATIONS, run_id, {"requested_at": time.time()})

        def mark(txn):
            doc = txn.get(RUNS, run_id)
            if doc.get("status") not in TERMINAL:
                doc.update(status="cancelled", sub_state="done", error="cancelled by request")
                txn.set(RUNS, run_id, doc)
            return doc
        return self.adapters.docs.transaction(mark)

    # ------------------------------------------------------------ models (shared/model_registry.py)
    def models(self, name: str | None = None) -> list[dict]:
        """Registered versions (of one model, or all), newest first, each with its `aliases`."""
        rows = []
        for model in model_registry.list_models(self.adapters.docs):
            if name is None or model["name"] == name:
                rows += model_registry.get_model(self.adapters.docs, model["name"])["versions"]
        return sorted(rows, key=lambda row: row.get("registered_at") or 0, reverse=True)

    def model_list(self) -> list[dict]:
        return model_registry.list_models(self.adapters.docs)

    def model(self, name: str) -> dict:
        return model_registry.get_model(self.adapters.docs, name)

    def model_version(self, name: str, version: str) -> dict:
        """A version's document plus its `bundle` (bundle.json) and `model_card` (MODEL_CARD.md)."""
        doc = model_registry.get_version(self.adapters.docs, name, version)
        return {**doc, **model_registry.read_bundle(self.adapters.store, doc)}

    def approve_model(self, name: str, version: str, *, approver: str, note: str = "") -> dict:
        return model_registry.approve(self.adapters.docs, self.adapters.bus, name, version, approver=approver, note=note)

    def promote_model(self, name: str, version: str, *, alias: str = "production", actor: str) -> dict:
        return model_registry.promote(self.adapters.docs, self.adapters.bus, name, version, alias=alias, actor=actor)

    def rollback_model(self, name: str, *, alias: str = "production", to: str | None = None, actor: str) -> dict:
        return model_registry.rollback(self.adapters.docs, self.adapters.bus, name, alias=alias, to=to, actor=actor)

    def archive_model(self, name: str, version: str, *, actor: str, reason: str) -> dict:
        return model_registry.archive(self.adapters.docs, self.adapters.bus, name, version, actor=actor, reason=reason)

    def quarantine_model(self, name: str, version: str, *, actor: str, reason: str) -> dict:
        return model_registry.quarantine(self.adapters.docs, self.adapters.bus, name, version, actor=actor,
                                         reason=reason)

    def export_model(self, name: str, version: str, out: str | Path, *, merged: bool = True,
                     adapter: bool = True) -> dict:
        from shared.model_export import export_version

        return export_version(self.adapters.store, self.adapters.docs, name, version, Path(out), merged=merged,
                              adapter=adapter)

    # ------------------------------------------------------------ tenants
    def tenants(self) -> list[dict]:
        """Every tenant with a quota, and what it uses now."""
        return [self.tenant(name) for name, _ in list_quotas(self.adapters.docs)]

    def tenant(self, name: str) -> dict:
        """A tenant's quota (None: unlimited) and what it uses now: the runs training, the GPU-hours
        of this calendar month (UTC)."""
        from services.trainer.quota import gpu_hours_used, month_of, running_runs

        docs, now = self.adapters.docs, time.time()
        quota, month = get_quota(docs, name), month_of(now)
        return {"tenant": name, **quota.describe(), "running": running_runs(docs, name, now), "month": month,
                "gpu_hours_used": round(gpu_hours_used(docs, name, month), 3)}

    def set_tenant_quota(self, name: str, **limits) -> dict:
        """Change the given limits (max_concurrent_jobs, gpu_hours_per_month; None: unlimited)."""
        set_quota(self.adapters.docs, name, **limits)
        return self.tenant(name)

    # ------------------------------------------------------------ dead letters
    def dlq_list(self, topic: str | None = None) -> list[dict]:
        out = []
        for t in _topics(topic):
            for msg in self._drain(t):
                out.append(_describe(t, msg))
                msg.nack(0)  # only looking: leave it there
        return out

    def dlq_replay(self, topic: str | None = None, message_id: str | None = None) -> list[dict]:
        """Publish dead-lettered messages back to their topic (after the fix), then drop them."""
        replayed = []
        for t in _topics(topic):
            for msg in self._drain(t):
                if message_id and msg.message_id != message_id:
                    msg.nack(0)
                    continue
                attributes = {k: v for k, v in msg.attributes.items()
                              if not k.startswith(("dead_letter_", "CloudPubSubDeadLetter"))}
                if source := _dead_letter_source(msg.attributes):
                    # Pub/Sub cannot publish to one subscription: the runtime of every other
                    # subscription on the topic acks this copy unprocessed.
                    attributes[REPLAY_FOR] = source
                self.adapters.bus.publish(t, msg.data, attributes)
                msg.ack()
                replayed.append(_describe(t, msg))
        return replayed

    def _drain(self, topic: str):
        seen = set()
        while True:
            batch = self.adapters.bus.pull(dlq_subscription(topic), max_messages=50, timeout_s=0.2)
            fresh = [m for m in batch if m.message_id not in seen]
            for m in batch:
                if m.message_id in seen:
                    m.nack(0)
            if not fresh:
                return
            for m in fresh:
                seen.add(m.message_id)
                yield m


def _topics(topic: str | None) -> tuple[str, ...]:
    if topic is None:
        return ev.TOPICS
    if topic not in ev.TOPICS:
        raise ClientError(f"unknown topic {topic!r}; topics: {', '.join(ev.TOPICS)}")
    return (topic,)


def _dead_letter_source(attributes) -> str:
    """The subscription a message was dead-lettered from: set by our runtime and adapters, or by
    Pub/Sub itself (as projects/…/subscriptions/NAME) when the server's own policy fired."""
    source = attributes.get("dead_letter_source") or attributes.get("CloudPubSubDeadLetterSourceSubscription", "")
    return source.rsplit("/", 1)[-1]


def _describe(topic: str, msg) -> dict:
    a = msg.attributes
    reason = a.get("dead_letter_reason") or (
        f"not acknowledged after {a['CloudPubSubDeadLetterSourceDeliveryCount']} delivery attempts"
        if "CloudPubSubDeadLetterSourceDeliveryCount" in a else "")
    return {"topic": topic, "message_id": msg.message_id, "type": a.get("type") or a.get("eventType"),
            "run_id": a.get("run_id"), "reason": reason, "source": _dead_letter_source(a)}


def _safe_name(filename: str) -> str:
    name = PurePosixPath(filename.replace("\\", "/")).name
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    if not name:
        raise ClientError(f"{filename!r} has no usable file name")
    return name
