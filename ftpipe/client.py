"""The Python SDK: what the CLI does, as functions over the same ports the services use, as the
caller its token says (`token=`, $FTPIPE_TOKEN, else the stack's own token in <state>/auth-token,
the local admin). In the gcp profile the caller is the Google account of the application default
credentials, with the roles shared/domain/access.py gives it; people who are not admins use the
dashboard and its API instead (they hold no Firestore or Pub/Sub rights: docs/deploy.md)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from shared.domain import access, events as ev, jobs, model_policy, model_registry
from shared.domain.jobs import RUNS, TERMINAL
from shared.domain.tenants import get_quota, list_quotas, set_quota
from shared.platform.auth import Identity, local_token, token_authenticator
from shared.platform.config import Adapters, Settings, bootstrap
from shared.platform.push import AuthError
from shared.platform.runtime import DEAD_LETTER_MESSAGE_ID, REPLAY_FOR
from shared.platform.topology import dlq_subscription


class ClientError(RuntimeError):
    """A misuse the user can fix; the message says how."""


class Client:
    def __init__(self, settings: Settings | None = None, adapters: Adapters | None = None, *,
                 token: str | None = None):
        self.settings = settings or Settings.from_env()
        self._adapters = adapters
        self._token = token
        self._caller: access.Caller | None = None

    @property
    def caller(self) -> access.Caller:
        """Who this client acts as (resolved once): every change it makes checks and records it."""
        if self._caller is None:
            docs = self.adapters.docs
            try:
                if self.settings.in_cloud:
                    identity = Identity(subject=_cloud_account(), via="adc")
                else:
                    # the stack's own token by default: whoever can read the state folder is its admin
                    stack = local_token(self.settings.state_dir)
                    secret = self._token or os.environ.get("FTPIPE_TOKEN") or stack
                    identity = token_authenticator(docs, stack)({"Authorization": f"Bearer {secret}"})
            except AuthError as exc:
                raise ClientError(f"{exc.reason} (the token comes from --token or FTPIPE_TOKEN)") from exc
            self._caller = access.caller_of(docs, identity, self.settings.admins)
        return self._caller

    @property
    def adapters(self) -> Adapters:
        if self._adapters is None:
            self._adapters = bootstrap(self.settings)
        return self._adapters

    def close(self) -> None:
        if self._adapters is not None:
            self._adapters.close()

    # ------------------------------------------------------------ starting runs
    def drop(self, file: str | Path, recipe: str, *, tenant: str | None = None,
             legal_basis: str | None = None) -> str:
        """Upload a dataset to incoming/<tenant>/<recipe>/<file>; returns the run id the drop starts
        (shared/domain/jobs.py: drop)."""
        try:
            return jobs.drop(self.adapters.docs, self.adapters.store, self.settings.bucket, self.caller, file, recipe,
                             tenant=tenant, legal_basis=legal_basis)
        except jobs.JobError as exc:
            raise ClientError(str(exc)) from exc

    def submit(self, job: dict) -> str:
        """Publish a JobSubmitted. `job`: recipe (name or YAML path), dataset (local file or folder, or
        a store URL), optional prepared, overrides, tenant, run_id (shared/domain/jobs.py: submit)."""
        try:
            return jobs.submit(self.adapters.docs, self.adapters.store, self.adapters.bus, self.settings.bucket,
                               self.caller, job)
        except jobs.JobError as exc:
            raise ClientError(str(exc)) from exc

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
        try:
            return jobs.cancel(self.adapters.docs, self.caller, run_id)
        except jobs.JobError as exc:
            raise ClientError(str(exc)) from exc

    # ------------------------------------------------------------ models (shared/domain/model_registry.py)
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
        if doc["status"] in model_registry.AWAITING_VERDICT:  # no bundle until the gate decides
            return {**doc, "bundle": None, "model_card": None}
        return {**doc, **model_registry.read_bundle(self.adapters.store, doc)}

    def approve_model(self, name: str, version: str, *, note: str = "") -> dict:
        return model_registry.approve(self.adapters.docs, self.adapters.bus, name, version, caller=self.caller,
                                      note=note)

    def promote_model(self, name: str, version: str, *, alias: str = "production") -> dict:
        return model_registry.promote(self.adapters.docs, self.adapters.bus, name, version, alias=alias,
                                      caller=self.caller)

    def rollback_model(self, name: str, *, alias: str = "production", to: str | None = None) -> dict:
        return model_registry.rollback(self.adapters.docs, self.adapters.bus, name, alias=alias, to=to,
                                       caller=self.caller)

    def archive_model(self, name: str, version: str, *, reason: str) -> dict:
        return model_registry.archive(self.adapters.docs, self.adapters.bus, name, version, caller=self.caller,
                                      reason=reason)

    def quarantine_model(self, name: str, version: str, *, reason: str) -> dict:
        return model_registry.quarantine(self.adapters.docs, self.adapters.bus, name, version, caller=self.caller,
                                         reason=reason)

    def model_policy(self, name: str) -> dict | None:
        policy = model_policy.get_policy(self.adapters.docs, name)
        return policy.public() if policy else None

    def set_model_policy(self, name: str, **changes) -> dict:
        return model_policy.set_policy(self.adapters.docs, self.caller, name, **changes).public()

    # ------------------------------------------------------------ tokens and roles (shared/domain/access.py)
    def create_token(self, name: str, role: str, tenant: str | None = None) -> str:
        return access.create_token(self.adapters.docs, self.caller, name, role, tenant)

    def revoke_token(self, name: str) -> None:
        access.revoke_token(self.adapters.docs, self.caller, name)

    def tokens(self) -> list[dict]:
        return access.list_tokens(self.adapters.docs, self.caller)

    def grant(self, subject: str, role: str, tenant: str | None = None) -> dict:
        return access.grant(self.adapters.docs, self.caller, subject, role, tenant)

    def revoke(self, subject: str, role: str, tenant: str | None = None) -> dict:
        return access.revoke(self.adapters.docs, self.caller, subject, role, tenant)

    def principals(self) -> list[dict]:
        return access.list_principals(self.adapters.docs, self.caller)

    def seal_model(self, name: str, version: str) -> dict:
        """Record the bucket copy's digests of a version registered without them (an admin's step, after
        checking the copy): model_registry.seal."""
        return model_registry.seal(self.adapters.docs, self.adapters.store, name, version, caller=self.caller)

    def reevaluate_model(self, name: str, version: str) -> dict:
        return model_registry.reevaluate(self.adapters.docs, self.adapters.bus, name, version, caller=self.caller)

    def export_model(self, name: str, version: str, out: str | Path, *, merged: bool = True,
                     adapter: bool = True) -> dict:
        from shared.domain.model_export import export_version

        return export_version(self.adapters.store, self.adapters.docs, name, version, Path(out), merged=merged,
                              adapter=adapter)

    # ------------------------------------------------------------ tenants
    def tenants(self) -> list[dict]:
        """Every tenant with a quota, and what it uses now."""
        return [self.tenant(name) for name, _ in list_quotas(self.adapters.docs)]

    def tenant(self, name: str) -> dict:
        """A tenant's quota (None: unlimited) and what it uses now: the runs training, the GPU-hours
        and the USD of this calendar month (UTC)."""
        from services.trainer.quota import month_of, running_runs, usage

        docs, now = self.adapters.docs, time.time()
        quota, month = get_quota(docs, name), month_of(now)
        gpu_hours, cost = usage(docs, name, month)
        return {"tenant": name, **quota.describe(), "running": running_runs(docs, name, now), "month": month,
                "gpu_hours_used": round(gpu_hours, 3), "cost_usd_used": round(cost, 4)}

    def set_tenant_quota(self, name: str, **limits) -> dict:
        """Change the given limits (max_concurrent_jobs, gpu_hours_per_month, cost_usd_per_month; None:
        unlimited); an admin's, and how a tenant comes to exist."""
        set_quota(self.adapters.docs, self.caller, name, **limits)
        return self.tenant(name)

    def reindex_tenants(self) -> dict:
        """Recount tenant_stats (what GET /api/tenants reads) from the runs: {tenants, runs, removed}."""
        from shared.domain.tenant_stats import rebuild

        access.require(self.caller, "admin", to="recount the tenants' totals")
        return rebuild(self.adapters.docs)

    # ------------------------------------------------------------ dead letters
    def dlq_list(self, topic: str | None = None) -> list[dict]:
        out = []
        for t in _topics(topic):
            for msg in self._drain(t):
                out.append(_describe(t, msg))
                msg.nack(0)  # only looking: leave it there
        return out

    def dlq_replay(self, topic: str | None = None, message_id: str | None = None) -> list[dict]:
        """Publish dead-lettered messages back to their topic (after the fix), then drop them (an
        admin's: a replayed message is a job message whoever wrote it)."""
        access.require(self.caller, "admin", to="replay dead-lettered messages")
        replayed = []
        for t in _topics(topic):
            # Only what is dead-lettered now: a replay that fails again comes back to this topic
            # while the command runs, and must wait for the next replay, not loop.
            for msg in list(self._drain(t)):
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
                if (run_id := msg.attributes.get("run_id")) and (original := msg.attributes.get(DEAD_LETTER_MESSAGE_ID)):
                    jobs.mark_replayed(self.adapters.docs, run_id, original)
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


def _cloud_account() -> str:
    """The Google account of the application default credentials: a service account's email, or the
    gcloud account a person signed in with."""
    import google.auth

    credentials, _ = google.auth.default()
    email = getattr(credentials, "service_account_email", None)
    if email and "@" in email:
        return email
    try:
        account = subprocess.run(["gcloud", "config", "get-value", "account"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        account = ""
    if "@" not in account:
        raise ClientError("cannot tell which Google account you are: `gcloud auth login` (or set "
                          "GOOGLE_APPLICATION_CREDENTIALS to a service account key)")
    return account


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

