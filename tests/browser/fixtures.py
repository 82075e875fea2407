"""Browser fixtures: Debian's chromium (/usr/bin/chromium, installed by `make setup`) driven by
Playwright — never Playwright's own browser download. One browser per test module; each test gets a
new tab.

A plugin of the whole suite (tests/conftest.py), so the dashboard's own tests and the end-to-end
ones use the same fixtures; `open_dashboard` and `serve` are plain helpers to import.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator

import pytest
from werkzeug.serving import make_server

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (tests may run as root in a container); nothing that reaches outside the machine.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 8000  # any single wait; the pages poll every 2 s


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}: `make setup` installs it "
                    "(apt-get install chromium chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def browser_context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


@pytest.fixture
def page(browser_context):
    """A new tab: its own sessionStorage, so no token is carried over from another test (a tab is
    cheaper to open than a context). An uncaught JavaScript error on the page fails the test."""
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert not errors, f"JavaScript errors on the dashboard: {errors}"


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """`app` on a real werkzeug server on a free port of 127.0.0.1, in a thread; yields its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="dashboard-test-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def open_dashboard(page, url: str, token: str | None, route: str = "/runs") -> None:
    """Open the dashboard as `ftpipe dashboard` does (the token in the URL fragment), then `route`."""
    from playwright.sync_api import expect

    if token is None:
        page.goto(f"{url}/#{route}")
        return
    page.goto(f"{url}/#token={token}")
    expect(page).to_have_url(f"{url}/#/runs")  # the token has left the address bar
    if route != "/runs":
        page.evaluate("route => { location.hash = route; }", f"#{route}")
