"""The dashboard: one static page and its assets, served by the tracker next to its JSON API.

The page carries no data and no secret, so it and its assets need no authentication; everything it
shows comes from `/api/*`, which does (the page sends the bearer token it was given in the URL
fragment, or IAP signs its requests in the cloud). Every asset — the chart library included — is
served from `dashboard/` in this package: no CDN, so the dashboard works where nothing outside the
network can be reached.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

DASHBOARD_DIR = Path(__file__).with_name("dashboard")

# The page runs only its own scripts and talks only to its own origin. A strict policy is
# possible because nothing is inlined: uPlot and the page style elements through the CSSOM
# (element.style), which CSP does not restrict, and never through style attributes.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                           "form-action 'none'")


def _secure(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    # Revalidate on every load (send_from_directory answers 304 while unchanged), so a new version
    # of the tracker never runs with a stale app.js.
    resp.headers["Cache-Control"] = "no-cache"
    return resp


def dashboard_blueprint() -> Blueprint:
    """`/` serves the single-page dashboard, `/assets/<path>` its scripts, styles and vendored
    libraries. Register it on the tracker's app beside the `/api` routes."""
    bp = Blueprint("dashboard", __name__)

    @bp.get("/")
    def index():
        return _secure(send_from_directory(DASHBOARD_DIR, "index.html"))

    @bp.get("/assets/<path:name>")
    def asset(name: str):
        # send_from_directory refuses paths that leave DASHBOARD_DIR (404), so "../" cannot reach the code.
        return _secure(send_from_directory(DASHBOARD_DIR, name))

    return bp
