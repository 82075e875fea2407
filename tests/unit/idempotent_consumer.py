"""A consumer process for the SIGKILL test: runs the real runtime on the local bus with a handler
whose effect must happen exactly once, however often its message is delivered."""
import os
import sys
import time
from pathlib import Path

from shared.domain import events as ev
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import Service, run_service


def main(state: str, marker_dir: str, hold_s: float) -> None:
    adapters = bootstrap(Settings(state_dir=Path(state), create_resources=False))

    def effect(event, ctx):
        def once(txn):
            if txn.get("effects", event.event_id) is None:
                txn.set("effects", event.event_id, {"by": os.getpid()})
                counter = txn.get("effects", "counter") or {"n": 0}
                txn.set("effects", "counter", {"n": counter["n"] + 1})
        ctx.docs.transaction(once)
        Path(marker_dir, f"effect-{os.getpid()}-attempt-{ctx.message.delivery_attempt}").touch()
        time.sleep(hold_s)  # the first consumer is killed here: effect done, message not yet acked
        return []

    run_service(Service("effect", {ev.JobSubmitted: effect}), adapters)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
