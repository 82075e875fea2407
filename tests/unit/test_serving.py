"""`ftpipe serve` (services/serving/): a real HTTP server on a free port over the tiny random model,
real LoRA adapters built with PEFT, registered through shared/domain/model_registry's functions with their
bundles in the local store, and the registry's events on the local bus. Routing by version, alias
and A/B split; hot-swapping without reloading the base; the LRU; promotion and quarantine events;
streaming read by the `openai` client; auth; metrics."""
import functools
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from shared.domain import model_registry as reg
from shared.domain.access import Caller
from shared.domain.models import TINY, base_model_identity, resolve_model
from shared.platform.auth import local_token
from shared.platform.config import Settings, bootstrap
from tests.unit.governance import ADMIN, token

from services.serving.routing import parse_split, rank_arms
from services.serving.server import Server, ServingConfig


def admin(name: str) -> Caller:
    """A caller who may do anything (an admin), recorded as `name`."""
    return Caller(subject=name, admin=True)


NAME, AB = "support-bot", "ab-bot"
BUCKET = "ftpipe"
HELLO = [{"role": "user", "content": "Where is my order?"}]
SPLIT = {AB: parse_split(f"{AB}=1.1:3,1.2:1")[1]}


@functools.cache
def base_sha256(ref: str) -> str:
    return base_model_identity(ref)["sha256"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[Path]:
    """Three LoRA adapters of the tiny model with random A and B (B = 0 would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
        folder = tmp_path_factory.mktemp(f"lora{seed}")
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                         init_lora_weights=False)).save_pretrained(folder)
        out.append(folder)
    return out


def add_version(adapters, name: str, run_id: str, lora: Path, *, passed=True, approval=False, base=TINY,
                digests=True) -> str:
    """A version as the registry leaves it: adapter files and bundle.json (with their sha256) in the
    store, the documents written by allocate_version / register_version, with the digests of the
    adapter files and of bundle.json (`digests` False: a version registered before they were kept)."""
    version = reg.allocate_version(adapters.docs, name, run_id, base)
    prefix = f"models/{name}/{version}"
    files = []
    for path in sorted(lora.iterdir()):
        data = path.read_bytes()
        adapters.store.write(BUCKET, f"{prefix}/adapter/{path.name}", data)
        files.append({"name": f"adapter/{path.name}", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    bundle = json.dumps({"name": name, "version": version, "files": files}).encode()
    adapters.store.write(BUCKET, f"{prefix}/bundle.json", bundle)
    doc = {"name": name, "version": version, "run_id": run_id, "uri": adapters.store.url(BUCKET, prefix + "/"),
           "base_model": base, "base_model_sha256": base_sha256(base),
           "evaluation": {"passed": passed}}
    if digests:
        doc.update(adapter_files=files, bundle_sha256=hashlib.sha256(bundle).hexdigest())
    reg.register_version(adapters.docs, doc, passed=passed, reasons=[] if passed else ["worse than base"],
                         approval=approval)
    return version


class Stack:
    def __init__(self, tmp_path: Path, loras: list[Path], **config):
        self.adapters = bootstrap(Settings(state_dir=tmp_path / "state"))
        # support-bot: 1.1 in production; 1.2 and 1.3 candidates waiting for approval (staging -> 1.3);
        # 1.4 failed the gate. ab-bot: 1.1 in production, 1.2 a candidate.
        add_version(self.adapters, NAME, "r1", loras[0])
        add_version(self.adapters, NAME, "r2", loras[1], approval=True)
        add_version(self.adapters, NAME, "r3", loras[2], approval=True)
        add_version(self.adapters, NAME, "r4", loras[2], passed=False)
        add_version(self.adapters, AB, "a1", loras[0])
        add_version(self.adapters, AB, "a2", loras[1], approval=True)
        # The server runs with serving's own rights, as `ftpipe serve` does: the registry's documents
        # read-only, its ledger in a database of its own, nothing to publish but its notices.
        self.serving_adapters = bootstrap(self.adapters.settings, service="serving")
        self.server = Server(self.serving_adapters, ServingConfig(base=TINY, **config)).start()
        self.engine = self.server.engine
        self.token = local_token(self.adapters.settings.state_dir)
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, body: dict, headers=None) -> requests.Response:
        return requests.post(self.server.url + path, json=body, headers={**self.auth, **(headers or {})}, timeout=60)

    def chat(self, model: str, max_tokens: int = 8, **extra) -> dict:
        resp = self.post("/v1/chat/completions", {"model": model, "messages": HELLO, "max_tokens": max_tokens,
                                                  "temperature": 0, **extra})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def close(self) -> None:
        self.server.stop()
        self.serving_adapters.close()
        self.adapters.close()


@pytest.fixture
def stack(tmp_path, loras):
    """A server of its own, for tests that change the registry or count."""
    s = Stack(tmp_path, loras, max_adapters=2, splits=SPLIT)
    yield s
    s.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, loras):
    """One server for the tests that only read."""
    s = Stack(tmp_path_factory.mktemp("shared"), loras, max_adapters=2, splits=SPLIT)
    yield s
    s.close()


def expected_reply(lora: Path | None, max_tokens: int = 8) -> str:
    """What plain PEFT generation on a freshly loaded base answers (greedy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TINY))
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32).eval()
    if lora is not None:
        model = PeftModel.from_pretrained(model, str(lora)).eval()
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def wait_for(condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metric(stack: Stack, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(stack.server.url + "/metrics", headers=stack.auth, timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def error(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


# ------------------------------------------------------------------ tests

def test_routing_by_version_alias_and_name_serves_that_versions_adapter(served, loras):
    assert served.chat(f"{NAME}@1.2")["model"] == f"{NAME}@1.2"
    assert served.chat(f"{NAME}@staging")["model"] == f"{NAME}@1.3"
    assert served.chat(f"{NAME}@production")["model"] == f"{NAME}@1.1"
    plain = served.chat(NAME)
    assert plain["model"] == f"{NAME}@1.1" and plain["object"] == "chat.completion"
    assert plain["usage"]["completion_tokens"] == 8 and plain["choices"][0]["finish_reason"] == "length"
    # Each version answers exactly as its adapter does on the base in plain PEFT; the base as the base.
    assert plain["choices"][0]["message"]["content"] == expected_reply(loras[0])
    assert served.chat(TINY)["choices"][0]["message"]["content"] == expected_reply(None)

    listed = {m["id"]: m for m in requests.get(served.server.url + "/v1/models", headers=served.auth).json()["data"]}
    assert {TINY, NAME, f"{NAME}@1.1", f"{NAME}@1.2", f"{NAME}@1.3", AB} <= set(listed)
    assert f"{NAME}@1.4" not in listed                       # quarantined: never offered
    assert listed[NAME]["root"] == f"{NAME}@1.1" and listed[f"{NAME}@1.3"]["aliases"] == ["staging"]
    assert listed[AB]["split"] == {"1.1": 3.0, "1.2": 1.0}


@pytest.mark.parametrize("body, status, code, says", [
    ({"model": "no-such-bot"}, 404, "model_not_found", "no model 'no-such-bot'; registered models: ab-bot, support-bot"),
    ({"model": f"{NAME}@1.9"}, 404, "model_not_found", "has no version 1.9; its versions: 1.4, 1.3, 1.2, 1.1"),
    ({"model": f"{NAME}@latest"}, 404, "model_not_found", "after '@' comes a version (MAJOR.MINOR) or an alias"),
    ({"model": f"{NAME}@1.4"}, 403, "model_quarantined", "is quarantined (worse than base)"),
    ({"model": NAME, "messages": []}, 400, "invalid_request", "messages: List should have at least 1 item"),
    ({"model": NAME, "n": 2}, 400, "invalid_request", "only n=1 is supported"),
    ({"model": NAME, "temperature": 5}, 400, "invalid_request", "temperature: Input should be less than or equal to 2"),
    ({"model": NAME, "max_tokens": 100000}, 400, "invalid_request", "above this server's limit (2048"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request", "messages.0.role"),
])
def test_bad_requests_and_unknown_models_get_openai_errors_that_say_what_to_do(served, body, status, code, says):
    resp = served.post("/v1/chat/completions", {"messages": HELLO, **body})
    found = error(resp, status)
    assert found["code"] == code and says in found["message"], found


def test_a_body_that_is_not_json_is_a_400(served):
    resp = requests.post(served.server.url + "/v1/completions", data="{", headers=served.auth, timeout=10)
    assert "must be a JSON object" in error(resp, 400)["message"]


def test_hot_swap_between_adapters_changes_outputs_without_reloading_the_base(stack):
    base = stack.engine.base
    replies = [stack.chat(model)["choices"][0]["message"]["content"]
               for model in (f"{NAME}@1.1", f"{NAME}@1.2", f"{NAME}@1.1", f"{NAME}@1.2")]
    assert replies[0] == replies[2] and replies[1] == replies[3] and replies[0] != replies[1]
    assert stack.engine.base is base and stack.engine.model.base_model.model is base
    assert stack.engine.base_loads == 1 and metric(stack, "ftpipe_serving_base_model_loads") == 1
    assert metric(stack, "ftpipe_serving_adapter_loads_total", model=NAME, version="1.1") == 1   # swapped, not reloaded
    assert metric(stack, "ftpipe_serving_adapter_swap_seconds_count", model=NAME, version="1.1") == 2


def test_lru_keeps_max_adapters_and_evicts_the_least_recently_used(stack):
    first = stack.chat(f"{NAME}@1.1")["choices"][0]["message"]["content"]
    for version in ("1.2", "1.3"):
        stack.chat(f"{NAME}@{version}")
    assert list(stack.engine.loaded) == [(NAME, "1.2"), (NAME, "1.3")]
    assert metric(stack, "ftpipe_serving_adapter_evictions_total", model=NAME, version="1.1") == 1
    stack.chat(f"{NAME}@1.2")                               # 1.2 is now the most recently used …
    again = stack.chat(f"{NAME}@1.1")["choices"][0]["message"]["content"]
    assert list(stack.engine.loaded) == [(NAME, "1.2"), (NAME, "1.1")]   # … so 1.3 went
    assert again == first and metric(stack, "ftpipe_serving_adapter_loads_total", model=NAME, version="1.1") == 2
    assert metric(stack, "ftpipe_serving_adapters_loaded") == 2


def test_ab_split_proportions_follow_the_weights_and_assignment_is_sticky():
    arms = parse_split("ab-bot=1.1:3,1.2:1")[1]
    keys = [f"user-{i}" for i in range(4000)]
    first = {k: rank_arms(AB, arms, k)[0] for k in keys}
    share = sum(arm == "1.1" for arm in first.values()) / len(keys)
    assert abs(share - 0.75) < 0.03, share          # binomial sd 0.007
    assert all(rank_arms(AB, arms, k)[0] == first[k] for k in keys[:200])
    # A third arm takes its share from both others, and moves nobody between them.
    three = parse_split("ab-bot=1.1:3,1.2:1,1.3:1")[1]
    moved = [k for k in keys if rank_arms(AB, three, k)[0] not in (first[k], "1.3")]
    assert moved == []
    with pytest.raises(ValueError, match="must be VERSION:WEIGHT or ALIAS:WEIGHT"):
        parse_split("ab-bot=1.1:0")


def test_ab_split_over_http_is_sticky_per_user_and_an_arm_quarantined_sends_its_users_to_the_other(stack):
    users = [f"customer-{i}" for i in range(20)]

    def arm_of(user: str, via_header: bool = False) -> str:
        body = {"model": AB, "messages": HELLO, "max_tokens": 1}
        if via_header:
            return stack.post("/v1/chat/completions", body, headers={"X-FTPIPE-User": user}).json()["model"]
        return stack.post("/v1/chat/completions", {**body, "user": user}).json()["model"]

    arms = {u: arm_of(u) for u in users}
    assert {u: arm_of(u, via_header=True) for u in users} == arms          # sticky, by field or header
    assert set(arms.values()) == {f"{AB}@1.1", f"{AB}@1.2"}
    assert metric(stack, "ftpipe_serving_split_assignments_total", model=AB) == 40
    assert metric(stack, "ftpipe_serving_split_assignments_total", model=AB, arm="1.2") == 2 * sum(
        v == f"{AB}@1.2" for v in arms.values())

    reg.quarantine(stack.adapters.docs, stack.adapters.bus, AB, "1.2", caller=admin("ann"), reason="unsafe answers")
    wait_for(lambda: stack.server.router.view._models.get(AB) is None or
             stack.server.router.view.model(AB)["versions"][0]["status"] == "quarantined", "the quarantine event")
    assert all(arm_of(u) == f"{AB}@1.1" for u in users)


def test_a_promotion_event_loads_the_new_version_and_the_archived_one_leaves(stack):
    assert stack.chat(NAME)["model"] == f"{NAME}@1.1"
    assert (NAME, "1.1") in stack.engine.loaded and (NAME, "1.2") not in stack.engine.loaded
    reg.approve(stack.adapters.docs, stack.adapters.bus, NAME, "1.2", caller=admin("ann"))   # production -> 1.2
    wait_for(lambda: (NAME, "1.2") in stack.engine.loaded, "the promoted version to be loaded")
    wait_for(lambda: (NAME, "1.1") not in stack.engine.loaded, "the archived version to be dropped")
    assert metric(stack, "ftpipe_serving_adapter_loads_total", model=NAME, version="1.2") == 0  # before any request
    assert stack.chat(NAME)["model"] == f"{NAME}@1.2"
    found = error(stack.post("/v1/chat/completions", {"model": f"{NAME}@1.1", "messages": HELLO}), 404)
    assert found["code"] == "model_not_servable" and "is archived" in found["message"]


def test_a_quarantined_version_is_dropped_and_refused(stack):
    stack.chat(f"{NAME}@1.3")
    assert (NAME, "1.3") in stack.engine.loaded
    reg.quarantine(stack.adapters.docs, stack.adapters.bus, NAME, "1.3", caller=admin("ann"), reason="leaks card numbers")
    wait_for(lambda: (NAME, "1.3") not in stack.engine.loaded, "the quarantined version to be dropped")
    found = error(stack.post("/v1/chat/completions", {"model": f"{NAME}@1.3", "messages": HELLO}), 403)
    assert found["code"] == "model_quarantined" and "quarantined (leaks card numbers)" in found["message"]
    assert "no staging version" in error(stack.post("/v1/chat/completions",
                                                    {"model": f"{NAME}@staging", "messages": HELLO}), 404)["message"]


def test_streaming_is_read_by_the_openai_client_and_matches_the_whole_answer(served):
    from openai import OpenAI

    client = OpenAI(base_url=served.server.url + "/v1", api_key=served.token, max_retries=0)
    whole = client.chat.completions.create(model=f"{NAME}@1.2", messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=f"{NAME}@1.2", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and {c.model for c in chunks} == {f"{NAME}@1.2"}

    completion = client.completions.create(model=f"{NAME}@1.2", prompt="Refund, please.", max_tokens=6, temperature=0)
    streamed = client.completions.create(model=f"{NAME}@1.2", prompt="Refund, please.", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    # A stop string ends the answer before it, streamed or not.
    stop = whole.choices[0].message.content[4:7]
    cut = client.chat.completions.create(model=f"{NAME}@1.2", messages=HELLO, max_tokens=12, temperature=0, stop=[stop])
    streamed_cut = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=f"{NAME}@1.2", messages=HELLO, max_tokens=12, temperature=0, stop=[stop], stream=True) if c.choices)
    assert cut.choices[0].message.content == streamed_cut == whole.choices[0].message.content.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"


def test_the_event_stream_on_the_wire(served):
    resp = requests.post(served.server.url + "/v1/chat/completions", headers=served.auth, stream=True, timeout=60,
                         json={"model": NAME, "messages": HELLO, "max_tokens": 3, "stream": True})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    bodies = [json.loads(line[6:]) for line in events[:-1]]
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {b["object"] for b in bodies} == {"chat.completion.chunk"} and len({b["id"] for b in bodies}) == 1


def test_every_route_but_healthz_needs_the_bearer_token(served):
    from openai import AuthenticationError, OpenAI

    for method, path in (("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("get", "/v1/models"),
                         ("get", "/metrics")):
        resp = getattr(requests, method)(served.server.url + path, json={"model": NAME}, timeout=10)
        assert "Authorization: Bearer" in error(resp, 401)["message"]
        wrong = getattr(requests, method)(served.server.url + path, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert "unknown or revoked bearer token" in error(wrong, 401)["message"]
    assert requests.get(served.server.url + "/healthz", timeout=10).status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served.server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_local_caller_needs_at_least_viewer(served):
    from shared.domain import access

    docs = served.adapters.docs
    viewer = token(docs, "looker", "viewer")
    assert requests.get(served.server.url + "/v1/models", headers={"Authorization": f"Bearer {viewer}"},
                        timeout=10).status_code == 200
    nobody = token(docs, "nobody", "viewer")
    access.revoke(docs, ADMIN, "token:nobody", "viewer", "default")   # a token that holds no role
    resp = requests.get(served.server.url + "/v1/models", headers={"Authorization": f"Bearer {nobody}"}, timeout=10)
    assert "you need viewer" in error(resp, 403)["message"]


def test_metrics_count_requests_tokens_and_latency_per_adapter(stack):
    for _ in range(2):
        stack.chat(f"{NAME}@1.2", max_tokens=4)
    stack.chat(NAME, max_tokens=4)
    stack.post("/v1/chat/completions", {"model": f"{NAME}@1.4", "messages": HELLO})
    assert metric(stack, "ftpipe_serving_requests_total", model=NAME, version="1.2", status="200") == 2
    assert metric(stack, "ftpipe_serving_requests_total", model=NAME, version="1.1", status="200") == 1
    assert metric(stack, "ftpipe_serving_requests_total", model=NAME, version="1.4", status="403") == 1
    assert metric(stack, "ftpipe_serving_completion_tokens_total", model=NAME, version="1.2") == 8
    assert metric(stack, "ftpipe_serving_request_latency_seconds_count", model=NAME, version="1.2") == 2
    assert metric(stack, "ftpipe_serving_tokens_per_second_count", model=NAME, version="1.2") == 2
    assert metric(stack, "ftpipe_serving_tokens_per_second_sum", model=NAME, version="1.2") > 0


def test_an_adapter_rewritten_with_its_bundle_in_the_bucket_is_refused_and_the_others_serve(stack, loras, caplog):
    """A writer of the bucket swaps 1.2's weights for other valid ones and rewrites bundle.json to
    match: the registry's digests catch it; the server says so, logs it and serves everything else."""
    prefix = f"models/{NAME}/1.2"
    other = (loras[0] / "adapter_model.safetensors").read_bytes()
    stack.adapters.store.write(BUCKET, f"{prefix}/adapter/adapter_model.safetensors", other)
    bundle = json.loads(stack.adapters.store.read(BUCKET, f"{prefix}/bundle.json"))
    for entry in bundle["files"]:
        if entry["name"] == "adapter/adapter_model.safetensors":
            entry.update(sha256=hashlib.sha256(other).hexdigest(), size=len(other))
    stack.adapters.store.write(BUCKET, f"{prefix}/bundle.json", json.dumps(bundle).encode())

    for stream in (False, True):   # streamed too: refused before the response starts
        found = error(stack.post("/v1/chat/completions", {"model": f"{NAME}@1.2", "messages": HELLO,
                                                          "stream": stream}), 409)
        assert found["code"] == "model_integrity" and "bundle.json was altered after registration" in found["message"]
    assert (NAME, "1.2") not in stack.engine.loaded
    assert any(r.getMessage().startswith("adapter refused: ") and r.levelname == "ERROR" for r in caplog.records)
    assert metric(stack, "ftpipe_serving_requests_total", model=NAME, version="1.2", status="409") == 2
    assert stack.chat(f"{NAME}@1.1")["model"] == f"{NAME}@1.1"          # an untouched version loads
    # Approved into production, the tampered version is not preloaded either (logged, not crashed).
    reg.approve(stack.adapters.docs, stack.adapters.bus, NAME, "1.2", caller=admin("ann"))
    wait_for(lambda: stack.server.router.view._models.get(NAME) is None
             or stack.server.router.view.model(NAME)["aliases"]["production"] == "1.2", "the promotion event")
    assert error(stack.post("/v1/chat/completions", {"model": NAME, "messages": HELLO}), 409)["code"] == \
        "model_integrity"
    assert requests.get(stack.server.url + "/healthz", timeout=10).status_code == 200


def test_a_version_registered_without_digests_is_refused_until_sealed(stack, loras):
    add_version(stack.adapters, "legacy-bot", "l1", loras[0], digests=False)
    found = error(stack.post("/v1/chat/completions", {"model": "legacy-bot", "messages": HELLO}), 409)
    assert found["code"] == "model_unverified" and "`ftpipe models seal legacy-bot 1.1`" in found["message"]
    reg.seal(stack.adapters.docs, stack.adapters.store, "legacy-bot", "1.1", caller=ADMIN)
    # No restart, no event: the download is checked against the registry's current document.
    assert stack.chat("legacy-bot")["model"] == "legacy-bot@1.1"


def test_unknown_model_names_add_no_metric_label_values(stack):
    """Refused requests are counted by what the registry knows, never by what a body says."""
    import random
    import string

    def label_values() -> set[tuple[str, str]]:
        return {(k, v) for family in stack.server.metrics.registry.collect() for sample in family.samples
                for k, v in sample.labels.items()}

    rng = random.Random(21)

    def garbage() -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits + "-_.@", k=rng.randint(1, 40)))

    session = requests.Session()
    session.headers.update(stack.auth)

    def ask(model: str, **extra) -> None:
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        body = {"model": model, "messages": HELLO, "prompt": "Hi", "max_tokens": 1, **extra}
        assert session.post(stack.server.url + path, json=body, timeout=30).status_code in (400, 403, 404)

    ask("no-such-bot")
    ask(f"{NAME}@9.9")
    ask(f"{NAME}@1.4")                                      # a known, quarantined version: its own label
    ask("no-such-bot", n=2)                                 # a 400: statuses are a fixed set too
    before = label_values()
    for i in range(1000):
        name = garbage()
        ask(rng.choice([name, f"{NAME}@{name}", f"{name}@1.1", f"{name}@production"]),
            **({"n": 2} if i % 5 == 0 else {}))             # refused for its body, before any routing too
    assert label_values() == before
    assert ("version", "1.4") in before and ("model", "unknown") in before
    total = metric(stack, "ftpipe_serving_requests_total")
    assert total == 1004 and metric(stack, "ftpipe_serving_requests_total", model="unknown") + metric(
        stack, "ftpipe_serving_requests_total", model=NAME) == total


def test_ftpipe_serve_serves_until_sigterm(tmp_path, loras):
    """The CLI command in this process (its imports are paid already): it serves, then returns 0 on
    SIGTERM, which a helper thread sends once a request went through."""
    from ftpipe.cli import main

    state = tmp_path / "state"
    adapters = bootstrap(Settings(state_dir=state))
    add_version(adapters, NAME, "r1", loras[0])
    adapters.close()
    api = state / "services" / "serving.json"
    answer = {}

    def client() -> None:
        try:
            wait_for(api.is_file, "the server's address", timeout_s=60)
            url = json.loads(api.read_text())["url"]
            answer["resp"] = requests.post(url + "/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2},
                                           headers={"Authorization": f"Bearer {local_token(state)}"}, timeout=60)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=client)
    thread.start()
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["serve", "--state", str(state), "--base", TINY, "--split", f"{NAME}=production:1"]) == 0
    thread.join()
    assert answer["resp"].status_code == 200 and answer["resp"].json()["model"] == f"{NAME}@1.1", answer["resp"].text
    assert not api.exists() and signal.getsignal(signal.SIGTERM) is previous
    assert main(["serve", "--state", str(state), "--split", "x=1.1"]) == 2
