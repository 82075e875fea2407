"""A prioritized service's workers (shared/platform/runtime.py) on the real local bus: waiting jobs of every
priority, on both of the trainer's topics, are taken in priority order without starving batch, and
none is nacked to wait."""
import json
import threading
import urllib.request

from shared.domain import events as ev
from shared.domain.recipe import Recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.discovery import lookup
from shared.platform.main import Process
from shared.platform.runtime import Service, publish_event


def recipe(priority: str) -> Recipe:
    return Recipe(name="t", version=1, base_model="tiny-random-smollm2", model_name="t",
                  scheduling={"priority": priority})


def test_trainer_workers_take_waiting_jobs_by_priority_without_starving_batch(tmp_path):
    adapters = bootstrap(Settings(state_dir=tmp_path, priority_starvation_limit=2))
    waiting = {"production": 4, "interactive": 2, "batch": 2}
    for priority, n in waiting.items():
        for i in range(n):
            run_id = f"{priority}-{i}"
            if i % 2:  # half of them arrive as prepared datasets, half as prepared jobs
                publish_event(adapters.bus, ev.DatasetPrepared(run_id=run_id, recipe=recipe(priority), dataset_id="d",
                                                               dataset_uri="file:///d/", counts={}))
            elif priority == "batch":  # from a publisher that does not set the attribute: batch
                data, attributes = ev.encode(ev.JobSubmitted(run_id=run_id, recipe=recipe(priority),
                                                             dataset_uri="file:///d/", prepared=True))
                del attributes[ev.PRIORITY]
                adapters.bus.publish(ev.JOBS, data, attributes)
            else:
                publish_event(adapters.bus, ev.JobSubmitted(run_id=run_id, recipe=recipe(priority),
                                                            dataset_uri="file:///d/", prepared=True))

    taken, attempts, stop, health = [], [], threading.Event(), {}

    def train(event, ctx):
        taken.append(event.run_id)
        attempts.append(ctx.message.delivery_attempt)
        if len(taken) == 1:  # /healthz answers while a worker holds a job
            url = lookup(tmp_path, "trainer")["url"]
            health.update(json.load(urllib.request.urlopen(f"{url}/healthz", timeout=5)))
        if len(taken) == sum(waiting.values()):
            stop.set()
        return []

    service = Service("trainer", {ev.DatasetPrepared: train, ev.JobSubmitted: train})
    process = Process("trainer", adapters, service=service, port=0, stop=stop).start()
    worker = threading.Thread(target=process.stop)  # returns once the workers finished
    stop.wait(60)
    worker.start()
    worker.join(60)
    adapters.close()
    assert not worker.is_alive()

    classes = [run_id.split("-")[0] for run_id in taken]
    # Highest first; after two picks passed it over, a lower class is tried first.
    assert classes == ["production", "production", "interactive", "batch",
                       "production", "interactive", "batch", "production"]
    assert sorted(taken) == sorted(f"{p}-{i}" for p, n in waiting.items() for i in range(n))
    assert attempts == [1] * len(taken)  # nothing was nacked to wait
    assert health["status"] == "ok" and health["service"] == "trainer"
