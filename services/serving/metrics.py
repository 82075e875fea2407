"""The serving metrics, in Prometheus' text format at /metrics (prometheus_client).

Every series is labelled by `model` (the registered name, or the base model's reference) and
`version` (`base` for the base model), so requests, latency and tokens/s read per adapter. Label
values come from the registry, never from a request: a refused request for a model or version the
registry does not know is counted under `unknown` (services/serving/routing.Router.metric_labels),
so requests naming anything at all do not create series without bound.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
SWAP_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    def __init__(self):
        # One registry per server: several servers in one process (tests) keep their own counts.
        self.registry = CollectorRegistry()
        per = ["model", "version"]
        self.requests = Counter("ftpipe_serving_requests", "Requests by adapter, endpoint and HTTP status",
                                per + ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ftpipe_serving_request_latency_seconds",
                                 "Request to last token (queue wait included)", per + ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("ftpipe_serving_time_to_first_token_seconds", "Request to first streamed text",
                                     per, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("ftpipe_serving_queue_wait_seconds", "Time waiting for the generation lock",
                                    per, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens_per_s = Histogram("ftpipe_serving_tokens_per_second", "Generated tokens per second of generation",
                                      per, buckets=RATE_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("ftpipe_serving_prompt_tokens", "Prompt tokens", per, registry=self.registry)
        self.completion_tokens = Counter("ftpipe_serving_completion_tokens", "Generated tokens", per,
                                         registry=self.registry)
        self.swap = Histogram("ftpipe_serving_adapter_swap_seconds", "Choosing a loaded adapter for a request",
                              per, buckets=SWAP_BUCKETS, registry=self.registry)
        self.loads = Counter("ftpipe_serving_adapter_loads", "Adapters loaded onto the base", per,
                             registry=self.registry)
        self.load_seconds = Histogram("ftpipe_serving_adapter_load_seconds", "Loading an adapter onto the base", per,
                                      buckets=SWAP_BUCKETS, registry=self.registry)
        self.evictions = Counter("ftpipe_serving_adapter_evictions", "Adapters taken out of memory (LRU or a "
                                 "quarantine / archive event)", per, registry=self.registry)
        self.loaded = Gauge("ftpipe_serving_adapters_loaded", "Adapters in memory now", registry=self.registry)
        self.base_loads = Gauge("ftpipe_serving_base_model_loads", "Times the base model was loaded (1: never "
                                "reloaded)", ["model"], registry=self.registry)
        self.split = Counter("ftpipe_serving_split_assignments", "Requests an A/B split sent to each arm",
                             ["model", "arm", "version"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
