"""The chaos suite (`make chaos`; RELIABILITY.md): outside `make test`'s testpaths, every test
here is marked `chaos`. Trials are seeded: `--chaos-seed` replays a run of the suite."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.strict_ci"]


def pytest_addoption(parser):
    parser.addoption("--chaos-seed", type=int, default=7, help="seed of the trials' random choices")
    parser.addoption("--chaos-trials", type=int, default=20, help="crash trials (spread over the five services)")
    parser.addoption("--chaos-services", default="preprocess,trainer,evaluator,registry,tracker",
                     help="crash trials go round these services")
    parser.addoption("--chaos-results", default="crashes", help="crash trials: the results file's name")
    parser.addoption("--chaos-jobs", type=int, default=200, help="job messages in the load scenario")


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.chaos)
        if "chaos" in item.nodeid.split("/")[0]:  # scenarios run for up to an hour: over the suite's 900 s
            item.add_marker(pytest.mark.timeout(4 * 3600))


@pytest.fixture(scope="session")
def chaos_seed(request):
    return request.config.getoption("--chaos-seed")
