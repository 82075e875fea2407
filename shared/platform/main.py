"""The one way to start an ftpipe process, which every `services/*/main.py` (and the local stack's
notifier) calls:

    settings -> logging -> bootstrap -> start-up checks -> HTTP side-car -> advertise -> run
    (the service's subscriptions, or the process's own loop) -> ... SIGTERM ... -> stop taking work,
    finish what is in flight -> withdraw -> close

The HTTP side-car is the service's own app when it has one (the tracker's API, the serving API,
the registry's approval endpoint), else `/healthz` alone: either way one port per process, which
Cloud Run and Kubernetes probe and which the local stack finds through shared/platform/discovery.py.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable

from werkzeug.serving import make_server

from shared.platform.config import Adapters, Settings, bootstrap
from shared.platform.discovery import advertise, bind_host, port_for, withdraw
from shared.platform.logs import configure_logging
from shared.platform.runtime import Service, prepare_service, start_consuming

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


def health_app(name: str, counters: dict[str, int]) -> WsgiApp:
    """GET /healthz (and /): the process is up, with how many messages it handled."""
    started = time.time()

    def app(environ, start_response):
        if environ.get("PATH_INFO") not in ("/", "/healthz"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: this process serves /healthz\n"]
        body = json.dumps({"service": name, "status": "ok", "pid": os.getpid(),
                           "uptime_s": round(time.time() - started, 1), **counters}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return app


class Process:
    """A process's parts beside its adapters: the HTTP side-car, the service's consumers or a loop
    of its own (`loop(stop)`), and its advertisement. `start()` returns once all are up; `stop()`
    lets in-flight work finish, withdraws the advertisement and closes the side-car (not the adapters)."""

    def __init__(self, name: str, adapters: Adapters, *, service: Service | None = None,
                 http_app: WsgiApp | None = None, loop: Callable[[threading.Event], None] | None = None,
                 host: str | None = None, port: int | None = None, info: dict[str, Any] | None = None,
                 stop: threading.Event | None = None):
        self.name, self.adapters, self.service, self.loop = name, adapters, service, loop
        self.info = info or {}
        self.stopping = stop or threading.Event()
        self.counters = {"handled": 0}
        self.http = make_server(host or bind_host(adapters.settings), port_for(name) if port is None else port,
                                http_app or health_app(name, self.counters), threaded=True)
        shown = "127.0.0.1" if self.http.host == "0.0.0.0" else self.http.host
        self.url = f"http://{shown}:{self.http.server_port}"
        self._threads: list[threading.Thread] = []
        self._finish: Callable[[], None] | None = None

    def start(self) -> "Process":
        if self.service is not None:
            prepare_service(self.service, self.adapters)
        self._spawn(self.http.serve_forever, "http")
        # Advertised before work arrives: `ftpipe up` takes the file for "started".
        advertise(self.adapters.settings, self.name, url=self.url, **self.info)
        if self.service is not None:
            self._finish = start_consuming(self.service, self.adapters, self.stopping, self.counters)
        if (loop := self.loop) is not None:
            self._spawn(lambda: loop(self.stopping), "loop")
        return self

    def _spawn(self, target: Callable[[], None], what: str) -> None:
        thread = threading.Thread(target=target, daemon=True, name=f"{self.name}-{what}")
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        if self._finish is not None:
            self._finish()
        withdraw(self.adapters.settings, self.name)
        if self._threads:  # serve_forever runs (shutdown() would wait for it forever otherwise)
            self.http.shutdown()
        self.http.server_close()
        for thread in self._threads:
            thread.join(timeout=30)


def run_process(build: Callable[[Adapters], Process], *, settings: Settings | None = None,
                ready: Callable[[Process], None] | None = None, service: str | None = None) -> None:
    """Settings, logging and adapters once (a service's bus publishes only what `service` may:
    config.bootstrap); the process `build` makes of them runs until SIGTERM / SIGINT (the signal
    handlers are restored after). `ready(process)` is called once it is up."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    adapters = bootstrap(settings, service=service)
    try:
        process = build(adapters)
        stop = process.stopping
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            process.start()
            logging.getLogger(f"ftpipe.{process.name}").info("listening on %s", process.url)
            if ready is not None:
                ready(process)
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            process.stop()
    finally:
        adapters.close()


def serve(service: Service | None, http_app: Callable[[Adapters], WsgiApp | None] | None = None, *,
          name: str | None = None, loop: Callable[[Adapters, threading.Event], None] | None = None) -> None:
    """Run a service (and its app, built from the adapters; None: /healthz alone) or, for a process
    that is not a bus consumer, its `loop(adapters, stop)` under `name`."""
    process_name = name or (service.name if service else None)
    if process_name is None:
        raise ValueError("serve() needs a service or a name")

    def build(adapters: Adapters) -> Process:
        return Process(process_name, adapters, service=service, http_app=http_app(adapters) if http_app else None,
                       loop=functools.partial(loop, adapters) if loop else None)
    run_process(build, service=service.name if service else None)
