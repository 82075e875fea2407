"""The dashboard's static side, without a browser: every asset the page loads is served by the app
(no CDN), module imports resolve, nothing outside dashboard/ is reachable, and no script parses
server data as HTML."""
import re

import pytest
from flask import Flask

from services.tracker.web import DASHBOARD_DIR, dashboard_blueprint

OWN_SCRIPTS = sorted(p for p in DASHBOARD_DIR.rglob("*.js") if "vendor" not in p.parts)


@pytest.fixture(scope="module")
def client():
    app = Flask(__name__)
    app.register_blueprint(dashboard_blueprint())
    return app.test_client()


def referenced_assets() -> set[str]:
    """Every asset URL the page and its modules load, as the browser would resolve it."""
    html = (DASHBOARD_DIR / "index.html").read_text()
    urls = {u for u in re.findall(r'(?:src|href)="([^"#]+)"', html) if not u.startswith("data:")}
    for script in OWN_SCRIPTS:
        folder = script.parent.relative_to(DASHBOARD_DIR)
        for target in re.findall(r'^(?:import|export)\b[^;]*?from "([^"]+)"', script.read_text(), re.M):
            urls.add("assets/" + str((folder / target)).replace("\\", "/"))
    return {re.sub(r"/[^/]+/\.\./", "/", u.replace("/./", "/")) for u in urls}


def test_page_and_every_asset_it_loads_are_served_without_auth(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-cache"
    assets = referenced_assets()
    assert "assets/vendor/uplot/uPlot.iife.min.js" in assets and "assets/pages/run.js" in assets
    for url in sorted(assets):
        assert not re.match(r"^(https?:)?//", url), f"{url}: every asset must be served by the tracker (no CDN)"
        resp = client.get("/" + url)
        assert resp.status_code == 200, url
        if url.endswith(".js"):
            assert resp.mimetype in ("text/javascript", "application/javascript"), (url, resp.mimetype)


@pytest.mark.parametrize("path", ["/assets/../web.py", "/assets/%2e%2e/web.py", "/assets/..%2fweb.py",
                                  "/assets//etc/passwd", "/assets/nope.js"])
def test_nothing_outside_the_dashboard_folder_is_served(client, path):
    assert client.get(path, follow_redirects=True).status_code == 404


def test_scripts_never_parse_strings_as_html():
    for script in OWN_SCRIPTS:
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{script.name} uses {sink}: build elements with dom.js h() instead"
