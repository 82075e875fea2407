"""`ftpipe up` / `ftpipe down`: the local stack, each service its own OS process, as in the cloud."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.platform.config import Settings, bootstrap
from shared.platform.discovery import lookup, withdraw, withdraw_all
from shared.platform.processes import alive

PROCESSES = {
    "notifier": "ftpipe.notifier",
    "preprocess": "services.preprocess.main",
    "trainer": "services.trainer.main",
    "evaluator": "services.evaluator.main",
    "registry": "services.registry_fn.main",
    "tracker": "services.tracker.main",
}


class StackError(RuntimeError):
    pass


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / "pids" / f"{name}.pid"


def running(settings: Settings) -> dict[str, int]:
    out = {}
    for name in PROCESSES:
        path = _pid_file(settings, name)
        if path.is_file():
            pid = int(path.read_text())
            if alive(pid):
                out[name] = pid
    return out


def up(settings: Settings, *, timeout_s: float = 120, extra_env: dict | None = None) -> dict[str, int]:
    """Start every service not already running; wait until each reports healthy."""
    if settings.in_cloud:
        raise StackError("`ftpipe up` runs the local stack; in the gcp profile the services run in Google Cloud")
    adapters = bootstrap(settings)  # creates the state folder, topics and subscriptions once, up front
    adapters.close()
    for sub in ("pids", "logs"):
        (settings.state_dir / sub).mkdir(parents=True, exist_ok=True)
    already = running(settings)
    # OMP_WAIT_POLICY=PASSIVE: several torch processes share the cores; spinning OpenMP threads
    # make each ~10x slower when another process is busy (measured in the evaluator).
    # No PORT: each local process takes a free port and advertises it (shared/platform/discovery.py).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **{k: v for k, v in os.environ.items() if k != "PORT"}, **settings.env(),
           **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
    started = {}
    for name, module in PROCESSES.items():
        # In the cloud profiles the bucket itself (GCS, fake-gcs-server) sends the notifications.
        if name in already or (name == "notifier" and settings.profile != "local"):
            continue
        withdraw(settings, name)
        log = open(settings.state_dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _pid_file(settings, name).write_text(str(proc.pid))
        started[name] = proc.pid
    deadline = time.monotonic() + timeout_s
    for name, pid in started.items():
        while lookup(settings.state_dir, name) is None:
            if not alive(pid):
                raise StackError(f"{name} exited during start-up; see {settings.state_dir / 'logs' / f'{name}.log'}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} did not become healthy within {timeout_s:.0f}s; "
                                 f"see {settings.state_dir / 'logs' / f'{name}.log'}")
            time.sleep(0.2)
    return {**already, **started}


def down(settings: Settings, *, grace_s: float = 30) -> list[str]:
    """SIGTERM every service (the trainer checkpoints first), SIGKILL whatever outlives the grace."""
    procs = running(settings)
    for pid in procs.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for name, pid in procs.items():
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        _pid_file(settings, name).unlink(missing_ok=True)
    # Every address a service published (health ports, the tracker's API, the approval endpoint) is stale now.
    withdraw_all(settings.state_dir)
    return list(procs)


def tracker_url(settings: Settings) -> str | None:
    found = lookup(settings.state_dir, "tracker")
    return found["url"] if found else None


def dashboard_url(settings: Settings) -> str:
    """The local dashboard's link, carrying the stack's bearer token (<state>/auth-token) in the URL
    fragment: the page reads it from there, and a fragment never reaches a server or a log."""
    if settings.in_cloud:
        raise StackError("in the gcp profile the dashboard is the tracker's Cloud Run service behind Identity-Aware "
                         "Proxy: open the URL of its load balancer and sign in with Google")
    url = tracker_url(settings)
    if url is None or "tracker" not in running(settings):
        raise StackError(f"the tracker is not running for {settings.state_dir}; `ftpipe up` starts the stack")
    from shared.platform.auth import local_token

    return f"{url}/#token={local_token(settings.state_dir)}"
