"""`ftpipe up` / `ftpipe down`: the local stack, each service its own OS process, as in the cloud."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.platform.config import Settings, bootstrap
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
    if settings.profile == "gcp":
        raise StackError("`ftpipe up` runs the local stack; in the gcp profile the services run in Google Cloud")
    adapters = bootstrap(settings)  # creates the state folder, topics and subscriptions once, up front
    adapters.close()
    for sub in ("pids", "logs", "services"):
        (settings.state_dir / sub).mkdir(parents=True, exist_ok=True)
    already = running(settings)
    # OMP_WAIT_POLICY=PASSIVE: several torch processes share the cores; spinning OpenMP threads
    # make each ~10x slower when another process is busy (measured in the evaluator).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **settings.env(), **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
    started = {}
    for name, module in PROCESSES.items():
        # In the cloud profiles the bucket itself (GCS, fake-gcs-server) sends the notifications.
        if name in already or (name == "notifier" and settings.profile != "local"):
            continue
        (settings.state_dir / "services" / f"{name}.json").unlink(missing_ok=True)
        log = open(settings.state_dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _pid_file(settings, name).write_text(str(proc.pid))
        started[name] = proc.pid
    deadline = time.monotonic() + timeout_s
    for name, pid in started.items():
        while not (settings.state_dir / "services" / f"{name}.json").is_file():
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
    for path in (settings.state_dir / "services").glob("*.json"):
        path.unlink(missing_ok=True)
    return list(procs)


def tracker_url(settings: Settings) -> str | None:
    path = settings.state_dir / "services" / "tracker-api.json"
    return json.loads(path.read_text())["url"] if path.is_file() else None


def dashboard_url(settings: Settings) -> str:
    """The local dashboard's link, carrying the stack's bearer token (<state>/auth-token) in the URL
    fragment: the page reads it from there, and a fragment never reaches a server or a log."""
    if settings.profile == "gcp":
        raise StackError("in the gcp profile the dashboard is the tracker's Cloud Run service behind Identity-Aware "
                         "Proxy: open the URL of its load balancer and sign in with Google")
    url = tracker_url(settings)
    if url is None or "tracker" not in running(settings):
        raise StackError(f"the tracker is not running for {settings.state_dir}; `ftpipe up` starts the stack")
    from shared.platform.auth import local_token

    return f"{url}/#token={local_token(settings.state_dir)}"
