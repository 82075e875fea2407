"""Local stack process: announces files that appear under incoming/ in any local bucket, including
files copied in by hand (what a GCS bucket notification does in the cloud)."""
from __future__ import annotations

import logging
import signal
import threading

from shared.platform.config import Settings, bootstrap
from shared.platform.logs import configure_logging
from shared.platform.notifications import LocalBucketNotifier, scan_incoming


def main(interval_s: float = 1.0) -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    adapters = bootstrap(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    notifier = LocalBucketNotifier(adapters.bus, adapters.docs)
    (settings.state_dir / "services").mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "services" / "notifier.json").write_text("{}")
    logging.getLogger("ftpipe.notifier").info("watching incoming/ in %s", adapters.store.root)
    while not stop.wait(interval_s):
        try:
            scan_incoming(adapters.store, notifier)
        except Exception:
            logging.getLogger("ftpipe.notifier").exception("scan failed; retrying")


if __name__ == "__main__":
    main()
