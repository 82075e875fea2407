"""The model registry: its documents, and every change to a model's versions and aliases.

models/{name}                    the model: lineages (one MAJOR per base model), the run -> version map,
                                 the allocation order of versions, `aliases` ({staging, production} ->
                                 version) and `alias_history` ({alias: [{version, previous, at, actor,
                                 reason, op}]}, oldest first)
model_versions/{name}@{version}  one version: where its bundle is, its evaluation, `status` (unevaluated,
                                 evaluating, candidate, approved, promoted, quarantined, archived),
                                 `approval`, `history` ([{status, at, actor, reason, op, ...}], oldest
                                 first); while it waits for a verdict, `evaluation_request` (the
                                 TrainingCompleted that a re-evaluation publishes again); and the digests
                                 of its bucket copy: `adapter_files` ([{name, sha256, size}] of its
                                 adapter/… files) and `bundle_sha256` (of the bundle.json bytes), with
                                 `sealed` ({actor, at}) where an admin recorded them after registration

The digests are the trust boundary between the registry and the bucket: whoever may write the bucket
can rewrite an adapter and its bundle.json consistently, but not the registry's documents, so serving
and export check the bucket copy against these (shared/domain/model_export.fetch_adapter).

Versions are MAJOR.MINOR: the first fine-tune of a base model under a model name starts a new MAJOR,
every later one of that base adds a MINOR. `staging` points at the latest version that passed the
gate, `production` at the version that serves. A quarantined version is never promoted; an archived
one was superseded or retired and may come back by rollback. An `unevaluated` version is one whose
evaluation errored (an infrastructure fault, not a verdict): it has no bundle yet, and neither
moves an alias nor is approved or promoted until `reevaluate` (status `evaluating`) brings a verdict,
which registers it then as the gate decides.

People's operations (approve, promote, rollback, archive, quarantine) take the caller
(shared/domain/access.py): it must hold `approver` somewhere before anything is read, and `approver`
in a tenant that owns the model (its policy, shared/domain/model_policy.py) before anything is
written; where the policy asks for four eyes, the run's submitter may not approve or promote its own
version. The caller's subject is the actor recorded.

Each operation is one DocStore transaction over the model document and the version documents it
touches, then publishes its `models` events. The events are derived from the history entries the
operation wrote (tagged with the operation's `op`), never built alongside them: calling an operation
again whose effect is already there republishes exactly the ids of the first call, which is what a
caller retrying after a crash between the transaction and the publish needs.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Mapping

from shared.domain import events as ev
from shared.domain.access import AccessDenied, Caller, require
from shared.domain.model_policy import get_policy
from shared.domain.runs import RUNS
from shared.domain.tenants import DEFAULT_TENANT
from shared.platform.ports import ObjectNotFound
from shared.platform.runtime import publish_event
from shared.platform.storage import file_sha256

MODELS = "models"
MODEL_VERSIONS = "model_versions"
ALIASES = ev.ALIASES
PROMOTION_REASONS = ("gate", "approval", "manual", "rollback")
REGISTRATION_STATUSES = ("quarantined", "held", "candidate", "promoted", "archived")   # what registration_status returns
BUNDLE = "bundle.json"
ADAPTER_DIR = "adapter/"
# A version without a verdict: its evaluation errored (unevaluated) or is asked again (evaluating).
AWAITING_VERDICT = ("unevaluated", "evaluating")
# ...and one whose evidence could not decide (held: eval.on_inconclusive hold). None of them is
# approved, promoted or archived (an archived version may come back by promote, past the gate); each
# may be re-evaluated (`reevaluate`) or quarantined by hand.
UNDECIDED = (*AWAITING_VERDICT, "held")


class RegistryError(ValueError):
    """A registry operation that cannot be done: `status` 404 (no such model or version), 409 (not
    allowed in the version's state) or 400 (a bad argument); the message says what to do instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def version_id(name: str, version: str) -> str:
    return f"{name}@{version}"


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of "MAJOR.MINOR" (numeric: 1.10 comes after 1.9)."""
    return tuple(int(part) for part in version.split("."))


# ------------------------------------------------------------------ reads

def alias_version(docs, name: str, alias: str = "production") -> dict | None:
    """The version document `alias` points at for model `name`, or None."""
    version = ((docs.get(MODELS, name) or {}).get("aliases") or {}).get(alias)
    return docs.get(MODEL_VERSIONS, version_id(name, version)) if version else None


def _with_aliases(doc: dict, aliases: dict) -> dict:
    """The version as readers see it: with its aliases, and whether an approver may re-evaluate it."""
    return {**doc, "aliases": sorted(a for a, v in aliases.items() if v == doc["version"]),
            "reevaluable": reevaluable(doc)}


def _newest_first(versions: list[dict]) -> list[dict]:
    return sorted(versions, key=lambda v: version_key(v["version"]), reverse=True)


def list_models(docs) -> list[dict]:
    """Every model: `name`, `aliases`, `versions` (version strings, newest first) and `latest` (the
    newest version's document, or None while its first registration is unfinished)."""
    by_name: dict[str, list[dict]] = {}
    for _, doc in docs.query(MODEL_VERSIONS):
        by_name.setdefault(doc["name"], []).append(doc)
    out = []
    for _, model in sorted(docs.query(MODELS), key=lambda row: row[0]):
        aliases = model.get("aliases", {})
        versions = _newest_first(by_name.get(model["name"], []))
        out.append({"name": model["name"], "aliases": aliases, "versions": [v["version"] for v in versions],
                    "latest": _with_aliases(versions[0], aliases) if versions else None})
    return out


def get_model(docs, name: str) -> dict:
    """The model document plus `versions`: its version documents, newest first, each with `aliases`."""
    model = docs.get(MODELS, name)
    if model is None:
        raise _no_model(docs, name)
    aliases = model.get("aliases", {})
    versions = [doc for _, doc in docs.query(MODEL_VERSIONS, where=[("name", "==", name)])]
    return {**model, "versions": [_with_aliases(v, aliases) for v in _newest_first(versions)]}


def get_version(docs, name: str, version: str) -> dict:
    """One version document, with `aliases` (the aliases pointing at it)."""
    doc = docs.get(MODEL_VERSIONS, version_id(name, version))
    if doc is None:
        model = docs.get(MODELS, name)
        if model is None:
            raise _no_model(docs, name)
        raise _no_version(name, version, model)
    return _with_aliases(doc, (docs.get(MODELS, name) or {}).get("aliases", {}))


def read_bundle(store, doc: dict) -> dict:
    """A version's bundle.json (every part of it, with the files' hashes) and its MODEL_CARD.md, from
    the object store: `{"bundle": {...}, "model_card": "..."}`."""
    bucket, prefix = store.parse_url(doc["uri"])
    prefix = prefix.rstrip("/") + "/"
    return {"bundle": json.loads(store.read(bucket, prefix + "bundle.json")),
            "model_card": store.read(bucket, prefix + "MODEL_CARD.md").decode()}


def _no_model(docs, name: str) -> RegistryError:
    known = ", ".join(sorted(doc_id for doc_id, _ in docs.query(MODELS))) or "none yet"
    return RegistryError(404, f"no model {name!r}; registered models: {known} (`ftpipe models list`)")


def _no_version(name: str, version: str, model: dict) -> RegistryError:
    known = ", ".join(sorted(set(model.get("runs", {}).values()), key=version_key)) or "none yet"
    return RegistryError(404, f"model {name!r} has no version {version!r}; its versions: {known} "
                              f"(`ftpipe models show {name}`)")


# ------------------------------------------------------------------ one operation's documents

def _newer(model: dict, version: str, than: str | None) -> bool:
    """Whether `version` was allocated after `than` (None: nothing to compare with). Allocation
    order, not the numbers: 1.6 of an old base registered after 2.1 of a new one is the later run."""
    order = model.get("sequence", {})
    return than is None or order.get(version, 0) > order.get(than, 0)


class _Edit:
    """The documents one operation reads and changes inside its transaction, written back together."""

    def __init__(self, txn, name: str):
        self.txn, self.name = txn, name
        self.model = txn.get(MODELS, name)
        if self.model is None:
            raise RegistryError(404, f"no model {name!r} (`ftpipe models list` shows the registered models)")
        self.model.setdefault("aliases", {})
        self.model.setdefault("alias_history", {})
        self.versions: dict[str, dict] = {}
        self.now = time.time()

    def authorize(self, caller: Caller, doc: dict, *, to: str, own_work: bool = False) -> str:
        """Refuse a caller who is not an approver of a tenant that owns the model (or, for its own
        run's version under four eyes, the submitter); returns the actor to record."""
        policy = get_policy(self.txn, self.name)
        owners = list(policy.owners) if policy else [doc.get("tenant") or DEFAULT_TENANT]
        if not any(caller.may("approver", t) for t in owners):
            require(caller, "approver", owners[0], to=to)
        if own_work and policy is not None and policy.four_eyes:
            submitter = ((self.txn.get(RUNS, doc.get("run_id") or "-") or {}).get("source") or {}).get("by")
            if submitter == caller.subject:
                raise AccessDenied(403, f"to {to}: you submitted run {doc.get('run_id')}, and model {self.name}'s "
                                        "policy asks for four eyes; another approver of "
                                        f"{', '.join(owners)} must do it")
        return caller.subject

    def version(self, version: str) -> dict:
        if version not in self.versions:
            doc = self.txn.get(MODEL_VERSIONS, version_id(self.name, version))
            if doc is None:
                raise _no_version(self.name, version, self.model)
            self.versions[version] = doc
        return self.versions[version]

    def newer(self, version: str, than: str | None) -> bool:
        return _newer(self.model, version, than)

    def status(self, version: str, status: str, *, op: str, actor: str | None, reason: str, **extra) -> None:
        doc = self.version(version)
        doc["status"] = status
        doc.setdefault("history", []).append({"status": status, "at": self.now, "actor": actor, "reason": reason,
                                              "op": op, **extra})
        doc["updated_at"] = self.now

    def move(self, alias: str, version: str | None, *, op: str, actor: str | None, reason: str) -> None:
        """Point `alias` at `version` (None: take it away). Moving production promotes the version and
        archives the one it replaces."""
        previous = self.model["aliases"].get(alias)
        if version is None:
            self.model["aliases"].pop(alias, None)
        else:
            self.model["aliases"][alias] = version
        self.model["alias_history"].setdefault(alias, []).append(
            {"version": version, "previous": previous, "at": self.now, "actor": actor, "reason": reason, "op": op})
        if alias == "production" and version is not None:
            self.status(version, "promoted", op=op, actor=actor, reason=f"production ({reason})")
            if previous is not None and previous != version:
                verb = "rolled back to" if reason == "rollback" else "superseded by"
                self.status(previous, "archived", op=op, actor=actor, reason=f"{verb} {version} in production")

    def save(self) -> None:
        self.model["updated_at"] = self.now
        self.txn.set(MODELS, self.name, self.model)
        for version, doc in self.versions.items():
            self.txn.set(MODEL_VERSIONS, version_id(self.name, version), doc)

    def events(self, op: str, subject: str) -> list[ev.Event]:
        """The events of operation `op` on version `subject`, from the entries it wrote: the subject's
        status changes, then the alias moves, then what the moves archived."""
        out: list[ev.Event] = []
        subject_doc = self.version(subject)
        changes = [i for i, e in enumerate(subject_doc.get("history", [])) if e.get("op") == op]
        if _is_registration(op, subject) and changes:
            # A registration's status is where its entries left the version (candidate, then promoted).
            out.append(ev.ModelRegistered(run_id=subject_doc["run_id"], model_name=self.name, version=subject,
                                          uri=subject_doc["uri"], status=subject_doc["history"][changes[-1]]["status"],
                                          change=changes[0]))
        out += _status_events(self.name, subject_doc, op)
        displaced = []
        for alias in ALIASES:   # a fixed order: a document store need not keep a map's order
            for move, entry in enumerate(self.model["alias_history"].get(alias, []), start=1):
                if entry.get("op") != op:
                    continue
                if entry["version"] is not None:
                    doc = self.version(entry["version"])
                    change = next((i for i, e in enumerate(doc.get("history", [])) if alias == "production"
                                   and e.get("op") == op and e["status"] == "promoted"), None)
                    out.append(ev.ModelPromoted(
                        run_id=doc["run_id"], model_name=self.name, version=entry["version"], uri=doc["uri"],
                        alias=alias, previous_version=entry["previous"], reason=entry["reason"],
                        actor=entry["actor"], move=move, change=change))
                if entry["previous"] not in (None, subject, entry["version"]):
                    displaced.append(entry["previous"])
        for version in dict.fromkeys(displaced):
            out += _status_events(self.name, self.version(version), op)
        return out


def _status_events(name: str, doc: dict, op: str) -> list[ev.Event]:
    out: list[ev.Event] = []
    for change, entry in enumerate(doc.get("history", [])):
        if entry.get("op") != op:
            continue
        common = {"run_id": doc["run_id"], "model_name": name, "version": doc["version"], "uri": doc["uri"],
                  "change": change}
        if entry["status"] == "approved":
            out.append(ev.ModelApproved(**common, approver=entry["actor"], note=entry.get("note", "")))
        elif entry["status"] == "quarantined":
            out.append(ev.ModelQuarantined(**common, reasons=entry.get("reasons") or [entry["reason"]],
                                           actor=entry["actor"]))
        elif entry["status"] == "archived":
            out.append(ev.ModelArchived(**common, reason=entry["reason"], actor=entry["actor"]))
    return out


def _register_op(version: str) -> str:
    return f"register:{version}"


def _reregister_op(doc: dict) -> str:
    """The op of a registration after the first (a verdict, or an error, of a re-evaluation): it
    registers the version again, and its entries start at this index of the history."""
    return f"{_register_op(doc['version'])}-{len(doc.get('history', []))}"


def _is_registration(op: str, version: str) -> bool:
    return op == _register_op(version) or op.startswith(_register_op(version) + "-")


def _registration_op(doc: dict) -> str:
    """The op of the version's latest registration: what a redelivery republishes."""
    ops = [e["op"] for e in doc.get("history", []) if _is_registration(e.get("op", ""), doc["version"])]
    return ops[-1] if ops else _register_op(doc["version"])


def _last_op(edit: _Edit, version: str, status: str | None = None, alias: str | None = None) -> str:
    """The operation that last set `status` on `version`, or that last moved `alias` to it."""
    if alias is not None:
        entries = [e for e in edit.model["alias_history"].get(alias, []) if e["version"] == version]
    else:
        entries = [e for e in edit.version(version).get("history", []) if e["status"] == status]
    return entries[-1]["op"]


def _transact(docs, bus, fn):
    """Run fn(txn) -> (version doc, events, aliases) as one transaction, then publish the events."""
    doc, events, aliases = docs.transaction(fn)
    for event in events:
        publish_event(bus, event)
    return _with_aliases(doc, aliases)


# ------------------------------------------------------------------ registration (services/registry_fn)

def allocate_version(docs, name: str, run_id: str, base_model: str) -> str:
    """The version of `name` that run `run_id` (a fine-tune of `base_model`) registers as: the same
    one however often the run is redelivered. A base model new to the name starts a MAJOR."""
    def allocate(txn):
        now = time.time()
        doc = txn.get(MODELS, name) or {"name": name, "lineages": [], "runs": {}, "sequence": {}, "aliases": {},
                                        "alias_history": {}, "created_at": now}
        if run_id in doc["runs"]:
            return doc["runs"][run_id]
        lineage = next((line for line in doc["lineages"] if line["base_model"] == base_model), None)
        if lineage is None:
            lineage = {"major": len(doc["lineages"]) + 1, "base_model": base_model, "next_minor": 1}
            doc["lineages"].append(lineage)
        version = f"{lineage['major']}.{lineage['next_minor']}"
        lineage["next_minor"] += 1
        doc["runs"][run_id] = version
        doc["sequence"][version] = len(doc["sequence"]) + 1
        doc["updated_at"] = now
        txn.set(MODELS, name, doc)
        return version
    return docs.transaction(allocate)


def decided(doc: dict | None) -> bool:
    """Whether a version document holds a verdict of the gate (it exists and does not await one)."""
    return doc is not None and doc["status"] not in AWAITING_VERDICT


def registration_status(model: dict | None, version: str, *, passed: bool, approval: bool,
                        held: bool = False) -> str:
    """The status `version` registers with (see register_version), given the model document."""
    if held:
        return "held"
    if not passed:
        return "quarantined"
    if approval:
        return "candidate"
    production = ((model or {}).get("aliases") or {}).get("production")
    return "promoted" if _newer(model or {}, version, production) else "archived"


def register_version(docs, doc: dict, *, passed: bool, reasons: list[str], approval: bool, held: bool = False,
                     conclusive: bool = False, reevaluation: int = 0,
                     bundle_sha256: Mapping[str, str] | None = None) -> tuple[dict, list[ev.Event]]:
    """Record an evaluated version (`doc`: its document without status or history, with the digests
    of its adapter files in `adapter_files`; its bundle is already complete) and move the aliases the
    gate decides, in one transaction:

    - gate failed: `quarantined`, no alias moves (final when `conclusive`: failed on its intervals;
      a failure on point values may be re-evaluated);
    - evidence inconclusive under `hold`: `held`, no alias moves, re-evaluable;
    - passed, `approval`: `candidate`, staging moves to it, production waits for `approve`;
    - passed, no approval: `promoted`, staging and production move to it, the previous production
      version is archived;

    except that an alias never moves back to a version allocated before the one it points at (a
    redelivered evaluation of an earlier run must not undo a later one): such a passing version is
    registered `archived`. Registering a version with a verdict again changes nothing and returns the
    same events; a version that awaits one (`unevaluated`, `evaluating`) takes this one.

    The bundle names the status the version registered with, and only this transaction knows it:
    `bundle_sha256` maps each status it may choose (REGISTRATION_STATUSES) to the sha256 of the
    bundle.json registering with that status writes, and the one of the status chosen is recorded
    (`bundle_sha256` on the document). The caller then makes the bucket hold that bundle."""
    name, version = doc["name"], doc["version"]

    def register(txn):
        edit = _Edit(txn, name)
        existing = txn.get(MODEL_VERSIONS, version_id(name, version))
        # a verdict stands; so does a later evaluation's against an earlier one's redelivered
        if decided(existing) or (existing is not None and reevaluation < existing.get("reevaluations", 0)):
            edit.versions[version] = existing
            return existing, edit.events(_registration_op(existing), version), edit.model["aliases"]
        if existing is not None:   # its evaluation errored or was held, and now one has decided: registered again
            op = _reregister_op(existing)
            edit.versions[version] = {**existing, **doc, "approval_required": approval, "updated_at": edit.now}
            if passed:
                edit.versions[version].pop("evaluation_request", None)
        else:
            op = _register_op(version)
            edit.versions[version] = {**doc, "status": None, "history": [], "approval": None,
                                      "approval_required": approval, "registered_at": edit.now, "updated_at": edit.now}
        status = registration_status(edit.model, version, passed=passed, approval=approval, held=held)
        aliases = edit.model["aliases"]
        if status == "quarantined":
            edit.status(version, "quarantined", op=op, actor=None, reason="failed the gate",
                        reasons=list(reasons) or ["failed the gate"], conclusive=conclusive)
        elif status == "held":
            edit.status(version, "held", op=op, actor=None, reason="the evidence could not decide the gate",
                        reasons=list(reasons))
        else:
            edit.status(version, "candidate", op=op, actor=None, reason="passed the gate")
            if edit.newer(version, aliases.get("staging")):
                edit.move("staging", version, op=op, actor=None, reason="gate")
        if status == "promoted":
            edit.move("production", version, op=op, actor=None, reason="gate")
        elif status == "archived":
            edit.status(version, "archived", op=op, actor=None,
                        reason=f"a later version, {aliases['production']}, was in production already")
        edit.versions[version]["registered_status"] = status
        if bundle_sha256 is not None:
            edit.versions[version]["bundle_sha256"] = bundle_sha256[status]
        edit.save()
        return edit.versions[version], edit.events(op, version), edit.model["aliases"]

    stored, events, _ = docs.transaction(register)
    return stored, events


# ------------------------------------------------------------------ the bucket copy's digests

def bucket_digests(store, doc: dict) -> dict:
    """What version `doc`'s bucket copy holds now: `{"adapter_files": [{name, sha256, size}],
    "bundle_sha256"}`. RegistryError 409 where its bundle.json is missing or does not list exactly
    the adapter files found beside it, with their hashes (the copy is incomplete or inconsistent)."""
    bucket, prefix = store.parse_url(doc["uri"])
    prefix = prefix.rstrip("/") + "/"
    label = f"{doc['name']} {doc['version']}"
    try:
        raw = store.read(bucket, prefix + BUNDLE)
    except ObjectNotFound:
        raise RegistryError(409, f"{label} has no {BUNDLE} at {store.url(bucket, prefix + BUNDLE)}: its bucket copy "
                                 "is incomplete") from None
    listed = {f["name"]: f for f in json.loads(raw).get("files", []) if f["name"].startswith(ADAPTER_DIR)}
    found = []
    with tempfile.TemporaryDirectory(prefix="ftpipe-digest-") as tmp:
        for info in sorted(store.list(bucket, prefix + ADAPTER_DIR), key=lambda i: i.name):
            path = Path(tmp) / "object"
            store.download_file(bucket, info.name, str(path))
            found.append({"name": info.name[len(prefix):], "sha256": file_sha256(path), "size": path.stat().st_size})
    differ = sorted({f["name"] for f in found} ^ set(listed)) or [
        f["name"] for f in found if (f["sha256"], f["size"]) != (listed[f["name"]]["sha256"], listed[f["name"]]["size"])]
    if differ:
        raise RegistryError(409, f"{label}'s {BUNDLE} does not describe the adapter files beside it ({', '.join(differ)} "
                                 "differ or are missing on one side): its bucket copy was altered or is incomplete; "
                                 "restore it from a trusted copy (or retrain)")
    return {"adapter_files": found, "bundle_sha256": hashlib.sha256(raw).hexdigest()}


def seal(docs, store, name: str, version: str, *, caller: Caller) -> dict:
    """Record the digests of a version registered before the registry kept them (`adapter_files`,
    `bundle_sha256`), from its bucket copy as it is now, with who did it (`sealed`). For an admin who
    has checked that copy by hand: from then on serving and export use exactly these bytes. Digests
    once recorded are never replaced: sealing again changes nothing while the bucket matches them,
    and is refused when it does not (the copy was altered: restore it instead)."""
    require(caller, "admin", to=f"seal {name} {version}")
    actor = caller.subject
    current = get_version(docs, name, version)
    try:
        found = bucket_digests(store, current)
    except RegistryError:
        if not _recorded(current):
            raise
        found = None

    def run(txn):
        edit = _Edit(txn, name)
        doc = edit.version(version)
        if _recorded(doc):
            if _recorded(doc) != found:
                raise RegistryError(409, f"{name} {version}'s digests are recorded already and its bucket copy no longer "
                                         "matches them: it was altered after registration; restore the registered "
                                         "files rather than seal the altered ones")
            return doc, [], edit.model["aliases"]
        if found is None:   # digests recorded when read, gone in the transaction: they are never removed
            raise RegistryError(409, f"{name} {version}'s document changed while sealing; run it again")
        doc.update(found)
        doc["sealed"] = {"actor": actor, "at": edit.now}
        doc["updated_at"] = edit.now
        txn.set(MODEL_VERSIONS, version_id(name, version), doc)
        return doc, [], edit.model["aliases"]
    return _transact(docs, None, run)


def _recorded(doc: dict) -> dict | None:
    """The digests a version document holds, in bucket_digests' form, or None."""
    if not doc.get("bundle_sha256") or not doc.get("adapter_files"):
        return None
    return {"adapter_files": sorted(doc["adapter_files"], key=lambda f: f["name"]), "bundle_sha256": doc["bundle_sha256"]}


def register_unevaluated(docs, doc: dict, *, error: str, approval: bool, reevaluation: int = 0) -> tuple[dict, list[ev.Event]]:
    """Record a version whose evaluation errored (EvaluationErrored): `unevaluated`, no alias moves,
    no bundle yet; `doc` holds `evaluation_request`, the TrainingCompleted that `reevaluate` publishes
    again. An infrastructure fault is not a verdict, so the version is never quarantined for it.

    A version that exists already changes nothing (the same events again), except one `evaluating`
    whose re-evaluation `reevaluation` errored too: it goes back to `unevaluated`. A verdict stands,
    and an error of an earlier evaluation than the one asked for is stale."""
    name, version = doc["name"], doc["version"]

    def register(txn):
        edit = _Edit(txn, name)
        existing = txn.get(MODEL_VERSIONS, version_id(name, version))
        if existing is not None:
            edit.versions[version] = existing
            if existing["status"] != "evaluating" or reevaluation < existing.get("reevaluations", 0):
                return existing, edit.events(_registration_op(existing), version), edit.model["aliases"]
            op = _reregister_op(existing)
            existing.update(evaluation=doc["evaluation"], updated_at=edit.now)
        else:
            op = _register_op(version)
            edit.versions[version] = {**doc, "status": None, "history": [], "approval": None, "reevaluations": 0,
                                      "approval_required": approval, "registered_at": edit.now, "updated_at": edit.now}
        edit.status(version, "unevaluated", op=op, actor=None, reason=f"evaluation errored: {error}")
        edit.versions[version]["registered_status"] = "unevaluated"
        edit.save()
        return edit.versions[version], edit.events(op, version), edit.model["aliases"]

    stored, events, _ = docs.transaction(register)
    return stored, events


# ------------------------------------------------------------------ people's operations

def reevaluate(docs, bus, name: str, version: str, *, caller: Caller) -> dict:
    """Evaluate an `unevaluated` version again (its evaluation errored; the fault is fixed), or a `held`
    one (its evidence was inconclusive; the recipe's probe sets or the gate have grown since): it goes
    to `evaluating`, and its TrainingCompleted is published again with the re-evaluation's number,
    so the evaluator does not take it for a redelivery of the one it gave up on. The verdict
    registers the version as the gate decides (register_version); another error makes it
    `unevaluated` again. Asking again while `evaluating` republishes the same request. An approver's,
    of a tenant that owns the model."""
    to = f"re-evaluate {name} {version}"
    require(caller, "approver", to=to)

    def run(txn):
        edit = _Edit(txn, name)
        doc = edit.version(version)
        actor = edit.authorize(caller, doc, to=to)
        if doc["status"] == "evaluating":
            return doc, [_reevaluation(doc)], edit.model["aliases"]
        if not _awaits_or_may_retry(doc):
            raise RegistryError(409, f"{name} {version} is {doc['status']}: only an unevaluated version (its evaluation "
                                     "errored), a held one (its evidence was inconclusive) or one the gate quarantined "
                                     "on point values rather than significant evidence can be re-evaluated; a "
                                     "conclusive verdict of the gate, or a person's quarantine, is final")
        if "evaluation_request" not in doc:
            raise RegistryError(409, f"{name} {version} was registered before the registry kept its evaluation request: "
                                     "it cannot be re-evaluated; train the run again")
        doc["reevaluations"] = doc.get("reevaluations", 0) + 1
        edit.status(version, "evaluating", op=f"reevaluate:{version}-{doc['reevaluations']}", actor=actor,
                    reason=f"re-evaluation {doc['reevaluations']} asked for", reevaluation=doc["reevaluations"])
        edit.save()
        return doc, [_reevaluation(doc)], edit.model["aliases"]
    return _transact(docs, bus, run)


def reevaluable(doc: dict) -> bool:
    """Whether `reevaluate` takes this version: one without a verdict (unevaluated, held, evaluating)
    or quarantined by the gate on points, with its evaluation request kept."""
    return _awaits_or_may_retry(doc) and "evaluation_request" in doc


def _awaits_or_may_retry(doc: dict) -> bool:
    return doc["status"] in ("unevaluated", "held", "evaluating") or _gate_quarantine_on_points(doc)


def _gate_quarantine_on_points(doc: dict) -> bool:
    """Quarantined by the gate (not by a person) on a failure the evidence did not establish."""
    entry = (doc.get("history") or [{}])[-1]
    return (doc["status"] == "quarantined" and entry.get("status") == "quarantined" and entry.get("actor") is None
            and not entry.get("conclusive"))


def _reevaluation(doc: dict) -> ev.TrainingCompleted:
    return ev.TrainingCompleted(**{**doc["evaluation_request"], "reevaluation": doc["reevaluations"]})


def _unevaluated(name: str, version: str, doc: dict) -> str:
    """Why a version without a verdict cannot be approved, promoted or archived."""
    if doc["status"] == "held":
        return (f"{name} {version} is held: the evidence could not decide its gate ({_reason(doc)}); evaluate it "
                f"again on more probes (`ftpipe models reevaluate {name} {version}`), or quarantine it")
    if doc["status"] == "evaluating":
        return (f"{name} {version} is evaluating (asked again after its evaluation errored): the gate has not "
                f"decided yet; wait for the verdict (`ftpipe models reevaluate {name} {version}` asks again)")
    return (f"{name} {version} is unevaluated: its evaluation errored ({_reason(doc)}), so the gate has not "
            f"decided; once the fault is fixed, `ftpipe models reevaluate {name} {version}`")


def approve(docs, bus, name: str, version: str, *, caller: Caller, note: str = "") -> dict:
    """Approve a `candidate` (recipe `registry.approval`): it goes to production, unless a version
    allocated after it is there already (it stays `approved`; `promote` puts it there anyway)."""
    to = f"approve {name} {version}"
    require(caller, "approver", to=to)

    def run(txn):
        edit = _Edit(txn, name)
        doc = edit.version(version)
        approver = edit.authorize(caller, doc, to=to, own_work=True)
        op = f"approve:{version}"
        if doc.get("approval"):
            return doc, edit.events(op, version), edit.model["aliases"]
        if doc["status"] != "candidate":
            raise RegistryError(409, _not_approvable(name, version, doc))
        edit.status(version, "approved", op=op, actor=approver, reason="approved", note=note)
        doc["approval"] = {"approver": approver, "note": note, "at": edit.now}
        if edit.newer(version, edit.model["aliases"].get("production")):
            edit.move("production", version, op=op, actor=approver, reason="approval")
        edit.save()
        return doc, edit.events(op, version), edit.model["aliases"]
    return _transact(docs, bus, run)


def _not_approvable(name: str, version: str, doc: dict) -> str:
    status = doc["status"]
    if status in UNDECIDED:
        return _unevaluated(name, version, doc)
    if status == "quarantined":
        return (f"{name} {version} is quarantined ({_reason(doc)}): quarantined versions are never promoted; "
                "fix the cause and train a new run")
    if not doc.get("approval_required"):
        return (f"{name} {version} does not wait for approval (its recipe has no registry.approval; status "
                f"{status}); use `ftpipe models promote {name} {version}` to put it in production")
    return f"{name} {version} is {status}, not a candidate waiting for approval"


def promote(docs, bus, name: str, version: str, *, alias: str = "production", caller: Caller,
            reason: str = "manual") -> dict:
    """Point `alias` at `version`. Production needs a version that is not quarantined and, where its
    recipe asks for approval, approved; the version it replaces is archived."""
    to = f"promote {name} {version} to {alias}"
    require(caller, "approver", to=to)
    _check_alias(alias)
    if reason not in PROMOTION_REASONS:
        raise RegistryError(400, f"promotion reason {reason!r}: one of {', '.join(PROMOTION_REASONS)}")

    def run(txn):
        edit = _Edit(txn, name)
        doc = edit.version(version)
        actor = edit.authorize(caller, doc, to=to, own_work=alias == "production")
        if edit.model["aliases"].get(alias) == version:
            return doc, edit.events(_last_op(edit, version, alias=alias), version), edit.model["aliases"]
        _check_promotable(name, version, doc, alias)
        op = f"{alias}-{len(edit.model['alias_history'].get(alias, [])) + 1}"
        edit.move(alias, version, op=op, actor=actor, reason=reason)
        edit.save()
        return doc, edit.events(op, version), edit.model["aliases"]
    return _transact(docs, bus, run)


def _check_alias(alias: str) -> None:
    if alias not in ALIASES:
        raise RegistryError(400, f"unknown alias {alias!r}; aliases: {', '.join(ALIASES)}")


def _check_promotable(name: str, version: str, doc: dict, alias: str) -> None:
    if doc["status"] in UNDECIDED:
        raise RegistryError(409, _unevaluated(name, version, doc))
    if doc["status"] == "quarantined":
        raise RegistryError(409, f"{name} {version} is quarantined ({_reason(doc)}): quarantined versions are never "
                                 "promoted; fix the cause and train a new run")
    if alias == "production" and doc.get("approval_required") and not doc.get("approval"):
        raise RegistryError(409, f"{name} {version} waits for approval (its recipe sets registry.approval): approve "
                                 f"it first with `ftpipe models approve {name} {version}`")


def _reason(doc: dict) -> str:
    entry = (doc.get("history") or [{}])[-1]
    return "; ".join(entry.get("reasons") or [entry.get("reason") or "no reason recorded"])


def rollback(docs, bus, name: str, *, alias: str = "production", to: str | None = None, caller: Caller) -> dict:
    """Point `alias` back at the version it pointed at before the current one (skipping quarantined
    ones), or at `to`. Returns the version it now points at."""
    what = f"roll back {name} {alias}"
    require(caller, "approver", to=what)
    _check_alias(alias)

    def run(txn):
        edit = _Edit(txn, name)
        current = edit.model["aliases"].get(alias)
        if current is None:
            edit.authorize(caller, {}, to=what)
            raise RegistryError(409, f"{name} has no {alias} version: nothing to roll back")
        actor = edit.authorize(caller, edit.version(current), to=what)
        target = to if to is not None else _previous(edit, alias, current)
        doc = edit.version(target)
        if target == current:
            return doc, edit.events(_last_op(edit, target, alias=alias), target), edit.model["aliases"]
        _check_promotable(name, target, doc, alias)
        op = f"{alias}-{len(edit.model['alias_history'][alias]) + 1}"
        edit.move(alias, target, op=op, actor=actor, reason="rollback")
        edit.save()
        return doc, edit.events(op, target), edit.model["aliases"]
    return _transact(docs, bus, run)


def _previous(edit: _Edit, alias: str, current: str) -> str:
    """The version `alias` pointed at before `current`: its history replayed as a stack, where a
    rollback returns to an earlier entry and a version taken away leaves it."""
    stack: list[str] = []
    for entry in edit.model["alias_history"].get(alias, []):
        if entry["version"] is None:
            stack = [v for v in stack if v != entry["previous"]]
        elif entry["reason"] == "rollback" and entry["version"] in stack:
            del stack[stack.index(entry["version"]) + 1:]
        else:
            stack.append(entry["version"])
    for version in reversed(stack):
        if version != current and edit.version(version)["status"] != "quarantined":
            return version
    raise RegistryError(409, f"{edit.name} {alias} has no earlier version to roll back to (it is {current}); "
                             f"name one with `ftpipe models rollback {edit.name} --to VERSION`")


def archive(docs, bus, name: str, version: str, *, caller: Caller, reason: str) -> dict:
    """Retire a version (it may come back by rollback or promote). Not the production version; a
    staging alias pointing at it is taken away."""
    return _retire(docs, bus, name, version, "archived", caller=caller, reason=reason)


def quarantine(docs, bus, name: str, version: str, *, caller: Caller, reason: str) -> dict:
    """Bar a version for good: it is never promoted or served again. Not the production version (roll
    back first); a staging alias pointing at it is taken away."""
    return _retire(docs, bus, name, version, "quarantined", caller=caller, reason=reason)


def _retire(docs, bus, name: str, version: str, status: str, *, caller: Caller, reason: str) -> dict:
    verb = "archive" if status == "archived" else "quarantine"
    require(caller, "approver", to=f"{verb} {name} {version}")
    if not reason or not reason.strip():
        raise RegistryError(400, f"say why you {verb} {name} {version} (a reason is required)")

    def run(txn):
        edit = _Edit(txn, name)
        doc = edit.version(version)
        actor = edit.authorize(caller, doc, to=f"{verb} {name} {version}")
        staging = edit.model["aliases"].get("staging") == version
        if doc["status"] == status and not staging:  # e.g. archived when production moved on: done already
            return doc, edit.events(_last_op(edit, version, status), version), edit.model["aliases"]
        if doc["status"] == "quarantined":
            raise RegistryError(409, f"{name} {version} is quarantined ({_reason(doc)}), which is final")
        if status == "archived" and doc["status"] in UNDECIDED:
            # An archived version may come back by promote, which must not skip the gate.
            raise RegistryError(409, f"{_unevaluated(name, version, doc)}; or quarantine it to bar it for good")
        if edit.model["aliases"].get("production") == version:
            raise RegistryError(409, f"{name} {version} is in production: roll back (`ftpipe models rollback {name}`) "
                                     f"or promote another version first, then {verb} it")
        op = f"{verb}:{version}-{len(doc.get('history', []))}"
        extra = {"reasons": [reason]} if status == "quarantined" else {}
        edit.status(version, status, op=op, actor=actor, reason=reason, **extra)
        if staging:
            edit.move("staging", None, op=op, actor=actor, reason=verb)
        edit.save()
        return doc, edit.events(op, version), edit.model["aliases"]
    return _transact(docs, bus, run)
