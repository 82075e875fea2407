"""Local stack process: announces files that appear under incoming/ in any local bucket, including
files copied in by hand (what a GCS bucket notification does in the cloud)."""
from __future__ import annotations

import logging
import threading

from shared.platform.config import Adapters
from shared.platform.main import serve
from shared.platform.notifications import LocalBucketNotifier, scan_incoming

INTERVAL_S = 1.0
log = logging.getLogger("ftpipe.notifier")


def watch(adapters: Adapters, stop: threading.Event) -> None:
    notifier = LocalBucketNotifier(adapters.bus, adapters.docs)
    log.info("watching incoming/ in %s", adapters.store.root)
    while not stop.wait(INTERVAL_S):
        try:
            scan_incoming(adapters.store, notifier)
        except Exception:
            log.exception("scan failed; retrying")


if __name__ == "__main__":
    serve(None, name="notifier", loop=watch)
