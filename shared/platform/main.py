"""The one entrypoint body every service's main.py calls."""
from __future__ import annotations

from shared.platform.config import Settings, bootstrap
from shared.platform.logs import configure_logging
from shared.platform.runtime import Service, run_service


def serve(service: Service) -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    adapters = bootstrap(settings)
    try:
        run_service(service, adapters)
    finally:
        adapters.close()
