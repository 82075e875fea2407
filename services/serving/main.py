"""Entrypoint of the serving API (a container on Cloud Run or GKE; locally `ftpipe serve`): one base
model, the registry's LoRA adapters on it, the OpenAI-compatible API on $PORT (locally
--port, default a free one, written to <state>/services/serving-api.json) and the subscriber on
the `models` topic.

Configuration (`ftpipe serve` options, or the environment in a container):
  FTPIPE_SERVING_BASE              the base model reference (default smollm2-135m-instruct)
  FTPIPE_SERVING_MAX_ADAPTERS      adapters kept in memory, least recently used out first (default 4)
  FTPIPE_SERVING_SPLITS            A/B splits, `;`-separated: NAME=ARM:WEIGHT,ARM:WEIGHT
  FTPIPE_SERVING_MAX_TOKENS_LIMIT  the largest max_tokens a request may ask for (default 2048)
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

if "torch" not in sys.modules:   # see services/evaluator/evaluation.py: OpenMP threads must not spin on shared cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from werkzeug.serving import make_server

from shared.platform.auth import authenticator
from shared.platform.config import Adapters, Settings, bootstrap
from shared.platform.logs import configure_logging
from shared.domain.models import SMOLLM2
from shared.platform.runtime import run_service

from services.serving.api import create_app
from services.serving.engine import Engine
from services.serving.metrics import ServingMetrics
from services.serving.routing import RegistryView, Router, parse_split
from services.serving.service import make_service

API_FILE = "serving-api.json"


@dataclass
class ServingConfig:
    base: str = SMOLLM2
    max_adapters: int = 4
    splits: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    max_tokens_default: int = 256
    max_tokens_limit: int = 2048

    @classmethod
    def from_env(cls, settings: Settings, **overrides) -> "ServingConfig":
        env = os.environ
        values: dict = {"host": "0.0.0.0" if settings.profile == "gcp" else "127.0.0.1"}
        if env.get("FTPIPE_SERVING_BASE"):
            values["base"] = env["FTPIPE_SERVING_BASE"]
        if env.get("FTPIPE_SERVING_MAX_ADAPTERS"):
            values["max_adapters"] = int(env["FTPIPE_SERVING_MAX_ADAPTERS"])
        if env.get("FTPIPE_SERVING_MAX_TOKENS_LIMIT"):
            values["max_tokens_limit"] = int(env["FTPIPE_SERVING_MAX_TOKENS_LIMIT"])
        if env.get("PORT"):
            values["port"] = int(env["PORT"])
        values["splits"] = splits_from([s for s in env.get("FTPIPE_SERVING_SPLITS", "").split(";") if s.strip()])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def splits_from(texts: list[str]) -> dict[str, tuple[tuple[str, float], ...]]:
    """`--split` options (or FTPIPE_SERVING_SPLITS) -> {name: arms}; ValueError saying what is wrong."""
    out = {}
    for text in texts:
        name, arms = parse_split(text)
        if name in out:
            raise ValueError(f"two splits for {name!r}: give one --split per model")
        out[name] = arms
    return out


class Server:
    """A running serving process's parts: the engine, the router, the HTTP server and the subscriber."""

    def __init__(self, adapters: Adapters, config: ServingConfig):
        import torch

        self.adapters, self.config = adapters, config
        self.metrics = ServingMetrics()
        self.engine = Engine(config.base, max_adapters=config.max_adapters, store=adapters.store,
                             device="cuda" if torch.cuda.is_available() else "cpu",
                             on_evict=lambda name, version: self.metrics.evictions.labels(name, version).inc())
        self.metrics.base_loads.labels(config.base).set(self.engine.base_loads)
        self.router = Router(RegistryView(adapters.docs), config.base, self.engine.base_sha256, config.splits)
        authenticate = authenticator(adapters.settings, audience=adapters.settings.serving_audience)
        app = create_app(self.engine, self.router, authenticate, self.metrics,
                         max_tokens_default=config.max_tokens_default, max_tokens_limit=config.max_tokens_limit)
        self.http = make_server(config.host, config.port, app, threaded=True)
        self.url = f"http://{'127.0.0.1' if config.host == '0.0.0.0' else config.host}:{self.http.server_port}"
        self.stopping = threading.Event()
        self._threads = [threading.Thread(target=self.http.serve_forever, daemon=True, name="serving-api"),
                         threading.Thread(target=run_service, daemon=True, name="serving-models",
                                          args=(make_service(self.router, self.engine), adapters),
                                          kwargs={"stop": self.stopping, "health_port": 0})]

    def start(self) -> "Server":
        for thread in self._threads:
            thread.start()
        settings = self.adapters.settings
        if settings.profile != "gcp":
            services = Path(settings.state_dir) / "services"
            services.mkdir(parents=True, exist_ok=True)
            (services / API_FILE).write_text(json.dumps({"url": self.url, "pid": os.getpid(),
                                                         "base_model": self.config.base}))
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.http.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.adapters.settings.profile != "gcp":
            (Path(self.adapters.settings.state_dir) / "services" / API_FILE).unlink(missing_ok=True)
        self.engine.close()


def serve(settings: Settings, config: ServingConfig, *, ready=None) -> None:
    """Run until SIGTERM / SIGINT. `ready(server)` is called once the API answers."""
    adapters = bootstrap(settings)
    server = Server(adapters, config).start()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready:
            ready(server)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
        adapters.close()


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    serve(settings, ServingConfig.from_env(settings))


if __name__ == "__main__":
    main()
