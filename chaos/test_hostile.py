"""Hostile drops on the local stack: each one ends its run `failed` with a reason that says what is
wrong, no service restarts (same process ids before and after), and nothing is registered. The
multi-GB drop is a sparse file written straight into the bucket folder (a hand copy, announced by
the notifier), so it never takes disk or memory here; the preprocess process's peak memory is
measured while it handles it."""
from __future__ import annotations

import json
import threading
import time
import uuid

from chaos import harness as h
from ftpipe.client import Client
from ftpipe.stack import down, running, up
from shared.domain import events as ev
from shared.domain.jobs import RUNS

GIB = 2 ** 30


def drops() -> list[tuple[str, str, bytes | None, str]]:
    """(what, recipe, content or None for a special case, words the reason must contain)."""
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    deep = '{"messages": ' + "[" * 20_000 + "]" * 20_000 + "}"
    formula = "instruction,response\n" + "".join(
        f'"Where is order {i}?","=HYPERLINK(""http://evil.example/{i}"",""click"")"\n' for i in range(20))
    return [
        ("0 bytes", "chaos-tiny", b"", "input is empty (0 bytes)"),
        ("binary", "chaos-tiny", bytes(range(256)) * 64, "input looks binary"),
        ("one enormous line (300 MB)", "chaos-tiny", None, "over data.max_row_bytes"),
        ("deep nesting", "chaos-tiny", "\n".join([deep] * 10).encode(), "nested too deeply"),
        ("invalid UTF-8", "chaos-tiny", b"\n".join([b'{"messages": [{"role": "user", "content": "caf\xe9 cr\xe8me"}, '
                                            b'{"role": "assistant", "content": "ok"}]}'] * 10), "not valid UTF-8"),
        ("CSV formula injection", "chaos-tiny", formula.encode(), "spreadsheet formula"),
        ("recipe with a YAML python tag", "evil", (line + "\n").encode(), "could not determine a constructor"),
        ("multi-GB file (3 GiB, sparse)", "chaos-limits", None, "over the recipe's data.max_file_bytes"),
        ("traversal in the object name", "chaos-tiny", None, "'..' path segment"),
        ("traversal in the dataset URL", "chaos-tiny", None, "cannot be read from this store"),
    ]


def test_hostile_drops_are_rejected_with_reasons_and_the_services_stay_up(tmp_path):
    settings = h.stack_settings(tmp_path / "state")
    recipe = h.recipe(tmp_path / "chaos-tiny.yaml")
    limits = h.recipe(tmp_path / "chaos-limits.yaml", name="chaos-limits")
    limits.write_text(limits.read_text().replace("  min_rows: 5", f"  min_rows: 5\n  max_file_bytes: {GIB}"))
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    up(settings)
    client = Client(settings)
    store, bucket, bus = client.adapters.store, settings.bucket, client.adapters.bus
    pids = running(settings)
    peak = {"preprocess_tree_mb": 0.0}
    sampling = threading.Event()

    def sample():  # the preprocess process and its Spark JVM, every 0.2 s
        while not sampling.wait(0.2):
            peak["preprocess_tree_mb"] = max(peak["preprocess_tree_mb"], h.tree_rss_mb(pids["preprocess"]))
    threading.Thread(target=sample, daemon=True).start()
    try:
        client.drop(h.chats(tmp_path / "warm.jsonl"), str(recipe))   # uploads both recipes, warms Spark
        client.drop(h.chats(tmp_path / "warm2.jsonl", salt="-2"), str(limits))
        store.write(bucket, "recipes/evil.yaml",
                    f"name: evil\nversion: 1\nbase_model: tiny-random-smollm2\nmodel_name: evil\n"
                    f"data: !!python/object/apply:os.system ['touch {marker}']\n".encode())
        started, cases = time.monotonic(), {}
        for what, recipe_name, content, words in drops():
            name = f"incoming/{recipe_name}/{what.split(' (')[0].replace(' ', '-')}.jsonl"
            if what.startswith("CSV"):
                name = name.replace(".jsonl", ".csv")
            if content is not None:
                path = tmp_path / name.rsplit("/", 1)[1]
                path.write_bytes(content)
                store.upload_file(bucket, name, str(path))
            elif what.startswith("one enormous line"):
                path = tmp_path / "enormous.jsonl"
                with open(path, "w") as fh:
                    fh.write('{"messages": [{"role": "user", "content": "')
                    for _ in range(300):
                        fh.write("x" * 2 ** 20)
                    fh.write('"}]}\n')
                store.upload_file(bucket, name, str(path))
                path.unlink()
            elif what.startswith("multi-GB"):
                path = store.local_path(bucket, name)   # a hand copy into the bucket folder: sparse
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write((json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n").encode())
                    fh.truncate(3 * GIB)
            elif what == "traversal in the object name":
                # GCS accepts such a name; its notification reaches preprocess as any other
                forged = ev.ObjectFinalized(bucket=bucket, name="incoming/chaos-tiny/../../../etc/passwd",
                                            generation="1", size="10")
                bus.publish(ev.DATASET_UPLOADS, forged.model_dump_json().encode(), forged.attributes())
                name = forged.name
            else:  # a JobSubmitted (any engineer can publish one) pointing outside the store
                from shared.domain.recipe import load_recipe

                job = ev.JobSubmitted(run_id=f"run-hostile-{uuid.uuid4().hex[:8]}", recipe=load_recipe(str(recipe)),
                                      dataset_uri="file:///etc/passwd")
                bus.publish(ev.JOBS, *ev.encode(job))
                name = job.run_id
            cases[what] = (name, words)
        results = {}
        for what, (name, words) in cases.items():
            run = h.wait_for(lambda name=name: _find_run(client, name), 900, f"the run of {what}", poll_s=1)
            run = client.wait(run["run_id"], timeout_s=900, poll_s=1)
            results[what] = {"status": run["status"], "reason": run.get("error"), "expected_words": words,
                             "ok": run["status"] == "failed" and words in (run.get("error") or "")}
        wall = time.monotonic() - started
        sampling.set()
        after = running(settings)
        problems = [f"{w}: {r}" for w, r in results.items() if not r["ok"]]
        problems += [f"{s} restarted or died" for s in pids if after.get(s) != pids[s]]
        problems += h.store_violations(client)
        problems += [f"registered from a hostile drop: {m['version']}" for m in client.models()
                     if m.get("run_id") not in _warm_runs(client)]
        if marker.exists():
            problems.append("the YAML python tag ran a command")
        sparse = store.local_path(bucket, cases["multi-GB file (3 GiB, sparse)"][0])
        h.save("hostile_drops", {
            "cases": results, "wall_s": round(wall, 1),
            "preprocess_peak_rss_mb": {"python_vmhwm": round(h.peak_rss_mb(pids["preprocess"]), 1),
                                       "python_and_spark_jvm_sampled": round(peak["preprocess_tree_mb"], 1)},
            "multi_gb_file": {"apparent_bytes": sparse.stat().st_size, "allocated_bytes": sparse.stat().st_blocks * 512},
            "services_restarted": [s for s in pids if after.get(s) != pids[s]], "violations": problems})
        assert not problems, problems
    finally:
        sampling.set()
        down(settings)


def _find_run(client: Client, name: str) -> dict | None:
    docs = client.adapters.docs
    if name.startswith("run-"):
        return docs.get(RUNS, name)
    for _, run in docs.query(RUNS, where=[("source.object", "==", name)]):
        return run
    for _, run in docs.query(RUNS, where=[("status", "==", "failed")]):
        if name in (run.get("error") or ""):
            return run
    return None


def _warm_runs(client: Client) -> set[str]:
    return {run["run_id"] for _, run in client.adapters.docs.query(RUNS)
            if (run.get("source") or {}).get("object", "").startswith(("incoming/chaos-tiny/warm", "incoming/chaos-limits/warm"))}
