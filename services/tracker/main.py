"""Entrypoint of the tracker (Cloud Run): the lineage writer plus the API on $PORT (locally a free
port, written to <state>/services/tracker-api.json), its /api routes behind the authenticator of
shared/platform/auth.py (locally the token in <state>/auth-token, created here if absent; IAP in the cloud)."""
from __future__ import annotations

import json
import os
import threading

from werkzeug.serving import make_server

from shared.platform.auth import authenticator
from shared.platform.config import Settings, bootstrap
from shared.platform.logs import configure_logging
from shared.platform.runtime import run_service

from services.tracker.api import create_app
from services.tracker.service import SERVICE


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    adapters = bootstrap(settings)
    authenticate = authenticator(settings, audience=settings.dashboard_audience, iap=True)
    host = "0.0.0.0" if settings.profile == "gcp" else "127.0.0.1"
    server = make_server(host, int(os.environ.get("FTPIPE_TRACKER_PORT", os.environ.get("PORT", "0"))),
                         create_app(adapters, authenticate), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="api").start()
    if settings.profile != "gcp":
        services = settings.state_dir / "services"
        services.mkdir(parents=True, exist_ok=True)
        (services / "tracker-api.json").write_text(json.dumps({"url": f"http://127.0.0.1:{server.server_port}"}))
    try:
        run_service(SERVICE, adapters, health_port=0)
    finally:
        server.shutdown()
        adapters.close()


if __name__ == "__main__":
    main()
