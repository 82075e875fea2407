"""LLM judges: refusal, harmfulness and answer correctness decided by a model where a rule cannot
judge, behind an OpenAI-compatible endpoint the recipe names (`eval.judge`: vLLM, Vertex AI's
OpenAI-compatible API, `ftpipe serve`). docs/evaluation-judges.md says how to set one up.

The rules stay: refusal phrasing patterns (safety.is_refusal), "harmful" = not refused, the
knowledge probes' substring check. They run offline and always, as RegexJudge. Where a judge is
configured, `settle` runs once every side has answered:

- the items each rubric judges, on every side: `refusal` every adversarial prompt, `harmful` the
  harmful ones, `correct` every knowledge probe;
- a verdict from the LLM judge (HttpJudge) and one from the rules (RegexJudge) for each;
- per suite, when every judge verdict on every side has a label, the judge decides: the details'
  `refused` / `harmful` / `passed` become its labels and the suite's metrics are recomputed. When
  any verdict failed (unreachable, an HTTP error, a label outside the rubric's), the rules decide
  on every side, because a paired comparison needs the same judge on both sides; the report says
  so. With `required: true` that is a JudgeError instead: not a verdict on the model, so the
  evaluation errors and the version can be re-evaluated;
- per rubric and side, the agreement of judge and rules: Cohen's kappa and the disagreeing ids.
  The judge's outputs (label, raw text clipped, rubric@version) stay in each probe's details.

Only the safety suite's and the knowledge probes' answers are sent. Memorisation, PII-leakage and
canary generations never leave the evaluator: they hold training text and secrets.

Rubrics are versioned files, data/rubrics/<name>.v<version>.md: a YAML header (rubric, version,
labels: the words the judge may answer, each meaning true or false) and `# system` and `# user`
sections whose {prompt}, {answer} and {expect} are filled in. data/rubrics/manifest.json records
each rubric's current version and the sha256 of every version ever published. The loader refuses a
file whose sha256 differs from its version's (a rubric edited in place would change what the old
reports' numbers mean), and tests/unit/test_judge.py fails first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from shared.domain import judge_urls
from shared.domain.recipe import JudgeSpec, Recipe
from shared.platform.config import Settings

from services.evaluator import probes, safety

_logger = logging.getLogger("ftpipe.evaluator")

RUBRICS_DIR = Path(__file__).parent / "data" / "rubrics"
MANIFEST = "manifest.json"
RAW_LIMIT = 500      # characters of the judge's output kept in the details
MAX_TOKENS = 8       # a label is one word
RETRIES = 2          # per request, with the client's exponential backoff (connection errors, 408/429/5xx)


class JudgeError(RuntimeError):
    """The judge cannot be used where the evaluation needs it: its URL is not allowed, a rubric file is
    not the published one, or a required judge gave no verdict. Not a verdict on the model: the
    evaluation errors (retried, then `unevaluated`, re-evaluable)."""


# --------------------------------------------------------------------------- rubrics


@dataclass(frozen=True)
class Item:
    """One thing to judge: a probe's id, what was asked, the answer, and the expected answers (correct)."""
    id: str
    prompt: str
    answer: str
    expect: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rubric:
    name: str
    version: int
    sha256: str
    system: str
    user: str
    labels: Mapping[str, bool]   # the judge's possible answers, each meaning true or false

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def messages(self, item: Item) -> list[dict[str, str]]:
        user = self.user.format(prompt=item.prompt, answer=item.answer, expect="\n".join(item.expect))
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def parse(self, text: str) -> str | None:
        """The label: the output's first word, in capitals, when it is one of the rubric's; else None.
        Fixed on purpose: a judge that answers otherwise gives no verdict rather than a guessed one."""
        match = re.match(r"[\W_]*([A-Za-z]+)", text)
        word = match.group(1).upper() if match else None
        return word if word in self.labels else None


_FRONT = re.compile(r"\A---\n(.*?)\n---\n(.*)\Z", re.S)
_SECTION = re.compile(r"^# (system|user)[ \t]*$", re.M)


def load_rubric(name: str, directory: Path = RUBRICS_DIR) -> Rubric:
    """The current version of a rubric, checked against the manifest's sha256 for that version."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if name not in manifest:
        raise JudgeError(f"no rubric {name!r} in {directory / MANIFEST}; known: {', '.join(sorted(manifest))}")
    version = int(manifest[name]["current"])
    path = directory / f"{name}.v{version}.md"
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if sha != manifest[name]["sha256"].get(str(version)):
        raise JudgeError(f"rubric {path} is not the published {name} v{version} (its sha256 differs from "
                         f"{MANIFEST}'s): a published rubric never changes; save the new text as "
                         f"{name}.v{version + 1}.md, make it current and record its sha256 in {MANIFEST}")
    front = _FRONT.match(data.decode())
    if front is None:
        raise JudgeError(f"{path}: must start with a '---' YAML header (rubric, version, labels)")
    meta = yaml.safe_load(front.group(1)) or {}
    labels = meta.get("labels")
    if meta.get("rubric") != name or meta.get("version") != version:
        raise JudgeError(f"{path}: its header says {meta.get('rubric')!r} v{meta.get('version')}, the file name "
                         f"{name} v{version}")
    if (not isinstance(labels, dict) or set(labels.values()) != {True, False}
            or not all(isinstance(k, str) and k.isalpha() and k.isupper() for k in labels)):
        raise JudgeError(f"{path}: labels must map capitalised words to true or false, both present")
    parts = _SECTION.split(front.group(2))
    sections = dict(zip(parts[1::2], (p.strip() for p in parts[2::2]), strict=True))
    if set(sections) != {"system", "user"} or not all(sections.values()):
        raise JudgeError(f"{path}: needs a '# system' and a '# user' section")
    return Rubric(name, version, sha, sections["system"], sections["user"], labels)


# --------------------------------------------------------------------------- judges


@dataclass(frozen=True)
class Verdict:
    value: bool | None        # None: no verdict; `error` says why
    label: str | None
    rubric: str               # rubric@version, or "regex"
    raw: str = ""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"label": self.label, "value": self.value, "raw": self.raw[:RAW_LIMIT], "rubric": self.rubric}
        return {**out, "error": self.error} if self.error else out


_RULES: dict[str, Callable[[Item], bool]] = {
    "refusal": lambda item: safety.is_refusal(item.answer),
    "harmful": lambda item: not safety.is_refusal(item.answer),
    "correct": lambda item: probes.Probe(item.prompt, item.expect).passes(item.answer),
}


class RegexJudge:
    """Today's rules behind the judge's interface: the refusal patterns, harmful = not refused, the
    knowledge probes' substring check. Offline, instant, always there."""
    name = "regex"

    def verdicts(self, rubric: Rubric, items: Sequence[Item]) -> list[Verdict]:
        rule = _RULES[rubric.name]
        return [Verdict(bool(rule(item)), None, "regex") for item in items]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class HttpJudge:
    """A model behind an OpenAI-compatible chat completions endpoint, through the `openai` client:
    temperature 0, a few tokens, the rubric's fixed labels; retries with backoff; `concurrency`
    requests at a time; no redirects followed (the URL was checked, a redirect's target was not).
    Verdicts are cached for the evaluation by (rubric sha256, model, prompt sha256, answer sha256):
    the same answer on two sides is judged once."""

    def __init__(self, spec: JudgeSpec, *, settings: Settings | None = None):
        from openai import DefaultHttpxClient, OpenAI

        if reason := judge_urls.refusal(spec.base_url, settings):
            raise JudgeError(reason)
        self.spec, self.name = spec, spec.model
        self._cache: dict[tuple[str, str, str, str], Verdict] = {}
        self._unavailable = None
        key = "none"   # the client needs one; an endpoint without auth (a local vLLM) ignores it
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env, "")
            if not key:
                self._unavailable = (f"{spec.api_key_env} (eval.judge.api_key_env) is not set in the evaluator's "
                                     "environment")
        self._client = OpenAI(base_url=spec.base_url, api_key=key or "none", timeout=spec.timeout_s,
                              max_retries=RETRIES, http_client=DefaultHttpxClient(follow_redirects=False))

    def verdicts(self, rubric: Rubric, items: Sequence[Item]) -> list[Verdict]:
        keys = [(rubric.sha256, self.spec.model, _sha("\0".join((item.prompt, *item.expect))), _sha(item.answer))
                for item in items]
        todo = {key: item for key, item in zip(keys, items, strict=True) if key not in self._cache}
        fresh: dict[tuple[str, str, str, str], Verdict] = {}
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.spec.concurrency, len(todo))) as pool:
                fresh = dict(zip(todo, pool.map(lambda item: self._ask(rubric, item), todo.values()), strict=True))
        # a label, or an answer outside the labels, is what this judge says at temperature 0; a
        # transport error is not, and is asked again next time
        self._cache.update({k: v for k, v in fresh.items() if v.value is not None or v.raw})
        return [self._cache.get(key) or fresh[key] for key in keys]

    def _ask(self, rubric: Rubric, item: Item) -> Verdict:
        from openai import OpenAIError

        if self._unavailable:
            return Verdict(None, None, rubric.ref, error=f"unavailable: {self._unavailable}")
        try:
            response = self._client.chat.completions.create(
                model=self.spec.model, messages=rubric.messages(item), temperature=0, max_tokens=MAX_TOKENS)
            raw = (response.choices[0].message.content or "") if response.choices else ""
        except OpenAIError as exc:
            return Verdict(None, None, rubric.ref, error=f"unreachable: {type(exc).__name__}: {str(exc)[:200]}")
        label = rubric.parse(raw)
        if label is None:
            return Verdict(None, None, rubric.ref, raw,
                           error=f"unparseable: the output does not start with {' or '.join(rubric.labels)}")
        return Verdict(rubric.labels[label], label, rubric.ref, raw)


def make_judge(recipe: Recipe, settings: Settings | None = None) -> HttpJudge | None:
    """The recipe's judge, or None; JudgeError when its URL is not allowed (before any model runs)."""
    return HttpJudge(recipe.eval.judge, settings=settings) if recipe.eval.judge is not None else None


# --------------------------------------------------------------------------- agreement


def agreement(first: Mapping[str, bool | None], second: Mapping[str, bool | None]) -> dict[str, Any]:
    """How two judges' verdicts on the same ids agree: n (ids both decided), agree, rate, Cohen's
    kappa (Cohen 1960: (p_o - p_e) / (1 - p_e), agreement beyond what the two rates give by chance;
    None when undefined: no ids, or both judges constant and equal), the 2x2 table and the
    disagreeing ids."""
    ids = sorted(k for k, v in first.items() if v is not None and second.get(k) is not None)
    n = len(ids)
    table = {"both": 0, "first_only": 0, "second_only": 0, "neither": 0}
    for k in ids:
        table[("both", "first_only", "second_only", "neither")[2 * (not first[k]) + (not second[k])]] += 1
    agree = table["both"] + table["neither"]
    kappa = None
    if n:
        p1, p2 = (table["both"] + table["first_only"]) / n, (table["both"] + table["second_only"]) / n
        expected = p1 * p2 + (1 - p1) * (1 - p2)
        kappa = None if expected >= 1 else (agree / n - expected) / (1 - expected)
    return {"n": n, "agree": agree, "rate": agree / n if n else None, "kappa": kappa, "table": table,
            "disagree": [k for k in ids if first[k] != second[k]]}


# --------------------------------------------------------------------------- deciding the suites


@dataclass(frozen=True)
class _Decides:
    rubric: str                      # the rubric's name
    field: str                       # the detail field it decides
    keep: Callable[[dict], bool]     # the details it judges


@dataclass(frozen=True)
class _Suite:
    decides: tuple[_Decides, ...]
    metrics: Callable[[list[dict]], dict[str, float]]


# The only suites whose answers are sent to a judge (module docstring).
SUITES: dict[str, _Suite] = {
    "safety": _Suite((_Decides("refusal", "refused", lambda d: True),
                      _Decides("harmful", "harmful", lambda d: d["category"] != safety.BENIGN)),
                     safety.refusal_metrics),
    "knowledge": _Suite((_Decides("correct", "passed", lambda d: True),),
                        lambda details: {"fact_rate": probes.passed_share(details)}),
}


def _items(suite: str, details: list[dict]) -> list[Item]:
    if suite == "knowledge":   # keyed by question, as services/evaluator/evidence.py pairs them
        return [Item(d["question"], d["question"], d["answer"], tuple(d["expect"])) for d in details]
    prompts = {p.id: p.prompt for p in safety.load_adversarial_prompts()}
    unknown = [d["id"] for d in details if d["id"] not in prompts]
    if unknown:
        raise JudgeError(f"safety details name prompts not in {safety.ADVERSARIAL_PROMPTS}: {', '.join(unknown[:5])}")
    return [Item(d["id"], prompts[d["id"]], d["answer"]) for d in details]


def settle(judge: HttpJudge, sides: Mapping[str, Any], *, say: Callable[[str], None] = _logger.info) -> dict[str, Any]:
    """Decide the judged suites of every side (module docstring). `sides`: side -> its scores
    (services/evaluator/suites.py SideScores: `details` per suite, `metrics`), updated in place.
    Returns the report's `judge` entry: model, rubrics, per suite who decided (and why not the
    judge), per rubric and side the agreement with the rules."""
    rules = RegexJudge()
    out: dict[str, Any] = {"model": judge.spec.model, "base_url": judge.spec.base_url, "rubrics": {}, "suites": {},
                           "agreement": {}}
    for suite, spec in SUITES.items():
        decides = [d for d in spec.decides if d.rubric in judge.spec.rubrics]
        present = {side: scores.details[suite] for side, scores in sides.items() if suite in scores.details}
        if not decides or not present:
            continue
        groups = []   # per rubric: (decides, rubric, [(side, detail, item, judge's verdict, rules' verdict)])
        for decide in decides:
            rubric = load_rubric(decide.rubric)
            out["rubrics"][rubric.name] = rubric.ref
            chosen = [(side, d) for side, details in present.items() for d in details if decide.keep(d)]
            items = _items(suite, [d for _, d in chosen])
            verdicts = zip(judge.verdicts(rubric, items), rules.verdicts(rubric, items), strict=True)
            groups.append((decide, rubric, [(side, d, item, jv, rv) for (side, d), item, (jv, rv)
                                            in zip(chosen, items, verdicts, strict=True)]))
        judged = [row for *_, rows in groups for row in rows]
        failed = [jv for *_, jv, _ in judged if jv.value is None]
        if failed and judge.spec.required:
            raise JudgeError(f"eval.judge {judge.spec.model} at {judge.spec.base_url} is required but gave no verdict "
                             f"on {len(failed)} of {len(judged)} {suite} answers (first: {failed[0].error}); fix the "
                             "judge, then re-evaluate (`ftpipe models reevaluate`)")
        by = "regex" if failed else "judge"
        for decide, rubric, rows in groups:
            for _, detail, _, jv, rv in rows:
                detail.setdefault("judge", {})[rubric.name] = jv.to_json()
                detail.setdefault("regex", {})[decide.field] = rv.value
                detail[decide.field] = (jv if by == "judge" else rv).value
            out["agreement"][rubric.name] = {
                side: {"rubric": rubric.ref, **agreement({item.id: jv.value for s, _, item, jv, _ in rows if s == side},
                                                         {item.id: rv.value for s, _, item, _, rv in rows if s == side})}
                for side in present}
        for side, details in present.items():
            sides[side].metrics.update(spec.metrics(details))
        entry: dict[str, Any] = {"decided_by": by, "verdicts": len(judged), "failed": len(failed)}
        if failed:
            entry["note"] = (f"decided by the rules on every side, not the judge: {len(failed)} of {len(judged)} "
                             f"judge verdicts failed (first: {failed[0].error})")
        out["suites"][suite] = entry
        say(f"judge {judge.spec.model}: {suite} decided by the {'judge' if by == 'judge' else 'rules'}"
            + (f" ({len(failed)} of {len(judged)} verdicts failed)" if failed else ""))
    return out


# --------------------------------------------------------------------------- report


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _cell(text: str, limit: int = 48) -> str:
    """A probe id (a knowledge probe's is its question) fit for a table cell."""
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render(entry: Mapping[str, Any], *, shown: int = 8) -> list[str]:
    """report.md lines for settle's entry (none when no judge was configured)."""
    if not entry:
        return []
    rubrics = ", ".join(entry["rubrics"].values()) or "none"
    lines = ["### Judge", "", f"`{entry['model']}` at {entry['base_url']}; rubrics {rubrics}. Its agreement with the "
             "rules per rubric and side: Cohen's kappa, the answers only the judge found refused / harmful / correct "
             "(judge only) or only the rules did (rules only), and the probes they disagree on.", ""]
    for suite, s in entry["suites"].items():
        lines.append(f"- {suite}: " + (s["note"] if "note" in s else f"decided by the judge ({s['verdicts']} verdicts)"))
    lines += ["", "| rubric | side | n | agreement | kappa | judge only | rules only | disagree on |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for by_side in entry["agreement"].values():
        for side, a in by_side.items():
            ids = ", ".join(_cell(i) for i in a["disagree"][:shown])
            if len(a["disagree"]) > shown:
                ids += f" (+{len(a['disagree']) - shown})"
            lines.append(f"| {a['rubric']} | {side} | {a['n']} | {_fmt(a['rate'])} | {_fmt(a['kappa'])} | "
                         f"{a['table']['first_only']} | {a['table']['second_only']} | {ids} |")
    return lines + [""]
