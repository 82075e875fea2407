"""`ftpipe serve` against plain transformers generation, on SmolLM2-135M-Instruct (shared.domain.models).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve/run.py [--requests 8] [--max-tokens 64] [--out FILE]

Two LoRA adapters of the demo recipe's shape (r 16, alpha 32, all linear layers; random weights,
which cost the same as trained ones) are registered in a scratch state folder. Then, on the same
prompts, greedy, one request at a time:

- transformers: the adapter merged into the base (`merge_and_unload`), `model.generate` in-process —
  what a one-model-per-version deployment runs;
- ftpipe serve: the same adapter unmerged on the shared base, through the HTTP API (whole answers,
  then streamed for the time to the first token), and alternating between the two adapters on every
  request (a swap each time);
- swap times: choosing a loaded adapter (set_adapter), loading one from local disk (an LRU miss),
  and, for scale, what a server without hot-swapping pays per version change: loading the base
  again and merging the adapter.

Prints the figures side by side and writes them to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import requests  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["Where is my order? It has been a week.", "How do I return a tent that arrived damaged?",
           "Can I change the delivery address after ordering?", "Do you ship to New Zealand?",
           "My hiking boots are too small. Can I swap them for a bigger size?",
           "What is your refund policy for sale items?", "How long does express delivery take?",
           "The zip on my jacket broke after two trips. What can you do?"]


def make_adapters(base_path: Path, out: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():   # small random updates: the model still speaks, so answers have normal lengths
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        folder = out / f"lora{seed}"
        peft_model.save_pretrained(folder)
        folders.append(folder)
    return folders


def plain_transformers(base_path: Path, adapter: Path, prompts: list[str], max_tokens: int) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    reload_s = time.perf_counter() - started
    latencies, tokens = [], 0
    for i, prompt in enumerate([prompts[0]] + prompts):   # the first is a warm-up
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        if i:
            latencies.append(time.perf_counter() - t)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    return {"latency_p50_s": statistics.median(latencies), "latency_mean_s": statistics.mean(latencies),
            "tokens": tokens, "tokens_per_s": tokens / sum(latencies), "reload_and_merge_s": reload_s}


def through_server(url: str, token: str, models: list[str], prompts: list[str], max_tokens: int,
                   stream: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    latencies, firsts, tokens = [], [], 0
    for i, prompt in enumerate([prompts[0]] + prompts):
        body = {"model": models[i % len(models)], "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0}
        t = time.perf_counter()
        if stream:
            first, completion = None, 0
            with requests.post(url + "/v1/chat/completions", json={**body, "stream": True,
                               "stream_options": {"include_usage": True}}, headers=headers, stream=True) as resp:
                for line in resp.iter_lines(decode_unicode=True):
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - t
                    if chunk.get("usage"):
                        completion = chunk["usage"]["completion_tokens"]
        else:
            resp = requests.post(url + "/v1/chat/completions", json=body, headers=headers)
            resp.raise_for_status()
            completion = resp.json()["usage"]["completion_tokens"]
        if i:
            latencies.append(time.perf_counter() - t)
            tokens += completion
            if stream:
                firsts.append(first)
    out = {"latency_p50_s": statistics.median(latencies), "latency_mean_s": statistics.mean(latencies),
           "tokens": tokens, "tokens_per_s": tokens / sum(latencies)}
    if stream:
        out["first_token_p50_s"] = statistics.median(firsts)
    return out


def swap_times(server, targets, rounds: int = 20) -> dict:
    """Per-swap costs measured on the engine: set_adapter between loaded adapters, and a load from
    local disk after an eviction."""
    engine = server.engine
    for target in targets:
        engine.preload(target)
    swaps = []
    for i in range(rounds):
        target = targets[i % 2]
        started = time.perf_counter()
        with engine.lock:
            engine._activate(target, None)
        swaps.append(time.perf_counter() - started)
    loads = []
    for _ in range(5):
        engine.drop(targets[0].name, targets[0].version)      # out of memory and off disk …
        folder = engine._folder(targets[0])                     # … fetched and checked again (not timed)
        started = time.perf_counter()
        with engine.lock:
            engine._activate(targets[0], folder)
        loads.append(time.perf_counter() - started)
    return {"set_adapter_p50_ms": statistics.median(swaps) * 1e3, "load_from_disk_p50_ms": statistics.median(loads) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    prompts = (PROMPTS * (args.requests // len(PROMPTS) + 1))[:args.requests]

    from shared.domain.models import SMOLLM2, resolve_model
    from shared.platform.auth import local_token
    from shared.platform.config import Settings, bootstrap
    from tests.unit.test_serving import add_version

    from services.serving.server import Server, ServingConfig

    base_path = resolve_model(SMOLLM2)
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-serve-") as tmp:
        adapters_dir = make_adapters(base_path, Path(tmp))
        baseline = plain_transformers(base_path, adapters_dir[0], prompts, args.max_tokens)
        adapters = bootstrap(Settings(state_dir=Path(tmp) / "state"))
        versions = []
        for i, folder in enumerate(adapters_dir):
            versions.append(add_version(adapters, "bench-bot", f"run-{i}", folder, base=SMOLLM2, approval=i > 0))
        started = time.perf_counter()
        server = Server(adapters, ServingConfig(base=SMOLLM2, max_adapters=2)).start()
        startup_s = time.perf_counter() - started
        token = local_token(adapters.settings.state_dir)
        models = [f"bench-bot@{v}" for v in versions]
        try:
            one = through_server(server.url, token, models[:1], prompts, args.max_tokens)
            streamed = through_server(server.url, token, models[:1], prompts, args.max_tokens, stream=True)
            alternating = through_server(server.url, token, models, prompts, args.max_tokens)
            swaps = swap_times(server, [server.router.version("bench-bot", v) for v in versions])
        finally:
            server.stop()
            adapters.close()
    results = {"model": SMOLLM2, "requests": args.requests, "max_tokens": args.max_tokens,
               "torch_threads": torch.get_num_threads(), "transformers_merged": baseline, "serve_one_adapter": one,
               "serve_streamed": streamed, "serve_alternating_adapters": alternating, "swap": swaps,
               "server_startup_s": startup_s}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [("transformers generate, merged adapter", baseline), ("ftpipe serve, one adapter (HTTP)", one),
            ("ftpipe serve, streamed (HTTP)", streamed), ("ftpipe serve, two adapters alternating", alternating)]
    print(f"SmolLM2-135M-Instruct, {args.requests} requests one at a time, greedy, max_tokens {args.max_tokens}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'':42} {'p50 latency':>12} {'tokens/s':>9} {'first token':>12}")
    for label, r in rows:
        first = f"{r['first_token_p50_s']:.3f} s" if "first_token_p50_s" in r else ""
        print(f"{label:42} {r['latency_p50_s']:>10.3f} s {r['tokens_per_s']:>9.1f} {first:>12}")
    print(f"swap to a loaded adapter (set_adapter): {swaps['set_adapter_p50_ms']:.2f} ms; load one from local disk: "
          f"{swaps['load_from_disk_p50_ms']:.0f} ms; reload the base and merge (no hot-swap): "
          f"{baseline['reload_and_merge_s'] * 1e3:.0f} ms; server start-up {startup_s:.1f} s")


if __name__ == "__main__":
    main()
