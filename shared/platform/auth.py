"""Who is calling an HTTP endpoint people use (the tracker's dashboard and API, the registry's
approval function): one `Authenticator` per process, chosen once from the settings.

Locally (profiles local and emulators) the caller shows the bearer token that `local_token`
generates into the state folder (`<state>/auth-token`, readable by its owner only); `ftpipe
dashboard` prints a link that carries it. In the gcp profile people reach the dashboard through
Identity-Aware Proxy, which signs every request it lets through (`X-Goog-IAP-JWT-Assertion`), and
the approval function through IAM, which passes the caller's Google ID token on; both are verified
here again, so a misconfigured ingress does not open the writes to everyone.
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class Identity:
    """Who made a request: `email` goes into audit records (approvals, sign-offs, promotions)."""
    email: str
    via: str  # "token" | "iap" | "oidc"


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


def token_authenticator(token: str) -> Authenticator:
    def check(headers: Mapping[str, str]) -> Identity:
        if not hmac.compare_digest(_bearer(headers).encode(), token.encode()):
            raise AuthError(401, "wrong bearer token: use the one in <state>/auth-token of this stack")
        return Identity(email=os.environ.get("USER", "local"), via="token")
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
        return Identity(email=claims.get("email") or claims.get("sub", "unknown"), via="iap")
    return check


def oidc_authenticator(audience: str, allowed: tuple[str, ...] = (), *, certs_url: str = GOOGLE_CERTS_URL,
                       request=None) -> Authenticator:
    """A Google ID token for `audience` (the function's URL); when `allowed` is given, only those
    verified emails pass (403 for any other valid caller)."""
    verify = OidcVerifier(audience, certs_url=certs_url, request=request)

    def check(headers: Mapping[str, str]) -> Identity:
        claims = verify(headers.get("Authorization"))
        email = claims.get("email")
        if allowed and (email not in allowed or claims.get("email_verified") is not True):
            raise AuthError(403, f"{email!r} may not do this; allowed: {', '.join(allowed)} (FTPIPE_APPROVERS)")
        return Identity(email=email or claims.get("sub", "unknown"), via="oidc")
    return check


def authenticator(settings, *, audience: str | None, allowed: tuple[str, ...] = (), iap: bool = False) -> Authenticator:
    """The one authenticator of a process: the local token outside the cloud; IAP (`iap=True`, the
    dashboard) or an ID token (the approval function) in the gcp profile."""
    if not settings.in_cloud:
        return token_authenticator(local_token(settings.state_dir))
    if iap:
        return iap_authenticator(audience or "")
    return oidc_authenticator(audience or "", allowed)
