"""Checks that keep the codebase's shape: the layers import only what they may, and every service's
handlers agree with the topology its subscriptions are made from."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shared.domain import events as ev
from shared.platform.runtime import Service, ServiceDefinitionError, check_topology, handle_message
from shared.platform.topology import SERVICE_TOPICS

ROOT = Path(__file__).resolve().parents[2]
# What the platform may import from the domain: the contracts that travel on the bus.
DOMAIN_CONTRACTS = {"shared.domain.events", "shared.domain.recipe", "shared.domain.metrics"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from x import y` counts as x and x.y)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _services():
    from services.evaluator.service import SERVICE as evaluator
    from services.preprocess.service import SERVICE as preprocess
    from services.registry_fn.service import SERVICE as registry
    from services.serving.service import make_service
    from services.tracker.service import SERVICE as tracker
    from services.trainer.service import SERVICE as trainer

    return [preprocess, trainer, evaluator, registry, tracker, make_service(router=None, engine=None)]


def test_every_service_handles_exactly_the_topics_the_topology_subscribes_it_to():
    services = _services()
    assert {s.name for s in services} == set(SERVICE_TOPICS)
    for service in services:
        assert set(service.topics) == set(SERVICE_TOPICS[service.name]), service.name
        check_topology(service)  # what run_service does at start-up


def test_a_handler_keyed_by_a_string_or_an_unknown_class_is_refused_when_the_service_is_defined():
    def handler(event, ctx):
        return []

    with pytest.raises(ServiceDefinitionError, match=r"'JobSubmited' is not an event class.*ev\.JobSubmitted"):
        Service("preprocess", {"JobSubmited": handler})
    with pytest.raises(ServiceDefinitionError, match="is not an event class"):
        Service("preprocess", {ev.Event: handler})
    with pytest.raises(ServiceDefinitionError, match="not callable"):
        Service("preprocess", {ev.JobSubmitted: "on_job"})


def test_a_service_whose_handlers_disagree_with_the_topology_does_not_start(adapters):
    from shared.platform.runtime import run_service

    wrong = Service("trainer", {ev.JobSubmitted: lambda event, ctx: []})  # the topology also gives it datasets
    with pytest.raises(ServiceDefinitionError, match=r"subscribes it to \['datasets', 'jobs'\]"):
        run_service(wrong, adapters)


def test_an_event_of_a_class_without_a_handler_is_acknowledged_and_skipped(adapters):
    from shared.domain.recipe import Recipe

    service = Service("effect", {ev.TrainingStarted: lambda event, ctx: pytest.fail("not this one")})
    adapters.bus.create_subscription("effect.training", ev.TRAINING, adapters.settings.subscription_policy())
    data, attributes = ev.encode(ev.TrainingFailed(run_id="r1", reason="boom"))
    adapters.bus.publish(ev.TRAINING, data, attributes)
    [msg] = adapters.bus.pull("effect.training", max_messages=1, timeout_s=2)
    assert handle_message(service, adapters, ev.TRAINING, msg, subscription="effect.training") == "ignored"
    service = Service("effect", {ev.JobSubmitted: lambda event, ctx: pytest.fail("not this one")})
    # and a class delivered on another topic than its own is not handed to its handler
    job = ev.JobSubmitted(run_id="r2", recipe=Recipe(name="t", version=1, base_model="tiny-random-smollm2",
                                                     model_name="t"), dataset_uri="file:///x")
    data, attributes = ev.encode(job)
    adapters.bus.create_subscription("effect.datasets", ev.DATASETS, adapters.settings.subscription_policy())
    adapters.bus.publish(ev.DATASETS, data, attributes)
    [msg] = adapters.bus.pull("effect.datasets", max_messages=1, timeout_s=2)
    assert handle_message(service, adapters, ev.DATASETS, msg, subscription="effect.datasets") == "ignored"


def test_no_service_imports_another_and_shared_imports_no_service():
    for path in _python_files("services"):
        own = path.relative_to(ROOT).parts[1]
        others = {m for m in _imports(path) if m.startswith("services.") and m.split(".")[1] != own}
        assert not others, f"{path.relative_to(ROOT)} imports another service: {sorted(others)}"
    for path in _python_files("shared"):
        assert not {m for m in _imports(path) if m.split(".")[0] == "services"}, path.relative_to(ROOT)


def test_the_platform_takes_from_the_domain_only_the_contracts_on_the_bus():
    for path in _python_files("shared/platform"):
        domain = {m for m in _imports(path) if m.startswith("shared.domain.")}
        modules = {m for m in domain if (ROOT / (m.replace(".", "/") + ".py")).is_file()}
        assert modules <= DOMAIN_CONTRACTS, f"{path.relative_to(ROOT)} imports {sorted(modules - DOMAIN_CONTRACTS)}"
