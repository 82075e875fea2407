"""The serving process (a container on Cloud Run or GKE, `python -m services.serving.main`; locally
`ftpipe serve`): one base model, the registry's LoRA adapters on it, the OpenAI-compatible API on
$PORT (locally --port, default a free one, advertised in <state>/services/serving.json) and the
subscriber on the `models` topic.

Configuration (`ftpipe serve` options, or the environment in a container):
  FTPIPE_SERVING_BASE              the base model reference (default smollm2-135m-instruct)
  FTPIPE_SERVING_MAX_ADAPTERS      adapters kept in memory, least recently used out first (default 4)
  FTPIPE_SERVING_SPLITS            A/B splits, `;`-separated: NAME=ARM:WEIGHT,ARM:WEIGHT
  FTPIPE_SERVING_MAX_TOKENS_LIMIT  the largest max_tokens a request may ask for (default 2048)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

if "torch" not in sys.modules:   # see services/evaluator/evaluation.py: OpenMP threads must not spin on shared cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from shared.domain.access import serving_authenticator
from shared.domain.models import SMOLLM2
from shared.platform.auth import authenticator
from shared.platform.config import Adapters, Settings
from shared.platform.discovery import bind_host
from shared.platform.main import Process, run_process

from services.serving.api import create_app
from services.serving.engine import Engine
from services.serving.metrics import ServingMetrics
from services.serving.routing import RegistryView, Router, parse_split
from services.serving.service import SERVICE_NAME, make_service


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
        values: dict = {"host": bind_host(settings)}
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


class Server(Process):
    """A serving process's parts: the engine, the router, the API as its HTTP side-car and the
    `models` subscriber (shared/platform/main.py Process)."""

    def __init__(self, adapters: Adapters, config: ServingConfig):
        import torch

        self.config = config
        self.metrics = ServingMetrics()
        self.engine = Engine(config.base, max_adapters=config.max_adapters, store=adapters.store,
                             docs=adapters.docs, device="cuda" if torch.cuda.is_available() else "cpu",
                             on_evict=lambda name, version: self.metrics.evictions.labels(name, version).inc())
        self.metrics.base_loads.labels(config.base).set(self.engine.base_loads)
        self.router = Router(RegistryView(adapters.docs), config.base, self.engine.base_sha256, config.splits)
        settings = adapters.settings
        authenticate = serving_authenticator(
            authenticator(settings, adapters.docs, audience=settings.serving_audience), adapters.docs,
            admins=settings.admins, allowed=settings.serving_callers if settings.in_cloud else None)
        app = create_app(self.engine, self.router, authenticate, self.metrics,
                         max_tokens_default=config.max_tokens_default, max_tokens_limit=config.max_tokens_limit)
        super().__init__(SERVICE_NAME, adapters, service=make_service(self.router, self.engine), http_app=app,
                         host=config.host, port=config.port, info={"base_model": config.base})

    def stop(self) -> None:
        super().stop()
        self.engine.close()


def serve(settings: Settings, config: ServingConfig, *, ready=None) -> None:
    """Run until SIGTERM / SIGINT. `ready(server)` is called once the API answers."""
    run_process(lambda adapters: Server(adapters, config), settings=settings, ready=ready, service=SERVICE_NAME)
