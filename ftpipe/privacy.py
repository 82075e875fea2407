"""`ftpipe privacy list|approve|reject`: the sign-off decisions of shared/domain/privacy.py (the tracker's
API makes the same calls), with their errors as the CLI's."""
from __future__ import annotations

from ftpipe.client import Client, ClientError
from shared.domain import privacy


def awaiting(client: Client) -> list[dict]:
    return privacy.awaiting(client.adapters.docs)


def approve(client: Client, run_id: str, note: str | None = None) -> dict:
    a = client.adapters
    try:
        return privacy.approve(a.docs, a.store, a.bus, run_id, caller=client.caller, note=note)
    except privacy.ReviewError as exc:
        raise ClientError(str(exc)) from exc


def reject(client: Client, run_id: str, reason: str) -> dict:
    a = client.adapters
    try:
        return privacy.reject(a.docs, a.bus, run_id, reason=reason, caller=client.caller)
    except privacy.ReviewError as exc:
        raise ClientError(str(exc)) from exc
