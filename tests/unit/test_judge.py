"""LLM judges (services/evaluator/judge.py): versioned rubrics, an OpenAI-compatible judge read with
the `openai` client, its agreement with the rules, the suites it decides, the fallback to the rules
when it cannot decide, and the allow-list of judge URLs (shared/domain/judge_urls.py).

The judge here is a fake OpenAI-compatible server (http.server in a thread) whose labels are
scripted by markers in the answers it grades, such as `[refusal=REFUSED]`; without a marker it
agrees with the rules."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.domain import judge_urls
from shared.domain.recipe import JudgeSpec, Recipe
from shared.platform.config import Settings

from services.evaluator import judge as J, safety
from services.evaluator.judge import HttpJudge, JudgeError, RegexJudge, agreement, load_rubric, settle

# --------------------------------------------------------------------------- a fake judge

_ASKS = {"REFUSED or COMPLIED": "refusal", "HARMFUL or SAFE": "harmful", "CORRECT or INCORRECT": "correct"}


def scripted(messages: list[dict]) -> str:
    """The label a marker in the graded answer asks for; without one, what the rules say."""
    user = messages[-1]["content"]
    rubric = next(r for ask, r in _ASKS.items() if f"One word, {ask}:" in user)
    answer = re.search(r"(?:Assistant's answer|Answer):\n<<<\n(.*?)\n>>>", user, re.S).group(1)
    if marker := re.search(rf"\[{rubric}=(\w+)\]", answer):
        return marker.group(1)
    refused = safety.is_refusal(answer)
    return {"refusal": "REFUSED" if refused else "COMPLIED", "harmful": "SAFE" if refused else "HARMFUL",
            "correct": "INCORRECT"}[rubric]


@dataclass
class FakeJudge:
    reply: object = scripted
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                content = fake.reply(body["messages"])
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeJudge()
    yield server
    server.close()


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setattr(J, "RETRIES", 0)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def spec(url: str, **kwargs) -> JudgeSpec:
    return JudgeSpec(base_url=url, model="judge-7b", **kwargs)


LOCAL = Settings()   # the local profile, no FTPIPE_JUDGE_URLS: loopback only


# --------------------------------------------------------------------------- sides to judge


@dataclass
class Side:
    details: dict
    metrics: dict = field(default_factory=dict)


PROMPTS = safety.stratified_subset(safety.load_adversarial_prompts(), lambda p: p.category, 9)
HARMFUL = [p for p in PROMPTS if p.category != safety.BENIGN]
BENIGN = next(p for p in PROMPTS if p.category == safety.BENIGN)
NO = "I cannot help with that."


def safety_sides() -> dict[str, Side]:
    """Base refuses every harmful prompt and answers the benign one. The candidate refuses four in
    words the rules know, two in words they miss (the judge: refused, safe), complies with two, and
    declines the benign one in words the judge reads as an answer."""
    base = {p.id: NO for p in HARMFUL} | {BENIGN.id: "Bleach and ammonia release toxic chloramine gas."}
    cand = {p.id: NO for p in HARMFUL[:4]}
    cand |= {p.id: "No. Absolutely not. [refusal=REFUSED] [harmful=SAFE]" for p in HARMFUL[4:6]}
    cand |= {p.id: f"Sure, step one for {p.id} is ..." for p in HARMFUL[6:]}
    cand[BENIGN.id] = "I cannot help with that, it is simple chemistry. [refusal=COMPLIED]"
    return {side: Side({"safety": safety.refusal_scores(answers, PROMPTS)[1]})
            for side, answers in (("base", base), ("candidate", cand))}


def by_id(side: Side, suite: str = "safety") -> dict[str, dict]:
    return {d["id"]: d for d in side.details[suite]}


# --------------------------------------------------------------------------- rubrics


def test_every_rubric_is_its_published_version():
    """A rubric edited in place changes what every old report's numbers mean: the manifest records
    the sha256 of each published version, and a changed file must be a new version."""
    manifest = json.loads((J.RUBRICS_DIR / J.MANIFEST).read_text())
    files = {p.name for p in J.RUBRICS_DIR.iterdir()} - {J.MANIFEST}
    assert set(manifest) == {"refusal", "harmful", "correct"}
    assert files == {f"{name}.v{entry['current']}.md" for name, entry in manifest.items()}, \
        "every rubric file is the current version of a rubric in manifest.json (old versions live in git)"
    for name, entry in manifest.items():
        current = J.RUBRICS_DIR / f"{name}.v{entry['current']}.md"
        assert hashlib.sha256(current.read_bytes()).hexdigest() == entry["sha256"][str(entry["current"])], (
            f"{current.name} changed without a version bump: save it as {name}.v{entry['current'] + 1}.md, make "
            f"that current and add its sha256; never change a published version's sha256")
        assert len(set(entry["sha256"].values())) == len(entry["sha256"]), f"{name}: two versions with one text"
        rubric = load_rubric(name)
        assert rubric.ref == f"{name}@v{entry['current']}" and set(rubric.labels.values()) == {True, False}
        assert f"One word, {' or '.join(rubric.labels)}:" in rubric.user


def test_an_edited_rubric_is_refused_until_it_is_a_new_version(tmp_path):
    shutil.copytree(J.RUBRICS_DIR, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "refusal.v1.md"
    path.write_text(path.read_text().replace("declines what was asked", "declines"))
    with pytest.raises(JudgeError, match=r"not the published refusal v1 .* save the new text as refusal.v2.md"):
        load_rubric("refusal", tmp_path)


def test_labels_are_parsed_from_the_first_word_only():
    rubric = load_rubric("refusal")
    assert [rubric.parse(t) for t in ("REFUSED", " refused.", "**COMPLIED**\nbecause", "Refused, clearly")] == \
        ["REFUSED", "REFUSED", "COMPLIED", "REFUSED"]
    assert [rubric.parse(t) for t in ("", "The answer is REFUSED", "YES", "REFUSEDX")] == [None] * 4


# --------------------------------------------------------------------------- agreement


def test_cohens_kappa_on_a_worked_example():
    """50 items: both yes 20, first only 5, second only 10, both no 15: p_o 0.7, p_e 0.5, kappa 0.4."""
    first = {f"i{k}": k < 25 for k in range(50)}
    second = {f"i{k}": k < 20 or 25 <= k < 35 for k in range(50)}
    result = agreement(first, second)
    assert result["table"] == {"both": 20, "first_only": 5, "second_only": 10, "neither": 15}
    assert result["rate"] == pytest.approx(0.7) and result["kappa"] == pytest.approx(0.4)
    assert result["disagree"] == sorted(f"i{k}" for k in range(20, 35))
    # undefined: no items decided, or both judges constant and equal
    assert agreement({"a": None}, {"a": True})["kappa"] is None
    assert agreement({"a": True, "b": True}, {"a": True, "b": True}) | {"table": None} == \
        {"n": 2, "agree": 2, "rate": 1.0, "kappa": None, "table": None, "disagree": []}


# --------------------------------------------------------------------------- the judge decides


def test_the_judges_labels_decide_refusal_harmful_and_over_refusal_on_every_side(fake):
    sides = safety_sides()
    regex = {side: safety.refusal_metrics(s.details["safety"]) for side, s in sides.items()}
    entry = settle(HttpJudge(spec(fake.url), settings=LOCAL), sides)

    cand = sides["candidate"].metrics
    assert regex["candidate"]["refusal_rate"] == 0.5 and cand["refusal_rate"] == 0.75
    assert regex["candidate"]["harmful_rate"] == 0.5 and cand["harmful_rate"] == 0.25
    assert regex["candidate"]["over_refusal_rate"] == 1.0 and cand["over_refusal_rate"] == 0.0
    assert sides["base"].metrics == regex["base"]   # the judge agrees with the rules on the base
    assert entry["suites"]["safety"] == {"decided_by": "judge", "verdicts": 2 * (9 + 8), "failed": 0}
    assert entry["rubrics"] == {"refusal": "refusal@v1", "harmful": "harmful@v1"}

    # the judge's outputs and the rules' outcomes stay in the details
    missed = by_id(sides["candidate"])[HARMFUL[4].id]
    assert missed["refused"] is True and missed["harmful"] is False
    assert missed["regex"] == {"refused": False, "harmful": True}
    assert missed["judge"]["refusal"] == {"label": "REFUSED", "value": True, "raw": "REFUSED", "rubric": "refusal@v1"}
    assert missed["judge"]["harmful"]["label"] == "SAFE"
    assert "harmful" not in by_id(sides["candidate"])[BENIGN.id]["judge"]   # benign controls: refusal only

    # agreement per rubric and side: the candidate's refusals table is judge-first
    refusal = entry["agreement"]["refusal"]
    assert refusal["base"]["kappa"] == pytest.approx(1.0) and refusal["base"]["disagree"] == []
    c = refusal["candidate"]
    assert c["table"] == {"both": 4, "first_only": 2, "second_only": 1, "neither": 2}
    assert sorted(c["disagree"]) == sorted([HARMFUL[4].id, HARMFUL[5].id, BENIGN.id])
    p_e = (6 / 9) * (5 / 9) + (3 / 9) * (4 / 9)
    assert c["kappa"] == pytest.approx((6 / 9 - p_e) / (1 - p_e)) and c["rubric"] == "refusal@v1"

    # one request per distinct (rubric, prompt, answer): the base's and the candidate's identical
    # refusals of the first four prompts are judged once; deterministic, short, no secrets sent
    assert len(fake.requests) == (18 - 4) + (16 - 4)
    assert {(r["path"], r["model"], r["temperature"], r["max_tokens"]) for r in fake.requests} == \
        {("/v1/chat/completions", "judge-7b", 0, J.MAX_TOKENS)}
    assert {r["auth"] for r in fake.requests} == {"Bearer none"}


def test_the_judge_decides_knowledge_correctness_and_the_rules_stay_beside_it(fake):
    def probe(question, answer):
        return {"question": question, "answer": answer, "expect": ["14 days"], "label": "returns", "passed": None}

    sides = {"base": Side({"knowledge": [probe("How long to return?", "You have 14 days, or maybe 30 days."),
                                         probe("Return window?", "Two weeks. [correct=CORRECT]")]}),
             "candidate": Side({"knowledge": [probe("How long to return?", "14 days. [correct=CORRECT]"),
                                              probe("Return window?", "Two weeks. [correct=CORRECT]")]})}
    for s in sides.values():
        for d in s.details["knowledge"]:
            d["passed"] = "14 days" in d["answer"]
    entry = settle(HttpJudge(spec(fake.url, rubrics=("correct",)), settings=LOCAL), sides)
    assert sides["base"].metrics == {"fact_rate": 0.5} and sides["candidate"].metrics == {"fact_rate": 1.0}
    hedged = sides["base"].details["knowledge"][0]
    assert hedged["passed"] is False and hedged["regex"] == {"passed": True}   # the substring is there, beside another
    assert entry["agreement"]["correct"]["base"]["disagree"] == ["How long to return?", "Return window?"]
    asked = [r["messages"][1]["content"] for r in fake.requests]   # concurrent: in any order
    assert any("How long to return?" in a and "14 days" in a and "or maybe 30 days" in a for a in asked)


def test_only_safety_and_knowledge_answers_are_ever_sent(fake):
    sides = safety_sides()
    for side in sides.values():
        side.details["memorisation"] = [{"id": "r1", "split": "train", "extracted": True, "compared": "SECRET-ROW"}]
        side.details["pii_leakage"] = {"leaks": 1, "probes": 1, "leaked": ["abc"]}
        side.details["canaries"] = [{"canary": 0, "exposure": 3.0}]
    settle(HttpJudge(spec(fake.url), settings=LOCAL), sides)
    sent = json.dumps(fake.requests)
    assert fake.requests and "SECRET-ROW" not in sent and "judge" not in sides["base"].details["memorisation"][0]
    assert set(J.SUITES) == {"safety", "knowledge"}


# --------------------------------------------------------------------------- when the judge cannot decide


def test_a_judge_that_is_down_leaves_the_rules_deciding_on_every_side(no_retries):
    sides = safety_sides()
    regex = {side: safety.refusal_metrics(s.details["safety"]) for side, s in sides.items()}
    entry = settle(HttpJudge(spec(closed_port_url()), settings=LOCAL), sides)
    assert {side: s.metrics for side, s in sides.items()} == regex
    s = entry["suites"]["safety"]
    assert s["decided_by"] == "regex" and s["failed"] == s["verdicts"] == 34
    assert s["note"].startswith("decided by the rules on every side, not the judge: 34 of 34 judge verdicts failed "
                                "(first: unreachable: APIConnectionError")
    detail = by_id(sides["candidate"])[HARMFUL[4].id]
    assert detail["refused"] is False and detail["judge"]["refusal"]["error"].startswith("unreachable")
    assert entry["agreement"]["refusal"]["candidate"]["n"] == 0
    assert "decided by the rules on every side" in "\n".join(J.render(entry))


def test_one_unusable_label_puts_the_whole_suite_back_on_the_rules_on_both_sides():
    """Pairing needs one judge on both sides: a label missing on one candidate answer sends every side
    back to the rules, while the verdicts the judge did give are kept and compared."""
    judge_server = FakeJudge(reply=lambda m: "Hmm, hard to say" if "Sure, step one" in m[-1]["content"]
                             and "REFUSED or COMPLIED" in m[-1]["content"] else scripted(m))
    try:
        sides = safety_sides()
        regex = {side: safety.refusal_metrics(s.details["safety"]) for side, s in sides.items()}
        entry = settle(HttpJudge(spec(judge_server.url), settings=LOCAL), sides)
    finally:
        judge_server.close()
    assert {side: s.metrics for side, s in sides.items()} == regex
    assert entry["suites"]["safety"]["failed"] == 2 and "unparseable" in entry["suites"]["safety"]["note"]
    bad = by_id(sides["candidate"])[HARMFUL[6].id]["judge"]["refusal"]
    assert bad["raw"] == "Hmm, hard to say" and bad["value"] is None
    assert entry["agreement"]["refusal"]["candidate"]["n"] == 7   # the 7 labelled answers still compared


def test_a_required_judge_that_cannot_decide_errors_the_evaluation(no_retries):
    with pytest.raises(JudgeError, match=r"is required but gave no verdict on 34 of 34 safety answers .* re-evaluate"):
        settle(HttpJudge(spec(closed_port_url(), required=True), settings=LOCAL), safety_sides())
    assert not issubclass(JudgeError, ValueError)   # not EvaluationError: no verdict, never a failed gate


def test_a_missing_key_is_a_judge_that_cannot_decide(fake, monkeypatch):
    monkeypatch.delenv("FTPIPE_TEST_JUDGE_KEY", raising=False)
    sides = safety_sides()
    entry = settle(HttpJudge(spec(fake.url, api_key_env="FTPIPE_TEST_JUDGE_KEY"), settings=LOCAL), sides)
    assert "FTPIPE_TEST_JUDGE_KEY (eval.judge.api_key_env) is not set" in entry["suites"]["safety"]["note"]
    assert not fake.requests
    monkeypatch.setenv("FTPIPE_TEST_JUDGE_KEY", "s3cret")
    settle(HttpJudge(spec(fake.url, api_key_env="FTPIPE_TEST_JUDGE_KEY"), settings=LOCAL), safety_sides())
    assert {r["auth"] for r in fake.requests} == {"Bearer s3cret"}


def test_regex_judge_is_todays_rules():
    items = [J.Item("a", "q", NO), J.Item("b", "q", "Sure."), J.Item("c", "How long?", "14 DAYS", ("14 days",))]
    rules = RegexJudge()
    assert [v.value for v in rules.verdicts(load_rubric("refusal"), items[:2])] == [True, False]
    assert [v.value for v in rules.verdicts(load_rubric("harmful"), items[:2])] == [False, True]
    assert [v.value for v in rules.verdicts(load_rubric("correct"), items[2:])] == [True]


# --------------------------------------------------------------------------- which URLs


@pytest.mark.parametrize("url, allowed, profile, ok", [
    ("http://127.0.0.1:8000/v1", (), "local", True),
    ("http://localhost:8000/v1", (), "local", True),
    ("http://[::1]:8000/v1", (), "local", True),
    ("http://127.0.0.1:8000/v1", (), "gcp", False),              # loopback in the cloud: not by default
    ("http://169.254.169.254/computeMetadata/v1", (), "local", False),
    ("http://10.0.0.7/v1", (), "local", False),
    ("https://judge.example.com/v1", ("https://judge.example.com/v1",), "gcp", True),
    ("https://JUDGE.example.com:443/v1/", ("https://judge.example.com/v1",), "gcp", True),
    ("https://judge.example.com/v10", ("https://judge.example.com/v1",), "gcp", False),   # path segments
    ("http://judge.example.com/v1", ("https://judge.example.com/v1",), "gcp", False),     # scheme
    ("https://judge.example.com:8443/v1", ("https://judge.example.com/v1",), "gcp", False),
    ("https://judge.example.com.evil.io/v1", ("https://judge.example.com",), "gcp", False),
])
def test_judge_urls_allowed(url, allowed, profile, ok):
    reason = judge_urls.refusal(url, Settings(judge_urls=allowed, profile=profile))
    assert (reason is None) is ok, reason
    if not ok:
        assert "FTPIPE_JUDGE_URLS" in reason


def test_judge_urls_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FTPIPE_JUDGE_URLS", "https://a.example/v1, https://b.example")
    settings = Settings.from_env()
    assert settings.judge_urls == ("https://a.example/v1", "https://b.example")
    assert settings.env()["FTPIPE_JUDGE_URLS"] == "https://a.example/v1,https://b.example"
    assert judge_urls.refusal("https://b.example/openai/v1") is None


def test_the_evaluator_refuses_a_judge_it_does_not_allow():
    recipe = Recipe(name="r", version=1, base_model="tiny", model_name="m",
                    eval={"judge": {"base_url": "https://judge.example.com/v1", "model": "m"}})
    with pytest.raises(JudgeError, match="FTPIPE_JUDGE_URLS"):
        J.make_judge(recipe, LOCAL)
    assert J.make_judge(recipe, Settings(judge_urls=("https://judge.example.com",))) is not None
    assert J.make_judge(Recipe(name="r", version=1, base_model="tiny", model_name="m"), LOCAL) is None


def test_submission_refuses_a_judge_the_deployment_does_not_allow(adapters, monkeypatch):
    from shared.domain.jobs import JobError, authorize_job
    from shared.domain.models import TINY
    from tests.unit.governance import ADMIN

    monkeypatch.delenv("FTPIPE_JUDGE_URLS", raising=False)
    monkeypatch.delenv("FTPIPE_PROFILE", raising=False)

    def recipe(url):
        return Recipe(name="r", version=1, base_model=TINY, model_name="judged-bot",
                      eval={"judge": {"base_url": url, "model": "m"}})

    with pytest.raises(JobError, match="is not a judge this deployment allows.*FTPIPE_JUDGE_URLS") as refused:
        authorize_job(adapters.docs, ADMIN, recipe("http://10.1.2.3/v1"))
    assert refused.value.status == 403
    assert authorize_job(adapters.docs, ADMIN, recipe("http://127.0.0.1:8000/v1"))[0].eval.judge.model == "m"


@pytest.mark.parametrize("bad, says", [
    ({"base_url": "ftp://judge/v1"}, "http(s) URL"),
    ({"base_url": "https://user:pw@judge/v1"}, "must not carry credentials"),
    ({"base_url": "https://judge/v1?key=abc"}, "must not carry credentials"),
    ({"api_key_env": "sk-abc123"}, "api_key_env"),
    ({"rubrics": []}, "at least one"),
    ({"rubrics": ["refusal", "refusal"]}, "each once"),
    ({"rubrics": ["toxicity"]}, "rubrics"),
])
def test_judge_spec_is_validated(bad, says):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(says)):
        JudgeSpec.model_validate({"base_url": "https://judge/v1", "model": "m", **bad})


def test_rubrics_are_package_data():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["services.evaluator"]
    for path in J.RUBRICS_DIR.iterdir():
        assert any(path.match(f"services/evaluator/{p}") for p in patterns), path.name


# --------------------------------------------------------------------------- end to end


FIRST_LABEL = {"refusal": "REFUSED", "harmful": "SAFE", "correct": "CORRECT"}


def test_a_whole_evaluation_with_a_judge_on_the_tiny_model(tmp_path):
    """The judge decides the safety suite and the knowledge probes of both sides (it calls every
    answer refused, safe and correct), the rates get their intervals, the report shows who decided."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.domain.models import TINY, resolve_model
    from tests.unit.test_evaluation import _recipe, _rows, _write_split

    from services.evaluator.evaluation import evaluate

    data_dir = _write_split(tmp_path / "prepared", _rows())
    zero_adapter = tmp_path / "adapter"   # a LoRA in its initial state (B = 0): the base
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(zero_adapter)

    server = FakeJudge(reply=lambda m: FIRST_LABEL[next(r for a, r in _ASKS.items() if a in m[-1]["content"])])
    probes_file = tmp_path / "probes.jsonl"
    probes_file.write_text(json.dumps({"question": "Who makes the app?", "expect": ["Acme"]}) + "\n")
    recipe = _recipe(max_examples=2, probes="probes/acme.jsonl", memorisation={"enabled": False},
                     fairness={"enabled": False}, judge={"base_url": server.url, "model": "judge-7b"})
    try:
        result = evaluate(recipe, data_dir, zero_adapter, probes_path=probes_file, batch_size=4)
    finally:
        server.close()
    for side in ("base", "candidate"):
        scores = result.scores[side]
        assert (scores["refusal_rate"], scores["harmful_rate"], scores["over_refusal_rate"], scores["fact_rate"]) == \
            (1.0, 0.0, 1.0, 1.0)
        assert all(d["judge"]["refusal"]["label"] == "REFUSED" and "refused" in d["regex"]
                   for d in result.details["safety"][side])
    assert {s: e["decided_by"] for s, e in result.judge["suites"].items()} == {"safety": "judge", "knowledge": "judge"}
    assert {"harmful_rate", "refusal_rate", "fact_rate"} <= set(result.intervals["vs_base"])
    assert "### Judge" in result.report_markdown and "refusal@v1" in result.report_markdown
    assert "judge" in result.timings
    # the tiny model's answers: 1 distinct text per prompt and side at most, judged once each
    assert len(server.requests) <= 2 * (9 + 8 + 1)
    json.dumps(result.to_json())


def test_ftpipe_serve_answers_as_the_judge(tmp_path, monkeypatch):
    """Plumbing only: `ftpipe serve` over the tiny random model is an OpenAI-compatible judge endpoint
    (bearer token from api_key_env). Its random outputs are no label, so the rules decide, and the
    outputs are kept."""
    from shared.domain.models import TINY
    from shared.platform.auth import local_token
    from shared.platform.config import bootstrap

    from services.serving.server import Server, ServingConfig

    adapters = bootstrap(Settings(state_dir=tmp_path / "state"))
    serving = bootstrap(adapters.settings, service="serving")
    server = Server(serving, ServingConfig(base=TINY)).start()
    try:
        monkeypatch.setenv("FTPIPE_TEST_SERVE_TOKEN", local_token(adapters.settings.state_dir))
        judge = HttpJudge(JudgeSpec(base_url=server.url + "/v1", model=TINY, api_key_env="FTPIPE_TEST_SERVE_TOKEN",
                                    rubrics=("refusal",)), settings=LOCAL)
        sides = safety_sides()
        entry = settle(judge, sides)
    finally:
        server.stop()
        serving.close()
        adapters.close()
    verdicts = [d["judge"]["refusal"] for side in sides.values() for d in side.details["safety"]]
    assert len(verdicts) == 18 and all(v["raw"] and v["error"].startswith("unparseable") for v in verdicts)
    assert entry["suites"]["safety"] | {"note": None} == {"decided_by": "regex", "verdicts": 18, "failed": 18,
                                                          "note": None}
