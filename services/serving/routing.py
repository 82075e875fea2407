"""Which registered version a request's `model` names, and who may be served what.

    support-bot@1.2          that version
    support-bot@staging      the version an alias points at (staging, production)
    support-bot              production, unless an A/B split is configured for the name
    <base model reference>   the base model itself, without an adapter

A split (`support-bot=production:90,staging:10`) shares a name's traffic between arms (versions or
aliases) by weight. Each user key (the OpenAI `user` field, or the X-FTPIPE-User header) is assigned
by weighted rendezvous hashing: every arm scores the key with a hash, the best score wins. The same
key always lands on the same arm, in every replica; removing an arm (its version quarantined) moves
only that arm's users; and each arm's share of keys is its weight over the total.

The registry is the source of truth: a name's model and version documents are read once and kept
until a `models` event about the name invalidates them (services/serving/service.py).
"""
from __future__ import annotations

import hashlib
import math
import re
import threading
import uuid
from dataclasses import dataclass

from shared.domain import model_registry as reg

SERVABLE = ("candidate", "approved", "promoted")
UNKNOWN = "unknown"   # the metric label of a model or version that the registry does not know
_VERSION = re.compile(r"\d+\.\d+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ServingError(Exception):
    """A request that cannot be served: `status` (HTTP), `code` (OpenAI-style error code) and a
    message that says what to do instead."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True)
class Target:
    """What one request runs on: a registered version's adapter, or (version None) the base model."""
    name: str
    version: str | None = None
    doc: dict | None = None
    arm: str | None = None            # the split arm that chose it, if a split did

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @property
    def key(self) -> tuple[str, str] | None:
        return None if self.version is None else (self.name, self.version)


# ------------------------------------------------------------------ splits

def parse_split(text: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """`NAME=ARM:WEIGHT,ARM:WEIGHT` (an arm is a version or an alias) -> (name, arms)."""
    name, sep, rest = text.partition("=")
    how = "write a split as NAME=ARM:WEIGHT,ARM:WEIGHT, e.g. support-bot=production:90,staging:10"
    if not sep or not _NAME.fullmatch(name.strip()):
        raise ValueError(f"split {text!r}: {how}")
    arms = []
    for part in rest.split(","):
        arm, sep, weight = part.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not (arm in reg.ALIASES or _VERSION.fullmatch(arm)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"split {text!r}: arm {part.strip()!r} must be VERSION:WEIGHT or ALIAS:WEIGHT "
                             f"(aliases: {', '.join(reg.ALIASES)}; weight > 0); {how}")
        arms.append((arm, value))
    if len({arm for arm, _ in arms}) != len(arms):
        raise ValueError(f"split {text!r} names an arm twice; {how}")
    return name.strip(), tuple(arms)


def _unit(*parts: str) -> float:
    """A hash of the parts as a number in (0, 1), the same in every process."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2.0 ** 64


def rank_arms(name: str, arms: tuple[tuple[str, float], ...], user_key: str) -> list[str]:
    """The arms in the order they claim `user_key` (weighted rendezvous hashing: the score -ln(u)/w
    of an arm is exponentially distributed with rate w, so the lowest is arm i with probability
    w_i / sum(w)). The first servable one serves the user."""
    return sorted((arm for arm, _ in arms),
                  key=lambda arm: -math.log(_unit(name, arm, user_key)) / dict(arms)[arm])


# ------------------------------------------------------------------ the registry's view

class RegistryView:
    """Model and version documents by name, read on first use and kept until invalidated."""

    def __init__(self, docs):
        self.docs = docs
        self._models: dict[str, dict] = {}
        self._lock = threading.Lock()

    def model(self, name: str) -> dict:
        with self._lock:
            cached = self._models.get(name)
        if cached is not None:
            return cached
        try:
            model = reg.get_model(self.docs, name)
        except reg.RegistryError as exc:
            raise ServingError(404, "model_not_found", f"{exc}; GET /v1/models lists what this server serves",
                               "model") from None
        with self._lock:
            self._models[name] = model
        return model

    def known(self, name: str) -> dict | None:
        """The model `name` if the registry has it (cached, or read and cached), else None: one
        document read for a name it does not have, and nothing kept of that name."""
        with self._lock:
            cached = self._models.get(name)
        if cached is not None or self.docs.get(reg.MODELS, name) is None:
            return cached
        try:
            return self.model(name)
        except ServingError:
            return None

    def invalidate(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)


class Router:
    """Turns a request's `model` (and user key) into a Target, or a ServingError saying why not."""

    def __init__(self, view: RegistryView, base_ref: str, base_sha256: str | None,
                 splits: dict[str, tuple[tuple[str, float], ...]] | None = None):
        self.view, self.base_ref, self.base_sha256 = view, base_ref, base_sha256
        self.splits = dict(splits or {})

    def resolve(self, model: str, user_key: str | None = None) -> Target:
        if model == self.base_ref:
            return Target(self.base_ref)
        name, _, selector = model.partition("@")
        if not _NAME.fullmatch(name):
            raise ServingError(404, "model_not_found", f"model {model!r}: name a registered model as NAME, "
                               "NAME@VERSION or NAME@ALIAS, or the base model; GET /v1/models lists them", "model")
        if selector or name not in self.splits:
            return self.version(name, selector or "production")
        key = user_key or uuid.uuid4().hex   # no key: a fresh one, so the request lands by weight, not sticky
        first_error = None
        for arm in rank_arms(name, self.splits[name], key):
            try:
                target = self.version(name, arm)
            except ServingError as exc:   # an arm that cannot serve (quarantined, no such alias): the next one
                first_error = first_error or exc
                continue
            return Target(target.name, target.version, target.doc, arm=arm)
        raise first_error

    def metric_labels(self, model: str) -> tuple[str, str]:
        """The (model, version) metric labels of a request that asked for `model` and was refused
        before it had a Target: only names and versions the registry (or this server) knows, else
        UNKNOWN, so that requests naming anything at all cannot add label values without bound.
        The version label is the version or alias asked for, "" when none was."""
        if model == self.base_ref:
            return self.base_ref, "base"
        name, _, selector = model.partition("@")
        if not _NAME.fullmatch(name):
            return UNKNOWN, UNKNOWN
        found = self.view.known(name)
        if found is None:
            return (name, selector if selector in ("", *reg.ALIASES) else UNKNOWN) if name in self.splits \
                else (UNKNOWN, UNKNOWN)
        known = ("", *reg.ALIASES, *(v["version"] for v in found["versions"]))
        return name, selector if selector in known else UNKNOWN

    def version(self, name: str, selector: str) -> Target:
        """The servable version `selector` (a version or an alias) of model `name`."""
        model = self.view.model(name)
        if selector in reg.ALIASES:
            version = model.get("aliases", {}).get(selector)
            if version is None:
                raise ServingError(404, "model_not_found", f"{name} has no {selector} version yet; name a version "
                                   f"({', '.join(v['version'] for v in model['versions']) or 'none registered'})",
                                   "model")
        elif _VERSION.fullmatch(selector):
            version = selector
        else:
            raise ServingError(404, "model_not_found", f"{name}@{selector}: after '@' comes a version (MAJOR.MINOR) "
                               f"or an alias ({', '.join(reg.ALIASES)})", "model")
        doc = next((v for v in model["versions"] if v["version"] == version), None)
        if doc is None:
            known = ", ".join(v["version"] for v in model["versions"]) or "none"
            raise ServingError(404, "model_not_found", f"{name} has no version {version}; its versions: {known}",
                               "model")
        check_servable(doc, self.base_ref, self.base_sha256)
        return Target(name, version, doc)


def check_servable(doc: dict, base_ref: str, base_sha256: str | None) -> None:
    """Raise ServingError unless version `doc` may be served by a server of base model `base_ref`."""
    label, status = f"{doc['name']}@{doc['version']}", doc.get("status")
    if status == "quarantined":
        entry = (doc.get("history") or [{}])[-1]
        why = "; ".join(entry.get("reasons") or [entry.get("reason") or "no reason recorded"])
        raise ServingError(403, "model_quarantined", f"{label} is quarantined ({why}): quarantined versions are "
                           "never served; use another version or the production alias", "model")
    if status not in SERVABLE:
        raise ServingError(404, "model_not_servable", f"{label} is {status}: only candidate, approved and promoted "
                           f"versions are served; `ftpipe models promote {doc['name']} {doc['version']}` (or "
                           "rollback) brings an archived version back", "model")
    if doc.get("base_model") != base_ref:
        raise ServingError(404, "model_not_found", f"{label} is a fine-tune of {doc.get('base_model')!r}, and this "
                           f"server serves adapters of {base_ref!r}: start `ftpipe serve --base "
                           f"{doc.get('base_model')}` for it", "model")
    if base_sha256 and doc.get("base_model_sha256") and doc["base_model_sha256"] != base_sha256:
        raise ServingError(409, "base_model_mismatch", f"{label} was trained on other weights of {base_ref!r} "
                           f"(sha256 {doc['base_model_sha256'][:12]}…, this server's {base_sha256[:12]}…): its "
                           "outputs would be silently wrong; serve it on the weights it was trained on", "model")
