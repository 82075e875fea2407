"""Who is calling an HTTP endpoint people use (the tracker's dashboard and API, the registry's
approval function, serving): one `Authenticator` per process, chosen once from the settings. What
the caller may do is decided by shared/domain/access.py from the `Identity` returned here.

Locally (profiles local and emulators) the caller shows a bearer token: a named one from `ftpipe
tokens create` (stored as its SHA-256 in `tokens/{digest}`, never in the clear), or the stack's own,
which `local_token` generates into the state folder (`<state>/auth-token`, readable by its owner only)
and which is the stack's first admin (`token:stack`); `ftpipe dashboard` prints a link that carries it. In the gcp profile people reach the dashboard through
Identity-Aware Proxy, which signs every request it lets through (`X-Goog-IAP-JWT-Assertion`), and
the approval function through IAM, which passes the caller's Google ID token on; both are verified
here again, so a misconfigured ingress does not open the writes to everyone.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from shared.platform.push import GOOGLE_CERTS_URL, AuthError, OidcVerifier

TOKEN_FILE = "auth-token"
IAP_CERTS_URL = "https://www.gstatic.com/iap/verify/public_key"
IAP_ISSUER = "https://cloud.google.com/iap"
IAP_HEADER = "X-Goog-IAP-JWT-Assertion"
TOKENS = "tokens"            # tokens/{sha256 of the secret}: {name, subject, created_at, created_by}
STACK_SUBJECT = "token:stack"  # the owner of the state folder's auth-token: the local stack's admin


@dataclass(frozen=True)
class Identity:
    """Who made a request: `subject` ("token:NAME" locally, the verified email in the cloud) is the
    actor recorded in every change (approvals, sign-offs, promotions, submissions)."""
    subject: str
    via: str  # "token" | "iap" | "oidc"


def token_digest(secret: str) -> str:
    """Tokens are 256-bit random secrets, so one SHA-256 is enough to store them (no salt or
    stretching needed, unlike passwords); the digest is the document id, so a lookup is one read."""
    return hashlib.sha256(secret.encode()).hexdigest()


Authenticator = Callable[[Mapping[str, str]], Identity]  # request headers -> Identity, or AuthError


def local_token(state_dir: Path) -> str:
    """The state folder's bearer token, created on first use (mode 0600; a concurrent creator's
    token wins, so every process of one stack agrees). It is written whole under a temporary name
    and linked into place, so a process starting beside its creator never reads it half written."""
    path = Path(state_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process's token is there already: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    token = path.read_text().strip()
    if not token:
        raise AuthError(500, f"{path} is empty: delete it and restart the stack to generate a new token")
    return token


def _bearer(headers: Mapping[str, str]) -> str:
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "missing 'Authorization: Bearer <token>' header: the local token is in "
                             "<state>/auth-token (`ftpipe dashboard` prints a link that carries it)")
    return token.strip()


def token_authenticator(docs, stack_secret: str | None = None) -> Authenticator:
    """Named local tokens: the bearer's digest must be a token that was issued and not revoked; the
    stack's own (`stack_secret`, from <state>/auth-token: a regenerated file voids the old one) is
    `token:stack`. Only digests are compared, so there is no timing oracle on a secret, and nothing is
    written: a process with read-only documents (serving) authenticates the same way."""
    stack = token_digest(stack_secret) if stack_secret else None

    def check(headers: Mapping[str, str]) -> Identity:
        digest = token_digest(_bearer(headers))
        if stack is not None and hmac.compare_digest(digest, stack):
            return Identity(subject=STACK_SUBJECT, via="token")
        doc = docs.get(TOKENS, digest)
        if doc is None:
            raise AuthError(401, "unknown or revoked bearer token: use one from `ftpipe tokens create` or the "
                                 "stack's own in <state>/auth-token")
        return Identity(subject=doc["subject"], via="token")
    return check


def iap_authenticator(audience: str, *, certs_url: str = IAP_CERTS_URL, request=None) -> Authenticator:
    """Requests that came through IAP: its signed header, for this backend's audience
    (`/projects/NUMBER/global/backendServices/ID`, or `/projects/NUMBER/apps/PROJECT` for App Engine)."""
    if not audience:
        raise ValueError("the dashboard behind IAP needs its audience: set FTPIPE_DASHBOARD_AUDIENCE to the "
                         "backend service's '/projects/NUMBER/global/backendServices/ID'")
    import google.auth.transport.requests

    request = request or google.auth.transport.requests.Request()

    def check(headers: Mapping[str, str]) -> Identity:
        from google.auth import exceptions
        from google.oauth2 import id_token

        assertion = headers.get(IAP_HEADER)
        if not assertion:
            raise AuthError(401, f"missing {IAP_HEADER}: the dashboard must be reached through Identity-Aware Proxy")
        try:
            claims = id_token.verify_token(assertion, request, audience=audience, certs_url=certs_url)
        except exceptions.TransportError as exc:
            raise AuthError(503, f"could not fetch IAP's signing keys: {exc}") from exc
        except (ValueError, exceptions.GoogleAuthError) as exc:
            raise AuthError(401, f"invalid IAP assertion: {exc}") from exc
        if claims.get("iss") != IAP_ISSUER:
            raise AuthError(401, f"invalid IAP assertion: issuer {claims.get('iss')!r} is not {IAP_ISSUER}")
        return Identity(subject=claims.get("email") or claims.get("sub", "unknown"), via="iap")
    return check


def oidc_authenticator(audience: str, *, certs_url: str = GOOGLE_CERTS_URL, request=None) -> Authenticator:
    """A Google ID token for `audience` (the function's or service's URL) with a verified email: the
    caller's roles (shared/domain/access.py) then say what that email may do."""
    verify = OidcVerifier(audience, certs_url=certs_url, request=request)

    def check(headers: Mapping[str, str]) -> Identity:
        claims = verify(headers.get("Authorization"))
        email = claims.get("email")
        if not email or claims.get("email_verified") is not True:
            raise AuthError(401, "the ID token carries no verified email: mint it for a user or service account "
                                 "(`gcloud auth print-identity-token --audiences=URL`)")
        return Identity(subject=email, via="oidc")
    return check


def authenticator(settings, docs, *, audience: str | None, iap: bool = False) -> Authenticator:
    """The one authenticator of a process: named local tokens outside the cloud (the stack's own
    registered as its admin); IAP (`iap=True`, the dashboard) or an ID token (the approval function,
    serving) in the gcp profile."""
    if not settings.in_cloud:
        return token_authenticator(docs, local_token(settings.state_dir))
    if iap:
        return iap_authenticator(audience or "")
    return oidc_authenticator(audience or "")
