"""Load: `--chaos-jobs` (200) job messages published at once to `jobs`, each a prepared dataset
(so Spark is not what is measured: the run goes trainer -> evaluator -> registry, the tracker
recording every event). All must end succeeded with one version each, none lost (no dead letters,
nothing left on a subscription), and the services' memory must stay flat: each service's resident
memory is sampled every second, and the peak over the second half of the runs is compared with the
peak over the first half."""
from __future__ import annotations

import threading
import time

from chaos import harness as h
from ftpipe.client import Client
from ftpipe.stack import down, running, up
from shared.domain.jobs import RUNS
from shared.domain.model_registry import MODEL_VERSIONS

STEPS = 2


def test_job_messages_at_once(tmp_path, request):
    n = request.config.getoption("--chaos-jobs")
    recipe = h.recipe(tmp_path / "chaos-load.yaml", name="chaos-load", max_steps=STEPS, checkpoint_every=STEPS)
    # One test example, base and candidate only: the evaluator is the slowest stage per run.
    recipe.write_text(recipe.read_text().replace("  max_examples: 2", "  max_examples: 1\n  compare_production: false"))
    prepared = h.prepared_dataset(tmp_path, recipe)
    settings = h.stack_settings(tmp_path / "state")
    up(settings)
    client = Client(settings)
    pids = running(settings)
    samples: list[tuple[float, int, dict]] = []      # (t, runs done, service -> MiB)
    stop = threading.Event()
    try:
        # The dataset is uploaded once; every job names it by its store URL.
        first = client.submit({"recipe": str(recipe), "dataset": str(prepared), "prepared": True})
        client.wait(first, timeout_s=900, poll_s=0.5)
        dataset_url = client.run(first)["input_uri"]
        warm_rss = {s: h.tree_rss_mb(p) for s, p in pids.items()}

        def done() -> int:
            return len(client.adapters.docs.query(RUNS, where=[("status", "in", ["succeeded", "failed", "cancelled"])])) - 1

        def sample():
            while not stop.wait(1.0):
                samples.append((time.monotonic(), done(), {s: round(h.tree_rss_mb(p), 1) for s, p in pids.items()}))
        threading.Thread(target=sample, daemon=True).start()
        started = time.monotonic()
        run_ids = [client.submit({"recipe": str(recipe), "dataset": dataset_url, "prepared": True}) for _ in range(n)]
        published_s = time.monotonic() - started
        h.wait_for(lambda: done() >= n, 6 * 3600, f"{n} runs to end", poll_s=5)
        wall = time.monotonic() - started
        stop.set()
        runs = [client.run(r) for r in run_ids]
        statuses = {s: sum(1 for r in runs if r["status"] == s) for s in {r["status"] for r in runs}}
        versions = [doc["run_id"] for _, doc in client.adapters.docs.query(MODEL_VERSIONS)]
        problems = [f"{r['run_id']}: {r['status']} {r.get('error')}" for r in runs if r["status"] != "succeeded"]
        problems += [v for r in run_ids for v in h.run_violations(client, r, max_steps=STEPS)][:50]
        problems += [f"{r}: {len([v for v in versions if v == r])} versions" for r in run_ids if versions.count(r) != 1]
        problems += [f"dead letter: {d}" for d in client.dlq_list()]
        problems += [f"{s} restarted or died" for s, p in pids.items() if running(settings).get(s) != p]
        half = [s for s in samples if s[1] <= n // 2], [s for s in samples if s[1] > n // 2]
        peaks = [{svc: max(s[2][svc] for s in part) for svc in pids} if part else {} for part in half]
        for svc in pids:  # flat: the second half's peak within 25% (+50 MiB) of the first half's
            if peaks[0] and peaks[1] and peaks[1][svc] > peaks[0][svc] * 1.25 + 50:
                problems.append(f"{svc} memory grew: {peaks[0][svc]} -> {peaks[1][svc]} MiB")
        h.save("load", {
            "jobs": n, "recipe": f"tiny model, {STEPS} steps, prepared dataset via jobs (no Spark), task score only",
            "publish_s": round(published_s, 2), "wall_s": round(wall, 1),
            "throughput_runs_per_min": round(n / wall * 60, 2), "statuses": statuses,
            "versions_registered": len(set(versions) & set(run_ids)),
            "rss_mb_after_warm_run": {s: round(v, 1) for s, v in warm_rss.items()},
            "rss_mb_peak_first_half": peaks[0], "rss_mb_peak_second_half": peaks[1],
            "peak_vmhwm_mb": {s: round(h.peak_rss_mb(p), 1) for s, p in pids.items()},
            "state_files_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in settings.state_dir.glob("*.db")},
            "violations": problems})
        assert not problems, problems[:20]
    finally:
        stop.set()
        down(settings)
