"""Who may do what: the one authorization module behind the tracker's API and dashboard, the
registry's approval function, serving and the CLI (docs/DESIGN.md "Roles").

Roles: `viewer`, `submitter` and `approver` are held per tenant; `admin` over everything. A submitter
or an approver of a tenant also views it; submitter and approver are separate so that a run's
submitter can be kept from approving its own version (four-eyes, shared/domain/model_policy.py).

A caller's roles live in `principals/{subject}` ({admin, grants: {tenant: [role, ...]}, history}),
changed only by an admin (`ftpipe roles grant|revoke`, `ftpipe tokens create NAME --role R --tenant
T`). The break-glass admins come from the settings, where no document writer can add themselves:
`FTPIPE_ADMINS` (emails) in the cloud, and the stack's own token (`token:stack`, whoever owns the state
folder) locally.

Every check happens before the target is looked up (`require_any`: the role in some tenant), then
again once the target's tenant is known (`require`), before anything is written. Refusals are
`AccessDenied` (401 / 403) and say which role in which tenant is missing and who grants it.
"""
from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Mapping

from shared.platform.auth import STACK_SUBJECT, TOKENS, Identity, token_digest
from shared.platform.ports import DocStore
from shared.platform.push import AuthError

ROLES = ("viewer", "submitter", "approver", "admin")
TENANT_ROLES = ROLES[:3]
PRINCIPALS = "principals"
TOKEN_NAMES = "token_names"   # token_names/{name}: {digest}; a name is taken once (create is atomic)
TOKEN_PREFIX = "ftp_"
_TOKEN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# What each held role also lets one do.
_IMPLIES = {"viewer": {"viewer"}, "submitter": {"submitter", "viewer"}, "approver": {"approver", "viewer"}}


class AccessDenied(AuthError):
    """The caller lacks a role; `reason` says which, where, and who can grant it."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller and what it holds. A door (a bucket prefix or a job topic that an admin
    mapped to a tenant) acts as a submitter of that tenant and nothing more: `door` says which."""
    subject: str
    admin: bool = False
    grants: Mapping[str, frozenset[str]] = field(default_factory=dict)
    via: str = "token"
    door: str | None = None

    @classmethod
    def for_door(cls, tenant: str, where: str) -> "Caller":
        return cls(subject=f"door:{where}", grants={tenant: frozenset({"submitter"})}, via="door", door=where)

    def may(self, role: str, tenant: str | None = None) -> bool:
        """Holds `role` in `tenant` (None: in some tenant)."""
        if self.admin:
            return True
        if role == "admin":
            return False
        held = self.grants.items() if tenant is None else [(tenant, self.grants.get(tenant, frozenset()))]
        return any(role in _IMPLIES[r] for _, roles in held for r in roles if r in _IMPLIES)

    def tenants(self, role: str = "viewer") -> list[str] | None:
        """The tenants where the caller holds `role`; None means every tenant (an admin)."""
        if self.admin:
            return None
        return sorted(t for t in self.grants if self.may(role, t))

    def describe(self) -> str:
        if self.admin:
            return f"{self.subject} (admin)"
        held = "; ".join(f"{', '.join(sorted(r))} in {t}" for t, r in sorted(self.grants.items()) if r)
        return f"{self.subject} ({held or 'no roles'})"

    def public(self) -> dict:
        return {"subject": self.subject, "via": self.via, "admin": self.admin,
                "grants": {t: sorted(r) for t, r in sorted(self.grants.items())}}


def caller_of(docs: DocStore, identity: Identity, admins: tuple[str, ...] = ()) -> Caller:
    """The roles of an authenticated identity: its `principals` document, plus admin for the
    settings' break-glass subjects (and the local stack's own token)."""
    doc = docs.get(PRINCIPALS, identity.subject) or {}
    admin = bool(doc.get("admin")) or identity.subject in admins or identity.subject == STACK_SUBJECT
    grants = {t: frozenset(r) for t, r in (doc.get("grants") or {}).items()}
    return Caller(subject=identity.subject, admin=admin, grants=grants, via=identity.via)


def _grant_hint(caller: Caller, role: str, tenant: str | None) -> str:
    if role == "admin":
        return f"an admin makes another admin with `ftpipe roles grant {caller.subject} --role admin`"
    return (f"an admin grants it with `ftpipe roles grant {caller.subject} --role {role} --tenant "
            f"{tenant or 'TENANT'}`")


def require(caller: Caller | None, role: str, tenant: str | None = None, *, to: str) -> Caller:
    """Refuse unless the caller holds `role` in `tenant` (None: in some tenant). `to` says what was
    asked ("approve support-bot 1.2"), for the message."""
    if caller is None:
        raise AccessDenied(401, f"to {to} you must sign in (a bearer token or an identity-aware proxy)")
    if caller.may(role, tenant):
        return caller
    where = "" if role == "admin" else (f" in tenant {tenant}" if tenant else " in some tenant") + " (or admin)"
    raise AccessDenied(403, f"to {to} you need {role}{where}; you are {caller.describe()}; "
                            + _grant_hint(caller, role, tenant))


def check_role(role: str, tenant: str | None) -> None:
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    if role == "admin" and tenant:
        raise ValueError("admin is over every tenant: grant it without --tenant")
    if role != "admin" and not tenant:
        raise ValueError(f"{role} is held per tenant: say which with --tenant T")


def grant(docs: DocStore, caller: Caller, subject: str, role: str, tenant: str | None = None) -> dict:
    """Give `subject` (an email, a service account, or token:NAME) `role` (in `tenant`)."""
    require(caller, "admin", to=f"grant {role}")
    check_role(role, tenant)
    return _change(docs, caller, subject, "grant", role, tenant)


def revoke(docs: DocStore, caller: Caller, subject: str, role: str, tenant: str | None = None) -> dict:
    require(caller, "admin", to=f"revoke {role}")
    check_role(role, tenant)
    return _change(docs, caller, subject, "revoke", role, tenant)


def _change(docs: DocStore, caller: Caller, subject: str, op: str, role: str, tenant: str | None) -> dict:
    if not subject or "/" in subject:
        raise ValueError(f"subject {subject!r}: an email, a service account's email, or token:NAME")

    def edit(txn):
        doc = txn.get(PRINCIPALS, subject) or {"admin": False, "grants": {}, "history": []}
        if role == "admin":
            doc["admin"] = op == "grant"
        else:
            roles = set(doc["grants"].get(tenant, []))
            roles = roles | {role} if op == "grant" else roles - {role}
            if roles:
                doc["grants"][tenant] = sorted(roles)
            else:
                doc["grants"].pop(tenant, None)
        doc["history"] = (doc.get("history") or [])[-99:] + [
            {"op": op, "role": role, "tenant": tenant, "by": caller.subject, "at": time.time()}]
        txn.set(PRINCIPALS, subject, doc)
        return doc
    return docs.transaction(edit)


def list_principals(docs: DocStore, caller: Caller) -> list[dict]:
    require(caller, "admin", to="list who holds which role")
    return [{"subject": s, "admin": bool(d.get("admin")), "grants": d.get("grants") or {}}
            for s, d in docs.query(PRINCIPALS)]


def create_token(docs: DocStore, caller: Caller, name: str, role: str, tenant: str | None = None) -> str:
    """A new named token holding `role` (in `tenant`); returns the secret, shown once and stored
    only as its digest."""
    require(caller, "admin", to="create a token")
    if not _TOKEN_NAME.fullmatch(name) or name == "stack":
        raise ValueError(f"token name {name!r}: 1-63 of a-z 0-9 _ -, starting with a letter or digit (not 'stack')")
    check_role(role, tenant)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    digest = token_digest(secret)
    if not docs.create(TOKEN_NAMES, name, {"digest": digest, "created_at": time.time(), "by": caller.subject}):
        raise ValueError(f"a token named {name!r} exists: revoke it first (`ftpipe tokens revoke {name}`) or pick "
                         "another name")
    docs.set(TOKENS, digest, {"name": name, "subject": f"token:{name}", "created_at": time.time(),
                              "created_by": caller.subject})
    _change(docs, caller, f"token:{name}", "grant", role, tenant)
    return secret


def revoke_token(docs: DocStore, caller: Caller, name: str) -> None:
    """The token stops working at once (its digest document goes); its roles are dropped."""
    require(caller, "admin", to="revoke a token")
    entry = docs.get(TOKEN_NAMES, name)
    if entry is None:
        raise LookupError(f"no token named {name!r}; `ftpipe tokens list` shows them")
    docs.delete(TOKENS, entry["digest"])
    docs.delete(PRINCIPALS, f"token:{name}")
    docs.delete(TOKEN_NAMES, name)


def list_tokens(docs: DocStore, caller: Caller) -> list[dict]:
    require(caller, "admin", to="list tokens")
    out = []
    for name, entry in docs.query(TOKEN_NAMES):
        grants = (docs.get(PRINCIPALS, f"token:{name}") or {})
        out.append({"name": name, "subject": f"token:{name}", "created_at": entry.get("created_at"),
                    "created_by": entry.get("by"), "admin": bool(grants.get("admin")),
                    "grants": grants.get("grants") or {}})
    return out


def serving_authenticator(authenticate, docs: DocStore, *, admins: tuple[str, ...] = (),
                          allowed: tuple[str, ...] | None = None):
    """Who may call the serving API: in the cloud (`allowed` given) only the listed service accounts
    and people (FTPIPE_SERVING_CALLERS; an empty list lets no one in, never everyone), and admins;
    locally a token with at least `viewer`. Returns a headers -> Caller function."""
    def check(headers) -> Caller:
        caller = caller_of(docs, authenticate(headers), admins)
        if allowed is not None:
            if caller.admin or caller.subject in allowed:
                return caller
            raise AccessDenied(403, f"{caller.subject} may not call this serving API: only the callers in "
                                    "FTPIPE_SERVING_CALLERS (infra/terraform var.serving_callers) may")
        return require(caller, "viewer", to="call the serving API")
    return check
