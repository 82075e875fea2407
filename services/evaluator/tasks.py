"""lm-eval tasks built from a prepared dataset's local test split, fully offline: one pair of tasks
for chat SFT, one task for preference pairs and one for classification.

Chat SFT: each test conversation becomes one document:

- ``prompt``: the chat-template rendering of every message except the last (assistant) turn,
  with ``add_generation_prompt=True``; the recipe's ``data.system_prompt`` is inserted first when
  the conversation has no system message of its own (the trainer formats training rows the same
  way, so the model is scored on the prompt shape it was tuned on);
- ``reference``: the content of that last assistant turn;
- ``n_tokens``: how many tokens lm-eval scores for the reference (see ``continuation_token_count``).

Two lm-eval tasks read those documents from a JSONL file (``dataset_path: json`` +
``dataset_kwargs.data_files``, so ``datasets`` never touches the network):

- ``ftpipe_generate`` (``generate_until``): greedy until the end-of-turn token, at most
  ``eval.max_new_tokens`` tokens; scored with normalised exact match (mean) and chrF
  (lm-eval's registered ``chrf`` aggregation = sacrebleu ``corpus_chrf``, 0-100);
- ``ftpipe_loglik`` (``loglikelihood``): log-probability of the reference given the prompt,
  aggregated with lm-eval's ``weighted_perplexity`` over reference tokens, i.e.
  ``exp(sum(-log p) / sum(n_tokens))`` = per-token perplexity.

Preference pairs (``ftpipe_preference``, multiple choice): the chosen and the rejected answer as
the two choices after the rendered prompt; ``preference_accuracy`` is the share of pairs whose
chosen answer gets the higher log-likelihood.

Classification (``ftpipe_classify``, multiple choice over the run's labels): ``ClassifierLM`` gives
lm-eval the classifier's log-probability of each label, so accuracy and macro-F1 come out of the
same harness as the generative scores.
"""
from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.domain.datasets import DatasetContractError, read_split, with_system_prompt

GENERATE_TASK = "ftpipe_generate"
LOGLIK_TASK = "ftpipe_loglik"
PREFERENCE_TASK = "ftpipe_preference"
CLASSIFY_TASK = "ftpipe_classify"


class EvaluationError(RuntimeError):
    """An evaluation that cannot run; the message says what, where, and how to fix it. Raised as
    such for malformed artefacts that no retry can fix (the test split, the labels, the probes file,
    a candidate folder that is not a model): the evaluator records those as a failed gate."""


class ModelLoadError(EvaluationError):
    """A model (the base, the candidate, production) that could not be loaded or merged. Not a
    verdict on the candidate: a file unreadable for a moment, a hub or a GPU away look the same,
    so the evaluator service retries it and never fails the gate for it (services/evaluator/service.py)."""


@dataclass(frozen=True)
class TestExample:
    id: str
    messages: tuple[dict, ...]  # every message but the last assistant turn
    reference: str


# --------------------------------------------------------------------------- test split


def read_test_split(data_dir: Path, kind: str) -> list[dict]:
    """Every row of ``data_dir/test.jsonl`` (of the recipe's data kind), or a clear error."""
    path = Path(data_dir) / "test.jsonl"
    if not path.is_file():
        raise EvaluationError(
            f"test split not found: {path} does not exist. The evaluator needs a prepared dataset "
            f"folder with train.jsonl/val.jsonl/test.jsonl (as written by preprocess); check that "
            f"data_dir points at it and that data.split gives the test split a non-zero fraction.")
    try:
        rows = read_split(path, kind)
    except DatasetContractError as exc:
        raise EvaluationError(f"{exc} — re-run preprocess to rewrite the split") from exc
    if not rows:
        raise EvaluationError(
            f"test split is empty: {path} has no rows. Give the test split more rows "
            f"(more data, or a larger third fraction in data.split) and prepare the dataset again.")
    ids = [str(row.get("id") or f"row-{i}") for i, row in enumerate(rows, start=1)]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EvaluationError(f"{path}: duplicate id {dup!r}; ids must be unique")
    return [{**row, "id": i} for row, i in zip(rows, ids, strict=True)]


def deterministic_subset(rows: list[dict], limit: int) -> list[dict]:
    """The ``limit`` rows with the smallest sha256 of their id, kept in file order: the same rows
    are chosen whatever the order of the file or the host."""
    chosen = set(sorted((r["id"] for r in rows), key=_id_rank)[:limit])
    return [r for r in rows if r["id"] in chosen]


def load_test_examples(data_dir: Path, *, max_examples: int) -> tuple[list[TestExample], int]:
    """Chat test conversations: (a deterministic subset of at most ``max_examples``, how many the
    split has)."""
    path = Path(data_dir) / "test.jsonl"
    rows = read_test_split(data_dir, "chat")
    examples = [to_example(row, where=f"{path} row {index}") for index, row in enumerate(rows, start=1)]
    chosen = {r["id"] for r in deterministic_subset(rows, max_examples)}
    return [ex for ex in examples if ex.id in chosen], len(examples)


def _id_rank(example_id: str) -> str:
    return hashlib.sha256(example_id.encode("utf-8")).hexdigest()


def to_example(row: Any, *, where: str) -> TestExample:
    fix = 'each line must be {"id": str, "messages": [{"role": ..., "content": ...}, ...]} ending with an assistant turn'
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise EvaluationError(f"{where}: no non-empty 'messages' list; {fix}")
    messages = row["messages"]
    for msg in messages:
        if (not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant")
                or not isinstance(msg.get("content"), str)):
            raise EvaluationError(f"{where}: malformed message {str(msg)[:80]!r}; {fix}")
    if messages[-1]["role"] != "assistant":
        raise EvaluationError(f"{where}: the last message is {messages[-1]['role']!r}, not 'assistant'; {fix}")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise EvaluationError(f"{where}: no user message before the assistant's reply; {fix}")
    return TestExample(id=row["id"], messages=tuple(messages[:-1]),
                       reference=messages[-1]["content"].strip())


# --------------------------------------------------------------------------- documents


def render_prompt(tokenizer, messages, *, system_prompt: str | None) -> str:
    msgs = with_system_prompt([dict(m) for m in messages], system_prompt)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def continuation_token_count(lm, prompt: str, reference: str) -> int:
    """Tokens lm-eval scores for ``reference`` after ``prompt``: exactly what its loglikelihood
    request encodes (lm-eval moves the prompt's trailing whitespace, here the newline after
    ``assistant``, into the continuation)."""
    _, continuation = lm._encode_pair(prompt, reference)
    return max(len(continuation), 1)


def end_of_turn_markers(tokenizer) -> list[str]:
    """Stop strings for generation: the token the chat template puts after an assistant turn
    (``<|im_end|>`` for SmolLM2, ``<|eot_id|>`` for Llama 3, ...) plus the eos token."""
    markers: list[str] = []
    probe = "ftpipe-probe-reply"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False)
        tail = text.split(probe, 1)[1].strip()
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if ids:
            first = tokenizer.convert_ids_to_tokens(ids[0])
            if first in tokenizer.all_special_tokens or first in tokenizer.get_added_vocab():
                markers.append(first)
    except Exception:  # noqa: BLE001 - a template that cannot render this falls back to eos
        pass
    if tokenizer.eos_token and tokenizer.eos_token not in markers:
        markers.append(tokenizer.eos_token)
    return markers


def write_documents(examples: list[TestExample], tokenizer, lm, path: Path, *,
                    system_prompt: str | None) -> list[dict]:
    docs = []
    for ex in examples:
        prompt = render_prompt(tokenizer, ex.messages, system_prompt=system_prompt)
        docs.append({"id": ex.id, "prompt": prompt, "reference": ex.reference,
                     "n_tokens": continuation_token_count(lm, prompt, ex.reference)})
    _write_jsonl(path, docs)
    return docs


# --------------------------------------------------------------------------- metrics


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _generate_results(doc: dict, results: list[str]) -> dict:
    prediction = results[0].strip()
    reference = doc["reference"]
    return {
        "exact_match": float(normalize_answer(prediction) == normalize_answer(reference)),
        "chrf": (reference, prediction),  # aggregated corpus-level by lm-eval's "chrf"
    }


def _loglik_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    loglikelihood, _is_greedy = results[0]
    return {"perplexity": (loglikelihood, doc["n_tokens"])}


# --------------------------------------------------------------------------- task configs


def _dataset_fields(docs_path: Path, cache_dir: Path) -> dict:
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs_path)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "doc_to_text": "prompt",  # column names: used verbatim (no Jinja, no literal_eval)
        "doc_to_target": "reference",
        # The prompt already ends with the assistant header of the chat template.
        "target_delimiter": "",
        "num_fewshot": 0,
    }


def generation_task_config(docs_path: Path, cache_dir: Path, *, until: list[str],
                           max_new_tokens: int) -> dict:
    return {
        "task": GENERATE_TASK,
        **_dataset_fields(docs_path, cache_dir),
        "output_type": "generate_until",
        "generation_kwargs": {"until": list(until), "max_gen_toks": int(max_new_tokens),
                              "do_sample": False, "temperature": 0.0},
        "process_results": _generate_results,
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True},
        ],
        "metadata": {"version": 1},
    }


def loglikelihood_task_config(docs_path: Path, cache_dir: Path) -> dict:
    return {
        "task": LOGLIK_TASK,
        **_dataset_fields(docs_path, cache_dir),
        "output_type": "loglikelihood",
        "process_results": _loglik_results,
        "metric_list": [
            {"metric": "perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        ],
        "metadata": {"version": 1},
    }


# --------------------------------------------------------------------------- preference pairs


def _answer(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages if m["role"] == "assistant")


def preference_documents(rows: list[dict], tokenizer, path: Path, *, system_prompt: str | None) -> list[dict]:
    docs = [{"id": row["id"], "prompt": render_prompt(tokenizer, row["prompt"], system_prompt=system_prompt),
             "choices": [_answer(row["chosen"]), _answer(row["rejected"])]} for row in rows]
    _write_jsonl(path, docs)
    return docs


def _preference_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    (chosen, _), (rejected, _) = results
    return {"preference_accuracy": float(chosen > rejected)}


def preference_task_config(docs_path: Path, cache_dir: Path) -> dict:
    return {
        "task": PREFERENCE_TASK,
        **_dataset_fields(docs_path, cache_dir),
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": 0,   # the chosen answer is always the first choice
        "process_results": _preference_results,
        "metric_list": [{"metric": "preference_accuracy", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1},
    }


# --------------------------------------------------------------------------- classification


def classification_documents(rows: list[dict], labels: list[str], path: Path) -> list[dict]:
    index = {label: i for i, label in enumerate(labels)}
    docs = []
    for row in rows:
        label = str(row["label"])
        if label not in index:
            raise EvaluationError(f"test row {row['id']}: label {label!r} is not one the model was trained on "
                                  f"({labels}); re-split the dataset so every test label occurs in train")
        docs.append({"id": row["id"], "text": row["text"], "gold": index[label]})
    _write_jsonl(path, docs)
    return docs


def _classification_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    predicted = max(range(len(results)), key=lambda i: results[i][0])
    return {"accuracy": float(predicted == doc["gold"]), "macro_f1": (doc["gold"], predicted)}


def classification_task_config(docs_path: Path, cache_dir: Path, labels: list[str]) -> dict:
    from services.evaluator.stats import macro_f1

    return {
        "task": CLASSIFY_TASK,
        **_dataset_fields(docs_path, cache_dir),
        "doc_to_text": "text",
        "output_type": "multiple_choice",
        "doc_to_choice": list(labels),
        "doc_to_target": "gold",
        "process_results": _classification_results,
        "metric_list": [{"metric": "accuracy", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "macro_f1", "aggregation": macro_f1, "higher_is_better": True}],
        "metadata": {"version": 1},
    }


def classifier_lm(model, tokenizer, labels: list[str], *, batch_size: int):
    """An lm-eval LM over a sequence classifier: the log-likelihood of continuation `label` after
    context `text` is the classifier's log-probability of that label. Only multiple-choice tasks
    over the labels can use it."""
    import torch
    from lm_eval.api.model import LM

    index = {label: i for i, label in enumerate(labels)}

    class ClassifierLM(LM):
        @torch.no_grad()
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            texts = list(dict.fromkeys(req.args[0] for req in requests))
            logprobs = {}
            device = next(model.parameters()).device
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                batch = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(device)
                rows = torch.log_softmax(model(**batch).logits.float(), dim=-1).tolist()
                logprobs.update(zip(chunk, rows, strict=True))
            out = []
            for req in requests:
                text, label = req.args
                row = logprobs[text]
                out.append((row[index[label.strip()]], row[index[label.strip()]] == max(row)))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("a sequence classifier has no token likelihoods")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("a sequence classifier does not generate")

    return ClassifierLM()


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")


def run_task(lm, task_config: dict) -> tuple[dict[str, float], list[dict]]:
    """Run one task config through lm-eval's Python API; return ({metric: value}, samples)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_defaults=False)  # our task only: skip indexing ~10k YAMLs
    out = simple_evaluate(model=lm, tasks=[task_config], task_manager=task_manager,
                          bootstrap_iters=0, log_samples=True, apply_chat_template=False)
    name = task_config["task"]
    raw = out["results"][name]
    metrics = {}
    for key, value in raw.items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none" and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            metrics[metric] = float(value)
    return metrics, out.get("samples", {}).get(name, [])
