"""Which LLM judges the evaluator may send probe answers to (a recipe's eval.judge.base_url).

The URL comes from the recipe. Unchecked, a recipe could point the evaluator at an internal address
(server-side request forgery: a metadata server, an admin port) or send the answers to a host of
its author's choosing. The deployment names the judges it trusts in FTPIPE_JUDGE_URLS, as URL
prefixes (`https://judge.example.com/v1` allows that origin under /v1); loopback (a judge on the
evaluator's own host: `ftpipe serve`, a local vLLM) is allowed outside the cloud. Checked at
submission (shared/domain/jobs.py authorize_job) and again by the evaluator before any request
(services/evaluator/judge.py); the evaluator never follows redirects.
"""
from __future__ import annotations

import ipaddress
from typing import NamedTuple
from urllib.parse import urlsplit

from shared.platform.config import Settings

ENV = "FTPIPE_JUDGE_URLS"
_PORTS = {"http": 80, "https": 443}


class _Url(NamedTuple):
    scheme: str
    host: str
    port: int
    path: tuple[str, ...]


def _parse(url: str) -> _Url | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port or _PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in _PORTS or not parts.hostname or port is None:
        return None
    return _Url(parts.scheme, parts.hostname.lower().rstrip("."), port,
                tuple(p for p in parts.path.split("/") if p))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal(url: str, settings: Settings | None = None) -> str | None:
    """Why the evaluator may not call the judge at `url`, or None when it may."""
    settings = settings or Settings.from_env()
    target = _parse(url)
    if target is None:
        return f"eval.judge.base_url {url!r} is not an http(s) URL with a host"
    for prefix in filter(None, map(_parse, settings.judge_urls)):
        if target[:3] == prefix[:3] and target.path[:len(prefix.path)] == prefix.path:
            return None
    if _loopback(target.host) and not settings.in_cloud:
        return None
    allowed = ", ".join(settings.judge_urls) or "none"
    loopback = "" if settings.in_cloud else " and loopback"
    return (f"eval.judge.base_url {url!r} is not a judge this deployment allows (allowed: {allowed}{loopback}). "
            f"An operator adds it to {ENV} (comma-separated URL prefixes) in the environment of the tracker, "
            "the preprocess service and the evaluator; or use a judge on an allowed URL")
