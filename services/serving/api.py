"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions (both streamed as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`, when `stream` is true),
/v1/models, and /metrics (Prometheus). Every route but /healthz needs the caller's bearer token
(shared/platform/auth.py). Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

A response's `model` is the version that served it (`support-bot@1.3`), so a caller routed by an
alias or an A/B split sees what answered. Logs carry models, token counts and timings, never
prompts, completions or user keys.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any, Iterator, Literal

from flask import Flask, Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from werkzeug.exceptions import HTTPException

from shared.domain import model_registry as reg
from shared.platform.auth import Authenticator
from shared.platform.push import AuthError

from services.serving.engine import Engine, Finished, Sampling
from services.serving.metrics import CONTENT_TYPE, ServingMetrics
from services.serving.routing import Router, ServingError, Target, check_servable

USER_HEADER = "X-FTPIPE-User"
_log = logging.getLogger("ftpipe.serving")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          500: "server_error"}


# ------------------------------------------------------------------ requests

class _Request(BaseModel):
    # OpenAI clients send fields this server has no use for (metadata, store, …): ignored.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send the request n times (with a seed each) instead")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("presence and frequency penalties are not supported: leave them at 0")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported")
        return value


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("send one prompt per request (a string, or a list of one string)")
        return prompt[0] if isinstance(prompt, list) else prompt

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value


def _parse(kind: type[_Request]) -> _Request:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ServingError(400, "invalid_json", "the body must be a JSON object (Content-Type: application/json)")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise ServingError(400, "invalid_request", f"{param}: {message}{more}", param) from None


# ------------------------------------------------------------------ the app

def create_app(engine: Engine, router: Router, authenticate: Authenticator, metrics: ServingMetrics, *,
               max_tokens_default: int = 256, max_tokens_limit: int = 2048) -> Flask:
    app = Flask("ftpipe-serving")
    app.config["MAX_CONTENT_LENGTH"] = 4 << 20

    @app.errorhandler(ServingError)
    def serving_error(exc: ServingError):
        return _error(exc.status, str(exc), exc.code, exc.param)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _error(exc.code or 500, exc.description or exc.name, exc.name.lower().replace(" ", "_"))

    @app.errorhandler(Exception)
    def internal(exc: Exception):
        _log.exception("request failed", extra={"path": request.path})
        return _error(500, f"internal error: {type(exc).__name__}; see the server's log", "internal_error")

    @app.before_request
    def authenticated():
        if request.path == "/healthz":
            return None
        try:
            authenticate(request.headers)
        except AuthError as exc:
            return _error(exc.status, exc.reason, "invalid_api_key")
        return None

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok", "base_model": engine.base_ref, "adapters_loaded": len(engine.loaded)})

    @app.get("/metrics")
    def prometheus():
        metrics.loaded.set(len(engine.loaded))
        return Response(metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": list_models(engine, router)})

    @app.get("/v1/models/<path:model>")
    def model(model: str):
        found = next((m for m in list_models(engine, router) if m["id"] == model), None)
        if found is None:
            router.resolve(model)   # says why, in the words of a request
            raise ServingError(404, "model_not_found", f"model {model!r} is not listed", "model")
        return jsonify(found)

    def run(kind: str, req: _Request, prompt_ids_of) -> Response:
        user = request.headers.get(USER_HEADER) or req.user
        target = router.resolve(req.model, user)
        labels = _labels(target)
        if target.arm is not None:
            metrics.split.labels(target.name, target.arm, target.version).inc()
        max_tokens = (getattr(req, "max_completion_tokens", None) or req.max_tokens or max_tokens_default)
        if max_tokens > max_tokens_limit:
            raise ServingError(400, "invalid_request", f"max_tokens {max_tokens} is above this server's limit "
                               f"({max_tokens_limit}, ftpipe serve --max-tokens-limit)", "max_tokens")
        prompt_ids = prompt_ids_of()
        engine.check_length(prompt_ids, max_tokens)
        engine.fetch(target)
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stops(),
                            seed=req.seed)
        shape = _Shape(kind, target.label)
        started = time.perf_counter()
        pieces = engine.stream(target, prompt_ids, sampling, recheck=lambda t: router.version(t.name, t.version))
        log = {"model": labels[0], "version": labels[1], "endpoint": kind, "stream": req.stream,
               "arm": target.arm, "user": _pseudonym(user)}

        def account(finished: Finished, first_token_s: float | None) -> None:
            total = time.perf_counter() - started
            metrics.requests.labels(*labels, kind, "200").inc()
            metrics.latency.labels(*labels, kind).observe(total)
            metrics.queue_wait.labels(*labels).observe(finished.queued_s)
            metrics.swap.labels(*labels).observe(finished.swap_s)
            metrics.prompt_tokens.labels(*labels).inc(finished.prompt_tokens)
            metrics.completion_tokens.labels(*labels).inc(finished.completion_tokens)
            if finished.generation_s > 0 and finished.completion_tokens:
                metrics.tokens_per_s.labels(*labels).observe(finished.completion_tokens / finished.generation_s)
            if first_token_s is not None:
                metrics.first_token.labels(*labels).observe(first_token_s)
            if finished.loaded:
                metrics.loads.labels(*labels).inc()
                metrics.load_seconds.labels(*labels).observe(finished.swap_s)
            _log.info("served", extra={**log, "prompt_tokens": finished.prompt_tokens,
                                       "completion_tokens": finished.completion_tokens, "latency_s": round(total, 3),
                                       "queued_s": round(finished.queued_s, 3), "loaded": finished.loaded,
                                       "evicted": ",".join(finished.evicted) or None})

        if not req.stream:
            text, finished = [], None
            for piece in pieces:
                if isinstance(piece, Finished):
                    finished = piece
                else:
                    text.append(piece)
            account(finished, None)
            return jsonify(shape.whole("".join(text), finished))

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def events() -> Iterator[str]:
            first_token_s = None
            try:
                yield _sse(shape.chunk(None, None, first=True))
                for piece in pieces:
                    if isinstance(piece, Finished):
                        account(piece, first_token_s)
                        yield _sse(shape.chunk(None, piece.finish_reason))
                        if include_usage:
                            yield _sse(shape.usage_chunk(piece))
                    else:
                        if first_token_s is None:
                            first_token_s = time.perf_counter() - started
                        yield _sse(shape.chunk(piece, None))
            except ServingError as exc:   # after the headers went out: an error event, as OpenAI sends one
                metrics.requests.labels(*labels, kind, str(exc.status)).inc()
                yield _sse({"error": _error_body(exc.status, str(exc), exc.code, exc.param)})
            except Exception as exc:  # noqa: BLE001 - the stream is open: report, do not crash the worker
                _log.exception("streamed generation failed", extra=log)
                metrics.requests.labels(*labels, kind, "500").inc()
                yield _sse({"error": _error_body(500, f"internal error: {type(exc).__name__}", "internal_error")})
            finally:
                pieces.close()
            yield "data: [DONE]\n\n"

        return Response(events(), content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def counted(kind: str, handler):
        """Count refused requests too, by the model asked for where the registry knows it, else as
        "unknown" (Router.metric_labels): a request's body never makes a label value of its own."""
        def wrapped():
            try:
                return handler()
            except ServingError as exc:
                body = request.get_json(silent=True)
                asked = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else ""
                metrics.requests.labels(*router.metric_labels(asked), kind, str(exc.status)).inc()
                raise
        wrapped.__name__ = f"{kind}_endpoint"
        return wrapped

    def chat():
        req = _parse(ChatRequest)
        return run("chat", req, lambda: engine.prompt_ids(messages=[m.plain() for m in req.messages]))

    def completion():
        req = _parse(CompletionRequest)
        return run("completion", req, lambda: engine.prompt_ids(prompt=req.prompt))

    app.post("/v1/chat/completions")(counted("chat", chat))
    app.post("/v1/completions")(counted("completion", completion))
    return app


def list_models(engine: Engine, router: Router) -> list[dict]:
    """The base model, then every servable version of a model fine-tuned on it (NAME@VERSION), and
    NAME itself where it has a production version (or a split)."""
    created = int(time.time())
    out = [{"id": engine.base_ref, "object": "model", "created": created, "owned_by": "ftpipe", "root": engine.base_ref,
            "parent": None, "loaded": True}]
    loaded = set(engine.loaded)
    for entry in reg.list_models(router.view.docs):
        model = router.view.model(entry["name"])
        aliases = model.get("aliases", {})
        versions = []
        for doc in model["versions"]:
            try:
                check_servable(doc, router.base_ref, router.base_sha256)
            except ServingError:
                continue
            versions.append(doc)
        if not versions:
            continue
        if "production" in aliases or entry["name"] in router.splits:
            out.append({"id": entry["name"], "object": "model", "created": created, "owned_by": "ftpipe",
                        "root": f"{entry['name']}@{aliases['production']}" if "production" in aliases else None,
                        "parent": engine.base_ref, "split": _split(router, entry["name"])})
        for doc in versions:
            out.append({"id": f"{entry['name']}@{doc['version']}", "object": "model",
                        "created": int(doc.get("registered_at") or created), "owned_by": "ftpipe",
                        "root": f"{entry['name']}@{doc['version']}", "parent": engine.base_ref,
                        "status": doc["status"], "aliases": doc.get("aliases", []),
                        "loaded": (entry["name"], doc["version"]) in loaded})
    return out


def _split(router: Router, name: str) -> dict | None:
    arms = router.splits.get(name)
    return None if arms is None else {arm: weight for arm, weight in arms}


def _labels(target: Target) -> tuple[str, str]:
    return (target.name, target.version or "base")


def _pseudonym(user: str | None) -> str | None:
    """A user key as logs may carry it: a short hash, enough to follow one user's requests."""
    return None if user is None else hashlib.sha256(user.encode()).hexdigest()[:12]


class _Shape:
    """OpenAI's response and chunk bodies for one request."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finished: Finished) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finished.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(finished)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finished.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(finished)}

    def chunk(self, text: str | None, finish_reason: str | None, *, first: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, finished: Finished) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(finished)}


def _usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    return {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}


def _error(status: int, message: str, code: str | None, param: str | None = None) -> tuple[Response, int]:
    resp = jsonify({"error": _error_body(status, message, code, param)})
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="ftpipe"'
    return resp, status

