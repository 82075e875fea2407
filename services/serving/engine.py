"""One base model in memory, many LoRA adapters on it, one generation at a time.

The base is loaded once. Adapters are injected into it with PEFT (`PeftModel.load_adapter`) and
chosen per request with `set_adapter`: swapping is a pointer change, never a reload of the base.
At most `max_adapters` stay loaded; the least recently used one is deleted from the model when
another must come in (its files stay on local disk, so bringing it back costs a load, not a
download). The base model itself is served with the adapters disabled.

Generation is serialised by one lock: on a CPU one generation already keeps every core busy, and
`set_adapter` changes the shared model, so two requests must not interleave. Requests queue on the
lock in arrival order (the wait is measured). Batching several requests into one forward pass —
PEFT's mixed-adapter batches (`adapter_names=`) or vLLM's continuous batching — is what a GPU
deployment wants; `ftpipe models export` writes the adapter in the layout vLLM serves.
"""
from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from shared.domain import model_registry as reg
from shared.domain.model_export import ExportError, IntegrityError, fetch_adapter
from shared.domain.models import ModelNotAvailable, base_model_identity, resolve_model

from services.serving.routing import ServingError, Target

_log = logging.getLogger("ftpipe.serving")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Finished:
    """The end of a generation: why it stopped and what it cost."""
    finish_reason: str                 # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    queued_s: float                    # waiting for the generation lock
    generation_s: float
    swap_s: float                      # choosing the adapter (loading it too, on a miss)
    loaded: bool = False               # whether the adapter had to be loaded for this request
    evicted: list[str] = field(default_factory=list)


class _TokenQueue:
    """A transformers streamer (put/end) that hands generated token ids to another thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:   # generate() first puts the prompt
            self._prompt = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def text_until_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` cut before the first stop string (OpenAI leaves the stop string out), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class Engine:
    def __init__(self, base_ref: str, *, max_adapters: int = 4, store=None, docs=None, device: str = "cpu",
                 on_evict: Callable[[str, str], None] | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_adapters < 1:
            raise ValueError(f"max_adapters {max_adapters}: at least 1 adapter must fit in memory")
        try:
            path = resolve_model(base_ref)
        except ModelNotAvailable as exc:
            raise ServingError(500, "base_model_unavailable", f"base model {base_ref!r}: {exc}") from exc
        self.base_ref, self.store, self.device, self.max_adapters = base_ref, store, device, max_adapters
        self.docs = docs   # the registry: its current record of a version is what the download is checked against
        self.base_sha256 = base_model_identity(base_ref)["sha256"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.base_loads = 1
        self.context_length = getattr(self.base.config, "max_position_embeddings", None)
        self.model = None                       # the PeftModel around self.base, once an adapter is loaded
        self.loaded: OrderedDict[tuple[str, str], str] = OrderedDict()   # (name, version) -> PEFT adapter name, LRU first
        self.lock = threading.Lock()
        self.on_evict = on_evict
        self._files = Path(tempfile.mkdtemp(prefix="ftpipe-serving-"))
        self._fetch_lock = threading.Lock()
        self._next_id = 0

    def close(self) -> None:
        shutil.rmtree(self._files, ignore_errors=True)

    # ------------------------------------------------------------------ adapters

    def _folder(self, target: Target) -> Path:
        """The target's adapter files on local disk, downloaded once and checked against the digests
        in the registry's current document of the version (not a cached one: a version sealed since
        it was cached is served at once). A bucket copy that does not match is refused, and logged."""
        folder = self._files / target.name / target.version
        with self._fetch_lock:
            if not (folder / "adapter_config.json").is_file():
                partial = folder.with_name(folder.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                doc = target.doc if self.docs is None else (
                    self.docs.get(reg.MODEL_VERSIONS, reg.version_id(target.name, target.version)) or target.doc)
                try:
                    fetch_adapter(self.store, doc, partial)
                except ExportError as exc:
                    shutil.rmtree(partial, ignore_errors=True)
                    unsealed = isinstance(exc, IntegrityError) and exc.unsealed
                    _log.error("adapter refused: %s", exc, extra={"model": target.label})
                    raise ServingError(409, "model_unverified" if unsealed else "model_integrity", str(exc),
                                       "model") from exc
                check_lora(partial, target.label)
                partial.rename(folder)
        return folder

    def fetch(self, target: Target) -> Path | None:
        """Have `target`'s adapter files on local disk, checked (None for the base model). A request
        calls it before its response starts, so a refused bucket copy is an HTTP error, not an error
        event in a stream."""
        return self._folder(target) if target.key is not None else None

    def _activate(self, target: Target, folder: Path | None) -> tuple[bool, list[str]]:
        """Make `target`'s adapter the active one (loading it, and evicting the least recently used,
        if it is not in memory). Call with the lock held."""
        from peft import PeftModel

        if target.key is None:
            return False, []
        if target.key in self.loaded:
            self.loaded.move_to_end(target.key)
            self.model.set_adapter(self.loaded[target.key])
            return False, []
        # PEFT keys its modules by adapter name, which cannot hold '.' or '@': a fresh name each load.
        self._next_id += 1
        name = f"adapter_{self._next_id}"
        try:
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except Exception as exc:  # noqa: BLE001 - peft raises many kinds for an adapter that does not fit
            raise ServingError(409, "adapter_load_failed", f"{target.label}'s adapter does not load onto "
                               f"{self.base_ref!r}: {type(exc).__name__}: {str(exc)[:300]}", "model") from exc
        self.model.eval()
        self.loaded[target.key] = name
        self.model.set_adapter(name)
        evicted = []
        while len(self.loaded) > self.max_adapters:
            key = next(iter(self.loaded))
            self._unload(key)
            evicted.append(f"{key[0]}@{key[1]}")
        return True, evicted

    def _unload(self, key: tuple[str, str]) -> None:
        name = self.loaded.pop(key)
        if self.loaded:
            self.model.delete_adapter(name)
        else:   # PEFT cannot hold zero adapters: take its layers out of the base instead (same object)
            self.model.unload()
            self.model = None
        if self.on_evict:
            self.on_evict(*key)

    def preload(self, target: Target) -> bool:
        """Load `target`'s adapter ahead of its first request (a version just promoted); whether it was
        loaded now (False: in memory already)."""
        folder = self._folder(target)
        with self.lock:
            loaded, _ = self._activate(target, folder)
        return loaded

    def drop(self, name: str, version: str) -> bool:
        """Take a version out of memory and off local disk (it was quarantined or archived)."""
        with self.lock:
            present = (name, version) in self.loaded
            if present:
                self._unload((name, version))
        shutil.rmtree(self._files / name / version, ignore_errors=True)
        return present

    # ------------------------------------------------------------------ generation

    def prompt_ids(self, *, messages: list[dict] | None = None, prompt: str | None = None) -> list[int]:
        if messages is not None:
            if self.tokenizer.chat_template is None:
                raise ServingError(400, "chat_template_missing", f"base model {self.base_ref!r} has no chat template: "
                                   "use /v1/completions with a plain prompt", "messages")
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if self.context_length and len(prompt_ids) + max_tokens > self.context_length:
            raise ServingError(400, "context_length_exceeded", f"the prompt ({len(prompt_ids)} tokens) plus "
                               f"max_tokens ({max_tokens}) exceeds the model's context of {self.context_length} "
                               "tokens: shorten the prompt or lower max_tokens", "max_tokens")

    def stream(self, target: Target, prompt_ids: list[int], sampling: Sampling,
               recheck: Callable[[Target], object] | None = None) -> Iterator[str | Finished]:
        """Generate for `target`: yields text pieces as they are decoded, then one Finished. Closing
        the iterator early (a client that went away) stops the generation at its next token.
        `recheck(target)` runs once the lock is held and raises if the version may no longer be
        served: a quarantine that arrived while the request waited must not be loaded back in."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        folder = self.fetch(target)
        cancel = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        asked = time.perf_counter()
        self.lock.acquire()
        started = time.perf_counter()
        try:
            if recheck is not None and target.key is not None:
                recheck(target)
            loaded, evicted = self._activate(target, folder)
        except BaseException:
            self.lock.release()
            raise
        swap_s = time.perf_counter() - started
        model = self.model if target.key is not None else (self.model or self.base)
        streamer = _TokenQueue()
        kwargs = {"max_new_tokens": sampling.max_tokens, "do_sample": sampling.temperature > 0,
                  "streamer": streamer, "stopping_criteria": StoppingCriteriaList([_Cancelled()]),
                  "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                  else self.tokenizer.eos_token_id}
        if sampling.temperature > 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        ids = torch.tensor([prompt_ids], device=self.device)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                # the base alone: the adapters' layers stay in the model, switched off
                with (model.disable_adapter() if target.key is None and self.model is not None else nullcontext()):
                    with torch.inference_mode():
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the request's thread
                failure.append(exc)
                streamer.end()
            finally:
                self.lock.release()

        threading.Thread(target=run, daemon=True, name="generate").start()
        generated: list[int] = []
        sent, stopped = "", False
        hold = max((len(s) for s in sampling.stop), default=1) - 1
        eos = set(_as_list(self.base.generation_config.eos_token_id) or [self.tokenizer.eos_token_id])
        try:
            while (tokens := streamer.queue.get()) is not None:
                generated += tokens
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                text, stopped = text_until_stop(text, sampling.stop)
                # Hold back what may be the start of a stop string or half of a multi-byte character.
                safe = len(text) if stopped else max(len(sent), len(text) - hold)
                while safe > len(sent) and text[safe - 1] == "\ufffd":
                    safe -= 1
                if safe > len(sent):
                    yield text[len(sent):safe]
                    sent = text[:safe]
                if stopped:
                    cancel.set()
                    break
            if failure:
                raise failure[0]
            if not stopped:
                text, stopped = text_until_stop(self.tokenizer.decode(generated, skip_special_tokens=True),
                                                sampling.stop)
                if len(text) > len(sent):
                    yield text[len(sent):]
            ended = stopped or (generated and generated[-1] in eos) or len(generated) < sampling.max_tokens
            completion = len(generated) - (1 if generated and generated[-1] in eos else 0)
            yield Finished("stop" if ended else "length", len(prompt_ids), completion, started - asked,
                           time.perf_counter() - started - swap_s, swap_s, loaded, evicted)
        finally:
            cancel.set()


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_lora(folder: Path, label: str) -> None:
    """Only LoRA adapters share a base this way: other kinds are served from their merged export."""
    import json

    config = json.loads((folder / "adapter_config.json").read_text()) if (folder / "adapter_config.json").is_file() \
        else None
    if config is None:
        raise ServingError(409, "model_not_servable", f"{label} is a whole model (adapter.kind full), not an adapter "
                           "on this base: serve its folder on its own (`ftpipe models export` … `vllm serve DIR/merged`)",
                           "model")
    if config.get("peft_type") != "LORA" or config.get("modules_to_save"):
        kind = config.get("peft_type") if config.get("peft_type") != "LORA" else "LoRA with extra trained modules"
        raise ServingError(409, "model_not_servable", f"{label} is a {kind} adapter; this server hot-swaps plain "
                           "LoRA adapters only: serve its merged export instead (`ftpipe models export`)", "model")
