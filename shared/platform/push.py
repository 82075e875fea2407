"""Pub/Sub push deliveries: the message inside a push request (or inside the `messagePublished`
CloudEvent that Eventarc sends a Cloud Function, which carries the same body), a claim that keeps a
redelivery from running alongside the delivery still in progress, and the check of the OIDC token
Pub/Sub signs each push with.

A push body is `{"message": {"data": base64, "attributes": {...}, "messageId": ...},
"subscription": "projects/P/subscriptions/S", "deliveryAttempt": N}`; Pub/Sub sends `deliveryAttempt`
beside the message, not in it, and only on subscriptions with a dead-letter policy. Pub/Sub counts a 102, 200, 201, 202 or 204 response
as an ack and anything else (or no answer within the subscription's ack deadline, at most 600 s) as
a nack, redelivered with the subscription's retry policy.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any, Mapping

from shared.domain import events as ev

CLAIMS = "push_claims"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")


class PushedMessage:
    """A pushed Pub/Sub message as the runtime's `Message`: the handler's ack or nack is recorded
    (`nacked`), and the transport answers with it once handle_message returns. `extend` runs
    `on_extend`, if any (a push has no lease to extend; the caller may keep a claim alive)."""

    def __init__(self, message: dict, on_extend=None, delivery_attempt: int | None = None):
        self.data = base64.b64decode(message.get("data", ""))
        self.attributes = message.get("attributes") or {}
        self.message_id = message.get("messageId") or message["message_id"]
        self.delivery_attempt = int(delivery_attempt or 1)
        self.nacked = False
        self.on_extend = on_extend

    @classmethod
    def parse(cls, body) -> "PushedMessage":
        """The Pub/Sub message of a push body (or of a CloudEvent's data), or MalformedMessage."""
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            raise ev.MalformedMessage("push body has no Pub/Sub 'message' object")
        attributes = message.get("attributes") or {}
        if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
            raise ev.MalformedMessage("Pub/Sub message attributes must be a map of strings")
        if not isinstance(message.get("messageId") or message.get("message_id"), str):
            raise ev.MalformedMessage("Pub/Sub message has no messageId")
        try:
            base64.b64decode(message.get("data", ""), validate=True)
            return cls(message, delivery_attempt=body.get("deliveryAttempt"))
        except (binascii.Error, TypeError, ValueError) as exc:
            raise ev.MalformedMessage(f"Pub/Sub message data is not valid base64 (or a field is invalid): {exc}") from exc

    def ack(self) -> None:
        self.nacked = False

    def nack(self, delay_s: float | None = None) -> None:
        # A push cannot ask for a delay: the subscription's retry policy (backoff) sets it.
        self.nacked = True

    def extend(self, seconds: float) -> None:
        if self.on_extend:
            self.on_extend(seconds)


class Undecodable:
    """A push delivery that is not a usable Pub/Sub message: kept whole for the dead-letter topic."""

    def __init__(self, body):
        raw = body if isinstance(body, (bytes, str)) else json.dumps(body, default=str)
        self.data = raw.encode() if isinstance(raw, str) else raw
        message = body.get("message") if isinstance(body, dict) else None
        attributes = message.get("attributes") if isinstance(message, dict) else None
        self.attributes = ({k: v for k, v in attributes.items() if isinstance(v, str)}
                           if isinstance(attributes, dict) else {})
        message_id = message.get("messageId") if isinstance(message, dict) else None
        self.message_id = message_id if isinstance(message_id, str) else ""


# ------------------------------------------------------------------ claims

class Claim:
    """One delivery's claim on its message, a DocStore document that expires `ttl_s` after it was
    last extended. Pub/Sub redelivers a push the handler has not answered within the ack deadline,
    possibly to another instance; that redelivery finds the live claim and is nacked instead of
    running the same work twice. A claim whose holder died expires and the next redelivery takes it."""

    def __init__(self, docs, key: str, holder: str, ttl_s: float):
        self.docs, self.key, self.holder, self.ttl_s = docs, key, holder, ttl_s

    def take(self) -> float | None:
        """Take the claim; None when taken, else the seconds left on another holder's live claim."""
        def take(txn):
            doc = txn.get(CLAIMS, self.key) or {}
            now = time.time()
            if doc.get("holder") not in (None, self.holder) and doc.get("expires_at", 0) > now:
                return doc["expires_at"] - now
            txn.set(CLAIMS, self.key, {"holder": self.holder, "expires_at": now + self.ttl_s})
            return None
        return self.docs.transaction(take)

    def extend(self, seconds: float | None = None) -> None:
        def extend(txn):
            if (txn.get(CLAIMS, self.key) or {}).get("holder") == self.holder:
                txn.set(CLAIMS, self.key, {"holder": self.holder, "expires_at": time.time() + (seconds or self.ttl_s)})
        self.docs.transaction(extend)

    def release(self) -> None:
        def drop(txn):
            if (txn.get(CLAIMS, self.key) or {}).get("holder") == self.holder:
                txn.delete(CLAIMS, self.key)
        self.docs.transaction(drop)


# ------------------------------------------------------------------ OIDC

class AuthError(Exception):
    """A push whose token does not prove it came from our subscription: `status` is 401 (no or bad
    token) or 403 (a valid token of someone else); 503 when Google's certificates are unreachable
    (Pub/Sub retries)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class OidcVerifier:
    """Checks the `Authorization: Bearer <JWT>` of a Pub/Sub push (google-auth verifies signature,
    expiry and audience against Google's certificates): issued by Google, for `audience` (the push
    subscription's audience, by default the endpoint URL), and, when `service_account` is given,
    for that account's verified email."""

    def __init__(self, audience: str, service_account: str | None = None, *, certs_url: str = GOOGLE_CERTS_URL,
                 request=None):
        if not audience:
            raise ValueError("OidcVerifier needs the expected audience: the push subscription's "
                             "--push-auth-token-audience, by default the push endpoint URL (FTPIPE_PUSH_AUDIENCE)")
        import google.auth.transport.requests

        self.audience, self.service_account, self.certs_url = audience, service_account, certs_url
        # One session for the process: certificate fetches reuse its connection.
        self.request = request or google.auth.transport.requests.Request()

    def __call__(self, authorization: str | None) -> Mapping[str, Any]:
        """The token's claims, or AuthError."""
        from google.auth import exceptions
        from google.oauth2 import id_token

        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "missing 'Authorization: Bearer <token>' header: enable authentication "
                                 "on the push subscription (--push-auth-service-account)")
        try:
            claims = id_token.verify_token(token.strip(), self.request, audience=self.audience,
                                           certs_url=self.certs_url)
        except exceptions.TransportError as exc:
            raise AuthError(503, f"could not fetch the token signing certificates: {exc}") from exc
        except (ValueError, exceptions.GoogleAuthError) as exc:
            raise AuthError(401, f"invalid token: {exc}") from exc
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise AuthError(401, f"invalid token: issuer {claims.get('iss')!r} is not Google")
        if self.service_account:
            if claims.get("email") != self.service_account or claims.get("email_verified") is not True:
                raise AuthError(403, f"token is for {claims.get('email')!r} (verified: {claims.get('email_verified')}); "
                                     f"expected the push subscription's service account {self.service_account!r}")
        return claims
